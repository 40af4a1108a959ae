"""`dsv3-rt conformance`: run the conformance suite against one backend, or merge reports into one matrix."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dsv3_rt.cli import add_common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conformance", help="check a backend against the reference kernels",
                       description="Run every conformance case (each kernel op over shapes, dtypes and edge cases, "
                                   "and the tiny model) against a backend; exit 1 if any case fails.")
    p.add_argument("--backend", default=None, metavar="NAME", help="backend to check (default: $DSV3RT_BACKEND, else auto)")
    p.add_argument("--report", metavar="PATH", help="write one JSON record per case")
    p.add_argument("--junit", metavar="PATH", help="write JUnit XML")
    p.add_argument("--markdown", metavar="PATH", help="write the op x dtype matrix as Markdown")
    p.add_argument("--op", action="append", metavar="OP", help="only cases of this op (repeatable; e.g. rms_norm, model.logits)")
    p.add_argument("--dtype", action="append", metavar="DTYPE", help="only cases of this dtype (repeatable)")
    p.add_argument("-k", dest="match", metavar="TEXT", help="only cases whose id contains TEXT")
    p.add_argument("--list", action="store_true", help="list the case ids and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    add_common(p)
    p.set_defaults(func=main)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    m = actions.add_parser("merge", help="merge reports from several machines into one matrix")
    m.add_argument("reports", nargs="+", metavar="REPORT.json")
    m.add_argument("--markdown", dest="merge_markdown", metavar="PATH", help="write the merged matrix here (default: stdout)")
    m.add_argument("--output", metavar="PATH", help="write the merged JSON report here")
    add_common(m)
    m.set_defaults(func=merge_main)


def main(args: argparse.Namespace) -> int:
    from dsv3_rt.conformance import FAILING, report, suite_for

    suite = suite_for(args.backend)

    def selected(c) -> bool:  # noqa: ANN001
        return ((not args.op or c.op in args.op) and (not args.dtype or c.dtype in args.dtype)
                and (not args.match or args.match in c.id))

    if args.list:
        for c in suite.cases(selected):
            print(c.id)
        return 0
    print(f"dsv3-rt conformance: backend {suite.cls.name} ({suite.version}) on {suite.device}", file=sys.stderr)
    start = time.perf_counter()

    def show(r) -> None:  # noqa: ANN001
        if r.status in FAILING or not args.quiet:
            err = "" if r.max_abs is None else f" max_abs={r.max_abs:.3g}"
            print(f"{r.status:8s} {r.case}{err}{'  ' + r.message if r.message and r.status != 'pass' else ''}")

    records = suite.run(selected, on_record=show)
    head = report.header(suite)
    if args.report:
        report.write_json(args.report, head, records)
    if args.junit:
        Path(args.junit).write_text(report.junit(records))
    if args.markdown:
        Path(args.markdown).write_text(report.markdown([head], records))
    print(f"{len(records)} cases in {time.perf_counter() - start:.1f}s: {report.summary(records)}")
    return 1 if any(r.status in FAILING for r in records) else 0


def merge_main(args: argparse.Namespace) -> int:
    from dsv3_rt.conformance import report

    heads, records = report.merge(args.reports)
    if args.output:
        report.write_json(args.output, heads, records)
    text = report.markdown(heads, records)
    if args.merge_markdown:
        Path(args.merge_markdown).write_text(text)
    elif not args.output:
        print(text, end="")
    return 0
