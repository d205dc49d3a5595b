"""The ``onnxfit`` command line (also ``python -m onnxfit``).

Commands
--------
``onnxfit --version``
    :func:`onnxfit.show_versions.show_versions`: onnxfit's, Python's and
    every dependency's version, the onnxruntime build with its execution
    providers, the usable gradient backends and devices.
``onnxfit demo``
    scikit-learn models converted to ONNX, trained by onnxfit, compared.
``onnxfit info MODEL.onnx``
    Inputs, outputs, opsets, the trainable weights with their shapes, the
    per-sample input shape, and the operators between the weights and the
    trained output that have no gradient rule (with the weights to freeze).
``onnxfit train MODEL.onnx DATA.csv --target COLUMN --output TRAINED.onnx``
    Trains the graph with :class:`~onnxfit.OnnxSGDRegressor` or
    :class:`~onnxfit.OnnxSGDClassifier` on a CSV or Parquet table, prints
    the loss per epoch and a score, writes the trained graph.
``onnxfit check-gradients MODEL.onnx``
    :func:`onnxfit.check_gradients`: onnxfit's gradient of the graph
    against float64 finite differences.

Errors the user can act on (a missing file, a bad column, a graph onnxfit
cannot train: ``ValueError``, ``OSError``, ``ImportError``, onnx's and
onnxruntime's errors) print one line, ``onnxfit: error: ...``, on stderr and
exit with status 2, as argparse does for a bad command line.  Any other
exception is a bug: one line too, exit status 1, and ``--debug`` shows its
traceback.  ``check-gradients`` exits with 1 when the check fails.
"""

import argparse
import contextlib
import math
import os
import sys
import warnings

import numpy as np

#: Exit status of an error the user can act on (argparse uses 2 as well).
EXIT_ERROR = 2
#: Exit status of an unexpected error (a bug), and of a failed gradient check.
EXIT_FAILURE = 1

#: A whole-number target with at most this many distinct values is taken
#: for class labels when ``--task`` is not given.
MAX_CLASSES_INFERRED = 20

_PARQUET_SUFFIXES = (".parquet", ".pq")


class CommandError(Exception):
    """An error of the command line's own, reported as one line."""


# -- errors and warnings ------------------------------------------------------
def _user_errors():
    """Exception types reported as ``onnxfit: error: ...`` (status 2)."""
    kinds = [CommandError, ValueError, OSError, ImportError]
    with contextlib.suppress(ImportError):
        from onnx.checker import ValidationError

        kinds.append(ValidationError)
    with contextlib.suppress(ImportError):
        from google.protobuf.message import DecodeError

        kinds.append(DecodeError)
    with contextlib.suppress(ImportError):
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        kinds.extend(getattr(ort_state, name) for name in (
            "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError",
            "RuntimeException", "InvalidProtobuf", "ModelLoaded", "NotImplemented",
            "InvalidGraph", "EPFail") if hasattr(ort_state, name))
    return tuple(kinds)


def _one_line(exc):
    """The message of ``exc`` on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line on stderr, without the source line."""
    text = _one_line(message).replace("increasing max_iter", "increasing --epochs")
    print(f"onnxfit: warning: {category.__name__}: {text}", file=sys.stderr)


# -- files --------------------------------------------------------------------
def _existing_file(path, what):
    """``path`` when it is a readable file, else a :class:`CommandError`."""
    if not os.path.exists(path):
        raise CommandError(f"{what} {path!r} does not exist.")
    if os.path.isdir(path):
        raise CommandError(f"{what} {path!r} is a directory, not a file.")
    return path


def _load_model(path):
    """The ONNX model at ``path`` (a clear error for anything else)."""
    from .model import load_onnx

    _existing_file(path, "model file")
    return load_onnx(path)


def read_table(path):
    """Read a CSV or Parquet file into a pandas DataFrame.

    Parameters
    ----------
    path : str
        ``*.parquet`` or ``*.pq`` is read as Parquet (with pyarrow, or
        fastparquet), anything else as CSV (compressed CSV, ``*.csv.gz``,
        too).

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    CommandError
        For a missing file, a directory, an empty table, or Parquet without
        pyarrow.
    """
    _existing_file(path, "data file")
    try:
        import pandas as pd
    except ImportError as exc:
        raise CommandError("reading data files needs pandas: pip install pandas") from exc
    if path.lower().endswith(_PARQUET_SUFFIXES):
        try:
            frame = pd.read_parquet(path)
        except ImportError as exc:
            raise CommandError(
                f"reading the Parquet file {path!r} needs pyarrow: pip install pyarrow"
            ) from exc
    else:
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError as exc:
            raise CommandError(f"data file {path!r} is empty.") from exc
        except (UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise CommandError(
                f"data file {path!r} is not a readable CSV file ({_one_line(exc)}); "
                "name Parquet files *.parquet."
            ) from exc
    if frame.shape[0] == 0:
        raise CommandError(f"data file {path!r} has no rows.")
    return frame


# -- what a model is ----------------------------------------------------------
def _is_classifier_graph(model):
    """Whether the graph has a label or ZipMap output, as skl2onnx's
    classifiers do: an output that is not a float tensor."""
    from .onnx_graphs import numpy_dtype, tensor_elem_type

    return any(numpy_dtype(tensor_elem_type(o)) is None for o in model.graph.output)


def infer_task(y, model):
    """The task ``train`` runs when ``--task`` is not given, and why.

    The rule, first match wins:

    1. a target that is not numeric (strings, booleans, categories):
       classification;
    2. a target holding numbers that are not all whole: regression;
    3. a graph with a label or ZipMap output (a converted classifier):
       classification;
    4. whole numbers: classification when they take at most
       :data:`MAX_CLASSES_INFERRED` (20) distinct values, else regression.

    Parameters
    ----------
    y : pandas.Series
    model : onnx.ModelProto

    Returns
    -------
    task : {'regression', 'classification'}
    reason : str
    """
    from pandas.api import types

    if not types.is_numeric_dtype(y.dtype) or types.is_bool_dtype(y.dtype):
        return "classification", f"the target holds non-numeric values ({y.dtype})"
    values = y.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = values[np.isfinite(values)]
    if np.any(finite != np.round(finite)):
        return "regression", "the target holds non-integer numbers"
    if _is_classifier_graph(model):
        return "classification", "the graph has a label or ZipMap output"
    distinct = len(np.unique(finite))
    if distinct <= MAX_CLASSES_INFERRED:
        return "classification", f"the target holds {distinct} distinct whole numbers"
    return "regression", (f"the target holds {distinct} distinct whole numbers "
                          f"(more than {MAX_CLASSES_INFERRED})")


def _estimator_class(task):
    from . import OnnxSGDClassifier, OnnxSGDRegressor

    return OnnxSGDClassifier if task == "classification" else OnnxSGDRegressor


def _shape_text(value):
    """``(N, 3)``-style text of a graph value's declared shape ("" when it
    is not a tensor)."""
    if value.type.WhichOneof("value") != "tensor_type":
        return ""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return "(unknown shape)"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor.shape.dim]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _type_text(type_proto):
    """ONNX's name of a type: ``float``, ``int64``, ``sequence(map(int64, float))``."""
    from onnx import TensorProto

    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        elem = type_proto.tensor_type.elem_type
        return TensorProto.DataType.Name(elem).lower() if elem else "tensor"
    if kind == "sequence_type":
        return f"sequence({_type_text(type_proto.sequence_type.elem_type)})"
    if kind == "map_type":
        key = TensorProto.DataType.Name(type_proto.map_type.key_type).lower()
        return f"map({key}, {_type_text(type_proto.map_type.value_type)})"
    return kind or "?"


def _table(rows, indent="  "):
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in rows]


def ops_without_rule(prepared):
    """Operators between the trainable weights and the trained output that
    onnxfit's gradient backend has no rule (nor expansion) for.

    See :func:`onnxfit.gradient.own.missing_rules`.

    Parameters
    ----------
    prepared : onnxfit.model.OnnxModel

    Returns
    -------
    list of (onnx.NodeProto, list of str)
        Each node, with the weights whose path to the output crosses it.
    """
    from .gradient.own import missing_rules

    return missing_rules(prepared.forward_model(), [prepared.trained_name],
                         list(prepared.weight_names))


# -- commands -----------------------------------------------------------------
def cmd_demo(args):
    """``onnxfit demo``."""
    from .demo import main_demo

    main_demo(progress=sys.stderr.isatty())
    return 0


def cmd_info(args):
    """``onnxfit info MODEL.onnx``.

    A graph onnxfit cannot train (no trainable weight, an output that is
    not a float tensor) is described all the same, with the reason; the
    exit status is 0.
    """
    from .onnx_graphs import numpy_dtype

    model = _load_model(args.model)
    task = args.task or ("classification" if _is_classifier_graph(model) else "regression")
    estimator = _estimator_class(task)(model, output_name=args.output_name)
    try:
        prepared, refused = estimator._load_model(), None
    except ValueError as exc:
        prepared, refused = None, exc

    graph = model.graph
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    print(f"{args.model}: ONNX IR version {model.ir_version}"
          + (f", produced by {producer}" if producer else ""))
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    original = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    trained = None if prepared is None else next(
        (o.version for o in prepared.model.opset_import if o.domain in ("", "ai.onnx")), None)
    if trained is not None and trained != original:
        opsets += f" (onnxfit trains it converted to ai.onnx {trained})"
    print(f"Opsets: {opsets}")
    inits = {i.name: i for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in inits]
    print("Inputs:")
    for line in _table([(v.name, _type_text(v.type), _shape_text(v)) for v in inputs] or
                       [("(none)", "", "")]):
        print(line)
    print("Outputs:")
    for line in _table([(v.name, _type_text(v.type), _shape_text(v)) for v in graph.output]):
        print(line)
    print(f"Initializers: {len(inits)} "
          f"({sum(int(np.prod(i.dims, dtype=np.int64)) for i in inits.values()):,} values)")
    if prepared is None:
        print(f"Trainable weights: none: {_one_line(refused)}")
        return 0
    print(f"Trained output ({type(estimator).__name__}): {prepared.trained_name!r}"
          + (f" (prediction {prepared.output_name!r})"
             if prepared.output_name != prepared.trained_name else ""))
    print("Per-sample input shape:")
    for spec in prepared.input_specs:
        width = spec.width
        columns = (f"{width} column{'s' if width != 1 else ''} of a table"
                   if width is not None else "a symbolic dimension: give arrays, not a table")
        print(f"  {spec.describe()}  {spec.dtype.name}: {columns}")
    weights = prepared.initial_weights()
    total = sum(w.size for w in weights.values())
    print(f"Trainable weights ({len(weights)}, {total:,} values):")
    for line in _table([(name, w.dtype.name, str(tuple(w.shape)))
                        for name, w in weights.items()]):
        print(line)
    others = [name for name, init in inits.items()
              if name not in weights and numpy_dtype(init.data_type) is not None]
    if others:
        shown = ", ".join(others[:10]) + (f", ... ({len(others)} in all)"
                                          if len(others) > 10 else "")
        print(f"Float initializers not trained by default: {shown}")
    missing = ops_without_rule(prepared)
    if not missing:
        print(f"Gradient: every operator between the weights and {prepared.trained_name!r} "
              "has a rule.")
        return 0
    print(f"Operators on the gradient path without a rule ({len(missing)}):")
    for node, behind in missing:
        domain = f" in domain {node.domain!r}" if node.domain not in ("", "ai.onnx") else ""
        print(f"  {node.op_type}{domain} (node {node.name or node.output[0]!r}), "
              f"reached from {behind}")
    frozen = sorted({w for _, behind in missing for w in behind},
                    key=list(prepared.weight_names).index)
    rest = [w for w in prepared.weight_names if w not in frozen]
    if rest:
        print(f"Training refuses these weights: freeze them to train the {len(rest)} others "
              f"(onnxfit train ... --freeze {' '.join(frozen)})")
    else:
        print("Every trainable weight lies behind them: nothing would remain to train.")
    return 0


def _freeze_hint(estimator, model_path):
    """How to leave out, on the command line, the weights behind operators
    without a gradient rule."""
    try:
        missing = ops_without_rule(estimator._load_model())
    except _user_errors():  # the hint is a courtesy: the error itself is reported
        missing = []
    frozen = list(dict.fromkeys(w for _, behind in missing for w in behind))
    if frozen:
        return f"On the command line: add --freeze {' '.join(frozen)}."
    return f"onnxfit info {model_path} shows the trainable weights; --freeze leaves some out."


def _epoch_lines(estimator, task):
    """One line per epoch of a fitted estimator: its loss (and validation score)."""
    metric = "R²" if task == "regression" else "accuracy"
    scores = getattr(estimator, "validation_scores_", None) or []
    total = estimator.get_params()["max_iter"]
    width = len(str(total))
    for epoch, loss in enumerate(estimator.loss_curve_, 1):
        line = f"epoch {epoch:>{width}}/{total}  loss {loss:.6g}"
        if epoch <= len(scores):
            line += f"  validation {metric} {scores[epoch - 1]:.4f}"
        yield line


def cmd_train(args):
    """``onnxfit train MODEL.onnx DATA --target COLUMN --output TRAINED.onnx``."""
    import onnx

    from .gradient import GradientError

    model = _load_model(args.model)
    output_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(output_dir):
        raise CommandError(f"the directory of --output {args.output!r} does not exist.")
    if os.path.isdir(args.output):
        raise CommandError(f"--output {args.output!r} is a directory; name a file.")
    frame = read_table(args.data)
    if args.target not in frame.columns:
        columns = [str(c) for c in frame.columns]
        shown = ", ".join(columns[:20]) + (f", ... ({len(columns)} in all)"
                                           if len(columns) > 20 else "")
        raise CommandError(f"data file {args.data!r} has no column {args.target!r}; "
                           f"its columns are: {shown}")
    y = frame[args.target]
    X = frame.drop(columns=[args.target])
    if X.shape[1] == 0:
        raise CommandError(f"data file {args.data!r} has no column besides the target "
                           f"{args.target!r}: there are no features.")
    if args.task:
        task, why = args.task, "--task"
    else:
        task, why = infer_task(y, model)
        why = f"inferred: {why}; --task chooses"
    bar = sys.stderr.isatty()
    params = {"random_state": args.random_state, "verbose": int(bar),
              "output_name": args.output_name}
    for option, name in (("learning_rate", "learning_rate"), ("eta0", "eta0"),
                         ("loss", "loss"), ("batch_size", "batch_size"),
                         ("epochs", "max_iter")):
        value = getattr(args, option)
        if value is not None:
            params[name] = value
    if args.validation_fraction is not None:
        params.update(early_stopping=True, validation_fraction=args.validation_fraction)
    estimator = _estimator_class(task)(model, **params)
    prepared = estimator._load_model()
    trainable = list(prepared.weight_names)
    if args.freeze:
        unknown = [w for w in args.freeze if w not in trainable]
        if unknown:
            raise CommandError(f"--freeze names {unknown}, which are not trainable weights "
                               f"of the graph; they are: {', '.join(trainable)}")
        trainable = [w for w in trainable if w not in args.freeze]
        if not trainable:
            raise CommandError("--freeze names every trainable weight: nothing is left "
                               "to train.")
        estimator.set_params(weights_to_train=trainable)
    print(f"Training {args.model} as a {task} ({why}) with {type(estimator).__name__}")
    print(f"  data: {args.data}, {X.shape[0]} samples, {X.shape[1]} feature column"
          f"{'s' if X.shape[1] != 1 else ''}, target {args.target!r}")
    print(f"  trains {len(trainable)} weight{'s' if len(trainable) != 1 else ''}: "
          f"{', '.join(trainable)}" + (f" (frozen: {', '.join(args.freeze)})"
                                       if args.freeze else ""))
    sys.stdout.flush()
    # Warnings (ConvergenceWarning) are shown after the fit, not in the bar.
    with warnings.catch_warnings(record=True) as caught:
        try:
            estimator.fit(X, y)
        except GradientError as exc:
            raise CommandError(
                f"{_one_line(exc)} {_freeze_hint(estimator, args.model)}") from exc
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename,
                             warning.lineno)
    for line in _epoch_lines(estimator, task):
        print(line)
    max_iter = estimator.get_params()["max_iter"]
    if estimator.n_iter_ < max_iter:
        watched = ("the validation score" if args.validation_fraction is not None
                   else "the loss")
        print(f"stopped after {estimator.n_iter_} epochs: {watched} did not improve by "
              f"tol={estimator.tol} for {estimator.n_iter_no_change} epochs in a row")
    metric = "R²" if task == "regression" else "accuracy"
    if args.validation_fraction is not None:
        scores = estimator.validation_scores_
        best = int(np.argmax(scores))
        held_out = math.ceil(args.validation_fraction * X.shape[0])
        print(f"{metric} on the validation fraction ({held_out} of {X.shape[0]} samples, "
              f"held out from training), best epoch {best + 1} (its weights are written): "
              f"{scores[best]:.4f}")
    else:
        print(f"{metric} on the training data ({X.shape[0]} samples): "
              f"{estimator.score(X, y):.4f}")
    onnx.save(estimator.to_onnx(), args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_check_gradients(args):
    """``onnxfit check-gradients MODEL.onnx``."""
    from . import check_gradients

    model = _load_model(args.model)
    weights = None
    if args.freeze:
        from .model import OnnxModel, normalise_model

        trainable = OnnxModel(normalise_model(model), None, args.output_name,
                              unused_inputs="ignore").weight_names
        unknown = [w for w in args.freeze if w not in trainable]
        if unknown:
            raise CommandError(f"--freeze names {unknown}, which are not trainable weights "
                               f"of the graph; they are: {', '.join(trainable)}")
        weights = [w for w in trainable if w not in args.freeze]
        if not weights:
            raise CommandError("--freeze names every trainable weight: nothing is left "
                               "to check.")
    result = check_gradients(
        model, output_name=args.output_name, weights_to_train=weights,
        n_positions=args.positions, tolerance=args.tolerance, batch_size=args.batch_size,
        random_state=args.random_state, backend=args.backend,
    )
    print(result)
    return 0 if result.passed else EXIT_FAILURE


# -- the parser ---------------------------------------------------------------
class _VersionAction(argparse.Action):
    """``--version``: print :func:`show_versions` and exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .show_versions import show_versions

        show_versions()
        parser.exit()


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _batch_size(text):
    return text if text == "auto" else _positive_int(text)


def _fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, not {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def build_parser():
    """The ``onnxfit`` argument parser.

    Returns
    -------
    argparse.ArgumentParser
    """
    from .gradient import BACKENDS, DEFAULT_BACKEND
    from .learning_rate import LEARNING_RATES
    from .losses import CLASSIFICATION_LOSSES, REGRESSION_LOSSES

    parser = argparse.ArgumentParser(
        prog="onnxfit",
        description="Train ONNX graphs inside scikit-learn: inspect a graph, train it on a "
                    "CSV or Parquet table, check its gradients.",
        epilog="Errors print one line and exit with status 2; --debug shows the traceback.",
    )
    parser.add_argument(
        "--version", action=_VersionAction,
        help="print onnxfit's, Python's and every dependency's version, the onnxruntime "
             "build, its execution providers and the usable gradient backends, then exit "
             "(what a bug report needs; also onnxfit.show_versions())")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", parents=[common],
        help="convert scikit-learn models fitted on bundled datasets to ONNX, train them "
             "with onnxfit and compare scores",
        description="Convert scikit-learn models fitted on bundled datasets to ONNX, train "
                    "them with onnxfit and print their scores next to scikit-learn's "
                    "(progress bars on stderr when it is a terminal).")
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser(
        "info", parents=[common], help="describe a graph: inputs, outputs, trainable weights",
        description="Describe an ONNX graph as onnxfit trains it: inputs, outputs, opsets, "
                    "the trainable weights with their shapes, the per-sample input shape, "
                    "and the operators between the weights and the trained output that "
                    "have no gradient rule (with the weights to --freeze).")
    info.add_argument("model", metavar="MODEL.onnx", help="the ONNX graph")
    info.add_argument("--task", choices=["regression", "classification"],
                      help="describe the graph as this task trains it (default: "
                           "classification for a graph with a label or ZipMap output, "
                           "else regression)")
    info.add_argument("--output-name", metavar="NAME",
                      help="the output to train (default: as the estimators pick it)")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser(
        "train", parents=[common], help="train a graph on a CSV or Parquet table",
        description="Train an ONNX graph on a table with OnnxSGDRegressor or "
                    "OnnxSGDClassifier: every column but --target feeds the graph's inputs "
                    "(in order, by their widths). Prints the loss of each epoch (after "
                    "training; a live progress bar on stderr when it is a terminal), a "
                    "score, and writes the trained graph.",
        epilog="--task, when not given: classification for a non-numeric target; "
               "regression for numbers that are not all whole; classification for a graph "
               "with a label or ZipMap output; for whole numbers, classification when "
               f"they take at most {MAX_CLASSES_INFERRED} distinct values, else regression.")
    train.add_argument("model", metavar="MODEL.onnx", help="the ONNX graph to train")
    train.add_argument("data", metavar="DATA",
                       help="the training table: CSV (*.csv, *.csv.gz, ...) or Parquet "
                            "(*.parquet, *.pq; needs pyarrow)")
    train.add_argument("--target", required=True, metavar="COLUMN",
                       help="the column holding y; every other column is a feature")
    train.add_argument("--output", "-o", required=True, metavar="TRAINED.onnx",
                       help="where to write the trained graph")
    train.add_argument("--task", choices=["regression", "classification"],
                       help="default: inferred from the target (see below)")
    losses = sorted(set(REGRESSION_LOSSES) | set(CLASSIFICATION_LOSSES))
    train.add_argument("--loss", choices=losses, metavar="LOSS",
                       help=f"regression: {', '.join(REGRESSION_LOSSES)} (default "
                            f"squared_error); classification: "
                            f"{', '.join(CLASSIFICATION_LOSSES)} (default log_loss)")
    train.add_argument("--learning-rate", choices=list(LEARNING_RATES),
                       help="update rule (default: the estimator's, sgd for regression, "
                            "nesterov for classification)")
    train.add_argument("--eta0", type=_positive_float,
                       help="initial step size (default: the update rule's)")
    train.add_argument("--epochs", type=_positive_int,
                       help="most epochs (default 1000); training stops earlier when the "
                            "loss (or the validation score) stops improving")
    train.add_argument("--batch-size", type=_batch_size, metavar="N|auto",
                       help="samples per update (default: the estimator's)")
    train.add_argument("--validation-fraction", type=_fraction, metavar="F",
                       help="hold out this fraction of the samples, stop on its score and "
                            "keep the best epoch's weights (early stopping); the printed "
                            "score is then on that fraction")
    train.add_argument("--freeze", nargs="+", action="extend", metavar="WEIGHT",
                       help="weights to keep as they are (onnxfit info lists the trainable "
                            "ones); every other trainable weight is trained")
    train.add_argument("--output-name", metavar="NAME",
                       help="the graph output to train (default: as the estimators pick it)")
    train.add_argument("--random-state", type=int, metavar="SEED",
                       help="seed of the shuffling and of the validation split")
    train.set_defaults(func=cmd_train)

    check = sub.add_parser(
        "check-gradients", parents=[common],
        help="check onnxfit's gradient of a graph against finite differences",
        description="Compare onnxfit's gradient of the graph with float64 central "
                    "differences (onnxfit.check_gradients) on random inputs; exits with "
                    "status 1 when a weight's error exceeds the tolerance.")
    check.add_argument("model", metavar="MODEL.onnx", help="the ONNX graph")
    check.add_argument("--freeze", nargs="+", action="extend", metavar="WEIGHT",
                       help="weights to leave out of the check")
    check.add_argument("--output-name", metavar="NAME", help="the output to differentiate")
    check.add_argument("--positions", type=_positive_int, default=20, metavar="N",
                       help="elements checked per weight (default 20)")
    check.add_argument("--tolerance", type=_positive_float,
                       help="largest relative error passed (default 1e-4 for float32, 1e-6 "
                            "for float64)")
    check.add_argument("--batch-size", type=_positive_int, default=4, metavar="N",
                       help="samples in the random inputs (default 4)")
    check.add_argument("--backend", choices=list(BACKENDS), default=DEFAULT_BACKEND,
                       help=f"gradient backend to check (default {DEFAULT_BACKEND})")
    check.add_argument("--random-state", type=int, default=0, metavar="SEED",
                       help="seed of the inputs and the checked positions (default 0)")
    check.set_defaults(func=cmd_check_gradients)
    return parser


def main(argv=None):
    """Entry point of ``python -m onnxfit`` and the ``onnxfit`` script.

    Parameters
    ----------
    argv : list of str, default=None
        The arguments; None reads ``sys.argv``.

    Returns
    -------
    int
        The exit status: 0, 1 for a failed gradient check or an unexpected
        error, 2 for an error the user can act on.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # no command: the demo, as always
        args.func = cmd_demo
    debug = getattr(args, "debug", False)
    previous = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("onnxfit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _user_errors()):
            print(f"onnxfit: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_ERROR
        print(f"onnxfit: error: unexpected {type(exc).__name__}: {_one_line(exc)} (run again "
              "with --debug for the traceback, and report it with onnxfit --version)",
              file=sys.stderr)
        return EXIT_FAILURE
    finally:
        warnings.showwarning = previous
