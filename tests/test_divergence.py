"""Divergence: a non-finite or exploding loss stops training with a
ConvergenceError that names the likely cause, and leaves the estimator
exactly as it was before the call (or warns and keeps the last good
epoch with on_divergence='warn')."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.preprocessing import StandardScaler

from onnxfit import ConvergenceError, LearningRateSGD, OnnxSGDClassifier, OnnxSGDRegressor
from onnxfit.divergence import DIVERGENCE_FACTOR, REFERENCE_FLOOR, loss_limit

ENGINES = ["fused", "forward_backward"]


def _diabetes():
    X, y = load_diabetes(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def _standard(y):
    return (y - y.mean()) / y.std()


def _fitted_state(est):
    """Everything of the estimator that training could change (all but its
    parameters and onnxruntime caches)."""
    params = set(est.get_params(deep=False))
    return {k: v for k, v in vars(est).items() if k not in params and k != "_runtime"}


def _assert_unchanged(est, before):
    """``est`` holds exactly the state ``before``: arrays compared one by
    one (bit for bit), the rest through its pickled bytes."""
    after = _fitted_state(est)
    assert set(after) == set(before)
    for name, value in before.items():
        if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
            assert set(after[name]) == set(value), name
            for key, array in value.items():
                np.testing.assert_array_equal(after[name][key], array, err_msg=f"{name}[{key}]")
        else:
            assert pickle.dumps(after[name]) == pickle.dumps(value), name


def _copied_state(est):
    return pickle.loads(pickle.dumps(_fitted_state(est)))


def _unit_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3)).astype(np.float32)
    return X, X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=60)


# cause -> (bad data from good data, parameters that diverge, message, named cause)
DIVERGENCES = {
    # float32 predictions overflow: the loss is inf or nan
    "non-finite": (lambda X, y: ((X * 1e30).astype(np.float32), y), {"eta0": 1e4},
                   r"the loss became (nan|inf)", "X is far from unit scale"),
    # the bounded squared-error derivative keeps the loss finite while it explodes
    "exploding": (lambda X, y: (X, y), {"eta0": 1e10},
                  r"the loss exploded to", "eta0=1e+10"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("call", ["first fit", "refit", "partial_fit"])
@pytest.mark.parametrize("cause", sorted(DIVERGENCES))
def test_divergence_table(cause, call, engine):
    bad_data, bad_params, message, named = DIVERGENCES[cause]
    X, y = _unit_data()
    est = OnnxSGDRegressor(learning_rate="sgd", schedule="constant", eta0=1e-3, engine=engine,
                           max_iter=3, tol=None, random_state=0)
    if call != "first fit":
        est.fit(X, y)
        before = _copied_state(est)
        predictions = est.predict(X)
    est.set_params(**bad_params)
    X_bad, y_bad = bad_data(X, y)
    with pytest.raises(ConvergenceError, match=message) as info:
        if call == "partial_fit":
            est.partial_fit(X_bad, y_bad)
        else:
            est.fit(X_bad, y_bad)
    assert named in str(info.value)
    assert info.value.epoch == (est.n_iter_ + 1 if call == "partial_fit" else 1)
    if call == "first fit":
        assert not hasattr(est, "weights_")
    else:
        _assert_unchanged(est, before)
        np.testing.assert_array_equal(est.predict(X), predictions)


def test_loss_limit_rule():
    assert loss_limit(2.0) == 2.0 + 2.0 * DIVERGENCE_FACTOR
    # a perfect start must not make every later loss an explosion
    assert loss_limit(0.0) == REFERENCE_FLOOR * DIVERGENCE_FACTOR
    # a negative loss (a graph's own log-likelihood) explodes upwards too
    assert loss_limit(-3.0) == -3.0 + 3.0 * DIVERGENCE_FACTOR


@pytest.mark.parametrize("engine", ENGINES)
def test_exploding_but_finite_loss_raises_with_the_learning_rate_as_cause(engine):
    # Standardised data and eta0=1e10: the bounded squared-error derivative
    # keeps the loss finite (1e34) for ever; the rule catches it at once.
    X, y = _diabetes()
    est = OnnxSGDRegressor(eta0=1e10, learning_rate="sgd", engine=engine, random_state=0)
    with pytest.raises(ConvergenceError, match=r"epoch 1, step \d+: the loss exploded") as info:
        est.fit(X, _standard(y))
    error = info.value
    assert isinstance(error, ValueError)
    assert np.isfinite(error.loss) and error.loss > DIVERGENCE_FACTOR * error.reference
    assert (error.epoch, error.step) == (1, 2)
    assert "eta0=1e+10" in str(error) and "target" not in str(error)
    assert not hasattr(est, "weights_")


def test_unscaled_target_is_named_with_the_fix():
    X, y = _diabetes()
    est = OnnxSGDRegressor(eta0=1.0, learning_rate="sgd", schedule="constant",
                           random_state=0)
    with pytest.raises(ConvergenceError) as info:
        est.fit(X, y * 1e4)
    message = str(info.value)
    assert "target y is far from unit scale" in message
    assert "TransformedTargetRegressor(regressor=..., transformer=StandardScaler())" in message
    assert "X is far" not in message


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("how", ["refit", "partial_fit"])
def test_a_failed_call_leaves_the_fitted_estimator_as_it_was(engine, how):
    X, y = _diabetes()
    y = _standard(y)
    est = OnnxSGDRegressor(engine=engine, learning_rate="sgd", eta0=1e-3, max_iter=3,
                           tol=None, random_state=0)
    est.fit(X, y)
    est.partial_fit(X, y)
    before = _copied_state(est)
    predictions = est.predict(X)
    est.set_params(eta0=1e10)
    with pytest.raises(ConvergenceError):
        if how == "refit":
            est.fit(X, y)
        else:
            est.partial_fit(X, y)
    _assert_unchanged(est, before)
    np.testing.assert_array_equal(est.predict(X), predictions)
    # and training goes on from there, as if the failed call never happened
    est.set_params(eta0=1e-3)
    twin = pickle.loads(pickle.dumps(est))
    est.partial_fit(X, y)
    twin.partial_fit(X, y)
    for name in est.weights_:
        np.testing.assert_array_equal(est.weights_[name], twin.weights_[name])


def test_a_failed_call_leaves_a_classifier_as_it_was():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    est = OnnxSGDClassifier(max_iter=3, tol=None, random_state=0).fit(X, y)
    before = _copied_state(est)
    est.set_params(eta0=1e12, learning_rate="sgd", schedule="constant",
                   loss="modified_huber")
    with pytest.raises(ConvergenceError):
        est.partial_fit(X * 1e6, y)
    _assert_unchanged(est, before)


@pytest.mark.parametrize("engine", ENGINES)
def test_warn_option_stops_and_keeps_the_last_good_epoch(engine):
    X, y = _diabetes()
    y = _standard(y)
    est = OnnxSGDRegressor(engine=engine, learning_rate="sgd", eta0=1e-3, max_iter=2, tol=None,
                           random_state=0, on_divergence="warn").fit(X, y)
    good = {k: v.copy() for k, v in est.weights_.items()}
    curve = list(est.loss_curve_)
    est.set_params(eta0=1e10, warm_start=True)
    with pytest.warns(ConvergenceWarning, match="Training diverged at epoch 1"):
        est.fit(X, y)
    # the divergence happened in the first epoch of this fit: nothing of it is kept
    for name, value in good.items():
        np.testing.assert_array_equal(est.weights_[name], value)
    assert est.n_iter_ == 0 and est.loss_curve_ == []
    assert np.all(np.isfinite(est.predict(X)))
    assert curve  # the first fit did record its epochs


def test_warn_option_keeps_the_epochs_before_the_divergence():
    # A warm-up to a rate far too large for per-sample updates (eta |x|^2 > 2
    # from about the third epoch on) diverges in a later epoch: the epochs
    # before it are kept.
    from onnxfit.schedules import ConstantSchedule

    X, y = _diabetes()
    y = _standard(y)
    n_steps = len(X)  # batch_size 'auto' is 1 here: one epoch is len(X) updates
    est = OnnxSGDRegressor(
        learning_rate=LearningRateSGD(eta0=1.0, schedule=ConstantSchedule(
            warmup_steps=10 * n_steps)),
        max_iter=50, tol=None, random_state=0, on_divergence="warn", shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X, y)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert any("diverged" in m for m in messages)
    assert 0 < est.n_iter_ < 50 and len(est.loss_curve_) == est.n_iter_
    assert all(np.isfinite(est.loss_curve_))
    assert all(np.all(np.isfinite(w)) for w in est.weights_.values())


def test_grid_search_records_diverged_fits_as_nan():
    X, y = _diabetes()
    y = _standard(y)
    search = GridSearchCV(
        OnnxSGDRegressor(max_iter=5, tol=None, random_state=0),
        {"eta0": [1e-3, 1e10], "learning_rate": ["sgd", "adam"]},
        cv=2, error_score=np.nan,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    params = search.cv_results_["params"]
    for p, s in zip(params, scores):
        assert np.isnan(s) == (p["eta0"] == 1e10), (p, s)
    assert search.best_params_["eta0"] == 1e-3


def test_dropout_in_training_mode_is_named():
    torch = pytest.importorskip("torch", reason="exports a PyTorch model with Dropout")
    import io

    X, y = _diabetes()
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(16, 1))
    buffer = io.BytesIO()
    torch.onnx.export(net.train(), torch.zeros(2, 10), buffer, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                      dynamo=False, training=torch.onnx.TrainingMode.TRAINING)
    est = OnnxSGDRegressor(buffer.getvalue(), eta0=1e10, random_state=0)
    with pytest.raises(ConvergenceError, match="Dropout is active"):
        est.fit(X, _standard(y))


# -- no false alarms -----------------------------------------------------------------

def test_a_stream_whose_scale_drifts_is_not_a_divergence():
    # The reference is the loss at the start of each call: a first chunk
    # with tiny targets does not make a normal chunk an "explosion".
    X, y = _diabetes()
    y = _standard(y)
    est = OnnxSGDRegressor(random_state=0)
    est.partial_fit(X[:200], y[:200] * 1e-3)
    est.partial_fit(X[200:], y[200:])
    assert np.all(np.isfinite(est.predict(X)))


def test_data_sorted_by_target_is_not_a_divergence():
    # Per-sample updates on data sorted by y: the first samples' loss is far
    # below the typical one; the reference is spread over the data.
    X, y = _diabetes()
    order = np.argsort(y)
    est = OnnxSGDRegressor(shuffle=False, max_iter=3, tol=None, random_state=0)
    est.fit(X[order], _standard(y[order]))
    assert len(est.loss_curve_) == 3


def test_sample_weights_and_penalty_are_part_of_the_reference():
    X, y = _diabetes()
    y = _standard(y)
    # Adam does not care about the loss scale: huge sample weights train
    OnnxSGDRegressor(learning_rate="adam", max_iter=3, tol=None, random_state=0).fit(
        X, y, sample_weight=np.full(len(y), 1e7))
    # starting at the exact least-squares solution, the penalty is all the loss
    coef, *_ = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)
    start = {"coef": coef[:-1, None], "intercept": coef[-1:]}
    est = OnnxSGDRegressor(max_iter=2, tol=None, random_state=0, alpha=1e-4)
    est.fit(X, X @ coef[:-1] + coef[-1], initial_weights=start)
    assert np.all(np.isfinite(est.loss_curve_))


@pytest.mark.parametrize("engine", ENGINES)
def test_the_last_update_of_a_call_is_checked(engine):
    # One update per call: no later step of the call would see its loss.
    X, y = _diabetes()
    y = _standard(y)
    est = OnnxSGDRegressor(learning_rate="sgd", schedule="constant", eta0=1e-3,
                           batch_size=len(y), engine=engine, random_state=0)
    est.partial_fit(X, y)
    before = _copied_state(est)
    est.set_params(eta0=1e10)
    with pytest.raises(ConvergenceError, match="after its last step"):
        est.partial_fit(X, y)
    _assert_unchanged(est, before)


def test_warn_option_rolls_back_the_schedule_and_the_generator():
    X, y = _diabetes()
    y = _standard(y)
    est = OnnxSGDRegressor(eta0=1e10, learning_rate="sgd", random_state=0,
                           on_divergence="warn")
    with pytest.warns(ConvergenceWarning, match="Training stopped"):
        est.fit(X, y)
    assert (est.n_iter_, est.t_, est.loss_curve_) == (0, 0, [])
    assert est.get_state()["schedule"]["t"] == 0
    # training from there equals a fresh fit's first epoch
    est.set_params(eta0=1e-3)
    est.partial_fit(X, y)
    fresh = OnnxSGDRegressor(eta0=1e-3, learning_rate="sgd", random_state=0)
    fresh.partial_fit(X, y)
    for name in fresh.weights_:
        np.testing.assert_array_equal(est.weights_[name], fresh.weights_[name])


def test_a_graph_loss_names_the_target_not_an_input():
    # With loss_output, y feeds a label input: the cause is y's scale.
    from onnx import TensorProto, helper

    X, y = _diabetes()
    nodes = [helper.make_node("MatMul", ["x", "w"], ["pred"]),
             helper.make_node("Sub", ["pred", "target"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["loss"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("target", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("pred", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("loss", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("w", TensorProto.FLOAT, [10, 1], np.zeros(10))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    est = OnnxSGDRegressor(model, output_name="pred", loss_output="loss",
                           learning_rate="sgd", eta0=1.0, schedule="constant", random_state=0)
    with pytest.raises(ConvergenceError) as info:
        est.fit(X.astype(np.float32), y * 100)
    assert "target y is far from unit scale" in str(info.value)
    assert "input 'target'" not in str(info.value)


def test_callbacks_are_torn_down_when_a_fit_fails():
    pytest.importorskip("sklearn.callback", reason="scikit-learn >= 1.9 has callbacks")

    class Record:
        def __init__(self):
            self.events = []

        def setup(self, estimator, context):
            self.events.append("setup")

        def on_fit_task_begin(self, estimator, context):
            self.events.append(f"begin {context.task_name}")

        def on_fit_task_end(self, estimator, context):
            self.events.append(f"end {context.task_name}")

        def teardown(self, estimator, context):
            self.events.append("teardown")

    X, y = _diabetes()
    record = Record()
    est = OnnxSGDRegressor(eta0=1e10, learning_rate="sgd", random_state=0)
    est.set_callbacks(record)
    with pytest.raises(ConvergenceError):
        est.fit(X, _standard(y))
    assert record.events[0] == "setup" and record.events[-1] == "teardown"
    assert record.events.count("begin epoch") == record.events.count("end epoch") == 1
    assert record.events.count("begin fit") == record.events.count("end fit") == 1
    assert not hasattr(est, "_callback_fit_ctx")
