"""The fused engine: one onnxruntime graph per training step.

One ``run`` computes forward, loss, gradients and the new weights, the
fewest round trips between Python and onnxruntime.  The graph is built in
three parts:

1. the model's forward graph and the penalty (on the flat weight vector),
   differentiated through the gradient seam
   (:func:`onnxfit.gradient.build_vjp`) with the prediction seeded by ``G``,
   a stand-in for the loss's gradient, and the penalty seeded by 1;
2. the loss and its gradient (:func:`onnxfit.losses.loss_gradient_model`),
   whose gradient output *is* ``G``: the loss is never differentiated
   through the model's graph, and a closed-form derivative takes a handful
   of kernels where an automatic one takes dozens;
3. the learning-rate object's update rule, applied once to all weights laid
   end to end (:func:`onnxfit.engines.steps.append_update`).

Weights and update-rule state live in two sets of flat numpy vectors bound
to the session (IO binding shares their memory; the model reads each weight
as a view, the penalty and the update rule the whole vector): a step reads
set ``p`` and writes set ``1 - p``.  Writing in place would be wrong, since
onnxruntime may schedule a weight's update before a backward node that still
reads the old weight.  Only the scalar loss is read back per step.
"""

from types import SimpleNamespace

import numpy as np
import onnx

from ..gradient import build_vjp
from ..onnx_graphs import (
    append_sum,
    merge_opset_imports,
    numpy_dtype,
    onnx_elem_type,
    prune_graph,
    set_outputs,
)
from ..sessions import bind_output_array, binding_runner, make_session
from .base import BaseEngine
from .problem import (
    DATA_LOSS,
    FLAT_GRADIENT,
    FLAT_WEIGHTS,
    LABEL,
    LEARNING_RATE,
    LOSS,
    PENALTY,
    SAMPLE_WEIGHT,
)
from .steps import append_flat_gradient, append_loss, append_penalty, append_update

#: Reserved names of the fused graph.
OUTPUT_GRADIENT = "onnxfit.output_gradient"
MODEL_GRADIENT = "onnxfit.model_gradient"


def build_fused_model(problem):
    """The whole training step as one graph.

    Inputs: the data inputs, label, sample_weight, the weights, the Dropout
    masks and running statistics, then the learning rate and the flat weight
    and state vectors of the update rule.  Outputs: the loss (penalty
    included), the new flat weight and state vectors
    (``updated_name(FLAT_WEIGHTS)``, ``updated_name(flat_state_name(s))``),
    then the new running statistics.
    """
    dtype = problem.dtype
    elem = onnx_elem_type(dtype)
    model = onnx.ModelProto()
    model.CopyFrom(problem.forward_model)
    seeds = {problem.output_name: OUTPUT_GRADIENT}
    wrt = list(problem.weight_names)
    if problem.penalized:
        append_penalty(model.graph, problem)
        seeds[PENALTY] = 1
        wrt.append(FLAT_WEIGHTS)
    vjp = build_vjp(model, seeds, wrt, backend=problem.gradient_backend)
    model = vjp.model
    graph = model.graph
    graph.input.remove(next(i for i in graph.input if i.name == OUTPUT_GRADIENT))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    loss_model = append_loss(
        graph, problem, problem.output_name, DATA_LOSS, OUTPUT_GRADIENT, opset=opset
    )
    merge_opset_imports(model, loss_model)
    terms = [DATA_LOSS] + ([PENALTY] if problem.penalized else [])
    append_sum(graph, terms, LOSS, dtype, prefix="onnxfit.objective.")
    model_gradients = {w: vjp.gradient_names[w] for w in problem.weight_names}
    if problem.penalized:
        append_flat_gradient(graph, problem, model_gradients, MODEL_GRADIENT)
        append_sum(graph, [MODEL_GRADIENT, vjp.gradient_names[FLAT_WEIGHTS]], FLAT_GRADIENT,
                   dtype, prefix="onnxfit.gradient_sum.")
    else:
        append_flat_gradient(graph, problem, model_gradients, FLAT_GRADIENT)
    updates = append_update(graph, problem, FLAT_GRADIENT)
    statistics = [o for o in graph.output if o.name in set(problem.statistics.values())]
    set_outputs(graph, [(LOSS, elem, [])])
    graph.output.extend(updates)
    graph.output.extend(statistics)
    prune_graph(graph)
    if problem.gradient_backend == "onnxfit":
        # The other backend leaves training-only operators onnx does not know.
        onnx.checker.check_model(model)
    return model


class FusedEngine(BaseEngine):
    """Train with one onnxruntime graph per step (see module docstring).

    Parameters
    ----------
    problem : onnxfit.engines.problem.TrainingProblem
    """

    name = "fused"

    def __init__(self, problem, memory=None):
        super().__init__(problem, memory)
        self.training_model = build_fused_model(problem)
        self.session = make_session(self.training_model, problem.n_threads, problem.dtype,
                                    self.device)
        loss_out = self.training_model.graph.output[0]
        self._loss_name = loss_out.name
        self._step_loss = np.zeros((), dtype=numpy_dtype(loss_out.type.tensor_type.elem_type))
        self._rate = np.zeros((), dtype=problem.dtype)
        self._run = binding_runner(self.session)

    def graphs(self):
        """``{'training_step': the whole step}`` (see :func:`build_fused_model`)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.training_model)
        return {"training_step": model}

    def _bind_batch(self, buffers):
        problem = self.problem
        bindings = []
        for parity in (0, 1):
            binding = self.session.io_binding()
            for name, array in buffers.inputs.items():
                binding.bind_cpu_input(name, array)
            for name, array in buffers.masks.items():
                binding.bind_cpu_input(name, array)
            binding.bind_cpu_input(LABEL, buffers.label)
            binding.bind_cpu_input(SAMPLE_WEIGHT, buffers.sample_weight)
            binding.bind_cpu_input(LEARNING_RATE, self._rate)
            for weight in problem.weight_names:
                self.memory.bind_input(binding, weight, self._sets[parity].views[weight])
            self._bind_update_rule(binding, parity)
            self._bind_statistics(binding, parity)
            bind_output_array(binding, self._loss_name, self._step_loss)
            bindings.append(binding)
        buffers.bound = SimpleNamespace(bindings=bindings)

    def _step(self, buffers, parity):
        self._run(buffers.bound.bindings[parity])
