"""``python -m onnxfit``: the command line of :mod:`onnxfit.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
