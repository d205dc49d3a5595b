"""The 'onnxruntime-training' gradient backend (onnxruntime-training-cpu
1.19.2): its builder wrapper, the rewrites of its training-only operators,
and the message a missing training build gives.

Everything but the last test needs the training build; CI runs them in the
lane that installs it instead of plain onnxruntime.
"""

import numpy as np
import onnx
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from onnx import parser

from onnxfit.gradient import ort_training
from onnxfit.sessions import has_training_build, make_session
from tests.graphs import mlp_graph

needs_training_build = pytest.mark.skipif(
    not has_training_build(),
    reason="needs onnxruntime-training-cpu 1.19.2 (installed instead of onnxruntime)",
)

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
    session = make_session(model, dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


@needs_training_build
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
    grad_model = ort_training.build_gradient_model(model, "loss", ["w"])
    assert not any(n.op_type == "FusedMatMul" for n in grad_model.graph.node)
    out = _run(grad_model, {"X": X, "w": w, "t": t}, dtype)
    expected = 2 * X.astype(np.float64).T @ (X.astype(np.float64) @ w - t)
    assert_allclose(out["w_grad"], expected, rtol=1e-5)


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


@needs_training_build
@pytest.mark.parametrize(
    "activation, training_op", [("Relu", "ReluGrad"), ("Tanh", "TanhGrad"), ("Sigmoid", "SigmoidGrad")]
)
def test_rewritten_activation_gradients_are_bit_identical(activation, training_op):
    model, feeds = _mlp_loss_model(activation)
    rng = np.random.default_rng(3)
    feeds["X"] = rng.standard_normal((64, 6)).astype(np.float32)
    feeds["T"] = rng.standard_normal((64, 2)).astype(np.float32)
    names = [n for n in feeds if n.startswith(("W", "B"))]
    original = ort_training.build_gradient_model(model, "loss", names, rewrite=False)
    rewritten = ort_training.build_gradient_model(model, "loss", names, rewrite=True)
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
    """What a user of plain onnxruntime reads when asking for the backend."""
    from onnxfit import OnnxSGDRegressor

    monkeypatch.setattr(ort_training, "has_training_build", lambda: False)
    with pytest.raises(ort_training.TrainingRuntimeError, match=r"pip install 'onnxfit\[ort-training\]'"):
        ort_training.check_available()
    est = OnnxSGDRegressor(gradient_backend="onnxruntime-training")
    with pytest.raises(ImportError, match="has no gradient builder"):
        est.fit(np.ones((4, 2)), np.ones(4))
    assert not hasattr(est, "weights_")


@needs_training_build
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
    model = ort_training.build_gradient_model(parser.parse_model(text), "s", ["W"])
    ort_training.read_output_gradient(model, "Y", "G2")
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
