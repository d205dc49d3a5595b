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


def build_gradient_model(model, loss_name, wrt_names):
    """Append the gradients of a scalar ``loss_name`` to ``model``.

    Parameters
    ----------
    model : onnx.ModelProto
        Graph whose output ``loss_name`` is a scalar; the names in
        ``wrt_names`` must be graph inputs.
    loss_name : str
    wrt_names : list of str
        Graph inputs to differentiate with respect to.

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
    return result


def _float32_loss_name(model, loss_name):
    for out in model.graph.output:
        if out.name == loss_name + "_float32":
            return out.name
    return loss_name


def _loss_as_float32(model, loss_name):
    """Append ``Cast(to=FLOAT)`` after a double loss (see module notes)."""
    out = next(o for o in model.graph.output if o.name == loss_name)
    if out.type.tensor_type.elem_type != TensorProto.DOUBLE:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    cast_name = loss_name + "_float32"
    copy.graph.node.append(
        helper.make_node("Cast", [loss_name], [cast_name], to=TensorProto.FLOAT)
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
