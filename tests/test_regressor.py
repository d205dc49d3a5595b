"""OnnxSGDRegressor acceptance: exactness of the training engines against numpy,
quality on load_diabetes, fine-tuning a converted MLPRegressor, export,
model selection, bad input, and the fit/partial_fit/persistence protocol."""

import pickle
import warnings

import joblib
import numpy as np
import onnxruntime
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from onnx import TensorProto, helper
from sklearn.base import clone
from sklearn.datasets import load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import SGDRegressor
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, ShuffleSplit, cross_val_score, train_test_split
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state

from onnxfit import (
    ConvergenceError,
    LearningRateSGD,
    LearningRateSGDNesterov,
    OnnxSGDRegressor,
)
from tests.graphs import convert, gemm_mlp_graph


def _linear_data(n=30, p=4, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    y = X @ rng.normal(size=p) + 0.7 + noise * rng.normal(size=n)
    return X, y


def _scaled_diabetes():
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    return X, (y - y.mean()) / y.std()


def _session_predict(model, X):
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    inp = session.get_inputs()[0]
    X = X.astype(np.float64 if "double" in inp.type else np.float32)
    return session.run(None, {inp.name: X})[0]


# -- exactness of the training engines (the fused one, and forward_backward) -----

def _numpy_sgd(X, y, sw, batches, rates, alpha, momentum=0.0, nesterov=False):
    """Mini-batch SGD on mean_i sw_i 0.5 (X w + b - y)^2 + alpha/2 |w|^2 over
    each batch, bias unpenalised.  Returns weights and the loss of each step
    (before its update)."""
    w, b = np.zeros(X.shape[1]), 0.0
    vw, vb = np.zeros_like(w), 0.0
    step_losses = []
    for idx, eta in zip(batches, rates):
        Xb, yb, swb = X[idx], y[idx], sw[idx]
        r = Xb @ w + b - yb
        step_losses.append(np.mean(swb * 0.5 * r**2) + 0.5 * alpha * w @ w)
        gw = Xb.T @ (swb * r) / len(idx) + alpha * w
        gb = np.sum(swb * r) / len(idx)
        vw, vb = momentum * vw - eta * gw, momentum * vb - eta * gb
        if nesterov:
            w, b = w + momentum * vw - eta * gw, b + momentum * vb - eta * gb
        else:
            w, b = w + vw, b + vb
    return w, b, step_losses


@pytest.mark.parametrize(
    "learning_rate, momentum, nesterov",
    [
        (LearningRateSGD(eta0=0.05, schedule="constant"), 0.0, False),
        (LearningRateSGDNesterov(eta0=0.05, momentum=0.9, schedule="constant"), 0.9, True),
        (LearningRateSGDNesterov(eta0=0.05, momentum=0.7, nesterov=False, schedule="constant"), 0.7, False),
    ],
    ids=["sgd", "nesterov", "momentum"],
)
@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_full_batch_steps_equal_numpy(learning_rate, momentum, nesterov, engine):
    X, y = _linear_data()
    sw = np.random.default_rng(1).uniform(0.5, 2.0, size=len(y))
    alpha = 0.01
    est = OnnxSGDRegressor(
        learning_rate=learning_rate, penalty="l2", alpha=alpha, batch_size=len(y),
        shuffle=False, max_iter=3, tol=None, engine=engine,
    ).fit(X, y, sample_weight=sw)
    everything = np.arange(len(y))
    w, b, losses = _numpy_sgd(X, y, sw, [everything] * 3, [0.05] * 3, alpha, momentum, nesterov)
    assert est.dtype_ == np.float64
    assert_allclose(est.weights_["coef"].ravel(), w, rtol=1e-10, atol=1e-13)
    assert_allclose(est.weights_["intercept"], [b], rtol=1e-10, atol=1e-13)
    assert_allclose(est.loss_curve_, losses, rtol=1e-10)
    assert (est.n_iter_, est.t_) == (3, 3)


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_mini_batches_with_partial_last_batch_equal_numpy(engine):
    """shuffle=False, 23 samples in batches of 5: 5+5+5+5+3, two epochs, an
    invscaling rate advanced per update (t = 1..10)."""
    X, y = _linear_data(n=23)
    sw = np.random.default_rng(2).uniform(0.5, 2.0, size=len(y))
    alpha, eta0, power_t = 0.02, 0.1, 0.5
    est = OnnxSGDRegressor(
        learning_rate=LearningRateSGD(eta0=eta0, schedule="invscaling", power_t=power_t),
        penalty="l2", alpha=alpha, batch_size=5, shuffle=False, max_iter=2, tol=None,
        engine=engine,
    ).fit(X, y, sample_weight=sw)
    batches = [np.arange(s, min(s + 5, 23)) for s in range(0, 23, 5)] * 2
    rates = eta0 / np.arange(1, 11) ** power_t
    w, b, step_losses = _numpy_sgd(X, y, sw, batches, rates, alpha)
    assert_allclose(est.weights_["coef"].ravel(), w, rtol=1e-10, atol=1e-13)
    assert_allclose(est.weights_["intercept"], [b], rtol=1e-10, atol=1e-13)
    assert (est.n_iter_, est.t_) == (2, 10)
    sizes = np.array([len(i) for i in batches])
    epoch_losses = [
        np.sum(sizes[k:k + 5] * np.array(step_losses[k:k + 5])) / 23 for k in (0, 5)
    ]
    assert_allclose(est.loss_curve_, epoch_losses, rtol=1e-10)


def test_multi_output_equals_one_fit_per_output():
    """The loss sums over outputs, so each column of coef follows its own
    single-output fit exactly."""
    X, _ = _linear_data(n=40, p=5)
    Y = X @ np.random.default_rng(3).normal(size=(5, 3)) + np.array([1.0, -1.0, 0.0])
    common = dict(batch_size=8, shuffle=False, max_iter=4, tol=None)
    est = OnnxSGDRegressor(**common).fit(X, Y)
    assert est.weights_["coef"].shape == (5, 3)
    assert est.predict(X).shape == (40, 3)
    for j in range(3):
        single = OnnxSGDRegressor(**common).fit(X, Y[:, j])
        assert_allclose(est.weights_["coef"][:, j], single.weights_["coef"][:, 0], rtol=1e-10)
        assert_allclose(est.weights_["intercept"][j], single.weights_["intercept"][0], rtol=1e-10)


def test_multi_output_fits_well():
    X, _ = _linear_data(n=200, p=5)
    Y = X @ np.random.default_rng(4).normal(size=(5, 3)) + np.array([1.0, -1.0, 0.0])
    est = OnnxSGDRegressor(
        learning_rate=LearningRateSGD(eta0=0.1), random_state=0, max_iter=50, tol=None
    ).fit(X, Y)
    assert est.predict(X).shape == (200, 3)
    assert est.score(X, Y) > 0.99
    assert_allclose(est.predict(X[:5]), _session_predict(est.to_onnx(), X[:5]), rtol=1e-12)


def test_sample_weight_two_for_half_zero_for_rest_equals_fitting_the_half():
    """Full batch, no shuffling: weights 2/0 give the same mean loss, hence
    the same updates, as the kept half with unit weights."""
    X, y = _linear_data(n=40)
    keep = np.zeros(40, dtype=bool)
    keep[np.random.default_rng(5).permutation(40)[:20]] = True
    sw = np.where(keep, 2.0, 0.0)
    common = dict(batch_size=1000, shuffle=False, max_iter=5, tol=None, alpha=0.01)
    weighted = OnnxSGDRegressor(**common).fit(X, y, sample_weight=sw)
    half = OnnxSGDRegressor(**common).fit(X[keep], y[keep])
    assert_allclose(weighted.weights_["coef"], half.weights_["coef"], rtol=1e-12)
    assert_allclose(weighted.weights_["intercept"], half.weights_["intercept"], rtol=1e-12)
    unweighted = OnnxSGDRegressor(**common).fit(X, y)
    assert not np.allclose(unweighted.weights_["coef"], half.weights_["coef"])


# -- quality ---------------------------------------------------------------------------

def test_diabetes_pipeline_matches_sgdregressor():
    X, y = load_diabetes(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    ours = make_pipeline(StandardScaler(), OnnxSGDRegressor(random_state=0)).fit(X_train, y_train)
    theirs = make_pipeline(StandardScaler(), SGDRegressor(random_state=0)).fit(X_train, y_train)
    ours_r2 = ours.score(X_test, y_test)
    assert ours_r2 >= theirs.score(X_test, y_test) - 0.02
    assert ours_r2 > 0.3


def test_converted_mlp_regressor_is_fine_tuned_and_exported():
    X, y = _scaled_diabetes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPRegressor(hidden_layer_sizes=(16,), max_iter=5, random_state=0).fit(X, y)
    onx = convert(mlp, X)
    original = onx.SerializeToString()
    before = np.mean((_session_predict(onx, X).ravel() - y) ** 2)
    assert before == pytest.approx(np.mean((mlp.predict(X) - y) ** 2), rel=1e-4)
    est = OnnxSGDRegressor(
        onnx_model=onx, learning_rate=LearningRateSGDNesterov(), random_state=0,
        max_iter=20, tol=None,
    ).fit(X, y)
    assert onx.SerializeToString() == original
    assert est.weights_to_train_ == ["coefficient", "intercepts", "coefficient1", "intercepts1"]
    after = np.mean((est.predict(X) - y) ** 2)
    assert after < 0.6 * before
    assert est.loss_curve_[-1] < est.loss_curve_[0]
    exported = _session_predict(est.to_onnx(), X)
    assert_allclose(exported.ravel(), est.predict(X), rtol=1e-6)


def test_export_reproduces_predict_for_default_and_gemm_models():
    X, y = _linear_data(n=50, p=4)
    default = OnnxSGDRegressor(random_state=0, max_iter=5, tol=None).fit(X, y)
    assert_allclose(_session_predict(default.to_onnx(), X).ravel(), default.predict(X), rtol=1e-6)

    gemm = OnnxSGDRegressor(
        gemm_mlp_graph(4, (8, 8), 1, activation="Tanh"), random_state=0, max_iter=5, tol=None,
    ).fit(X, y)
    assert gemm.weights_to_train_ == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert gemm.weights_["0.weight"].shape == (8, 4)
    assert_allclose(_session_predict(gemm.to_onnx(), X).ravel(), gemm.predict(X), rtol=1e-6)


# -- model selection ------------------------------------------------------------------

def test_grid_search_over_learning_rate_params():
    X, y = _scaled_diabetes()
    X, y = X[:150], y[:150]
    search = GridSearchCV(
        OnnxSGDRegressor(
            learning_rate=LearningRateSGDNesterov(), batch_size=16, random_state=0, max_iter=10,
            tol=None,
        ),
        {"learning_rate__eta0": [1e-5, 1e-2], "alpha": [1e-4, 1e-2]},
        n_jobs=2, error_score="raise", cv=3,
    ).fit(X, y)
    assert search.best_params_["learning_rate__eta0"] == 1e-2  # 1e-5 barely moves in 10 epochs
    assert search.best_params_["alpha"] in (1e-4, 1e-2)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert search.best_estimator_.learning_rate.eta0 == 1e-2
    assert search.best_score_ > 0.3
    assert search.predict(X).shape == (150,)


def test_pipeline_and_cross_val_score():
    X, y = load_diabetes(return_X_y=True)
    pipe = Pipeline([("scale", StandardScaler()), ("sgd", OnnxSGDRegressor(random_state=0))])
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,)
    assert scores.mean() > 0.35
    pipe.set_params(sgd__learning_rate=LearningRateSGDNesterov(eta0=0.001))
    assert pipe.fit(X, y).score(X, y) > 0.4


# -- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "where, value, match",
    [
        ("X", np.nan, "Input X contains NaN"),
        ("X", np.inf, "Input X contains infinity"),
        ("y", np.nan, "Input y contains NaN"),
        ("y", -np.inf, "Input y contains infinity"),
    ],
)
def test_non_finite_input_is_rejected(where, value, match):
    X, y = _linear_data()
    if where == "X":
        X[3, 1] = value
    else:
        y[5] = value
    with pytest.raises(ValueError, match=match):
        OnnxSGDRegressor(max_iter=2).fit(X, y)
    with pytest.raises(ValueError, match=match):
        OnnxSGDRegressor(max_iter=2).partial_fit(X, y)


def test_wrong_number_of_features_at_predict():
    X, y = _linear_data(p=4)
    est = OnnxSGDRegressor(max_iter=2, tol=None).fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but OnnxSGDRegressor is expecting 4"):
        est.predict(X[:, :3])
    with pytest.raises(ValueError, match="X has 5 features"):
        est.partial_fit(np.c_[X, X[:, 0]], y)


def test_empty_data():
    with pytest.raises(ValueError, match="0 sample"):
        OnnxSGDRegressor().fit(np.empty((0, 3)), np.empty(0))
    with pytest.raises(ValueError, match="0 feature"):
        OnnxSGDRegressor().fit(np.empty((5, 0)), np.zeros(5))


def test_bad_weights_and_untrainable_graph():
    X, y = _linear_data(p=4)
    with pytest.raises(ValueError, match=r"unknown initializers \['bogus'\].*'0.weight'"):
        OnnxSGDRegressor(gemm_mlp_graph(4, (3,), 1), weights_to_train=["bogus"]).fit(X, y)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])], "identity",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(ValueError, match="nothing can be trained"):
        OnnxSGDRegressor(model).fit(X, np.c_[y, y, y, y])


def test_target_shape_must_match_the_graph_output():
    X, y = _linear_data(p=4)
    with pytest.raises(ValueError, match="same number of values per sample"):
        OnnxSGDRegressor(gemm_mlp_graph(4, (3,), 1)).fit(X, np.c_[y, y])


def test_negative_sample_weight_is_rejected():
    X, y = _linear_data()
    sw = np.ones(len(y))
    sw[0] = -1
    with pytest.raises(ValueError, match="[Nn]egative"):
        OnnxSGDRegressor().fit(X, y, sample_weight=sw)


def test_divergence_is_reported():
    # A float32 overflow of the predictions makes the loss infinite: fit
    # says so (a ConvergenceError, a ValueError) instead of returning garbage.
    X, y = _linear_data()
    est = OnnxSGDRegressor(
        learning_rate=LearningRateSGD(eta0=1e4, schedule="constant"), max_iter=50, tol=None
    )
    with pytest.raises(ValueError, match="diverged at epoch 1"):
        est.fit((X * 1e18).astype(np.float32), y * 1e3)


def test_diverging_fit_that_stays_finite_is_caught():
    # Unscaled data and a large rate: the loss derivative is bounded at
    # 1e12 as in scikit-learn, so the loss stays finite while it explodes;
    # scikit-learn's SGDRegressor returns huge weights, onnxfit stops and
    # names the input scale.
    rng = np.random.RandomState(0)
    X = rng.normal(loc=100, size=(80, 2))
    y = rng.normal(size=80)
    from sklearn.linear_model import SGDRegressor

    reference = SGDRegressor(max_iter=5, tol=None, random_state=0).fit(X, y)
    assert np.abs(reference.coef_).max() > 1e6
    est = OnnxSGDRegressor(batch_size=1, max_iter=5, tol=None, random_state=0)
    with pytest.raises(ConvergenceError, match="X is far from unit scale") as info:
        est.fit(X, y)
    assert np.isfinite(info.value.loss) and info.value.loss > 1e6 * info.value.reference
    assert not hasattr(est, "weights_")


# -- fit / partial_fit protocol --------------------------------------------------------

def test_partial_fit_continues_training():
    X, y = _linear_data(n=64)
    est = OnnxSGDRegressor(batch_size=16, random_state=0)
    mse = []
    for k in range(1, 6):
        est.partial_fit(X, y)
        assert (est.n_iter_, est.t_) == (k, 4 * k)
        assert len(est.loss_curve_) == k
        mse.append(np.mean((est.predict(X) - y) ** 2))
    assert est.weights_["coef"].shape == (4, 1) and est.weights_["intercept"].shape == (1,)
    assert est.predict(X).shape == (64,)
    assert np.all(np.diff(mse) < 0)
    assert np.all(np.diff(est.loss_curve_) < 0)
    # fit starts again from scratch
    est.fit(X, y)
    assert len(est.loss_curve_) == est.n_iter_
    assert est.t_ == 4 * est.n_iter_


def test_partial_fit_equals_fit_epoch_by_epoch():
    X, y = _linear_data(n=30)
    common = dict(batch_size=7, shuffle=False, tol=None)
    fitted = OnnxSGDRegressor(max_iter=3, **common).fit(X, y)
    stepped = OnnxSGDRegressor(**common)
    for _ in range(3):
        stepped.partial_fit(X, y)
    assert_allclose(stepped.weights_["coef"], fitted.weights_["coef"], rtol=1e-14)
    assert stepped.t_ == fitted.t_ == 15


def test_warm_start_continues_from_previous_weights():
    X, y = _linear_data(n=30)
    # (learning_rate named: 'auto' would pick Adam for the exported graph)
    common = dict(random_state=0, batch_size=8, max_iter=3, tol=None, learning_rate="sgd")
    warm = OnnxSGDRegressor(warm_start=True, **common).fit(X, y)
    first = {k: v.copy() for k, v in warm.weights_.items()}
    warm.fit(X, y)
    # the same as a new estimator starting from the exported first fit
    first_fit = OnnxSGDRegressor(**common).fit(X, y).to_onnx()
    restarted = OnnxSGDRegressor(first_fit, **common).fit(X, y)
    for name in first:
        assert not np.array_equal(warm.weights_[name], first[name])
        assert_allclose(warm.weights_[name], restarted.weights_[name], rtol=1e-12)
    cold = OnnxSGDRegressor(**common).fit(X, y).fit(X, y)
    for name in first:
        np.testing.assert_array_equal(cold.weights_[name], first[name])


def test_early_stopping_restores_the_best_weights():
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)[:200]
    y = y[:200]
    est = OnnxSGDRegressor(
        random_state=0, early_stopping=True, validation_fraction=0.2, batch_size=8,
        learning_rate=LearningRateSGD(eta0=0.05, schedule="constant"),
        n_iter_no_change=3, max_iter=100,
    ).fit(X, y)
    scores = est.validation_scores_
    assert len(scores) == est.n_iter_ == len(est.loss_curve_)
    assert est.n_iter_ < 100
    best = int(np.argmax(scores))
    assert best < len(scores) - 1  # the last epoch was worse: restoring matters
    # the validation split: a ShuffleSplit drawn first from random_state
    _, val = next(
        ShuffleSplit(test_size=0.2, random_state=check_random_state(0)).split(X)
    )
    assert len(val) == 40
    assert r2_score(y[val], est.predict(X[val])) == pytest.approx(scores[best], rel=1e-12)
    assert r2_score(y[val], est.predict(X[val])) > scores[-1]


def test_random_state_reproducibility():
    X, y = _linear_data(n=50)
    a = OnnxSGDRegressor(random_state=0, max_iter=5, tol=None, batch_size=8).fit(X, y)
    b = OnnxSGDRegressor(random_state=0, max_iter=5, tol=None, batch_size=8).fit(X, y)
    c = OnnxSGDRegressor(random_state=1, max_iter=5, tol=None, batch_size=8).fit(X, y)
    np.testing.assert_array_equal(a.weights_["coef"], b.weights_["coef"])
    assert a.loss_curve_ == b.loss_curve_
    assert not np.array_equal(a.weights_["coef"], c.weights_["coef"])
    a.fit(X, y)  # refitting draws the same shuffles again
    np.testing.assert_array_equal(a.weights_["coef"], b.weights_["coef"])


def test_tol_none_runs_exactly_max_iter_epochs():
    X, y = _linear_data(n=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = OnnxSGDRegressor(max_iter=7, tol=None, batch_size=10, random_state=0).fit(X, y)
    assert est.n_iter_ == 7 and len(est.loss_curve_) == 7 and est.t_ == 35


def test_tol_stops_when_the_loss_stalls():
    X, y = _linear_data(n=50)
    est = OnnxSGDRegressor(
        tol=1e-3, n_iter_no_change=4, max_iter=1000, random_state=0,
        learning_rate=LearningRateSGD(eta0=0.05, schedule="constant"),
    ).fit(X, y)
    curve = est.loss_curve_
    assert 4 < est.n_iter_ < 1000
    for j in range(len(curve) - 4, len(curve)):  # no improvement by tol in the last 4
        assert curve[j] >= min(curve[:j]) - 1e-3


def test_convergence_warning_when_max_iter_is_reached():
    X, y = _linear_data()
    with pytest.warns(ConvergenceWarning, match="Maximum number of epochs"):
        OnnxSGDRegressor(max_iter=2, tol=1e-3).fit(X, y)


def test_verbose_shows_a_progress_bar(capsys):
    X, y = _linear_data()
    OnnxSGDRegressor(verbose=1, max_iter=3, tol=None).fit(X, y)
    err = capsys.readouterr().err
    assert "OnnxSGDRegressor" in err and "loss=" in err and "3/3" in err
    OnnxSGDRegressor(verbose=0, max_iter=3, tol=None).fit(X, y)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_feature_names_are_recorded():
    X, y = _linear_data(p=3)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    est = OnnxSGDRegressor(max_iter=2, tol=None).fit(frame, y)
    assert list(est.feature_names_in_) == ["a", "b", "c"]
    assert est.n_features_in_ == 3
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        assert_allclose(est.predict(frame), est.predict(X))


# -- persistence -------------------------------------------------------------------------

def test_pickle_and_joblib_round_trips(tmp_path):
    X, y = _linear_data(n=40)
    est = OnnxSGDRegressor(random_state=0, max_iter=3, tol=None, batch_size=8).fit(X, y)
    data = pickle.dumps(est)  # right after fit
    assert b"onnxruntime" not in data
    prediction = est.predict(X)
    data = pickle.dumps(est)  # after predict built a session
    assert b"onnxruntime" not in data
    loaded = pickle.loads(data)
    assert_allclose(loaded.predict(X), prediction, rtol=0, atol=0)
    for name, value in est.weights_.items():
        np.testing.assert_array_equal(loaded.weights_[name], value)

    path = tmp_path / "est.joblib"
    joblib.dump(est, path)
    from_joblib = joblib.load(path)
    np.testing.assert_array_equal(from_joblib.predict(X), prediction)
    assert from_joblib.to_onnx().SerializeToString() == est.to_onnx().SerializeToString()

    # training continues identically after a round trip
    est.partial_fit(X, y)
    loaded.partial_fit(X, y)
    np.testing.assert_array_equal(loaded.weights_["coef"], est.weights_["coef"])
    assert loaded.t_ == est.t_


def test_pickle_of_a_model_with_a_user_graph():
    X, y = _linear_data(n=40, p=4)
    est = OnnxSGDRegressor(gemm_mlp_graph(4, (5,), 1), max_iter=2, tol=None).fit(X, y)
    est.predict(X)
    data = pickle.dumps(est)
    assert b"onnxruntime" not in data
    np.testing.assert_array_equal(pickle.loads(data).predict(X), est.predict(X))


def test_clone_gives_an_unfitted_estimator_with_the_same_params():
    X, y = _linear_data()
    est = OnnxSGDRegressor(alpha=0.01, batch_size=4, max_iter=3, tol=None, random_state=3).fit(X, y)
    cloned = clone(est)
    assert not hasattr(cloned, "weights_")
    assert cloned.get_params() == est.get_params()
    cloned.fit(X, y)
    np.testing.assert_array_equal(cloned.weights_["coef"], est.weights_["coef"])


@pytest.mark.parametrize("where", ["X", "y", "sample_weight"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused_by_name(where, bad):
    rng = np.random.default_rng(0)
    data = {"X": rng.normal(size=(40, 3)), "y": rng.normal(size=40),
            "sample_weight": np.ones(40)}
    data[where][7] = bad
    est = OnnxSGDRegressor(max_iter=2, tol=None)
    # A negative infinite weight is refused as negative first.
    message = f"Input {where} contains (NaN|infinity)|Negative values in data passed to `{where}`"
    with pytest.raises(ValueError, match=message):
        est.partial_fit(data["X"], data["y"], sample_weight=data["sample_weight"])
    assert not hasattr(est, "weights_")


def test_huge_finite_values_whose_sum_overflows_are_accepted():
    # The first pass of the finiteness check sums the array: an overflowing
    # sum of finite values must fall back to the exact check, not fail.
    X = np.full((20, 2), 3e38, dtype=np.float32)
    X[:, 1] = np.linspace(-1, 1, 20)
    assert not np.isfinite(np.einsum("ij->", X))
    est = OnnxSGDRegressor(max_iter=1, tol=None, batch_size=20, penalty=None,
                           learning_rate=LearningRateSGD(eta0=1e-30, schedule="constant"))
    # The data is accepted and trained on; one update on features of 3e38
    # sends the float32 predictions, and the loss, to infinity: the check of
    # the final weights says so (it used to go unnoticed).
    with pytest.raises(ConvergenceError, match="after its last step: the loss became inf"):
        est.fit(X, np.linspace(0, 1, 20))


def test_regression_batches_allocate_no_one_hot_rows():
    """One-hot rows are made only for labels given as column indices: a wide
    regression output must not pay width^2 memory per batch size."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)), rng.normal(size=(60, 3000))
    est = OnnxSGDRegressor(max_iter=1, tol=None, batch_size=25).fit(X, y)
    buffers = est._runtime.engine._buffers
    assert buffers and all(b._one_hot_rows is None for b in buffers.values())
