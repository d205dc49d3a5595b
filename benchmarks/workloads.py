"""The benchmark workloads: data, models, graphs.

* W1 -- linear regression 100 -> 1 on ``make_regression(100_000, 100,
  n_informative=50, noise=1.0, random_state=0)``, X float32, y standardised.
* W2 -- MLP 100 -> 128 -> 64 -> 1 (ReLU) on the same data.
* W3 -- MLP 50 -> 128 -> 10 (ReLU, softmax cross-entropy) on
  ``make_classification(100_000, 50, n_informative=30, n_classes=10,
  random_state=0)``.

Every contestant that takes initial weights (onnxfit's graph, PyTorch's
modules) starts from the same ones, drawn here like PyTorch's ``nn.Linear``
default (uniform in +-1/sqrt(fan_in)).
"""

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper, numpy_helper

#: Opset and IR of the workload graphs: every supported onnxruntime runs them.
OPSET = 17
IR_VERSION = 8

BATCH_SIZE = 256


@dataclass
class Workload:
    """One benchmark problem: data, layer sizes and initial weights."""

    key: str
    title: str
    task: str  # "regression" or "classification"
    sizes: tuple
    X: np.ndarray
    y: np.ndarray
    learning_rate: float
    batch_size: int = BATCH_SIZE
    seed: int = 0
    weights: list = field(init=False)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.weights = []
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            bound = 1.0 / np.sqrt(n_in)
            w = rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32)
            b = rng.uniform(-bound, bound, n_out).astype(np.float32)
            self.weights.append((w, b))

    @property
    def n_samples(self):
        return len(self.X)

    @property
    def n_params(self):
        return int(sum(w.size + b.size for w, b in self.weights))

    @property
    def model_bytes(self):
        return int(sum(w.nbytes + b.nbytes for w, b in self.weights))

    @property
    def data_bytes(self):
        return int(self.X.nbytes + self.y.nbytes)

    @property
    def n_classes(self):
        return int(self.sizes[-1]) if self.task == "classification" else None

    @property
    def classes(self):
        return np.arange(self.n_classes) if self.task == "classification" else None

    def epoch_flop(self):
        """6 * N * params: forward (2) + backward (4) FLOP per sample and weight."""
        return 6.0 * self.n_samples * self.n_params

    def onnx_graph(self):
        """The model as an ONNX graph (MatMul + Add + Relu), input ``X``,
        output ``Y`` (regression: shape (N, 1); classification: logits)."""
        nodes, inits = [], []
        current = "X"
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(self.weights):
            inits.append(numpy_helper.from_array(w, f"W{k}"))
            inits.append(numpy_helper.from_array(b, f"B{k}"))
            nodes.append(helper.make_node("MatMul", [current, f"W{k}"], [f"XW{k}"]))
            out = "Y" if k == last else f"Z{k}"
            nodes.append(helper.make_node("Add", [f"XW{k}", f"B{k}"], [out]))
            if k < last:
                nodes.append(helper.make_node("Relu", [out], [f"H{k}"]))
                current = f"H{k}"
        graph = helper.make_graph(
            nodes,
            f"onnxfit_benchmark_{self.key}",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", self.sizes[0]])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", self.sizes[-1]])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model


_CACHE = {}


def regression_data(n_samples, n_features=100, random_state=0):
    """W1/W2 data: X float32 (C-contiguous), y standardised float64."""
    key = ("regression", n_samples, n_features, random_state)
    if key not in _CACHE:
        from sklearn.datasets import make_regression

        X, y = make_regression(
            n_samples, n_features, n_informative=min(50, n_features), noise=1.0,
            random_state=random_state,
        )
        X = np.ascontiguousarray(X, dtype=np.float32)
        y = (y - y.mean()) / y.std()
        _CACHE[key] = (X, y)
    return _CACHE[key]


def classification_data(n_samples, random_state=0):
    """W3 data: X float32 (C-contiguous), y int64 in 0..9."""
    key = ("classification", n_samples, random_state)
    if key not in _CACHE:
        from sklearn.datasets import make_classification

        X, y = make_classification(
            n_samples, 50, n_informative=30, n_classes=10, random_state=random_state,
        )
        _CACHE[key] = (np.ascontiguousarray(X, dtype=np.float32), y.astype(np.int64))
    return _CACHE[key]


def make_workload(key, n_samples=100_000, data=None):
    """Build workload ``'W1'``, ``'W2'`` or ``'W3'`` with ``n_samples`` rows
    (or on ``data=(X, y)`` when given)."""
    if data is None:
        data = (classification_data(n_samples) if key == "W3"
                else regression_data(n_samples))
    X, y = data
    if key == "W1":
        return Workload("W1", "linear regression 100 -> 1", "regression", (100, 1), X, y,
                        learning_rate=0.01)
    if key == "W2":
        return Workload("W2", "MLP 100 -> 128 -> 64 -> 1, ReLU", "regression",
                        (100, 128, 64, 1), X, y, learning_rate=0.001)
    if key == "W3":
        return Workload("W3", "MLP 50 -> 128 -> 10, softmax cross-entropy",
                        "classification", (50, 128, 10), X, y, learning_rate=0.01)
    raise ValueError(f"Unknown workload {key!r}")


WORKLOADS = ("W1", "W2", "W3")
