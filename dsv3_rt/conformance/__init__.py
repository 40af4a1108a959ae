"""The dsv3-rt conformance suite, shipped with the package so any backend (built-in or third-party) can run it.

    dsv3-rt conformance --backend NAME [--report r.json] [--junit j.xml] [--markdown m.md]
    pytest --pyargs dsv3_rt.conformance --backend NAME          (or --dsv3rt-backend NAME)

Cases come from one registry (cases.py: every kernel op; model_cases.py: the tiny model) and are compared
with the reference `Kernels` under one tolerance table (tolerances.py).
"""
from __future__ import annotations

from dsv3_rt.conformance.suite import FAILING, STATUSES, Record, Suite
from dsv3_rt.conformance.tolerances import Tolerance


def suite_for(name: str | None) -> Suite:
    """The suite bound to an installed, available backend (selection rules of dsv3_rt.core.plugins)."""
    from dsv3_rt.core.plugins import registry

    chosen = registry().select(name)
    return Suite(chosen.cls, version=f"{chosen.origin.distribution} {chosen.origin.version}")


__all__ = ["Suite", "Record", "Tolerance", "STATUSES", "FAILING", "suite_for"]
