"""The ``'onnxruntime-training'`` gradient backend: onnxruntime-training 1.19.2.

The gradient builder of onnxruntime-training-cpu 1.19.2 (the last release of
the training build, Python 3.12 and older) differentiates a scalar; this
module gives it the scalar ``sum over seeds of <value, cotangent>``, then
rewrites what it builds into graphs that run like onnxfit's own: the
training-only gradient kernels it emits (ReluGrad, SigmoidGrad, TanhGrad,
Scale, FusedMatMul) become standard operators, and the backward pass reads
each cotangent directly instead of differentiating the inner products.
ConvGrad, MaxPoolGrad and the like stay: such graphs need the training build
at run time.  Gradients saved from it are among the references of onnxfit's
own (tests/zoo), and CI compares the two backends live.

Everything that touches the training build's private API
(``onnxruntime.capi._pybind_state``) lives here.  ``import
onnxruntime.training`` is never executed: it imports torch.

Facts this module relies on (onnxruntime-training-cpu 1.19.2):

* ``GradientGraphBuilder(model_bytes, {loss}, set(weights), loss,
  session_options)`` builds forward + loss + gradients in one graph whose
  outputs are named ``<weight>_grad``, in an order that varies between runs
  (always look them up by name);
* the builder seeds the loss gradient as float32, so a float64 loss must end
  with ``Cast(to=FLOAT)``, and float64 sessions must disable
  ``MatmulTransposeFusion`` (the CPU FusedMatMul kernel is float32 only);
* the gradient of AveragePool (AveragePoolGrad) kills the process with
  SIGFPE: graphs with AveragePool on the gradient path are refused.
"""

import re

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper

from ..onnx_graphs import (
    append_piece,
    append_sum,
    existing_names,
    fold_cast_like,
    numpy_dtype,
    onnx_elem_type,
    parse_piece,
    prune_graph,
    rename_value,
    value_types,
)
from ..sessions import has_training_build, session_options

try:  # the training build exposes these; the plain package does not
    from onnxruntime.capi import _pybind_state as _C
except ImportError:  # pragma: no cover - broken install
    _C = None

#: Operators whose 1.19.2 gradient crashes the process.
_CRASHING_OPS = {"AveragePool": "its gradient kernel (AveragePoolGrad) crashes with SIGFPE"}


class TrainingRuntimeError(ImportError):
    """onnxruntime is installed without its training build."""


def check_available():
    """Raise :class:`TrainingRuntimeError` unless onnxruntime-training is usable.

    onnxruntime, onnxruntime-training and onnxruntime-training-cpu all own
    the same ``onnxruntime/`` folder: whichever was installed last is the
    one Python imports.
    """
    if _C is None or not has_training_build():
        raise TrainingRuntimeError(
            "gradient_backend='onnxruntime-training' needs onnxruntime-training-cpu "
            f"1.19.2, but the installed onnxruntime {onnxruntime.__version__} has no "
            "gradient builder. It only exists for Python 3.10-3.12 and replaces the "
            "plain onnxruntime package (both install the same 'onnxruntime' folder): "
            "pip uninstall -y onnxruntime && pip install 'onnxfit[ort-training]'. "
            "The default gradient_backend='onnxfit' needs none of this."
        )


def gradient_name(weight_name):
    """Name of the gradient output the builder gives ``weight_name``."""
    return weight_name + "_grad"


_INNER_PRODUCT_TEXT = """
inner_product ({T}[] a, {T}[] b) => ({T} inner) {{
    product = Mul(a, b)
    inner = ReduceSum<keepdims = 0>(product)
}}
"""

#: Name of the scalar the builder differentiates.
SURROGATE = "onnxfit.ort_training.surrogate"


def vjp(model, seeds, wrt, gradient_names):
    """The ``'onnxruntime-training'`` backend of :func:`onnxfit.gradient.build_vjp`.

    The builder differentiates ``sum of <value, cotangent> + sum of scalar
    seeds``; the node that then computes each seeded value's gradient is
    replaced by the cotangent itself (see :func:`read_output_gradient`).
    """
    from .own import GradientError

    check_available()
    surrogate = onnx.ModelProto()
    surrogate.CopyFrom(model)
    graph = surrogate.graph
    inferred = onnx.shape_inference.infer_shapes(surrogate)
    types = value_types(inferred)
    shapes = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)
              + list(inferred.graph.input)}
    defined = existing_names(graph)
    readers = {name for node in graph.node for name in node.input}
    terms, direct = [], []
    for k, (value, seed) in enumerate(seeds.items()):
        dtype = numpy_dtype(types.get(value))
        if not isinstance(seed, str):
            terms.append((value, dtype))
            continue
        if seed not in defined:
            info = onnx.ValueInfoProto()
            if value in shapes:
                info.CopyFrom(shapes[value])
            else:
                info.CopyFrom(helper.make_tensor_value_info(value, types[value], None))
            info.name = seed
            graph.input.append(info)
        inner = append_piece(graph, parse_piece(_INNER_PRODUCT_TEXT, dtype), f"onnxfit.seed{k}.",
                             {"a": value, "b": seed})["inner"]
        terms.append((inner, dtype))
        if value not in readers and value not in wrt:
            direct.append((value, seed))
    dtype = terms[0][1]
    append_sum(graph, [term for term, _ in terms], SURROGATE, dtype, prefix=f"{SURROGATE}.")
    outputs = list(graph.output)
    del graph.output[:]
    graph.output.extend(outputs)
    graph.output.append(helper.make_tensor_value_info(SURROGATE, onnx_elem_type(dtype), []))
    result = build_gradient_model(surrogate, SURROGATE, wrt)
    crashing = sorted({n.op_type for n in result.graph.node if n.op_type[:-4] in _CRASHING_OPS
                       and n.op_type.endswith("Grad")})
    if crashing:
        op = crashing[0][:-4]
        raise GradientError(
            f"onnxruntime-training 1.19.2 cannot differentiate {op}: {_CRASHING_OPS[op]}. "
            "Use gradient_backend='onnxfit'."
        )
    for value, seed in direct:
        read_output_gradient(result, value, seed)
    graph = result.graph
    for weight in wrt:
        rename_value(graph, gradient_name(weight), gradient_names[weight])
    kept = [o for o in graph.output if o.name in {x.name for x in outputs}]
    kept += [o for o in graph.output if o.name in set(gradient_names.values())]
    del graph.output[:]
    graph.output.extend(kept)
    prune_graph(graph)
    return result


# onnxruntime says "The gradient builder has not been registered: Floor for node ..."
_OP_IN_ERROR = re.compile(r"has not been registered:\s*(\w+)")


def build_gradient_model(model, loss_name, wrt_names, rewrite=True):
    """Append the gradients of a scalar ``loss_name`` to ``model``.

    Parameters
    ----------
    model : onnx.ModelProto
        Graph whose output ``loss_name`` is a scalar; the names in
        ``wrt_names`` must be graph inputs.
    loss_name : str
    wrt_names : list of str
        Graph inputs to differentiate with respect to.
    rewrite : bool, default=True
        Apply :func:`rewrite_training_ops` to the result.

    Returns
    -------
    onnx.ModelProto
        Same inputs; outputs are the original ones followed by one
        ``<name>_grad`` per name of ``wrt_names`` (order not guaranteed:
        use :func:`gradient_name`).  A float64 loss is reported as float32.

    Raises
    ------
    ValueError
        When the graph contains an operator without a registered gradient.
    """
    check_available()
    model = _loss_as_float32(model, loss_name)
    builder_loss = _float32_loss_name(model, loss_name)
    options = session_options()
    try:
        builder = _C.GradientGraphBuilder(
            model.SerializeToString(), {builder_loss}, set(wrt_names), builder_loss, options
        )
        builder.build()
    except Exception as exc:  # RuntimeError / Fail from the C++ side
        raise ValueError(_explain_gradient_failure(model, exc)) from exc
    result = onnx.load_from_string(builder.get_model())
    result.ir_version = model.ir_version
    if builder_loss != loss_name:
        # Report the float64 loss itself: its float32 cast, which only seeds
        # the backward pass, overflows long before float64 does.
        loss_out = next(o for o in result.graph.output if o.name == builder_loss)
        loss_out.name = loss_name
        loss_out.type.tensor_type.elem_type = TensorProto.DOUBLE
    replace_fused_matmul(result)
    if rewrite:
        rewrite_training_ops(result)
        rewrite_bias_gradients(result, wrt_names)
        fold_cast_like(result)
    return result


def read_output_gradient(model, output_name, gradient):
    """Make a gradient model's backward pass start from ``gradient``.

    The builder names the gradient of every value ``<name>_grad``; the node
    that computes the gradient of ``output_name`` is replaced by an
    ``Identity`` of ``gradient``, a value the caller defines (the closed-form
    gradient of a loss, say).  Built on the scalar ``<output, gradient>``,
    a model then computes the vector-Jacobian product of ``gradient``
    without differentiating whatever produces it.  Nodes that only served
    the replaced computation remain until :func:`onnxfit.onnx_graphs.prune_graph`.

    Parameters
    ----------
    model : onnx.ModelProto
        Gradient model made by :func:`build_gradient_model`; modified in place.
    output_name : str
        A value of the forward graph.
    gradient : str
        Name of the value to use as its gradient.

    Returns
    -------
    onnx.ModelProto
    """
    target = gradient_name(output_name)
    nodes = [node for node in model.graph.node if target in node.output]
    if len(nodes) != 1 or len(nodes[0].output) != 1:  # pragma: no cover - builder's naming
        raise RuntimeError(
            f"Expected one single-output node computing {target!r} in the gradient "
            f"graph, found {[list(n.output) for n in nodes]}."
        )
    nodes[0].CopyFrom(helper.make_node(
        "Identity", [gradient], [target], name=f"onnxfit.seed.{output_name}"
    ))
    return model


def _float32_loss_name(model, loss_name):
    for out in model.graph.output:
        if out.name == loss_name + "_float32":
            return out.name
    return loss_name


_FLOAT32_LOSS_TEXT = """
loss_float32 ({T} loss) => (float loss32) {{
    loss32 = Cast<to = 1>(loss)
}}
"""


def _loss_as_float32(model, loss_name):
    """Append ``Cast(to=FLOAT)`` after a double loss (see module notes)."""
    out = next(o for o in model.graph.output if o.name == loss_name)
    if out.type.tensor_type.elem_type != TensorProto.DOUBLE:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    cast_name = loss_name + "_float32"
    append_piece(
        copy.graph, parse_piece(_FLOAT32_LOSS_TEXT, np.float64), "onnxfit.loss_float32.",
        {"loss": loss_name}, {"loss32": cast_name},
    )
    for o in copy.graph.output:
        if o.name == loss_name:
            o.name = cast_name
            o.type.tensor_type.elem_type = TensorProto.FLOAT
    return copy


def _explain_gradient_failure(model, exc):
    message = str(exc)
    known = {n.op_type for n in model.graph.node}
    culprit = [op for op in _OP_IN_ERROR.findall(message) if op in known]
    if culprit:
        return (
            f"onnxruntime-training cannot differentiate operator {culprit[0]!r}: "
            "it has no registered gradient. Train a graph whose trained output "
            f"does not depend on {culprit[0]!r} through the weights (choose "
            "another output_name or convert the model differently)."
        )
    return (
        "onnxruntime-training could not build the gradient graph; operators "
        f"in the graph: {sorted(known)}. Cause: {message.strip()[-400:]}"
    )


# -- Training-only operators rewritten into standard ONNX ----------------------
# Gradient graphs of 1.19.2 use com.microsoft kernels that plain onnxruntime
# lacks and some of which are slow (ReluGrad most of all).  Each rewrite is
# type-generic (CastLike), so one text serves float32 and float64 (1.19.2 has
# no float64 ReluGrad kernel at all).
_REWRITES = {
    # ReluGrad(dY, V): dY where V > 0, else 0.  The builder passes the ReLU's
    # output or, in some graphs (ReLU feeding MaxPool or Concat), its input:
    # V > 0 is the mask of both.
    "ReluGrad": """
relu_grad (float[] dY, float[] V) => (float[] dX) {{
    zero_f = Constant<value = float {{0}}>()
    zero = CastLike(zero_f, V)
    active = Greater(V, zero)
    mask = CastLike(active, V)
    dX = Mul(dY, mask)
}}
""",
    # SigmoidGrad(dY, Y) with Y = sigmoid(X): dY * Y * (1 - Y).
    "SigmoidGrad": """
sigmoid_grad (float[] dY, float[] Y) => (float[] dX) {{
    one_f = Constant<value = float {{1}}>()
    one = CastLike(one_f, Y)
    rest = Sub(one, Y)
    scaled = Mul(dY, Y)
    dX = Mul(scaled, rest)
}}
""",
    # TanhGrad(dY, Y) with Y = tanh(X): dY * (1 - Y^2).
    "TanhGrad": """
tanh_grad (float[] dY, float[] Y) => (float[] dX) {{
    one_f = Constant<value = float {{1}}>()
    one = CastLike(one_f, Y)
    y2 = Mul(Y, Y)
    slope = Sub(one, y2)
    dX = Mul(dY, slope)
}}
""",
}


def _scale_text(scale_down):
    # Scale(X, s): X * s, or X / s with scale_down=1; s may have another type.
    op = "Div" if scale_down else "Mul"
    return f"""
scale (float[] X, float[] s) => (float[] Y) {{{{
    factor = CastLike(s, X)
    Y = {op}(X, factor)
}}}}
"""


def rewrite_training_ops(model):
    """Replace training-only ``com.microsoft`` gradient kernels by standard ops.

    ReluGrad, SigmoidGrad, TanhGrad and Scale are rewritten; other
    training-only operators (ConvGrad, MaxPoolGrad, ...) are kept, so such
    graphs still need the training build at run time.

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place.

    Returns
    -------
    onnx.ModelProto
        ``model``.
    """
    graph = model.graph
    nodes = list(graph.node)
    new_nodes = []
    changed = False
    for k, node in enumerate(nodes):
        if node.domain != "com.microsoft" or node.op_type not in (*_REWRITES, "Scale"):
            new_nodes.append(node)
            continue
        if node.op_type == "Scale":
            scale_down = next((a.i for a in node.attribute if a.name == "scale_down"), 0)
            text = _scale_text(scale_down)
        else:
            text = _REWRITES[node.op_type]
        piece = parse_piece(text, np.float32)
        scratch = onnx.GraphProto()
        append_piece(
            scratch, piece, prefix=f"onnxfit.rewrite.{k}.",
            inputs={p.name: n for p, n in zip(piece.input, node.input)},
            outputs={p.name: n for p, n in zip(piece.output, node.output)},
        )
        new_nodes.extend(scratch.node)
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return model


def _fused_matmul_text(rank_a, rank_b, trans_a, trans_b, alpha):
    """Standard ops for ``FusedMatMul`` of known ranks, or None.

    In 1.19.2 the FusedMatMul kernel computes ``A^T b`` wrongly when ``b`` is
    1-D (a rank-1 weight after a MatMul, e.g. ``X @ w`` with ``w`` of shape
    (k,)): the gradient builder emits exactly that, and training silently
    goes astray.  For a vector ``b``, ``A^T b == b @ A``; for 2-D operands
    Gemm does the same as FusedMatMul (and has a float64 kernel).
    """
    scale = "" if alpha == 1.0 else "_unscaled"
    if rank_a == 2 and rank_b == 2:
        body = f"Y{scale} = Gemm<transA = {trans_a}, transB = {trans_b}>(A, B)"
    elif rank_a == 2 and rank_b == 1 and not trans_b:
        body = f"Y{scale} = MatMul(B, A)" if trans_a else f"Y{scale} = MatMul(A, B)"
    elif rank_a == 1 and rank_b == 2 and not trans_a:
        body = f"Y{scale} = MatMul(B, A)" if trans_b else f"Y{scale} = MatMul(A, B)"
    else:
        return None
    if scale:
        body += f"""
    alpha_f = Constant<value = float {{{{{alpha!r}}}}}>()
    alpha = CastLike(alpha_f, Y_unscaled)
    Y = Mul(Y_unscaled, alpha)"""
    return f"""
fused_matmul (float[] A, float[] B) => (float[] Y) {{{{
    {body}
}}}}
"""


def replace_fused_matmul(model):
    """Replace the builder's ``FusedMatMul`` nodes by standard ops.

    Done for every gradient graph onnxfit builds, whatever ``rewrite``
    says, since it fixes wrong gradients (see :func:`_fused_matmul_text`).
    Nodes whose operand ranks shape inference cannot tell, or that batch
    transposes, are kept.

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place.

    Returns
    -------
    onnx.ModelProto
    """
    graph = model.graph
    if not any(n.op_type == "FusedMatMul" for n in graph.node):
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    for init in graph.initializer:
        ranks[init.name] = len(init.dims)
    new_nodes = []
    for k, node in enumerate(graph.node):
        text = None
        if node.op_type == "FusedMatMul" and node.domain == "com.microsoft":
            attrs = {a.name: a for a in node.attribute}
            batch = any(attrs[n].i for n in ("transBatchA", "transBatchB") if n in attrs)
            if not batch:
                text = _fused_matmul_text(
                    ranks.get(node.input[0]), ranks.get(node.input[1]),
                    attrs["transA"].i if "transA" in attrs else 0,
                    attrs["transB"].i if "transB" in attrs else 0,
                    attrs["alpha"].f if "alpha" in attrs else 1.0,
                )
        if text is None:
            new_nodes.append(node)
            continue
        scratch = onnx.GraphProto()
        append_piece(
            scratch, parse_piece(text, np.float32), prefix=f"onnxfit.matmul.{k}.",
            inputs={"A": node.input[0], "B": node.input[1]}, outputs={"Y": node.output[0]},
        )
        new_nodes.extend(scratch.node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model


_BIAS_GRADIENT_TEXT = """
bias_grad (float[] dZ) => (float[] grad) {{
    n = Shape<start = 0, end = 1>(dZ)
    ones_f = ConstantOfShape<value = float[1] {{1}}>(n)
    ones = CastLike(ones_f, dZ)
    grad = MatMul(ones, dZ)
}}
"""


def rewrite_bias_gradients(model, wrt_names):
    """Compute bias gradients as ``ones @ dZ`` instead of ``ReduceSum``.

    The builder sums the gradient of a broadcast bias over the batch with
    ``ReduceSum(axes=[0])``; for a rank-1 bias (so a rank-2 ``dZ``) a
    matrix-vector product gives the same sum (up to float rounding) with a
    faster, vectorised kernel (-11% per step on a 100-128-64-1 MLP).
    Narrow biases keep their ReduceSum.

    Parameters
    ----------
    model : onnx.ModelProto
        Gradient model; modified in place.
    wrt_names : list of str
        The differentiated graph inputs.

    Returns
    -------
    onnx.ModelProto
    """
    from onnx import numpy_helper

    graph = model.graph
    # Only biases of 16 values or more: for a narrower dZ, ReduceSum is one
    # cheap kernel where the rewrite dispatches four (-1 us a step on W1).
    rank1 = {
        gradient_name(i.name) for i in graph.input
        if i.name in set(wrt_names) and len(i.type.tensor_type.shape.dim) == 1
        and i.type.tensor_type.shape.dim[0].dim_value >= 16
    }
    axes = {
        i.name: numpy_helper.to_array(i) for i in graph.initializer
        if i.data_type == TensorProto.INT64 and len(i.dims) == 1 and i.dims[0] <= 8
    }
    new_nodes = []
    for k, node in enumerate(graph.node):
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if (
            node.op_type == "ReduceSum" and node.domain == "" and node.output[0] in rank1
            and keepdims == 0 and len(node.input) == 2 and node.input[1] in axes
            and axes[node.input[1]].tolist() == [0]
        ):
            scratch = onnx.GraphProto()
            append_piece(
                scratch, parse_piece(_BIAS_GRADIENT_TEXT, np.float32),
                prefix=f"onnxfit.bias_grad.{k}.",
                inputs={"dZ": node.input[0]}, outputs={"grad": node.output[0]},
            )
            new_nodes.extend(scratch.node)
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model
