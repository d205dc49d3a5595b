"""Test configuration shared by every module."""

import os

# pytest-xdist workers share the cores, as joblib's workers do: give each
# onnxruntime session one thread (onnxfit's n_threads=None reads
# OMP_NUM_THREADS), instead of one per core in every worker.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
