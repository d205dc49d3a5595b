"""The fused engine: one onnxruntime graph per training step.

One ``run`` computes forward, loss, gradients and the new weights, the
fewest round trips between Python and onnxruntime.  The graph is built in
three parts:

1. the model's forward graph, differentiated by onnxruntime-training
   (:func:`onnxfit.gradient.build_gradient_model`) through the scalar
   ``<prediction, G> + penalties``, where ``G`` stands for the loss's
   gradient with respect to the prediction: the backward pass then computes
   the model's vector-Jacobian product of ``G`` plus the penalties' gradients;
2. the loss and its gradient (:func:`onnxfit.losses.loss_gradient_model`),
   whose gradient output becomes ``G``
   (:func:`onnxfit.gradient.read_output_gradient`), so the loss is never
   differentiated through the graph: a closed form takes a handful of
   kernels where the automatic derivative of a loss takes dozens, which is
   most of a step of a small model;
3. the learning-rate object's update rule, applied once to all weights laid
   end to end (:func:`onnxfit.engines.base.append_updates`).

Weights and update-rule state live in two sets of flat numpy vectors bound
to the session (IO binding shares their memory; the model reads each weight
as a view, the update rule the whole vector): a step reads set ``p`` and
writes set ``1 - p``.  Writing in place would be wrong, since onnxruntime may
schedule a weight's update before a backward node that still reads the old
weight.  Only the scalar loss is read back per step.
"""

import numpy as np
import onnx

from ..gradient import build_gradient_model, gradient_name, make_session, read_output_gradient
from ..onnx_graphs import (
    append_piece,
    merge_opset_imports,
    numpy_dtype,
    onnx_elem_type,
    parse_piece,
    prune_graph,
    set_outputs,
)
from .base import (
    DATA_LOSS,
    LABEL,
    LEARNING_RATE,
    LOSS,
    SAMPLE_WEIGHT,
    BaseEngine,
    append_loss,
    append_penalty_terms,
    append_sum,
    append_updates,
    bind_output_array,
    set_input_shape,
)

#: Reserved names of the fused graph.
OUTPUT_GRADIENT = "onnxfit.output_gradient"
SURROGATE = "onnxfit.surrogate"

_INNER_PRODUCT_TEXT = """
inner_product ({T}[] a, {T}[] b) => ({T} inner) {{
    product = Mul(a, b)
    inner = ReduceSum<keepdims = 0>(product)
}}
"""


def build_fused_model(problem):
    """The whole training step as one graph.

    Inputs: X, label, sample_weight, the weights, then the learning rate and
    the flat weight and state vectors of the update rule.  Outputs: the loss
    (penalties included), then the new flat weight and state vectors
    (``new_name(FLAT_WEIGHTS)``, ``new_name(flat_state_name(s))``).
    """
    dtype = problem.dtype
    elem = onnx_elem_type(dtype)
    surrogate = onnx.ModelProto()
    surrogate.CopyFrom(problem.forward_model)
    graph = surrogate.graph
    append_piece(
        graph, parse_piece(_INNER_PRODUCT_TEXT, dtype), "onnxfit.inner.",
        {"a": problem.output_name, "b": OUTPUT_GRADIENT}, {"inner": "onnxfit.inner"},
    )
    set_input_shape(graph, OUTPUT_GRADIENT, dtype, ["N"] + list(problem.label_shape))
    penalties = append_penalty_terms(graph, problem)
    append_sum(graph, ["onnxfit.inner"] + penalties, SURROGATE, dtype, prefix="onnxfit.surrogate.")
    set_outputs(graph, [(SURROGATE, elem, [])])

    model = build_gradient_model(surrogate, SURROGATE, problem.weight_names)
    graph = model.graph
    read_output_gradient(model, problem.output_name, OUTPUT_GRADIENT)
    graph.input.remove(next(i for i in graph.input if i.name == OUTPUT_GRADIENT))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    loss_model = append_loss(
        graph, problem, problem.output_name, DATA_LOSS, OUTPUT_GRADIENT, opset=opset
    )
    merge_opset_imports(model, loss_model)
    append_sum(graph, [DATA_LOSS] + penalties, LOSS, dtype, prefix="onnxfit.objective.")
    gradients = {weight: gradient_name(weight) for weight in problem.weight_names}
    updates = append_updates(graph, problem, gradients)
    set_outputs(graph, [(LOSS, elem, [])])
    graph.output.extend(updates)
    prune_graph(graph)
    onnx.checker.check_model(model)
    return model


class FusedEngine(BaseEngine):
    """Train with one onnxruntime graph per step (see module docstring).

    Parameters
    ----------
    problem : onnxfit.engines.base.TrainingProblem
    """

    name = "fused"

    def __init__(self, problem):
        super().__init__(problem)
        self.training_model = build_fused_model(problem)
        self.session = make_session(self.training_model, problem.n_threads, problem.dtype)
        loss_out = self.training_model.graph.output[0]
        self._loss_name = loss_out.name
        self._step_loss = np.zeros((), dtype=numpy_dtype(loss_out.type.tensor_type.elem_type))
        self._rate = np.zeros((), dtype=problem.dtype)
        self._run = self.session.run_with_iobinding

    def _bind_batch(self, buffers):
        problem = self.problem
        buffers.bindings = []
        for parity in (0, 1):
            binding = self.session.io_binding()
            binding.bind_cpu_input(problem.input_name, buffers.X)
            binding.bind_cpu_input(LABEL, buffers.label)
            binding.bind_cpu_input(SAMPLE_WEIGHT, buffers.sample_weight)
            binding.bind_cpu_input(LEARNING_RATE, self._rate)
            for weight in problem.weight_names:
                binding.bind_cpu_input(weight, self._sets[parity].views[weight])
            self._bind_update_rule(binding, parity)
            bind_output_array(binding, self._loss_name, self._step_loss)
            buffers.bindings.append(binding)

    def _step(self, buffers, parity):
        self._run(buffers.bindings[parity])
