"""Penalties: value and gradient against the closed form, which weights are
penalised, name resolution, per-weight penalties, and the penalty inside a
training step."""

import numpy as np
import pytest
import sklearn
from numpy.testing import assert_allclose
from onnx import TensorProto, helper, numpy_helper
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from onnxfit import ElasticNetPenalty, LearningRateSGD, OnnxSGDRegressor
from onnxfit.engines.problem import TrainingProblem
from onnxfit.gradient import build_vjp, gradient_output_name
from onnxfit.onnx_graphs import piece_model
from onnxfit.penalties import WeightPenalties, make_penalty
from onnxfit.sessions import make_session
from tests.finite_differences import check_gradients

ALPHA = 0.3
L1_RATIO = 0.4


def _uniform(penalty, size):
    """Coefficients putting ``penalty`` on every position of a flat vector."""
    return {"alpha": np.full(size, penalty.alpha), "l1_ratio": np.full(size, penalty.l1_ratio)}


def _problem(penalty, shapes, dtype=np.float64):
    """A TrainingProblem with only what the penalty reads (weights, dtype)."""
    return TrainingProblem(
        forward_model=None, inputs=[], output_name="Y", weight_names=list(shapes),
        weight_shapes=dict(shapes), dtype=dtype, label_shape=(), loss=None,
        penalty=penalty, learning_rate=None,
    )


class _PenaltyRunner:
    """The penalty piece on a flat weight vector with its gradient from the
    gradient seam; run on weights of any shape.  ``coefficients``: as
    :meth:`TrainingProblem.penalty_mask` gives them (default: ``penalty``
    on every position)."""

    def __init__(self, penalty, size, dtype=np.float64, coefficients=None):
        model = piece_model(penalty.piece(dtype))
        scales = penalty.scales(coefficients or _uniform(penalty, size), dtype)
        graph = model.graph
        kept = [i for i in graph.input if i.name not in scales]
        del graph.input[:]
        graph.input.extend(kept)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in scales.items())
        gradient = build_vjp(model, {"penalty": 1}, ["weight"])
        self.session = make_session(gradient.model, dtype=dtype)
        self.gradient = gradient_output_name("weight")

    def run(self, names, feeds):
        w = feeds["weight"]
        out = dict(zip(
            ["penalty", "weight_grad"],
            self.session.run(["penalty", self.gradient], {"weight": w.reshape(-1)}),
        ))
        out["weight_grad"] = out["weight_grad"].reshape(w.shape)
        return [out[n] for n in names]


def _penalty_session(penalty, dtype=np.float64, shape=(4, 3)):
    return _PenaltyRunner(penalty, int(np.prod(shape)), dtype)


def _weight(shape, seed=0):
    """Entries at least 0.05 away from 0 (the kink of |w|), both signs."""
    rng = np.random.default_rng(seed)
    magnitude = rng.uniform(0.05, 2.0, size=shape)
    return magnitude * rng.choice([-1.0, 1.0], size=shape)


def _closed_form(w, alpha, l1_ratio):
    value = alpha * (l1_ratio * np.abs(w).sum() + 0.5 * (1 - l1_ratio) * (w**2).sum())
    grad = alpha * (l1_ratio * np.sign(w) + (1 - l1_ratio) * w)
    return value, grad


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 2), (5,)])
@pytest.mark.parametrize(
    "name, l1_ratio", [("l2", 0.0), ("l1", 1.0), ("elasticnet", L1_RATIO)]
)
def test_penalty_value_and_gradient_match_closed_form(name, l1_ratio, shape):
    penalty = make_penalty(name, ALPHA, L1_RATIO)
    assert penalty.alpha == ALPHA and penalty.l1_ratio == l1_ratio
    session = _penalty_session(penalty, shape=shape)
    w = _weight(shape)
    value, grad = session.run(["penalty", "weight_grad"], {"weight": w})
    ref_value, ref_grad = _closed_form(w, ALPHA, l1_ratio)
    assert grad.shape == w.shape and grad.dtype == np.float64
    assert_allclose(value, ref_value, rtol=1e-12)
    assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)


def _piece_feeds(penalty, coefficients, w, dtype=np.float64):
    """The penalty piece as a model, and feeds giving its scales as inputs."""
    model = piece_model(penalty.piece(dtype))
    return model, {"weight": w, **penalty.scales(coefficients, dtype)}


@pytest.mark.parametrize("name", ["l2", "elasticnet"])
def test_penalty_gradient_matches_central_finite_differences(name):
    penalty = make_penalty(name, ALPHA, L1_RATIO)
    w = _weight(6, seed=1)
    model, feeds = _piece_feeds(penalty, _uniform(penalty, 6), w)
    check_gradients(model, feeds, wrt=["weight"], rtol=1e-7)


def test_l1_gradient_has_the_sign_of_the_weight():
    session = _penalty_session(make_penalty("l1", ALPHA, L1_RATIO), shape=(6, 5))
    w = _weight((6, 5), seed=2)
    grad = session.run(["weight_grad"], {"weight": w})[0]
    assert np.all(np.sign(grad) == np.sign(w))
    assert_allclose(np.abs(grad), ALPHA, rtol=1e-12)


def test_float32_penalty_piece():
    penalty = ElasticNetPenalty(alpha=ALPHA, l1_ratio=L1_RATIO)
    session = _penalty_session(penalty, np.float32)
    w = _weight((4, 3), seed=3).astype(np.float32)
    value, grad = session.run(["penalty", "weight_grad"], {"weight": w})
    ref_value, ref_grad = _closed_form(w.astype(np.float64), ALPHA, L1_RATIO)
    assert grad.dtype == np.float32
    assert_allclose(value, ref_value, rtol=1e-5)
    assert_allclose(grad, ref_grad, rtol=1e-5)


def test_applies_to_weight_tensors_only_unless_biases_included():
    penalty = ElasticNetPenalty()
    assert penalty.applies_to((3, 2))
    assert penalty.applies_to((2, 3, 4, 4))
    assert not penalty.applies_to((3,))
    assert not penalty.applies_to(())
    with_biases = ElasticNetPenalty(include_biases=True)
    assert with_biases.applies_to((3,)) and with_biases.applies_to(()) and with_biases.applies_to((3, 2))


def test_make_penalty_resolution():
    assert make_penalty(None, 0.1, 0.5) is None
    assert make_penalty("l2", 0.0, 0.5) is None
    assert make_penalty("elasticnet", 0.0, 0.5) is None
    assert make_penalty(ElasticNetPenalty(alpha=0.0), 0.1, 0.5) is None
    obj = ElasticNetPenalty(alpha=0.2, l1_ratio=0.9, include_biases=True)
    assert make_penalty(obj, 0.1, 0.5) is obj
    resolved = make_penalty("elasticnet", 0.05, 0.7)
    assert (resolved.alpha, resolved.l1_ratio, resolved.include_biases) == (0.05, 0.7, False)
    assert make_penalty("l1", 0.05, 0.7).l1_ratio == 1.0
    assert make_penalty("l2", 0.05, 0.7).l1_ratio == 0.0
    with pytest.raises(ValueError, match="Unknown penalty 'l3'"):
        make_penalty("l3", 0.1, 0.5)


def test_penalty_object_follows_params_protocol():
    penalty = ElasticNetPenalty(alpha=0.2)
    assert penalty.get_params() == {"alpha": 0.2, "l1_ratio": 0.15, "include_biases": False}
    est = OnnxSGDRegressor(penalty=penalty)
    est.set_params(penalty__alpha=0.5)
    assert est.penalty.alpha == 0.5


# -- the penalty inside the fused training step ----------------------------

def _linear_graph(coef, intercept):
    """float64 ``X @ W + B`` with the given initial weights."""
    n_in = coef.shape[0]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["Y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["N", n_in])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["N", 1])],
        [numpy_helper.from_array(coef, "W"), numpy_helper.from_array(intercept, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    "penalty_kwargs",
    [
        {"penalty": "l1", "alpha": 0.05},
        {"penalty": "elasticnet", "alpha": 0.05, "l1_ratio": 0.6},
        {"penalty": ElasticNetPenalty(alpha=0.05, l1_ratio=0.6, include_biases=True)},
    ],
    ids=["l1", "elasticnet", "elasticnet_with_biases"],
)
def test_penalty_gradient_is_scaled_by_the_learning_rate(penalty_kwargs):
    """Two full-batch steps from non-zero weights equal the numpy update
    ``W -= eta * (dLoss/dW + alpha (rho sign(W) + (1 - rho) W))``, the bias
    penalised only when the penalty object says so."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(25, 3))
    y = X @ np.array([0.5, -1.0, 2.0]) + 1.0
    coef0 = np.array([[0.7], [-0.4], [1.1]])
    intercept0 = np.array([-0.3])
    eta = 0.1
    est = OnnxSGDRegressor(
        _linear_graph(coef0, intercept0),
        learning_rate=LearningRateSGD(eta0=eta, schedule="constant"),
        batch_size=100, shuffle=False, max_iter=2, tol=None, **penalty_kwargs,
    ).fit(X, y)

    penalty = make_penalty(
        penalty_kwargs["penalty"], penalty_kwargs.get("alpha", 1e-4),
        penalty_kwargs.get("l1_ratio", 0.15),
    )
    alpha, rho, biases = penalty.alpha, penalty.l1_ratio, penalty.include_biases
    coef, intercept = coef0.ravel().copy(), intercept0.copy()
    # weights stay away from 0 during these two steps: sign() is well defined
    for _ in range(2):
        r = X @ coef + intercept - y
        g_coef = X.T @ r / len(y) + alpha * (rho * np.sign(coef) + (1 - rho) * coef)
        g_intercept = np.array([r.mean()])
        if biases:
            g_intercept += alpha * (rho * np.sign(intercept) + (1 - rho) * intercept)
        coef, intercept = coef - eta * g_coef, intercept - eta * g_intercept
        assert np.all(np.abs(coef) > 1e-3) and np.all(np.abs(intercept) > 1e-3)
    assert_allclose(est.weights_["W"].ravel(), coef, rtol=1e-11)
    assert_allclose(est.weights_["B"], intercept, rtol=1e-11)


def test_penalty_none_and_alpha_zero_train_identically():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 3))
    y = X @ np.array([1.0, 2.0, 3.0])
    common = dict(batch_size=8, shuffle=False, max_iter=3, tol=None)
    a = OnnxSGDRegressor(penalty=None, **common).fit(X, y)
    b = OnnxSGDRegressor(penalty="l2", alpha=0.0, **common).fit(X, y)
    c = OnnxSGDRegressor(penalty="l2", alpha=1.0, **common).fit(X, y)
    assert_allclose(a.weights_["coef"], b.weights_["coef"], rtol=1e-14)
    # a strong penalty shrinks the weights
    assert np.linalg.norm(c.weights_["coef"]) < np.linalg.norm(a.weights_["coef"])
