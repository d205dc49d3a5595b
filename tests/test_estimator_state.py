"""What an estimator keeps between calls: hyperparameters changed between
partial_fit calls, warm starts, failed refits, the default opsets of
converters, and loss objects given instead of their names."""

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from onnx import parser
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.preprocessing import StandardScaler
from skl2onnx import to_onnx

from onnxfit import (
    HingeLoss,
    LearningRateSGD,
    ModifiedHuberLoss,
    OnnxSGDClassifier,
    OnnxSGDRegressor,
)

ENGINES = ["fused", "forward_backward"]


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 4))
    return X, X @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X).astype(np.float32), y


@pytest.mark.parametrize("engine", ENGINES)
def test_switching_update_rule_between_partial_fits(regression, iris, engine):
    X, y = regression
    reg = OnnxSGDRegressor(engine=engine, random_state=0).partial_fit(X, y)
    before = reg.score(X, y)
    reg.set_params(learning_rate="nesterov").partial_fit(X, y)  # gains a velocity
    assert set(reg._update_state["coef"]) == {"velocity"}
    reg.set_params(learning_rate="sgd").partial_fit(X, y)  # loses it
    assert reg._update_state["coef"] == {}
    assert reg.score(X, y) > before

    X, y = iris
    clf = OnnxSGDClassifier(learning_rate="sgd", engine=engine, random_state=0)
    clf.partial_fit(X, y, classes=[0, 1, 2])
    clf.set_params(learning_rate="nesterov").partial_fit(X, y)
    assert clf.score(X, y) > 0.8


def test_warm_start_refuses_a_changed_graph_configuration(regression):
    X, y = regression
    est = OnnxSGDRegressor(warm_start=True, max_iter=5, tol=None).fit(X, y)
    est.set_params(weights_to_train=["intercept"])
    with pytest.raises(ValueError, match="output_name, loss_output or train_mode changed"):
        est.fit(X, y)
    # the previous fit survives the refused call
    assert est.weights_to_train_ == ["coef", "intercept"]
    est.set_params(warm_start=False).fit(X, y)
    assert est.weights_to_train_ == ["intercept"]


def test_warm_start_with_another_target_width_is_explained(regression):
    X, y = regression
    est = OnnxSGDRegressor(warm_start=True, max_iter=3, tol=None).fit(X, y)
    with pytest.raises(ValueError, match="1 value.s. per sample|2 value.s. per sample"):
        est.fit(X, np.c_[y, y])


def test_failed_refit_keeps_the_previous_fit(iris):
    X, y = iris
    three_logits = parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] X) => (float[N, 3] Y) <float[4, 3] W = {0.,0.,0.,0.,0.,0.,0.,0.,0.,0.,0.,0.}, float[3] B = {0.,0.,0.}> {
    XW = MatMul(X, W)
    Y = Add(XW, B)
}
""")
    clf = OnnxSGDClassifier(three_logits, random_state=0).fit(X, y)
    predictions = clf.predict(X)
    with pytest.raises(ValueError, match="3"):
        clf.fit(X[y < 2], y[y < 2])  # 3 logits, 2 classes
    assert_array_equal(clf.classes_, [0, 1, 2])
    assert_array_equal(clf.predict(X), predictions)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("converter", [LogisticRegression, SGDClassifier])
def test_skl2onnx_default_opset_conversions_train(converter, engine):
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = converter(max_iter=2, random_state=0).fit(X, y)
    onx = to_onnx(fitted, X[:1])  # skl2onnx's own opset: 9 to 14
    assert next(o.version for o in onx.opset_import if o.domain == "") < 17
    clf = OnnxSGDClassifier(onx, engine=engine, random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.95
    assert next(o.version for o in clf.onnx_model_.opset_import if o.domain == "") == 17


def test_opset_13_hand_written_graph_trains(regression):
    X, y = regression
    model = parser.parse_model("""
<ir_version: 7, opset_import: ["" : 13]>
g (double[N, 4] X) => (double[N, 1] Y) <double[4, 1] W = {0.0, 0.0, 0.0, 0.0}, double[1] B = {0.0}> {
    XW = MatMul(X, W)
    Y = Add(XW, B)
}
""")
    est = OnnxSGDRegressor(model, penalty=None, random_state=0).fit(X, y)
    assert est.score(X, y) > 0.999


def test_loss_objects_behave_like_their_names(iris):
    X, y = iris
    hinge = OnnxSGDClassifier(loss=HingeLoss(), random_state=0).fit(X, y)
    assert not hasattr(hinge, "predict_proba")
    by_name = OnnxSGDClassifier(loss="modified_huber", random_state=0).fit(X, y)
    by_object = OnnxSGDClassifier(loss=ModifiedHuberLoss(), random_state=0).fit(X, y)
    assert_allclose(by_object.predict_proba(X), by_name.predict_proba(X))


def test_balanced_class_weight_is_refused_by_every_partial_fit(iris):
    X, y = iris
    clf = OnnxSGDClassifier(class_weight="balanced", max_iter=3, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="balanced"):
        clf.partial_fit(X, y)


def test_batch_buffers_do_not_grow_with_chunk_sizes(regression):
    X, y = regression
    est = OnnxSGDRegressor(batch_size=16, learning_rate=LearningRateSGD(eta0=0.001))
    for n in range(20, 120, 7):
        est.partial_fit(X[:n], y[:n])
    assert len(est._runtime.engine._buffers) <= 2


def test_eta0_names_the_step_size_of_a_named_rule_and_is_searchable():
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import GridSearchCV
    from sklearn.preprocessing import scale

    from onnxfit import LearningRateSGD, LearningRateSGDNesterov

    X, y = load_diabetes(return_X_y=True)
    X, y = scale(X), scale(y)
    common = dict(max_iter=3, tol=None, random_state=0)
    by_eta0 = OnnxSGDRegressor(eta0=0.05, **common).fit(X, y)
    by_object = OnnxSGDRegressor(learning_rate=LearningRateSGD(eta0=0.05), **common).fit(X, y)
    for name in by_object.weights_:
        np.testing.assert_array_equal(by_eta0.weights_[name], by_object.weights_[name])
    nesterov = OnnxSGDRegressor(learning_rate="nesterov", eta0=0.002, **common).fit(X, y)
    reference = OnnxSGDRegressor(learning_rate=LearningRateSGDNesterov(eta0=0.002),
                                 **common).fit(X, y)
    np.testing.assert_array_equal(nesterov.weights_["coef"], reference.weights_["coef"])
    search = GridSearchCV(OnnxSGDRegressor(**common),
                          {"eta0": [1e-3, 1e-2], "learning_rate": ["sgd", "nesterov"]}, cv=2)
    search.fit(X, y)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    with pytest.raises(ValueError, match="both set the step size"):
        OnnxSGDRegressor(learning_rate=LearningRateSGD(), eta0=0.1, **common).fit(X, y)
    with pytest.raises(ValueError, match="eta0"):
        OnnxSGDRegressor(eta0=-1.0).fit(X, y)


@pytest.mark.parametrize("engine, names", [
    ("fused", ["training_step"]),
    ("forward_backward", ["model_forward", "loss", "model_backward", "penalty", "update"]),
])
def test_training_graphs_are_the_graphs_the_engine_runs(engine, names):
    import onnx

    from onnxfit.engines.problem import LOSS

    X, y = load_iris(return_X_y=True)
    clf = OnnxSGDClassifier(max_iter=2, tol=None, random_state=0, engine=engine).fit(X, y)
    graphs = clf.training_graphs()
    assert list(graphs) == names
    for model in graphs.values():
        onnx.checker.check_model(model)  # standard ONNX, default domain only
        assert {n.domain for n in model.graph.node} <= {""}
    outputs = {o.name for g in graphs.values() for o in g.graph.output}
    assert LOSS in outputs
    graphs[names[0]].graph.ClearField("node")  # copies: the estimator keeps working
    clf.partial_fit(X, y)
    with pytest.raises(NotFittedError):
        OnnxSGDClassifier().training_graphs()
