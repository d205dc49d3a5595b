"""Gradient building: the only module that knows onnxruntime-training.

Everything that touches onnxruntime-training's private API
(``onnxruntime.capi._pybind_state``) lives here, so that another gradient
backend can be added by writing one more module with the same functions.
``import onnxruntime.training`` is never executed: it imports torch.

Facts this module relies on (onnxruntime-training-cpu 1.19.2, see
``shared/notes/ort_training.md``):

* ``GradientGraphBuilder(model_bytes, {loss}, set(weights), loss,
  session_options)`` builds forward + loss + gradients in one graph whose
  outputs are named ``<weight>_grad``, in an order that varies between runs
  (always look them up by name);
* the builder seeds the loss gradient as float32, so a float64 loss must end
  with ``Cast(to=FLOAT)``, and float64 sessions must disable
  ``MatmulTransposeFusion`` (the CPU FusedMatMul kernel is float32 only).
"""

import re

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper

from .onnx_graphs import append_piece, fold_cast_like, parse_piece

try:  # the training build exposes these; the plain package does not
    from onnxruntime.capi import _pybind_state as _C
except ImportError:  # pragma: no cover - broken install
    _C = None

#: Optimizers that must be off for float64 graphs (FusedMatMul is float32 only).
_FLOAT64_DISABLED_OPTIMIZERS = ["MatmulTransposeFusion"]


class TrainingRuntimeError(ImportError):
    """onnxruntime is installed without its training build."""


def check_training_runtime():
    """Raise :class:`TrainingRuntimeError` unless onnxruntime-training is usable.

    onnxruntime, onnxruntime-training and onnxruntime-training-cpu all own
    the same ``onnxruntime/`` folder: when the plain package was installed
    after the training one, the gradient builder silently disappears.
    """
    if _C is None or not hasattr(_C, "GradientGraphBuilder"):
        raise TrainingRuntimeError(
            "onnxfit needs onnxruntime-training-cpu==1.19.2, but the installed "
            f"onnxruntime {onnxruntime.__version__} has no gradient builder: the "
            "plain 'onnxruntime' package probably overwrote it (both install the "
            "same 'onnxruntime' folder). Repair with: pip uninstall -y onnxruntime "
            "onnxruntime-training-cpu && pip install onnxruntime-training-cpu==1.19.2"
        )


def session_options(n_threads=1, log_severity_level=3):
    """SessionOptions used for every onnxfit session."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = log_severity_level
    options.intra_op_num_threads = int(n_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return options


def make_session(model, n_threads=1, dtype=np.float32):
    """An ``InferenceSession`` on ``model`` (ModelProto or bytes) on CPU."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    kwargs = {}
    if np.dtype(dtype) == np.float64:
        kwargs["disabled_optimizers"] = _FLOAT64_DISABLED_OPTIMIZERS
    return onnxruntime.InferenceSession(
        model, session_options(n_threads), providers=["CPUExecutionProvider"], **kwargs
    )


def gradient_name(weight_name):
    """Name of the gradient output the builder gives ``weight_name``."""
    return weight_name + "_grad"


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
    check_training_runtime()
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
# lacks and some of which are slow (ReluGrad took 243 of 447 us per step of a
# 100-128-64-1 MLP; the rewrite below does the same in 39 us).  Each rewrite
# gives bit-identical results and is type-generic (CastLike), so one text
# serves float32 and float64 (1.19.2 has no float64 ReluGrad kernel at all).
_REWRITES = {
    # ReluGrad(dY, Y) with Y = relu(X) >= 0: dY where the ReLU was active,
    # else 0.  The 0/1 mask is min(Y * 2^127, 1): two vectorised kernels,
    # where Greater + Cast (bool -> float, not vectorised) cost twice as
    # much.  Exact for every Y >= 2^-127, i.e. all but the smallest
    # subnormal activations; for those the mask is Y * 2^127 < 1.
    "ReluGrad": """
relu_grad (float[] dY, float[] Y) => (float[] dX) {{
    big_f = Constant<value = float {{1.7014118346046923e38}}>()
    one_f = Constant<value = float {{1}}>()
    big = CastLike(big_f, Y)
    one = CastLike(one_f, Y)
    scaled = Mul(Y, big)
    mask = Min(scaled, one)
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

    ReluGrad, SigmoidGrad, TanhGrad and Scale are rewritten (bit-identical
    results); other training-only operators (YieldOp, ConvGrad, ...) are
    kept, so such graphs still need the training build at run time.

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


# -- Forward and backward as two calls: OrtModuleGraphBuilder + TrainingAgent --
# Facts this section relies on (onnxruntime-training-cpu 1.19.2, checked by
# tests/test_function.py):
#
# * ``OrtModuleGraphBuilder`` turns the listed weights into graph inputs placed
#   after the user inputs, in the order given (weights that already are graph
#   inputs work the same); the gradient graph returns the input gradients,
#   then the weight gradients in that order, and holds a ``YieldOp`` between
#   forward and backward;
# * ``TrainingAgent`` splits that graph at the YieldOp: ``run_forward`` gives
#   the model outputs, ``run_backward`` takes dL/d(outputs) and gives the
#   gradients; each forward/backward pair needs its own
#   ``PartialGraphExecutionState``;
# * the session needs ``enable_mem_pattern=False``: otherwise the buffers of
#   the forward outputs are overwritten by the backward or by later steps;
# * an OrtValue made from a numpy array shares its memory but holds no
#   reference to it: callers keep the arrays alive until the backward ran;
# * the agent checks neither dtypes nor shapes (a dY of shape (n,) for an
#   output of shape (n, 1) is accepted): callers validate;
# * an ``OrtValueVector`` is read by index (0.4 us); iterating it costs 20 us.


class ModuleGradientGraph:
    """A model's forward and backward pass as one graph split at a YieldOp.

    Made by :func:`build_module_gradient`; run by
    :class:`TrainingAgentRunner`.

    Attributes
    ----------
    model : onnx.ModelProto
        The gradient graph.
    input_names : list of str
        The model's own inputs.
    output_names : list of str
        The model's outputs, as ``run_forward`` returns them.
    weight_names : list of str
        Differentiated weights, graph inputs after ``input_names``.
    forward_input_names : list of str
        What ``run_forward`` reads: ``input_names + weight_names``.
    output_gradient_names : list of str
        dL/d(output) per output, what ``run_backward`` reads.
    backward_output_names : list of str
        What ``run_backward`` returns, in order: the input gradients, then
        ``weight_gradient_names``.
    weight_gradient_names : list of str
        One per weight, in the order of ``weight_names``.
    input_gradient_names : dict of str -> str
        Input name -> name of its gradient, for the inputs differentiated.
    dtype : numpy dtype
        Element type of the weights (of the first one).
    """

    def __init__(self, model, graph_info):
        self.model = model
        self.input_names = list(graph_info.user_input_names)
        self.output_names = list(graph_info.user_output_names)
        self.weight_names = list(graph_info.initializer_names_to_train)
        self.forward_input_names = [i.name for i in model.graph.input]
        self.output_gradient_names = list(graph_info.module_output_gradient_name)
        self.backward_output_names = [o.name for o in model.graph.output]
        self.weight_gradient_names = list(graph_info.initializer_grad_names_to_train)
        self.input_gradient_names = dict(graph_info.user_input_grad_names)
        expected = self.input_names + list(graph_info.initializer_names)
        if self.forward_input_names != expected:  # pragma: no cover - builder change
            raise RuntimeError(
                "Unexpected input order in the gradient graph of onnxruntime-training: "
                f"{self.forward_input_names} instead of {expected}."
            )
        weights = [v for v in model.graph.input if v.name in set(self.weight_names)]
        elem = weights[0].type.tensor_type.elem_type if weights else TensorProto.FLOAT
        self.dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def build_module_gradient(model, weight_names, input_names_with_gradient=(), rewrite=True):
    """Build forward and backward of ``model`` as two callable halves.

    Parameters
    ----------
    model : onnx.ModelProto
        Graph computing the outputs from its inputs and the weights; each
        weight is an initializer or a graph input with a static shape.
    weight_names : list of str
        Weights to differentiate with respect to, in the order the forward
        call takes them and the backward call returns their gradients.
    input_names_with_gradient : sequence of str, default=()
        Graph inputs whose gradient the backward call returns as well.
    rewrite : bool, default=True
        Apply :func:`rewrite_training_ops` (and the bias-gradient rewrite)
        to the gradient graph.

    Returns
    -------
    ModuleGradientGraph

    Raises
    ------
    ValueError
        When an operator on the path from the weights to the outputs has no
        registered gradient.
    """
    check_training_runtime()
    config = _C.OrtModuleGraphBuilderConfiguration()
    config.initializer_names = list(weight_names)
    config.initializer_names_to_train = list(weight_names)
    config.input_names_require_grad = list(input_names_with_gradient)
    config.build_gradient_graph = True
    builder = _C.OrtModuleGraphBuilder()
    try:
        builder.initialize(model.SerializeToString(), config)
        builder.build(_C.TrainingGraphTransformerConfiguration())
    except Exception as exc:  # RuntimeError / Fail from the C++ side
        raise ValueError(_explain_gradient_failure(model, exc)) from exc
    gradient_model = onnx.load_from_string(builder.get_gradient_model())
    gradient_model.ir_version = min(model.ir_version, gradient_model.ir_version)
    replace_fused_matmul(gradient_model)
    if rewrite:
        rewrite_training_ops(gradient_model)
        rewrite_bias_gradients(gradient_model, weight_names)
        fold_cast_like(gradient_model)
    return ModuleGradientGraph(gradient_model, builder.get_graph_info())


def _cpu_device():
    return _C.OrtDevice(_C.OrtDevice.cpu(), _C.OrtDevice.default_memory(), 0)


class TrainingAgentRunner:
    """Session and ``TrainingAgent`` running a :class:`ModuleGradientGraph`.

    Parameters
    ----------
    gradient_graph : ModuleGradientGraph
    n_threads : int, default=1
        onnxruntime intra-op threads.

    Notes
    -----
    The runner holds no per-call state: several forward/backward pairs may
    be in flight, each with its own state from :meth:`new_state`, and one
    runner may serve several engines or functions.  The values given to
    :meth:`run_forward` are read again by :meth:`run_backward`: keep them
    (and the arrays behind them) alive and unchanged in between.
    """

    def __init__(self, gradient_graph, n_threads=1):
        check_training_runtime()
        self.graph = gradient_graph
        self.n_threads = int(n_threads)
        options = session_options(n_threads)
        # Required: with memory patterns the forward outputs' buffers are
        # reused by the backward (see the notes above this section).
        options.enable_mem_pattern = False
        kwargs = {}
        if gradient_graph.dtype == np.float64:
            kwargs["disabled_optimizers"] = _FLOAT64_DISABLED_OPTIMIZERS
        self.session = onnxruntime.InferenceSession(
            gradient_graph.model.SerializeToString(), options,
            providers=["CPUExecutionProvider"], **kwargs,
        )
        device = _cpu_device()
        self._agent = _C.TrainingAgent(
            self.session._sess,
            gradient_graph.forward_input_names,
            [device] * len(gradient_graph.output_names),
            gradient_graph.backward_output_names,
            [device] * len(gradient_graph.backward_output_names),
            0,
        )
        self._run_forward = self._agent.run_forward
        self._run_backward = self._agent.run_backward

    @staticmethod
    def new_state():
        """A fresh execution state, for one forward/backward pair."""
        return _C.PartialGraphExecutionState()

    def run_forward(self, inputs, outputs, state):
        """Run the forward half.

        Parameters
        ----------
        inputs : OrtValueVector
            One value per name of ``graph.forward_input_names``.
        outputs : OrtValueVector
            Empty (onnxruntime allocates the outputs) or holding one
            preallocated value of the exact output shape per output, which
            onnxruntime then writes into.
        state : PartialGraphExecutionState
            From :meth:`new_state`; pass it to :meth:`run_backward`.
        """
        self._run_forward(inputs, outputs, state, None)

    def run_backward(self, output_gradients, outputs, state):
        """Run the backward half of the forward run with ``state``.

        Parameters
        ----------
        output_gradients : OrtValueVector
            dL/d(output) per output, same shapes and types as the outputs.
        outputs : OrtValueVector
            Empty or preallocated (see :meth:`run_forward`), one value per
            name of ``graph.backward_output_names``.
        state : PartialGraphExecutionState
        """
        self._run_backward(output_gradients, outputs, state)


_ORT_TENSOR_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64)}


def new_ortvalue_vector():
    """An empty ``OrtValueVector``."""
    return _C.OrtValueVector()


def ortvalue_vector(values):
    """An ``OrtValueVector`` of ``values`` (see :func:`as_ortvalue`).

    Numpy arrays are shared, not copied, and not referenced: keep them alive
    as long as the vector is used.
    """
    vector = _C.OrtValueVector()
    vector.reserve(len(values))
    for value in values:
        vector.push_back(as_ortvalue(value))
    return vector


def as_ortvalue(value):
    """The low-level OrtValue of ``value``.

    Parameters
    ----------
    value : ndarray, onnxruntime.OrtValue or low-level OrtValue
        A C-contiguous array is shared, not copied, and not referenced by
        the result: keep it alive as long as the result is used.
    """
    if isinstance(value, _C.OrtValue):
        return value
    if isinstance(value, onnxruntime.OrtValue):
        return value._ortvalue
    if not (isinstance(value, np.ndarray) and value.flags.c_contiguous):
        raise TypeError(
            f"Expected a C-contiguous numpy array or an OrtValue, got {type(value).__name__}."
        )
    return _C.OrtValue.ortvalue_from_numpy(value, _cpu_device())


def is_ortvalue(value):
    """Whether ``value`` is an OrtValue (public wrapper or low-level)."""
    return isinstance(value, (onnxruntime.OrtValue, _C.OrtValue))


def public_ortvalue(value):
    """Wrap a low-level OrtValue as an ``onnxruntime.OrtValue``."""
    return onnxruntime.OrtValue(value)


def ortvalue_dtype(value):
    """Numpy dtype of a float or double tensor OrtValue, else None."""
    return _ORT_TENSOR_TYPES.get(value.data_type())
