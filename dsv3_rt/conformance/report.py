"""Conformance results as files: JSON (one record per case, with a run header), JUnit XML, and a Markdown
matrix (op x dtype x backend) that merges reports from several machines."""
from __future__ import annotations

import json
import os
import platform
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from dsv3_rt.conformance.suite import FAILING, Record, Suite

FORMAT = "dsv3_rt.conformance/1"


def header(suite: Suite) -> dict[str, Any]:
    """Versions and environment of one run (DSV3RT_* variables included, to catch typos)."""
    import torch

    import dsv3_rt
    from dsv3_rt.core.kernels import API_VERSION

    return {"backend": suite.cls.name, "backend_version": suite.version, "device": suite.device,
            "available": suite.availability.ok, "availability": suite.availability.reason,
            "dsv3_rt": dsv3_rt.__version__, "kernel_api": API_VERSION, "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DSV3RT_")}}


def to_json(head: dict[str, Any] | list[dict[str, Any]], records: list[Record]) -> dict[str, Any]:
    heads = head if isinstance(head, list) else [head]
    return {"format": FORMAT, "runs": heads, "records": [r.to_dict() for r in records]}


def write_json(path: str | Path, head: dict[str, Any] | list[dict[str, Any]], records: list[Record]) -> None:
    Path(path).write_text(json.dumps(to_json(head, records), indent=1) + "\n")


def read_json(path: str | Path) -> tuple[list[dict[str, Any]], list[Record]]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a dsv3-rt conformance report (format {data.get('format')!r})")
    return data["runs"], [Record(**r) for r in data["records"]]


def merge(paths: list[str | Path]) -> tuple[list[dict[str, Any]], list[Record]]:
    """Several reports (e.g. one per machine) as one; a later report's record for the same backend, device
    and case replaces an earlier one."""
    heads: list[dict[str, Any]] = []
    by_key: dict[tuple[str, str, str], Record] = {}
    for p in paths:
        h, recs = read_json(p)
        heads += h
        for r in recs:
            by_key[(r.backend, r.device, r.case)] = r
    return heads, list(by_key.values())


def junit(records: list[Record], name: str = "dsv3_rt.conformance") -> str:
    """JUnit XML: mismatch / error / xpass are failures, skip and xfail are skipped, fallback passes."""
    suite = ET.Element("testsuite", name=name, tests=str(len(records)),
                       failures=str(sum(r.status in ("mismatch", "xpass") for r in records)),
                       errors=str(sum(r.status == "error" for r in records)),
                       skipped=str(sum(r.status in ("skip", "xfail") for r in records)),
                       time=f"{sum(r.seconds for r in records):.3f}")
    for r in records:
        tc = ET.SubElement(suite, "testcase", classname=f"{name}.{r.backend}.{r.op}", name=r.case, time=f"{r.seconds:.3f}")
        if r.status in ("mismatch", "xpass"):
            ET.SubElement(tc, "failure", message=r.message or r.status, type=r.status)
        elif r.status == "error":
            ET.SubElement(tc, "error", message=r.message, type="error")
        elif r.status in ("skip", "xfail"):
            ET.SubElement(tc, "skipped", message=r.message, type=r.status)
        elif r.status == "fallback":
            ET.SubElement(tc, "system-out").text = f"fallback: {r.message}"
    return ET.tostring(suite, encoding="unicode")


def _cell(recs: list[Record]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for r in recs:
        counts[r.status] += 1
    bad = sum(counts[s] for s in FAILING)
    ran = sum(counts[s] for s in ("pass", "xfail", *FAILING))
    if bad:
        kinds = "/".join(s for s in sorted(FAILING) if counts[s])
        return f"❌ {bad}/{ran} {kinds}"
    if counts["pass"]:
        extra = f" ({counts['xfail']} xfail)" if counts["xfail"] else ""
        return f"✅ {counts['pass']}/{ran}{extra}"
    if counts["fallback"]:
        return "↩ fallback"
    if counts["xfail"]:
        return f"xfail {counts['xfail']}"
    return "– skip"


def markdown(heads: list[dict[str, Any]], records: list[Record]) -> str:
    """The matrix: one row per (op, dtype), one column per backend (and device, when a backend ran on several)."""
    columns = sorted({(r.backend, r.device) for r in records})
    names = {c: c[0] if sum(1 for d in columns if d[0] == c[0]) == 1 else f"{c[0]} ({c[1]})" for c in columns}
    cells: dict[tuple[str, str], dict[tuple[str, str], list[Record]]] = defaultdict(lambda: defaultdict(list))
    rows: list[tuple[str, str]] = []
    for r in records:
        if (r.op, r.dtype) not in cells:
            rows.append((r.op, r.dtype))
        cells[(r.op, r.dtype)][(r.backend, r.device)].append(r)
    lines = ["# dsv3-rt conformance matrix", ""]
    for h in heads:
        lines.append(f"- **{h['backend']}** {h['backend_version']} on {h['device']} (dsv3-rt {h['dsv3_rt']}, torch {h['torch']}, "
                     f"{h['platform']})")
    lines += ["", "| op | dtype | " + " | ".join(names[c] for c in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(_cell(cells[row].get(c, [])) if cells[row].get(c) else ""
                                                           for c in columns) + " |")
    failures = [r for r in records if r.status in FAILING]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {r.backend} `{r.case}`: {r.status}: {r.message}" for r in failures]
    return "\n".join(lines) + "\n"


def summary(records: list[Record]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r.status] += 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: -x[1]))
