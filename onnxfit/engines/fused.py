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
from ..onnx_graphs import append_piece, onnx_elem_type, scalar_input
from .base import (
    LABEL,
    LEARNING_RATE,
    LOSS,
    SAMPLE_WEIGHT,
    BaseEngine,
    new_name,
    state_value_name,
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
    terms = [loss_out]
    for weight in problem.penalized:
        out = append_piece(
            graph,
            problem.penalty.piece(dtype),
            prefix=f"onnxfit.penalty.{weight}.",
            inputs={"weight": weight},
        )["penalty"]
        terms.append(out)
    # A chain of Add: onnxruntime-training has no gradient for Sum.
    total = terms[0]
    for k, term in enumerate(terms[1:]):
        out = LOSS if k == len(terms) - 2 else f"onnxfit.objective.{k}"
        graph.node.append(helper.make_node("Add", [total, term], [out]))
        total = out
    if len(terms) == 1:
        graph.node.append(helper.make_node("Identity", [total], [LOSS]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS, elem, []))
    _fix_label_shape(graph, problem)
    return full


def _fix_label_shape(graph, problem):
    """Give the label input the model output's shape (batch dim symbolic)."""
    for value in graph.input:
        if value.name == LABEL:
            shape = ["N"] + list(problem.label_shape)
            value.CopyFrom(
                helper.make_tensor_value_info(LABEL, onnx_elem_type(problem.dtype), shape)
            )


def build_fused_model(problem):
    """The whole training step as one graph.

    Inputs: X, label, sample_weight, learning_rate, weights, state tensors.
    Outputs: loss, then ``<weight>.new`` and ``<weight>.<state>.new``.
    """
    objective = add_loss_and_penalty(problem.forward_model, problem)
    model = build_gradient_model(objective, LOSS, problem.weight_names)
    graph = model.graph
    loss_output = next(o for o in graph.output if o.name == LOSS)
    graph.input.append(scalar_input(LEARNING_RATE, problem.dtype))
    outputs = [loss_output]
    piece = problem.learning_rate.update_piece(problem.dtype)
    elem = onnx_elem_type(problem.dtype)
    for weight in problem.weight_names:
        mapping = {
            "weight": weight,
            "gradient": gradient_name(weight),
            "learning_rate": LEARNING_RATE,
        }
        out_names = {"new_weight": new_name(weight)}
        for state in problem.state_names:
            mapping[state] = state_value_name(weight, state)
            out_names["new_" + state] = new_name(state_value_name(weight, state))
        append_piece(graph, piece, f"onnxfit.update.{weight}.", mapping, out_names)
        shape = list(problem.weight_shapes[weight])
        for name in out_names.values():
            outputs.append(helper.make_tensor_value_info(name, elem, shape))
        for state in problem.state_names:
            for value in graph.input:
                if value.name == state_value_name(weight, state):
                    value.CopyFrom(helper.make_tensor_value_info(value.name, elem, shape))
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
        from ..onnx_graphs import numpy_dtype

        self._loss = np.zeros((), dtype=numpy_dtype(loss_out.type.tensor_type.elem_type))
        self._rate = np.zeros((), dtype=problem.dtype)
        # Two sets of weights/state buffers: a step reads one, writes the other.
        self._sets = [self._empty_set(), self._empty_set()]
        self._parity = 0

    def _empty_set(self):
        problem = self.problem
        values = {}
        for weight in problem.weight_names:
            shape = problem.weight_shapes[weight]
            values[weight] = np.zeros(shape, dtype=problem.dtype)
            for state in problem.state_names:
                values[state_value_name(weight, state)] = np.zeros(shape, dtype=problem.dtype)
        return values

    def set_state(self, weights, states):
        current = self._sets[0]
        for weight in self.problem.weight_names:
            np.copyto(current[weight], weights[weight], casting="same_kind")
            for state in self.problem.state_names:
                np.copyto(
                    current[state_value_name(weight, state)],
                    states[weight][state],
                    casting="same_kind",
                )
        self._parity = 0

    def get_state(self):
        current = self._sets[self._parity]
        weights = {w: current[w].copy() for w in self.problem.weight_names}
        states = {
            w: {s: current[state_value_name(w, s)].copy() for s in self.problem.state_names}
            for w in self.problem.weight_names
        }
        return weights, states

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
            _bind_output_array(binding, self._loss_name, self._loss)
            for name, array in target.items():
                _bind_output_array(binding, new_name(name), array)
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


def _bind_output_array(binding, name, array):
    binding.bind_output(
        name,
        device_type="cpu",
        device_id=0,
        element_type=array.dtype,
        shape=array.shape,
        buffer_ptr=array.ctypes.data,
    )
