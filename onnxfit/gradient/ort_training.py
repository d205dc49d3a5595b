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
  SIGFPE: graphs with AveragePool on the gradient path are refused;
* BatchNormalization, ReduceSumSquare and NegativeLogLikelihoodLoss have no
  registered gradient, the gradients of SoftmaxCrossEntropyLoss and Dropout
  fail unless their second output is named, and DropoutGrad scales by
  ``1 / (1 - ratio)`` even for an inference-mode Dropout: the graph is
  rewritten first (:func:`prepare_for_builder`), BatchNormalization with
  the statistics the node itself uses (its running ones in inference mode);
* LSTM, GRU and RNN have no gradient: refused by name (the own backend
  unrolls them).
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
    prepare_for_builder(surrogate, inferred)
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
    # Seeded values that are not outputs (a penalty the fused engine adds
    # to the loss afterwards) must survive the pruning, as with the own
    # backend: kept as outputs while pruning, then dropped.
    kept_names = {o.name for o in kept}
    hidden = [helper.make_tensor_value_info(value, types.get(value, TensorProto.FLOAT), None)
              for value in seeds if value not in kept_names]
    del graph.output[:]
    graph.output.extend(kept + hidden)
    prune_graph(graph)
    del graph.output[:]
    graph.output.extend(kept)
    return result


# -- Operators rewritten before the builder sees them -------------------------
_PREPARED_OPS = {"SoftmaxCrossEntropyLoss", "Dropout", "NegativeLogLikelihoodLoss",
                 "ReduceSumSquare"}


def prepare_for_builder(model, inferred=None):
    """Rewrite what 1.19.2's builder cannot differentiate (or differentiates
    wrongly) into equivalent operators it handles, in place.

    * ``BatchNormalization``: see :func:`decompose_batch_normalization`;
    * ``ReduceSumSquare`` (onnxfit's L2 penalty among others) has no
      registered gradient: ``ReduceSum(Mul(x, x))``;
    * ``NegativeLogLikelihoodLoss`` has none either: see :func:`_nll_nodes`;
    * ``Dropout`` in inference form (no ``training_mode``, or a constant
      False) becomes ``Identity``: 1.19.2's DropoutGrad scales the gradient
      by ``1 / (1 - ratio)`` even then;
    * ``SoftmaxCrossEntropyLoss`` without its ``log_prob`` output, and a
      training-mode ``Dropout`` without its ``mask`` output: their gradient
      builders read that output and fail with an index error, so the output
      is named.

    Returns
    -------
    onnx.ModelProto
        ``model``.
    """
    decompose_batch_normalization(model, inferred)
    graph = model.graph
    opset = _opset(model)
    types = value_types(inferred if inferred is not None else model)
    taken = existing_names(graph)
    new_nodes, changed = [], False
    for k, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _PREPARED_OPS:
            new_nodes.append(node)
            continue
        prefix = f"onnxfit.ort_training.{node.op_type}{k}."
        while any(value.startswith(prefix) for value in taken):
            prefix = "_" + prefix
        if node.op_type == "SoftmaxCrossEntropyLoss" and len(node.output) == 1:
            node.output.append(prefix + "log_prob")
            changed = True
        if node.op_type == "Dropout" and not _dropout_training(graph, node):
            # Inference form: the identity.  1.19.2's DropoutGrad scales by
            # 1 / (1 - ratio) whatever the mode, so the node goes.
            new_nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                              name=node.name or prefix + "Identity"))
            if len(node.output) > 1 and node.output[1]:  # the mask: all true
                new_nodes.append(helper.make_node("Shape", [node.input[0]], [prefix + "shape"],
                                                  name=prefix + "Shape"))
                new_nodes.append(helper.make_node(
                    "ConstantOfShape", [prefix + "shape"], [node.output[1]],
                    name=prefix + "ConstantOfShape",
                    value=onnx.numpy_helper.from_array(np.array([True]))))
            changed = True
            continue
        if node.op_type == "Dropout" and len(node.output) == 1:
            node.output.append(prefix + "mask")
            changed = True
        if node.op_type == "NegativeLogLikelihoodLoss" and opset >= 13:
            new_nodes.extend(_nll_nodes(graph, node, prefix, types))
            changed = True
            continue
        if node.op_type != "ReduceSumSquare":
            new_nodes.append(node)
            continue
        square = prefix + "square"
        new_nodes.append(helper.make_node("Mul", [node.input[0], node.input[0]], [square],
                                          name=prefix + "Mul"))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = [square] + list(node.input[1:])
        if "axes" in attrs and opset >= 13:  # ReduceSum reads its axes from an input since 13
            axes_name = prefix + "axes"
            graph.initializer.append(onnx.numpy_helper.from_array(
                np.array(attrs.pop("axes"), dtype=np.int64), axes_name))
            inputs = [square, axes_name]
        new_nodes.append(helper.make_node("ReduceSum", inputs, list(node.output),
                                          name=node.name or prefix + "ReduceSum", **attrs))
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return model


def _nll_nodes(graph, node, prefix, types):
    """``NegativeLogLikelihoodLoss`` (no gradient in 1.19.2) in standard ops:
    ``-input[n, target[n, ...], ...] * weight[target]``, 0 where the target
    is ``ignore_index``, then the reduction (``mean`` divides by the summed
    weights of the counted targets, as ONNX defines it).  Initializers
    it needs are added to ``graph``; returns the nodes."""
    log_prob, target = node.input[0], node.input[1]
    weight = node.input[2] if len(node.input) > 2 and node.input[2] else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    reduction = attrs.get("reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    elem = types.get(log_prob, TensorProto.FLOAT)
    nodes = []

    def add(op, inputs, suffix, **kwargs):
        out = prefix + suffix
        nodes.append(helper.make_node(op, inputs, [out], name=out, **kwargs))
        return out

    axis1 = prefix + "axis1"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), axis1))
    keep = None
    if "ignore_index" in attrs:
        ignore = prefix + "ignore_index"
        graph.initializer.append(onnx.numpy_helper.from_array(
            np.array(attrs["ignore_index"], np.int64), ignore))
        zero = prefix + "zero_index"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), zero))
        ignore = add("CastLike", [ignore, target], "ignore_like")
        zero = add("CastLike", [zero, target], "zero_like")
        ignored = add("Equal", [target, ignore], "ignored")
        keep = add("Not", [ignored], "keep")
        target = add("Where", [keep, target, zero], "safe_target")
    index = add("Unsqueeze", [target, axis1], "index")
    picked = add("GatherElements", [log_prob, index], "picked", axis=1)
    picked = add("Squeeze", [picked, axis1], "picked_squeezed")
    loss = add("Neg", [picked], "negated")
    factor = None
    if weight is not None:
        factor = add("Gather", [weight, target], "sample_weight", axis=0)
    if keep is not None:
        kept = add("Cast", [keep], "keep_float", to=elem)
        factor = kept if factor is None else add("Mul", [factor, kept], "kept_weight")
    if factor is not None:
        loss = add("Mul", [loss, factor], "weighted")
    out = node.output[0]
    if reduction == "none":
        nodes.append(helper.make_node("Identity", [loss], [out], name=prefix + "none"))
    elif reduction == "sum":
        nodes.append(helper.make_node("ReduceSum", [loss], [out], name=prefix + "sum",
                                      keepdims=0))
    elif factor is None:
        nodes.append(helper.make_node("ReduceMean", [loss], [out], name=prefix + "mean",
                                      keepdims=0))
    else:
        total = add("ReduceSum", [loss], "total", keepdims=0)
        count = add("ReduceSum", [factor], "count", keepdims=0)
        nodes.append(helper.make_node("Div", [total, count], [out], name=prefix + "mean"))
    return nodes


def _constant(graph, name):
    """Value of ``name`` when an initializer or a Constant node holds it."""
    for init in graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return None if attr is None else onnx.numpy_helper.to_array(attr.t)
    return None


def _dropout_training(graph, node):
    """False for a Dropout in inference form (no ``training_mode`` or a
    constant False); True when it drops or may drop values."""
    if len(node.input) < 3 or not node.input[2]:
        return False
    value = _constant(graph, node.input[2])
    return value is None or bool(np.asarray(value).reshape(-1)[0])


# -- BatchNormalization --------------------------------------------------------
# 1.19.2's GradientGraphBuilder has no gradient for BatchNormalization (its
# training pipeline first replaces the node by BatchNormInternal, which
# normalises with the *batch* statistics whatever ``training_mode`` says).
# onnxfit writes the node out in standard operators that the builder
# differentiates, with the statistics the node itself uses: the running mean
# and variance in inference mode, the batch's in training mode.


def _opset(model):
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _attr(node, name, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _node_label(node):
    return repr(node.name or node.output[0])


def decompose_batch_normalization(model, inferred=None):
    """Rewrite every ``BatchNormalization`` node of ``model`` into standard ops.

    Inference mode (``training_mode=0``, what PyTorch exports by default):
    ``Y = (X - mean) * (scale / sqrt(var + epsilon)) + bias`` with the
    running ``mean`` and ``var`` inputs, per channel.  Training mode:
    the same with the batch's mean and biased variance over every axis but
    the channel's (the ONNX definition); such a node's running-statistic
    outputs must not be read by anything (onnxfit's ``train_mode=True``
    rewrites BatchNormalization itself and never leaves such nodes).

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place.
    inferred : onnx.ModelProto, optional
        ``model`` after shape inference (the rank of each node's input).

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    GradientError
        For a node whose input rank shape inference cannot tell, or a
        training-mode node whose running statistics are read.
    """
    from .own import GradientError

    graph = model.graph
    if not any(n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
               for n in graph.node):
        return model
    if inferred is None:
        inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    for init in graph.initializer:
        ranks[init.name] = len(init.dims)
    types = value_types(inferred)
    opset = _opset(model)
    readers = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    taken = existing_names(graph)
    new_nodes = []
    for k, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        x, scale, bias, mean, var = node.input[:5]
        y = node.output[0]
        training = bool(_attr(node, "training_mode", 0))
        label = _node_label(node)
        rank = ranks.get(x)
        if rank is None or rank < 2:
            raise GradientError(
                f"onnxruntime-training 1.19.2 has no gradient for BatchNormalization, and "
                f"onnxfit cannot write node {label} out in standard operators: the rank of "
                f"its input {x!r} is unknown. Use gradient_backend='onnxfit'."
            )
        used_statistics = [o for o in node.output[1:] if o and o in readers]
        if training and used_statistics:
            raise GradientError(
                f"onnxruntime-training 1.19.2 cannot differentiate BatchNormalization node "
                f"{label} in training mode whose running statistics {used_statistics} are "
                "read by the graph. Use gradient_backend='onnxfit', or train_mode=True "
                "(onnxfit then keeps the running statistics itself)."
            )
        elem = types.get(x, TensorProto.FLOAT)
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        prefix = f"onnxfit.ort_training.bn{k}."
        while any(value.startswith(prefix) for value in taken):
            prefix = "_" + prefix

        def name(suffix, prefix=prefix):
            return prefix + suffix

        nodes, inits = [], []
        eps = np.array(_attr(node, "epsilon", 1e-5), dtype=dtype)
        inits.append(onnx.numpy_helper.from_array(eps, name("epsilon")))
        inits.append(onnx.numpy_helper.from_array(
            np.array([-1] + [1] * (rank - 2), dtype=np.int64), name("column_shape")))
        axes = [0] + list(range(2, rank))

        def column(value, what):
            # A per-channel vector shaped (C, 1, ..., 1) against (N, C, ...).
            if rank == 2:
                return value
            nodes.append(helper.make_node("Reshape", [value, name("column_shape")],
                                          [name(what + "_column")]))
            return name(what + "_column")

        def reduce_mean(value, out):
            if opset >= 18:
                if not any(i.name == name("axes") for i in inits):
                    inits.append(onnx.numpy_helper.from_array(
                        np.array(axes, dtype=np.int64), name("axes")))
                nodes.append(helper.make_node("ReduceMean", [value, name("axes")], [out],
                                              keepdims=1))
            else:
                nodes.append(helper.make_node("ReduceMean", [value], [out], axes=axes,
                                              keepdims=1))
            return out

        if training:
            # Batch statistics, keepdims: already (1, C, 1, ...).
            mean_col = reduce_mean(x, name("batch_mean"))
            nodes.append(helper.make_node("Sub", [x, mean_col], [name("centred")]))
            nodes.append(helper.make_node("Mul", [name("centred"), name("centred")],
                                          [name("squared")]))
            var_col = reduce_mean(name("squared"), name("batch_var"))
            nodes.append(helper.make_node("Add", [var_col, name("epsilon")],
                                          [name("var_eps")]))
            nodes.append(helper.make_node("Sqrt", [name("var_eps")], [name("std")]))
            nodes.append(helper.make_node("Div", [name("centred"), name("std")],
                                          [name("normalised")]))
            nodes.append(helper.make_node("Mul", [name("normalised"), column(scale, "scale")],
                                          [name("scaled")]))
        else:
            nodes.append(helper.make_node("Add", [var, name("epsilon")], [name("var_eps")]))
            nodes.append(helper.make_node("Sqrt", [name("var_eps")], [name("std")]))
            nodes.append(helper.make_node("Div", [scale, name("std")], [name("factor")]))
            nodes.append(helper.make_node("Sub", [x, column(mean, "mean")], [name("centred")]))
            nodes.append(helper.make_node("Mul", [name("centred"), column(name("factor"),
                                                                          "factor")],
                                          [name("scaled")]))
        nodes.append(helper.make_node("Add", [name("scaled"), column(bias, "bias")], [y]))
        for j, new in enumerate(nodes):
            new.name = f"{prefix}{j}.{new.op_type}"
        new_nodes.extend(nodes)
        graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model


# onnxruntime says "The gradient builder has not been registered: Floor for node ..."
_OP_IN_ERROR = re.compile(r"has not been registered:\s*(\w+)(?:\s+for node\s+(\S+))?")


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
    found = [(op, node) for op, node in _OP_IN_ERROR.findall(message) if op in known]
    if found:
        op, node = found[0]
        where = f" (node {node!r})" if node else ""
        return (
            f"onnxruntime-training 1.19.2 cannot differentiate operator {op!r}{where}: it "
            "has no registered gradient. Use gradient_backend='onnxfit' (onnxfit's own "
            f"gradients, see onnxfit.gradient.differentiable_ops()), or train a graph whose "
            f"trained output does not depend on {op!r} through the weights (choose another "
            "output_name or weights_to_train, or convert the model differently)."
        )
    return (
        "onnxruntime-training 1.19.2 could not build the gradient graph; operators "
        f"in the graph: {sorted(known)}. Try gradient_backend='onnxfit'. "
        f"Cause: {message.strip()[-400:]}"
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
