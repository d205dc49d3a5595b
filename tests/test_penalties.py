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


# -- penalties by weight name ----------------------------------------------

#: Weights of a small network, in the order of the flat vector.
SHAPES = {"W0": (4, 3), "b0": (3,), "W1": (3, 2), "b1": (2,), "W2": (2, 1)}
#: One entry per kind: a string (the estimator's alpha/l1_ratio), an object
#: with its own strength, None; W2 left out (not penalized).
PER_WEIGHT = {"W0": "l1", "b0": "l2", "W1": ElasticNetPenalty(alpha=0.7, l1_ratio=0.25),
              "b1": None}
#: (alpha, l1_ratio) each weight gets from PER_WEIGHT; None: not penalized.
EXPECTED = {"W0": (ALPHA, 1.0), "b0": (ALPHA, 0.0), "W1": (0.7, 0.25), "b1": None,
            "W2": None}


def _flat_weight(seed=4):
    return _weight(sum(int(np.prod(s)) for s in SHAPES.values()), seed=seed)


def _per_weight_closed_form(flat):
    """Value and flat gradient of the per-weight penalty, weight by weight."""
    value, grads, start = 0.0, [], 0
    for name, shape in SHAPES.items():
        w = flat[start:start + int(np.prod(shape))]
        start += w.size
        if EXPECTED[name] is None:
            grads.append(np.zeros_like(w))
            continue
        v, g = _closed_form(w, *EXPECTED[name])
        value += v
        grads.append(g)
    return value, np.concatenate(grads)


def test_per_weight_penalty_resolves_each_entry():
    problem = _problem(make_penalty(PER_WEIGHT, ALPHA, L1_RATIO), SHAPES)
    # the bias b0 is penalized because it is named; b1 (None) and W2 (left out) are not
    assert problem.penalized == ["W0", "b0", "W1"]
    coefficients = problem.penalty_mask()
    for name, (start, stop) in problem.weight_offsets().items():
        alpha, ratio = EXPECTED[name] or (0.0, 0.0)
        assert_allclose(coefficients["alpha"][start:stop], alpha, rtol=0)
        assert_allclose(coefficients["l1_ratio"][start:stop], ratio, rtol=0)


def test_per_weight_penalty_value_and_gradient_match_closed_form():
    problem = _problem(make_penalty(PER_WEIGHT, ALPHA, L1_RATIO), SHAPES)
    flat = _flat_weight()
    session = _PenaltyRunner(problem.penalty, problem.n_weights,
                             coefficients=problem.penalty_mask())
    value, grad = session.run(["penalty", "weight_grad"], {"weight": flat})
    ref_value, ref_grad = _per_weight_closed_form(flat)
    assert_allclose(value, ref_value, rtol=1e-12)
    assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)
    model, feeds = _piece_feeds(problem.penalty, problem.penalty_mask(), flat)
    check_gradients(model, feeds, wrt=["weight"], rtol=1e-7, max_elements=problem.n_weights)


@pytest.mark.parametrize(
    "penalty, terms",
    [({"W0": "l1", "W1": "l1"}, ["l1_scale"]),
     ({"W0": "l2", "b1": ElasticNetPenalty(alpha=1.0, l1_ratio=0.0)}, ["l2_root"]),
     ({"W0": "l1", "W1": "l2", "W2": None}, ["l1_scale", "l2_root"])],
    ids=["l1", "l2", "union"],
)
def test_per_weight_piece_has_the_terms_some_weight_uses(penalty, terms):
    problem = _problem(make_penalty(penalty, ALPHA, L1_RATIO), SHAPES)
    piece = problem.penalty.piece(np.float64)
    assert [i.name for i in piece.input] == ["weight"] + terms
    assert sorted(problem.penalty.scales(problem.penalty_mask(), np.float64)) == terms


def test_per_weight_penalty_with_nothing_to_penalize():
    for penalty, alpha in [({"W0": None}, ALPHA), ({"W0": "l2", "b0": "l1"}, 0.0), ({}, ALPHA)]:
        problem = _problem(make_penalty(penalty, alpha, L1_RATIO), SHAPES)
        assert problem.penalized == []


def test_per_weight_penalty_errors():
    with pytest.raises(ValueError, match=r"'W9'.*trained weights are \['W0', 'b0'"):
        _problem(make_penalty({"W0": "l1", "W9": "l2"}, ALPHA, L1_RATIO), SHAPES)
    with pytest.raises(ValueError, match=r"'l3' for weight 'W0'.*'l2', 'l1', 'elasticnet', None"):
        make_penalty({"W0": "l3"}, ALPHA, L1_RATIO)
    with pytest.raises(ValueError, match="for weight 'b0'"):
        make_penalty({"W0": "l1", "b0": 0.5}, ALPHA, L1_RATIO)
    with pytest.raises(ValueError, match="for weight 'W0'"):
        make_penalty({"W0": {"W1": "l1"}}, ALPHA, L1_RATIO)
    with pytest.raises(ValueError, match="weight names"):
        make_penalty({0: "l1"}, ALPHA, L1_RATIO)


def test_per_weight_penalty_leaves_the_dict_alone_and_clones():
    entry = ElasticNetPenalty(alpha=0.7, l1_ratio=0.25)
    penalty = {"W0": "l1", "W1": entry, "b1": None}
    before = dict(penalty)
    resolved = make_penalty(penalty, ALPHA, L1_RATIO)
    assert isinstance(resolved, WeightPenalties)
    _problem(resolved, SHAPES).penalty_mask()
    assert penalty == before and penalty["W1"] is entry
    assert entry.get_params() == {"alpha": 0.7, "l1_ratio": 0.25, "include_biases": False}
    assert resolved.penalties is not penalty
    assert make_penalty(resolved, 0.0, 0.0) is resolved
    copy = clone(resolved)
    assert copy.penalties is not resolved.penalties
    assert copy.penalties["W1"].get_params() == entry.get_params()


# -- per-weight penalties in training ---------------------------------------

def _two_branch_graph(a0, b0, intercept):
    """float64 ``X @ A + X @ B + C``: two weights fitting the same coefficients."""
    n_in = a0.shape[0]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "A"], ["XA"]),
            helper.make_node("MatMul", ["X", "B"], ["XB"]),
            helper.make_node("Add", ["XA", "XB"], ["S"]),
            helper.make_node("Add", ["S", "C"], ["Y"]),
        ],
        "two_branch",
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["N", n_in])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["N", 1])],
        [numpy_helper.from_array(a0, "A"), numpy_helper.from_array(b0, "B"),
         numpy_helper.from_array(intercept, "C")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _fit(est, X, y):
    # the estimator's parameter constraints may not list dict yet
    with sklearn.config_context(skip_parameter_validation=True):
        return est.fit(X, y)


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_per_weight_penalty_step_matches_numpy(engine):
    """Two full-batch steps equal the numpy update with each weight's own
    penalty gradient: W by its object, the bias C by the estimator's
    alpha (named, so penalized although of rank 1)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(25, 3))
    y = X @ np.array([0.5, -1.0, 2.0]) + 1.0
    coef0, intercept0, eta = np.array([[0.7], [-0.4], [1.1]]), np.array([-0.3]), 0.1
    penalty = {"W": ElasticNetPenalty(alpha=0.05, l1_ratio=0.6), "B": "l2"}
    est = _fit(OnnxSGDRegressor(
        _linear_graph(coef0, intercept0), engine=engine, penalty=penalty, alpha=0.2,
        learning_rate=LearningRateSGD(eta0=eta, schedule="constant"),
        batch_size=100, shuffle=False, max_iter=2, tol=None,
    ), X, y)
    coef, intercept = coef0.ravel().copy(), intercept0.copy()
    for _ in range(2):
        r = X @ coef + intercept - y
        g_coef = X.T @ r / len(y) + 0.05 * (0.6 * np.sign(coef) + 0.4 * coef)
        g_intercept = np.array([r.mean()]) + 0.2 * intercept
        coef, intercept = coef - eta * g_coef, intercept - eta * g_intercept
        assert np.all(np.abs(coef) > 1e-3)
    assert_allclose(est.weights_["W"].ravel(), coef, rtol=1e-11)
    assert_allclose(est.weights_["B"], intercept, rtol=1e-11)


def test_per_weight_penalty_both_engines_agree_and_shrink_only_what_is_named():
    """A strong L1 on A sends it to 0, B (None) takes the whole fit and the
    bias (left out) is not shrunk; both engines give the same weights."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3))
    y = X @ np.array([1.0, 2.0, -3.0]) + 0.5
    start = _two_branch_graph(np.full((3, 1), 0.5), np.full((3, 1), -0.5), np.zeros(1))
    penalty = {"A": ElasticNetPenalty(alpha=1.0, l1_ratio=1.0), "B": None}
    fits = {
        engine: _fit(OnnxSGDRegressor(
            start, engine=engine, penalty=penalty,
            learning_rate=LearningRateSGD(eta0=0.01, schedule="constant"),
            batch_size=20, shuffle=False, max_iter=200, tol=None,
        ), X, y)
        for engine in ("fused", "forward_backward")
    }
    fused, fb = fits["fused"], fits["forward_backward"]
    for name in ("A", "B", "C"):
        assert_allclose(fb.weights_[name], fused.weights_[name], rtol=1e-9, atol=1e-12)
    # an L1 step of eta * alpha = 0.01 leaves A within one step of 0
    assert np.all(np.abs(fused.weights_["A"]) <= 0.011)
    # (unpenalized, A and B would share the coefficients: both start at +-0.5)
    assert_allclose(fused.weights_["B"].ravel(), [1.0, 2.0, -3.0], atol=0.01)
    assert_allclose(fused.weights_["C"], [0.5], atol=0.01)
    assert fused.get_params()["penalty"] is penalty
    assert list(penalty) == ["A", "B"] and penalty["B"] is None
    assert penalty["A"].get_params() == {"alpha": 1.0, "l1_ratio": 1.0, "include_biases": False}


def test_per_weight_penalty_estimator_errors_and_grid_search():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 3))
    y = X @ np.array([1.0, 2.0, 3.0])
    graph = _linear_graph(np.zeros((3, 1)), np.zeros(1))
    common = {"batch_size": 10, "shuffle": False, "max_iter": 2, "tol": None}
    with pytest.raises(ValueError, match=r"'coef'.*trained weights are \['W', 'B'\]"):
        _fit(OnnxSGDRegressor(graph, penalty={"coef": "l2"}, **common), X, y)
    grid = [{"W": "l1"}, {"W": "l2", "B": ElasticNetPenalty(alpha=0.01)}]
    search = GridSearchCV(OnnxSGDRegressor(graph, **common), {"penalty": grid}, cv=2)
    with sklearn.config_context(skip_parameter_validation=True):
        search.fit(X, y)
    assert search.best_params_["penalty"]["W"] in ("l1", "l2")
    # the grid's dicts are the user's: untouched
    assert grid[0] == {"W": "l1"} and list(grid[1]) == ["W", "B"]
    assert grid[1]["B"].get_params()["alpha"] == 0.01
