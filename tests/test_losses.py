"""Regression losses: values and gradients against float64 references.

Each loss is built as its own graph (``loss_gradient_model``), the way the
engines build it: with the loss's closed-form derivative, and differentiated
through the gradient seam instead (the two must agree).  References are closed
forms written here in numpy, checked in turn by central finite differences
of the graph's own loss.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from onnxfit import (
    AbsoluteLoss,
    BaseLoss,
    ElasticLoss,
    EpsilonInsensitiveLoss,
    HuberLoss,
    LearningRateSGD,
    OnnxSGDRegressor,
    SquaredEpsilonInsensitiveLoss,
    SquaredLoss,
)
from onnxfit.losses import REGRESSION_LOSSES, make_loss

from tests.graphs import run_loss

EPS = 0.3  # threshold of huber / epsilon-insensitive losses in these tests
L1_RATIO = 0.3  # of the elastic loss


# element-wise term l(r) and its derivative dl/dr, r = prediction - label
def _squared(r):
    return 0.5 * r**2, r


def _absolute(r):
    return np.abs(r), np.sign(r)


def _huber(r):
    a = np.abs(r)
    value = np.where(a <= EPS, 0.5 * r**2, EPS * a - 0.5 * EPS**2)
    return value, np.where(a <= EPS, r, EPS * np.sign(r))


def _eps_insensitive(r):
    a = np.abs(r)
    return np.maximum(0.0, a - EPS), np.where(a > EPS, np.sign(r), 0.0)


def _squared_eps_insensitive(r):
    a = np.abs(r)
    m = np.maximum(0.0, a - EPS)
    return m**2, 2.0 * m * np.sign(r)


def _elastic(r):
    value = L1_RATIO * np.abs(r) + (1 - L1_RATIO) * 0.5 * r**2
    return value, L1_RATIO * np.sign(r) + (1 - L1_RATIO) * r


CASES = [
    (SquaredLoss(), _squared),
    (AbsoluteLoss(), _absolute),
    (HuberLoss(epsilon=EPS), _huber),
    (EpsilonInsensitiveLoss(epsilon=EPS), _eps_insensitive),
    (SquaredEpsilonInsensitiveLoss(epsilon=EPS), _squared_eps_insensitive),
    (ElasticLoss(l1_ratio=L1_RATIO), _elastic),
]
IDS = [type(loss).__name__ for loss, _ in CASES]

_SESSIONS = {}


def _run(loss, prediction, label, sample_weight, dtype=np.float64, closed_form=True):
    """(loss, d loss / d prediction) from the loss's graph; ``sample_weight``
    holds the weights as users give them (one per sample)."""
    return run_loss(loss, prediction, label, sample_weight, dtype, closed_form, _SESSIONS)


def _data(shape, seed=0):
    """Prediction/label pairs whose residuals avoid every kink (0 and +-EPS)
    by at least 0.05, with residuals on both sides of EPS and both signs."""
    rng = np.random.default_rng(seed)
    n = shape[0]
    label = rng.normal(size=shape)
    magnitude = np.concatenate([
        rng.uniform(0.05, EPS - 0.05, size=int(np.prod(shape)) // 2),
        rng.uniform(EPS + 0.05, 2.0, size=int(np.prod(shape)) - int(np.prod(shape)) // 2),
    ])
    rng.shuffle(magnitude)
    sign = rng.choice([-1.0, 1.0], size=magnitude.shape)
    residual = (sign * magnitude).reshape(shape)
    sample_weight = rng.uniform(0.2, 3.0, size=n)
    return label + residual, label, sample_weight


def _reference(elementwise, prediction, label, sample_weight):
    n = prediction.shape[0]
    r = prediction - label
    value, derivative = elementwise(r)
    per_sample = value.reshape(n, -1).sum(axis=1)
    w = sample_weight.reshape((n,) + (1,) * (r.ndim - 1))
    return np.mean(sample_weight * per_sample), w * derivative / n


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "automatic"])
@pytest.mark.parametrize("shape", [(7,), (7, 1), (7, 3), (5, 2, 2)])
@pytest.mark.parametrize("loss, elementwise", CASES, ids=IDS)
def test_loss_value_and_gradient_match_closed_form(loss, elementwise, shape, closed_form):
    prediction, label, sample_weight = _data(shape)
    value, grad = _run(loss, prediction, label, sample_weight, closed_form=closed_form)
    ref_value, ref_grad = _reference(elementwise, prediction, label, sample_weight)
    assert np.ndim(value) == 0
    assert grad.shape == prediction.shape
    assert grad.dtype == np.float64
    assert_allclose(value, ref_value, rtol=1e-12)
    assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss, elementwise", CASES, ids=IDS)
def test_loss_gradient_matches_central_finite_differences(loss, elementwise):
    # Residuals are at least 0.05 away from every kink, so each loss is smooth
    # within the +-h neighbourhood used here.
    prediction, label, sample_weight = _data((6, 2), seed=1)
    _, grad = _run(loss, prediction, label, sample_weight)
    h = 1e-6
    numeric = np.empty_like(prediction)
    for index in np.ndindex(prediction.shape):
        plus, minus = prediction.copy(), prediction.copy()
        plus[index] += h
        minus[index] -= h
        numeric[index] = (
            _run(loss, plus, label, sample_weight)[0]
            - _run(loss, minus, label, sample_weight)[0]
        ) / (2 * h)
    assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "loss",
    [AbsoluteLoss(), EpsilonInsensitiveLoss(epsilon=EPS), ElasticLoss(l1_ratio=1.0)],
    ids=["absolute", "epsilon_insensitive", "elastic_pure_l1"],
)
def test_absolute_terms_have_the_sign_of_the_residual(loss):
    prediction, label, sample_weight = _data((40, 2), seed=2)
    _, grad = _run(loss, prediction, label, sample_weight)
    r = prediction - label
    if isinstance(loss, EpsilonInsensitiveLoss):
        active = np.abs(r) > EPS
        assert active.any() and not active.all()
    else:
        active = np.ones(r.shape, dtype=bool)
    assert np.all(np.sign(grad[active]) == np.sign(r[active]))
    # magnitude: w_i / n, independent of |r|
    w = np.broadcast_to(sample_weight[:, None], r.shape)
    assert_allclose(np.abs(grad[active]), w[active] / len(r), rtol=1e-12)
    # inside the epsilon tube the gradient is exactly zero
    assert np.all(grad[~active] == 0.0)


@pytest.mark.parametrize("loss, elementwise", CASES, ids=IDS)
@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "automatic"])
def test_float32_piece_matches_float64_reference(loss, elementwise, closed_form):
    prediction, label, sample_weight = _data((8, 3), seed=3)
    p32, y32, w32 = (a.astype(np.float32) for a in (prediction, label, sample_weight))
    value, grad = _run(loss, p32, y32, w32, dtype=np.float32, closed_form=closed_form)
    ref_value, ref_grad = _reference(
        elementwise, p32.astype(np.float64), y32.astype(np.float64), w32.astype(np.float64)
    )
    assert grad.dtype == np.float32
    assert_allclose(value, ref_value, rtol=1e-5)
    assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_zero_sample_weight_removes_a_sample_from_loss_and_gradient():
    prediction, label, sample_weight = _data((6, 2), seed=4)
    sample_weight[[1, 4]] = 0.0
    value, grad = _run(HuberLoss(epsilon=EPS), prediction, label, sample_weight)
    assert np.all(grad[[1, 4]] == 0.0)
    ref_value, _ = _reference(_huber, prediction, label, sample_weight)
    assert_allclose(value, ref_value, rtol=1e-12)


def test_hyperparameters_change_the_piece():
    prediction, label, sample_weight = _data((6, 1), seed=5)
    small, _ = _run(HuberLoss(epsilon=0.1), prediction, label, sample_weight)
    large, _ = _run(HuberLoss(epsilon=1.0), prediction, label, sample_weight)
    assert small < large  # Huber grows with epsilon for a fixed residual


# -- resolution of names ---------------------------------------------------

@pytest.mark.parametrize(
    "name, cls",
    [
        ("squared_error", SquaredLoss),
        ("absolute_error", AbsoluteLoss),
        ("huber", HuberLoss),
        ("epsilon_insensitive", EpsilonInsensitiveLoss),
        ("squared_epsilon_insensitive", SquaredEpsilonInsensitiveLoss),
        ("elastic", ElasticLoss),
    ],
)
def test_make_loss_resolves_names(name, cls):
    loss = make_loss(name, REGRESSION_LOSSES, epsilon=0.7)
    assert type(loss) is cls
    if "epsilon" in loss.get_params():
        assert loss.epsilon == 0.7


def test_make_loss_returns_objects_as_is_and_rejects_unknown_names():
    obj = HuberLoss(epsilon=2.0)
    assert make_loss(obj, REGRESSION_LOSSES, epsilon=0.1) is obj
    with pytest.raises(ValueError, match="Unknown loss 'hinge'"):
        make_loss("hinge", REGRESSION_LOSSES, epsilon=0.1)
    with pytest.raises(TypeError, match="loss must be a string or a BaseLoss"):
        make_loss(3, REGRESSION_LOSSES, epsilon=0.1)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="loss"):
        OnnxSGDRegressor(loss="hinge").fit(rng.normal(size=(10, 2)), rng.normal(size=10))


def test_loss_objects_follow_the_params_protocol():
    loss = HuberLoss()
    assert loss.get_params() == {"epsilon": 0.1}
    assert loss.set_params(epsilon=0.5) is loss and loss.epsilon == 0.5
    assert ElasticLoss().get_params() == {"l1_ratio": 0.5}


# -- a loss written by a user ----------------------------------------------

class PseudoHuberLoss(BaseLoss):
    """``delta^2 (sqrt(1 + (r / delta)^2) - 1)``: smooth everywhere."""

    def __init__(self, delta=1.0):
        self.delta = delta

    def constants(self):
        return {"inv_delta": 1.0 / self.delta, "delta2": self.delta**2}

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    inv = Constant<value = {T} {{{inv_delta}}}>()
    s = Mul(d, inv)
    s2 = Mul(s, s)
    one = Constant<value = {T} {{1.0}}>()
    q = Add(s2, one)
    root = Sqrt(q)
    excess = Sub(root, one)
    delta2 = Constant<value = {T} {{{delta2}}}>()
    elementwise = Mul(excess, delta2)
"""


def _pseudo_huber(r, delta=0.5):
    root = np.sqrt(1 + (r / delta) ** 2)
    return delta**2 * (root - 1), r / root


def test_custom_loss_piece_value_and_gradient():
    loss = PseudoHuberLoss(delta=0.5)
    prediction, label, sample_weight = _data((9, 2), seed=6)
    value, grad = _run(loss, prediction, label, sample_weight)
    ref_value, ref_grad = _reference(_pseudo_huber, prediction, label, sample_weight)
    assert_allclose(value, ref_value, rtol=1e-12)
    assert_allclose(grad, ref_grad, rtol=1e-12)


def test_custom_loss_trains_end_to_end_exactly():
    """Three full-batch steps with a user loss equal the numpy loop."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(30, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.3 + 0.1 * rng.normal(size=30)
    sample_weight = rng.uniform(0.5, 2.0, size=30)
    eta = 0.2
    est = OnnxSGDRegressor(
        loss=PseudoHuberLoss(delta=0.5), penalty=None,
        learning_rate=LearningRateSGD(eta0=eta, schedule="constant"),
        batch_size=1000, shuffle=False, max_iter=3, tol=None,
    ).fit(X, y, sample_weight=sample_weight)

    coef, intercept = np.zeros(4), 0.0
    losses = []
    for _ in range(3):
        r = X @ coef + intercept - y
        value, derivative = _pseudo_huber(r)
        losses.append(np.mean(sample_weight * value))
        g = sample_weight * derivative / len(y)
        coef, intercept = coef - eta * X.T @ g, intercept - eta * g.sum()
    assert est.dtype_ == np.float64
    assert_allclose(est.weights_["coef"].ravel(), coef, rtol=1e-10, atol=1e-12)
    assert_allclose(est.weights_["intercept"], [intercept], rtol=1e-10, atol=1e-12)
    assert_allclose(est.loss_curve_, losses, rtol=1e-10)
    assert est.get_params()["loss"].delta == 0.5
