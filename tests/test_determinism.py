"""Determinism and state (issue 13).

* The same data and ``random_state`` give bit-identical weights: across two
  fits, across two processes, across pickling in the middle of a
  ``partial_fit`` sequence, and (to float tolerance) across the two
  gradient backends where both are installed.
* A failed ``fit``/``partial_fit`` (any exception, a KeyboardInterrupt
  between two steps included) leaves a fitted estimator exactly as it was.

Every fit runs at the estimator's default ``n_threads`` (None: onnxruntime's
one thread per core, or ``OMP_NUM_THREADS``), and no test needs
``n_threads=1``: a session splits its work the same way for the same thread
count, and the subprocess inherits this process's environment, hence its
thread count.  (Measured on 2 cores: these graphs, and an MLP 100-128-64-1
with batch 1024, even gave the same bits at n_threads=1 and 2; onnxruntime
does not promise that for every kernel, so no test relies on it.)
"""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfit import OnnxSGDClassifier, OnnxSGDRegressor
from onnxfit.engines import ENGINES as ENGINE_CLASSES
from onnxfit.gradient import available_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = sorted(ENGINE_CLASSES)
ESTIMATORS = ["regressor", "classifier"]
MODELS = ["linear", "bn_dropout"]

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


# -- data, graphs and fits ------------------------------------------------------------------
def bn_dropout_mlp(n_in, n_out, hidden=8, seed=0):
    """X (N, n_in) -> MatMul -> BatchNormalization (batch statistics) ->
    Relu -> Dropout(0.25, training) -> MatMul+Add -> Y (N, n_out): with
    ``train_mode=True`` every step draws a Dropout mask from random_state and
    updates the running statistics.  No bias before the BatchNormalization
    (as torch's ``Linear(bias=False)`` before ``BatchNorm1d``): its gradient
    is zero, its value rounding noise that differs between backends."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (n_in, hidden)).astype(f), "W0"),
        numpy_helper.from_array(np.ones(hidden, f), "gamma"),
        numpy_helper.from_array(np.zeros(hidden, f), "beta"),
        numpy_helper.from_array(np.zeros(hidden, f), "mean"),
        numpy_helper.from_array(np.ones(hidden, f), "var"),
        numpy_helper.from_array(np.array(0.25, f), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
        numpy_helper.from_array(rng.normal(0, 0.5, (hidden, n_out)).astype(f), "W1"),
        numpy_helper.from_array(np.zeros(n_out, f), "B1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["Z0"]),
        helper.make_node("BatchNormalization", ["Z0", "gamma", "beta", "mean", "var"],
                         ["N0", "running_mean", "running_var"], epsilon=1e-5, momentum=0.9,
                         training_mode=1),
        helper.make_node("Relu", ["N0"], ["H0"]),
        helper.make_node("Dropout", ["H0", "ratio", "training"], ["D0"]),
        helper.make_node("MatMul", ["D0", "W1"], ["XW1"]),
        helper.make_node("Add", ["XW1", "B1"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "bn_dropout_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", n_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def data(kind, n=150):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    score = X @ np.array([1.0, -2.0, 0.5, 0.0])
    if kind == "regressor":
        return X, (score + 0.1 * rng.normal(size=n)).astype(np.float32)
    return X, np.digitize(score, [-1.0, 1.0])  # 3 classes


def make(kind, model, engine, **params):
    """A fresh estimator; shuffled mini-batches (batch 32 of 150 rows, so
    a partial last batch) and a fixed random_state unless overridden."""
    onnx_model = None
    if model == "bn_dropout":
        onnx_model = bn_dropout_mlp(4, 1 if kind == "regressor" else 3)
    cls = OnnxSGDRegressor if kind == "regressor" else OnnxSGDClassifier
    params = {"max_iter": 3, "tol": None, "batch_size": 32, "shuffle": True,
              "random_state": 0, "engine": engine, **params}
    return cls(onnx_model, **params)


def state_arrays(est):
    """Every fitted array that training writes, by name."""
    arrays = {f"w:{k}": v for k, v in est.weights_.items()}
    arrays.update({f"s:{k}": v for k, v in est.running_statistics_.items()})
    for w, states in est._update_state.items():
        arrays.update({f"u:{w}:{k}": v for k, v in states.items()})
    return arrays


def assert_bit_identical(a, b):
    a, b = state_arrays(a), state_arrays(b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name


def fitted_state(est):
    """Everything training could change (all but the parameters and the
    onnxruntime caches), as bytes: arrays compared bit by bit."""
    params = set(est.get_params(deep=False))
    return pickle.dumps({k: v for k, v in vars(est).items()
                         if k not in params and k != "_runtime"})


def predictions(est, X):
    out = [est.predict(X)]
    if hasattr(est, "predict_proba"):
        out.append(est.predict_proba(X))
    return out


# -- same seed, same bits -------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ESTIMATORS)
def test_two_fits_are_bit_identical(kind, engine, model):
    X, y = data(kind)
    first = make(kind, model, engine).fit(X, y)
    second = make(kind, model, engine).fit(X, y)
    assert_bit_identical(first, second)
    assert first.loss_curve_ == second.loss_curve_
    for a, b in zip(predictions(first, X), predictions(second, X)):
        assert a.tobytes() == b.tobytes()
    # ... and the seed matters (shuffling, and the Dropout masks).
    other = make(kind, model, engine, random_state=1).fit(X, y)
    assert not np.array_equal(first.weights_[min(first.weights_)],
                              other.weights_[min(other.weights_)])


def test_dropout_masks_alone_depend_on_the_seed():
    """No shuffling: only the Dropout masks come from random_state."""
    X, y = data("regressor")
    fits = [make("regressor", "bn_dropout", "fused", shuffle=False, random_state=s).fit(X, y)
            for s in (0, 0, 1)]
    assert_bit_identical(fits[0], fits[1])
    assert not np.array_equal(fits[0].weights_["W0"], fits[2].weights_["W0"])


CONFIGS = [(k, e, m) for k in ESTIMATORS for e in ENGINES for m in MODELS]


def save_state(est, path):
    np.savez(path, **{name.replace(":", "__"): value
                      for name, value in sorted(state_arrays(est).items())})


_CHILD = textwrap.dedent("""
    import sys, warnings
    sys.path.insert(0, {root!r})
    warnings.simplefilter("ignore")
    from tests.test_determinism import CONFIGS, data, make, save_state
    for kind, engine, model in CONFIGS:
        X, y = data(kind)
        save_state(make(kind, model, engine).fit(X, y),
                   {out!r} + f"/{{kind}}-{{engine}}-{{model}}.npz")
""")


@pytest.fixture(scope="module")
def other_process(tmp_path_factory):
    """The fits of CONFIGS run by another Python process (one for all)."""
    out = tmp_path_factory.mktemp("other_process")
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT, out=str(out))],
                          check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind,engine,model", CONFIGS)
def test_a_fit_in_another_process_gives_the_same_bytes(kind, engine, model, other_process,
                                                       tmp_path):
    X, y = data(kind)
    save_state(make(kind, model, engine).fit(X, y), tmp_path / "here.npz")
    here = np.load(tmp_path / "here.npz")
    there = np.load(other_process / f"{kind}-{engine}-{model}.npz")
    assert sorted(here.files) == sorted(there.files)
    for name in here.files:
        assert here[name].dtype == there[name].dtype, name
        assert here[name].tobytes() == there[name].tobytes(), name


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ESTIMATORS)
def test_pickling_in_the_middle_of_partial_fit_changes_nothing(kind, engine, model):
    X, y = data(kind)
    extra = {"classes": np.unique(y)} if kind == "classifier" else {}
    straight = make(kind, model, engine)
    for _ in range(4):
        straight.partial_fit(X, y, **extra)
    resumed = make(kind, model, engine)
    resumed.partial_fit(X, y, **extra)
    resumed.partial_fit(X, y, **extra)
    resumed = pickle.loads(pickle.dumps(resumed))
    resumed.partial_fit(X, y, **extra)
    resumed.partial_fit(X, y, **extra)
    assert_bit_identical(straight, resumed)
    assert straight.n_iter_ == resumed.n_iter_ == 4 and straight.t_ == resumed.t_
    for a, b in zip(predictions(straight, X), predictions(resumed, X)):
        assert a.tobytes() == b.tobytes()


def test_a_fitted_estimator_pickles_to_the_same_predictions_and_bytes():
    X, y = data("classifier")
    est = make("classifier", "bn_dropout", "fused").fit(X, y)
    copy = pickle.loads(pickle.dumps(est))
    assert_bit_identical(est, copy)
    for a, b in zip(predictions(est, X), predictions(copy, X)):
        assert a.tobytes() == b.tobytes()
    # attribute by attribute (the whole pickles may differ in how pickle
    # memoises objects shared between attributes)
    for name in vars(est):
        if name != "_runtime":
            assert pickle.dumps(getattr(copy, name)) == pickle.dumps(getattr(est, name)), name


@pytest.mark.skipif(
    "onnxruntime-training" not in available_backends(),
    reason="the 'onnxruntime-training' gradient backend needs onnxruntime-training-cpu "
           "1.19.2 (not installed in this environment)",
)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ESTIMATORS)
def test_both_gradient_backends_give_the_same_weights(kind, engine, model):
    X, y = data(kind)
    ours = make(kind, model, engine, gradient_backend="onnxfit").fit(X, y)
    ort = make(kind, model, engine, gradient_backend="onnxruntime-training").fit(X, y)
    # each backend is deterministic on its own
    again = make(kind, model, engine, gradient_backend="onnxruntime-training").fit(X, y)
    assert_bit_identical(ort, again)
    a, b = state_arrays(ours), state_arrays(ort)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=2e-4, atol=2e-5, err_msg=name)


# -- a failed call leaves the estimator as it was ------------------------------------------
class _Interrupt:
    """Makes the engine's ``_step`` raise ``exc`` on its ``at``-th call."""

    def __init__(self, monkeypatch, engine, exc=KeyboardInterrupt, at=3):
        cls = ENGINE_CLASSES[engine]
        original = cls._step
        self.calls = 0

        def step(engine_self, buffers, parity):
            self.calls += 1
            if self.calls == at:
                raise exc("interrupted between steps")
            return original(engine_self, buffers, parity)

        monkeypatch.setattr(cls, "_step", step)


def _fitted(kind, model, engine):
    X, y = data(kind)
    est = make(kind, model, engine, max_iter=2).fit(X, y)
    extra = {"classes": np.unique(y)} if kind == "classifier" else {}
    est.partial_fit(X, y, **extra)
    return est, X, y


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("how", ["fit", "partial_fit", "warm_start_fit"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ESTIMATORS)
def test_an_interrupted_call_leaves_the_estimator_as_it_was(kind, engine, model, how, exc,
                                                            monkeypatch):
    est, X, y = _fitted(kind, model, engine)
    before, predicted = fitted_state(est), predictions(est, X)
    arrays = {k: v.copy() for k, v in state_arrays(est).items()}
    if how == "warm_start_fit":
        est.set_params(warm_start=True)
    with monkeypatch.context() as patch:
        interrupt = _Interrupt(patch, engine, exc)
        with pytest.raises(exc):
            (est.partial_fit if how == "partial_fit" else est.fit)(X, y)
        assert interrupt.calls == 3
    after = state_arrays(est)
    assert sorted(after) == sorted(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert fitted_state(est) == before
    for a, b in zip(predictions(est, X), predicted):
        assert a.tobytes() == b.tobytes()
    # ... and training goes on as if the call had never happened.
    est.set_params(warm_start=False)
    twin = pickle.loads(pickle.dumps(est))
    est.partial_fit(X, y)
    twin.partial_fit(X, y)
    assert_bit_identical(est, twin)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ESTIMATORS)
def test_bad_targets_on_a_later_partial_fit_change_nothing(kind, engine):
    est, X, y = _fitted(kind, "linear", engine)
    before, predicted = fitted_state(est), predictions(est, X)
    bad = y.astype(np.float64).copy()
    bad[5] = np.nan
    if kind == "classifier":
        bad = np.full(len(y), 7)  # a class partial_fit was not told about
    with pytest.raises(ValueError):
        est.partial_fit(X, bad)
    with pytest.raises(ValueError):
        est.partial_fit(X, y[:10])  # inconsistent lengths
    nan_X = X.copy()
    nan_X[3, 1] = np.nan
    with pytest.raises(ValueError):
        est.fit(nan_X, y)  # a refit on bad features
    assert fitted_state(est) == before
    for a, b in zip(predictions(est, X), predicted):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("engine", ENGINES)
def test_an_interrupted_call_after_a_change_of_update_rule(engine, monkeypatch):
    """set_params to an update rule with other state, a partial_fit
    interrupted after the engine was rebuilt for it: the next partial_fit
    must still train (the restored update-rule state must match the engine
    the next call uses)."""
    X, y = data("regressor")
    est = make("regressor", "linear", engine, learning_rate="sgd", max_iter=2).fit(X, y)
    before = fitted_state(est)
    est.set_params(learning_rate="adam")
    with monkeypatch.context() as patch:
        _Interrupt(patch, engine)
        with pytest.raises(KeyboardInterrupt):
            est.partial_fit(X, y)
    assert fitted_state(est) == before
    est.partial_fit(X, y)
    reference = make("regressor", "linear", engine, learning_rate="sgd", max_iter=2).fit(X, y)
    reference.set_params(learning_rate="adam")
    reference.partial_fit(X, y)
    assert_bit_identical(est, reference)
