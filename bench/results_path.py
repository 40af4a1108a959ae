"""Where a benchmark writes its results: bench/results/<name>-<date>-<time>, never over an earlier run's files."""
from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def fresh_stem(name: str) -> Path:
    """RESULTS/<name>-YYYYmmdd-HHMM, or with -2, -3, ... after it where a run of the same minute wrote its files
    (two runs a minute apart once left only the second one's)."""
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M')}"
    stem, n = base, 1
    while any(RESULTS.glob(f"{stem.name}.*")):
        n += 1
        stem = base.with_name(f"{base.name}-{n}")
    return stem


def write_json(result: dict, name: str, out: str | None = None) -> Path:
    """result as JSON at `out`, or at a fresh RESULTS/<name>-<date>-<time>.json; prints where."""
    path = Path(out) if out else fresh_stem(name).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path
