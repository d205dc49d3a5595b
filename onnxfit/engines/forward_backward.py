"""The forward-backward engine: the model as a differentiable function.

Each training step runs five small pieces, the model's own forward and
backward passes being the two halves of one gradient graph
(:func:`onnxfit.gradient.build_module_gradient`, shared through
:data:`onnxfit.function.model_gradient_cache`):

1. model forward: ``X, weights -> prediction`` (onnxruntime-training's
   ``TrainingAgent``);
2. loss graph: ``prediction, label, sample_weight -> loss, dL/dprediction``
   (:func:`onnxfit.losses.loss_gradient_model`: the loss's closed-form
   derivative, or its automatic one);
3. model backward: ``dL/dprediction -> dL/dweights``;
4. penalty graph (when weights are penalized): ``loss, weights, model
   gradients -> objective, gradients``, the penalty object's piece
   differentiated with respect to the weights, plus the model gradient;
5. update graph: the learning-rate object's update rule, applied once to all
   weights laid end to end.

The loss, penalty and update pieces are the very ones the fused engine
appends to its single graph (:mod:`onnxfit.engines.fused`): one definition
of the math, two ways to run it.  Since the model's gradient graph does not
depend on them, changing the loss, the penalty or the learning rate reuses
it from the cache instead of rebuilding it.

Tensors move between the pieces through fixed numpy buffers that every
session reads and writes in place (OrtValues for the training agent, IO
binding for the other sessions): only the scalar objective is read back
per step.  Weights and update-rule state are double-buffered as in the
fused engine: a step reads set ``p`` (the forward and backward passes both
read it) and the update writes set ``1 - p``.
"""

import numpy as np
from onnx import helper

from ..function import model_gradient_cache
from ..gradient import build_gradient_model, gradient_name, make_session, ortvalue_vector
from ..onnx_graphs import (
    append_piece,
    numpy_dtype,
    onnx_elem_type,
    parse_piece,
    piece_model,
    scalar_input,
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
    append_penalties,
    append_updates,
    bind_output_array,
    set_input_shape,
)

#: Reserved name of the prediction passed between the pieces.
PREDICTION = "onnxfit.prediction"

_GRADIENT_SUM_TEXT = """
gradient_sum ({T}[] model_gradient, {T}[] penalty_gradient) => ({T}[] gradient) {{
    gradient = Add(model_gradient, penalty_gradient)
}}
"""


def model_gradient_name(weight):
    """Name of the gradient of the data loss alone for ``weight``."""
    return f"{weight}.model_gradient"


def total_gradient_name(weight):
    """Name of the gradient of the whole objective for ``weight``."""
    return f"{weight}.gradient"


def _empty_graph(name, inputs=()):
    return helper.make_graph([], name, list(inputs), [])


def build_loss_model(problem):
    """The loss and its gradient with respect to the prediction.

    Returns
    -------
    onnx.ModelProto
        Inputs ``PREDICTION``, ``LABEL``, ``SAMPLE_WEIGHT``; outputs the
        scalar ``DATA_LOSS`` and ``gradient_name(PREDICTION)``.
    """
    graph = _empty_graph("onnxfit_loss")
    loss_model = append_loss(graph, problem, PREDICTION, DATA_LOSS, gradient_name(PREDICTION))
    shape = ["N"] + list(problem.label_shape)
    elem = onnx_elem_type(problem.dtype)
    set_outputs(graph, [(DATA_LOSS, elem, []), (gradient_name(PREDICTION), elem, shape)])
    # An automatic derivative may use com.microsoft operators.
    return piece_model(graph, other_opsets=loss_model.opset_import)


def build_penalty_model(problem):
    """The penalties added to the loss and to the model's gradients.

    Returns
    -------
    onnx.ModelProto
        Inputs ``DATA_LOSS``, the penalized weights and their
        ``model_gradient_name``; outputs the scalar objective ``LOSS`` and
        ``total_gradient_name`` of each penalized weight.
    """
    dtype = problem.dtype
    elem = onnx_elem_type(dtype)
    graph = _empty_graph("onnxfit_penalty", [scalar_input(DATA_LOSS, dtype)])
    append_penalties(graph, problem, DATA_LOSS, LOSS)
    for weight in problem.penalized:
        set_input_shape(graph, weight, dtype, list(problem.weight_shapes[weight]))
    set_outputs(graph, [(LOSS, elem, [])])
    model = build_gradient_model(piece_model(graph), LOSS, problem.penalized)
    graph = model.graph
    outputs = [next(o for o in graph.output if o.name == LOSS)]
    gradient_sum = parse_piece(_GRADIENT_SUM_TEXT, dtype)
    for weight in problem.penalized:
        shape = list(problem.weight_shapes[weight])
        append_piece(
            graph,
            gradient_sum,
            prefix=f"onnxfit.gradient_sum.{weight}.",
            inputs={
                "model_gradient": model_gradient_name(weight),
                "penalty_gradient": gradient_name(weight),
            },
            outputs={"gradient": total_gradient_name(weight)},
        )
        set_input_shape(graph, model_gradient_name(weight), dtype, shape)
        outputs.append(helper.make_tensor_value_info(total_gradient_name(weight), elem, shape))
    del graph.output[:]
    graph.output.extend(outputs)
    return model


def build_update_model(problem):
    """The update rule of every weight, reading ``total_gradient_name``.

    Returns
    -------
    onnx.ModelProto
        Inputs: the gradients, ``LEARNING_RATE``, the flat weights and
        state vectors; outputs: their new values (see
        :func:`onnxfit.engines.base.append_updates`).
    """
    graph = _empty_graph("onnxfit_update")
    gradients = {w: total_gradient_name(w) for w in problem.weight_names}
    graph.output.extend(append_updates(graph, problem, gradients))
    return piece_model(graph)


class ForwardBackwardEngine(BaseEngine):
    """Train with the model's forward and backward passes as separate calls.

    See the module docstring.

    Parameters
    ----------
    problem : onnxfit.engines.base.TrainingProblem

    Attributes
    ----------
    model_gradient : onnxfit.gradient.TrainingAgentRunner
        The model's forward/backward, shared through
        :data:`onnxfit.function.model_gradient_cache`.
    loss_model, penalty_model, update_model : onnx.ModelProto
        The other pieces (``penalty_model`` is None when nothing is
        penalized).
    """

    name = "forward_backward"

    def __init__(self, problem):
        super().__init__(problem)
        dtype = problem.dtype
        self.model_gradient = model_gradient_cache.get(
            problem.forward_model, problem.weight_names, n_threads=problem.n_threads
        )
        graph = self.model_gradient.graph
        if graph.forward_input_names != [problem.input_name] + list(problem.weight_names) or (
            graph.output_names != [problem.output_name]
        ):  # pragma: no cover - guards the builder's documented behaviour
            raise RuntimeError(
                f"Unexpected gradient graph: inputs {graph.forward_input_names}, "
                f"outputs {graph.output_names}."
            )
        threads = problem.n_threads
        self.loss_model = build_loss_model(problem)
        self.loss_session = make_session(self.loss_model, threads, dtype)
        self.penalty_model = build_penalty_model(problem) if problem.penalized else None
        self.penalty_session = (
            make_session(self.penalty_model, threads, dtype) if problem.penalized else None
        )
        self.update_model = build_update_model(problem)
        self.update_session = make_session(self.update_model, threads, dtype)

        loss_elem = next(o for o in self.loss_model.graph.output if o.name == DATA_LOSS)
        loss_dtype = numpy_dtype(loss_elem.type.tensor_type.elem_type)
        self._data_loss = np.zeros((), dtype=loss_dtype)
        self._objective = np.zeros((), dtype=loss_dtype)
        self._rate = np.zeros((), dtype=dtype)
        shapes = problem.weight_shapes
        self._model_gradients = {w: np.zeros(shapes[w], dtype) for w in problem.weight_names}
        self._total_gradients = {
            w: np.zeros(shapes[w], dtype) if w in problem.penalized else self._model_gradients[w]
            for w in problem.weight_names
        }
        # The agent writes the weight gradients straight into these buffers.
        self._backward_outputs = ortvalue_vector(
            [self._model_gradients[w] for w in graph.weight_names]
        )
        self._penalty_bindings = [self._bind_penalty(p) for p in (0, 1)]
        self._update_bindings = [self._bind_update(p) for p in (0, 1)]
        # What a step calls, looked up once.
        model = self.model_gradient
        self._new_state = model.new_state
        self._forward, self._backward = model.run_forward, model.run_backward
        self._run_loss = self.loss_session.run_with_iobinding
        self._run_update = self.update_session.run_with_iobinding
        self._run_penalty = (
            self.penalty_session.run_with_iobinding if self.penalty_session is not None else None
        )
        self._step_loss = self._objective if self.penalty_session is not None else self._data_loss

    # -- IO bindings -------------------------------------------------------------
    def _bind_penalty(self, parity):
        if self.penalty_session is None:
            return None
        binding = self.penalty_session.io_binding()
        binding.bind_cpu_input(DATA_LOSS, self._data_loss)
        for weight in self.problem.penalized:
            binding.bind_cpu_input(weight, self._sets[parity].views[weight])
            binding.bind_cpu_input(model_gradient_name(weight), self._model_gradients[weight])
            bind_output_array(
                binding, total_gradient_name(weight), self._total_gradients[weight]
            )
        bind_output_array(binding, LOSS, self._objective)
        return binding

    def _bind_update(self, parity):
        binding = self.update_session.io_binding()
        binding.bind_cpu_input(LEARNING_RATE, self._rate)
        for weight in self.problem.weight_names:
            binding.bind_cpu_input(total_gradient_name(weight), self._total_gradients[weight])
        self._bind_update_rule(binding, parity)
        return binding

    def _bind_batch(self, buffers):
        problem = self.problem
        shape = (buffers.size,) + tuple(problem.label_shape)
        buffers.prediction = np.empty(shape, dtype=problem.dtype)
        buffers.output_gradient = np.empty(shape, dtype=problem.dtype)
        buffers.forward_inputs = [
            ortvalue_vector([buffers.X] + [self._sets[p].views[w] for w in problem.weight_names])
            for p in (0, 1)
        ]
        # The agent writes the prediction into this buffer, the loss session
        # reads it from there, and writes dL/dprediction for the backward.
        buffers.forward_outputs = ortvalue_vector([buffers.prediction])
        buffers.backward_inputs = ortvalue_vector([buffers.output_gradient])
        binding = self.loss_session.io_binding()
        binding.bind_cpu_input(PREDICTION, buffers.prediction)
        binding.bind_cpu_input(LABEL, buffers.label)
        binding.bind_cpu_input(SAMPLE_WEIGHT, buffers.sample_weight)
        bind_output_array(binding, DATA_LOSS, self._data_loss)
        bind_output_array(binding, gradient_name(PREDICTION), buffers.output_gradient)
        buffers.loss_binding = binding

    # -- training ---------------------------------------------------------------
    def _step(self, buffers, parity):
        state = self._new_state()
        self._forward(buffers.forward_inputs[parity], buffers.forward_outputs, state)
        self._run_loss(buffers.loss_binding)
        self._backward(buffers.backward_inputs, self._backward_outputs, state)
        if self._run_penalty is not None:
            self._run_penalty(self._penalty_bindings[parity])
        self._run_update(self._update_bindings[parity])
