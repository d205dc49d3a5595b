"""State in and out (get_state / set_state, initial weights), per-sample
losses, gradient clipping, progress display and scikit-learn's callbacks."""

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits
from sklearn.preprocessing import StandardScaler

from onnxfit import LearningRateAdam, OnnxSGDClassifier, OnnxSGDRegressor
from tests.graphs import gemm_mlp_graph

ENGINES = ["fused", "forward_backward"]


def _diabetes():
    X, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(X), (y - y.mean()) / y.std()


def _mlp(n_features=10, hidden=8):
    return gemm_mlp_graph(n_features, (hidden,), 1)


def _assert_same_weights(a, b):
    assert set(a.weights_) == set(b.weights_)
    for name in a.weights_:
        np.testing.assert_array_equal(a.weights_[name], b.weights_[name])


# -- get_state / set_state --------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", ["adam", "nesterov", "rmsprop"])
def test_continuing_after_set_state_equals_never_stopping(engine, rule):
    X, y = _diabetes()
    params = dict(learning_rate=rule, engine=engine, random_state=0, batch_size=16)
    straight = OnnxSGDRegressor(_mlp(), **params)
    for _ in range(4):
        straight.partial_fit(X, y)

    first = OnnxSGDRegressor(_mlp(), **params)
    for _ in range(2):
        first.partial_fit(X, y)
    state = first.get_state()
    # another estimator of the same graph, fitted differently, takes it over
    other = OnnxSGDRegressor(_mlp(), **{**params, "random_state": 7}).partial_fit(X[:50], y[:50])
    other.set_state(state)
    for _ in range(2):
        other.partial_fit(X, y)
    _assert_same_weights(straight, other)
    assert other.n_iter_ == straight.n_iter_ and other.t_ == straight.t_
    for weight, states in straight._update_state.items():
        for name, value in states.items():
            np.testing.assert_array_equal(other._update_state[weight][name], value)


def test_get_state_is_a_copy_and_set_state_keeps_no_reference():
    X, y = _diabetes()
    est = OnnxSGDRegressor(learning_rate="adam", max_iter=2, tol=None,
                           random_state=0).fit(X, y)
    state = est.get_state()
    assert set(state) == {"weights", "update_state", "running_statistics", "schedule",
                          "n_iter", "t", "random_state"}
    assert set(state["update_state"]["coef"]) == set(LearningRateAdam().state_names)
    state["weights"]["coef"][:] = 0
    assert np.any(est.weights_["coef"] != 0)
    est.set_state(state)
    state["weights"]["coef"][:] = 5
    assert np.all(est.weights_["coef"] == 0)
    np.testing.assert_array_equal(est.get_state()["weights"]["coef"], 0)


def test_set_state_round_trip_is_bit_identical():
    X, y = _diabetes()
    est = OnnxSGDRegressor(_mlp(), learning_rate="adam", max_iter=2, tol=None,
                           random_state=0).fit(X, y)
    before = est.get_state()
    predictions = est.predict(X)
    est.set_state(before)
    after = est.get_state()
    for name in before["weights"]:
        np.testing.assert_array_equal(before["weights"][name], after["weights"][name])
    np.testing.assert_array_equal(est.predict(X), predictions)


def test_set_state_refuses_what_does_not_fit():
    X, y = _diabetes()
    est = OnnxSGDRegressor(learning_rate="adam", max_iter=1, tol=None).fit(X, y)
    state = est.get_state()
    with pytest.raises(ValueError, match="misses weights"):
        est.set_state({"weights": {"coef": state["weights"]["coef"]}})
    with pytest.raises(ValueError, match="shape"):
        est.set_state({"weights": {**state["weights"], "coef": np.zeros((3, 1))}})
    with pytest.raises(ValueError, match="update rule"):
        est.set_state({**state, "update_state": {w: {"velocity": v} for w, v in
                                                 state["weights"].items()}})
    with pytest.raises(ValueError, match="Unknown state entries"):
        est.set_state({**state, "epoch": 3})
    nan = {k: v.copy() for k, v in state["weights"].items()}
    nan["coef"][0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.set_state({"weights": nan})
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        OnnxSGDRegressor().set_state(state)


def test_fit_accepts_initial_weights():
    X, y = _diabetes()
    start = {"coef": np.full((10, 1), 0.5), "intercept": np.array([1.0])}
    a = OnnxSGDRegressor(max_iter=1, tol=None, random_state=0, shuffle=False)
    a.fit(X, y, initial_weights=start)
    b = OnnxSGDRegressor(max_iter=1, tol=None, random_state=0, shuffle=False)
    b.fit(X, y)
    assert not np.allclose(a.weights_["coef"], b.weights_["coef"])
    # the same as continuing from those weights
    c = OnnxSGDRegressor(max_iter=1, tol=None, random_state=0, shuffle=False).fit(X[:5], y[:5])
    c.set_state({"weights": start, "schedule": {"t": 0}, "n_iter": 0, "t": 0})
    c.partial_fit(X, y)
    _assert_same_weights(a, c)
    np.testing.assert_array_equal(start["coef"], 0.5)  # not mutated
    with pytest.raises(ValueError, match="does not train"):
        OnnxSGDRegressor().fit(X, y, initial_weights={"W": np.zeros(3)})


# -- per-sample losses --------------------------------------------------------------

def test_losses_are_each_samples_loss():
    X, y = _diabetes()
    est = OnnxSGDRegressor(max_iter=3, tol=None, random_state=0).fit(X, y)
    losses = est.losses(X, y)
    np.testing.assert_allclose(losses, 0.5 * (est.predict(X) - y) ** 2, rtol=1e-10)
    weights = np.linspace(0, 2, len(y))
    np.testing.assert_allclose(est.losses(X, y, sample_weight=weights), losses * weights)
    # the hardest example is the one predicted worst
    assert np.argmax(losses) == np.argmax(np.abs(est.predict(X) - y))


def test_classifier_losses_are_the_log_loss_of_each_sample():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    est = OnnxSGDClassifier(max_iter=3, tol=None, random_state=0).fit(X, y)
    proba = est.predict_proba(X)
    expected = -np.log(proba[np.arange(len(y)), y])
    np.testing.assert_allclose(est.losses(X, y), expected, rtol=1e-4, atol=1e-6)


def test_losses_of_a_training_batch_match_the_training_objective():
    # The loss piece is the one training minimises: on a batch of every
    # sample, at fixed weights, the mean of losses() is the data loss the
    # engine reports for a step with a zero learning rate.
    X, y = _diabetes()
    est = OnnxSGDRegressor(penalty=None, batch_size=len(X), max_iter=1, tol=None,
                           learning_rate="sgd", eta0=1e-12, schedule="constant",
                           random_state=0).fit(X, y)
    before = est.losses(X, y).mean()
    est.partial_fit(X, y)
    assert est.loss_curve_[-1] == pytest.approx(before, rel=1e-9)


# -- gradient clipping -----------------------------------------------------------------

def _numpy_clipped_sgd(X, y, coef, intercept, eta, max_norm, steps):
    """Plain SGD on the squared loss with torch's clip_grad_norm_ rule."""
    for k in range(steps):
        x, t = X[k:k + 1], y[k:k + 1]
        d = x @ coef + intercept - t[:, None]
        g_coef = x.T @ d
        g_int = d.sum(axis=0)
        norm = np.sqrt((g_coef ** 2).sum() + (g_int ** 2).sum())
        factor = min(1.0, max_norm / (norm + 1e-6))
        coef = coef - eta * factor * g_coef
        intercept = intercept - eta * factor * g_int
    return coef, intercept


@pytest.mark.parametrize("engine", ENGINES)
def test_max_grad_norm_clips_the_global_norm_like_torch(engine):
    X, y = _diabetes()
    y = y * 50  # large residuals: every gradient is clipped
    est = OnnxSGDRegressor(learning_rate="sgd", eta0=0.01, schedule="constant",
                           max_grad_norm=0.5, penalty=None, batch_size=1, shuffle=False,
                           engine=engine, random_state=0)
    for k in range(20):
        est.partial_fit(X[k:k + 1], y[k:k + 1])
    coef, intercept = _numpy_clipped_sgd(X, y, np.zeros((10, 1)), np.zeros(1), 0.01, 0.5, 20)
    np.testing.assert_allclose(est.weights_["coef"], coef, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(est.weights_["intercept"], intercept, rtol=1e-10)


def test_max_grad_norm_keeps_a_diverging_rate_finite():
    X, y = _diabetes()
    with pytest.raises(ValueError, match="diverged"):
        OnnxSGDRegressor(learning_rate="sgd", eta0=5.0, schedule="constant", max_iter=3,
                         random_state=0).fit(X, y)
    est = OnnxSGDRegressor(learning_rate="sgd", eta0=5.0, schedule="constant", max_iter=3,
                           random_state=0, max_grad_norm=0.01, tol=None).fit(X, y)
    assert all(np.isfinite(est.loss_curve_))


def test_max_grad_norm_against_torch():
    torch = pytest.importorskip("torch", reason="compares with torch.nn.utils.clip_grad_norm_")
    X, y = _diabetes()
    X, y = X[:32], y[:32] * 20
    est = OnnxSGDRegressor(learning_rate="adam", eta0=0.01, max_grad_norm=1.0, penalty=None,
                           batch_size=8, shuffle=False, random_state=0, max_iter=3, tol=None)
    est.fit(X, y)
    lin = torch.nn.Linear(10, 1, dtype=torch.float64)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    for _ in range(3):
        for k in range(0, 32, 8):
            opt.zero_grad()
            loss = 0.5 * ((lin(Xt[k:k + 8])[:, 0] - yt[k:k + 8]) ** 2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0)
            opt.step()
    np.testing.assert_allclose(est.weights_["coef"][:, 0], lin.weight.detach().numpy()[0],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(est.weights_["intercept"], lin.bias.detach().numpy(),
                               rtol=1e-9, atol=1e-12)


# -- progress and callbacks ---------------------------------------------------------------

def test_verbose_two_shows_a_bar_per_epoch_of_updates(capsys):
    X, y = _diabetes()
    OnnxSGDRegressor(verbose=2, max_iter=2, tol=None, batch_size=64).fit(X, y)
    err = capsys.readouterr().err
    assert "updates" in err and "epoch" in err


callback = pytest.importorskip("sklearn.callback", reason="scikit-learn >= 1.9 has callbacks")


@pytest.mark.parametrize("make", [
    lambda: (OnnxSGDRegressor(max_iter=4, tol=None, random_state=0), _diabetes()),
    lambda: (OnnxSGDClassifier(max_iter=4, tol=None, random_state=0),
             (load_digits().data[:300] / 16, load_digits().target[:300])),
], ids=["regressor", "classifier"])
def test_scoring_monitor_sees_every_epoch(make):
    est, (X, y) = make()
    scoring = "r2" if isinstance(est, OnnxSGDRegressor) else "accuracy"
    monitor = callback.ScoringMonitor(scoring=scoring)
    est.set_callbacks(monitor)
    est.fit(X, y)
    rows = monitor.get_logs().data
    epochs = [r for r in rows if r["task_name"] == "epoch"]
    assert len(epochs) == 4
    assert epochs[-1][scoring] == pytest.approx(est.score(X, y), rel=1e-6)


@pytest.mark.parametrize("cls", [OnnxSGDRegressor, OnnxSGDClassifier])
def test_progress_bar_runs(cls):
    pytest.importorskip("rich", reason="scikit-learn's ProgressBar draws with rich")
    X, y = _diabetes()
    if cls is OnnxSGDClassifier:
        y = (y > 0).astype(int)
    est = cls(max_iter=3, tol=None, random_state=0).set_callbacks(callback.ProgressBar())
    est.fit(X, y)
    assert est.n_iter_ == 3


def test_a_callback_can_stop_training():
    class StopAfterTwo:
        def setup(self, estimator, context):
            self.ends = 0

        def on_fit_task_begin(self, estimator, context):
            pass

        def on_fit_task_end(self, estimator, context, *, fitted_estimator):
            if context.task_name == "epoch":
                self.ends += 1
                # the fitted estimator predicts with the epoch's weights
                assert np.all(np.isfinite(fitted_estimator.predict(X[:3])))
                return self.ends >= 2
            return False

        def teardown(self, estimator, context):
            pass

    X, y = _diabetes()
    est = OnnxSGDRegressor(max_iter=10, tol=None, random_state=0).set_callbacks(StopAfterTwo())
    est.fit(X, y)
    assert est.n_iter_ == 2


def test_a_bound_beyond_the_dtype_range_clips_nothing():
    X, y = _diabetes()
    a = OnnxSGDRegressor(max_grad_norm=1e300, max_iter=2, tol=None, random_state=0).fit(
        X.astype(np.float32), y)
    b = OnnxSGDRegressor(max_iter=2, tol=None, random_state=0).fit(X.astype(np.float32), y)
    _assert_same_weights(a, b)
