"""Check onnxfit's gradient of a graph against float64 finite differences.

:func:`check_gradients` is the check onnxfit's own tests run on every rule
and on the graphs of ``tests/zoo``, made public so that anyone can run it on
their own graph before trusting a fit:

1. the graph is loaded and prepared exactly as the estimators and
   :class:`onnxfit.OnnxFunction` prepare it (same output, same default
   trainable weights);
2. onnxfit's gradient of ``sum(Y * dY)`` -- ``Y`` the trained output, ``dY``
   a random cotangent -- is computed with the chosen gradient backend, in the
   graph's own element type (float32, usually), by the same forward and
   backward sessions training runs;
3. a float64 copy of the graph computes central differences of that same
   sum at a few sampled positions of every weight; it runs on onnxruntime
   where onnxruntime has float64 kernels for all its operators, and on
   ``onnx.reference.ReferenceEvaluator`` where it has not (Conv,
   AveragePool, Erf, ... on the CPU), with an exact float64 Erf and Gelu
   (the reference evaluator's own are float32 approximations, too coarse
   for finite differences);
4. the two are compared per weight, relative to the size of that weight's
   gradient.

Float64 differences make the reference far more accurate than the float32
gradient checked against it, so the errors reported are the gradient's.
"""

import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from .function import build_model_runner
from .gradient import DEFAULT_BACKEND, check_backend
from .model import OnnxModel, load_onnx, normalise_model
from .onnx_graphs import numpy_dtype, tensor_elem_type
from .sessions import make_session

__all__ = ["GradientCheck", "WeightCheck", "check_gradients"]

#: Size given to a symbolic (or unknown) first dimension when X is generated.
DEFAULT_BATCH_SIZE = 4
#: Default ``tolerance`` by element type of the checked gradient: a float32
#: gradient carries float32 rounding (errors of 1e-7 to 1e-5 on real graphs),
#: a float64 one almost none; a wrong rule is off by far more than either.
DEFAULT_TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-6}
#: The scale dividing a weight's errors is never below this fraction of the
#: largest gradient of all checked weights: a weight whose sampled gradients
#: are all (nearly) zero would otherwise turn rounding noise into a huge
#: relative error.
_SCALE_FLOOR = 1e-5


@dataclass(frozen=True)
class WeightCheck:
    """The comparison for one weight (or input) of the graph.

    Attributes
    ----------
    name : str
    shape : tuple of int
    positions : list of tuple of int
        Elements compared (all of them when the weight is small).
    gradient : ndarray of float64
        onnxfit's gradient at ``positions``.
    finite_difference : ndarray of float64
        The float64 central differences at ``positions``.
    max_abs_error : float
        ``max |gradient - finite_difference|``.
    max_rel_error : float
        ``max_abs_error / scale``.
    scale : float
        ``max |finite_difference|``, floored (see :func:`check_gradients`).
    passed : bool
    """

    name: str
    shape: tuple
    positions: list = field(repr=False)
    gradient: np.ndarray = field(repr=False)
    finite_difference: np.ndarray = field(repr=False)
    max_abs_error: float
    max_rel_error: float
    scale: float
    passed: bool


@dataclass(frozen=True)
class GradientCheck:
    """What :func:`check_gradients` found.

    ``str(result)`` is a readable report: one row per weight, the worst
    marked.

    Attributes
    ----------
    passed : bool
        Every checked weight's relative error is within ``tolerance``.
    worst_weight : str
        The weight with the largest relative error.
    max_abs_error : dict of str -> float
        Per weight, ``max |onnxfit - finite difference|`` over the checked
        positions.
    max_rel_error : dict of str -> float
        Per weight, that error divided by the weight's gradient scale.
    tolerance : float
    output_name : str
        The differentiated output.
    backend : str
        The gradient backend checked.
    dtype : numpy dtype
        Element type of the checked gradient (the graph's).
    reference : {'onnxruntime', 'onnx.reference'}
        What ran the float64 copy of the graph.
    step : float
        Finite-difference step.
    output_rel_diff : float
        ``max |Y64 - Y| / max |Y64|`` between the float64 copy's output and
        the graph's own: a large value means the copy does not compute what
        the graph does (the check then compares against the wrong function).
    weights : dict of str -> WeightCheck
        The details: positions, both gradients at them.
    """

    passed: bool
    worst_weight: str
    max_abs_error: dict
    max_rel_error: dict
    tolerance: float
    output_name: str
    backend: str
    dtype: np.dtype
    reference: str
    step: float
    output_rel_diff: float
    weights: dict = field(repr=False)

    def __str__(self):
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"Gradient check of {self.output_name!r}: {verdict} (tolerance {self.tolerance:.1e})",
            f"  onnxfit backend {self.backend!r} in {np.dtype(self.dtype).name} against "
            f"float64 central differences (step {self.step:.1e}) on {self.reference}",
        ]
        if self.output_rel_diff > 1e-3:
            lines.append(
                f"  WARNING: the float64 copy's output differs from the graph's by "
                f"{self.output_rel_diff:.1e} (relative): the reference may be wrong"
            )
        rows = [("weight", "shape", "checked", "max abs error", "max rel error", "")]
        for name, check in self.weights.items():
            status = "ok" if check.passed else "FAILED"
            if name == self.worst_weight:
                status += " <- worst"
            rows.append((name, str(check.shape), str(len(check.positions)),
                         f"{check.max_abs_error:.3e}", f"{check.max_rel_error:.3e}", status))
        widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
        for row in rows:
            lines.append("  " + "  ".join(
                cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        return "\n".join(lines)


def check_gradients(model, X=None, *, output_name=None, weights_to_train=None,
                    input_gradient=False, n_positions=20, step=1e-6, tolerance=None,
                    batch_size=DEFAULT_BATCH_SIZE, random_state=None,
                    backend=DEFAULT_BACKEND):
    """Compare onnxfit's gradient of a graph with float64 finite differences.

    The function checked is ``sum(Y * dY)``, ``Y`` the output onnxfit would
    train and ``dY`` a random cotangent: its gradient with respect to each
    weight is what training uses.  onnxfit computes it with ``backend`` in
    the graph's own element type; a float64 copy of the graph gives central
    differences at ``n_positions`` random elements of every weight.  Use it
    when a graph holds operators or configurations onnxfit's tests may not
    cover, before a long fit, or when a fit behaves strangely.

    Parameters
    ----------
    model : onnx.ModelProto, bytes or path-like
        The graph; it is copied, never modified.
    X : ndarray or dict of str -> ndarray, default=None
        Input values: an array for a graph with one input, a dict by input
        name otherwise.  Float inputs left out are generated from their
        declared shapes (standard normal values; a symbolic or unknown
        first dimension becomes ``batch_size``, a symbolic dimension shared
        with a given input takes its size); every other dimension must be
        known.  Integer and other non-float inputs must be given (valid
        indices depend on the graph).
    output_name : str, default=None
        Output to differentiate; None: the only output or the first float
        one, as for the estimators.
    weights_to_train : list of str, default=None
        Weights to check; None: every floating-point initializer the output
        depends on (BatchNormalization's running statistics excluded), as
        for the estimators.
    input_gradient : bool, default=False
        Also check the gradient with respect to the graph's float inputs
        (as :class:`onnxfit.OnnxFunction` returns it).
    n_positions : int, default=20
        Elements compared per weight, sampled at random (all of them for a
        smaller weight).  Each costs two runs of the float64 graph.
    step : float, default=1e-6
        Central-difference step.  float64 differences are accurate to about
        ``1e-10`` (relative) at this step; a larger one suits graphs with
        very large values.
    tolerance : float, default=None
        Largest relative error passed: per weight,
        ``max |onnxfit - finite difference|`` over the checked positions,
        divided by ``max |finite difference|`` (never below 1e-5 times the
        largest of all weights, so that weights with a zero gradient are not
        judged on rounding noise).  None: 1e-4 for a float32 graph, 1e-6
        for a float64 one.
    batch_size : int, default=4
        First dimension of generated inputs when it is symbolic.
    random_state : int, numpy Generator or None, default=None
        Seeds the generated inputs, the cotangent and the sampled positions.
    backend : {'onnxfit', 'onnxruntime-training'}, default='onnxfit'
        Gradient backend to check (see :mod:`onnxfit.gradient`).

    Returns
    -------
    GradientCheck
        ``result.passed``, per-weight errors, the worst weight; print it for
        a table.

    Raises
    ------
    onnxfit.gradient.GradientError
        When the graph cannot be differentiated (an operator without a rule
        between a weight and the output), as training would refuse it.
    ValueError
        For inputs that cannot be generated (a symbolic dimension other than
        the first, a non-float input) or do not fit the graph, and for the
        reasons the estimators refuse a graph.
    ImportError
        When ``backend`` needs a runtime that is not installed.
    RuntimeError
        When neither onnxruntime nor onnx's reference evaluator runs the
        float64 copy of the graph.

    Notes
    -----
    Where the gradient is not defined (ReLU at 0, ties of MaxPool), finite
    differences straddling the kink disagree with any gradient; random
    inputs make that unlikely, chosen inputs (zeros) make it likely.
    onnx's reference evaluator computes Conv with ``auto_pad`` wrongly
    before onnx 1.23.

    Examples
    --------
    >>> import numpy as np
    >>> import onnxfit
    >>> from onnxfit.model import linear_model
    >>> result = onnxfit.check_gradients(linear_model(3, 2, np.float32), random_state=0)
    >>> result.passed, sorted(result.max_rel_error)
    (True, ['coef', 'intercept'])
    """
    check_backend(backend)
    if int(n_positions) < 1:
        raise ValueError(f"n_positions must be at least 1, got {n_positions}.")
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}.")
    rng = np.random.default_rng(random_state)
    model = load_onnx(model)
    # Declared shapes before normalise_model, which makes a fixed first
    # dimension symbolic: a graph exported with a fixed batch may hard-code
    # it in a Reshape, so generated inputs keep the declared size.
    declared = _declared_inputs(model)
    model = normalise_model(model)
    # The estimators' choice of output and weights; inputs the output does
    # not read are left out.
    prepared = OnnxModel(model, weights_to_train, output_name, unused_inputs="ignore")
    forward_model = prepared.forward_model()
    weight_names = list(prepared.weight_names)
    dtype = np.dtype(prepared.dtype)
    tolerance = DEFAULT_TOLERANCE.get(dtype, 1e-4) if tolerance is None else float(tolerance)
    weight_set = set(weight_names)
    data_inputs = [i.name for i in forward_model.graph.input if i.name not in weight_set]
    feeds = _make_inputs(X, declared, data_inputs, batch_size, rng)
    with_gradient = [n for n in data_inputs if numpy_dtype(declared[n][0]) is not None] \
        if input_gradient else []

    # onnxfit's gradient, by the forward and backward sessions training runs
    # (built here, not taken from the process-wide cache: a check must see
    # the rules as they are now).
    runner = build_model_runner(forward_model, weight_names, with_gradient, 1, backend)
    weights = prepared.initial_weights()
    inputs = {**feeds, **{n: np.ascontiguousarray(w) for n, w in weights.items()}}
    values = runner.forward(inputs)
    output = prepared.output_name
    y = values[output].numpy()
    dy = rng.standard_normal(y.shape).astype(dtype)
    gradients = {n: g.numpy() for n, g in runner.backward(inputs, values, {output: dy}).items()}

    # The float64 reference sees exactly the values the gradient saw.
    double = _to_double(forward_model)
    values64 = {n: (v.astype(np.float64) if v.dtype.kind == "f" else v) for n, v in inputs.items()}
    reference, run64 = _float64_runner(double, output, values64)
    y64 = run64(values64)
    dy64 = dy.astype(np.float64)
    output_rel_diff = float(np.abs(y64 - y).max() / max(np.abs(y64).max(), 1e-30)) \
        if y.size else 0.0

    def objective(changed):
        return float(np.sum(run64({**values64, **changed}) * dy64))

    compared = {}
    for name in weight_names + with_gradient:
        base = values64[name]
        flat_size = base.size
        picked = np.sort(rng.choice(flat_size, min(int(n_positions), flat_size), replace=False))
        differences = []
        for k in picked:
            # Perturb a copy: values64 must keep the unperturbed weights for
            # the other positions and weights.
            changed = base.copy()
            flat = changed.reshape(-1)
            flat[k] = base.flat[k] + step
            up = objective({name: changed})
            flat[k] = base.flat[k] - step
            down = objective({name: changed})
            differences.append((up - down) / (2 * step))
        positions = [tuple(int(i) for i in np.unravel_index(k, base.shape)) for k in picked]
        compared[name] = (positions, np.asarray(gradients[name], dtype=np.float64).reshape(-1)[
            picked], np.array(differences, dtype=np.float64), tuple(base.shape))

    largest = max((float(np.abs(fd).max()) for _, _, fd, _ in compared.values() if fd.size),
                  default=0.0)
    floor = max(_SCALE_FLOOR * largest, np.finfo(np.float64).tiny)
    checks = {}
    for name, (positions, grad, fd, shape) in compared.items():
        abs_error = float(np.abs(grad - fd).max()) if fd.size else 0.0
        if not np.isfinite(abs_error):
            abs_error = float("inf")
        scale = max(float(np.abs(fd).max()) if fd.size else 0.0, floor)
        rel_error = abs_error / scale
        checks[name] = WeightCheck(
            name=name, shape=shape, positions=positions, gradient=grad, finite_difference=fd,
            max_abs_error=abs_error, max_rel_error=rel_error, scale=scale,
            passed=bool(rel_error <= tolerance),
        )
    worst = max(checks, key=lambda n: checks[n].max_rel_error)
    return GradientCheck(
        passed=all(c.passed for c in checks.values()),
        worst_weight=worst,
        max_abs_error={n: c.max_abs_error for n, c in checks.items()},
        max_rel_error={n: c.max_rel_error for n, c in checks.items()},
        tolerance=tolerance,
        output_name=output,
        backend=backend,
        dtype=dtype,
        reference=reference,
        step=float(step),
        output_rel_diff=output_rel_diff,
        weights=checks,
    )


# -- the graph --------------------------------------------------------------------------------
def _declared_inputs(model):
    """Graph input (not initializer) name -> (element type, dims), a dim an
    int, a str (symbolic) or None (unknown); dims None without a shape."""
    init_names = {i.name for i in model.graph.initializer}
    declared = {}
    for value in model.graph.input:
        if value.name in init_names:
            continue
        tensor = value.type.tensor_type
        dims = None
        if tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value")
                    else (d.dim_param or None) for d in tensor.shape.dim]
        declared[value.name] = (tensor_elem_type(value), dims)
    return declared


# -- the inputs ------------------------------------------------------------------------------
def _make_inputs(X, declared, names, batch_size, rng):
    """The value of every input in ``names``: given in ``X``, or generated."""
    if X is None:
        given = {}
    elif isinstance(X, dict):
        given = dict(X)
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise ValueError(f"X names {unknown}, which are not inputs of the graph; its "
                             f"inputs are {list(declared)}.")
    else:
        if len(names) != 1:
            raise ValueError(
                f"The graph has {len(names)} inputs {names}: give X as a dict of arrays by "
                "input name.")
        given = {names[0]: X}
    feeds, sizes = {}, {}
    for name in names:
        if name not in given:
            continue
        elem, dims = declared[name]
        if not elem:
            raise ValueError(f"Input {name!r} is not a tensor: check_gradients feeds tensors.")
        value = np.asarray(given[name])
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if numpy_dtype(elem) is not None:
            if value.dtype.kind not in "fiub":
                raise ValueError(f"Input {name!r} must hold numbers, not {value.dtype}.")
        elif dtype.kind in "iu" and value.dtype.kind not in "iub":
            raise ValueError(f"Input {name!r} is {dtype.name}: give integers, not {value.dtype}.")
        value = np.ascontiguousarray(value.astype(dtype, copy=False))
        if dims is not None:
            if value.ndim != len(dims) or any(
                    isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, value.shape)):
                shown = tuple(d if isinstance(d, int) and d > 0 else (d or "?") for d in dims)
                raise ValueError(
                    f"Input {name!r} must have shape {shown}, not {value.shape}.")
            for d, s in zip(dims, value.shape):
                if isinstance(d, str):
                    sizes.setdefault(d, s)
        feeds[name] = value
    for name in names:
        if name in feeds:
            continue
        elem, dims = declared[name]
        dtype = numpy_dtype(elem)
        if dtype is None:
            kind = helper.tensor_dtype_to_np_dtype(elem).name if elem else "not a tensor"
            raise ValueError(
                f"Input {name!r} is {kind}: check_gradients generates float inputs only "
                f"(valid values of {name!r} depend on the graph); give it in X, as a dict "
                "of arrays by input name.")
        if dims is None:
            raise ValueError(f"Input {name!r} declares no shape: give its value in X.")
        shape = []
        for k, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in sizes:
                shape.append(sizes[d])
            elif k == 0:
                # The batch: any size the graph runs; later inputs sharing
                # the symbol get the same.
                shape.append(int(batch_size))
                if isinstance(d, str):
                    sizes[d] = int(batch_size)
            else:
                raise ValueError(
                    f"Input {name!r} has shape {tuple(x or '?' for x in dims)}: dimension {k} "
                    f"({d or 'unknown'}) is symbolic and only the first (the batch) can be "
                    "chosen for you; give the input's value in X.")
        feeds[name] = np.ascontiguousarray(rng.standard_normal(shape).astype(dtype))
    return feeds


# -- the float64 reference ---------------------------------------------------------------------
def _double_tensor(tensor):
    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)


#: Attributes naming an element type that a float64 copy must change.
_TYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype",
                    "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                    "RandomUniformLike": "dtype"}


def _all_nodes(graph):
    """The nodes of ``graph`` and of its subgraphs."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def _to_double(model):
    """A copy of ``model`` computing in float64 whatever it computes in
    float32 (initializers, constants, casts, inputs, outputs)."""
    double = onnx.ModelProto()
    double.CopyFrom(model)
    graph = double.graph
    for k, init in enumerate(graph.initializer):
        graph.initializer[k].CopyFrom(_double_tensor(init))
    for node in _all_nodes(graph):
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name in (
                "value_float", "value_floats"):
            value = np.array(helper.get_attribute_value(node.attribute[0]), dtype=np.float64)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                attribute.t.CopyFrom(_double_tensor(attribute.t))
            elif (attribute.name == _TYPE_ATTRIBUTES.get(node.op_type)
                  and attribute.i == TensorProto.FLOAT):
                attribute.i = TensorProto.DOUBLE
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    # Types recorded by shape inference are float32's: let them be inferred
    # again.
    del graph.value_info[:]
    return double


@functools.lru_cache(maxsize=None)
def _float64_ops():
    """Erf and Gelu for onnx's reference evaluator, exact in float64 (its
    own Erf is a float32-accurate approximation, too coarse for finite
    differences)."""
    from onnx.reference.op_run import OpRun
    from scipy.special import erf

    def run_erf(self, x):
        return (erf(x).astype(x.dtype),)

    def run_gelu(self, x, approximate="none"):
        if approximate == "tanh":
            inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        return ((0.5 * x * (1 + erf(x / np.sqrt(2)))).astype(x.dtype),)

    # The reference evaluator matches an implementation to its operator by
    # class name.
    return [type("Erf", (OpRun,), {"op_domain": "", "_run": run_erf}),
            type("Gelu", (OpRun,), {"op_domain": "", "_run": run_gelu})]


def _float64_runner(model, output, feeds):
    """(engine name, function feeds -> float64 output) for the float64
    ``model``: onnxruntime when it runs the graph in float64, else onnx's
    reference evaluator."""
    errors = []
    try:
        session = make_session(model, dtype=np.float64)
        # A missing float64 kernel shows only when the graph runs (GRU,
        # LSTM): onnxruntime would log it as an error, which here is only
        # the signal to use the reference evaluator.
        quiet = onnxruntime.RunOptions()
        quiet.log_severity_level = 4

        def run(values):
            return np.asarray(session.run([output], values, quiet)[0], dtype=np.float64)

        run(feeds)
        return "onnxruntime", run
    except Exception as exc:  # no float64 kernel for some operator: the evaluator has
        errors.append(f"onnxruntime: {str(exc)[:300]}")
    try:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model, new_ops=_float64_ops())

        def run(values):
            return np.asarray(evaluator.run([output], values)[0], dtype=np.float64)

        run(feeds)
        return "onnx.reference", run
    except Exception as exc:
        errors.append(f"onnx.reference: {str(exc)[:300]}")
    raise RuntimeError(
        "Neither onnxruntime nor onnx's reference evaluator runs the float64 copy of the "
        "graph, so there is no finite-difference reference: " + " | ".join(errors))
