"""pytest plugin (entry point `pytest11: dsv3_rt_conformance`): options and reporting for
`pytest --pyargs dsv3_rt.conformance --backend NAME`.

It is loaded by every pytest run in an environment where dsv3-rt is installed, so it only adds options and
does nothing until the conformance tests are collected. `--dsv3rt-backend` always exists; the short
`--backend` is added only when no other plugin or initial conftest has claimed it.
"""
from __future__ import annotations

import os
from typing import Any

import pytest

SUITE = pytest.StashKey[Any]()
RECORDS = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsv3_rt", "dsv3-rt conformance suite")
    group.addoption("--dsv3rt-backend", dest="dsv3rt_backend", default=None, metavar="NAME",
                    help="backend the dsv3_rt.conformance tests run against (default: $DSV3RT_BACKEND)")
    group.addoption("--dsv3rt-report", dest="dsv3rt_report", default=None, metavar="PATH",
                    help="write the conformance records as JSON (one record per case)")
    group.addoption("--dsv3rt-markdown", dest="dsv3rt_markdown", default=None, metavar="PATH",
                    help="write the conformance matrix as Markdown")


def _option_taken(parser: pytest.Parser, name: str) -> bool:
    groups = [parser._anonymous, *parser._groups]  # noqa: SLF001 - pytest has no public query for this
    return any(name in opt.names() for g in groups for opt in g.options)


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]):  # noqa: ANN201
    result = yield  # initial conftests (and their options) are loaded now
    if not _option_taken(parser, "--backend"):
        parser.getgroup("dsv3_rt").addoption("--backend", dest="dsv3rt_backend", default=None, metavar="NAME",
                                             help="same as --dsv3rt-backend")
    return result


def conformance_suite(config: pytest.Config) -> Any:
    """The Suite for the chosen backend, built on first use (only when the conformance tests are collected)."""
    if SUITE not in config.stash:
        from dsv3_rt.conformance import suite_for
        from dsv3_rt.core.errors import Dsv3Error

        name = config.getoption("dsv3rt_backend") or os.environ.get("DSV3RT_BACKEND")
        if not name:
            raise pytest.UsageError("dsv3_rt.conformance: choose a backend with --backend NAME (or --dsv3rt-backend NAME)")
        try:
            config.stash[SUITE] = suite_for(name)
        except Dsv3Error as e:
            raise pytest.UsageError(f"dsv3_rt.conformance: {e}") from None
        config.stash[RECORDS] = []
    return config.stash[SUITE]


def record(config: pytest.Config, rec: Any) -> None:
    config.stash[RECORDS].append(rec)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    records = config.stash.get(RECORDS, None)
    if not records:
        return
    from dsv3_rt.conformance import report

    head = report.header(config.stash[SUITE])
    if config.getoption("dsv3rt_report"):
        report.write_json(config.getoption("dsv3rt_report"), head, records)
    if config.getoption("dsv3rt_markdown"):
        with open(config.getoption("dsv3rt_markdown"), "w") as f:
            f.write(report.markdown([head], records))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    records = config.stash.get(RECORDS, None)
    if records:
        from dsv3_rt.conformance.report import summary

        s = config.stash[SUITE]
        terminalreporter.write_line(f"dsv3_rt conformance: backend {s.cls.name} ({s.version}) on {s.device}: {summary(records)}")
