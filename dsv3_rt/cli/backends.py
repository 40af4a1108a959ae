"""`dsv3-rt backends`: every installed backend, whether it can run here and why, and what it declares."""
from __future__ import annotations

import argparse
import json
from typing import Any

from dsv3_rt.cli import add_common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backends", help="list installed backends, their availability and capabilities",
                       description="List every installed backend (built-in or plugin), whether it is available on "
                                   "this machine and why, its device and declared capabilities, and broken plugins.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    add_common(p)
    p.set_defaults(func=main)


def describe() -> dict[str, Any]:
    """The JSON document `dsv3-rt backends --json` prints."""
    from dataclasses import asdict

    import dsv3_rt
    from dsv3_rt.core.kernels import API_VERSION, fallback_ops
    from dsv3_rt.core.plugins import registry

    reg = registry()
    available = reg.available()
    backends = []
    for b in sorted(reg.backends.values(), key=lambda b: (-b.cls.priority, b.name)):
        backends.append({
            "name": b.name, "plugin": b.origin.plugin, "distribution": b.origin.distribution, "version": b.origin.version,
            "class": f"{b.cls.__module__}.{b.cls.__qualname__}", "device_type": b.cls.device_type,
            "api_version": b.cls.api_version, "priority": b.cls.priority,
            "available": b.availability.ok, "reason": b.availability.reason, "device_name": b.device_name(),
            "capabilities": asdict(b.cls.capabilities), "fallback_ops": list(fallback_ops(b.cls)),
        })
    return {"dsv3_rt": dsv3_rt.__version__, "kernel_api": API_VERSION,
            "auto": available[0].name if available else None, "backends": backends,
            "broken": [{"plugin": x.origin.plugin, "distribution": x.origin.distribution, "version": x.origin.version,
                        "error": x.error} for x in reg.broken]}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(args: argparse.Namespace) -> int:
    doc = describe()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = [["NAME", "AVAILABLE", "PRIO", "DEVICE", "DISTRIBUTION", "DTYPES", "NATIVE OPS", "REASON"]]
    for b in doc["backends"]:
        caps = b["capabilities"]
        rows.append([b["name"] + (" *" if b["name"] == doc["auto"] else ""), "yes" if b["available"] else "no",
                     str(b["priority"]), b["device_name"] or b["device_type"], f"{b['distribution']} {b['version']}",
                     ",".join(caps["dtypes"]), f"{len(caps['ops'])}/{len(caps['ops']) + len(b['fallback_ops'])}", b["reason"]])
    print(_table(rows))
    print("* = picked by --backend auto")
    for x in doc["broken"]:
        print(f"broken plugin {x['plugin']} ({x['distribution']} {x['version']}): {x['error']}")
    return 0
