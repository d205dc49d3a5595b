"""The forward-backward engine: the model as a differentiable function.

Each training step runs five small graphs, the model's own forward and
backward passes being the two halves of its gradient graph
(:func:`onnxfit.gradient.split_gradient_graph`, shared through
:data:`onnxfit.function.model_gradient_cache`):

1. model forward: ``X, weights -> prediction`` (and the values the backward
   pass needs, kept in buffers);
2. loss graph: ``prediction, label, sample_weight -> loss, dL/dprediction``
   (:func:`onnxfit.losses.loss_gradient_model`: the loss's closed-form
   derivative, or its automatic one);
3. model backward: ``dL/dprediction -> dL/dweights``, written into one flat
   vector (each weight's gradient is a view into it);
4. penalty graph (when weights are penalized): ``loss, flat weights, flat
   model gradient -> objective, flat gradient``, the penalty differentiated
   through the gradient seam and added;
5. update graph: the learning-rate object's update rule, applied once to the
   flat vectors.

The loss, penalty and update pieces are the very ones the fused engine
appends to its single graph (:mod:`onnxfit.engines.steps`): one definition of
the math, two ways to run it.  Since the model's gradient graph does not
depend on them, changing the loss, the penalty or the learning rate reuses it
from the cache instead of rebuilding it.

Tensors move between the graphs through fixed numpy buffers that every
session reads and writes in place through IO binding: only the scalar
objective is read back per step.  Weights and update-rule state are
double-buffered as in the fused engine: a step reads set ``p`` (the forward
and backward passes both read it) and the update writes set ``1 - p``.
"""

from types import SimpleNamespace

import numpy as np
import onnx
from onnx import helper

from ..function import model_gradient_cache
from ..gradient import build_vjp
from ..onnx_graphs import (
    append_sum,
    numpy_dtype,
    onnx_elem_type,
    piece_model,
    scalar_input,
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
from .steps import append_loss, append_penalty, append_update

#: Reserved names of the values passed between the graphs.
PREDICTION = "onnxfit.prediction"
PREDICTION_GRADIENT = "onnxfit.prediction_gradient"
MODEL_GRADIENT = "onnxfit.model_gradient"

def _empty_graph(name, inputs=()):
    return helper.make_graph([], name, list(inputs), [])


def build_loss_model(problem):
    """The loss and its gradient with respect to the prediction.

    Returns
    -------
    onnx.ModelProto
        Inputs ``PREDICTION``, ``LABEL``, ``SAMPLE_WEIGHT``; outputs the
        scalar ``DATA_LOSS`` and ``PREDICTION_GRADIENT``.
    """
    graph = _empty_graph("onnxfit_loss")
    loss_model = append_loss(graph, problem, PREDICTION, DATA_LOSS, PREDICTION_GRADIENT)
    shape = problem.loss.prediction_shape(problem.label_shape)
    elem = onnx_elem_type(problem.dtype)
    set_outputs(graph, [(DATA_LOSS, elem, []), (PREDICTION_GRADIENT, elem, shape)])
    # The onnxruntime-training backend may use com.microsoft operators.
    return piece_model(graph, other_opsets=loss_model.opset_import)


def build_penalty_model(problem):
    """The penalty added to the loss and to the model's gradient.

    Returns
    -------
    onnx.ModelProto
        Inputs ``DATA_LOSS``, ``FLAT_WEIGHTS`` and the flat
        ``MODEL_GRADIENT``; outputs the scalar objective ``LOSS`` and the
        flat ``FLAT_GRADIENT``.
    """
    dtype, elem, size = problem.dtype, onnx_elem_type(problem.dtype), problem.n_weights
    graph = _empty_graph("onnxfit_penalty", [scalar_input(DATA_LOSS, dtype)])
    append_penalty(graph, problem)
    append_sum(graph, [DATA_LOSS, PENALTY], LOSS, dtype, prefix="onnxfit.objective.")
    set_outputs(graph, [(LOSS, elem, [])])
    vjp = build_vjp(piece_model(graph), {PENALTY: 1}, [FLAT_WEIGHTS],
                    backend=problem.gradient_backend)
    graph = vjp.model.graph
    graph.input.append(helper.make_tensor_value_info(MODEL_GRADIENT, elem, [size]))
    append_sum(graph, [MODEL_GRADIENT, vjp.gradient_names[FLAT_WEIGHTS]], FLAT_GRADIENT,
               dtype, prefix="onnxfit.gradient_sum.")
    set_outputs(graph, [(LOSS, elem, []), (FLAT_GRADIENT, elem, [size])])
    return vjp.model


def build_update_model(problem):
    """The update rule of every weight, reading the flat ``FLAT_GRADIENT``.

    Returns
    -------
    onnx.ModelProto
        Inputs: the flat gradient, ``LEARNING_RATE``, the flat weights and
        state vectors; outputs: their new values (see
        :func:`onnxfit.engines.steps.append_update`).
    """
    graph = _empty_graph("onnxfit_update")
    graph.output.extend(append_update(graph, problem, FLAT_GRADIENT))
    return piece_model(graph)


class ForwardBackwardEngine(BaseEngine):
    """Train with the model's forward and backward passes as separate calls.

    See the module docstring.

    Parameters
    ----------
    problem : onnxfit.engines.problem.TrainingProblem

    Attributes
    ----------
    model_runner : onnxfit.gradient.ForwardBackwardRunner
        The model's forward and backward sessions, shared through
        :data:`onnxfit.function.model_gradient_cache`.
    loss_model, penalty_model, update_model : onnx.ModelProto
        The other graphs (``penalty_model`` is None when nothing is
        penalized).
    """

    name = "forward_backward"

    def __init__(self, problem, memory=None):
        super().__init__(problem, memory)
        dtype = problem.dtype
        threads = problem.n_threads
        self.model_runner = model_gradient_cache.get(
            problem.forward_model, problem.weight_names, n_threads=threads,
            backend=problem.gradient_backend, constant_outputs=list(problem.statistics.values()),
            device=self.device,
        )
        split = self.model_runner.split
        expected_inputs = (problem.input_names + list(problem.weight_names)
                           + [m.name for m in problem.masks] + list(problem.statistics))
        if sorted(split.input_names) != sorted(expected_inputs) or (
            split.output_names != [problem.output_name] + list(problem.statistics.values())
        ):  # pragma: no cover - guards the split's documented behaviour
            raise RuntimeError(
                f"Unexpected model gradient: inputs {split.input_names}, outputs "
                f"{split.output_names}."
            )
        self.loss_model = build_loss_model(problem)
        device = self.device
        self.loss_session = make_session(self.loss_model, threads, dtype, device)
        penalized = bool(problem.penalized)
        self.penalty_model = build_penalty_model(problem) if penalized else None
        self.penalty_session = make_session(self.penalty_model, threads, dtype, device) \
            if penalized \
            else None
        self.update_model = build_update_model(problem)
        self.update_session = make_session(self.update_model, threads, dtype, device)

        loss_info = next(o for o in self.loss_model.graph.output if o.name == DATA_LOSS)
        loss_dtype = numpy_dtype(loss_info.type.tensor_type.elem_type)
        self._data_loss = np.zeros((), dtype=loss_dtype)
        self._objective = np.zeros((), dtype=loss_dtype)
        self._rate = np.zeros((), dtype=dtype)
        # The backward pass writes each weight's gradient into a view of one
        # flat vector, which the penalty and the update read whole.
        memory = self.memory
        self._model_gradient = memory.zeros((problem.n_weights,), dtype)
        self._total_gradient = memory.zeros((problem.n_weights,), dtype) if penalized \
            else self._model_gradient
        self._gradient_views = {
            w: memory.view(self._model_gradient, start, stop, problem.weight_shapes[w])
            for w, (start, stop) in problem.weight_offsets().items()
        }
        self._penalty_bindings = [self._bind_penalty(p) for p in (0, 1)] if penalized \
            else None
        self._update_bindings = [self._bind_update(p) for p in (0, 1)]
        # What a step calls, looked up once.
        self._run_forward = binding_runner(self.model_runner.forward_session)
        self._run_backward = binding_runner(self.model_runner.backward_session)
        self._run_loss = binding_runner(self.loss_session)
        self._run_update = binding_runner(self.update_session)
        self._run_penalty = binding_runner(self.penalty_session) if penalized else None
        self._step_loss = self._objective if penalized else self._data_loss

    def graphs(self):
        """The five graphs of a step, in the order they run:
        ``model_forward``, ``loss``, ``model_backward``, ``penalty`` (when
        weights are penalized) and ``update``."""
        split = self.model_runner.split
        pieces = {"model_forward": split.forward, "loss": self.loss_model,
                  "model_backward": split.backward, "penalty": self.penalty_model,
                  "update": self.update_model}
        graphs = {}
        for name, piece in pieces.items():
            if piece is not None:
                graphs[name] = onnx.ModelProto()
                graphs[name].CopyFrom(piece)
        return graphs

    # -- IO bindings -------------------------------------------------------------
    def _bind_penalty(self, parity):
        binding = self.penalty_session.io_binding()
        memory = self.memory
        binding.bind_cpu_input(DATA_LOSS, self._data_loss)
        memory.bind_input(binding, FLAT_WEIGHTS, self._sets[parity].flat[FLAT_WEIGHTS])
        memory.bind_input(binding, MODEL_GRADIENT, self._model_gradient)
        memory.bind_output(binding, FLAT_GRADIENT, self._total_gradient)
        bind_output_array(binding, LOSS, self._objective)
        return binding

    def _bind_update(self, parity):
        binding = self.update_session.io_binding()
        binding.bind_cpu_input(LEARNING_RATE, self._rate)
        self.memory.bind_input(binding, FLAT_GRADIENT, self._total_gradient)
        self._bind_update_rule(binding, parity)
        return binding

    def _shapes_fixed_by_batch(self, buffers):
        """Whether onnx can tell, from the batch's shape alone, the shape of
        every value the backward pass reads (it cannot when a shape is
        computed from the data: Reshape to a computed shape, NonZero, loops)."""
        split = self.model_runner.split
        model = onnx.ModelProto()
        model.CopyFrom(split.forward)
        arrays = {**buffers.inputs, **buffers.masks}
        for value in model.graph.input:
            if value.name in arrays:
                value.CopyFrom(helper.make_tensor_value_info(
                    value.name, value.type.tensor_type.elem_type, list(arrays[value.name].shape)))
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # a partially known graph: bind at each step
            return False
        shapes = {v.name: v.type.tensor_type.shape for v in
                  list(inferred.graph.value_info) + list(inferred.graph.output)}
        for name in split.saved_names:
            shape = shapes.get(name)
            if shape is None or not all(d.HasField("dim_value") for d in shape.dim):
                return False
        return True

    def _bind_forward_inputs(self, binding, buffers, parity):
        """Bind what the forward pass reads: the batch, the masks, weights
        and statistics of set ``parity``."""
        for name, array in buffers.inputs.items():
            binding.bind_cpu_input(name, array)
        for name, array in buffers.masks.items():
            binding.bind_cpu_input(name, array)
        for weight in self.problem.weight_names:
            self.memory.bind_input(binding, weight, self._sets[parity].views[weight])
        for name, array in self._sets[parity].statistics.items():
            self.memory.bind_input(binding, name, array)

    def _saved_buffers(self, buffers):
        """Buffers for the values the backward pass reads, shaped by one
        forward run on the batch buffers (onnxruntime's own shapes), or None
        when their shapes may change from batch to batch."""
        if not self._shapes_fixed_by_batch(buffers):
            return None
        split = self.model_runner.split
        session = self.model_runner.forward_session
        binding = session.io_binding()
        self._bind_forward_inputs(binding, buffers, 0)
        names = split.forward_output_names
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        values = dict(zip(names, binding.copy_outputs_to_cpu()))
        return {name: self.memory.zeros(values[name].shape, values[name].dtype)
                for name in split.saved_names if name not in split.output_names}

    def _bind_batch(self, buffers):
        problem = self.problem
        split = self.model_runner.split
        # The trained output's shape for this batch (a graph's own loss may
        # be a scalar).
        shape = tuple(buffers.size if d == "N" else d
                      for d in problem.loss.prediction_shape(problem.label_shape))
        memory = self.memory
        prediction = memory.zeros(shape, problem.dtype)
        output_gradient = memory.zeros(shape, problem.dtype)
        saved = self._saved_buffers(buffers)  # the buffers hold zeros and ones here
        dynamic = saved is None
        saved = {} if dynamic else saved
        saved[problem.output_name] = prediction
        batch_values = {**buffers.inputs, **buffers.masks}
        forward, backward = [], []
        for parity in (0, 1):
            views = self._sets[parity].views
            binding = self.model_runner.forward_session.io_binding()
            self._bind_forward_inputs(binding, buffers, parity)
            new_statistics = {new: self._sets[1 - parity].statistics[name]
                              for name, new in problem.statistics.items()}
            for name in split.forward_output_names:
                if name in saved:
                    memory.bind_output(binding, name, saved[name])
                elif name in new_statistics:
                    memory.bind_output(binding, name, new_statistics[name])
                else:  # data-dependent shapes: onnxruntime allocates at each step
                    memory.bind_allocated_output(binding, name)
            forward.append(binding)
            binding = self.model_runner.backward_session.io_binding()
            for name in split.backward_input_names:
                if name in saved:
                    memory.bind_input(binding, name, saved[name])
                elif name in batch_values:
                    binding.bind_cpu_input(name, batch_values[name])
                elif name in views:
                    memory.bind_input(binding, name, views[name])
                elif name in self._sets[parity].statistics:
                    memory.bind_input(binding, name, self._sets[parity].statistics[name])
            memory.bind_input(binding, split.cotangent_names[problem.output_name],
                              output_gradient)
            for weight, output in split.gradient_names.items():
                memory.bind_output(binding, output, self._gradient_views[weight])
            backward.append(binding)
        loss = self.loss_session.io_binding()
        memory.bind_input(loss, PREDICTION, prediction)
        loss.bind_cpu_input(LABEL, buffers.label)
        loss.bind_cpu_input(SAMPLE_WEIGHT, buffers.sample_weight)
        bind_output_array(loss, DATA_LOSS, self._data_loss)
        memory.bind_output(loss, PREDICTION_GRADIENT, output_gradient)
        rebound = [] if not dynamic else [
            (k, name) for k, name in enumerate(split.forward_output_names)
            if name in split.backward_input_names and name not in saved]
        buffers.bound = SimpleNamespace(
            forward=forward, backward=backward, loss=loss, rebound=rebound,
            prediction=prediction, output_gradient=output_gradient, saved=saved,
        )

    # -- training ---------------------------------------------------------------
    def _step(self, buffers, parity):
        bound = buffers.bound
        self._run_forward(bound.forward[parity])
        if bound.rebound:
            values = bound.forward[parity].get_outputs()
            for index, name in bound.rebound:
                bound.backward[parity].bind_ortvalue_input(name, values[index])
        self._run_loss(bound.loss)
        self._run_backward(bound.backward[parity])
        if self._run_penalty is not None:
            self._run_penalty(self._penalty_bindings[parity])
        self._run_update(self._update_bindings[parity])
