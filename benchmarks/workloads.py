"""The benchmark workloads: data, models, graphs.

* W1 -- linear regression 100 -> 1 on ``make_regression(100_000, 100,
  n_informative=50, noise=1.0, random_state=0)``, X float32, y standardised.
* W2 -- MLP 100 -> 128 -> 64 -> 1 (ReLU) on the same data.
* W3 -- MLP 50 -> 128 -> 10 (ReLU, softmax cross-entropy) on
  ``make_classification(100_000, 50, n_informative=30, n_classes=10,
  random_state=0)``.
* W4 -- a Conv net on scikit-learn's digits as 8x8 images, input (N, 1, 8,
  8): Conv(1->8, 3, padding 1) -> BatchNorm2d -> ReLU -> MaxPool(2) ->
  Conv(8->16, 3, padding 1) -> ReLU -> AvgPool(2) -> Flatten ->
  Dropout(0.25) -> Linear(64->10), softmax cross-entropy, batch 32.
* W5 -- an LSTM classifier on the digits' rows as sequences, input (N, 8,
  8) batch first: ``nn.LSTM(8, 32, batch_first=True)`` -> last time step ->
  Linear(32->10), softmax cross-entropy, batch 32.

Every contestant that takes initial weights (onnxfit's graph, PyTorch's
modules) starts from the same ones.  W1-W3: drawn here like PyTorch's
``nn.Linear`` default (uniform in +-1/sqrt(fan_in)).  W4, W5: a PyTorch
module built after ``torch.manual_seed(seed)``; onnxfit gets its export
(``torch.onnx.export(..., dynamo=False)``, dynamic batch axis; W4 in
``TrainingMode.TRAINING`` so that Dropout stays in the graph and
BatchNormalization is written with batch statistics), PyTorch an identical
fresh module in ``train()`` mode.  W4 and W5 always use the 1797 digits
(``n_samples`` only caps them), X scaled to [0, 1].
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

    #: Whether building the workload's graph needs torch (W4, W5: an export).
    needs_torch = False
    #: Whether scikit-learn has a peer for it (an MLP; not for W4, W5).
    sklearn_peer = True

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


def digits_data(shape):
    """W4/W5 data: the 1797 digits, X float32 in [0, 1] of shape (n,) + ``shape``,
    y int64 in 0..9."""
    key = ("digits", tuple(shape))
    if key not in _CACHE:
        from sklearn.datasets import load_digits

        digits = load_digits()
        X = (digits.data / 16.0).astype(np.float32).reshape((-1,) + tuple(shape))
        _CACHE[key] = (np.ascontiguousarray(X), digits.target.astype(np.int64))
    return _CACHE[key]


def _torch_modules():
    """key -> the class of the W4/W5 PyTorch module (needs torch)."""
    from torch import nn

    class DigitsCnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
            self.flatten = nn.Flatten()
            self.dropout = nn.Dropout(0.25)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.dropout(self.flatten(self.features(x))))

    class DigitsLstm(nn.Module):
        def __init__(self, hidden=LSTM_HIDDEN):
            super().__init__()
            self.rnn = nn.LSTM(8, hidden, batch_first=True)
            self.fc = nn.Linear(hidden, 10)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    return {"W4": DigitsCnn, "W5": DigitsLstm}


#: Hidden size of W5's LSTM.
LSTM_HIDDEN = 32
#: Name of the exported graphs' dynamic batch axis.
BATCH_AXIS = "batch"


@dataclass
class TorchNetWorkload:
    """W4/W5: a PyTorch module, its ONNX export, and the digits.

    Offers what the contestants read of a :class:`Workload` (``X``, ``y``,
    ``onnx_graph()``, ``learning_rate``, ``batch_size``, ``classes``...),
    plus :meth:`torch_module`, a fresh module with the initial weights.
    """

    key: str
    title: str
    X: np.ndarray
    y: np.ndarray
    learning_rate: float
    #: Multiply-accumulates of one sample's forward pass (for the ceiling).
    macs_per_sample: int
    #: Export in training mode (Dropout kept, BatchNormalization training).
    export_training: bool = False
    batch_size: int = 32
    seed: int = 0
    task: str = "classification"
    needs_torch = True
    sklearn_peer = False

    def __post_init__(self):
        self._onnx = None
        self._counts = None

    def torch_module(self):
        """A fresh module in ``train()`` mode, the same initial weights every call."""
        import torch

        torch.manual_seed(self.seed)
        module = _torch_modules()[self.key]()
        return module.train()

    def onnx_graph(self):
        """The TorchScript export of a fresh :meth:`torch_module` (a new
        ModelProto every call); input ``input``, output ``output``."""
        import io
        import warnings

        import onnx
        import torch

        if self._onnx is None:
            module = self.torch_module()  # exporting in training mode moves its running statistics
            options = ({"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False}
                       if self.export_training else {})
            if not self.export_training:
                module.eval()
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
                torch.onnx.export(
                    module, (torch.from_numpy(self.X[:2]),), buffer, dynamo=False,
                    opset_version=OPSET, input_names=["input"], output_names=["output"],
                    dynamic_axes={"input": {0: BATCH_AXIS}, "output": {0: BATCH_AXIS}},
                    **options)
            self._onnx = buffer.getvalue()
        return onnx.load_from_string(self._onnx)

    def _param_counts(self):
        if self._counts is None:
            params = list(self.torch_module().parameters())
            self._counts = (int(sum(p.numel() for p in params)),
                            int(sum(p.numel() * p.element_size() for p in params)))
        return self._counts

    @property
    def n_samples(self):
        return len(self.X)

    @property
    def n_params(self):
        try:
            return self._param_counts()[0]
        except ImportError:
            return None

    @property
    def model_bytes(self):
        try:
            return self._param_counts()[1]
        except ImportError:
            return None

    @property
    def data_bytes(self):
        return int(self.X.nbytes + self.y.nbytes)

    @property
    def n_classes(self):
        return 10

    @property
    def classes(self):
        return np.arange(10)

    def epoch_flop(self):
        """6 * N * forward MACs: forward (2) + backward (4) FLOP per multiply-accumulate."""
        return 6.0 * self.n_samples * self.macs_per_sample


#: Forward MACs per sample: W4 conv1 8*8*8 outputs x 9, conv2 16*4*4 x 72,
#: fc 64*10; W5 8 steps x 4*H*(8+H), fc H*10.
_W4_MACS = 8 * 64 * 9 + 16 * 16 * 72 + 64 * 10
_W5_MACS = 8 * 4 * LSTM_HIDDEN * (8 + LSTM_HIDDEN) + LSTM_HIDDEN * 10


def make_workload(key, n_samples=100_000, data=None):
    """Build workload ``'W1'`` ... ``'W5'`` with ``n_samples`` rows (W4,
    W5: at most the 1797 digits) or on ``data=(X, y)`` when given."""
    if key in NET_WORKLOADS:
        X, y = data if data is not None else digits_data((1, 8, 8) if key == "W4" else (8, 8))
        X, y = X[:n_samples], y[:n_samples]
        if key == "W4":
            return TorchNetWorkload(
                "W4", "Conv net on digits 1x8x8 (Conv-BN-ReLU-MaxPool-Conv-ReLU-AvgPool-"
                "Dropout-Linear)", X, y, learning_rate=0.01, macs_per_sample=_W4_MACS,
                export_training=True)
        return TorchNetWorkload(
            "W5", f"LSTM(8 -> {LSTM_HIDDEN}) on digits rows 8x8, last step -> Linear(10)", X, y,
            learning_rate=0.1, macs_per_sample=_W5_MACS)
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


#: The MLPs (scikit-learn has peers for them; memory and backends run them).
MLP_WORKLOADS = ("W1", "W2", "W3")
#: PyTorch modules trained through their export (need torch).
NET_WORKLOADS = ("W4", "W5")
WORKLOADS = MLP_WORKLOADS + NET_WORKLOADS
