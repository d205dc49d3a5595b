"""onnxfit's benchmark suite.

Run everything with ``python -m benchmarks.run`` (see ``benchmarks/README.md``);
``python -m benchmarks.run --quick`` is the one-minute smoke run that CI
executes through ``tests/test_benchmarks_quick.py``.
"""
