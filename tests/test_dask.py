"""Scale-out on dask (issue 12): distributed search and out-of-core training.

These tests need the ``dask`` extra (``pip install "onnxfit[dask]"``): they
skip without it, so the lanes without the extra skip this file and the dask
lane runs it.

* ``GridSearchCV`` / ``RandomizedSearchCV`` run on a ``LocalCluster`` of two
  worker processes through joblib's dask backend and give the local run's
  ``cv_results_`` scores and best parameters, exactly (``n_threads=1`` and a
  fixed ``random_state``: every fit is deterministic wherever it runs).
* ``partial_fit`` streams a 20,000-row dataset written chunk by chunk to
  Parquet (20 files) or to a ``.npy`` memmap, one chunk of 1,000 rows at a
  time (a dask DataFrame's partitions, a dask array's blocks, and
  ``dask_ml.wrappers.Incremental``), and reaches the held-out quality of the
  in-memory ``fit`` of the same estimator.  Only that reference fit loads
  the data whole.
"""

import os
import warnings

import numpy as np
import pytest

_REASON = 'needs the dask extra: pip install "onnxfit[dask]"'
dask = pytest.importorskip("dask", reason=_REASON)
da = pytest.importorskip("dask.array", reason=_REASON)
dd = pytest.importorskip("dask.dataframe", reason=_REASON)
distributed = pytest.importorskip("distributed", reason=_REASON)
pytest.importorskip("pyarrow", reason=_REASON)

import joblib  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import accuracy_score, r2_score  # noqa: E402
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV  # noqa: E402

from onnxfit import OnnxSGDClassifier, OnnxSGDRegressor  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
    # dask's Parquet reader, with pandas 3.1
    pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index"),
]

N_FEATURES = 10
N_CHUNKS = 20
CHUNK_ROWS = 1_000
N_ROWS = N_CHUNKS * CHUNK_ROWS
N_CLASSES = 3
FEATURES = [f"x{j}" for j in range(N_FEATURES)]
CLASSES = list(range(N_CLASSES))
N_PASSES = 3

# The streamed model must reach the in-memory fit's held-out quality within:
# R2 0.01 (in-memory 0.974, streamed 0.974: 0.01 is ~40% of the variance the
# best model leaves), accuracy 0.02 (in-memory 0.782, streamed 0.784: 0.02 is
# ~2 standard errors of an accuracy near 0.78 on 2,000 held-out rows).
R2_TOLERANCE = 0.01
ACCURACY_TOLERANCE = 0.02

_truth = np.random.default_rng(12)
_COEF = _truth.normal(size=N_FEATURES)
_CLASS_COEF = _truth.normal(size=(N_FEATURES, N_CLASSES))


def _chunk(rng, n):
    """n rows: float32 features, a regression target and a 3-class label."""
    X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    y = X @ _COEF + 0.5 * rng.normal(size=n)
    label = np.argmax(X @ _CLASS_COEF + rng.gumbel(size=(n, N_CLASSES)), axis=1)
    return X, y, label


def _config(kind):
    """(estimator, target column, metric, tolerance, first partial_fit kwargs)."""
    if kind == "regressor":
        return (OnnxSGDRegressor(random_state=0, n_threads=1), "y", r2_score,
                R2_TOLERANCE, {})
    return (OnnxSGDClassifier(random_state=0, n_threads=1), "label", accuracy_score,
            ACCURACY_TOLERANCE, {"classes": CLASSES})


# ---------------------------------------------------------------- fixtures --

@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The dataset, written chunk by chunk: never whole in memory.

    ``parquet/``: 20 Parquet files of 1,000 rows (features, y, label);
    ``X.npy``, ``y.npy``, ``label.npy``: the same rows, filled through
    memmaps one chunk at a time.
    """
    root = tmp_path_factory.mktemp("dask_data")
    (root / "parquet").mkdir()
    X_mm = np.lib.format.open_memmap(root / "X.npy", mode="w+", dtype=np.float32,
                                     shape=(N_ROWS, N_FEATURES))
    y_mm = np.lib.format.open_memmap(root / "y.npy", mode="w+", dtype=np.float64,
                                     shape=(N_ROWS,))
    label_mm = np.lib.format.open_memmap(root / "label.npy", mode="w+", dtype=np.int64,
                                         shape=(N_ROWS,))
    rng = np.random.default_rng(0)
    for i in range(N_CHUNKS):
        X, y, label = _chunk(rng, CHUNK_ROWS)
        frame = pd.DataFrame(X, columns=FEATURES)
        frame["y"] = y
        frame["label"] = label
        frame.to_parquet(root / "parquet" / f"part-{i:03d}.parquet", index=False)
        rows = slice(i * CHUNK_ROWS, (i + 1) * CHUNK_ROWS)
        X_mm[rows], y_mm[rows], label_mm[rows] = X, y, label
    for mm in (X_mm, y_mm, label_mm):
        mm.flush()
    del X_mm, y_mm, label_mm
    return root


@pytest.fixture(scope="module")
def holdout():
    X, y, label = _chunk(np.random.default_rng(1), 2_000)
    return {"X": X, "y": y, "label": label}


@pytest.fixture(scope="module")
def in_memory_scores(stored, holdout):
    """The reference: each estimator's ``fit`` on the whole dataset."""
    whole = pd.read_parquet(stored / "parquet")
    scores = {}
    for kind in ("regressor", "classifier"):
        est, target, metric, _, _ = _config(kind)
        est.fit(whole[FEATURES].to_numpy(), whole[target].to_numpy())
        scores[kind] = metric(holdout[target], est.predict(holdout["X"]))
    return scores


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes (1 thread each), no dashboard.

    Not the default client: the out-of-core tests compute on the local
    scheduler whatever order the tests run in.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1,
                                           processes=True, dashboard_address=None)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _search_data(kind):
    X, y, label = _chunk(np.random.default_rng(2), 300)
    return X, (y if kind == "regressor" else label)


def _local_and_distributed(search, X, y, client):
    """Fit a clone of ``search`` locally and one on the cluster."""
    from sklearn.base import clone

    local = clone(search).set_params(n_jobs=1).fit(X, y)
    with distributed.get_task_stream(client) as tasks:
        with joblib.parallel_config(backend="dask", client=client):
            remote = clone(search).set_params(n_jobs=-1).fit(X, y)
    return local, remote, tasks.data


def _check_same_search(local, remote, tasks, client):
    np.testing.assert_array_equal(remote.cv_results_["mean_test_score"],
                                  local.cv_results_["mean_test_score"])
    for split in range(3):
        key = f"split{split}_test_score"
        np.testing.assert_array_equal(remote.cv_results_[key], local.cv_results_[key])
    assert remote.best_params_ == local.best_params_
    assert remote.best_index_ == local.best_index_
    # the fits ran in the cluster's worker processes
    workers = set(client.scheduler_info()["workers"])
    ran_on = {t["worker"] for t in tasks}
    assert tasks and ran_on <= workers, (ran_on, workers)
    assert os.getpid() not in client.run(os.getpid).values()


# ------------------------------------------------------- distributed search --

def test_grid_search_on_dask_cluster_matches_local(client):
    X, y = _search_data("regressor")
    search = GridSearchCV(
        OnnxSGDRegressor(max_iter=15, random_state=0, n_threads=1),
        {"alpha": [1e-4, 1e-2], "eta0": [1e-2, 1e-3]}, cv=3)
    local, remote, tasks = _local_and_distributed(search, X, y, client)
    _check_same_search(local, remote, tasks, client)
    np.testing.assert_array_equal(remote.predict(X), local.predict(X))


def test_randomized_search_on_dask_cluster_matches_local(client):
    X, y = _search_data("classifier")
    search = RandomizedSearchCV(
        OnnxSGDClassifier(max_iter=10, random_state=0, n_threads=1),
        {"alpha": [1e-5, 1e-4, 1e-3, 1e-2], "batch_size": [16, 32, 64],
         "learning_rate": ["sgd", "nesterov", "adam"]},
        n_iter=4, cv=3, random_state=0)
    local, remote, tasks = _local_and_distributed(search, X, y, client)
    _check_same_search(local, remote, tasks, client)
    np.testing.assert_array_equal(remote.predict_proba(X), local.predict_proba(X))


# ----------------------------------------------------------- out of core --

def _stream(est, chunks, target, first_kwargs, sizes):
    """``partial_fit`` over ``chunks()`` (pairs of computed X, y), N_PASSES times."""
    kwargs = dict(first_kwargs)
    for _ in range(N_PASSES):
        for X, y in chunks():
            sizes.append(len(X))
            est.partial_fit(X, y, **kwargs)
            kwargs = {}
    return est


def _check_streamed(kind, est, sizes, holdout, in_memory_scores):
    _, target, metric, tolerance, _ = _config(kind)
    # every chunk was computed on its own: at most 1/20 of the rows each
    assert len(sizes) == N_PASSES * N_CHUNKS
    assert max(sizes) == CHUNK_ROWS < N_ROWS / 10
    score = metric(holdout[target], est.predict(holdout["X"]))
    assert score >= in_memory_scores[kind] - tolerance, (score, in_memory_scores[kind])


@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_partial_fit_over_dask_dataframe_partitions(kind, stored, holdout, in_memory_scores):
    est, target, _, _, first = _config(kind)
    ddf = dd.read_parquet(stored / "parquet")
    assert ddf.npartitions == N_CHUNKS

    def chunks():
        for i in range(ddf.npartitions):
            part = ddf.partitions[i].compute()
            yield part[FEATURES].to_numpy(), part[target].to_numpy()

    sizes = []
    with dask.config.set(scheduler="synchronous"):
        _stream(est, chunks, target, first, sizes)
    _check_streamed(kind, est, sizes, holdout, in_memory_scores)


def _memmap_arrays(stored, target):
    """Dask arrays over the .npy memmaps, one block per chunk."""
    X = da.from_array(np.load(stored / "X.npy", mmap_mode="r"),
                      chunks=(CHUNK_ROWS, N_FEATURES))
    y = da.from_array(np.load(stored / f"{target}.npy", mmap_mode="r"), chunks=CHUNK_ROWS)
    assert X.numblocks == (N_CHUNKS, 1) and y.numblocks == (N_CHUNKS,)
    return X, y


@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_partial_fit_over_dask_array_blocks(kind, stored, holdout, in_memory_scores):
    est, target, _, _, first = _config(kind)
    X, y = _memmap_arrays(stored, target)

    def chunks():
        for i in range(X.numblocks[0]):
            yield dask.compute(X.blocks[i], y.blocks[i])

    sizes = []
    with dask.config.set(scheduler="synchronous"):
        _stream(est, chunks, target, first, sizes)
    _check_streamed(kind, est, sizes, holdout, in_memory_scores)


# ------------------------------------------------------------------ dask-ml --

@pytest.mark.parametrize("kind", ["regressor", "classifier"])
def test_dask_ml_incremental(kind, stored, holdout, in_memory_scores):
    """``Incremental.fit`` then ``partial_fit``: N_PASSES passes over the blocks.

    Scored with 'neg_mean_squared_error' / 'accuracy': dask-ml's r2 scorer
    fails on current dask (see test_dask_ml_r2_scorer_known_failure).
    """
    wrappers = pytest.importorskip("dask_ml.wrappers", reason=_REASON)
    est, target, metric, tolerance, first = _config(kind)
    X, y = _memmap_arrays(stored, target)
    scoring = "neg_mean_squared_error" if kind == "regressor" else "accuracy"
    inc = wrappers.Incremental(est, scoring=scoring, shuffle_blocks=False)
    with dask.config.set(scheduler="synchronous"):
        inc.fit(X, y, **first)
        for _ in range(N_PASSES - 1):
            inc.partial_fit(X, y)
        lazy = inc.predict(da.from_array(holdout["X"], chunks=500))
        assert isinstance(lazy, da.Array)
        predicted = lazy.compute()
        dask_ml_score = inc.score(da.from_array(holdout["X"], chunks=500),
                                  da.from_array(holdout[target], chunks=500))
    assert inc.estimator_.n_iter_ == N_PASSES * N_CHUNKS
    score = metric(holdout[target], predicted)
    assert score >= in_memory_scores[kind] - tolerance, (score, in_memory_scores[kind])
    if kind == "classifier":
        assert dask_ml_score == pytest.approx(score)
    else:
        mse = np.mean((holdout["y"] - predicted) ** 2)
        assert dask_ml_score == pytest.approx(-mse, rel=1e-6)


def test_dask_ml_incremental_accepts_dask_dataframe(stored):
    """fit/predict take a dask DataFrame as they are (scoring one does not)."""
    wrappers = pytest.importorskip("dask_ml.wrappers", reason=_REASON)
    ddf = dd.read_parquet(stored / "parquet")
    inc = wrappers.Incremental(OnnxSGDRegressor(random_state=0, n_threads=1))
    with dask.config.set(scheduler="synchronous"):
        inc.fit(ddf[FEATURES], ddf["y"])
        predicted = inc.predict(ddf[FEATURES].partitions[0]).compute()
    assert inc.estimator_.n_iter_ == N_CHUNKS
    assert predicted.shape == (CHUNK_ROWS,)


def test_dask_ml_r2_scorer_is_broken_upstream_as_docs_dask_md_says():
    """Incremental's default regressor score is dask-ml's r2_score, which
    fails on dask >= 2025.2.0 (dask/dask-ml#1012): docs/dask.md says so and
    gives the workaround.  When this test fails, dask-ml was fixed: update
    the page and drop the test."""
    metrics = pytest.importorskip("dask_ml.metrics", reason=_REASON)
    y = da.from_array(np.arange(100.0), chunks=10)
    with pytest.raises(ValueError, match="cannot broadcast"):
        metrics.r2_score(y, y + 1)
