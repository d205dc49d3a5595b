"""The demo behind ``python -m onnxfit demo``.

Each part takes a scikit-learn model fitted on a dataset bundled with
scikit-learn, converts it to ONNX with skl2onnx, trains the ONNX graph with
onnxfit and prints the test score next to scikit-learn's.  With
``progress=True`` (``onnxfit demo`` on a terminal) each step is announced on
stderr and onnxfit's fits show their progress bar (the estimators'
``verbose=1``); the table itself is the same.
"""

import sys
import time
import warnings

import numpy as np

from .onnx_graphs import CONVERTER_OPSETS


def _convert(model, X):
    from skl2onnx import to_onnx

    return to_onnx(model, X[:1].astype(np.float32), target_opset=CONVERTER_OPSETS)


def _exported_predictions(onnx_model, X):
    import onnxruntime

    session = onnxruntime.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: X.astype(np.float32)})


def _announcer(progress):
    """A function writing a step's name on stderr, or doing nothing."""
    def announce(step):
        if progress:
            print(f"onnxfit demo: {step}...", file=sys.stderr, flush=True)
    return announce


def regression_demo(out=print, progress=False):
    """Diabetes: a drop-in linear model, then an MLP trained further.

    Parameters
    ----------
    out : callable, default=print
        Writes one line of the table.
    progress : bool, default=False
        Announce each step on stderr and show onnxfit's progress bars.
    """
    announce = _announcer(progress)
    from sklearn.datasets import load_diabetes
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDRegressor
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from . import LearningRateSGDNesterov, OnnxSGDRegressor

    X, y = load_diabetes(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    out("== load_diabetes (regression, test R²) ==")
    for name, estimator in [
        ("scikit-learn SGDRegressor()", SGDRegressor(random_state=0)),
        ("onnxfit OnnxSGDRegressor()", OnnxSGDRegressor(random_state=0, verbose=int(progress))),
    ]:
        announce(f"fitting {name}")
        start = time.perf_counter()
        pipe = make_pipeline(StandardScaler(), estimator).fit(X_train, y_train)
        out(f"  {name:<44} {pipe.score(X_test, y_test):7.3f}   "
            f"({time.perf_counter() - start:.2f} s)")

    scaler = StandardScaler().fit(X_train)
    X_train_s = scaler.transform(X_train).astype(np.float32)
    X_test_s = scaler.transform(X_test).astype(np.float32)
    announce("fitting scikit-learn MLPRegressor(32) and converting it to ONNX")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPRegressor(
            hidden_layer_sizes=(32,), max_iter=100, learning_rate_init=0.01, random_state=0
        ).fit(X_train_s, y_train)
    onnx_mlp = _convert(mlp, X_train_s)
    trained = OnnxSGDRegressor(
        onnx_mlp, learning_rate=LearningRateSGDNesterov(eta0=1e-4), batch_size=32,
        early_stopping=True, n_iter_no_change=10, random_state=0, verbose=int(progress),
    )
    announce("training the converted MLPRegressor with onnxfit")
    start = time.perf_counter()
    trained.fit(X_train_s, y_train)
    elapsed = time.perf_counter() - start
    out(f"  {'scikit-learn MLPRegressor(32), 100 epochs':<44} {mlp.score(X_test_s, y_test):7.3f}")
    out(f"  {'  same graph via skl2onnx, trained by onnxfit':<44} "
        f"{trained.score(X_test_s, y_test):7.3f}   ({trained.n_iter_} epochs, {elapsed:.2f} s)")
    exported = _exported_predictions(trained.to_onnx(), X_test_s)[0].ravel()
    gap = float(np.max(np.abs(exported - trained.predict(X_test_s))))
    out(f"  exported graph vs predict(): max |difference| = {gap:.2g}")


def classification_demo(out=print, progress=False):
    """Digits: an MLPClassifier converted with its ZipMap output, trained further.

    Parameters
    ----------
    out : callable, default=print
        Writes one line of the table.
    progress : bool, default=False
        Announce each step on stderr and show onnxfit's progress bars.
    """
    announce = _announcer(progress)
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from . import OnnxSGDClassifier

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y
    )
    scaler = StandardScaler().fit(X_train)
    X_train = scaler.transform(X_train).astype(np.float32)
    X_test = scaler.transform(X_test).astype(np.float32)
    out("== load_digits (10 classes, test accuracy) ==")
    for name, estimator in [
        ("scikit-learn SGDClassifier(loss='log_loss')", SGDClassifier(loss="log_loss", random_state=0)),
        ("onnxfit OnnxSGDClassifier()", OnnxSGDClassifier(random_state=0, verbose=int(progress))),
    ]:
        announce(f"fitting {name}")
        start = time.perf_counter()
        estimator.fit(X_train, y_train)
        out(f"  {name:<44} {estimator.score(X_test, y_test):7.3f}   "
            f"({time.perf_counter() - start:.2f} s)")
    announce("fitting scikit-learn MLPClassifier(32) and converting it to ONNX")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=3, random_state=0)
        mlp.fit(X_train, y_train)
    onnx_mlp = _convert(mlp, X_train)  # label + ZipMap probabilities
    clf = OnnxSGDClassifier(onnx_mlp, random_state=0, verbose=int(progress))
    announce("training the converted MLPClassifier with onnxfit")
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    elapsed = time.perf_counter() - start
    out(f"  {'scikit-learn MLPClassifier(32), 3 epochs':<44} {mlp.score(X_test, y_test):7.3f}")
    out(f"  {'  same graph via skl2onnx, trained by onnxfit':<44} "
        f"{clf.score(X_test, y_test):7.3f}   ({clf.n_iter_} epochs, {elapsed:.2f} s; "
        f"trained {clf.trained_output_!r})")
    label, _ = _exported_predictions(clf.to_onnx(), X_test)
    agree = float(np.mean(label == clf.predict(X_test)))
    out(f"  exported graph's labels agree with predict(): {agree:.0%}")


def main_demo(out=print, progress=False):
    """Run every part of the demo.

    Parameters
    ----------
    out : callable, default=print
        Writes one line of the table.
    progress : bool, default=False
        Announce each step on stderr and show onnxfit's progress bars
        (``onnxfit demo`` turns it on when stderr is a terminal).
    """
    regression_demo(out, progress)
    classification_demo(out, progress)
