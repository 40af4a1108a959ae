"""The conformance cases as pytest tests: `pytest --pyargs dsv3_rt.conformance --backend NAME`."""
from __future__ import annotations

import pytest

from dsv3_rt.conformance.plugin import conformance_suite, record


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_case" in metafunc.fixturenames:
        cases = conformance_suite(metafunc.config).cases()
        metafunc.parametrize("conformance_case", cases, ids=[c.id for c in cases])


def test_case(conformance_case, request: pytest.FixtureRequest, record_property) -> None:  # noqa: ANN001
    rec = conformance_suite(request.config).run_case(conformance_case)
    record(request.config, rec)
    for key in ("status", "max_abs", "max_rel", "atol", "rtol"):
        record_property(key, getattr(rec, key))
    if rec.status == "skip":
        pytest.skip(rec.message)
    if rec.status == "xfail":
        pytest.xfail(rec.message)
    if rec.status not in ("pass", "fallback"):
        pytest.fail(f"{rec.status}: {rec.message} (max abs {rec.max_abs}, max rel {rec.max_rel})", pytrace=False)
