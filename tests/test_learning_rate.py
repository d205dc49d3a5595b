"""Learning-rate objects: schedules, stopping, update rules (compared with
scikit-learn's own SGDOptimizer), statelessness, the params protocol and a
user-written update rule."""

import joblib
import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.neural_network._stochastic_optimizers import SGDOptimizer

from onnxfit import (
    BaseLearningRate,
    LearningRateSGD,
    LearningRateSGDNesterov,
    OnnxSGDRegressor,
)
from onnxfit.sessions import make_session
from onnxfit.learning_rate import ScheduleState, make_learning_rate
from onnxfit.onnx_graphs import piece_model


# -- schedules ----------------------------------------------------------------

def _sklearn_sgd_optimal_rate(alpha, t):
    """scikit-learn's SGD 'optimal' rate for a loss whose dloss(-typw, 1) <= 1
    (squared error): eta = 1 / (alpha (t0 + t - 1)), t0 = 1 / (typw alpha)."""
    typw = np.sqrt(1.0 / np.sqrt(alpha))
    optimal_init = 1.0 / (typw * alpha)
    return 1.0 / (alpha * (optimal_init + t - 1))


@pytest.mark.parametrize(
    "schedule, formula",
    [
        ("constant", lambda t: 0.05 * np.ones_like(t)),
        ("invscaling", lambda t: 0.05 / t**0.3),
        ("optimal", lambda t: _sklearn_sgd_optimal_rate(1e-3, t)),
        ("adaptive", lambda t: 0.05 * np.ones_like(t)),
    ],
)
@pytest.mark.parametrize("cls", [LearningRateSGD, LearningRateSGDNesterov])
def test_schedule_rates_per_update(cls, schedule, formula):
    lr = cls(eta0=0.05, schedule=schedule, power_t=0.3, alpha=1e-3)
    state = ScheduleState()
    first = lr.rates(state, 4)
    assert state.t == 4
    then = lr.rates(state, 3)
    assert state.t == 7
    t = np.arange(1, 8, dtype=np.float64)
    # advanced per update: the rates continue across calls
    assert_allclose(np.concatenate([first, then]), formula(t), rtol=1e-14)
    for k in (1, 2, 7, 100):
        assert lr(k) == pytest.approx(formula(np.float64(k)), rel=1e-14)


def test_call_does_not_depend_on_past_calls_or_mutate():
    lr = LearningRateSGD(eta0=0.1, schedule="invscaling", power_t=0.5)
    before = joblib.hash(lr)
    assert lr(4) == pytest.approx(0.05)
    assert lr(1) == pytest.approx(0.1)
    assert lr(4) == pytest.approx(0.05)
    assert joblib.hash(lr) == before
    assert callable(LearningRateSGDNesterov())


def test_adaptive_schedule_applies_decay_to_rates():
    lr = LearningRateSGD(eta0=0.01, schedule="adaptive")
    state = ScheduleState(t=10, decay=0.04)
    assert_allclose(lr.rates(state, 2), [0.0004, 0.0004], rtol=1e-14)


@pytest.mark.parametrize("eta0", [0.01, 0.1, 3e-6])
def test_trigger_stopping_adaptive_divides_by_five_like_sklearn(eta0):
    lr = LearningRateSGD(eta0=eta0, schedule="adaptive")
    state = ScheduleState()
    reference = SGDOptimizer([np.zeros(1)], learning_rate_init=eta0, lr_schedule="adaptive")
    for _ in range(30):
        expected = reference.trigger_stopping("", verbose=False)
        assert lr.trigger_stopping(state) is expected
        assert lr.eta0 * state.decay == pytest.approx(reference.learning_rate, rel=1e-12)
        if expected:
            break
    else:
        pytest.fail("never stopped")
    assert 1e-6 / 5 < lr.eta0 * state.decay <= 1e-6
    assert lr.eta0 == eta0  # the object keeps its hyperparameter
    # and stays stopped
    assert lr.trigger_stopping(state)


def test_trigger_stopping_verbose_reports_the_new_rate(capsys):
    lr = LearningRateSGD(eta0=0.01, schedule="adaptive")
    assert lr.trigger_stopping(ScheduleState(), verbose=True) is False
    assert "Learning rate set to 0.002" in capsys.readouterr().out


@pytest.mark.parametrize("schedule", ["constant", "invscaling", "optimal"])
def test_trigger_stopping_other_schedules_stop_at_once(schedule):
    lr = LearningRateSGDNesterov(schedule=schedule)
    state = ScheduleState(t=5)
    assert lr.trigger_stopping(state) is True
    assert state == ScheduleState(t=5)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="Unknown schedule 'cosinus'.*'cosine'"):
        LearningRateSGD(schedule="cosinus").rates(ScheduleState(), 1)
    with pytest.raises(ValueError, match="eta0 must be a positive"):
        make_learning_rate(LearningRateSGD(eta0=0.0))
    with pytest.raises(ValueError, match="momentum must be in"):
        make_learning_rate(LearningRateSGDNesterov(momentum=1.0))
    with pytest.raises(ValueError, match="optimal.*alpha"):
        LearningRateSGD(schedule="optimal", alpha=0.0)(1)
    with pytest.raises(ValueError, match="Unknown learning_rate 'adamax'"):
        make_learning_rate("adamax")
    with pytest.raises(TypeError, match="learning_rate must be"):
        make_learning_rate(0.1)


def test_make_learning_rate_shortcuts():
    assert type(make_learning_rate("sgd")) is LearningRateSGD
    assert type(make_learning_rate("nesterov")) is LearningRateSGDNesterov
    obj = LearningRateSGDNesterov(eta0=0.2)
    assert make_learning_rate(obj) is obj


# -- update rules vs scikit-learn's SGDOptimizer --------------------------------

def _update_session(lr, dtype=np.float64):
    return make_session(piece_model(lr.update_piece(dtype)), dtype=dtype)


@pytest.mark.parametrize(
    "lr, sk_kwargs",
    [
        (LearningRateSGD(), {"momentum": 0.0, "nesterov": False}),
        (LearningRateSGDNesterov(momentum=0.9, nesterov=True), {"momentum": 0.9, "nesterov": True}),
        (LearningRateSGDNesterov(momentum=0.8, nesterov=False), {"momentum": 0.8, "nesterov": False}),
        (LearningRateSGDNesterov(momentum=0.0, nesterov=True), {"momentum": 0.0, "nesterov": True}),
    ],
    ids=["sgd", "nesterov", "momentum", "nesterov_mu0"],
)
def test_update_piece_matches_sklearn_sgd_optimizer(lr, sk_kwargs):
    rng = np.random.default_rng(0)
    session = _update_session(lr)
    shapes = [(4, 3), (3,)]
    weights = [rng.normal(size=s) for s in shapes]
    reference_params = [w.copy() for w in weights]
    reference = SGDOptimizer(reference_params, learning_rate_init=0.1, **sk_kwargs)
    states = [lr.initial_state(w) for w in weights]
    assert all(set(s) == set(lr.state_names) for s in states)
    rates = LearningRateSGD(eta0=0.1, schedule="invscaling").rates(ScheduleState(), 6)
    for step in range(6):
        grads = [rng.normal(size=s) for s in shapes]
        reference.learning_rate = rates[step]
        reference.update_params(reference_params, grads)
        for k, (weight, grad) in enumerate(zip(weights, grads)):
            feeds = {"weight": weight, "gradient": grad, "learning_rate": np.array(rates[step])}
            feeds.update(states[k])
            names = ["new_weight"] + [f"new_{s}" for s in lr.state_names]
            out = dict(zip(names, session.run(names, feeds)))
            weights[k] = out["new_weight"]
            states[k] = {s: out[f"new_{s}"] for s in lr.state_names}
        for ours, theirs in zip(weights, reference_params):
            assert_allclose(ours, theirs, rtol=1e-13, atol=1e-15)
    if lr.state_names:
        for k in range(len(shapes)):
            assert_allclose(states[k]["velocity"], reference.velocities[k], rtol=1e-13, atol=1e-15)


def test_nesterov_and_plain_momentum_differ():
    rng = np.random.default_rng(1)
    w, v, g = rng.normal(size=(3, 5))
    feeds = {"weight": w, "gradient": g, "learning_rate": np.array(0.1), "velocity": v}
    a = _update_session(LearningRateSGDNesterov(nesterov=True)).run(["new_weight"], feeds)[0]
    b = _update_session(LearningRateSGDNesterov(nesterov=False)).run(["new_weight"], feeds)[0]
    assert np.abs(a - b).min() > 1e-6


# -- statelessness ----------------------------------------------------------------

def _data(seed=0, n=60):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 1.5]) + 0.1 * rng.normal(size=n)
    return X, y


@pytest.mark.parametrize(
    "lr",
    [
        LearningRateSGD(schedule="adaptive", eta0=0.05),
        LearningRateSGDNesterov(schedule="adaptive", eta0=0.02),
    ],
    ids=["sgd", "nesterov"],
)
def test_fit_does_not_mutate_the_learning_rate_object(lr):
    X, y = _data()
    before = joblib.hash(lr)
    params = lr.get_params()
    est = OnnxSGDRegressor(learning_rate=lr, random_state=0, max_iter=60, n_iter_no_change=2, tol=1e-2)
    est.fit(X, y)
    # stopped by the adaptive schedule: its decay went through trigger_stopping
    assert est.n_iter_ < 60
    est.partial_fit(X, y)
    assert joblib.hash(lr) == before
    assert lr.get_params() == params
    assert est.learning_rate is lr


def test_shared_instance_gives_the_same_results_as_separate_ones():
    XA, yA = _data(0)
    XB, yB = _data(1, n=45)
    shared = LearningRateSGDNesterov(schedule="adaptive", eta0=0.02)
    common = dict(random_state=0, max_iter=30, n_iter_no_change=2, tol=1e-2)
    a = OnnxSGDRegressor(learning_rate=shared, **common).fit(XA, yA)
    b = OnnxSGDRegressor(learning_rate=shared, **common).fit(XB, yB)
    a.partial_fit(XA, yA)
    b.partial_fit(XB, yB)
    a2 = OnnxSGDRegressor(learning_rate=clone(shared), **common).fit(XA, yA).partial_fit(XA, yA)
    b2 = OnnxSGDRegressor(learning_rate=clone(shared), **common).fit(XB, yB).partial_fit(XB, yB)
    for x, y_ in ((a, a2), (b, b2)):
        assert x.n_iter_ == y_.n_iter_ and x.t_ == y_.t_
        for name in x.weights_:
            np.testing.assert_array_equal(x.weights_[name], y_.weights_[name])
    assert not np.array_equal(a.weights_["coef"], b.weights_["coef"])


def test_string_shortcut_equals_default_object():
    X, y = _data()
    common = dict(random_state=0, max_iter=5, tol=None)
    a = OnnxSGDRegressor(learning_rate="nesterov", **common).fit(X, y)
    b = OnnxSGDRegressor(learning_rate=LearningRateSGDNesterov(), **common).fit(X, y)
    np.testing.assert_array_equal(a.weights_["coef"], b.weights_["coef"])


# -- params protocol ----------------------------------------------------------------

def test_get_params_set_params():
    lr = LearningRateSGDNesterov()
    assert lr.get_params() == {
        "eta0": 0.01, "momentum": 0.9, "nesterov": True, "schedule": "constant",
        "power_t": 0.25, "alpha": 1e-4,
    }
    assert LearningRateSGD().get_params() == {
        "eta0": 0.01, "schedule": "invscaling", "power_t": 0.25, "alpha": 1e-4,
    }
    assert lr.set_params(eta0=0.3, momentum=0.5) is lr
    assert (lr.eta0, lr.momentum) == (0.3, 0.5)
    est = OnnxSGDRegressor(learning_rate=LearningRateSGDNesterov())
    assert est.get_params()["learning_rate__momentum"] == 0.9
    est.set_params(learning_rate__eta0=0.07, learning_rate__momentum=0.5)
    assert (est.learning_rate.eta0, est.learning_rate.momentum) == (0.07, 0.5)
    cloned = clone(est)
    assert cloned.learning_rate is not est.learning_rate
    assert cloned.learning_rate.get_params() == est.learning_rate.get_params()


def test_changing_momentum_changes_training():
    X, y = _data()
    common = dict(random_state=0, max_iter=3, tol=None)
    est = OnnxSGDRegressor(learning_rate=LearningRateSGDNesterov(momentum=0.9), **common).fit(X, y)
    first = est.weights_["coef"].copy()
    est.set_params(learning_rate__momentum=0.1).fit(X, y)
    fresh = OnnxSGDRegressor(learning_rate=LearningRateSGDNesterov(momentum=0.1), **common).fit(X, y)
    assert not np.allclose(first, est.weights_["coef"])
    np.testing.assert_array_equal(est.weights_["coef"], fresh.weights_["coef"])


# -- a user-written update rule -------------------------------------------------------

class LearningRateBiasCorrectedMomentum(BaseLearningRate):
    """A rule onnxfit does not ship, written only through the documented
    extension points: an exponential average of the gradients, corrected for
    its zero start as Adam's first moment (``m / (1 - beta**t)``).  The
    update count is kept as a state tensor."""

    state_names = ("m", "count")

    def __init__(self, eta0=0.01, beta=0.9, schedule="constant", power_t=0.25, alpha=1e-4):
        super().__init__(eta0=eta0, schedule=schedule, power_t=power_t, alpha=alpha)
        self.beta = beta

    def constants(self):
        return {"beta": self.beta, "rest": 1 - self.beta}

    def update_body(self):
        return """
    beta = Constant<value = {T} {{{beta}}}>()
    rest = Constant<value = {T} {{{rest}}}>()
    one = Constant<value = {T} {{1.0}}>()
    new_count = Add(count, one)
    m_kept = Mul(beta, m)
    m_new_part = Mul(rest, gradient)
    new_m = Add(m_kept, m_new_part)
    beta_t = Pow(beta, new_count)
    correction = Sub(one, beta_t)
    m_hat = Div(new_m, correction)
    step = Mul(learning_rate, m_hat)
    new_weight = Sub(weight, step)
"""


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_user_written_rule_trains_like_its_numpy_transcription(engine):
    X, y = _data(2, n=40)
    lr = LearningRateBiasCorrectedMomentum(eta0=0.05, beta=0.8)
    est = OnnxSGDRegressor(
        learning_rate=lr, penalty=None, batch_size=1000, shuffle=False, max_iter=4, tol=None,
        engine=engine,
    ).fit(X, y)
    assert est.get_params()["learning_rate__beta"] == 0.8

    coef, intercept = np.zeros(4), np.zeros(1)
    m = [np.zeros(4), np.zeros(1)]
    for t in range(1, 5):
        r = X @ coef + intercept - y
        grads = [X.T @ r / len(y), np.array([r.mean()])]
        params = [coef, intercept]
        for k in range(2):
            m[k] = 0.8 * m[k] + 0.2 * grads[k]
            params[k] = params[k] - 0.05 * m[k] / (1 - 0.8**t)
        coef, intercept = params
    assert_allclose(est.weights_["coef"].ravel(), coef, rtol=1e-10)
    assert_allclose(est.weights_["intercept"], intercept, rtol=1e-10)
