"""Learning-rate schedules (onnxfit.schedules): each against a per-update
numpy transcription of its documented formula, against
torch.optim.lr_scheduler where torch is installed, through every update
rule, and scikit-learn's schedule names against SGDRegressor's own steps."""

import math

import joblib
import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.linear_model import SGDRegressor

from onnxfit import (
    LearningRateAdagrad,
    LearningRateAdam,
    LearningRateAdamW,
    LearningRateMomentum,
    LearningRateRMSprop,
    LearningRateSGD,
    LearningRateSGDNesterov,
    OnnxSGDRegressor,
)
from onnxfit.learning_rate import LEARNING_RATES, ScheduleState, make_learning_rate
from onnxfit.schedules import (
    AdaptiveSchedule,
    BaseSchedule,
    ConstantSchedule,
    CosineSchedule,
    InvScalingSchedule,
    OptimalSchedule,
    StepSchedule,
    make_schedule,
)

ALL_RULES = [
    LearningRateSGD, LearningRateSGDNesterov, LearningRateMomentum, LearningRateAdam,
    LearningRateAdamW, LearningRateRMSprop, LearningRateAdagrad,
]

# -- numpy transcriptions, one update at a time -------------------------------------


def _warmup(t, warmup_steps):
    return 1.0 if warmup_steps == 0 or t >= warmup_steps else t / warmup_steps


def _sklearn_optimal(alpha, t):
    # scikit-learn's _sgd_fast: typw = sqrt(1 / sqrt(alpha)), eta0 = typw /
    # max(1, dloss(1, -typw)) = typw, optimal_init = 1 / (eta0 alpha),
    # eta = 1 / (alpha (optimal_init + t - 1))
    typw = math.sqrt(1.0 / math.sqrt(alpha))
    return 1.0 / (alpha * (1.0 / (typw * alpha) + t - 1))


def _cosine(eta0, t, n_steps, eta_min, warmup_steps):
    if t <= warmup_steps:
        return eta0 * t / warmup_steps
    k, decay_steps = min(t - 1 - warmup_steps, n_steps - warmup_steps), n_steps - warmup_steps
    return eta_min + (eta0 - eta_min) * (1 + math.cos(math.pi * k / decay_steps)) / 2


ETA0 = 0.05

# (schedule, state, rate of update t) for t = 1, 2, ...
TRANSCRIPTIONS = {
    "constant": (ConstantSchedule(), ScheduleState(), lambda t: ETA0),
    "constant_warmup": (ConstantSchedule(warmup_steps=4), ScheduleState(),
                        lambda t: ETA0 * _warmup(t, 4)),
    "invscaling": (InvScalingSchedule(power_t=0.3), ScheduleState(), lambda t: ETA0 / t**0.3),
    "invscaling_warmup": (InvScalingSchedule(power_t=0.5, warmup_steps=3), ScheduleState(),
                          lambda t: _warmup(t, 3) * ETA0 / t**0.5),
    "optimal": (OptimalSchedule(alpha=1e-3), ScheduleState(),
                lambda t: _sklearn_optimal(1e-3, t)),
    "optimal_warmup": (OptimalSchedule(alpha=0.2, warmup_steps=5), ScheduleState(),
                       lambda t: _warmup(t, 5) * _sklearn_optimal(0.2, t)),
    "adaptive_decayed": (AdaptiveSchedule(), ScheduleState(decay=0.04),
                         lambda t: ETA0 * 0.04),
    "cosine": (CosineSchedule(n_steps=12), ScheduleState(),
               lambda t: _cosine(ETA0, t, 12, 0.0, 0)),
    "cosine_eta_min_warmup": (CosineSchedule(n_steps=12, eta_min=1e-3, warmup_steps=4),
                              ScheduleState(), lambda t: _cosine(ETA0, t, 12, 1e-3, 4)),
    "cosine_whole_fit": (CosineSchedule(warmup_steps=2), ScheduleState(total_steps=9),
                         lambda t: _cosine(ETA0, t, 9, 0.0, 2)),
    "step": (StepSchedule(step_size=3, gamma=0.5), ScheduleState(),
             lambda t: ETA0 * 0.5 ** ((t - 1) // 3)),
    "step_warmup": (StepSchedule(step_size=4, warmup_steps=6), ScheduleState(),
                    lambda t: _warmup(t, 6) * ETA0 * 0.1 ** ((t - 1) // 4)),
}


@pytest.mark.parametrize("case", list(TRANSCRIPTIONS))
def test_schedule_matches_numpy_transcription(case):
    schedule, state, formula = TRANSCRIPTIONS[case]
    before = joblib.hash(schedule)
    t = np.arange(1, 21)
    expected = [formula(int(k)) for k in t]
    assert_allclose(schedule.rates_at(t.astype(np.float64), ETA0, state), expected, rtol=1e-14)
    # through a rule: advanced per update, the rates continue across calls
    rule = LearningRateSGD(eta0=ETA0, schedule=schedule)
    run = ScheduleState(decay=state.decay, total_steps=state.total_steps)
    rates = np.concatenate([rule.rates(run, 7), rule.rates(run, 13)])
    assert run.t == 20
    assert_allclose(rates, expected, rtol=1e-14)
    assert joblib.hash(schedule) == before


def test_warmup_ramps_linearly_from_eta0_over_warmup_steps():
    rates = ConstantSchedule(warmup_steps=4).rates_at(np.arange(1.0, 7.0), 1.0)
    assert_allclose(rates, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rtol=1e-15)


def test_cosine_decays_after_warmup_and_then_stays_at_eta_min():
    schedule = CosineSchedule(n_steps=10, eta_min=0.01, warmup_steps=2)
    rates = schedule.rates_at(np.arange(1.0, 16.0), 1.0)
    assert_allclose(rates[:3], [0.5, 1.0, 1.0], rtol=1e-15)  # t = 3: first decay update, k = 0
    assert np.all(np.diff(rates[2:10]) < 0)
    assert rates[9] > 0.01  # the last update of the 10 is above eta_min, as in torch
    assert_allclose(rates[10:], 0.01, rtol=1e-15)


def test_cosine_with_warmup_is_transformers_schedule_after_the_warmup():
    """transformers.get_cosine_schedule_with_warmup's lambda at its 0-based
    step s: s / W during the warm-up, then 0.5 (1 + cos(pi (s - W) / (N -
    W))).  Ours is the same after the warm-up (update t = s + 1), and the
    same warm-up ramp one update earlier (t / W instead of (t - 1) / W)."""
    W, N = 4, 15

    def transformers_lambda(s):
        if s < W:
            return s / max(1, W)
        progress = (s - W) / max(1, N - W)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * progress)))

    rates = CosineSchedule(n_steps=N, warmup_steps=W).rates_at(np.arange(1.0, N + 1), ETA0)
    for t in range(1, N + 1):
        expected = transformers_lambda(t) if t <= W else transformers_lambda(t - 1)
        assert rates[t - 1] == pytest.approx(ETA0 * expected, rel=1e-14, abs=1e-18)


# -- against torch.optim.lr_scheduler ---------------------------------------------------


def _torch_rates(torch, make_scheduler, n_updates, eta0=ETA0):
    """The lr of each of ``n_updates`` updates of an optimizer whose
    scheduler steps once per update."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = torch.optim.SGD([param], lr=eta0)
    scheduler = make_scheduler(torch.optim.lr_scheduler, optimizer)
    rates = []
    for _ in range(n_updates):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


def _linear_warmup(sched, opt, warmup_steps):
    return sched.LinearLR(opt, start_factor=1 / warmup_steps, end_factor=1.0,
                          total_iters=warmup_steps - 1)


TORCH_CASES = {
    "cosine": (
        CosineSchedule(n_steps=25),
        lambda sched, opt: sched.CosineAnnealingLR(opt, T_max=25)),
    "cosine_eta_min": (
        CosineSchedule(n_steps=25, eta_min=0.004),
        lambda sched, opt: sched.CosineAnnealingLR(opt, T_max=25, eta_min=0.004)),
    "cosine_warmup": (
        CosineSchedule(n_steps=25, eta_min=0.004, warmup_steps=5),
        lambda sched, opt: sched.SequentialLR(opt, [
            _linear_warmup(sched, opt, 5),
            sched.CosineAnnealingLR(opt, T_max=20, eta_min=0.004),
        ], milestones=[5])),
    "step": (
        StepSchedule(step_size=4, gamma=0.5),
        lambda sched, opt: sched.StepLR(opt, step_size=4, gamma=0.5)),
    "step_warmup": (
        StepSchedule(step_size=3, gamma=0.7, warmup_steps=5),
        lambda sched, opt: sched.ChainedScheduler([
            _linear_warmup(sched, opt, 5), sched.StepLR(opt, step_size=3, gamma=0.7),
        ])),
    "constant_warmup": (
        ConstantSchedule(warmup_steps=6),
        lambda sched, opt: _linear_warmup(sched, opt, 6)),
    "invscaling": (
        InvScalingSchedule(power_t=0.4),
        lambda sched, opt: sched.LambdaLR(opt, lambda k: 1 / (k + 1) ** 0.4)),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_schedule_matches_torch_lr_scheduler(case):
    torch = pytest.importorskip("torch", reason="torch compares the schedules with its own")
    schedule, make_scheduler = TORCH_CASES[case]
    expected = _torch_rates(torch, make_scheduler, 25)
    assert_allclose(schedule.rates_at(np.arange(1.0, 26.0), ETA0), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "rule_class, torch_optimizer",
    [(LearningRateAdam, "Adam"), (LearningRateMomentum, "SGD"), (LearningRateRMSprop, "RMSprop")],
)
def test_rule_with_schedule_trains_like_torch_optimizer_with_scheduler(rule_class, torch_optimizer):
    """A schedule object in a torch-style rule, through the estimator: the
    rate of each update is the lr torch's scheduler gives its optimizer."""
    torch = pytest.importorskip("torch", reason="torch compares the schedules with its own")
    X, y = _linear_data(n=30)
    n_updates, eta0 = 10, 0.05
    schedule = CosineSchedule(n_steps=10, eta_min=0.002, warmup_steps=3)
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    kwargs = {"momentum": 0.9} if torch_optimizer == "SGD" else {}
    optimizer = getattr(torch.optim, torch_optimizer)(model.parameters(), lr=eta0, **kwargs)
    sched = torch.optim.lr_scheduler
    scheduler = sched.SequentialLR(optimizer, [
        _linear_warmup(sched, optimizer, 3),
        sched.CosineAnnealingLR(optimizer, T_max=7, eta_min=0.002),
    ], milestones=[3])
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(n_updates):
        optimizer.zero_grad()
        loss = 0.5 * ((model(Xt).squeeze(1) - yt) ** 2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
    rule = rule_class(eta0=eta0, schedule=schedule)
    est = OnnxSGDRegressor(learning_rate=rule, penalty=None, batch_size=len(y), shuffle=False,
                           max_iter=n_updates, tol=None).fit(X, y)
    assert_allclose(est.weights_["coef"].ravel(), model.weight.detach().numpy().ravel(),
                    rtol=1e-9, atol=1e-12)
    assert_allclose(est.weights_["intercept"], model.bias.detach().numpy(), rtol=1e-9, atol=1e-12)


# -- schedules in the update rules ------------------------------------------------------


@pytest.mark.parametrize("rule_class", ALL_RULES)
def test_every_rule_takes_every_schedule(rule_class):
    for schedule, state, formula in TRANSCRIPTIONS.values():
        rule = rule_class(eta0=ETA0, schedule=schedule)
        before = joblib.hash(rule)
        run = ScheduleState(decay=state.decay, total_steps=state.total_steps)
        assert_allclose(rule.rates(run, 6), [formula(t) for t in range(1, 7)], rtol=1e-14)
        assert rule.trigger_stopping(run) is not isinstance(schedule, AdaptiveSchedule)
        assert joblib.hash(rule) == before  # neither the rule nor its schedule changed
    by_name = rule_class(eta0=ETA0, schedule="cosine")
    assert_allclose(by_name.rates(ScheduleState(total_steps=9), 9),
                    [_cosine(ETA0, t, 9, 0.0, 0) for t in range(1, 10)], rtol=1e-14)


def test_schedule_names_use_the_rules_power_t_and_alpha():
    rule = LearningRateAdam(eta0=0.1, schedule="invscaling", power_t=0.7, alpha=0.3)
    assert rule(4) == pytest.approx(0.1 / 4**0.7, rel=1e-14)
    rule.set_params(schedule="optimal")
    assert rule(4) == pytest.approx(_sklearn_optimal(0.3, 4), rel=1e-14)
    # an object brings its own hyperparameters
    rule.set_params(schedule=InvScalingSchedule(power_t=0.2))
    assert rule(4) == pytest.approx(0.1 / 4**0.2, rel=1e-14)


def test_schedule_object_is_a_nested_parameter():
    rule = LearningRateSGDNesterov(schedule=CosineSchedule(n_steps=50, warmup_steps=5))
    params = rule.get_params()
    assert params["schedule__n_steps"] == 50 and params["schedule__warmup_steps"] == 5
    rule.set_params(schedule__warmup_steps=10)
    assert rule.schedule.warmup_steps == 10
    copy = clone(rule)
    assert copy.schedule is not rule.schedule
    assert copy.schedule.get_params() == rule.schedule.get_params()
    est = OnnxSGDRegressor(learning_rate=rule)
    assert est.get_params()["learning_rate__schedule__eta_min"] == 0.0
    assert StepSchedule(step_size=3).get_params() == {
        "step_size": 3, "gamma": 0.1, "warmup_steps": 0,
    }


def test_cosine_over_the_whole_fit_needs_its_length():
    rule = LearningRateSGD(schedule="cosine")
    with pytest.raises(ValueError, match=r"n_steps=None.*total_steps.*give n_steps"):
        rule.rates(ScheduleState(), 3)
    with pytest.raises(ValueError, match="not more than warmup_steps=5"):
        CosineSchedule(warmup_steps=5).rates_at([1.0], 0.1, ScheduleState(total_steps=5))


def test_make_schedule():
    assert make_schedule("invscaling", power_t=0.4).get_params() == {
        "power_t": 0.4, "warmup_steps": 0,
    }
    assert make_schedule("optimal", alpha=0.2).alpha == 0.2
    assert type(make_schedule("adaptive")) is AdaptiveSchedule
    assert type(make_schedule("constant")) is ConstantSchedule
    assert make_schedule("cosine").get_params() == CosineSchedule().get_params()
    step = StepSchedule(step_size=2)
    assert make_schedule(step) is step


@pytest.mark.parametrize(
    "schedule, error, message",
    [
        ("cosinus", ValueError,
         (r"Unknown schedule 'cosinus'; choose one of \['constant', 'invscaling', 'optimal', "
          r"'adaptive', 'cosine'\] or a BaseSchedule object")),
        (0.1, TypeError, "schedule must be one of .* or a BaseSchedule object, got 0.1"),
        (ConstantSchedule(warmup_steps=-1), ValueError,
         "warmup_steps must be an integer >= 0, got -1"),
        (ConstantSchedule(warmup_steps=2.5), ValueError, "warmup_steps must be an integer >= 0"),
        (InvScalingSchedule(power_t="a"), ValueError, "power_t must be a real number"),
        (OptimalSchedule(alpha=0.0), ValueError, r"'optimal' schedule needs alpha > 0, got 0.0"),
        (CosineSchedule(n_steps=3, warmup_steps=3), ValueError,
         r"n_steps must be None or an integer > warmup_steps \(3\), got 3"),
        (CosineSchedule(n_steps=10, eta_min=-1.0), ValueError, "eta_min must be a number >= 0"),
        (StepSchedule(step_size=0), ValueError, "step_size must be an integer >= 1, got 0"),
        (StepSchedule(step_size=2, gamma=0), ValueError, "gamma must be a number > 0, got 0"),
    ],
)
def test_invalid_schedules(schedule, error, message):
    with pytest.raises(error, match=message):
        make_schedule(schedule)
    with pytest.raises(error, match=message):
        make_learning_rate(LearningRateAdam(schedule=schedule))


def test_custom_schedule_only_writes_base_rates():
    class HalvingSchedule(BaseSchedule):
        def base_rates(self, t, eta0, state):
            return eta0 * 0.5 ** (t - 1)

    rule = LearningRateSGD(eta0=1.0, schedule=HalvingSchedule(warmup_steps=2))
    assert_allclose(rule.rates(ScheduleState(), 4), [0.5, 0.5, 0.25, 0.125], rtol=1e-15)


# -- make_learning_rate: scikit-learn's names, schedule=, alpha= ---------------------------


@pytest.mark.parametrize("name", ["constant", "optimal", "invscaling", "adaptive"])
def test_sklearn_schedule_names_are_plain_sgd(name):
    assert name in LEARNING_RATES
    rule = make_learning_rate(name)
    assert type(rule) is LearningRateSGD
    assert rule.get_params() == LearningRateSGD(schedule=name).get_params()
    assert make_learning_rate(name) is not rule  # a new object each time


def test_make_learning_rate_schedule_and_alpha():
    rule = make_learning_rate("adam", schedule="cosine")
    assert type(rule) is LearningRateAdam and rule.schedule == "cosine"
    step = StepSchedule(step_size=10)
    assert make_learning_rate("rmsprop", schedule=step).schedule is step
    assert make_learning_rate("optimal", alpha=0.5)(3) == pytest.approx(
        _sklearn_optimal(0.5, 3), rel=1e-14)
    assert make_learning_rate("sgd", schedule="optimal", alpha=0.5).alpha == 0.5
    assert make_learning_rate("adam").schedule == "constant"  # the rule's default kept
    obj = LearningRateAdam(alpha=0.2)
    assert make_learning_rate(obj, alpha=0.5) is obj and obj.alpha == 0.2
    with pytest.raises(ValueError, match=r"schedule='cosine' and learning_rate=.*both set"):
        make_learning_rate(LearningRateSGD(), schedule="cosine")
    with pytest.raises(ValueError, match="Unknown schedule 'linear'"):
        make_learning_rate("sgd", schedule="linear")
    with pytest.raises(ValueError, match="'optimal' schedule needs alpha > 0"):
        make_learning_rate("optimal", alpha=0.0)


# -- the same steps as scikit-learn's SGDRegressor -----------------------------------------


def _linear_data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=n)
    return X, y


# name -> (onnxfit parameters, SGDRegressor parameters).  The 'optimal'
# schedule ignores eta0 and its rate starts at 1 / sqrt(sqrt(alpha)): 10 for
# the default alpha, where the intercept's steps diverge (in scikit-learn
# too), so these cases take alpha=2.
SKLEARN_CASES = {
    "constant": ({"learning_rate": "constant", "eta0": 0.02},
                 {"learning_rate": "constant", "eta0": 0.02}),
    "invscaling": ({"learning_rate": "invscaling", "eta0": 0.05},
                   {"learning_rate": "invscaling", "eta0": 0.05}),
    "adaptive": ({"learning_rate": "adaptive", "eta0": 0.02},
                 {"learning_rate": "adaptive", "eta0": 0.02}),
    "optimal": ({"learning_rate": "optimal", "alpha": 2.0},
                {"learning_rate": "optimal", "alpha": 2.0}),
    "invscaling_power_t": (
        {"learning_rate": LearningRateSGD(eta0=0.1, schedule="invscaling", power_t=0.6)},
        {"learning_rate": "invscaling", "eta0": 0.1, "power_t": 0.6}),
    "optimal_object": (
        {"learning_rate": LearningRateSGD(schedule="optimal", alpha=2.0)},
        {"learning_rate": "optimal", "alpha": 2.0}),
}


def _estimators(case):
    our_params, their_params = SKLEARN_CASES[case]
    ours = OnnxSGDRegressor(penalty=None, batch_size=1, shuffle=False, tol=None, **our_params)
    if isinstance(ours.learning_rate, str) and (
        ours._update_rule().alpha != ours.alpha
    ):
        pytest.skip("the estimator does not give its alpha to make_learning_rate yet")
    theirs = SGDRegressor(penalty=None, shuffle=False, tol=None, **their_params)
    return ours, theirs


def _assert_same_weights(ours, theirs):
    assert ours.dtype_ == np.float64
    assert_allclose(ours.weights_["coef"].ravel(), theirs.coef_, rtol=1e-10, atol=1e-14)
    assert_allclose(ours.weights_["intercept"], theirs.intercept_, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", list(SKLEARN_CASES))
def test_same_steps_as_sklearn_sgd_regressor_one_partial_fit_per_sample(case):
    ours, theirs = _estimators(case)
    X, y = _linear_data()
    for i in range(100):
        ours.partial_fit(X[i:i + 1], y[i:i + 1])
        theirs.partial_fit(X[i:i + 1], y[i:i + 1])
        _assert_same_weights(ours, theirs)
    assert (ours.t_, theirs.t_) == (100, 101.0)  # scikit-learn counts from 1
    # the weights moved: the steps were compared, not zeros
    assert np.abs(theirs.coef_).min() > 1e-3


@pytest.mark.parametrize("case", list(SKLEARN_CASES))
def test_same_steps_as_sklearn_sgd_regressor_one_epoch_fit(case):
    ours, theirs = _estimators(case)
    X, y = _linear_data()
    ours.set_params(max_iter=1)
    theirs.set_params(max_iter=1)
    ours.fit(X, y)
    theirs.fit(X, y)
    _assert_same_weights(ours, theirs)


def test_same_steps_as_sklearn_through_the_estimator_eta0():
    """``eta0`` of the estimator with a schedule name, searchable as
    SGDRegressor's: each value gives scikit-learn's steps."""
    X, y = _linear_data()
    for eta0 in (0.003, 0.03):
        ours = OnnxSGDRegressor(learning_rate="invscaling", eta0=eta0, penalty=None,
                                batch_size=1, shuffle=False, max_iter=1, tol=None).fit(X, y)
        theirs = SGDRegressor(learning_rate="invscaling", eta0=eta0, penalty=None,
                              shuffle=False, max_iter=1, tol=None).fit(X, y)
        _assert_same_weights(ours, theirs)


# -- through the estimator: the engines take the schedule's rates ------------------------


@pytest.mark.parametrize(
    "schedule",
    [CosineSchedule(n_steps=30, eta_min=0.001, warmup_steps=4),
     StepSchedule(step_size=7, gamma=0.5, warmup_steps=3)],
    ids=["cosine", "step"],
)
@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_estimator_steps_with_the_schedule_rates(schedule, engine):
    X, y = _linear_data(n=15)
    est = OnnxSGDRegressor(
        learning_rate=LearningRateSGD(eta0=0.05, schedule=schedule), penalty=None,
        batch_size=1, shuffle=False, max_iter=3, tol=None, engine=engine,
    ).fit(X, y)
    rates = schedule.rates_at(np.arange(1.0, 46.0), 0.05)
    coef, intercept = np.zeros(3), 0.0
    for k, rate in enumerate(rates):
        x, target = X[k % 15], y[k % 15]
        residual = x @ coef + intercept - target
        coef, intercept = coef - rate * residual * x, intercept - rate * residual
    assert est.t_ == 45
    assert_allclose(est.weights_["coef"].ravel(), coef, rtol=1e-10, atol=1e-14)
    assert_allclose(est.weights_["intercept"], [intercept], rtol=1e-10, atol=1e-14)
