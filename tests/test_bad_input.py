"""Bad input (issue 13): a table, each row a test.

Each row is a call that must fail with a ``ValueError``/``TypeError`` (or
scikit-learn's ``NotFittedError``; ``ImportError`` for a missing runtime
build) whose message names the problem.  For every row the test checks:

* the exception type and a regular expression on its message;
* that nothing the call was given changed: arrays, DataFrames, the model
  proto, update-rule, loss, schedule and penalty objects (the estimator's
  parameters included), compared before and after;
* that an estimator fitted before the call is left exactly as it was
  (``tests.test_divergence._fitted_state``);
* that no onnxruntime session was created or run during the call
  (``InferenceSession.__init__``, ``run`` and ``run_with_iobinding`` are
  recorded): every refusal comes from onnxfit's validation, before any
  onnxruntime call.  The runtime's limits (:func:`onnxfit.sessions.
  runtime_limits`, probed once per process and cached) are probed before
  the test, as they are by any earlier fit in a real session.

Decisions the rows document:

* sparse X is refused with scikit-learn's TypeError ("... dense data is
  required. Use '.toarray()' ...") at fit, partial_fit, predict and for
  X_val (documented in the estimators' docstrings and docs/faq.md);
* a model above the installed onnxruntime's opset is converted down when
  onnx can convert it, else refused with a ValueError naming the opsets;
  an IR version above the runtime's is lowered (the test at the end);
* the trained output's shape comes from onnx's shape inference on X's
  shapes, so that a y or an X that does not fit the graph is refused
  without onnxruntime; only where inference cannot tell does onnxfit run
  the graph on one sample, and then wraps onnxruntime's error in its own;
* the wrong onnxruntime build for ``gradient_backend`` is an ImportError
  (what a missing package raises), with the command that installs it;
* one sample is refused where it cannot work (one class, an early-stopping
  split, BatchNormalization's batch statistics); a regressor trains on one
  sample, as scikit-learn's SGDRegressor does;
* a column-vector y warns and predicts shape (n_samples,), as scikit-
  learn's SGD estimators do (not a row: the tests at the end).
"""

import copy
import pickle
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable

import joblib
import numpy as np
import onnx
import onnxruntime
from onnxruntime.capi import onnxruntime_pybind11_state as native
import pandas as pd
import pytest
import scipy.sparse
from onnx import TensorProto, helper, numpy_helper
from sklearn.base import BaseEstimator
from sklearn.exceptions import DataConversionWarning, NotFittedError
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.utils._param_validation import (
    InvalidParameterError,
    Interval,
    StrOptions,
    make_constraint,
)

from onnxfit import (
    ElasticNetPenalty,
    HuberLoss,
    LearningRateAdam,
    LearningRateSGD,
    OnnxSGDClassifier,
    OnnxSGDRegressor,
    StepSchedule,
)
from onnxfit.sessions import runtime_limits
from tests.graphs import _model, mlp_graph
from tests.test_divergence import _assert_unchanged, _fitted_state

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 5))
Y = X @ np.array([1.0, -2.0, 0.5, 0.0, 1.5]) + 0.1 * RNG.normal(size=40)
Y2 = np.column_stack([Y, -Y])
YC = np.arange(40) % 3


def _with(array, index, value):
    array = np.array(array, dtype=np.float64)
    array[index] = value
    return array


# -- graphs -------------------------------------------------------------------
def _mlp():
    return mlp_graph(5, [4], 1)


def _symbolic_width():
    """A MatMul graph whose input width is symbolic: only its weight (10, 1)
    says X needs 10 columns."""
    w = numpy_helper.from_array(np.ones((10, 1), np.float32), "W")
    return _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", "F"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [w],
    )


def _integer_output():
    model = _mlp()
    model.graph.node.append(helper.make_node("ArgMax", ["Y"], ["label"], axis=1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N", 1]))
    return model


def _sequence_output():
    model = _mlp()
    model.graph.node.append(helper.make_node("SequenceConstruct", ["Y"], ["seq"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_sequence_value_info(
        "seq", TensorProto.FLOAT, ["N", 1]))
    return model


def _map_output():
    """skl2onnx's ZipMap output: a sequence of maps."""
    model = _mlp()
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    model.graph.node.append(helper.make_node(
        "ZipMap", ["Y"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_value_info(
        "probabilities", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(
                TensorProto.FLOAT, [])))))
    return model


def _with_int_and_constant():
    """The MLP with an int64 shape initializer and a scalar constant."""
    model = _mlp()
    graph = model.graph
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ])
    graph.node.extend([
        helper.make_node("Mul", ["Y", "two"], ["Y2"]),
        helper.make_node("Reshape", ["Y2", "shape"], ["out"]),
    ])
    graph.node.insert(0, helper.make_node(
        "Constant", [], ["const"], value=numpy_helper.from_array(np.ones(1, np.float32))))
    graph.node.append(helper.make_node("Add", ["out", "const"], ["final"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("final", TensorProto.FLOAT, ["N", 1]))
    return model


def _no_weights():
    return _model(
        [helper.make_node("Relu", ["X"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 5])],
        [],
    )


def _no_gradient_rule(op="Shrink"):
    """The MLP then an operator without a gradient rule (Shrink), or
    ``op``."""
    model = _mlp()
    model.graph.node.append(helper.make_node(op, ["Y"], ["H"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("H", TensorProto.FLOAT, ["N", 1]))
    return model


def _too_new():
    model = _mlp()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 10_000))
    return model


def _integer_input():
    """An embedding lookup: int64 category indices into a (4, 1) table."""
    table = numpy_helper.from_array(np.ones((4, 1), np.float32), "E")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    return _model(
        [helper.make_node("Gather", ["E", "C"], ["G"], name="embedding"),
         helper.make_node("ReduceSum", ["G", "axes"], ["Y"], keepdims=0)],
        [helper.make_tensor_value_info("C", TensorProto.INT64, ["N", 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [table, axes],
    )


def _batch_norm():
    """X (N, 5) -> MatMul -> BatchNormalization -> Y (N, 1)."""
    inits = [numpy_helper.from_array(np.ones((5, 1), np.float32), "W")] + [
        numpy_helper.from_array(np.full(1, value, np.float32), name)
        for name, value in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))]
    return _model(
        [helper.make_node("MatMul", ["X", "W"], ["H"]),
         helper.make_node("BatchNormalization", ["H", "scale", "bias", "mean", "var"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        inits,
    )


def _objects():
    """Parameters that are objects the user keeps (compared after the call)."""
    return dict(learning_rate=LearningRateSGD(schedule=StepSchedule(step_size=3)),
                loss=HuberLoss(epsilon=0.5), penalty=ElasticNetPenalty(alpha=1e-3))


def _truncated():
    return _mlp().SerializeToString()[:-7]


def _corrupt():
    data = bytearray(_mlp().SerializeToString())
    data[10:14] = b"\xff\xff\xff\xff"
    return bytes(data)


def _not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("not a model\n")
    return path


# -- estimators ---------------------------------------------------------------
def R(**params):
    return OnnxSGDRegressor(max_iter=2, tol=None, random_state=0, **params)


def C(**params):
    return OnnxSGDClassifier(max_iter=2, tol=None, random_state=0, **params)


def fitted_R(**params):
    return R(**params).fit(X, Y)


def fitted_C(**params):
    return C(**params).partial_fit(X, YC, classes=[0, 1, 2])


@dataclass
class Row:
    """One bad call: ``estimator(tmp_path)`` (fitted or not), then
    ``getattr(estimator, method)(*args, **kwargs)`` raises ``error`` with a
    message matching ``match``."""

    id: str
    estimator: Callable
    method: str
    args: tuple
    kwargs: dict
    error: type
    match: str


def _row(id, estimator, method, args, error, match, kw=None):
    """``estimator``: a factory, of ``tmp_path`` when it needs a folder;
    ``kw``: the call's keyword arguments."""
    make = estimator if _takes_path(estimator) else (lambda tmp_path, e=estimator: e())
    return Row(id, make, method, args, kw or {}, error, match)


def _takes_path(function):
    return getattr(function, "__code__", None) is not None and \
        function.__code__.co_varnames[:1] == ("tmp_path",)


N = X.shape[0]
# scikit-learn's message from 1.7, onnxfit's before.
ZERO_WEIGHTS = ("Sample weights must contain at least one non-zero number"
                "|sample_weight is all zeros")
X_DF = pd.DataFrame(X, columns=list("abcde"))

ROWS = [
    # -- non-finite values ------------------------------------------------
    _row("nan-X", R, "fit", (_with(X, (3, 1), np.nan), Y), ValueError, "Input X contains NaN"),
    _row("inf-X", R, "fit", (_with(X, (3, 1), np.inf), Y), ValueError, "Input X contains infinity"),
    _row("nan-X-dataframe", R, "fit", (X_DF.where(X_DF > -2), Y), ValueError,
         "Input X contains NaN"),
    _row("nan-X-graph", lambda: R(onnx_model=_mlp()), "fit", (_with(X, 0, np.nan), Y),
         ValueError, "Input X contains NaN"),
    _row("nan-y", R, "fit", (X, _with(Y, 5, np.nan)), ValueError, "Input y contains NaN"),
    _row("inf-y", R, "fit", (X, _with(Y, 5, -np.inf)), ValueError, "Input y contains infinity"),
    _row("nan-y-classifier", C, "fit", (X, _with(YC, 5, np.nan)), ValueError,
         "Input y contains NaN"),
    _row("nan-sample_weight", R, "fit", (X, Y, _with(np.ones(N), 2, np.nan)), ValueError,
         "Input sample_weight contains NaN"),
    _row("inf-sample_weight", R, "fit", (X, Y, _with(np.ones(N), 2, np.inf)), ValueError,
         "Input sample_weight contains infinity"),
    _row("nan-X_val", R, "fit", (X, Y), ValueError, "Input X_val contains NaN",
         kw={"X_val": _with(X[:5], 0, np.nan), "y_val": Y[:5]}),
    _row("inf-y_val", R, "fit", (X, Y), ValueError, "Input y_val contains infinity",
         kw={"eval_set": [(X[:5], _with(Y[:5], 0, np.inf))]}),
    _row("nan-X_val-partial_fit", fitted_C, "partial_fit", (X, YC), ValueError,
         "Input X_val contains NaN", kw={"X_val": _with(X[:5], 0, np.nan), "y_val": YC[:5]}),
    _row("nan-X-predict", fitted_R, "predict", (_with(X, 0, np.nan),), ValueError,
         "Input X contains NaN"),
    _row("inf-X-decision_function", fitted_C, "decision_function", (_with(X, 0, np.inf),),
         ValueError, "Input X contains infinity"),
    _row("nan-X-dict-predict", lambda: fitted_R(onnx_model=_mlp()), "predict",
         ({"X": _with(X, 0, np.nan)},), ValueError, r"Input X contains NaN"),
    _row("nan-y-losses", fitted_R, "losses", (X, _with(Y, 0, np.nan)), ValueError,
         "Input y contains NaN"),
    _row("nan-X-objects", lambda: R(**_objects()), "fit", (_with(X, 1, np.nan), Y), ValueError,
         "Input X contains NaN"),
    _row("nan-X-refit-objects", lambda: fitted_R(**_objects()), "fit",
         (_with(X, 1, np.nan), Y), ValueError, "Input X contains NaN"),
    _row("nan-X-refit-dataframe", lambda: R().fit(X_DF, Y), "fit",
         (X_DF.where(X_DF > -2), Y), ValueError, "Input X contains NaN"),
    _row("nan-X-partial_fit-dataframe", lambda: R().fit(X_DF, Y), "partial_fit",
         (X_DF.where(X_DF > -2), Y), ValueError, "Input X contains NaN"),
    # -- sample weights ---------------------------------------------------
    _row("negative-sample_weight", R, "fit", (X, Y, _with(np.ones(N), 0, -1.0)), ValueError,
         "Negative values in data passed to `?sample_weight`?"),
    _row("short-sample_weight", R, "fit", (X, Y, np.ones(N - 1)), ValueError,
         r"sample_weight.shape == \(39,\), expected \(40,\)"),
    _row("2d-sample_weight", R, "fit", (X, Y, np.ones((N, 2))), ValueError,
         "Sample weights must be 1D array or scalar"),
    _row("zero-sample_weight", R, "fit", (X, Y, np.zeros(N)), ValueError,
         ZERO_WEIGHTS),
    _row("zero-sample_weight-partial_fit", fitted_R, "partial_fit", (X, Y, np.zeros(N)),
         ValueError, ZERO_WEIGHTS),
    _row("string-sample_weight", R, "fit", (X, Y, np.array(["a"] * N)), ValueError,
         "could not convert string to float"),
    # -- sizes --------------------------------------------------------------
    _row("empty-X", R, "fit", (X[:0], Y[:0]), ValueError, r"0 sample\(s\)"),
    _row("empty-X-graph", lambda: R(onnx_model=_mlp()), "fit", (X[:0], Y[:0]), ValueError,
         r"0 sample\(s\)"),
    _row("empty-X-predict", fitted_R, "predict", (X[:0],), ValueError, r"0 sample\(s\)"),
    _row("empty-X-dict", lambda: R(onnx_model=_mlp()), "fit", ({"X": X[:0]}, Y[:0]),
         ValueError, r"0 sample\(s\)"),
    _row("zero-columns", R, "fit", (X[:, :0], Y), ValueError, r"0 feature\(s\)"),
    _row("one-sample-classifier", C, "fit", (X[:1], YC[:1]), ValueError,
         "The number of classes has to be greater than one"),
    _row("one-sample-early-stopping", lambda: R(early_stopping=True), "fit", (X[:1], Y[:1]),
         ValueError, "leaves an empty training or validation set for 1 samples"),
    _row("one-sample-batch-norm", lambda: fitted_R(onnx_model=_batch_norm()), "partial_fit",
         (X[:1], Y[:1]), ValueError, "a batch of one sample"),
    _row("y-length", R, "fit", (X, Y[:-1]), ValueError, "inconsistent numbers of samples"),
    _row("1d-X", R, "fit", (X[:, 0], Y), ValueError, "Expected 2D array, got 1D array"),
    _row("scalar-X", R, "fit", (1.0, Y), ValueError, "Expected 2D array, got scalar"),
    # -- widths ---------------------------------------------------------------
    _row("width-fit-graph", lambda: R(onnx_model=_mlp()), "fit", (X[:, :4], Y), ValueError,
         r"X has 4 columns \(features\) but the graph input 'X' \(n, 5\) takes 5"),
    _row("width-fit-symbolic", lambda: R(onnx_model=_symbolic_width()), "fit", (X, Y),
         ValueError, r"X does not fit the graph: fed as \{'X': \(n, 5\)\}.*Incompatible "
         r"dimensions"),
    _row("width-predict", fitted_R, "predict", (X[:, :4],), ValueError,
         "X has 4 features, but OnnxSGDRegressor is expecting 5 features"),
    _row("width-predict-graph", lambda: fitted_R(onnx_model=_mlp()), "predict",
         (np.ones((3, 6)),), ValueError,
         "X has 6 features, but OnnxSGDRegressor is expecting 5 features"),
    _row("width-predict-classifier", fitted_C, "predict_proba", (X[:, :3],), ValueError,
         "X has 3 features, but OnnxSGDClassifier is expecting 5 features"),
    _row("width-partial_fit", fitted_R, "partial_fit", (X[:, :4], Y), ValueError,
         "X has 4 features, but OnnxSGDRegressor is expecting 5 features"),
    _row("width-X_val", R, "fit", (X, Y), ValueError,
         "X has 4 features, but OnnxSGDRegressor is expecting 5 features",
         kw={"X_val": X[:5, :4], "y_val": Y[:5]}),
    _row("dataframe-columns-predict", lambda: R().fit(X_DF, Y), "predict",
         (X_DF.rename(columns={"a": "z"}),), ValueError, "Feature names unseen at fit time"),
    _row("dict-missing-input", lambda: R(onnx_model=_mlp()), "fit", ({"Z": X}, Y), ValueError,
         r"unknown keys: \['Z'\].*missing: \['X'\]"),
    _row("nd-X-wrong-sample-shape", lambda: R(onnx_model=_mlp()), "fit",
         (X.reshape(40, 5, 1), Y), ValueError, r"X has samples of shape \(5, 1\)"),
    # -- targets ----------------------------------------------------------------
    _row("y-outputs-graph", lambda: R(onnx_model=_mlp()), "fit", (X, Y2), ValueError,
         r"The graph's output 'Y' has shape \(n, 1\) but y has shape \(n, 2\)"),
    _row("y-outputs-refit-graph", lambda: fitted_R(onnx_model=_mlp()), "fit", (X, Y2),
         ValueError, r"The graph's output 'Y' has shape \(n, 1\) but y has shape \(n, 2\)"),
    _row("y-outputs-warm-start", lambda: fitted_R(onnx_model=_mlp(), warm_start=True), "fit",
         (X, Y2), ValueError, r"y has 2 dimensions|y has 2 value\(s\) per sample"),
    _row("y-outputs-partial_fit", fitted_R, "partial_fit", (X, Y2), ValueError,
         r"y has 2 value\(s\) per sample, but the estimator was fitted on targets of "
         r"shape \('n', 1\)|y has 2 dimensions"),
    _row("y-outputs-classifier", lambda: C(onnx_model=mlp_graph(5, [4], 4)), "fit", (X, YC),
         ValueError, r"3 classes|has 4 columns|4 scores"),
    _row("y-continuous-classifier", C, "fit", (X, Y), ValueError, "Unknown label type"),
    _row("y-string-regressor", R, "fit", (X, np.array(["a"] * N)), ValueError,
         "could not convert string to float"),
    _row("y-none", R, "fit", (X, None), ValueError, "requires y to be passed"),
    # -- dtypes -------------------------------------------------------------------
    _row("object-X", R, "fit", (np.array([["a", 1.0]] * N, dtype=object), Y), ValueError,
         "could not convert string to float"),
    _row("string-X", R, "fit", (np.array([["a", "b"]] * N), Y), ValueError,
         "could not convert string to float|dtype='numeric' is not compatible"),
    _row("string-dataframe", lambda: R(onnx_model=_mlp()), "fit",
         (X_DF.assign(c=["x"] * N), Y), ValueError, "could not convert string to float"),
    _row("X-overflows-float32-graph", lambda: R(onnx_model=_mlp()), "fit",
         (_with(X, 0, 1e300), Y), ValueError,
         r"Input X contains infinity or a value too large for dtype\('float32'\)"),
    _row("X-overflows-float32-predict", lambda: fitted_R(onnx_model=_mlp()), "predict",
         (_with(X, 0, 1e300),), ValueError,
         r"Input X contains infinity or a value too large for dtype\('float32'\)"),
    _row("complex-X", R, "fit", (X + 1j, Y), ValueError, "Complex data not supported"),
    _row("float-into-integer-input", lambda: R(onnx_model=_integer_input()), "fit",
         (np.full((N, 2), 0.5), Y), ValueError,
         "integer graph input 'C' .* not whole numbers"),
    _row("index-out-of-table", lambda: R(onnx_model=_integer_input()), "fit",
         (np.full((N, 2), 4), Y), ValueError,
         r"'C' category indices from 4 to 4, but Gather node 'embedding' reads them as rows "
         r"of 'E', which has 4: indices must lie in \[0, 3\]"),
    _row("index-below-table-dict", lambda: R(onnx_model=_integer_input()), "fit",
         ({"C": np.full((N, 2), -5)}, Y), ValueError, r"category indices from -5 to -5"),
    _row("index-out-of-table-predict",
         lambda: R(onnx_model=_integer_input()).fit(np.ones((N, 2)), Y), "predict",
         (np.full((3, 2), 9),), ValueError, r"category indices from 9 to 9"),
    _row("index-out-of-table-X_val", lambda: R(onnx_model=_integer_input()), "fit",
         (np.ones((N, 2)), Y), ValueError, r"category indices from 0 to 7",
         kw={"X_val": np.array([[0, 7]] * 3), "y_val": Y[:3]}),
    _row("string-dict-input", lambda: R(onnx_model=_mlp()), "fit",
         ({"X": np.array([["a"] * 5] * N)}, Y), ValueError,
         r"X\['X'\] holds <U1 values|could not convert string to float"),
    # -- sparse ---------------------------------------------------------------------
    _row("sparse-X", R, "fit", (scipy.sparse.csr_matrix(X), Y), TypeError,
         r"Sparse data was passed.*dense data is required.*\.toarray\(\)"),
    _row("sparse-X-graph", lambda: R(onnx_model=_mlp()), "fit", (scipy.sparse.csr_matrix(X), Y),
         TypeError, r"Sparse data was passed.*\.toarray\(\)"),
    _row("sparse-X-predict", fitted_R, "predict", (scipy.sparse.csr_matrix(X),), TypeError,
         r"Sparse data was passed.*\.toarray\(\)"),
    _row("sparse-X-classifier", C, "fit", (scipy.sparse.coo_matrix(X), YC), TypeError,
         r"Sparse data was passed.*\.toarray\(\)"),
    _row("sparse-X-partial_fit", fitted_C, "partial_fit", (scipy.sparse.csr_matrix(X), YC),
         TypeError, r"Sparse data was passed.*\.toarray\(\)"),
    _row("sparse-X-predict_proba", fitted_C, "predict_proba", (scipy.sparse.csc_matrix(X),),
         TypeError, r"Sparse data was passed.*\.toarray\(\)"),
    _row("sparse-X-dict", lambda: R(onnx_model=_mlp()), "fit",
         ({"X": scipy.sparse.csr_matrix(X)}, Y), TypeError, r"Sparse data was passed"),
    _row("sparse-X_val", R, "fit", (X, Y), TypeError, r"Sparse data was passed",
         kw={"X_val": scipy.sparse.csr_matrix(X[:5]), "y_val": Y[:5]}),
    # -- model files -------------------------------------------------------------------
    _row("path-missing", lambda tmp_path: R(onnx_model=tmp_path / "missing.onnx"), "fit",
         (X, Y), ValueError, "missing.onnx' does not exist"),
    _row("path-directory", lambda tmp_path: R(onnx_model=str(tmp_path)), "fit", (X, Y),
         ValueError, "is a directory, not an ONNX model"),
    _row("path-not-onnx", lambda tmp_path: R(onnx_model=_not_onnx(tmp_path)), "fit", (X, Y),
         ValueError, "is not an ONNX model"),
    _row("bytes-truncated", lambda: R(onnx_model=_truncated()), "fit", (X, Y), ValueError,
         "bytes are not an ONNX model|not a valid ONNX graph"),
    _row("bytes-corrupt", lambda: R(onnx_model=_corrupt()), "fit", (X, Y), ValueError,
         "bytes are not an ONNX model|not a valid ONNX graph"),
    _row("bytes-empty", lambda: R(onnx_model=b""), "fit", (X, Y), ValueError,
         "not an ONNX model|empty"),
    # -- graphs that cannot be trained ---------------------------------------------------
    _row("integer-output", lambda: R(onnx_model=_integer_output()), "fit", (X, Y), ValueError,
         r"Output 'label' is not a float or double tensor \(an int64 tensor\).* "
         r"output_name= \(the values its "
         r"node ArgMax reads: \['Y'\]\)"),
    _row("sequence-output", lambda: R(onnx_model=_sequence_output()), "fit", (X, Y), ValueError,
         r"Output 'seq' is not a float or double tensor \(a sequence\)"),
    _row("map-output", lambda: R(onnx_model=_map_output()), "fit", (X, Y), ValueError,
         r"Output 'probabilities' is not a float or double tensor \(a sequence\)"
         r".*ZipMap reads: \['Y'\]"),
    _row("integer-output-classifier", lambda: C(onnx_model=_integer_output(),
                                                output_name="label"), "fit", (X, YC),
         ValueError, r"output_name='label' holds labels"),
    _row("map-output-classifier", lambda: C(onnx_model=_map_output(),
                                            output_name="probabilities"), "fit", (X, YC),
         ValueError, r"output_name='probabilities' is a ZipMap output"),
    _row("weights-unknown", lambda: R(onnx_model=_mlp(), weights_to_train=["W9"]), "fit",
         (X, Y), ValueError, r"unknown initializers \['W9'\]"),
    _row("weights-integer", lambda: R(onnx_model=_with_int_and_constant(),
                                      weights_to_train=["W0", "shape"]), "fit", (X, Y),
         ValueError, r"non-float initializers \['shape'\]"),
    _row("weights-constant-node", lambda: R(onnx_model=_with_int_and_constant(),
                                            weights_to_train=["const"]), "fit", (X, Y),
         ValueError, r"unknown initializers \['const'\]"),
    _row("weights-empty", lambda: R(onnx_model=_mlp(), weights_to_train=[]), "fit", (X, Y),
         ValueError, "weights_to_train is empty"),
    _row("weights-duplicate", lambda: R(onnx_model=_mlp(), weights_to_train=["W0", "W0"]),
         "fit", (X, Y), ValueError, "weights_to_train has duplicates"),
    _row("no-trainable-weight", lambda: R(onnx_model=_no_weights()), "fit", (X, Y), ValueError,
         "no floating-point initializer"),
    _row("no-gradient-rule", lambda: R(onnx_model=_no_gradient_rule()), "fit", (X, Y),
         ValueError, r"onnxfit has no gradient rule for Shrink \(node 'H'\)"),
    _row("no-gradient-rule-forward_backward",
         lambda: R(onnx_model=_no_gradient_rule(), engine="forward_backward"), "fit", (X, Y),
         ValueError, r"onnxfit has no gradient rule for Shrink"),
    _row("zero-derivative-op", lambda: R(onnx_model=_no_gradient_rule("Hardmax")), "fit",
         (X, Y), ValueError, r"only through operators whose derivative is zero \(Hardmax"),
    _row("opset-too-new", lambda: R(onnx_model=_too_new()), "fit", (X, Y), ValueError,
         r"The graph uses opset 10000; onnxfit trains graphs at opset 17 to \d+"),
    _row("output_name-unknown", lambda: R(onnx_model=_mlp(), output_name="nope"), "fit",
         (X, Y), ValueError, "output_name='nope' is not a value of the graph"),
    _row("initial_weights-shape", lambda: R(onnx_model=_mlp()), "fit", (X, Y), ValueError,
         r"initial_weights\['W0'\] has shape \(2, 2\)",
         kw={"initial_weights": {"W0": np.ones((2, 2))}}),
    _row("initial_weights-nan", lambda: R(onnx_model=_mlp()), "fit", (X, Y), ValueError,
         r"initial_weights\['B0'\] contains NaN",
         kw={"initial_weights": {"B0": np.full(4, np.nan)}}),
    # -- classifier labels -------------------------------------------------------------
    _row("classes-missing", C, "partial_fit", (X, YC), ValueError,
         "classes must be passed on the first call to partial_fit"),
    _row("label-unseen", fitted_C, "partial_fit", (X, _with(YC, 0, 7).astype(int)),
         ValueError, r"\b7\b.*classes \[0, 1, 2\]"),
    _row("classes-changed", fitted_C, "partial_fit", (X, YC), ValueError,
         "is not the same as on the last call to partial_fit", kw={"classes": [0, 1, 2, 3]}),
    _row("label-unseen-score", fitted_C, "losses", (X, _with(YC, 0, 9).astype(int)),
         ValueError, r"\b9\b.*classes \[0, 1, 2\]"),
    # -- not fitted, runtime builds, parameters used together -----------------------------
    _row("warm-start-graph-changed", lambda: fitted_R(onnx_model=_mlp(), warm_start=True)
         .set_params(onnx_model=mlp_graph(5, [3], 1)), "fit", (X, Y), ValueError,
         "warm_start=True keeps the weights of the previous fit"),
    _row("partial_fit-config-changed", lambda: fitted_R(onnx_model=_mlp())
         .set_params(weights_to_train=["W1"]), "partial_fit", (X, Y), ValueError,
         "weights_to_train, output_name, loss_output or train_mode changed"),
    _row("predict-unfitted", R, "predict", (X,), NotFittedError, "is not fitted yet"),
    _row("predict_proba-unfitted", C, "predict_proba", (X,), NotFittedError,
         "is not fitted yet"),
    _row("to_onnx-unfitted", C, "to_onnx", (), NotFittedError, "is not fitted yet"),
    _row("backend-build", lambda: R(gradient_backend="onnxruntime-training"), "fit", (X, Y),
         ImportError, "needs onnxruntime-training-cpu"),
    _row("device-unknown", lambda: R(device="tpu"), "fit", (X, Y), ValueError, "'tpu'"),
    _row("eta0-with-object", lambda: R(learning_rate=LearningRateAdam(), eta0=0.1), "fit",
         (X, Y), ValueError, "both set the step size"),
    _row("eval_set-shape", R, "fit", (X, Y), ValueError, "eval_set must be a list of one",
         kw={"eval_set": [(X, Y), (X, Y)]}),
    _row("validation-twice", R, "fit", (X, Y), ValueError, "Give the validation data once",
         kw={"eval_set": [(X, Y)], "X_val": X, "y_val": Y}),
    _row("X_val-without-y_val", R, "fit", (X, Y), ValueError, "X_val and y_val go together",
         kw={"X_val": X}),
    _row("scoring-unknown", lambda: R(early_stopping=True, scoring="r3"), "fit", (X, Y),
         ValueError, "'r3'"),
]

def test_row_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


# -- what must not change ----------------------------------------------------------------
def _snapshot(value):
    """A comparable copy of ``value`` and everything it holds."""
    if isinstance(value, pd.DataFrame):
        return ("frame", value.copy(deep=True))
    if isinstance(value, np.ndarray):
        return ("array", value.copy())
    if scipy.sparse.issparse(value):
        return ("sparse", value.copy())
    if isinstance(value, onnx.ModelProto):
        return ("model", value.SerializeToString())
    if isinstance(value, BaseEstimator):
        return ("estimator", type(value), joblib.hash(value),
                {k: _snapshot(v) for k, v in value.get_params(deep=False).items()})
    if isinstance(value, dict):
        return ("dict", {k: _snapshot(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_snapshot(v) for v in value])
    return ("other", joblib.hash(value))


def _assert_same(before, after, where="argument"):
    kind = before[0]
    assert kind == after[0], where
    if kind == "frame":
        pd.testing.assert_frame_equal(after[1], before[1])
    elif kind == "array":
        np.testing.assert_array_equal(after[1], before[1], err_msg=where)
        assert after[1].dtype == before[1].dtype, where
    elif kind == "sparse":
        assert (after[1] != before[1]).nnz == 0, where
    elif kind == "estimator":
        assert before[:3] == after[:3], where
    elif kind == "dict":
        assert set(before[1]) == set(after[1]), where
        for key in before[1]:
            _assert_same(before[1][key], after[1][key], f"{where}[{key!r}]")
    elif kind in ("list", "tuple"):
        assert len(before[1]) == len(after[1]), where
        for k, (b, a) in enumerate(zip(before[1], after[1])):
            _assert_same(b, a, f"{where}[{k}]")
    else:
        assert before == after, where


class _RuntimeCalls:
    """Records the onnxruntime sessions made and run once ``armed``: the
    Python class and the native one (the engines call a native session's
    ``run_with_iobinding`` directly, bound when a fit built them, so the
    patches go in before the estimator is made)."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.armed = False
        for cls, names in ((onnxruntime.InferenceSession,
                            ("__init__", "run", "run_with_iobinding")),
                           (native.InferenceSession, ("run", "run_with_iobinding"))):
            for name in names:
                original = getattr(cls, name)

                def recorded(session, *args, _name=f"{cls.__module__}.{name}",
                             _original=original, **kwargs):
                    if self.armed:
                        self.calls.append(_name)
                    return _original(session, *args, **kwargs)

                monkeypatch.setattr(cls, name, recorded)


@pytest.fixture(scope="module", autouse=True)
def _probe_runtime_limits():
    # Cached per process: probing once here is what any earlier fit does.
    runtime_limits()


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tmp_path, monkeypatch):
    runtime = _RuntimeCalls(monkeypatch)
    estimator = row.estimator(tmp_path)
    args, kwargs = copy.deepcopy((row.args, row.kwargs))
    fitted = hasattr(estimator, "weights_")
    if fitted:
        state = pickle.loads(pickle.dumps(_fitted_state(estimator)))
    given = _snapshot((args, kwargs))
    params = _snapshot(estimator.get_params(deep=False))
    runtime.armed = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataConversionWarning)
        with pytest.raises(row.error, match=row.match) as info:
            getattr(estimator, row.method)(*args, **kwargs)
    monkeypatch.undo()
    assert "Got invalid dimensions" not in str(info.value)
    assert not runtime.calls, f"onnxruntime was called before the error: {runtime.calls}"
    _assert_same(given, _snapshot((args, kwargs)))
    _assert_same(params, _snapshot(estimator.get_params(deep=False)), "parameters")
    if fitted:
        _assert_unchanged(estimator, state)
    elif row.method in ("fit", "partial_fit"):
        assert not hasattr(estimator, "weights_")


# -- every parameter constraint --------------------------------------------------------------
class _NotAThing:
    """A value of no type a constraint accepts."""

    def __repr__(self):
        return "<not a thing>"


def _invalid_value(constraints):
    """A value none of ``constraints`` accepts: just outside an interval, an
    unknown string option, or an object of no accepted type."""
    made = [make_constraint(c) for c in constraints]
    candidates = []
    for c in made:
        if isinstance(c, Interval):
            if c.left is not None:
                low = c.left - 1 if c.type is not Real or c.closed in ("left", "both") else c.left
                candidates.append(int(low) if c.type is Integral else float(low))
            if c.right is not None:
                candidates.append(c.right + 1 if c.type is Integral else float(c.right) + 0.5)
            candidates.append(np.nan)
        elif isinstance(c, StrOptions):
            candidates.append("no-such-option")
    candidates += ["no-such-option", -1, _NotAThing()]
    for value in candidates:
        if not any(c.is_satisfied_by(value) for c in made):
            return value
    raise AssertionError(f"no invalid value for {constraints}")


CONSTRAINTS = [(cls, name) for cls in (OnnxSGDRegressor, OnnxSGDClassifier)
               for name in cls._parameter_constraints]


@pytest.mark.parametrize("cls, name", CONSTRAINTS,
                         ids=[f"{c.__name__}-{n}" for c, n in CONSTRAINTS])
def test_parameter_constraint(cls, name, monkeypatch):
    value = _invalid_value(cls._parameter_constraints[name])
    est = cls(**{"max_iter": 2, name: value})
    runtime = _RuntimeCalls(monkeypatch)
    runtime.armed = True
    y = YC if cls is OnnxSGDClassifier else Y
    with pytest.raises(InvalidParameterError, match=rf"The '{name}' parameter of {cls.__name__}"):
        est.fit(X, y)
    monkeypatch.undo()
    assert not runtime.calls
    assert not hasattr(est, "weights_")


def test_every_constraint_has_an_invalid_value():
    # A constraint list that accepts anything would make its row vacuous.
    for cls, name in CONSTRAINTS:
        _invalid_value(cls._parameter_constraints[name])


# -- a column-vector y, as scikit-learn's SGD ---------------------------------------------------
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_column_vector_y_regressor(method):
    reference = SGDRegressor(max_iter=2, tol=None)
    with pytest.warns(DataConversionWarning, match="A column-vector y was passed"):
        getattr(reference, method)(X, Y[:, None])
    est = R()
    with pytest.warns(DataConversionWarning, match="A column-vector y was passed"):
        getattr(est, method)(X, Y[:, None])
    assert est.predict(X).shape == reference.predict(X).shape == (N,)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_column_vector_y_classifier(method):
    extra = {"classes": [0, 1, 2]} if method == "partial_fit" else {}
    reference = SGDClassifier(max_iter=2, tol=None)
    with pytest.warns(DataConversionWarning, match="A column-vector y was passed"):
        getattr(reference, method)(X, YC[:, None], **extra)
    est = C()
    with pytest.warns(DataConversionWarning, match="A column-vector y was passed"):
        getattr(est, method)(X, YC[:, None], **extra)
    assert est.predict(X).shape == reference.predict(X).shape == (N,)


def test_two_column_y_stays_two_columns():
    # Only a single column is a column vector: (n, 2) targets predict (n, 2).
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataConversionWarning)
        est = R().fit(X, Y2)
    assert est.predict(X).shape == (N, 2)


def test_table_size():
    # The closing note of issue 13 counts the rows.
    assert len(ROWS) >= 115


# -- a model newer than the installed onnxruntime -----------------------------------------------
def test_ir_version_above_the_runtime_is_lowered():
    # Not refused: the IR version is lowered to the runtime's highest (the
    # opset is converted down likewise when onnx can; else the
    # 'opset-too-new' row's error).
    model = _mlp()
    model.ir_version = runtime_limits()[0] + 5
    est = R(onnx_model=model).fit(X, Y)
    assert est.onnx_model_.ir_version == runtime_limits()[0]
    assert model.ir_version == runtime_limits()[0] + 5  # the user's proto is not changed
    assert est.predict(X).shape == (N,)



def test_the_recorder_sees_onnxruntime(monkeypatch):
    # The check of the rows is not vacuous: a call that does run the graph
    # is seen, through the native binding the engines call directly too.
    runtime = _RuntimeCalls(monkeypatch)
    est = fitted_R(onnx_model=_mlp())
    runtime.armed = True
    est.partial_fit(X, Y)
    assert any(name.endswith("run_with_iobinding") for name in runtime.calls)
    runtime.calls.clear()
    est.predict(X)
    assert runtime.calls
