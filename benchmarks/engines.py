"""Seconds per epoch of the two training engines, side by side, on W2.

W2 (see benchmarks/workloads.py): an MLP 100 -> 128 -> 64 -> 1 with
ReLU on ``make_regression(100_000, 100, n_informative=50, noise=1.0,
random_state=0)``, X float32, y standardised, batch 256, one thread.

Both engines train the same graph from the same weights with the same
batches.  After a warm-up (graph building and one epoch each), epochs are
timed one engine after the other, ``--reps`` times (interleaved, so that
machine noise hits both alike); the medians and their ratio
forward_backward / fused are printed.  The issue's target is a ratio of at
most 1.5.

Run: ``python -m benchmarks.engines [--reps 5] [--penalty l2|none]``.
"""

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import make_regression

from onnxfit import OnnxSGDRegressor

ENGINES = ("fused", "forward_backward")


def w2_data():
    """The W2 data: X float32, y standardised."""
    X, y = make_regression(100_000, 100, n_informative=50, noise=1.0, random_state=0)
    y = (y - y.mean()) / y.std()
    return X.astype(np.float32), y


def w2_model(seed=0):
    """MLP 100 -> 128 -> 64 -> 1, ReLU, He-initialised (MatMul + Add)."""
    rng = np.random.default_rng(seed)
    sizes = [100, 128, 64, 1]
    nodes, inits, current = [], [], "X"
    for k in range(len(sizes) - 1):
        w = rng.normal(0, np.sqrt(2.0 / sizes[k]), (sizes[k], sizes[k + 1]))
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"W{k}"))
        inits.append(numpy_helper.from_array(np.zeros(sizes[k + 1], np.float32), f"B{k}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{k}"], [f"XW{k}"]))
        out = "Y" if k == len(sizes) - 2 else f"Z{k}"
        nodes.append(helper.make_node("Add", [f"XW{k}", f"B{k}"], [out]))
        if k < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"H{k}"]))
            current = f"H{k}"
    graph = helper.make_graph(
        nodes, "w2_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 100])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def time_engines(X, y, reps=5, penalty="l2"):
    """Median seconds per epoch of each engine (dict), epochs interleaved."""
    model = w2_model()
    estimators = {}
    for engine in ENGINES:
        est = OnnxSGDRegressor(
            model, learning_rate="nesterov", penalty=penalty, batch_size=256,
            max_iter=1, tol=None, random_state=0, n_threads=1, engine=engine,
        )
        est.fit(X, y)  # warm-up: builds the graphs, runs one epoch
        est.partial_fit(X, y)
        estimators[engine] = est
    times = {engine: [] for engine in ENGINES}
    for _ in range(reps):
        for engine, est in estimators.items():
            start = time.perf_counter()
            est.partial_fit(X, y)
            times[engine].append(time.perf_counter() - start)
    return {engine: statistics.median(t) for engine, t in times.items()}, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--penalty", choices=["l2", "none"], default="l2")
    args = parser.parse_args(argv)
    X, y = w2_data()
    penalty = None if args.penalty == "none" else args.penalty
    medians, times = time_engines(X, y, reps=max(3, args.reps), penalty=penalty)
    print(f"W2 MLP 100-128-64-1 ReLU, batch 256, 1 thread, nesterov, penalty={args.penalty}")
    for engine in ENGINES:
        runs = " ".join(f"{t:.3f}" for t in times[engine])
        print(f"  {engine:17s} {medians[engine]:.4f} s/epoch (median; runs: {runs})")
    ratio = medians["forward_backward"] / medians["fused"]
    print(f"  ratio forward_backward / fused: {ratio:.2f} (target <= 1.5)")
    return ratio


if __name__ == "__main__":
    main()
