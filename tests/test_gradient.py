"""onnxfit.gradient: gradient graphs, the rewrites of training-only
operators, and the detection of a broken onnxruntime install."""

import numpy as np
import onnx
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from onnx import parser

from onnxfit import OnnxFunction, OnnxSGDRegressor, gradient
from tests.graphs import mlp_graph

RANK1_WEIGHT_LOSS = """
<ir_version: 8, opset_import: ["" : 17]>
rank1 ({T}[N, 3] X, {T}[3] w, {T}[N] t) => ({T} loss) {{
    y = MatMul(X, w)
    d = Sub(y, t)
    d2 = Mul(d, d)
    loss = ReduceSum<keepdims = 0>(d2)
}}
"""


def _run(model, feeds, dtype=np.float32):
    session = gradient.make_session(model, dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank1_weight_after_matmul_has_the_right_gradient(dtype):
    # 1.19.2's FusedMatMul(X, dY, transA=1) is wrong for a 1-D dY; the
    # builder emits it for X @ w with w of shape (k,).
    type_name = "float" if dtype == np.float32 else "double"
    model = parser.parse_model(RANK1_WEIGHT_LOSS.format(T=type_name))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 3)).astype(dtype)
    w = rng.standard_normal(3).astype(dtype)
    t = rng.standard_normal(5).astype(dtype)
    grad_model = gradient.build_gradient_model(model, "loss", ["w"])
    assert not any(n.op_type == "FusedMatMul" for n in grad_model.graph.node)
    out = _run(grad_model, {"X": X, "w": w, "t": t}, dtype)
    expected = 2 * X.astype(np.float64).T @ (X.astype(np.float64) @ w - t)
    assert_allclose(out["w_grad"], expected, rtol=1e-5)


def test_rank1_weight_in_the_forward_backward_function():
    model = parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3] X) => (float[N] y) <float[3] w = {1.0, -2.0, 0.5}> {
    y = MatMul(X, w)
}
""")
    function = OnnxFunction(model)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((7, 3)).astype(np.float32)
    dY = rng.standard_normal(7).astype(np.float32)
    function.forward(X, {"w": np.array([1.0, -2.0, 0.5], np.float32)})
    grads = function.backward(dY)
    assert_allclose(grads["w"], X.T @ dY, rtol=1e-5)


def test_regressor_trains_a_rank1_weight_graph_to_the_least_squares_solution():
    model = parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (double[N, 3] X) => (double[N] y) <double[3] w = {0.0, 0.0, 0.0}> {
    y = MatMul(X, w)
}
""")
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 3))
    y = X @ np.array([1.5, -2.0, 0.25])
    est = OnnxSGDRegressor(model, penalty=None, random_state=0, tol=None, max_iter=30).fit(X, y)
    assert_allclose(est.weights_["w"], [1.5, -2.0, 0.25], atol=1e-3)


def _mlp_loss_model(activation):
    # Hidden layers of 32 and 16: their biases get the ones @ dZ rewrite,
    # the output bias (2 values) keeps its ReduceSum.
    model = mlp_graph(6, (32, 16), 2, activation=activation)
    graph = model.graph
    # Turn the weights into inputs and append 0.5 * sum((Y - T)^2).
    weights = [i for i in graph.initializer]
    del graph.initializer[:]
    for w in weights:
        graph.input.append(onnx.helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    graph.input.append(onnx.helper.make_tensor_value_info("T", onnx.TensorProto.FLOAT, ["N", 2]))
    graph.node.extend([
        onnx.helper.make_node("Sub", ["Y", "T"], ["D"]),
        onnx.helper.make_node("Mul", ["D", "D"], ["D2"]),
        onnx.helper.make_node("ReduceSum", ["D2"], ["loss"], keepdims=0),
    ])
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, []))
    feeds = {w.name: onnx.numpy_helper.to_array(w) for w in weights}
    return model, feeds


@pytest.mark.parametrize(
    "activation, training_op", [("Relu", "ReluGrad"), ("Tanh", "TanhGrad"), ("Sigmoid", "SigmoidGrad")]
)
def test_rewritten_activation_gradients_are_bit_identical(activation, training_op):
    model, feeds = _mlp_loss_model(activation)
    rng = np.random.default_rng(3)
    feeds["X"] = rng.standard_normal((64, 6)).astype(np.float32)
    feeds["T"] = rng.standard_normal((64, 2)).astype(np.float32)
    names = [n for n in feeds if n.startswith(("W", "B"))]
    original = gradient.build_gradient_model(model, "loss", names, rewrite=False)
    rewritten = gradient.build_gradient_model(model, "loss", names, rewrite=True)
    assert any(n.op_type == training_op for n in original.graph.node)
    assert not any(n.domain == "com.microsoft" for n in rewritten.graph.node)
    bias_sums = [n for n in rewritten.graph.node if n.op_type == "ReduceSum"
                 and n.output[0] in ("B0_grad", "B1_grad", "B2_grad")]
    assert [n.output[0] for n in bias_sums] == ["B2_grad"]
    expected = _run(original, feeds)
    actual = _run(rewritten, feeds)
    for name in names:
        if name.startswith("W"):
            assert_array_equal(actual[name + "_grad"], expected[name + "_grad"])
        else:  # bias gradients: ones @ dZ instead of ReduceSum, same sum
            # (float32 sums of 64 terms in another order: tolerance relative
            # to the largest component, since single components may cancel)
            scale = np.abs(expected[name + "_grad"]).max()
            assert_allclose(
                actual[name + "_grad"], expected[name + "_grad"], rtol=1e-5, atol=1e-6 * scale
            )


def test_missing_training_build_is_explained(monkeypatch):
    class PlainOnnxruntime:  # what _pybind_state looks like without training
        pass

    monkeypatch.setattr(gradient, "_C", PlainOnnxruntime())
    with pytest.raises(gradient.TrainingRuntimeError, match="pip install onnxruntime-training-cpu==1.19.2"):
        gradient.check_training_runtime()
