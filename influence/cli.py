"""The ``influence`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="Data debugging by hypergradients through recorded Keras training runs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the toolkit on scikit-learn's embedded digits and write a report",
        description="Train a small MLP on embedded digits, compute a one-step hypergradient, "
        "check it with float64 finite differences and write reports/demo/.",
    )
    demo.add_argument("--out", default=os.path.join("reports", "demo"), help="output folder (default: reports/demo)")
    demo.add_argument("--quick", action="store_true", help="smaller run, for tests")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"influence {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
