"""How one ``X`` feeds the graph's inputs.

scikit-learn hands an estimator one ``X``; a graph may have several inputs
(numeric features and category indices for an embedding), and inputs of
rank above 2 (images ``(N, C, H, W)``, sequences ``(N, T, F)``).  This module
turns what the user passes into one array per graph input, shaped
``(n_samples, *per-sample shape)`` and typed as the graph declares:

* a 2-D array or a pandas DataFrame: its columns are assigned to the inputs,
  in order and by the inputs' declared widths, or as ``input_columns`` says
  (column names of a DataFrame, or positions); an input of rank above 2
  gets its columns reshaped to its per-sample shape when that shape is
  static -- the flat ``X`` a scikit-learn ``Pipeline`` produces;
* an array of rank above 2, for a graph with one input: one sample per row,
  checked against the per-sample shape the graph declares;
* a dict of arrays, one per graph input.

Everything scikit-learn checks on a 2-D ``X`` (finite values, lengths,
dtypes, ``n_features_in_``, ``feature_names_in_``) is checked here too; for
a dict, ``n_features_in_`` is the total width of the flattened inputs.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from sklearn.utils.validation import check_array, check_consistent_length, validate_data

from onnx import helper

from .onnx_graphs import tensor_elem_type


@dataclass(frozen=True)
class InputSpec:
    """A graph input as training sees it.

    Attributes
    ----------
    name : str
    dtype : numpy dtype
        Element type the graph declares (float inputs are differentiated
        with respect to nothing; integer ones are category indices).
    shape : tuple
        Per-sample shape (the declared shape without its batch dimension);
        ``None`` for a symbolic dimension, ``()`` for one value per sample.
    """

    name: str
    dtype: np.dtype
    shape: tuple

    @property
    def is_integer(self):
        return self.dtype.kind in "iu"

    @property
    def width(self):
        """Values per sample, or None when a dimension is symbolic."""
        if any(d is None for d in self.shape):
            return None
        return int(np.prod(self.shape, dtype=np.int64))

    def describe(self):
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} (n, {dims})" if dims else f"{self.name!r} (n,)"


def input_specs(graph, names):
    """The :class:`InputSpec` of each graph input in ``names``, in that order.

    Raises
    ------
    ValueError
        For an input that is not a tensor, has no batch dimension, or whose
        element type is neither a float nor an integer.
    """
    declared = {v.name: v for v in graph.input}
    specs = []
    for name in names:
        value = declared[name]
        elem = tensor_elem_type(value)
        if elem is None:
            raise ValueError(f"The graph input {name!r} is not a tensor; onnxfit feeds tensors.")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        if dtype.kind not in "fiu" or dtype == np.float16:
            raise ValueError(
                f"The graph input {name!r} is a {dtype} tensor; onnxfit feeds float32, "
                "float64 or integer inputs."
            )
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            shape = None
        else:
            shape = tuple(d.dim_value if d.HasField("dim_value") else None
                          for d in tensor.shape.dim)
        if shape is None or len(shape) == 0:
            raise ValueError(
                f"The graph input {name!r} has no declared batch dimension (shape "
                f"{'unknown' if shape is None else '()'}); onnxfit feeds one sample per row "
                "of its first dimension: declare the input with a shape such as ['N', ...]."
            )
        specs.append(InputSpec(name, dtype, shape[1:]))
    return specs


def _fits(shape, spec_shape):
    return len(shape) == len(spec_shape) and all(
        d is None or d == s for d, s in zip(spec_shape, shape))


def _sample_text(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + \
        ("," if len(shape) == 1 else "") + ")"


def _shape_text(shape):
    return "(n, " + ", ".join("?" if d is None else str(d) for d in shape) + ")" \
        if shape else "(n,)"


def _as_input(values, spec, what):
    """``values`` (n, k) cast to the dtype of ``spec``; integer inputs must
    hold whole numbers."""
    if spec.is_integer and values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise ValueError(
                f"{what} feeds the integer graph input {spec.name!r} (category indices) "
                "but holds values that are not whole numbers."
            )
    # A float64 value beyond float32 becomes inf here: the finiteness check
    # that follows names it, without numpy's overflow warning first.
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(values, dtype=spec.dtype)


class InputLayout:
    """Which columns of a 2-D ``X`` feed which graph input.

    Parameters
    ----------
    specs : list of InputSpec
    input_columns : dict or None
        Graph input name -> list of column names (with a DataFrame) or
        positions; None assigns the columns in order by declared widths.
    """

    def __init__(self, specs, input_columns=None):
        self.specs = list(specs)
        self.input_columns = input_columns

    def column_positions(self, n_columns, feature_names):
        """Position of the columns of each input (a list of int arrays)."""
        specs = self.specs
        if self.input_columns is not None:
            return self._explicit_positions(n_columns, feature_names)
        if len(specs) == 1:
            spec = specs[0]
            if spec.width is not None and spec.width != n_columns:
                raise ValueError(
                    f"X has {n_columns} columns (features) but the graph input "
                    f"{spec.describe()} takes {spec.width} values per sample."
                )
            return [np.arange(n_columns)]
        unknown = [s.describe() for s in specs if s.width is None]
        if unknown:
            raise ValueError(
                f"The graph has several inputs and {', '.join(unknown)} has no fixed "
                "width, so the columns of X cannot be assigned to the inputs in order; "
                "pass input_columns={input name: [columns]} or X as a dict of arrays "
                "{input name: array}."
            )
        total = sum(s.width for s in specs)
        if total != n_columns:
            described = ", ".join(f"{s.describe()}: {s.width}" for s in specs)
            raise ValueError(
                f"X has {n_columns} columns but the graph's inputs take {total} "
                f"({described}), assigned in order; pass input_columns=... or a dict "
                "of arrays to feed them otherwise."
            )
        positions, start = [], 0
        for spec in specs:
            positions.append(np.arange(start, start + spec.width))
            start += spec.width
        return positions

    def _explicit_positions(self, n_columns, feature_names):
        mapping = self.input_columns
        names = [s.name for s in self.specs]
        unknown = sorted(set(mapping) - set(names))
        missing = [n for n in names if n not in mapping]
        if unknown or missing:
            raise ValueError(
                f"input_columns must name every graph input {names}; "
                + (f"unknown: {unknown}. " if unknown else "")
                + (f"missing: {missing}." if missing else "")
            )
        lookup = None
        if feature_names is not None:
            lookup = {str(f): k for k, f in enumerate(feature_names)}
        positions = []
        for spec in self.specs:
            columns = mapping[spec.name]
            if isinstance(columns, (str, int, np.integer)):
                columns = [columns]
            chosen = []
            for column in columns:
                if isinstance(column, str):
                    if lookup is None:
                        raise ValueError(
                            f"input_columns names column {column!r} but X has no column "
                            "names (give a pandas DataFrame, or positions)."
                        )
                    if column not in lookup:
                        raise ValueError(
                            f"input_columns names column {column!r}, which X does not "
                            f"have; its columns are {list(lookup)}."
                        )
                    chosen.append(lookup[column])
                elif isinstance(column, (int, np.integer)) and -n_columns <= column < n_columns:
                    chosen.append(int(column) % n_columns)
                else:
                    raise ValueError(
                        f"input_columns[{spec.name!r}] holds {column!r}: not a column of X "
                        f"(a name, or a position below {n_columns})."
                    )
            if spec.width is not None and len(chosen) != spec.width:
                raise ValueError(
                    f"input_columns gives {len(chosen)} column(s) to the graph input "
                    f"{spec.describe()}, which takes {spec.width} values per sample."
                )
            positions.append(np.asarray(chosen, dtype=np.intp))
        return positions


def _sample_shape(spec, n_values, what):
    """The static per-sample shape of ``spec`` holding ``n_values`` values."""
    shape = spec.shape
    unknown = [k for k, d in enumerate(shape) if d is None]
    if not unknown:
        return shape
    if len(shape) == 1:
        return (n_values,)
    raise ValueError(
        f"{what} gives {n_values} values per sample to the graph input "
        f"{spec.describe()}, whose per-sample shape is not fixed, so they cannot be "
        f"reshaped to it; give X as an array of shape (n_samples, "
        f"{', '.join('...' if d is None else str(d) for d in shape)}) or a dict of arrays."
    )


def to_graph_inputs(estimator, X, y, specs, input_columns, reset, **check):
    """``X`` (and ``y``) validated and split into one array per graph input.

    Parameters
    ----------
    estimator : BaseEstimator
        Records ``n_features_in_`` (and ``feature_names_in_``) on reset,
        checks them otherwise, as scikit-learn's ``validate_data``.
    X : array-like, DataFrame or dict of array-like
    y : array-like or None
    specs : list of InputSpec
    input_columns : dict or None
    reset : bool
    **check
        Passed to scikit-learn's validation of y (``multi_output``,
        ``y_numeric``) and of float X (``dtype``).

    Returns
    -------
    inputs : dict of str -> ndarray
        One C-contiguous array per graph input, ``(n_samples, *shape)``.
    y : ndarray or None
    """
    dtype = check.pop("dtype", [np.float64, np.float32])
    if is_input_dict(X):
        if input_columns is not None:
            raise ValueError(
                "input_columns assigns the columns of a 2-D X or DataFrame to the graph's "
                "inputs; X is a dict, which names its inputs already: leave "
                "input_columns=None."
            )
        return _dict_inputs(estimator, X, y, specs, reset, dtype, **check)
    nd_shape = None
    if not hasattr(X, "iloc") and not hasattr(X, "toarray"):
        ndim = np.ndim(X) if isinstance(X, np.ndarray) else None
        if ndim is None:
            try:
                X = np.asarray(X)
            except Exception:  # let scikit-learn say what is wrong with it
                ndim = 2
            else:
                ndim = X.ndim
        if ndim > 2:
            if len(specs) != 1:
                raise ValueError(
                    f"X has shape {X.shape}, but the graph has {len(specs)} inputs; give "
                    "X as a 2-D array, a DataFrame or a dict of arrays {input name: array}."
                )
            if input_columns is not None:
                raise ValueError(
                    f"input_columns assigns the columns of a 2-D X; X has shape {X.shape}."
                )
            nd_shape = X.shape[1:]
            spec = specs[0]
            if not _fits(nd_shape, spec.shape):
                raise ValueError(
                    f"X has samples of shape {tuple(nd_shape)} but the graph input "
                    f"{spec.describe()} takes samples of shape {_sample_text(spec.shape)}: "
                    f"X must have shape {_shape_text(spec.shape)}."
                )
            X = X.reshape(X.shape[0], -1) if X.shape[0] else X.reshape(0, int(np.prod(nd_shape)))
    if y is None:
        flat = validate_data(estimator, X, reset=reset, dtype=dtype)
    else:
        flat, y = validate_data(estimator, X, y, reset=reset, dtype=dtype, **check)
    if nd_shape is not None:
        return {specs[0].name: np.ascontiguousarray(
            flat.reshape((len(flat),) + tuple(nd_shape)), dtype=specs[0].dtype)}, y
    layout = InputLayout(specs, input_columns)
    positions = layout.column_positions(
        flat.shape[1], getattr(estimator, "feature_names_in_", None))
    inputs = {}
    for spec, columns in zip(specs, positions):
        if len(specs) == 1 and input_columns is None:
            values = flat
        else:
            values = flat.take(columns, axis=1)
        shape = _sample_shape(spec, values.shape[1], "X")
        if len(shape) == 0:
            if values.shape[1] != 1:
                raise ValueError(
                    f"The graph input {spec.describe()} takes one value per sample; "
                    f"it was given {values.shape[1]} columns."
                )
        values = _as_input(values, spec, "X")
        inputs[spec.name] = values.reshape((len(values),) + tuple(shape))
    return inputs, y


def _dict_inputs(estimator, X, y, specs, reset, dtype, **check):
    names = [s.name for s in specs]
    unknown = sorted(set(X) - set(names))
    missing = [n for n in names if n not in X]
    if unknown or missing:
        raise ValueError(
            f"X as a dict must hold one array per graph input {names}; "
            + (f"unknown keys: {unknown}. " if unknown else "")
            + (f"missing: {missing}." if missing else "")
        )
    inputs = {}
    width = 0
    for spec in specs:
        values = check_array(
            X[spec.name], ensure_2d=False, allow_nd=True, ensure_all_finite=False,
            dtype=None if spec.is_integer else dtype, input_name=f"X[{spec.name!r}]",
            estimator=estimator, ensure_min_samples=1,
        )
        if values.ndim == 0:
            raise ValueError(f"X[{spec.name!r}] is a scalar; give one row per sample.")
        if values.dtype.kind not in "fiub":
            raise ValueError(
                f"X[{spec.name!r}] holds {values.dtype} values; the graph input "
                f"{spec.describe()} takes {spec.dtype} numbers."
            )
        sample = values.shape[1:]
        if spec.shape == (1,) and sample == ():
            values = values.reshape(-1, 1)
            sample = (1,)
        if not _fits(sample, spec.shape):
            raise ValueError(
                f"X[{spec.name!r}] has shape {values.shape} but the graph input "
                f"{spec.describe()} takes an array of shape {_shape_text(spec.shape)}."
            )
        if not spec.is_integer and values.dtype.kind != "f":
            values = values.astype(np.float64)
        inputs[spec.name] = _as_input(values, spec, f"X[{spec.name!r}]")
        width += int(np.prod(sample, dtype=np.int64))
    check_consistent_length(*inputs.values(), *(() if y is None else (y,)))
    if reset:
        estimator.n_features_in_ = width
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    elif getattr(estimator, "n_features_in_", width) != width:
        raise ValueError(
            f"X has {width} features, but {type(estimator).__name__} is expecting "
            f"{estimator.n_features_in_} features as input."
        )
    if y is not None:
        y = validate_data(estimator, y=y, reset=False, **check)
    return inputs, y


def is_input_dict(X):
    """Whether ``X`` gives the graph inputs by name (a mapping that is not a
    sparse matrix: scipy's DOK format is a dict)."""
    return isinstance(X, Mapping) and not hasattr(X, "toarray")


def take_rows(inputs, indices):
    """The samples ``indices`` of each graph input."""
    return {name: values[indices] for name, values in inputs.items()}


def n_samples(inputs):
    """Number of samples of a dict of graph inputs."""
    return len(next(iter(inputs.values())))
