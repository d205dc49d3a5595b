"""OnnxFunction: an ONNX graph as a differentiable function.

Gradients are checked against float64 closed forms (linear model,
one-hidden-layer MLP), the forward pass against an InferenceSession on the
original graph; the function then drives a hand-written numpy Adam loop,
pickles, accepts OrtValues and shares its gradient graph through the cache.
"""

import pickle
import warnings

import numpy as np
import onnxruntime
import pytest
from onnx import numpy_helper
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor

from onnxfit import OnnxFunction
from onnxfit.function import ModelGradientCache, model_gradient_cache
from onnxfit.model import linear_model
from tests.graphs import convert, gemm_mlp_graph, mlp_graph

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


def relative_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


def random_weights(function, seed):
    rng = np.random.default_rng(seed)
    return {
        name: (0.3 * rng.standard_normal(shape)).astype(function.dtype)
        for name, shape in function.weight_shapes.items()
    }


def inference(model, X):
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: X})[0]


# -- closed forms ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_gradients_match_closed_form(dtype):
    f = OnnxFunction(linear_model(6, 2, dtype), input_gradient=True)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6)).astype(dtype)
    w = random_weights(f, 1)
    dY = rng.standard_normal((40, 2)).astype(dtype)

    Y = f.forward(X, w)
    grads, dX = f.backward(dY, return_input_gradient=True)

    X64, dY64 = X.astype(np.float64), dY.astype(np.float64)
    W64, b64 = w["coef"].astype(np.float64), w["intercept"].astype(np.float64)
    tol = TOLERANCE[dtype]
    assert Y.dtype == dtype and Y.shape == (40, 2)
    assert relative_error(Y, X64 @ W64 + b64) < tol
    assert set(grads) == {"coef", "intercept"}
    assert grads["coef"].dtype == dtype and grads["coef"].shape == (6, 2)
    assert relative_error(grads["coef"], X64.T @ dY64) < tol
    assert relative_error(grads["intercept"], dY64.sum(axis=0)) < tol
    assert relative_error(dX, dY64 @ W64.T) < tol


def mlp_closed_form(X, w, dY, activation):
    """Forward and backward of ``act(X W0 + B0) W1 + B1`` in float64."""
    X64 = X.astype(np.float64)
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    Z = X64 @ w64["W0"] + w64["B0"]
    if activation == "Relu":
        # The mask comes from a forward pass in the model's own dtype: a
        # pre-activation within rounding of 0 may have the other sign in
        # float64 and flip a whole column of the gradient.
        active = (X @ w["W0"] + w["B0"]) > 0
        H, slope = Z * active, active.astype(np.float64)
    else:
        H = np.tanh(Z)
        slope = 1.0 - H**2
    Y = H @ w64["W1"] + w64["B1"]
    dY64 = dY.astype(np.float64)
    dZ = (dY64 @ w64["W1"].T) * slope
    grads = {"W1": H.T @ dY64, "B1": dY64.sum(0), "W0": X64.T @ dZ, "B0": dZ.sum(0)}
    return Y, grads, dZ @ w64["W0"].T


@pytest.mark.parametrize("activation", ["Relu", "Tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_hidden_layer_mlp_gradients_match_closed_form(dtype, activation):
    f = OnnxFunction(mlp_graph(7, (12,), 3, activation, dtype=dtype), input_gradient=True)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 7)).astype(dtype)
    w = random_weights(f, 4)
    dY = rng.standard_normal((50, 3)).astype(dtype)

    Y = f.forward(X, w)
    grads, dX = f.backward(dY, return_input_gradient=True)

    Y64, grads64, dX64 = mlp_closed_form(X, w, dY, activation)
    tol = TOLERANCE[dtype]
    assert relative_error(Y, Y64) < tol
    for name in ("W0", "B0", "W1", "B1"):
        assert grads[name].shape == w[name].shape
        assert relative_error(grads[name], grads64[name]) < tol, name
    assert relative_error(dX, dX64) < tol


def test_forward_and_backward_graphs_hold_standard_operators_only():
    f = OnnxFunction(mlp_graph(5, (8, 8), 1, "Relu"))
    split = f._runner.split
    for model in (split.forward, split.backward):
        assert {n.domain for n in model.graph.node} <= {""}
    # the forward graph computes the model and nothing else
    assert [n.op_type for n in split.forward.graph.node] == [
        "MatMul", "Add", "Relu", "MatMul", "Add", "Relu", "MatMul", "Add"]


# -- forward against an InferenceSession --------------------------------------------
def converted_mlp_regressor():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 5))
    y = X @ rng.standard_normal(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPRegressor(hidden_layer_sizes=(9,), max_iter=20, random_state=0).fit(X, y)
    return convert(mlp, X)


@pytest.mark.parametrize(
    "make_model",
    [
        converted_mlp_regressor,
        lambda: gemm_mlp_graph(5, (9, 4), 2, activation="Tanh"),
        lambda: mlp_graph(5, (9,), 1, "Sigmoid"),
    ],
    ids=["skl2onnx_mlp", "gemm_mlp", "sigmoid_mlp"],
)
def test_forward_matches_inference_session_on_original_graph(make_model):
    model = make_model()
    f = OnnxFunction(model)
    X = np.random.default_rng(5).standard_normal((33, 5)).astype(np.float32)
    expected = inference(model, X)
    Y = f.forward(X, f.initial_weights(), keep_for_backward=False)
    assert Y.shape == expected.shape
    assert relative_error(Y, expected) < 1e-6


def test_forward_with_other_weights_matches_inference_session():
    model = gemm_mlp_graph(4, (6,), 1)
    f = OnnxFunction(model)
    w = random_weights(f, 8)
    X = np.random.default_rng(9).standard_normal((20, 4)).astype(np.float32)
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(w[init.name], init.name))
    expected = inference(model, X)
    assert relative_error(f.forward(X, w), expected) < 1e-6


def test_frozen_weights_keep_their_graph_values():
    model = mlp_graph(4, (6,), 1, seed=2)
    f = OnnxFunction(model, weights_to_train=["W1", "B1"])
    assert f.weight_names == ["W1", "B1"]
    X = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    w = f.initial_weights()
    assert relative_error(f.forward(X, w), inference(model, X)) < 1e-6
    grads = f.backward(np.ones((10, 1), np.float32))
    assert set(grads) == {"W1", "B1"}
    np.testing.assert_allclose(grads["B1"], [10.0])


# -- the freedom this design exists for ------------------------------------------------
def test_hand_written_numpy_adam_loop_lowers_the_loss():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 6)).astype(np.float32)
    target = (np.sin(X[:, :1]) + 0.5 * X[:, 1:2] * X[:, 2:3]).astype(np.float32)
    f = OnnxFunction(mlp_graph(6, (32,), 1, "Tanh", seed=1))
    w = f.initial_weights()
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(a) for k, a in w.items()}
    beta1, beta2, lr, eps = 0.9, 0.999, 0.01, 1e-8

    def loss_of(weights):
        Y = f.forward(X, weights, keep_for_backward=False)
        return float(0.5 * np.mean((Y - target) ** 2))

    initial = loss_of(w)
    for t in range(1, 301):
        batch = rng.choice(len(X), 64, replace=False)
        Y = f.forward(X[batch], w)
        grads = f.backward((Y - target[batch]) / len(batch))
        new_w = {}
        for k in w:
            m[k] = beta1 * m[k] + (1 - beta1) * grads[k]
            v[k] = beta2 * v[k] + (1 - beta2) * grads[k] ** 2
            m_hat, v_hat = m[k] / (1 - beta1**t), v[k] / (1 - beta2**t)
            new_w[k] = (w[k] - lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
        w = new_w
    final = loss_of(w)
    assert final < 0.1 * initial, (initial, final)


# -- OrtValues ---------------------------------------------------------------------
def test_ortvalues_in_ortvalues_out():
    f = OnnxFunction(mlp_graph(4, (5,), 2), input_gradient=True)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((9, 4)).astype(np.float32)
    dY = rng.standard_normal((9, 2)).astype(np.float32)
    w = random_weights(f, 2)
    Y_np = f.forward(X, w)
    grads_np, dX_np = f.backward(dY, return_input_gradient=True)

    as_ort = onnxruntime.OrtValue.ortvalue_from_numpy
    weights = [as_ort(w[name]) for name in f.weight_names]
    Y = f.forward(as_ort(X), weights)
    assert isinstance(Y, onnxruntime.OrtValue) and Y.shape() == [9, 2]
    grads, dX = f.backward(as_ort(dY), return_input_gradient=True)
    assert isinstance(grads, list) and len(grads) == len(f.weight_names)
    assert all(isinstance(g, onnxruntime.OrtValue) for g in grads + [dX])
    np.testing.assert_array_equal(Y.numpy(), Y_np)
    for name, grad in zip(f.weight_names, grads):
        np.testing.assert_array_equal(grad.numpy(), grads_np[name])
    np.testing.assert_array_equal(dX.numpy(), dX_np)
    # An OrtValue output feeds the next call directly.
    f2 = OnnxFunction(mlp_graph(2, (3,), 1, seed=4))
    Z = f2.forward(Y, f2.initial_weights())
    assert isinstance(Z, onnxruntime.OrtValue) and Z.shape() == [9, 1]


def test_outputs_stay_valid_across_later_calls():
    # Fails with onnxruntime's default enable_mem_pattern=True: the forward
    # output's buffer is reused by its own backward pass and later steps.
    f = OnnxFunction(mlp_graph(10, (16, 8), 1))
    rng = np.random.default_rng(0)
    w = f.initial_weights()
    kept = []
    for step in range(5):
        X = rng.standard_normal((32 if step % 2 else 64, 10)).astype(np.float32)
        Y = f.forward(X, w)
        Y_copy = Y.copy()
        grads = f.backward(np.ones_like(Y))
        kept.append((Y, Y_copy))
        kept += [(g, g.copy()) for g in grads.values()]
    for array, copy in kept:
        np.testing.assert_array_equal(array, copy)


def test_several_forward_passes_in_flight():
    f = OnnxFunction(mlp_graph(3, (4,), 1, "Tanh"))
    rng = np.random.default_rng(2)
    X1 = rng.standard_normal((5, 3)).astype(np.float32)
    X2 = rng.standard_normal((7, 3)).astype(np.float32)
    w1, w2 = random_weights(f, 1), random_weights(f, 2)
    Y1, c1 = f.forward(X1, w1, return_context=True)
    Y2, c2 = f.forward(X2, w2, return_context=True)
    g2 = f.backward(np.ones_like(Y2), context=c2)
    g1 = f.backward(np.ones_like(Y1), context=c1)
    for X, w, g in ((X1, w1, g1), (X2, w2, g2)):
        _, expected, _ = mlp_closed_form(X, w, np.ones((len(X), 1)), "Tanh")
        for name in expected:
            assert relative_error(g[name], expected[name]) < 1e-5
    assert c1.consumed and c2.consumed
    with pytest.raises(RuntimeError, match="already ran"):
        f.backward(np.ones_like(Y1), context=c1)


def test_invalid_calls_are_reported():
    f = OnnxFunction(linear_model(3, 1, np.float32))
    X = np.zeros((4, 3), np.float32)
    w = f.initial_weights()
    with pytest.raises(RuntimeError, match="forward pass first"):
        f.backward(np.ones((4, 1), np.float32))
    with pytest.raises(ValueError, match="float32"):
        f.forward(X.astype(np.float64), w)
    with pytest.raises(ValueError, match="shape"):
        f.forward(np.zeros((4, 5), np.float32), w)
    with pytest.raises(ValueError, match="shape"):
        f.forward(X, {"coef": np.zeros((2, 1), np.float32), "intercept": w["intercept"]})
    with pytest.raises(ValueError, match="lacks"):
        f.forward(X, {"coef": w["coef"]})
    f.forward(X, w)
    # onnxruntime itself would accept (4,) for an output of shape (4, 1)
    with pytest.raises(ValueError, match="shape"):
        f.backward(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="input_gradient=True"):
        f.backward(np.ones((4, 1), np.float32), return_input_gradient=True)
    f.backward(np.ones((4, 1), np.float32))
    with pytest.raises(RuntimeError, match="forward pass first"):
        f.backward(np.ones((4, 1), np.float32))


# -- pickling and the cache --------------------------------------------------------------
def test_pickle_round_trip_rebuilds_the_graphs():
    f = OnnxFunction(gemm_mlp_graph(4, (6,), 2), input_gradient=True)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 4)).astype(np.float32)
    dY = rng.standard_normal((8, 2)).astype(np.float32)
    w = random_weights(f, 3)
    f.forward(X, w)  # a pending forward pass is not pickled
    data = pickle.dumps(f)
    builds = model_gradient_cache.builds
    model_gradient_cache.clear()
    g = pickle.loads(data)
    assert model_gradient_cache.builds == builds + 1  # rebuilt from the graph
    assert g.weight_names == f.weight_names and g.input_gradient
    with pytest.raises(RuntimeError, match="forward pass first"):
        g.backward(dY)
    Y_f, Y_g = f.forward(X, w), g.forward(X, w)
    np.testing.assert_array_equal(Y_f, Y_g)
    (grads_f, dX_f), (grads_g, dX_g) = (
        f.backward(dY, return_input_gradient=True),
        g.backward(dY, return_input_gradient=True),
    )
    for name in f.weight_names:
        np.testing.assert_array_equal(grads_f[name], grads_g[name])
    np.testing.assert_array_equal(dX_f, dX_g)


def test_functions_on_one_graph_share_its_gradient():
    model = mlp_graph(3, (5,), 1, seed=11)
    builds = model_gradient_cache.builds
    f = OnnxFunction(model)
    g = OnnxFunction(model.SerializeToString())
    assert model_gradient_cache.builds == builds + 1
    assert f._runner is g._runner
    OnnxFunction(model, weights_to_train=["W0"])  # other weights: another gradient
    OnnxFunction(model, input_gradient=True)  # with dX: another gradient
    assert model_gradient_cache.builds == builds + 3


def test_cache_is_bounded_and_drops_the_least_recently_used():
    cache = ModelGradientCache(maxsize=2)
    models = [mlp_graph(3, (4,), 1, seed=s) for s in range(3)]
    a = cache.get(models[0], ["W0", "B0", "W1", "B1"])
    cache.get(models[1], ["W0", "B0", "W1", "B1"])
    assert cache.get(models[0], ["W0", "B0", "W1", "B1"]) is a  # hit, now most recent
    cache.get(models[2], ["W0", "B0", "W1", "B1"])  # drops models[1]
    assert len(cache) == 2 and (cache.builds, cache.hits) == (3, 1)
    assert cache.get(models[0], ["W0", "B0", "W1", "B1"]) is a
    cache.get(models[1], ["W0", "B0", "W1", "B1"])
    assert cache.builds == 4
