"""The PyTorch models of the zoo learn real tasks through the estimators.

test_zoo.py checks the gradients of every zoo graph against references; this
file checks that those gradients, fed to ``OnnxSGDClassifier``, train each
user model (tests/zoo/make_zoo.py describes them) on data from
scikit-learn, to a held-out accuracy stated below, and that the trained
graph (``to_onnx()``) run in a plain ``onnxruntime.InferenceSession``
predicts what ``predict`` does.

Every graph trains the initializers named by its npz's ``weights`` (the
dynamo exporter also writes constants -- the zero initial state of an
LSTM/GRU, the attention's scale -- as float initializers, which must stay
as they are) and the
npz's ``output`` (the logits).  The graphs are eval-mode exports: no Dropout,
and the cnn's BatchNorm is folded into its first convolution, so
``train_mode`` changes nothing here.

=============================  ========================  =====  =========
model                          task                      score  threshold
=============================  ========================  =====  =========
lstm_classifier (+ _dynamo)    digits rows, 8 steps      0.969  0.93
gru_classifier (+ _dynamo)     digits rows, 8 steps      0.971  0.93
transformer_encoder (+ _dyn.)  sets of 6 points, 3 cls   0.920  0.85
cnn_digits_dynamo              digits images             0.944  0.92
=============================  ========================  =====  =========

(test accuracy on a stratified quarter of the data, random_state=0 for the
split and the fit; over fit seeds 0-5 the lowest scores were 0.949, 0.951,
0.907 and 0.944, and two epochs stay below 0.57.  Each fit takes about a
second at most on one thread.)  The two exports of a model start from the
same torch weights and reach the same score.  torch_embedding_mlp is trained
in test_inputs.py, torch_cnn_digits (TorchScript) there too.
"""

import os

import numpy as np
import onnx
import onnxruntime
import pytest
from numpy.testing import assert_array_equal
from onnx import numpy_helper
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import onnxfit

ZOO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo")


def _zoo(name):
    """(path, weights to train, trained output) of a zoo graph."""
    data = np.load(os.path.join(ZOO_DIR, f"{name}.npz"))
    weights = [str(w) for w in data["weights"]] if "weights" in data else None
    return os.path.join(ZOO_DIR, f"{name}.onnx"), weights, str(data["output"])


def _digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16).astype(np.float32), y


def digit_rows():
    """Each digit as a sequence of its 8 rows of 8 pixels: (n, 8, 8)."""
    X, y = _digits()
    return X.reshape(-1, 8, 8), y


def digit_images():
    """(n, 1, 8, 8)."""
    X, y = _digits()
    return X.reshape(-1, 1, 8, 8), y


def point_sets(n_sets=600):
    """Which class a set of 6 points of 16 features comes from: (n, 6, 16).

    The points are make_classification's (3 classes, 2 clusters per class,
    class_sep=0.3: one point alone is hard to classify); a sample is 6 points
    of one class in random order.  The transformer encoder (no positional
    encoding, mean over the tokens) is a function of the set, as the task
    is.  A logistic regression reaches 0.57 on the mean of the 6 points and
    0.50 on the 96 flat values (see test_the_point_set_task_is_not_linear).
    """
    points, classes = make_classification(
        n_samples=6 * n_sets, n_features=16, n_informative=6, n_redundant=0, n_classes=3,
        n_clusters_per_class=2, class_sep=0.3, random_state=0)
    rng = np.random.RandomState(0)
    X, y = [], []
    for k in range(3):
        index = rng.permutation(np.flatnonzero(classes == k))
        index = index[:len(index) // 6 * 6]
        X.append(points[index].reshape(-1, 6, 16))
        y.append(np.full(len(index) // 6, k))
    return np.concatenate(X).astype(np.float32), np.concatenate(y)


def _split(X, y):
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


#: name -> (data, eta0 of Nesterov SGD, batch_size, epochs, test accuracy threshold).
#: Scores reached (random_state=0): in the module docstring.
CASES = {
    "torch_lstm_classifier": (digit_rows, 0.1, 32, 30, 0.93),
    "torch_lstm_classifier_dynamo": (digit_rows, 0.1, 32, 30, 0.93),
    "torch_gru_classifier": (digit_rows, 0.1, 32, 20, 0.93),
    "torch_gru_classifier_dynamo": (digit_rows, 0.1, 32, 20, 0.93),
    "torch_transformer_encoder": (point_sets, 0.02, 32, 25, 0.85),
    "torch_transformer_encoder_dynamo": (point_sets, 0.02, 32, 25, 0.85),
    "torch_cnn_digits_dynamo": (digit_images, 0.05, 32, 15, 0.92),
}

#: The graphs with float initializers that are not parameters (dynamo exports).
WITH_CONSTANTS = {"torch_lstm_classifier_dynamo", "torch_gru_classifier_dynamo",
                  "torch_transformer_encoder_dynamo"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_zoo_model_learns_and_exports(name):
    make_data, eta0, batch_size, max_iter, threshold = CASES[name]
    path, weights, output = _zoo(name)
    X_train, X_test, y_train, y_test = _split(*make_data())
    clf = onnxfit.OnnxSGDClassifier(
        path, weights_to_train=weights, output_name=output,
        learning_rate=onnxfit.LearningRateSGDNesterov(eta0=eta0), batch_size=batch_size,
        max_iter=max_iter, tol=None, random_state=0, n_threads=1)
    clf.fit(X_train, y_train)

    if weights is not None:
        assert sorted(clf.weights_to_train_) == sorted(weights)
    assert clf.trained_output_ == output
    assert clf.n_iter_ == max_iter
    assert np.isfinite(clf.loss_curve_).all()
    assert clf.loss_curve_[-1] < 0.5 * clf.loss_curve_[0], clf.loss_curve_
    score = clf.score(X_test, y_test)
    assert score >= threshold, f"{name}: test accuracy {score:.3f} < {threshold}"

    # The exported graph predicts the same classes, in plain onnxruntime.
    session = onnxruntime.InferenceSession(clf.to_onnx().SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    scores = session.run([output], {input_name: X_test})[0]
    assert scores.shape == (len(X_test), len(clf.classes_))
    predicted = clf.predict(X_test)
    assert_array_equal(clf.classes_[scores.argmax(axis=1)], predicted)
    assert np.mean(predicted == y_test) == score

    # The parameters moved; the exporter's float constants (the dynamo
    # graphs' zero initial state, the attention's scale) did not.
    initial = _initializers(onnx.load(path))
    exported = _initializers(clf.to_onnx())
    for weight_name in weights:
        assert not np.array_equal(exported[weight_name], initial[weight_name]), weight_name
    constants = [n for n, v in initial.items() if n not in weights and v.dtype.kind == "f"]
    for weight_name in constants:
        assert_array_equal(exported[weight_name], initial[weight_name], err_msg=weight_name)
    assert bool(constants) == (name in WITH_CONSTANTS), constants


def test_the_two_exports_of_a_model_train_alike():
    """Same torch weights, same data, same seed: the TorchScript and dynamo
    exports of the GRU classifier end with the same predictions."""
    X_train, X_test, y_train, _ = _split(*digit_rows())
    predictions = {}
    for name in ("torch_gru_classifier", "torch_gru_classifier_dynamo"):
        path, weights, output = _zoo(name)
        clf = onnxfit.OnnxSGDClassifier(
            path, weights_to_train=weights, output_name=output,
            learning_rate=onnxfit.LearningRateSGDNesterov(eta0=0.1), batch_size=32,
            max_iter=3, tol=None, random_state=0, n_threads=1)
        predictions[name] = clf.fit(X_train, y_train).predict(X_test)
    same = np.mean(predictions["torch_gru_classifier"]
                   == predictions["torch_gru_classifier_dynamo"])
    assert same >= 0.99, same


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_the_point_set_task_is_not_linear():
    """The transformer's task needs more than a linear model of the points."""
    X_train, X_test, y_train, y_test = _split(*point_sets())
    mean = LogisticRegression(max_iter=1000).fit(X_train.mean(axis=1), y_train)
    flat = LogisticRegression(max_iter=1000).fit(X_train.reshape(len(X_train), -1), y_train)
    assert mean.score(X_test.mean(axis=1), y_test) < 0.7
    assert flat.score(X_test.reshape(len(X_test), -1), y_test) < 0.7
