"""The fused engine: one onnxruntime graph per training step.

The training graph is the model's forward graph, then the loss and the
penalties (:mod:`onnxfit.losses`, :mod:`onnxfit.penalties`), differentiated
by onnxruntime-training (:func:`onnxfit.gradient.build_gradient_model`),
then one copy of the learning-rate object's update rule per weight.  One
``run`` computes forward, loss, gradients and the new weights: the fewest
round trips between Python and onnxruntime.

Weights and update-rule state live in two sets of numpy buffers bound to the
session (IO binding shares their memory): a step reads set ``p`` and writes
set ``1 - p``.  Writing in place would be wrong, since onnxruntime may
schedule a weight's update before a backward node that still reads the old
weight.  Only the scalar loss is read back per step.
"""

import numpy as np
import onnx
from onnx import helper

from ..gradient import build_gradient_model, gradient_name, make_session
from ..onnx_graphs import append_piece, numpy_dtype, onnx_elem_type
from .base import (
    LABEL,
    LEARNING_RATE,
    LOSS,
    SAMPLE_WEIGHT,
    BaseEngine,
    append_penalties,
    append_updates,
    bind_output_array,
    new_name,
    set_input_shape,
)


def add_loss_and_penalty(model, problem):
    """Append the loss and the penalties to a copy of the forward model.

    Returns
    -------
    onnx.ModelProto
        Inputs: X, weights, label, sample_weight; single output: the scalar
        objective named ``LOSS``.
    """
    dtype = problem.dtype
    elem = onnx_elem_type(dtype)
    full = onnx.ModelProto()
    full.CopyFrom(model)
    graph = full.graph
    loss_out = append_piece(
        graph,
        problem.loss.piece(dtype),
        prefix="onnxfit.loss.",
        inputs={
            "prediction": problem.output_name,
            "label": LABEL,
            "sample_weight": SAMPLE_WEIGHT,
        },
    )["loss"]
    append_penalties(graph, problem, loss_out, LOSS)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS, elem, []))
    # The label has the model output's shape (batch dim symbolic).
    set_input_shape(graph, LABEL, dtype, ["N"] + list(problem.label_shape))
    return full


def build_fused_model(problem):
    """The whole training step as one graph.

    Inputs: X, label, sample_weight, learning_rate, weights, state tensors.
    Outputs: loss, then ``<weight>.new`` and ``<weight>.<state>.new``.
    """
    objective = add_loss_and_penalty(problem.forward_model, problem)
    model = build_gradient_model(objective, LOSS, problem.weight_names)
    graph = model.graph
    loss_output = next(o for o in graph.output if o.name == LOSS)
    gradients = {weight: gradient_name(weight) for weight in problem.weight_names}
    outputs = [loss_output] + append_updates(graph, problem, gradients)
    del graph.output[:]
    graph.output.extend(outputs)
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
        self._loss = np.zeros((), dtype=numpy_dtype(loss_out.type.tensor_type.elem_type))
        self._rate = np.zeros((), dtype=problem.dtype)

    def _bind_batch(self, buffers):
        problem = self.problem
        buffers.bindings = []
        for parity in (0, 1):
            source, target = self._sets[parity], self._sets[1 - parity]
            binding = self.session.io_binding()
            binding.bind_cpu_input(problem.input_name, buffers.X)
            binding.bind_cpu_input(LABEL, buffers.label)
            binding.bind_cpu_input(SAMPLE_WEIGHT, buffers.sample_weight)
            binding.bind_cpu_input(LEARNING_RATE, self._rate)
            for name, array in source.items():
                binding.bind_cpu_input(name, array)
            bind_output_array(binding, self._loss_name, self._loss)
            for name, array in target.items():
                bind_output_array(binding, new_name(name), array)
            buffers.bindings.append(binding)

    def run_epoch(self, X, label, sample_weight, order, batch_size, rates):
        n = len(order)
        n_features = X.shape[1]
        run = self.session.run_with_iobinding
        total = 0.0
        for step, start in enumerate(range(0, n, batch_size)):
            indices = order[start:start + batch_size]
            buffers = self._batch_buffers(len(indices), n_features)
            buffers.gather(X, label, sample_weight, indices)
            self._rate[...] = rates[step]
            run(buffers.bindings[self._parity])
            self._parity ^= 1
            total += float(self._loss) * len(indices)
        return total / n
