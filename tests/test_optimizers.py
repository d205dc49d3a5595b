"""torch.optim's update rules (momentum, Adam, AdamW, RMSprop, Adagrad):
each ONNX update piece against a numpy transcription of torch's documented
algorithm, each rule through both engines, against torch.optim itself, and
the rules by name in a grid search."""

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.datasets import load_diabetes
from sklearn.model_selection import GridSearchCV

from onnxfit import (
    LearningRateAdagrad,
    LearningRateAdam,
    LearningRateAdamW,
    LearningRateMomentum,
    LearningRateRMSprop,
    LearningRateSGD,
    OnnxSGDRegressor,
)
from onnxfit.learning_rate import ScheduleState, make_learning_rate
from onnxfit.onnx_graphs import piece_model
from onnxfit.sessions import make_session


# -- numpy transcriptions of torch.optim's documented algorithms ----------------
#
# Each takes the hyperparameters under onnxfit's names and returns
# step(w, g, lr) -> new w, keeping its own state (float64 throughout).

def numpy_momentum(momentum=0.9, weight_decay=0.0, nesterov=False, **_):
    buf = None

    def step(w, g, lr):
        nonlocal buf
        g = g + weight_decay * w
        buf = g.copy() if buf is None else momentum * buf + g  # dampening = 0
        g = g + momentum * buf if nesterov else buf
        return w - lr * g

    return step


def numpy_adam(beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.0, decoupled=False, **_):
    m = v = 0.0
    t = 0

    def step(w, g, lr):
        nonlocal m, v, t
        t += 1
        if decoupled:
            w = w * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * w
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        return w - lr * m_hat / (np.sqrt(v_hat) + epsilon)

    return step


def numpy_adamw(weight_decay=1e-2, **kwargs):
    return numpy_adam(weight_decay=weight_decay, decoupled=True, **kwargs)


def numpy_rmsprop(rho=0.99, epsilon=1e-8, weight_decay=0.0, momentum=0.0, centered=False, **_):
    v = g_ave = b = 0.0

    def step(w, g, lr):
        nonlocal v, g_ave, b
        g = g + weight_decay * w
        v = rho * v + (1 - rho) * g * g
        v_tilde = v
        if centered:
            g_ave = rho * g_ave + (1 - rho) * g
            v_tilde = v_tilde - g_ave * g_ave
        if momentum > 0:
            b = momentum * b + g / (np.sqrt(v_tilde) + epsilon)
            return w - lr * b
        return w - lr * g / (np.sqrt(v_tilde) + epsilon)

    return step


def numpy_adagrad(lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                  epsilon=1e-10, **_):
    state_sum = initial_accumulator_value
    t = 0

    def step(w, g, lr):
        nonlocal state_sum, t
        t += 1
        clr = lr / (1 + (t - 1) * lr_decay)
        g = g + weight_decay * w
        state_sum = state_sum + g * g
        return w - clr * g / (np.sqrt(state_sum) + epsilon)

    return step


NUMPY = {
    LearningRateMomentum: numpy_momentum,
    LearningRateAdam: numpy_adam,
    LearningRateAdamW: numpy_adamw,
    LearningRateRMSprop: numpy_rmsprop,
    LearningRateAdagrad: numpy_adagrad,
}

# (class, hyperparameters): every rule with and without its weight decay and
# its options.
CASES = {
    "momentum": (LearningRateMomentum, dict(eta0=0.05)),
    "momentum_wd": (LearningRateMomentum, dict(eta0=0.05, momentum=0.8, weight_decay=0.1)),
    "momentum_nesterov_wd": (
        LearningRateMomentum, dict(eta0=0.05, weight_decay=0.1, nesterov=True)),
    "adam": (LearningRateAdam, dict(eta0=0.05)),
    "adam_wd": (LearningRateAdam, dict(eta0=0.05, beta1=0.8, beta2=0.99, weight_decay=0.1)),
    "adamw": (LearningRateAdamW, dict(eta0=0.05)),
    "adamw_wd0": (LearningRateAdamW, dict(eta0=0.05, weight_decay=0.0)),
    "adamw_wd": (LearningRateAdamW, dict(eta0=0.05, beta1=0.8, epsilon=1e-6, weight_decay=0.3)),
    "rmsprop": (LearningRateRMSprop, dict(eta0=0.02)),
    "rmsprop_wd": (LearningRateRMSprop, dict(eta0=0.02, rho=0.9, weight_decay=0.1)),
    "rmsprop_centered": (LearningRateRMSprop, dict(eta0=0.02, centered=True)),
    "rmsprop_momentum_centered_wd": (
        LearningRateRMSprop, dict(eta0=0.01, momentum=0.5, centered=True, weight_decay=0.1)),
    "adagrad": (LearningRateAdagrad, dict(eta0=0.1)),
    "adagrad_wd": (
        LearningRateAdagrad,
        dict(eta0=0.1, weight_decay=0.1, lr_decay=0.05, initial_accumulator_value=0.2)),
}


def _rule(case):
    cls, params = CASES[case]
    return cls(**params), NUMPY[cls](**params)


# -- names, defaults, states ----------------------------------------------------------

def test_names_resolve_to_the_rules_with_torch_defaults():
    expected = {
        "momentum": (LearningRateMomentum, dict(eta0=1e-3, momentum=0.9, weight_decay=0.0)),
        "adam": (LearningRateAdam, dict(eta0=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8,
                                        weight_decay=0.0)),
        "adamw": (LearningRateAdamW, dict(eta0=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8,
                                          weight_decay=1e-2)),
        "rmsprop": (LearningRateRMSprop, dict(eta0=1e-2, rho=0.99, epsilon=1e-8,
                                              weight_decay=0.0, momentum=0.0, centered=False)),
        "adagrad": (LearningRateAdagrad, dict(eta0=1e-2, lr_decay=0.0, weight_decay=0.0,
                                              initial_accumulator_value=0.0, epsilon=1e-10)),
    }
    for name, (cls, defaults) in expected.items():
        rule = make_learning_rate(name)
        assert type(rule) is cls
        params = rule.get_params()
        assert params["schedule"] == "constant"
        assert {k: params[k] for k in defaults} == defaults


def test_state_tensors():
    w = np.arange(3.0)
    assert LearningRateAdam().initial_state(w).keys() == {"exp_avg", "exp_avg_sq", "step"}
    assert LearningRateRMSprop().state_names == ("square_avg",)
    assert LearningRateRMSprop(centered=True, momentum=0.5).state_names == (
        "square_avg", "grad_avg", "momentum_buffer")
    assert LearningRateAdagrad().state_names == ("sum",)
    assert LearningRateAdagrad(lr_decay=0.1).state_names == ("sum", "step")
    assert_allclose(
        LearningRateAdagrad(initial_accumulator_value=0.3).initial_state(w)["sum"], [0.3] * 3)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="beta2 must be in"):
        make_learning_rate(LearningRateAdam(beta2=1.0))
    with pytest.raises(ValueError, match="weight_decay must be"):
        make_learning_rate(LearningRateAdamW(weight_decay=-1.0))
    with pytest.raises(ValueError, match="momentum must be in"):
        make_learning_rate(LearningRateMomentum(momentum=1.5))
    with pytest.raises(ValueError, match="rho must be in"):
        make_learning_rate(LearningRateRMSprop(rho=1.5))
    with pytest.raises(ValueError, match="Unknown learning_rate 'adamax'"):
        make_learning_rate("adamax")


# -- the ONNX update piece against numpy ------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_update_piece_matches_numpy_transcription(case):
    rule, reference = _rule(case)
    rng = np.random.default_rng(0)
    session = make_session(piece_model(rule.update_piece(np.float32)), dtype=np.float32)
    names = ["new_weight"] + [f"new_{s}" for s in rule.state_names]
    w = rng.normal(size=11)
    expected = w.copy()
    state = {k: v.astype(np.float32) for k, v in rule.initial_state(w).items()}
    weight = w.astype(np.float32)
    # a schedule that changes the rate at every update
    rates = LearningRateSGD(eta0=rule.eta0, schedule="invscaling").rates(ScheduleState(), 8)
    for lr in rates:
        g = rng.normal(size=w.shape)
        expected = reference(expected, g, lr)
        feeds = {"weight": weight, "gradient": g.astype(np.float32),
                 "learning_rate": np.array(lr, dtype=np.float32), **state}
        out = dict(zip(names, session.run(names, feeds)))
        weight = out["new_weight"]
        state = {s: out[f"new_{s}"] for s in rule.state_names}
        assert weight.dtype == np.float32
        assert_allclose(weight, expected, rtol=2e-5, atol=2e-6)
    assert not np.allclose(expected, w)


# -- through both engines ----------------------------------------------------------------

def _data(n=40, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 1.5]) + 0.3 + 0.1 * rng.normal(size=n)
    return X, y


ENGINE_CASES = ["momentum_nesterov_wd", "adam", "adam_wd", "adamw_wd",
                "rmsprop", "rmsprop_momentum_centered_wd", "adagrad", "adagrad_wd"]


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
@pytest.mark.parametrize("case", ENGINE_CASES)
def test_engines_train_like_numpy(case, engine):
    X, y = _data()
    rule, _ = _rule(case)
    n_steps = 5
    est = OnnxSGDRegressor(
        learning_rate=rule, penalty=None, batch_size=len(y), shuffle=False,
        max_iter=n_steps, tol=None, engine=engine,
    ).fit(X, y)
    assert est.t_ == n_steps

    cls, params = CASES[case]
    coef, intercept = np.zeros(4), np.zeros(1)
    steppers = [NUMPY[cls](**params), NUMPY[cls](**params)]
    for _ in range(n_steps):
        # gradient of mean(0.5 (X coef + b - y)**2)
        r = X @ coef + intercept - y
        coef = steppers[0](coef, X.T @ r / len(y), rule.eta0)
        intercept = steppers[1](intercept, np.array([r.mean()]), rule.eta0)
    assert_allclose(est.weights_["coef"].ravel(), coef, rtol=1e-9, atol=1e-12)
    assert_allclose(est.weights_["intercept"], intercept, rtol=1e-9, atol=1e-12)


def test_string_name_equals_default_object():
    X, y = _data()
    common = dict(random_state=0, max_iter=3, tol=None)
    a = OnnxSGDRegressor(learning_rate="adam", **common).fit(X, y)
    b = OnnxSGDRegressor(learning_rate=LearningRateAdam(), **common).fit(X, y)
    np.testing.assert_array_equal(a.weights_["coef"], b.weights_["coef"])


# -- against torch.optim itself --------------------------------------------------------

def _torch_optimizer(torch, cls, params, parameters):
    kwargs = {"lr": params.get("eta0", cls().eta0)}
    if cls is LearningRateMomentum:
        kwargs.update(momentum=params.get("momentum", 0.9),
                      weight_decay=params.get("weight_decay", 0.0),
                      nesterov=params.get("nesterov", False))
        return torch.optim.SGD(parameters, **kwargs)
    if cls in (LearningRateAdam, LearningRateAdamW):
        rule = cls(**params)
        kwargs.update(betas=(rule.beta1, rule.beta2), eps=rule.epsilon,
                      weight_decay=rule.weight_decay)
        opt = torch.optim.Adam if cls is LearningRateAdam else torch.optim.AdamW
        return opt(parameters, **kwargs)
    if cls is LearningRateRMSprop:
        rule = cls(**params)
        kwargs.update(alpha=rule.rho, eps=rule.epsilon, weight_decay=rule.weight_decay,
                      momentum=rule.momentum, centered=rule.centered)
        return torch.optim.RMSprop(parameters, **kwargs)
    rule = cls(**params)
    kwargs.update(lr_decay=rule.lr_decay, weight_decay=rule.weight_decay,
                  initial_accumulator_value=rule.initial_accumulator_value, eps=rule.epsilon)
    return torch.optim.Adagrad(parameters, **kwargs)


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_matches_torch_optim(engine):
    torch = pytest.importorskip("torch")
    X, y = _data(n=30, seed=5)
    n_steps = 6
    for case, (cls, params) in CASES.items():
        model = torch.nn.Linear(4, 1).double()
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        opt = _torch_optimizer(torch, cls, params, model.parameters())
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        for _ in range(n_steps):
            opt.zero_grad()
            loss = 0.5 * ((model(Xt).squeeze(1) - yt) ** 2).mean()
            loss.backward()
            opt.step()
        est = OnnxSGDRegressor(
            learning_rate=cls(**params), penalty=None, batch_size=len(y), shuffle=False,
            max_iter=n_steps, tol=None, engine=engine,
        ).fit(X, y)
        assert_allclose(est.weights_["coef"].ravel(), model.weight.detach().numpy().ravel(),
                        rtol=1e-9, atol=1e-12, err_msg=case)
        assert_allclose(est.weights_["intercept"], model.bias.detach().numpy(),
                        rtol=1e-9, atol=1e-12, err_msg=case)


def test_grid_search_over_rule_names():
    X, y = load_diabetes(return_X_y=True)
    search = GridSearchCV(
        OnnxSGDRegressor(max_iter=5, tol=None, random_state=0),
        {"learning_rate": ["sgd", "adam", "rmsprop"]}, cv=3,
    ).fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert len(scores) == 3
    assert np.isfinite(scores).all()


def test_grid_search_over_eta0_and_rule_as_written():
    # The example: eta0 is an estimator parameter, applied to
    # whichever rule learning_rate names (max_iter only bounds the test's time).
    from sklearn.preprocessing import StandardScaler

    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    search = GridSearchCV(
        OnnxSGDRegressor(max_iter=30), {"eta0": [1e-3, 1e-2], "learning_rate": ["sgd", "adam"]},
        cv=3,
    ).fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all() and search.best_score_ > 0.4
    assert len(set(np.round(scores, 12))) == 4  # each cell trained differently
    assert search.best_estimator_._learning_rate.eta0 == search.best_params_["eta0"]
