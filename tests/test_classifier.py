"""OnnxSGDClassifier: losses, graphs (raw scores, skl2onnx conversions with
and without ZipMap), labels, class weights, partial_fit, early stopping,
export, and acceptance results on scikit-learn's datasets."""

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from onnx import TensorProto, helper, numpy_helper
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits, load_iris
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import (
    GridSearchCV,
    StratifiedShuffleSplit,
    cross_val_score,
    train_test_split,
)
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from onnxfit import (
    HingeLoss,
    LearningRateSGD,
    LearningRateSGDNesterov,
    ModifiedHuberLoss,
    NegativeLogLikelihoodLoss,
    OnnxSGDClassifier,
    SigmoidCrossEntropyLoss,
    SoftmaxCrossEntropyLoss,
)
from onnxfit.classifier_graph import rewrite_linear_classifiers
from onnxfit.sessions import make_session
from onnxfit.losses import CLASSIFICATION_LOSSES, make_loss

from tests.graphs import convert, gemm_mlp_graph, mlp_graph, run_loss

# scikit-learn models are fitted for a few iterations on purpose
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


# -- data ------------------------------------------------------------------------
def _split(X, y, seed=0):
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), scaler.transform(X_test), y_train, y_test


@pytest.fixture(scope="module")
def cancer():
    return _split(*load_breast_cancer(return_X_y=True))


@pytest.fixture(scope="module")
def digits():
    X_train, X_test, y_train, y_test = _split(*load_digits(return_X_y=True))
    return X_train.astype(np.float32), X_test.astype(np.float32), y_train, y_test


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X).astype(np.float32), y


def _session_outputs(model, X):
    """Run an exported graph; ZipMap outputs become arrays."""
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {session.get_inputs()[0].name: X})
    result = {}
    for name, value in zip(names, values):
        if isinstance(value, list):  # ZipMap: list of {class: probability}
            keys = sorted(value[0])
            value = np.array([[row[k] for k in keys] for row in value])
        result[name] = np.asarray(value)
    return result


# -- losses: values and gradients against float64 references -------------------
def _sigmoid(p):
    return np.exp(-np.logaddexp(0.0, -p))


def _softplus(p):
    return np.logaddexp(0.0, p)


def _ref_sigmoid_ce(p, y):
    return _softplus(p) - y * p, _sigmoid(p) - y


def _ref_softmax_ce(p, y):
    lse = np.logaddexp.reduce(p, axis=1, keepdims=True)
    softmax = np.exp(p - lse)
    value = y * (lse - p)
    return value, softmax * y.sum(axis=1, keepdims=True) - y


def _ref_nll(p, y, eps=1e-7):
    clipped = np.maximum(p, eps)
    return -y * np.log(clipped), np.where(p > eps, -y / clipped, 0.0)


def _ref_hinge(p, y):
    sign = 2 * y - 1
    z = sign * p
    return np.maximum(0.0, 1.0 - z), np.where(z < 1, -sign, 0.0)


def _ref_modified_huber(p, y):
    sign = 2 * y - 1
    z = sign * p
    value = np.where(z >= 1, 0.0, np.where(z >= -1, (1 - z) ** 2, -4 * z))
    grad = np.where(z >= 1, 0.0, np.where(z >= -1, -2 * (1 - z) * sign, -4 * sign))
    return value, grad


LOSS_CASES = [
    (SigmoidCrossEntropyLoss(), _ref_sigmoid_ce, "scores"),
    (SoftmaxCrossEntropyLoss(), _ref_softmax_ce, "scores"),
    (NegativeLogLikelihoodLoss(), _ref_nll, "probabilities"),
    (HingeLoss(), _ref_hinge, "scores"),
    (ModifiedHuberLoss(), _ref_modified_huber, "scores"),
]
_LOSS_SESSIONS = {}


def _loss_run(loss, prediction, label, weight, dtype=np.float64, opset=17, closed_form=True):
    return run_loss(loss, prediction, label, weight, dtype, closed_form, _LOSS_SESSIONS, opset)


def _loss_data(kind, n=9, k=3, seed=0):
    rng = np.random.default_rng(seed)
    label = np.eye(k)[rng.integers(0, k, n)]
    if kind == "probabilities":
        prediction = rng.dirichlet(np.ones(k), size=n)
        prediction[0] = [1.0, 0.0, 0.0]  # a zero probability: clipped
    else:
        # scores whose margins stay >= 0.05 away from the kinks at +-1
        magnitude = np.where(rng.random((n, k)) < 0.5, rng.uniform(0.05, 0.95, (n, k)),
                             rng.uniform(1.05, 3.0, (n, k)))
        prediction = rng.choice([-1.0, 1.0], size=(n, k)) * magnitude
    return prediction, label, rng.uniform(0.2, 3.0, size=n)


LOSS_WIDTHS = [
    pytest.param(loss, reference, kind, k, id=f"{type(loss).__name__}-{k}")
    for loss, reference, kind in LOSS_CASES
    for k in ([3] if kind == "probabilities" or isinstance(loss, SoftmaxCrossEntropyLoss)
              else [1, 3])
]


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "automatic"])
@pytest.mark.parametrize("loss, reference, kind, k", LOSS_WIDTHS)
def test_classification_loss_matches_float64_reference(loss, reference, kind, k, closed_form):
    prediction, label, weight = _loss_data(kind, k=max(k, 2))
    if k == 1:
        prediction, label = prediction[:, :1], label[:, :1]
    value, grad = _loss_run(loss, prediction, label, weight, closed_form=closed_form)
    ref_value, ref_grad = reference(prediction, label)
    n = len(prediction)
    assert np.ndim(value) == 0 and grad.dtype == np.float64
    assert_allclose(value, np.mean(weight * ref_value.sum(axis=1)), rtol=1e-12)
    assert_allclose(grad, weight[:, None] * ref_grad / n, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "loss, reference", [(SigmoidCrossEntropyLoss(), _ref_sigmoid_ce),
                        (SoftmaxCrossEntropyLoss(), _ref_softmax_ce)],
    ids=["sigmoid", "softmax"],
)
@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "automatic"])
def test_log_loss_is_finite_for_huge_logits(loss, reference, dtype, closed_form):
    prediction = np.array([[1e4, -1e4, 0.5], [-1e4, 2.0, 1e4], [3.0, 1e4, -1e4]])
    label = np.eye(3)[[1, 2, 0]]  # the true class is often the far-off one
    weight = np.ones(3)
    value, grad = _loss_run(loss, prediction, label, weight, dtype=dtype, closed_form=closed_form)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    ref_value, ref_grad = reference(prediction, label)
    assert_allclose(value, ref_value.sum(axis=1).mean(), rtol=1e-6)
    assert_allclose(grad, ref_grad / 3, atol=1e-6)


def test_softmax_loss_is_valid_at_opset_21():
    # The fused engine appends the loss to the user's graph at its own opset.
    prediction, label, weight = _loss_data("scores")
    value, _ = _loss_run(SoftmaxCrossEntropyLoss(), prediction, label, weight, opset=21)
    ref, _ = _ref_softmax_ce(prediction, label)
    assert_allclose(value, np.mean(weight * ref.sum(axis=1)), rtol=1e-12)


def test_classification_loss_table():
    assert isinstance(make_loss("log_loss", CLASSIFICATION_LOSSES, scores="softmax"),
                      SoftmaxCrossEntropyLoss)
    assert isinstance(make_loss("log_loss", CLASSIFICATION_LOSSES, scores="sigmoid"),
                      SigmoidCrossEntropyLoss)
    assert isinstance(make_loss("log_loss", CLASSIFICATION_LOSSES, scores="probability"),
                      NegativeLogLikelihoodLoss)
    assert isinstance(make_loss("hinge", CLASSIFICATION_LOSSES, scores="softmax"), HingeLoss)


# -- acceptance ------------------------------------------------------------------
def test_breast_cancer_matches_sgdclassifier(cancer):
    X_train, X_test, y_train, y_test = cancer
    ours = OnnxSGDClassifier(random_state=0).fit(X_train, y_train).score(X_test, y_test)
    theirs = SGDClassifier(loss="log_loss", random_state=0).fit(X_train, y_train).score(
        X_test, y_test
    )
    assert ours >= theirs - 0.02, (ours, theirs)


def test_digits_skl2onnx_mlp_trained_further(digits):
    X_train, X_test, y_train, y_test = digits
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=3, random_state=0)
    mlp.fit(X_train, y_train)
    onnx_model = convert(mlp, X_train)  # ZipMap on (skl2onnx's default)
    assert any(n.op_type == "ZipMap" for n in onnx_model.graph.node)
    clf = OnnxSGDClassifier(onnx_model, random_state=0).fit(X_train, y_train)
    assert clf.trained_output_ != "output_probability"
    accuracy = clf.score(X_test, y_test)
    assert accuracy >= 0.93, (mlp.score(X_test, y_test), accuracy)
    # the export keeps label + probabilities, trained
    outputs = _session_outputs(clf.to_onnx(), X_test)
    assert_array_equal(outputs["output_label"], clf.predict(X_test))
    assert_allclose(outputs["output_probability"], clf.predict_proba(X_test), atol=1e-6)


def test_digits_hand_written_mlp_from_scratch(digits):
    X_train, X_test, y_train, y_test = digits
    clf = OnnxSGDClassifier(mlp_graph(64, (32,), 10, seed=1), random_state=0)
    assert clf.fit(X_train, y_train).score(X_test, y_test) >= 0.90


def test_grid_search_and_cross_val_score_with_string_labels(iris):
    X, y = iris
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    search = GridSearchCV(
        OnnxSGDClassifier(learning_rate=LearningRateSGD(), max_iter=30, random_state=0),
        {"learning_rate__eta0": [0.01, 0.1], "alpha": [1e-4, 1e-2]},
        cv=3, n_jobs=2, error_score="raise",
    )
    search.fit(X, labels)
    assert set(search.best_params_) == {"learning_rate__eta0", "alpha"}
    assert search.best_score_ > 0.8
    assert set(search.predict(X)) <= set(labels)
    scores = cross_val_score(OnnxSGDClassifier(random_state=0), X, labels, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.8


# -- labels and outputs -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["int", "str", "bool", "float"])
def test_label_types(cancer, kind):
    X_train, X_test, y_train, y_test = cancer
    convert_labels = {
        "int": lambda v: v * 7 - 3,
        "str": lambda v: np.array(["benign", "malignant"])[v],
        "bool": lambda v: v.astype(bool),
        "float": lambda v: v.astype(float),
    }[kind]
    clf = OnnxSGDClassifier(random_state=0).fit(X_train, convert_labels(y_train))
    assert_array_equal(clf.classes_, np.unique(convert_labels(y_train)))
    pred = clf.predict(X_test)
    assert pred.dtype == clf.classes_.dtype
    assert np.mean(pred == convert_labels(y_test)) > 0.9


def test_outputs_binary_and_multiclass(cancer, iris):
    X_train, X_test, y_train, _ = cancer
    binary = OnnxSGDClassifier(random_state=0).fit(X_train, y_train)
    decision = binary.decision_function(X_test)
    assert decision.shape == (len(X_test),)
    assert_array_equal(binary.classes_[(decision > 0).astype(int)], binary.predict(X_test))
    X, y = iris
    multi = OnnxSGDClassifier(random_state=0).fit(X, y)
    decision = multi.decision_function(X)
    assert decision.shape == (len(X), 3)
    assert_array_equal(multi.classes_[decision.argmax(axis=1)], multi.predict(X))
    for clf, data in ((binary, X_test), (multi, X)):
        proba = clf.predict_proba(data)
        assert proba.shape == (len(data), len(clf.classes_))
        assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
        assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(data))
        assert_allclose(clf.predict_log_proba(data), np.log(proba), atol=1e-9)


def test_predict_log_proba_is_finite_when_proba_underflows(cancer):
    X_train, X_test, y_train, _ = cancer
    clf = OnnxSGDClassifier(random_state=0, alpha=0.0, max_iter=30, tol=None)
    clf.fit(X_train, y_train)
    log_proba = clf.predict_log_proba(X_test * 1e3)
    assert np.all(np.isfinite(log_proba))


def test_margin_losses(iris):
    X, y = iris
    for loss in ("hinge", "modified_huber"):
        clf = OnnxSGDClassifier(loss=loss, random_state=0).fit(X, y)
        assert clf.score(X, y) > 0.8
    assert not hasattr(OnnxSGDClassifier(loss="hinge").fit(X, y), "predict_proba")
    proba = OnnxSGDClassifier(loss="modified_huber", random_state=0).fit(X, y).predict_proba(X)
    assert_allclose(proba.sum(axis=1), 1.0)


# -- class and sample weights ------------------------------------------------------
def _imbalanced():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (300, 2)), rng.normal(1.2, 1, (30, 2))])
    y = np.array(["common"] * 300 + ["rare"] * 30)
    return X, y


def test_class_weight_balanced_and_dict_favour_the_rare_class():
    X, y = _imbalanced()
    recall = {}
    for name, class_weight in [("none", None), ("balanced", "balanced"),
                               ("dict", {"common": 1.0, "rare": 10.0})]:
        clf = OnnxSGDClassifier(class_weight=class_weight, random_state=0).fit(X, y)
        recall[name] = np.mean(clf.predict(X[y == "rare"]) == "rare")
    assert recall["balanced"] > recall["none"] + 0.2
    assert recall["dict"] > recall["none"] + 0.2


def test_class_weight_multiplies_sample_weight():
    X, y = _imbalanced()
    sample_weight = np.where(y == "rare", 2.0, 1.0)
    # dict weights are rescaled to average 1 over the classes: {1, 5} -> {1/3, 5/3}
    weighted = OnnxSGDClassifier(
        class_weight={"common": 1.0, "rare": 5.0}, random_state=0, max_iter=5, tol=None
    ).fit(X, y, sample_weight=sample_weight)
    explicit = OnnxSGDClassifier(random_state=0, max_iter=5, tol=None).fit(
        X, y, sample_weight=sample_weight * np.where(y == "rare", 5.0, 1.0) / 3.0
    )
    for name in weighted.weights_:
        assert_allclose(weighted.weights_[name], explicit.weights_[name], rtol=1e-5)
    balanced = OnnxSGDClassifier(class_weight="balanced", random_state=0, max_iter=5, tol=None)
    balanced.fit(X, y, sample_weight=sample_weight)
    factor = np.where(y == "rare", 330 / 60, 330 / 600)
    explicit.fit(X, y, sample_weight=sample_weight * factor)
    for name in balanced.weights_:
        assert_allclose(balanced.weights_[name], explicit.weights_[name], rtol=1e-5)


# -- partial_fit, warm start, early stopping, pickling ------------------------------
def test_partial_fit(iris):
    X, y = iris
    clf = OnnxSGDClassifier(random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X, y)
    # the first chunk need not contain every class
    first = y < 2
    clf.partial_fit(X[first], y[first], classes=[0, 1, 2])
    assert_array_equal(clf.classes_, [0, 1, 2])
    for _ in range(20):
        clf.partial_fit(X, y)
    assert clf.n_iter_ == 21 and clf.score(X, y) > 0.85
    clf.partial_fit(X, y, classes=[0, 1, 2])  # same classes: accepted
    with pytest.raises(ValueError, match="not the same"):
        clf.partial_fit(X, y, classes=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="not among the classes"):
        clf.partial_fit(X, y + 5)
    with pytest.raises(ValueError, match="not among the classes"):
        clf.partial_fit(X, np.array(["a", "b", "c"])[y])
    with pytest.raises(ValueError, match="balanced"):
        OnnxSGDClassifier(class_weight="balanced").partial_fit(X, y, classes=[0, 1, 2])


def test_partial_fit_matches_fit_epochs(iris):
    X, y = iris
    fitted = OnnxSGDClassifier(random_state=0, max_iter=3, tol=None, shuffle=False).fit(X, y)
    stepped = OnnxSGDClassifier(random_state=0, shuffle=False)
    for _ in range(3):
        stepped.partial_fit(X, y, classes=np.unique(y))
    for name in fitted.weights_:
        assert_allclose(stepped.weights_[name], fitted.weights_[name], rtol=1e-6, atol=1e-7)


def test_warm_start_continues_and_checks_classes(iris):
    X, y = iris
    clf = OnnxSGDClassifier(warm_start=True, max_iter=2, tol=None, random_state=0)
    clf.fit(X, y)
    first = {k: v.copy() for k, v in clf.weights_.items()}
    clf.fit(X, y)
    assert any(not np.allclose(first[k], clf.weights_[k]) for k in first)
    with pytest.raises(ValueError, match="warm_start"):
        clf.fit(X[y < 2], y[y < 2])


def test_early_stopping_restores_best_weights(digits):
    X_train, _, y_train, _ = digits
    clf = OnnxSGDClassifier(
        mlp_graph(64, (16,), 10), early_stopping=True, validation_fraction=0.2,
        learning_rate=LearningRateSGDNesterov(eta0=0.2), n_iter_no_change=3,
        max_iter=40, random_state=0,
    ).fit(X_train, y_train)
    scores = clf.validation_scores_
    assert len(scores) == clf.n_iter_ < 40
    # the same stratified split as the estimator's (its first use of the seed)
    split = StratifiedShuffleSplit(test_size=0.2, random_state=np.random.RandomState(0))
    _, val = next(split.split(np.zeros(len(y_train)), y_train))
    assert np.isclose(clf.score(X_train[val], y_train[val]), max(scores))
    assert len(clf.loss_curve_) == clf.n_iter_


@pytest.mark.parametrize("graph", ["default", "mlp", "skl2onnx-sgd", "skl2onnx-mlp"])
def test_engines_agree(iris, graph):
    X, y = iris
    onnx_model = {
        "default": None,
        "mlp": mlp_graph(4, (8,), 3),
        "skl2onnx-sgd": convert(SGDClassifier(loss="log_loss", max_iter=3,
                                              random_state=0).fit(X, y), X),
        "skl2onnx-mlp": convert(MLPClassifier((8,), max_iter=3, random_state=0).fit(X, y), X),
    }[graph]
    fitted = [
        OnnxSGDClassifier(onnx_model, engine=engine, max_iter=4, tol=None,
                          random_state=0).fit(X, y)
        for engine in ("fused", "forward_backward")
    ]
    for name in fitted[0].weights_:
        assert_allclose(fitted[0].weights_[name], fitted[1].weights_[name], atol=1e-6)


def test_pickle_has_no_onnxruntime_object(iris):
    X, y = iris
    clf = OnnxSGDClassifier(random_state=0).fit(X, np.array(["a", "b", "c"])[y])
    expected = clf.predict_proba(X)
    data = pickle.dumps(clf)
    assert b"onnxruntime" not in data
    restored = pickle.loads(data)
    assert_allclose(restored.predict_proba(X), expected)
    assert_array_equal(restored.predict(X), clf.predict(X))
    restored.partial_fit(X, np.array(["a", "b", "c"])[y])  # training goes on


def test_verbose_shows_progress(iris, capsys):
    X, y = iris
    OnnxSGDClassifier(verbose=1, max_iter=3, tol=None).fit(X, y)
    assert "OnnxSGDClassifier" in capsys.readouterr().err


# -- graphs --------------------------------------------------------------------------
SKL2ONNX_CASES = [
    (LogisticRegression, {}),
    (LogisticRegression, {"options": {"zipmap": False}}),
    (LogisticRegression, {"black_op": {"LinearClassifier"}}),
    (lambda **kw: SGDClassifier(loss="log_loss", max_iter=3, **kw), {}),
    (lambda **kw: SGDClassifier(loss="log_loss", max_iter=3, **kw),
     {"options": {"zipmap": False}}),
    (lambda **kw: MLPClassifier((8,), max_iter=5, **kw), {}),
    (lambda **kw: MLPClassifier((8,), max_iter=5, **kw), {"options": {"zipmap": False}}),
]
SKL2ONNX_IDS = ["LR", "LR-nozipmap", "LR-blackop", "SGD", "SGD-nozipmap", "MLP", "MLP-nozipmap"]


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("make, options", SKL2ONNX_CASES, ids=SKL2ONNX_IDS)
def test_skl2onnx_classifiers_train_and_export(iris, make, options, n_classes):
    X, y = iris
    keep = y < n_classes
    X, y = X[keep], np.array(["red", "green", "blue"])[y[keep]]
    original = convert(make(random_state=0).fit(X, y), X, **options)
    clf = OnnxSGDClassifier(original, max_iter=15, tol=None, random_state=0)
    clf.fit(X, y)
    assert clf.score(X, y) > 0.8
    # predictions are those of the exported graph, which keeps its outputs
    exported = clf.to_onnx()
    assert [o.name for o in exported.graph.output] == [o.name for o in original.graph.output]
    outputs = _session_outputs(exported, X)
    label, proba = (outputs[o.name] for o in exported.graph.output)
    assert_array_equal(label, clf.predict(X))
    assert_allclose(proba, clf.predict_proba(X), atol=1e-6)
    assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, atol=1e-5)
    # only the real weights are trained, not constants such as skl2onnx's "unity"
    assert all("unity" not in w and "negate" not in w for w in clf.weights_to_train_)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("strings", [False, True])
def test_linear_classifier_rewrite_is_equivalent(iris, n_classes, strings):
    X, y = iris
    keep = y < n_classes
    X, y = X[keep], y[keep]
    if strings:
        y = np.array(["a", "b", "c"])[y]
    original = convert(LogisticRegression().fit(X, y), X)
    rewritten = rewrite_linear_classifiers(original)
    assert not any(n.op_type == "LinearClassifier" for n in rewritten.graph.node)
    before, after = _session_outputs(original, X), _session_outputs(rewritten, X)
    assert_array_equal(before["output_label"], after["output_label"])
    # onnxruntime's LinearClassifier uses an approximate logistic function
    assert_allclose(before["output_probability"], after["output_probability"], atol=1e-4)


def test_pytorch_style_gemm_graph(iris):
    X, y = iris
    clf = OnnxSGDClassifier(gemm_mlp_graph(4, (16,), 3), random_state=0).fit(X, y)
    assert clf.trained_output_ == "output"
    assert clf.score(X, y) > 0.9
    assert_allclose(_session_outputs(clf.to_onnx(), X)["output"],
                    clf.decision_function(X), rtol=1e-6)


def test_binary_problem_with_one_logit_graph(cancer):
    X_train, X_test, y_train, y_test = cancer
    clf = OnnxSGDClassifier(mlp_graph(30, (8,), 1, dtype=np.float32), random_state=0)
    clf.fit(X_train, y_train)
    assert clf.score(X_test, y_test) > 0.9
    assert clf.decision_function(X_test).shape == (len(X_test),)


def _with_softmax():
    model = mlp_graph(4, (8,), 3)
    graph = model.graph
    graph.node.append(helper.make_node("Softmax", ["Y"], ["P"], axis=1))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("P", TensorProto.FLOAT, ["N", 3]))
    return model


def test_graph_ending_with_softmax_trains_the_logits(iris):
    X, y = iris
    clf = OnnxSGDClassifier(_with_softmax(), random_state=0).fit(X, y)
    assert clf.trained_output_ == "Y"  # the scores before the Softmax
    assert clf.score(X, y) > 0.9
    assert_allclose(_session_outputs(clf.to_onnx(), X)["P"], clf.predict_proba(X), atol=1e-6)


def _smoothed_probability_graph():
    """Raw MLP + Softmax + label smoothing + a label output: probabilities
    that are not a plain softmax of scores."""
    model = mlp_graph(4, (8,), 3)
    graph = model.graph
    graph.initializer.extend([
        numpy_helper.from_array(np.array(0.01, dtype=np.float32), "smooth"),
        numpy_helper.from_array(np.array(1.03, dtype=np.float32), "norm"),
        numpy_helper.from_array(np.array([0, 1, 2], dtype=np.int64), "labels"),
    ])
    graph.node.extend([
        helper.make_node("Softmax", ["Y"], ["S"], axis=1),
        helper.make_node("Add", ["S", "smooth"], ["S2"]),
        helper.make_node("Div", ["S2", "norm"], ["probabilities"]),
        helper.make_node("ArgMax", ["probabilities"], ["index"], axis=1, keepdims=0),
        helper.make_node("Gather", ["labels", "index"], ["label"], axis=0),
    ])
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
    ])
    return model


def test_unrecognised_probabilities_are_trained_with_clipped_nll(iris):
    X, y = iris
    clf = OnnxSGDClassifier(_smoothed_probability_graph(), random_state=0).fit(X, y)
    assert clf.trained_output_ == "probabilities"
    assert set(clf.weights_to_train_) == {"W0", "B0", "W1", "B1"}  # not "smooth"
    assert clf.score(X, y) > 0.9
    with pytest.raises(ValueError, match="needs raw scores"):
        OnnxSGDClassifier(_smoothed_probability_graph(), loss="hinge").fit(X, y)


def test_graph_class_order_is_respected(iris):
    # An MLP graph whose columns are classes [2, 1, 0]: labels are encoded in
    # the graph's order, predict_proba comes back in classes_ order.
    X, y = iris
    model = convert(MLPClassifier((8,), max_iter=300, random_state=0).fit(X, y), X)
    for node in model.graph.node:
        if node.op_type == "ZipMap":
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("classlabels_int64s", [2, 1, 0]))
    for k, init in enumerate(model.graph.initializer):
        if init.name == "classes":
            model.graph.initializer[k].CopyFrom(
                numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int32), "classes"))
    clf = OnnxSGDClassifier(model, max_iter=30, tol=None, random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.9
    outputs = _session_outputs(clf.to_onnx(), X)
    assert_array_equal(outputs["output_label"], clf.predict(X))
    # ZipMap keys the graph's columns by class: sorted keys give classes_ order
    assert_allclose(outputs["output_probability"], clf.predict_proba(X), atol=1e-6)


def test_class_mismatch_errors(iris):
    X, y = iris
    with pytest.raises(ValueError, match="3 value.*2 classes"):
        OnnxSGDClassifier(mlp_graph(4, (8,), 3)).fit(X[y < 2], y[y < 2])
    with pytest.raises(ValueError, match="2 value.*3 classes"):
        OnnxSGDClassifier(mlp_graph(4, (8,), 2)).fit(X, y)
    onnx_model = convert(MLPClassifier((4,), max_iter=5).fit(X, y), X)
    with pytest.raises(ValueError, match="built for 3 classes"):
        OnnxSGDClassifier(onnx_model).fit(X[y < 2], y[y < 2])
    with pytest.raises(ValueError, match="are not the classes of y"):
        OnnxSGDClassifier(onnx_model).fit(X, y + 10)
    with pytest.raises(ValueError, match="greater than one"):
        OnnxSGDClassifier().fit(X[y == 0], y[y == 0])


def test_output_name_choices(iris):
    X, y = iris
    onnx_model = convert(MLPClassifier((4,), max_iter=5).fit(X, y), X)
    with pytest.raises(ValueError, match="ZipMap"):
        OnnxSGDClassifier(onnx_model, output_name="output_probability").fit(X, y)
    with pytest.raises(ValueError, match="labels"):
        OnnxSGDClassifier(onnx_model, output_name="output_label").fit(X, y)
    with pytest.raises(ValueError, match="not a value"):
        OnnxSGDClassifier(onnx_model, output_name="nothing").fit(X, y)
    # naming the logits directly works too
    clf = OnnxSGDClassifier(onnx_model, output_name="add_result1", max_iter=5, tol=None)
    assert clf.fit(X, y).trained_output_ == "add_result1"
    assert_array_equal(_session_outputs(clf.to_onnx(), X)["output_label"], clf.predict(X))


def test_pipeline_and_clone(cancer):
    X_train, X_test, y_train, y_test = cancer
    pipe = make_pipeline(StandardScaler(), OnnxSGDClassifier(random_state=0))
    assert pipe.fit(X_train, y_train).score(X_test, y_test) > 0.9
    clone(pipe)


@pytest.mark.parametrize("zipmap", [False, True])
def test_converted_binary_hinge_sgd_trains_its_raw_score(cancer, zipmap):
    # skl2onnx writes the "probabilities" of a binary hinge SGDClassifier as
    # Concat(-s, s): raw scores, which must not be trained as probabilities.
    X_train, X_test, y_train, y_test = cancer
    labels = np.array(["no", "yes"])
    sgd = SGDClassifier(loss="hinge", max_iter=3, tol=None, random_state=0)
    sgd.fit(X_train, labels[y_train])
    options = {} if zipmap else {"options": {"zipmap": False}}
    onx = convert(sgd, X_train, **options)
    clf = OnnxSGDClassifier(onx, loss="hinge", random_state=0).fit(X_train, labels[y_train])
    assert clf._graph_info.link == "identity"
    scores = clf.decision_function(X_test)
    assert np.all(np.abs(scores) < 700)  # not log(tiny) of negative "probabilities"
    assert_array_equal(clf.predict(X_test), labels[(scores > 0).astype(int)])
    assert clf.score(X_test, labels[y_test]) > 0.9
    exported = _session_outputs(clf.to_onnx(), X_test.astype(np.float32))
    label_name = clf._graph_info.label_output
    assert_array_equal(exported[label_name], clf.predict(X_test))


def test_softmax_loss_refuses_a_single_output_column():
    from onnxfit.losses import loss_gradient_model

    with pytest.raises(ValueError, match="one column of scores per class"):
        loss_gradient_model(SoftmaxCrossEntropyLoss(), np.float32, ())


def test_one_hot_labels_are_built_batch_by_batch():
    """Labels travel as small column indices; each batch's one-hot rows equal
    the full one-hot matrix's rows."""
    from onnxfit.engines.buffers import BatchBuffers

    X, y = load_digits(return_X_y=True)
    clf = OnnxSGDClassifier(max_iter=1, tol=None, random_state=0).fit(X[:300], y[:300])
    columns = clf._encode_labels(clf._class_index(y[:300]))
    assert columns.dtype == np.uint8 and columns.shape == (300,)
    problem = clf._build_problem()
    buffers = BatchBuffers(problem, 7)
    buffers.allocate()
    indices = np.array([5, 0, 299, 42, 42, 17, 100])
    data = X[:300].astype(problem.inputs[0].dtype)
    buffers.gather({"X": data}, columns, None, indices)
    one_hot = np.eye(10, dtype=problem.dtype)[columns]
    assert_array_equal(buffers.label, one_hot[indices])
    assert_array_equal(buffers.inputs["X"], data[indices])
    assert_allclose(buffers.sample_weight.ravel(), np.full(7, 1 / 7))


def test_softmax_loss_refuses_one_column_binary_scores():
    X, y = load_breast_cancer(return_X_y=True)
    clf = OnnxSGDClassifier(loss=SoftmaxCrossEntropyLoss(), max_iter=1, tol=None)
    with pytest.raises(ValueError, match="softmax over one value is constant"):
        clf.fit(X[:50], y[:50])


def test_hinge_with_threshold_zero_trains_from_zero_weights():
    """scikit-learn's Hinge takes -y at the kink (z <= threshold): with
    threshold 0 (the perceptron) and zero weights every margin is at the kink."""
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    clf = OnnxSGDClassifier(loss=HingeLoss(threshold=0.0), max_iter=5, tol=None,
                            random_state=0).fit(X, y)
    assert np.abs(clf.weights_["coef"]).max() > 0
    assert clf.score(X, y) > 0.9


def test_object_labels_with_nan_are_refused_like_scikit_learn():
    X, _ = load_iris(return_X_y=True)
    y = np.array(["a", "b"] * 74 + ["a", np.nan], dtype=object)
    with pytest.raises(ValueError, match="Input (y )?contains NaN"):
        OnnxSGDClassifier(max_iter=1, tol=None).fit(X, y)
    with pytest.raises(ValueError, match="Input (y )?contains NaN"):
        SGDClassifier(max_iter=1, tol=None).fit(X, y)


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "automatic"])
@pytest.mark.parametrize("loss, reference", [(SoftmaxCrossEntropyLoss(), _ref_softmax_ce),
                                             (SigmoidCrossEntropyLoss(), _ref_sigmoid_ce)],
                         ids=["softmax", "sigmoid"])
def test_log_losses_with_soft_labels(loss, reference, closed_form):
    """Labels that are not one-hot (rows summing to 0.4-1.6): the softmax
    derivative's sum-of-labels factor matters."""
    rng = np.random.default_rng(3)
    prediction = rng.normal(size=(8, 4)) * 2
    label = rng.dirichlet(np.ones(4), size=8) * rng.uniform(0.4, 1.6, size=(8, 1))
    weight = rng.uniform(0.2, 3.0, size=8)
    value, grad = _loss_run(loss, prediction, label, weight, closed_form=closed_form)
    ref_value, ref_grad = reference(prediction, label)
    assert_allclose(value, np.mean(weight * ref_value.sum(axis=1)), rtol=1e-12)
    assert_allclose(grad, weight[:, None] * ref_grad / 8, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("loss, reference, kind", [
    (SigmoidCrossEntropyLoss(), _ref_sigmoid_ce, "scores"),
    (HingeLoss(), _ref_hinge, "scores"),
    (ModifiedHuberLoss(), _ref_modified_huber, "scores"),
    (NegativeLogLikelihoodLoss(), _ref_nll, "probabilities"),
], ids=["sigmoid", "hinge", "modified_huber", "nll"])
@pytest.mark.parametrize("shape", [(9,), (3, 2, 3)])
def test_classification_closed_forms_of_other_ranks(loss, reference, kind, shape):
    """Per-sample outputs of rank 0 and 2: closed form == automatic == numpy."""
    prediction, label, weight = _loss_data(kind, n=int(np.prod(shape)), k=3)
    prediction, label = prediction[:, 0].reshape(shape), label[:, 0].reshape(shape)
    weight = weight[:shape[0]]
    n = shape[0]
    ref_value, ref_grad = reference(prediction, label)
    column = weight.reshape((n,) + (1,) * (len(shape) - 1))
    for closed_form in (True, False):
        value, grad = _loss_run(loss, prediction, label, weight, closed_form=closed_form)
        assert_allclose(value, np.sum(column * ref_value) / n, rtol=1e-12)
        assert_allclose(grad, column * ref_grad / n, rtol=1e-10, atol=1e-15)


def test_sigmoid_log_loss_gradient_at_zero_scores():
    """Zero weights give zero scores, where the automatic derivative of the
    stable form is wrong (Relu' and the derivative of |p| are 0 there): the
    closed form gives sigmoid(0) - y = 0.5 - y."""
    label = np.array([[1.0], [0.0], [1.0]])
    _, grad = _loss_run(SigmoidCrossEntropyLoss(), np.zeros((3, 1)), label, np.ones(3))
    assert_allclose(grad, (0.5 - label) / 3, rtol=1e-15)
