"""The `dsv3-rt` command. Each subcommand lives in its own module with `add_parser` and `main`."""
from __future__ import annotations

import argparse
import importlib
import sys

from dsv3_rt.core import distributed
from dsv3_rt.core.errors import Dsv3Error

#: subcommand name -> module under dsv3_rt.cli (each defines add_parser(subparsers) and main(args) -> int)
SUBCOMMANDS = {
    "run": "run",
    "serve": "serve",
    "backends": "backends",
    "conformance": "conformance",
    "convert": "convert",
}


def add_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options every subcommand accepts (call from each subcommand's add_parser)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3-rt",
        description="Run DeepSeek-V3 the same way on any accelerator: one model graph, pluggable backends.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"dsv3_rt.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"dsv3_rt.cli.{module}":
                raise
            continue  # subcommand not built yet
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return distributed.exit_now_if_broken(_run(argv))


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a launcher re-runs the same command on each rank
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Dsv3Error as e:
        if getattr(args, "debug", False):
            raise
        print(f"dsv3-rt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dsv3-rt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
