"""ONNX graphs the tests train: hand-written ones, PyTorch-style ones and
skl2onnx conversions.  Test code only: the package builds its own graphs in
onnxfit/onnx_graphs.py and onnxfit/model.py."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxfit.onnx_graphs import CONVERTER_OPSETS as TARGET_OPSET


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "test_graph", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def mlp_graph(n_in, hidden, n_out, activation="Relu", dtype=np.float32, seed=0):
    """MatMul + Add MLP (the skl2onnx style), He-initialised.

    Initializers: ``W0, B0, W1, B1, ...``; input ``X``, output ``Y``.
    """
    rng = np.random.default_rng(seed)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    sizes = [n_in, *hidden, n_out]
    nodes, inits = [], []
    current = "X"
    for k in range(len(sizes) - 1):
        w = rng.normal(0, np.sqrt(2.0 / sizes[k]), (sizes[k], sizes[k + 1])).astype(dtype)
        b = (0.01 * rng.normal(size=sizes[k + 1])).astype(dtype)
        inits += [numpy_helper.from_array(w, f"W{k}"), numpy_helper.from_array(b, f"B{k}")]
        nodes.append(helper.make_node("MatMul", [current, f"W{k}"], [f"XW{k}"]))
        out = "Y" if k == len(sizes) - 2 else f"Z{k}"
        nodes.append(helper.make_node("Add", [f"XW{k}", f"B{k}"], [out]))
        if k < len(sizes) - 2:
            nodes.append(helper.make_node(activation, [out], [f"H{k}"]))
            current = f"H{k}"
    return _model(
        nodes,
        [helper.make_tensor_value_info("X", elem, ["N", n_in])],
        [helper.make_tensor_value_info("Y", elem, ["N", n_out])],
        inits,
    )


def gemm_mlp_graph(n_in, hidden, n_out, activation="Relu", seed=0):
    """PyTorch-export style: Gemm(transB=1), names ``0.weight``, ``0.bias``."""
    rng = np.random.default_rng(seed)
    sizes = [n_in, *hidden, n_out]
    nodes, inits = [], []
    current = "input"
    for k in range(len(sizes) - 1):
        bound = 1.0 / np.sqrt(sizes[k])
        w = rng.uniform(-bound, bound, (sizes[k + 1], sizes[k])).astype(np.float32)
        b = rng.uniform(-bound, bound, sizes[k + 1]).astype(np.float32)
        layer = 2 * k
        inits += [
            numpy_helper.from_array(w, f"{layer}.weight"),
            numpy_helper.from_array(b, f"{layer}.bias"),
        ]
        out = "output" if k == len(sizes) - 2 else f"/{layer}/Gemm_output_0"
        nodes.append(helper.make_node(
            "Gemm", [current, f"{layer}.weight", f"{layer}.bias"], [out],
            alpha=1.0, beta=1.0, transB=1,
        ))
        if k < len(sizes) - 2:
            act = f"/{layer + 1}/{activation}_output_0"
            nodes.append(helper.make_node(activation, [out], [act]))
            current = act
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )


def convert(estimator, X, **options):
    """skl2onnx conversion at the opsets onnxfit asks converters for."""
    from skl2onnx import to_onnx

    return to_onnx(
        estimator, X[:1].astype(np.float32), target_opset=TARGET_OPSET, **options
    )


def run_loss(loss, prediction, label, sample_weight, dtype=np.float64, closed_form=True,
             cache=None, opset=17):
    """Run a loss graph the way the engines build it.

    ``sample_weight`` holds one weight per sample, as users give them; the
    graph takes them divided by the number of samples, as a column that
    broadcasts against the prediction.  Returns ``(loss, dloss/dprediction)``.
    """
    from onnxfit.sessions import make_session
    from onnxfit.losses import loss_gradient_model

    prediction = np.asarray(prediction)
    key = (type(loss).__name__, repr(loss.get_params()), np.dtype(dtype).name,
           prediction.shape[1:], closed_form, opset)
    cache = {} if cache is None else cache
    if key not in cache:
        model = loss_gradient_model(loss, dtype, prediction.shape[1:], closed_form, opset)
        cache[key] = make_session(model, dtype=dtype)
    n = len(prediction)
    column = (np.asarray(sample_weight, dtype=np.float64) / n).reshape(
        (n,) + (1,) * (prediction.ndim - 1))
    return cache[key].run(
        ["loss", "prediction_grad"],
        {"prediction": prediction.astype(dtype), "label": np.asarray(label).astype(dtype),
         "sample_weight": column.astype(dtype)},
    )
