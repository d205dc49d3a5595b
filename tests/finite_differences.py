"""Checking a gradient graph against float64 central finite differences.

Test code only.  A graph is differentiated by onnxfit's own backend
(``build_vjp``), every float output seeded by a random cotangent ``dY``;
each gradient element is compared with the central difference of
``sum over outputs of <Y, dY>``.  Graphs run on onnxruntime in float64
where it has float64 kernels, and on onnx's reference evaluator where it has
none (Conv, ConvTranspose, AveragePool, GlobalAveragePool, Erf): the
gradient graph then also runs on onnxruntime in float32, so that
onnxruntime's kernels are checked against the same reference.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from scipy.special import erf

from onnxfit.gradient import build_vjp
from onnxfit.onnx_graphs import check_graph
from onnxfit.sessions import make_session

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE)


class Erf(OpRun):
    """onnx's reference Erf is a float32-accurate approximation: too coarse
    for finite differences in float64."""

    op_domain = ""

    def _run(self, x):
        return (erf(x).astype(x.dtype),)


class Gelu(OpRun):
    """onnx's reference Gelu uses the coarse Erf too."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype),)
        return ((0.5 * x * (1 + erf(x / np.sqrt(2)))).astype(x.dtype),)


class Runner:
    """Runs a model on the most precise engine that can: onnxruntime in
    float64, onnx's reference evaluator in float64 (where onnxruntime has no
    float64 kernel), or onnxruntime in float32 (where the reference evaluator
    has a bug, as for grouped ConvTranspose).

    Attributes
    ----------
    engine : {'onnxruntime', 'reference', 'float32'}
    """

    def __init__(self, model, feeds):
        self.model = model
        errors = []
        for engine in ("onnxruntime", "reference", "float32"):
            try:
                self._prepare(engine)
                self(None, feeds)
            except Exception as exc:  # the next engine may run it
                errors.append(f"{engine}: {str(exc)[:300]}")
                continue
            self.engine = engine
            return
        raise RuntimeError("No engine runs the model: " + " | ".join(errors))

    def _prepare(self, engine):
        self._float32 = engine == "float32"
        if engine == "onnxruntime":
            self._run = make_session(self.model, dtype=np.float64).run
        elif engine == "reference":
            self._run = ReferenceEvaluator(self.model, new_ops=[Erf, Gelu]).run
        else:
            self._run = make_session(as_float32(self.model)).run

    def __call__(self, names, feeds):
        if self._float32:
            feeds = {k: (v.astype(np.float32) if v.dtype == np.float64 else v)
                     for k, v in feeds.items()}
        results = self._run(names, feeds)
        return [np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f"
                else np.asarray(v) for v in results]


def as_float32(model):
    """A copy of a float64 model with every float64 tensor made float32."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.DOUBLE:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for init in graph.initializer:
        if init.data_type == TensorProto.DOUBLE:
            init.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float32), init.name))

    def fix_node(node):
        for attribute in node.attribute:
            if attribute.HasField("t") and attribute.t.data_type == TensorProto.DOUBLE:
                attribute.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attribute.t).astype(np.float32), attribute.t.name))
            if attribute.name == "to" and attribute.i == TensorProto.DOUBLE:
                attribute.i = TensorProto.FLOAT
    for node in graph.node:
        fix_node(node)
    return copy


def check_gradients(model, feeds, wrt=None, seed=0, rtol=1e-6, max_elements=60, h=1e-6,
                    float32=True, linear=False):
    """Compare onnxfit's gradients of ``model`` with finite differences.

    Parameters
    ----------
    model : onnx.ModelProto
        float64 graph; ``feeds`` gives every graph input.
    feeds : dict of str -> ndarray
    wrt : list of str, optional
        Inputs to differentiate; default every float input.
    rtol : float
        Allowed error relative to the largest finite difference of a tensor.
    max_elements : int
        Elements checked per tensor (chosen at random beyond that).
    float32 : bool
        Also run the gradient graph in float32 on onnxruntime and compare
        with the float64 gradient.
    linear : bool
        The model is linear in each input: compare the float32 gradient
        with finite differences of onnxruntime's own float32 forward pass
        instead (exact for a linear map, whatever the step), so that the
        gradient is checked against the forward pass the runtime computes.

    Returns
    -------
    dict
        ``{"engine": ..., "errors": {name: relative error}}``.

    Raises
    ------
    AssertionError
        Naming the op types, the tensor and the error.
    """
    graph = model.graph
    ops = sorted({n.op_type for n in graph.node})
    if wrt is None:
        wrt = [i.name for i in graph.input if i.type.tensor_type.elem_type in FLOAT_TYPES]
    outputs = [o.name for o in graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    seeds = {o: f"d_{o}" for o in outputs}
    gradient = build_vjp(model, seeds, wrt)
    for node in gradient.model.graph.node:
        assert node.domain in ("", "ai.onnx"), f"{ops}: {node.op_type} in domain {node.domain!r}"
    check_graph(gradient.model, check_types=_types_check(model))
    rng = np.random.default_rng(seed)
    forward = Runner(model, feeds)
    values = dict(zip(outputs, forward(outputs, feeds)))
    cotangents = {
        seeds[o]: np.asarray(rng.standard_normal(values[o].shape)).astype(_dtype_of(model, o))
        for o in outputs
    }
    backward = Runner(gradient.model, {**feeds, **cotangents})
    names = [gradient.gradient_names[w] for w in wrt]
    grads = dict(zip(wrt, backward(names, {**feeds, **cotangents})))
    if forward.engine == "float32":
        # Only operators linear in each input need this (grouped
        # ConvTranspose): their central differences are exact for any step.
        h, rtol = 0.5, max(rtol, 1e-4)
    if backward.engine == "float32":
        rtol = max(rtol, 1e-4)

    def objective(changed):
        results = forward(outputs, {**feeds, **changed})
        return sum(float(np.sum(r * cotangents[seeds[o]])) for o, r in zip(outputs, results))

    errors = {}
    for name in wrt:
        x = feeds[name]
        grad = grads[name]
        assert grad.shape == x.shape, f"{ops}: gradient of {name} has shape {grad.shape}, not {x.shape}"
        positions = list(np.ndindex(x.shape)) if x.ndim else [()]
        if len(positions) > max_elements:
            picked = rng.choice(len(positions), max_elements, replace=False)
            positions = [positions[k] for k in picked]
        numeric = []
        for index in positions:
            plus, minus = x.copy(), x.copy()
            plus[index] += h
            minus[index] -= h
            numeric.append((objective({name: plus}) - objective({name: minus})) / (2 * h))
        numeric = np.array(numeric)
        analytic = np.array([grad[index] for index in positions])
        scale = max(1.0, float(np.abs(numeric).max()))
        error = float(np.abs(analytic - numeric).max()) / scale
        errors[name] = error
        assert error <= rtol, (
            f"{ops}: gradient of {name!r} differs from finite differences by {error:.3g} "
            f"(relative; forward on {forward.engine}, gradient on {backward.engine}); first "
            f"positions {positions[:3]}: onnxfit {analytic[:3]}, numeric {numeric[:3]}"
        )
    if float32:
        model32 = as_float32(gradient.model)
        session = make_session(model32)
        feeds32 = {k: (v.astype(np.float32) if v.dtype == np.float64 else v)
                   for k, v in {**feeds, **cotangents}.items()}
        got = dict(zip(wrt, session.run(names, feeds32)))
        targets, what = grads, "the float64 one"
        if linear:
            targets = _runtime_differences(model, feeds32, wrt, outputs, seeds, rng)
            what = "finite differences of onnxruntime's float32 forward pass"
        for name in wrt:
            scale = max(1.0, float(np.abs(targets[name]).max()))
            error = float(np.abs(got[name] - targets[name]).max()) / scale
            assert error <= 2e-4, (
                f"{ops}: float32 gradient of {name!r} on onnxruntime differs from {what} "
                f"by {error:.3g}"
            )
    return {"forward": forward.engine, "backward": backward.engine, "errors": errors}


def _runtime_differences(model, feeds32, wrt, outputs, seeds, rng):
    """Central differences (step 1) of a model linear in each input, on
    onnxruntime in float32, every element of every input in ``wrt``."""
    session = make_session(as_float32(model))
    cotangents = {o: feeds32[seeds[o]].astype(np.float64) for o in outputs}
    inputs = {k: v for k, v in feeds32.items() if k not in seeds.values()}

    def objective(changed):
        results = session.run(outputs, {**inputs, **changed})
        return sum(float(np.sum(r.astype(np.float64) * cotangents[o]))
                   for o, r in zip(outputs, results))

    differences = {}
    for name in wrt:
        x = inputs[name]
        numeric = np.zeros(x.shape)
        for index in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[index] += 1
            minus[index] -= 1
            numeric[index] = (objective({name: plus}) - objective({name: minus})) / 2
        differences[name] = numeric
    return differences


def _dtype_of(model, name):
    elem = next(o.type.tensor_type.elem_type for o in model.graph.output if o.name == name)
    return helper.tensor_dtype_to_np_dtype(elem)


def node_model(op_type, inputs, outputs=("Y",), opset=17, constants=None, shapes=None,
               **attributes):
    """A float64 model of one node.

    Parameters
    ----------
    inputs : list of (name, ndarray or None)
        Graph inputs (None: an omitted optional input, written as "").
    outputs : sequence of str
    constants : dict of str -> ndarray, optional
        Inputs given as initializers (indices, axes, shapes, pads).
    shapes : dict of str -> list, optional
        Declared shapes overriding the static ones (symbolic dimensions).
    """
    constants = constants or {}
    shapes = shapes or {}
    graph_inputs, names = [], []
    for name, value in inputs:
        if value is None:
            names.append("")
            continue
        names.append(name)
        if name in constants:
            continue
        elem = helper.np_dtype_to_tensor_dtype(value.dtype)
        graph_inputs.append(helper.make_tensor_value_info(
            name, elem, shapes.get(name, list(value.shape))))
    node = helper.make_node(op_type, names, list(outputs), **attributes)
    graph = helper.make_graph(
        [node], op_type.lower(), graph_inputs,
        [onnx.ValueInfoProto(name=o) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    known = {v.name: v for v in inferred.graph.output}
    for o in outputs:
        info = known[o]
        if not info.type.tensor_type.elem_type:
            info = helper.make_tensor_value_info(o, TensorProto.DOUBLE, None)
        model.graph.output.append(info)
    check_graph(model, check_types=_types_check(model))
    return model


def _types_check(model):
    """Whether ``model`` passes strict type inference: a float64 model of an
    operator the ONNX schema defines for float32 only (Celu) does not, and
    runs on the reference evaluator all the same."""
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        if "unsupported type" not in str(exc):
            raise
        return False
    return True
