"""Validation data: eval_set / X_val, the validation curves, early stopping
on the validation loss or score, and the route through a Pipeline."""

import numpy as np
import pytest
import sklearn
from sklearn.datasets import load_diabetes, load_digits
from sklearn.metrics import accuracy_score, r2_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from onnxfit import OnnxSGDClassifier, OnnxSGDRegressor

ENGINES = ["fused", "forward_backward"]


def _diabetes_split():
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    y = (y - y.mean()) / y.std()
    return X[:330], y[:330], X[330:], y[330:]


@pytest.mark.parametrize("engine", ENGINES)
def test_curves_have_one_entry_per_epoch_and_are_the_validation_values(engine):
    X, y, X_val, y_val = _diabetes_split()
    est = OnnxSGDRegressor(engine=engine, max_iter=7, tol=None, random_state=0,
                           penalty=None)
    est.fit(X, y, eval_set=[(X_val, y_val)])
    assert len(est.loss_curve_) == len(est.validation_loss_curve_) == len(
        est.validation_scores_) == est.n_iter_ == 7
    # the last entries are those of the final weights
    assert est.validation_scores_[-1] == pytest.approx(r2_score(y_val, est.predict(X_val)),
                                                       rel=1e-6)
    mse = np.mean((est.predict(X_val) - y_val) ** 2)
    assert est.validation_loss_curve_[-1] == pytest.approx(mse / 2, rel=1e-6)
    np.testing.assert_allclose(est.validation_loss_curve_[-1],
                               est.losses(X_val, y_val).mean(), rtol=1e-12)


def test_x_val_y_val_equal_eval_set():
    X, y, X_val, y_val = _diabetes_split()
    a = OnnxSGDRegressor(max_iter=3, tol=None, random_state=0).fit(
        X, y, eval_set=[(X_val, y_val)])
    b = OnnxSGDRegressor(max_iter=3, tol=None, random_state=0).fit(X, y, X_val=X_val,
                                                                  y_val=y_val)
    assert a.validation_loss_curve_ == b.validation_loss_curve_
    assert a.validation_scores_ == b.validation_scores_


def test_partial_fit_records_one_entry_per_call():
    X, y, X_val, y_val = _diabetes_split()
    est = OnnxSGDRegressor(random_state=0)
    for _ in range(3):
        est.partial_fit(X, y, eval_set=[(X_val, y_val)])
    assert len(est.validation_loss_curve_) == len(est.validation_scores_) == 3


def test_validation_data_does_not_change_training():
    X, y, X_val, y_val = _diabetes_split()
    a = OnnxSGDRegressor(max_iter=4, tol=None, random_state=0).fit(X, y)
    b = OnnxSGDRegressor(max_iter=4, tol=None, random_state=0).fit(
        X, y, eval_set=[(X_val, y_val)])
    for name in a.weights_:
        np.testing.assert_array_equal(a.weights_[name], b.weights_[name])
    assert a.validation_loss_curve_ is None


@pytest.mark.parametrize("scoring", ["loss", None, "neg_mean_absolute_error"])
def test_early_stopping_on_validation_data_keeps_the_best_epoch(scoring):
    # A rate large enough to make the validation values wander: the
    # estimator ends on the weights of the best recorded epoch.
    X, y, X_val, y_val = _diabetes_split()
    est = OnnxSGDRegressor(learning_rate="sgd", eta0=0.05, schedule="constant",
                           early_stopping=True, n_iter_no_change=3, tol=0.0, max_iter=40,
                           random_state=0, scoring=scoring)
    est.fit(X, y, eval_set=[(X_val, y_val)])
    if scoring == "loss":
        curve = est.validation_loss_curve_
        best = int(np.argmin(curve))
        final = est.losses(X_val, y_val).mean()
        assert final == pytest.approx(curve[best], rel=1e-9)
    else:
        curve = est.validation_scores_
        best = int(np.argmax(curve))
        if scoring is None:
            final = r2_score(y_val, est.predict(X_val))
        else:
            final = -np.mean(np.abs(y_val - est.predict(X_val)))
        assert final == pytest.approx(curve[best], rel=1e-9)
    # it stopped n_iter_no_change epochs after the best one
    assert est.n_iter_ == best + 1 + 3 or est.n_iter_ == 40
    assert best + 1 < est.n_iter_


def test_early_stopping_without_validation_data_holds_out_a_fraction():
    X, y, _, _ = _diabetes_split()
    est = OnnxSGDRegressor(early_stopping=True, max_iter=30, random_state=0,
                           scoring="loss").fit(X, y)
    assert len(est.validation_loss_curve_) == est.n_iter_
    assert len(est.validation_scores_) == est.n_iter_


def test_classifier_validation_score_is_accuracy():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    est = OnnxSGDClassifier(max_iter=3, tol=None, random_state=0)
    est.fit(X[:1200], y[:1200], eval_set=[(X[1200:], y[1200:])])
    assert est.validation_scores_[-1] == pytest.approx(
        accuracy_score(y[1200:], est.predict(X[1200:])))
    assert len(est.validation_loss_curve_) == 3
    # the validation loss is the log loss of the predicted probabilities
    proba = est.predict_proba(X[1200:])
    log_loss = -np.mean(np.log(proba[np.arange(len(proba)), y[1200:]]))
    assert est.validation_loss_curve_[-1] == pytest.approx(log_loss, rel=1e-4)


def test_bad_validation_arguments():
    X, y, X_val, y_val = _diabetes_split()
    est = OnnxSGDRegressor(max_iter=2)
    with pytest.raises(ValueError, match="one \\(X_val, y_val\\) pair"):
        est.fit(X, y, eval_set=[(X_val, y_val), (X_val, y_val)])
    with pytest.raises(ValueError, match="give both or neither"):
        est.fit(X, y, X_val=X_val)
    with pytest.raises(ValueError, match="once"):
        est.fit(X, y, eval_set=[(X_val, y_val)], X_val=X_val, y_val=y_val)
    with pytest.raises(ValueError, match="features"):
        est.fit(X, y, eval_set=[(X_val[:, :3], y_val)])
    bad = y_val.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="y_val"):
        est.fit(X, y, eval_set=[(X_val, bad)])
    assert not hasattr(est, "weights_")


def test_through_a_pipeline_with_metadata_routing():
    X, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    X_train, y_train, X_val, y_val = X[:330], y[:330], X[330:], y[330:]
    with sklearn.config_context(enable_metadata_routing=True):
        regressor = OnnxSGDRegressor(max_iter=5, tol=None, random_state=0).set_fit_request(
            X_val=True, y_val=True)
        pipe = Pipeline([("scale", StandardScaler()), ("sgd", regressor)],
                        transform_input=["X_val"])
        pipe.fit(X_train, y_train, X_val=X_val, y_val=y_val)
    fitted = pipe[-1]
    assert len(fitted.validation_scores_) == 5
    # X_val went through the scaler: the recorded score is the pipeline's
    assert fitted.validation_scores_[-1] == pytest.approx(pipe.score(X_val, y_val), rel=1e-6)


def test_eval_set_through_a_pipeline_on_already_scaled_data():
    X, y, X_val, y_val = _diabetes_split()
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = make_pipeline(OnnxSGDRegressor(max_iter=3, tol=None).set_fit_request(
            eval_set=True))
        pipe.fit(X, y, eval_set=[(X_val, y_val)])
    assert len(pipe[-1].validation_loss_curve_) == 3


def test_curves_stay_one_entry_per_epoch_when_some_calls_have_no_validation_data():
    X, y, X_val, y_val = _diabetes_split()
    est = OnnxSGDRegressor(random_state=0)
    est.partial_fit(X, y)
    est.partial_fit(X, y, eval_set=[(X_val, y_val)])
    est.partial_fit(X, y)
    est.partial_fit(X, y, eval_set=[(X_val, y_val)])
    assert len(est.validation_loss_curve_) == len(est.validation_scores_) == 4
    assert np.isnan(est.validation_loss_curve_[0]) and np.isnan(est.validation_scores_[2])
    assert np.isfinite(est.validation_loss_curve_[3])


def test_a_misspelt_scorer_fails_before_training():
    X, y, X_val, y_val = _diabetes_split()
    est = OnnxSGDRegressor(scoring="no_such_scorer", early_stopping=True)
    with pytest.raises(ValueError, match="no_such_scorer"):
        est.fit(X, y)
    assert not hasattr(est, "weights_")
