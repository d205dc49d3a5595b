"""Command line: ``python -m onnxfit demo`` (or the ``onnxfit`` script)."""

import argparse
import sys


def main(argv=None):
    """Entry point of ``python -m onnxfit`` and the ``onnxfit`` script."""
    parser = argparse.ArgumentParser(
        prog="onnxfit", description="Train ONNX graphs inside scikit-learn."
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser(
        "demo",
        help="convert scikit-learn models fitted on bundled datasets to ONNX, "
        "train them with onnxfit and compare scores",
    )
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main_demo

        main_demo()
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
