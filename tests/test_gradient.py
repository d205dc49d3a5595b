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


def test_read_output_gradient_gives_the_vector_jacobian_product():
    """A backward pass started from a given dL/dY equals the closed form
    X^T (g * relu'(XW)), whatever computes that gradient."""
    from onnxfit.onnx_graphs import prune_graph

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    vjp (float[N, 3] X, float[3, 2] W, float[N, 2] G) => (float s) {
        Z = MatMul(X, W)
        Y = Relu(Z)
        P = Mul(Y, G)
        s = ReduceSum<keepdims = 0>(P)
    }
    """
    model = gradient.build_gradient_model(parser.parse_model(text), "s", ["W"])
    gradient.read_output_gradient(model, "Y", "G2")
    graph = model.graph
    # G2 = 3 G, computed after the backward nodes that read it: pruning sorts.
    graph.node.append(onnx.helper.make_node("Mul", ["G", "three"], ["G2"]))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(3.0, np.float32), "three"))
    keep = [o for o in graph.output if o.name == "W_grad"]
    del graph.output[:]
    graph.output.extend(keep)
    prune_graph(graph)
    onnx.checker.check_model(model)
    assert not any(node.op_type == "ReduceSum" for node in graph.node)  # <Y, G> is gone
    rng = np.random.default_rng(0)
    X, W, G = (rng.standard_normal(s).astype(np.float32) for s in ((5, 3), (3, 2), (5, 2)))
    out = _run(model, {"X": X, "W": W, "G": G})
    assert_allclose(out["W_grad"], X.T @ (3 * G * (X @ W > 0)), rtol=1e-5, atol=1e-6)


def test_prune_graph_sorts_and_drops_what_no_output_needs():
    from onnx import helper, numpy_helper

    from onnxfit.onnx_graphs import prune_graph

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "one"], ["c"]),       # reads a, defined below
            helper.make_node("Neg", ["x"], ["a"]),
            helper.make_node("Mul", ["x", "unused_init"], ["dead"]),  # feeds no output
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "one"),
         numpy_helper.from_array(np.ones(2, np.float32), "unused_init")],
    )
    prune_graph(graph)
    assert [n.op_type for n in graph.node] == ["Neg", "Add"]
    assert [i.name for i in graph.initializer] == ["one"]
    assert [i.name for i in graph.input] == ["x"]
    cyclic = helper.make_graph(
        [helper.make_node("Neg", ["b"], ["a"]), helper.make_node("Neg", ["a"], ["b"])],
        "g", [], [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ValueError, match="cycle"):
        prune_graph(cyclic)


def test_fused_graph_never_differentiates_a_loss_with_a_closed_form():
    """The builder differentiates the model only: the loss's gradient is the
    closed form, and a loss without one is differentiated on its own."""
    from onnxfit.engines.fused import build_fused_model
    from tests.test_losses import PseudoHuberLoss

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 4)), rng.standard_normal(20)
    for loss, expected in (("huber", False), (PseudoHuberLoss(), True)):
        est = OnnxSGDRegressor(loss=loss, max_iter=1, tol=None).fit(X, y)
        model = build_fused_model(est._problem())
        loss_grad_nodes = [
            n.name for n in model.graph.node
            if n.name.startswith("onnxfit.loss.") and "_Grad/" in n.name
        ]
        assert bool(loss_grad_nodes) is expected, loss


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_cast_like_turns_typed_constants_into_constants(dtype):
    from onnxfit.onnx_graphs import fold_cast_like

    T = "float" if dtype == np.float32 else "double"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({T}[N, 3] x) => ({T}[N, 3] y, {T}[3] s) {{
        c_f = Constant<value = float {{2.5}}>()
        c = CastLike(c_f, x)
        n = Shape<start = 0, end = 1>(x)
        ones_f = ConstantOfShape<value = float[1] {{1}}>(n)
        ones = CastLike(ones_f, x)
        y = Mul(x, c)
        s = MatMul(ones, x)
    }}
    """
    model = parser.parse_model(text)
    x = np.arange(12, dtype=dtype).reshape(4, 3)
    before = _run(model, {"x": x}, dtype)
    fold_cast_like(model)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == [
        "Constant", "Shape", "ConstantOfShape", "Mul", "MatMul"]
    after = _run(model, {"x": x}, dtype)
    assert_array_equal(after["y"], before["y"])
    assert_array_equal(after["s"], before["s"])
    assert after["y"].dtype == dtype
