"""Concurrency (issue 13): estimators fitted in threads at once, and one
fitted estimator predicting in threads at once, give the sequential results
bit for bit.

Each check runs several rounds, its threads released together by a barrier,
to give races (the lazily built onnxruntime sessions of a fresh or unpickled
estimator, the gradient-graph cache shared by all estimators) a chance to
show.
"""

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from onnxfit import OnnxSGDClassifier, OnnxSGDRegressor
from tests.graphs import mlp_graph
from tests.test_determinism import assert_bit_identical, bn_dropout_mlp, data

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

ROUNDS = 3


def _estimators():
    """Four different estimators: other graphs, engines, update rules."""
    common = {"max_iter": 3, "tol": None, "batch_size": 32, "random_state": 0}
    return [
        ("regressor", OnnxSGDRegressor(engine="fused", **common)),
        ("regressor", OnnxSGDRegressor(bn_dropout_mlp(4, 1), engine="forward_backward",
                                       learning_rate="adam", **common)),
        ("classifier", OnnxSGDClassifier(mlp_graph(4, [16], 3), engine="fused",
                                         learning_rate="nesterov", **common)),
        ("classifier", OnnxSGDClassifier(engine="forward_backward", loss="log_loss",
                                         **common)),
    ]


def _fit(kind, est):
    return est.fit(*data(kind))


def _together(n, fn, *args_per_thread):
    """``fn(*args)`` in ``n`` threads started at once; the results in order."""
    barrier = threading.Barrier(n)

    def run(*args):
        barrier.wait()
        return fn(*args)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(run, *args) for args in zip(*args_per_thread)]
        return [f.result() for f in futures]


def test_four_estimators_fitted_in_four_threads_equal_their_sequential_fits():
    sequential = [_fit(kind, est) for kind, est in _estimators()]
    for _ in range(ROUNDS):
        pairs = _estimators()
        concurrent = _together(4, _fit, [k for k, _ in pairs], [e for _, e in pairs])
        for reference, est in zip(sequential, concurrent):
            assert_bit_identical(reference, est)
            assert reference.loss_curve_ == est.loss_curve_


def test_the_same_estimator_fitted_in_four_threads_gives_four_equal_copies():
    """Four clones of one estimator (same graph, same gradient cache entry)."""
    kind, prototype = _estimators()[1]
    reference = _fit(kind, pickle.loads(pickle.dumps(prototype)))
    for _ in range(ROUNDS):
        clones = [pickle.loads(pickle.dumps(prototype)) for _ in range(4)]
        for est in _together(4, _fit, [kind] * 4, clones):
            assert_bit_identical(reference, est)


def _outputs(est, X):
    out = {"predict": est.predict(X)}
    for method in ("predict_proba", "decision_function"):
        if hasattr(est, method):
            out[method] = getattr(est, method)(X)
    return out


def _assert_same_outputs(expected, got):
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert expected[name].dtype == got[name].dtype, name
        assert expected[name].tobytes() == got[name].tobytes(), name


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_eight_threads_predicting_from_one_estimator_match_sequential(index):
    kind, est = _estimators()[index]
    X, _ = data(kind)
    est = _fit(kind, est)
    pickled = pickle.dumps(est)
    expected = _outputs(est, X)
    for _ in range(ROUNDS):
        # a warm estimator, its sessions built ...
        for got in _together(8, _outputs, [est] * 8, [X] * 8):
            _assert_same_outputs(expected, got)
        # ... and a fresh unpickled one: the first calls all race to build them
        fresh = pickle.loads(pickled)
        for got in _together(8, _outputs, [fresh] * 8, [X] * 8):
            _assert_same_outputs(expected, got)


def test_threads_predicting_different_rows_get_their_own_rows():
    """Batches of different sizes at once (each call's feeds are its own)."""
    kind, est = _estimators()[2]
    X, _ = data(kind)
    est = _fit(kind, est)
    chunks = [X[i * 7:(i + 1) * 7 + i] for i in range(8)]
    expected = [_outputs(est, chunk) for chunk in chunks]
    for _ in range(ROUNDS):
        fresh = pickle.loads(pickle.dumps(est))
        for want, got in zip(expected, _together(8, _outputs, [fresh] * 8, chunks)):
            _assert_same_outputs(want, got)


def test_predicting_while_another_estimator_trains():
    kind, est = _estimators()[0]
    X, _ = data(kind)
    est = _fit(kind, est)
    expected = _outputs(est, X)
    other_kind, other = _estimators()[3]
    reference = _fit(other_kind, _estimators()[3][1])

    def job(i):
        if i == 0:
            return _fit(other_kind, other)
        return [_outputs(est, X) for _ in range(5)]

    results = _together(4, job, range(4))
    assert_bit_identical(reference, results[0])
    for outputs in results[1:]:
        for got in outputs:
            _assert_same_outputs(expected, got)
