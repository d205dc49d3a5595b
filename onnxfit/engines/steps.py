"""The pieces both engines assemble around a model into a training step.

Each piece of math is written once elsewhere (the loss in
:mod:`onnxfit.losses`, the penalty in :mod:`onnxfit.penalties`, the update
rule in :mod:`onnxfit.learning_rate`); the functions here append it to a
graph with the engines' reserved names (:mod:`onnxfit.engines.problem`).
The fused engine appends every piece to one graph, the forward-backward
engine gives each piece a small graph of its own: the same functions serve
both, so both compute the same numbers.
"""

import numpy as np
from onnx import helper, numpy_helper

from ..losses import loss_gradient_model
from ..onnx_graphs import (
    OPSET,
    append_piece,
    append_sum,
    existing_names,
    onnx_elem_type,
    parse_piece,
    scalar_input,
)
from .problem import (
    FLAT_GRADIENT,
    FLAT_WEIGHTS,
    LABEL,
    LEARNING_RATE,
    PENALTY,
    SAMPLE_WEIGHT,
    flat_state_name,
    updated_name,
)

# torch.nn.utils.clip_grad_norm_'s rule: scale the whole gradient by
# min(1, max_norm / (norm + 1e-6)); the 1e-6 keeps a zero gradient finite.
_CLIP_TEXT = """
clip_by_global_norm ({T}[] gradient) => ({T}[] clipped) {{
    max_norm = Constant<value = {T} {{{max_norm}}}>()
    tiny = Constant<value = {T} {{1e-6}}>()
    one = Constant<value = {T} {{1.0}}>()
    norm = ReduceL2<keepdims = 0>(gradient)
    padded = Add(norm, tiny)
    ratio = Div(max_norm, padded)
    factor = Min(ratio, one)
    clipped = Mul(gradient, factor)
}}
"""

_FLATTEN_TEXT = """
flatten ({T}[] value) => ({T}[] flat) {{
    shape = Constant<value = int64[1] {{-1}}>()
    flat = Reshape(value, shape)
}}
"""


def declare_input(graph, name, dtype, shape):
    """Add the graph input ``name`` unless ``graph`` defines that value."""
    if name not in existing_names(graph):
        graph.input.append(helper.make_tensor_value_info(name, onnx_elem_type(dtype), shape))


def append_loss(graph, problem, prediction, data_loss, prediction_grad, opset=OPSET):
    """Append the loss and its gradient with respect to ``prediction``.

    Parameters
    ----------
    graph : onnx.GraphProto
        Modified in place; ``LABEL`` and ``SAMPLE_WEIGHT`` become inputs
        when ``graph`` does not define them.
    problem : TrainingProblem
    prediction : str
        Name of the model's trained output in ``graph``.
    data_loss, prediction_grad : str
        Names given to the scalar loss and to its gradient.
    opset : int, default=OPSET
        Opset of ``graph``'s default domain.

    Returns
    -------
    onnx.ModelProto
        The loss model whose nodes were appended: the caller's model must
        import its opsets too (the onnxruntime-training backend may use
        ``com.microsoft`` operators in an automatic derivative), see
        :func:`onnxfit.onnx_graphs.merge_opset_imports`.
    """
    model = loss_gradient_model(problem.loss, problem.dtype, problem.label_shape, opset=opset,
                                backend=problem.gradient_backend)
    append_piece(
        graph,
        model.graph,
        prefix="onnxfit.loss.",
        inputs={"prediction": prediction, "label": LABEL, "sample_weight": SAMPLE_WEIGHT},
        outputs={"loss": data_loss, "prediction_grad": prediction_grad},
    )
    return model


def append_penalty(graph, problem, weights=FLAT_WEIGHTS, penalty=PENALTY):
    """Append the penalty of every penalized weight, read from the flat vector.

    Parameters
    ----------
    graph : onnx.GraphProto
        Modified in place; ``weights`` becomes an input when ``graph`` does
        not define it, and the penalty's per-position coefficients become
        initializers.
    problem : TrainingProblem
        With a penalty that applies to some weight.
    weights : str, default=FLAT_WEIGHTS
    penalty : str, default=PENALTY
        Name given to the scalar penalty.
    """
    declare_input(graph, weights, problem.dtype, [problem.n_weights])
    scales = problem.penalty.scales(problem.penalty_mask(), problem.dtype)
    mapping = {"weight": weights}
    for name, values in scales.items():
        full = f"onnxfit.penalty.{name}"
        graph.initializer.append(numpy_helper.from_array(values, full))
        mapping[name] = full
    append_piece(graph, problem.penalty.piece(problem.dtype), "onnxfit.penalty.", mapping,
                 {"penalty": penalty})


def append_flat_gradient(graph, problem, gradients, flat):
    """Append the flat vector of the gradients, laid end to end.

    Parameters
    ----------
    graph : onnx.GraphProto
        Modified in place; gradients it does not define become inputs of
        their weight's shape.
    problem : TrainingProblem
    gradients : dict of str -> str
        Weight -> name of its gradient in ``graph``.
    flat : str
        Name given to the flat vector.
    """
    dtype = problem.dtype
    parts = []
    for weight in problem.weight_names:
        name = gradients[weight]
        shape = list(problem.weight_shapes[weight])
        declare_input(graph, name, dtype, shape)
        if len(shape) != 1:
            name = append_piece(graph, parse_piece(_FLATTEN_TEXT, dtype),
                                f"onnxfit.flatten.{weight}.", {"value": name})["flat"]
        parts.append(name)
    if len(parts) == 1:
        append_sum(graph, parts, flat, dtype, prefix="onnxfit.flat_gradient.")
    else:
        graph.node.append(helper.make_node(
            "Concat", parts, [flat], name="onnxfit.concat_gradients", axis=0
        ))


def append_update(graph, problem, gradient=FLAT_GRADIENT):
    """Append the update rule, applied once to every weight laid end to end.

    The weights and each state tensor are read as flat vectors in the order
    of ``problem.weight_names`` (the engines keep them that way, see
    :class:`onnxfit.engines.buffers.WeightSet`): one copy of the rule
    updates every weight, a handful of kernels instead of a handful per
    weight.

    Parameters
    ----------
    graph : onnx.GraphProto
        Modified in place.  The scalar input ``LEARNING_RATE``, the flat
        weights ``FLAT_WEIGHTS``, the state vectors ``flat_state_name(s)``
        and ``gradient`` become inputs where ``graph`` does not define them.
    problem : TrainingProblem
        With ``max_grad_norm`` set, the gradient is first scaled down to
        that global L2 norm (``torch.nn.utils.clip_grad_norm_``); the
        rule's own weight decay comes after, as in ``torch.optim``.
    gradient : str, default=FLAT_GRADIENT
        Name of the flat gradient vector.

    Returns
    -------
    list of onnx.ValueInfoProto
        The outputs ``updated_name(FLAT_WEIGHTS)``, then ``updated_name`` of
        each flat state vector.
    """
    dtype, elem, size = problem.dtype, onnx_elem_type(problem.dtype), problem.n_weights
    declare_input(graph, gradient, dtype, [size])
    graph.input.append(scalar_input(LEARNING_RATE, dtype))
    declare_input(graph, FLAT_WEIGHTS, dtype, [size])
    # (A bound beyond the dtype's range clips nothing, and cannot be written.)
    if problem.max_grad_norm is not None and problem.max_grad_norm < np.finfo(dtype).max:
        gradient = append_piece(
            graph, parse_piece(_CLIP_TEXT, dtype, max_norm=problem.max_grad_norm),
            "onnxfit.clip.", {"gradient": gradient})["clipped"]
    mapping = {"weight": FLAT_WEIGHTS, "gradient": gradient, "learning_rate": LEARNING_RATE}
    out_names = {"new_weight": updated_name(FLAT_WEIGHTS)}
    for state in problem.state_names:
        declare_input(graph, flat_state_name(state), dtype, [size])
        mapping[state] = flat_state_name(state)
        out_names["new_" + state] = updated_name(flat_state_name(state))
    append_piece(graph, problem.learning_rate.update_piece(dtype), "onnxfit.update.",
                 mapping, out_names)
    return [helper.make_tensor_value_info(name, elem, [size]) for name in out_names.values()]
