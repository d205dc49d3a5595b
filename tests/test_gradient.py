"""The gradient seam (onnxfit.gradient): building vector-Jacobian graphs,
refusing what cannot be differentiated, the forward/backward split and its
runner.  Each operator's rule is checked against finite differences in
tests/test_rules.py; whole graphs in tests/test_zoo.py."""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from onnx import TensorProto, helper, numpy_helper, parser

from onnxfit import OnnxFunction, OnnxSGDRegressor
from onnxfit.gradient import (
    ForwardBackwardRunner,
    GradientError,
    build_vjp,
    differentiable_ops,
    gradient_output_name,
    split_gradient_graph,
)
from onnxfit.sessions import make_session
from tests.graphs import mlp_graph


def _run(model, feeds, dtype=np.float32):
    session = make_session(model, dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


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
    est = OnnxSGDRegressor(model, learning_rate="sgd", penalty=None, random_state=0, tol=None,
                           max_iter=30).fit(X, y)
    assert_allclose(est.weights_["w"], [1.5, -2.0, 0.25], atol=1e-3)


def test_fused_graph_never_differentiates_a_loss_with_a_closed_form():
    """The builder differentiates the model only: the loss's gradient is the
    closed form, and a loss without one is differentiated on its own."""
    from onnxfit.engines.fused import build_fused_model
    from tests.test_losses import PseudoHuberLoss

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 4)), rng.standard_normal(20)
    for loss, expected in (("huber", False), (PseudoHuberLoss(), True)):
        est = OnnxSGDRegressor(loss=loss, max_iter=1, tol=None).fit(X, y)
        model = build_fused_model(est._build_problem())
        loss_grad_nodes = [
            n.name for n in model.graph.node if n.name.startswith("onnxfit.loss.onnxfit.vjp.")
        ]
        assert bool(loss_grad_nodes) is expected, loss


# -- arguments and refusals ---------------------------------------------------------------
def _linear_model():
    return _model(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 2]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
    )


def test_build_vjp_checks_its_arguments():
    model = _linear_model()
    with pytest.raises(ValueError, match="at least one seeded value"):
        build_vjp(model, {}, ["W"])
    with pytest.raises(ValueError, match="distinct names"):
        build_vjp(model, {"Y": "dY"}, ["W", "W"])
    with pytest.raises(ValueError, match=r"\['Z'\] are not values of the graph"):
        build_vjp(model, {"Z": "dZ"}, ["W"])
    with pytest.raises(ValueError, match=r"graph inputs or initializers; \['XW'\] are computed"):
        build_vjp(model, {"Y": "dY"}, ["XW"])
    with pytest.raises(ValueError, match=r"\['Z'\] are not values of the graph"):
        build_vjp(model, {"Y": "dY"}, ["Z"])
    with pytest.raises(ValueError, match="must be an input name or 1"):
        build_vjp(model, {"Y": 2.0}, ["W"])
    with pytest.raises(ValueError, match="Unknown gradient backend 'autograd'"):
        build_vjp(model, {"Y": "dY"}, ["W"], backend="autograd")


def test_gradient_outputs_are_named_and_the_model_is_untouched():
    model = _linear_model()
    before = model.SerializeToString()
    result = build_vjp(model, {"Y": "dY"}, ["W", "B", "X"])
    assert model.SerializeToString() == before
    assert result.gradient_names == {n: gradient_output_name(n) for n in ("W", "B", "X")}
    assert result.cotangent_names == {"Y": "dY"}
    assert [o.name for o in result.model.graph.output] == ["Y"] + list(
        result.gradient_names.values())
    rng = np.random.default_rng(0)
    X, W, B, dY = (rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (3, 2), (2,), (4, 2)))
    out = _run(result.model, {"X": X, "W": W, "B": B, "dY": dY})
    assert_allclose(out[gradient_output_name("W")], X.T @ dY, rtol=1e-5)
    assert_allclose(out[gradient_output_name("B")], dY.sum(axis=0), rtol=1e-5)
    assert_allclose(out[gradient_output_name("X")], dY @ W.T, rtol=1e-5)


def test_an_operator_without_rule_on_the_path_is_refused_with_its_node_and_weights():
    # Det has no rule; W reaches the output through it, B does not.
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["S"]),
         helper.make_node("Det", ["S"], ["D"], name="the_det"),
         helper.make_node("Add", ["D", "B"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 2]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [2, 2]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [])],
    )
    with pytest.raises(GradientError) as error:
        build_vjp(model, {"Y": "dY"}, ["W", "B"])
    message = str(error.value)
    assert "Det (node 'the_det')" in message and "['W']" in message
    assert "weights_to_train" in message and "output_name" in message
    assert "Det" not in differentiable_ops() and "Conv" in differentiable_ops()
    # The weight behind it frozen, the rest differentiates.
    result = build_vjp(model, {"Y": "dY"}, ["B"])
    out = _run(result.model, {"X": np.eye(2, dtype=np.float32), "W": np.eye(2, dtype=np.float32),
                              "B": np.array(1, np.float32), "dY": np.array(3, np.float32)})
    assert out[gradient_output_name("B")] == 3


def test_an_operator_of_another_domain_on_the_path_is_refused():
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["S"]),
         helper.make_node("FusedGelu", ["S"], ["Y"], domain="com.microsoft", name="gelu")],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(GradientError, match=r"FusedGelu \(node 'gelu'\) in domain 'com.microsoft'"):
        build_vjp(model, {"Y": "dY"}, ["W"])


def test_weights_that_only_reach_the_loss_through_zero_derivatives_are_refused():
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["S"]),
         helper.make_node("ArgMax", ["S"], ["I"], axis=1, name="pick"),
         helper.make_node("Cast", ["I"], ["F"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["F", "B"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
    )
    with pytest.raises(GradientError, match=r"\['W'\] reach the loss only through .*ArgMax \(node 'pick'\)"):
        build_vjp(model, {"Y": "dY"}, ["W", "B"])
    build_vjp(model, {"Y": "dY"}, ["B"])  # B reaches it through Add


def test_a_symbolic_dimension_that_may_broadcast_is_reduced_at_run_time():
    """A[a, 4] + B[b, 4]: whether a or b is 1 is known only at run time."""
    model = _model(
        [helper.make_node("Add", ["A", "B"], ["Y"])],
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["a", 4]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["c", 4])],
    )
    result = build_vjp(model, {"Y": "dY"}, ["A", "B"])
    grad_a, grad_b = gradient_output_name("A"), gradient_output_name("B")
    rng = np.random.default_rng(0)
    for rows_a, rows_b in ((3, 1), (1, 3), (3, 3)):
        A = rng.standard_normal((rows_a, 4)).astype(np.float32)
        B = rng.standard_normal((rows_b, 4)).astype(np.float32)
        dY = rng.standard_normal((max(rows_a, rows_b), 4)).astype(np.float32)
        out = _run(result.model, {"A": A, "B": B, "dY": dY})
        expected_a = dY if rows_a == dY.shape[0] else dY.sum(axis=0, keepdims=True)
        expected_b = dY if rows_b == dY.shape[0] else dY.sum(axis=0, keepdims=True)
        assert_allclose(out[grad_a], expected_a, rtol=1e-6)
        assert_allclose(out[grad_b], expected_b, rtol=1e-6)


def test_scalar_seeds_add_their_gradient():
    """Seeding a penalty by 1 next to the output: the two gradients add."""
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]),
         helper.make_node("ReduceSumSquare", ["W"], ["P"], keepdims=0)],
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["N", 3]),
         helper.make_tensor_value_info("W", TensorProto.DOUBLE, [3, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["N", 2]),
         helper.make_tensor_value_info("P", TensorProto.DOUBLE, [])],
    )
    result = build_vjp(model, {"Y": "dY", "P": 1}, ["W"])
    rng = np.random.default_rng(1)
    X, W, dY = rng.standard_normal((5, 3)), rng.standard_normal((3, 2)), rng.standard_normal((5, 2))
    out = _run(result.model, {"X": X, "W": W, "dY": dY}, np.float64)
    assert_allclose(out[gradient_output_name("W")], X.T @ dY + 2 * W, rtol=1e-12)


# -- the forward/backward split -------------------------------------------------------------
def test_split_keeps_the_forward_pass_lean_and_matches_the_whole_graph():
    model = mlp_graph(4, (6,), 2, "Tanh")
    graph = model.graph
    weights = [i.name for i in graph.initializer]
    for init in list(graph.initializer):
        graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    del graph.initializer[:]
    whole = build_vjp(model, {"Y": "dY"}, weights)
    split = split_gradient_graph(whole)
    assert [n.op_type for n in split.forward.graph.node] == ["MatMul", "Add", "Tanh", "MatMul", "Add"]
    assert split.output_names == ["Y"] and "H0" in split.saved_names
    assert split.input_names == ["X"] + weights
    runner = ForwardBackwardRunner(split)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((5, 4)).astype(np.float32)
    dY = rng.standard_normal((5, 2)).astype(np.float32)
    inputs = {"X": X, **values}
    forward = runner.forward(inputs)
    gradients = runner.backward(inputs, forward, {"Y": dY})
    expected = _run(whole.model, {**inputs, "dY": dY})
    assert_allclose(forward["Y"].numpy(), expected["Y"], rtol=1e-6)
    for name in weights:
        assert_allclose(gradients[name].numpy(), expected[gradient_output_name(name)], rtol=1e-6)
    with pytest.raises(ValueError, match="seeded on the model's outputs"):
        split_gradient_graph(build_vjp(model, {"H0": "dH"}, weights))


def test_graphs_older_than_opset_16_are_converted_by_the_callers_not_guessed():
    """build_vjp refuses opset 11 (ReduceSum's axes were an attribute, the
    rules write opset-16 operators); OnnxFunction converts such a graph
    first and differentiates it."""
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]),
         helper.make_node("ReduceSum", ["XW"], ["Y"], axes=[1], keepdims=1)],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "W")],
        opset=11,
    )
    with pytest.raises(GradientError, match="opset 16 or newer; this one is at opset 11"):
        build_vjp(model, {"Y": "dY"}, ["W"])
    f = OnnxFunction(model)
    X = np.array([[1.0, 2.0, 3.0]], np.float32)
    f.forward(X, f.initial_weights())
    grads = f.backward(np.array([[2.0]], np.float32))
    assert_allclose(grads["W"], 2 * np.repeat(X.T, 2, axis=1))


def test_default_threads_follow_omp_num_threads(monkeypatch):
    """n_threads=None is onnxruntime's default (one per core) unless
    OMP_NUM_THREADS says otherwise, as joblib's workers do."""
    from onnxfit.sessions import default_threads, session_options

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() is None
    assert session_options(None).intra_op_num_threads == 0  # onnxruntime chooses
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1 and session_options(None).intra_op_num_threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert default_threads() is None
    assert session_options(3).intra_op_num_threads == 3



def test_a_weight_read_inside_a_subgraph_is_refused_not_given_zero():
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["X", "W"], ["T"])], "then", [],
        [helper.make_tensor_value_info("T", TensorProto.FLOAT, [3])])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["E"])], "else", [],
        [helper.make_tensor_value_info("E", TensorProto.FLOAT, [3])])
    model = _model(
        [helper.make_node("If", ["C"], ["Y"], then_branch=then_branch, else_branch=else_branch,
                          name="branch")],
        [helper.make_tensor_value_info("C", TensorProto.BOOL, []),
         helper.make_tensor_value_info("X", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(GradientError, match=r"no gradient rule for If \(node 'branch'\).*\['W'\]"):
        build_vjp(model, {"Y": "dY"}, ["W"])


def test_castlike_type_source_and_unused_split_outputs():
    """CastLike(c, Z) takes only a type from Z: the weight gets its gradient
    through the other path; a Split output nobody reads gets zeros."""
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Z"]),
         helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
             np.array(2.0, np.float64))),
         helper.make_node("CastLike", ["c", "Z"], ["c_like"]),
         helper.make_node("Mul", ["Z", "c_like"], ["Z2"]),
         helper.make_node("Split", ["Z2"], ["S0", "S1"], axis=1, num_outputs=2),
         helper.make_node("Identity", ["S1"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        opset=18,
    )
    result = build_vjp(model, {"Y": "dY"}, ["W"])
    rng = np.random.default_rng(4)
    X, W = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    dY = rng.standard_normal((5, 2)).astype(np.float32)
    out = _run(result.model, {"X": X, "W": W, "dY": dY})
    expected = np.concatenate([np.zeros((3, 2)), 2 * X.T @ dY], axis=1)
    assert_allclose(out[gradient_output_name("W")], expected, rtol=1e-5, atol=1e-6)
    # A weight reaching the output only through CastLike's type is frozen.
    frozen = _model(
        [helper.make_node("CastLike", ["X", "W"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(GradientError, match="derivative is zero .*CastLike"):
        build_vjp(frozen, {"Y": "dY"}, ["W"])


def test_operands_of_one_inferred_shape_need_no_broadcast_check():
    """After Reshape(-1), shape inference names the dimension itself: both
    operands of Mul(f, f) have that shape, so no run-time reduction."""
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Z"]),
         helper.make_node("Reshape", ["Z", "shape"], ["F"]),
         helper.make_node("Mul", ["F", "F"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")],
    )
    result = build_vjp(model, {"Y": "dY"}, ["W"])
    assert not {"Compress", "ReduceSum"} & {n.op_type for n in result.model.graph.node}
