"""What both training engines share: the problem, the state, the batches.

An engine runs epochs of mini-batch updates for a :class:`TrainingProblem`
and owns the weights and update-rule state while it trains (as buffers
that onnxruntime reads and writes in place).  The estimator hands state in
with :meth:`BaseEngine.set_state` and takes it back with
:meth:`BaseEngine.get_state`; everything else about a run (epochs, the
schedule, early stopping) stays in the estimator.
"""

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ..losses import loss_gradient_model
from ..onnx_graphs import OPSET, append_piece, onnx_elem_type, parse_piece, scalar_input


@dataclass
class TrainingProblem:
    """Everything an engine needs to build its graphs.

    Attributes
    ----------
    forward_model : onnx.ModelProto
        The model with inputs ``[input_name] + weight_names`` and the single
        output ``output_name`` (see :meth:`onnxfit.model.OnnxModel.forward_model`).
    input_name, output_name : str
    weight_names : list of str
    weight_shapes : dict of str -> tuple
    dtype : numpy dtype
        Element type of the output, labels, weights and updates.
    input_dtype : numpy dtype
        Element type of X.
    label_shape : tuple
        Shape of one sample's label (the model output without its batch
        dimension).
    loss : onnxfit.losses.BaseLoss
    penalty : onnxfit.penalties.ElasticNetPenalty or None
    learning_rate : onnxfit.learning_rate.BaseLearningRate
    n_threads : int
    """

    forward_model: onnx.ModelProto
    input_name: str
    output_name: str
    weight_names: list
    weight_shapes: dict
    dtype: np.dtype
    input_dtype: np.dtype
    label_shape: tuple
    loss: object
    penalty: object
    learning_rate: object
    n_threads: int = 1
    penalized: list = field(init=False)

    def __post_init__(self):
        self.dtype = np.dtype(self.dtype)
        self.input_dtype = np.dtype(self.input_dtype)
        if self.penalty is None:
            self.penalized = []
        else:
            self.penalized = [
                n for n in self.weight_names if self.penalty.applies_to(self.weight_shapes[n])
            ]

    @property
    def state_names(self):
        return tuple(self.learning_rate.state_names)


#: Reserved names of the values the engines add around the model.
LABEL = "onnxfit.label"
SAMPLE_WEIGHT = "onnxfit.sample_weight"
LEARNING_RATE = "onnxfit.learning_rate"
LOSS = "onnxfit.loss"
DATA_LOSS = "onnxfit.data_loss"


def state_value_name(weight, state):
    """Name of the update-rule state tensor ``state`` of ``weight``."""
    return f"{weight}.{state}"


def new_name(name):
    """Name of the updated value of ``name`` in the training graph."""
    return f"{name}.new"


def set_input_shape(graph, name, dtype, shape):
    """Give the graph input ``name`` the element type ``dtype`` and ``shape``."""
    for value in graph.input:
        if value.name == name:
            value.CopyFrom(helper.make_tensor_value_info(name, onnx_elem_type(dtype), shape))


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
        import its opsets too (an automatic derivative may use
        ``com.microsoft`` operators), see
        :func:`onnxfit.onnx_graphs.merge_opset_imports`.
    """
    model = loss_gradient_model(problem.loss, problem.dtype, problem.label_shape, opset=opset)
    append_piece(
        graph,
        model.graph,
        prefix="onnxfit.loss.",
        inputs={"prediction": prediction, "label": LABEL, "sample_weight": SAMPLE_WEIGHT},
        outputs={"loss": data_loss, "prediction_grad": prediction_grad},
    )
    return model


def append_penalty_terms(graph, problem):
    """Append the penalty of each penalized weight.

    Parameters
    ----------
    graph : onnx.GraphProto
        Modified in place; penalized weights it does not define become
        inputs (of unknown shape).
    problem : TrainingProblem

    Returns
    -------
    list of str
        Names of the scalar penalties, one per penalized weight.
    """
    terms = []
    for weight in problem.penalized:
        out = append_piece(
            graph,
            problem.penalty.piece(problem.dtype),
            prefix=f"onnxfit.penalty.{weight}.",
            inputs={"weight": weight},
        )["penalty"]
        terms.append(out)
    return terms


def append_sum(graph, terms, total, dtype, prefix):
    """Append ``total = terms[0] + terms[1] + ...`` (scalars of ``dtype``).

    Intermediate names start with ``prefix``, which must not be the prefix
    of another piece of ``graph``.
    """
    # A chain of Add: onnxruntime-training has no gradient for Sum.
    if len(terms) == 1:
        append_piece(graph, parse_piece(_SAME_TEXT, dtype), prefix, {"a": terms[0]},
                     {"same": total})
        return
    add = parse_piece(_ADD_TEXT, dtype)
    current = terms[0]
    for k, term in enumerate(terms[1:]):
        out = total if k == len(terms) - 2 else f"{prefix}partial{k}"
        append_piece(graph, add, f"{prefix}add{k}.", {"a": current, "b": term}, {"total": out})
        current = out


def append_penalties(graph, problem, loss, objective):
    """Append the penalty of each penalized weight and their sum with ``loss``.

    Parameters
    ----------
    graph : onnx.GraphProto
        Modified in place (see :func:`append_penalty_terms`).
    problem : TrainingProblem
    loss : str
        Name of the scalar data loss in ``graph``.
    objective : str
        Name given to ``loss + penalties``.
    """
    append_sum(graph, [loss] + append_penalty_terms(graph, problem), objective, problem.dtype,
               prefix="onnxfit.objective.")


_ADD_TEXT = """
add_terms ({T} a, {T} b) => ({T} total) {{
    total = Add(a, b)
}}
"""

_SAME_TEXT = """
same ({T} a) => ({T} same) {{
    same = Identity(a)
}}
"""


#: Name of the flat vector holding every trained weight, one after the other.
FLAT_WEIGHTS = "onnxfit.weights"
FLAT_GRADIENT = "onnxfit.gradient"


def flat_state_name(state):
    """Name of the flat vector holding the update-rule state ``state``."""
    return state_value_name(FLAT_WEIGHTS, state)


_FLATTEN_TEXT = """
flatten ({T}[] value) => ({T}[] flat) {{
    shape = Constant<value = int64[1] {{-1}}>()
    flat = Reshape(value, shape)
}}
"""


def append_updates(graph, problem, gradients):
    """Append the update rule, applied once to every weight laid end to end.

    The gradients are flattened and concatenated in the order of
    ``problem.weight_names``; the weights and each state tensor are read as
    flat vectors in the same order (the engines keep them that way, see
    :class:`WeightSet`).  One copy of the rule then updates every weight: a
    handful of kernels instead of a handful per weight.

    Parameters
    ----------
    graph : onnx.GraphProto
        Modified in place.  The scalar input ``LEARNING_RATE``, the flat
        weights ``FLAT_WEIGHTS`` and state vectors ``flat_state_name(s)``
        are added, and the gradients it does not define become inputs of
        their weight's shape.
    problem : TrainingProblem
    gradients : dict of str -> str
        Weight -> name of its gradient in ``graph``.

    Returns
    -------
    list of onnx.ValueInfoProto
        The outputs ``new_name(FLAT_WEIGHTS)``, then ``new_name`` of each
        flat state vector.
    """
    dtype, elem = problem.dtype, onnx_elem_type(problem.dtype)
    size = sum(int(np.prod(problem.weight_shapes[w])) for w in problem.weight_names)
    defined = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    flat_parts = []
    for weight in problem.weight_names:
        name = gradients[weight]
        shape = list(problem.weight_shapes[weight])
        if name not in defined:
            graph.input.append(helper.make_tensor_value_info(name, elem, shape))
        if len(shape) != 1:
            name = append_piece(graph, parse_piece(_FLATTEN_TEXT, dtype),
                                f"onnxfit.flatten.{weight}.", {"value": name})["flat"]
        flat_parts.append(name)
    if len(flat_parts) == 1:
        flat_gradient = flat_parts[0]
    else:
        flat_gradient = FLAT_GRADIENT
        graph.node.append(helper.make_node(
            "Concat", flat_parts, [FLAT_GRADIENT], name="onnxfit.concat_gradients", axis=0
        ))
    graph.input.append(scalar_input(LEARNING_RATE, dtype))
    graph.input.append(helper.make_tensor_value_info(FLAT_WEIGHTS, elem, [size]))
    mapping = {"weight": FLAT_WEIGHTS, "gradient": flat_gradient, "learning_rate": LEARNING_RATE}
    out_names = {"new_weight": new_name(FLAT_WEIGHTS)}
    for state in problem.state_names:
        graph.input.append(helper.make_tensor_value_info(flat_state_name(state), elem, [size]))
        mapping[state] = flat_state_name(state)
        out_names["new_" + state] = new_name(flat_state_name(state))
    append_piece(graph, problem.learning_rate.update_piece(dtype), "onnxfit.update.",
                 mapping, out_names)
    return [helper.make_tensor_value_info(name, elem, [size]) for name in out_names.values()]


def bind_output_array(binding, name, array):
    """Bind the output ``name`` of an IO binding to ``array``'s memory."""
    binding.bind_output(
        name,
        device_type="cpu",
        device_id=0,
        element_type=array.dtype,
        shape=array.shape,
        buffer_ptr=array.ctypes.data,
    )


class BatchBuffers:
    """Fixed, pre-allocated buffers for one batch size.

    Each shuffled batch is gathered into the same memory
    (``np.take(..., out=...)``), which onnxruntime reads through IO binding:
    no copy of the whole data set per epoch, no allocation per step.
    """

    def __init__(self, problem, batch_size):
        self.size = batch_size
        self.problem = problem
        self.X = None
        self.label = None
        self.sample_weight = None

    def allocate(self, n_features):
        """Allocate the buffers for data ``n_features`` wide."""
        problem = self.problem
        self.X = np.empty((self.size, n_features), dtype=problem.input_dtype)
        self.label = np.empty((self.size,) + tuple(problem.label_shape), dtype=problem.dtype)
        # The losses take the weights divided by the batch size and shaped to
        # broadcast against the prediction (see onnxfit.losses).
        self.sample_weight = np.full(
            (self.size,) + (1,) * len(problem.label_shape), 1.0 / self.size, dtype=problem.dtype
        )
        self._weight_column = self.sample_weight.reshape(self.size)  # a view
        self.uniform_weights = True
        self._one_hot_rows = None  # made when labels come as column indices
        self._label_index = None

    def gather(self, X, label, sample_weight, indices):
        """Copy the rows ``indices`` into the buffers.

        ``sample_weight=None`` means uniform weights: the buffer keeps
        ``1 / batch_size`` instead of being gathered at every step.
        """
        # mode="clip" avoids numpy's extra buffering of mode="raise" (the
        # indices come from a permutation, so they are always in range); the
        # ndarray method skips np.take's Python wrapper, which costs about as
        # much as gathering a small batch.
        X.take(indices, axis=0, out=self.X, mode="clip")
        if label.dtype.kind in "iu":  # column indices of one-hot labels
            if self._label_index is None or self._label_index.dtype != label.dtype:
                self._label_index = np.empty(self.size, dtype=label.dtype)
                shape = tuple(self.problem.label_shape)
                width = int(np.prod(shape))
                self._one_hot_rows = np.eye(width, dtype=self.problem.dtype).reshape(
                    (width,) + shape)
            label.take(indices, axis=0, out=self._label_index, mode="clip")
            self._one_hot_rows.take(self._label_index, axis=0, out=self.label, mode="clip")
        else:
            label.take(indices, axis=0, out=self.label, mode="clip")
        column = self._weight_column
        if sample_weight is None:
            if not self.uniform_weights:
                column.fill(1.0 / self.size)
                self.uniform_weights = True
        else:
            sample_weight.take(indices, axis=0, out=column, mode="clip")
            column *= 1.0 / self.size
            self.uniform_weights = False


class WeightSet:
    """The weights and the update-rule state of a model, each a flat vector.

    The update rule reads and writes flat vectors (:func:`append_updates`);
    the model reads each weight as its own tensor, a view into the flat
    vector (no copy: onnxruntime reads the same memory).

    Parameters
    ----------
    problem : TrainingProblem

    Attributes
    ----------
    flat : dict
        ``FLAT_WEIGHTS`` and each ``flat_state_name(s)`` -> 1-D array.
    views : dict
        Each weight name and ``state_value_name(weight, s)`` -> view of the
        weight's shape into the flat vectors.
    """

    def __init__(self, problem):
        sizes = [int(np.prod(problem.weight_shapes[w])) for w in problem.weight_names]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.flat, self.views = {}, {}
        for key, state in [(FLAT_WEIGHTS, None)] + [
            (flat_state_name(s), s) for s in problem.state_names
        ]:
            flat = np.zeros(int(offsets[-1]), dtype=problem.dtype)
            self.flat[key] = flat
            for weight, start, stop in zip(problem.weight_names, offsets[:-1], offsets[1:]):
                name = weight if state is None else state_value_name(weight, state)
                self.views[name] = flat[start:stop].reshape(problem.weight_shapes[weight])


class BaseEngine:
    """Interface of the training engines.

    Parameters
    ----------
    problem : TrainingProblem
    """

    def __init__(self, problem):
        self.problem = problem
        self._buffers = {}
        # Two sets of weights/state buffers: a step reads set ``_parity`` and
        # writes the other one.  Writing in place would be wrong, since
        # onnxruntime may update a weight before a backward node that still
        # reads the old value.
        self._sets = [WeightSet(problem), WeightSet(problem)]
        self._parity = 0

    def set_state(self, weights, states):
        """Copy weights and update-rule state into the engine.

        Parameters
        ----------
        weights : dict of str -> ndarray
        states : dict of str -> dict of str -> ndarray
            ``states[weight][state_name]``.
        """
        current = self._sets[0].views
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
        """Copies of the current weights and update-rule state."""
        current = self._sets[self._parity].views
        weights = {w: current[w].copy() for w in self.problem.weight_names}
        states = {
            w: {s: current[state_value_name(w, s)].copy() for s in self.problem.state_names}
            for w in self.problem.weight_names
        }
        return weights, states

    def _bind_update_rule(self, binding, parity):
        """Bind what the update rule reads from set ``parity`` and writes to
        the other set."""
        for name, array in self._sets[parity].flat.items():
            binding.bind_cpu_input(name, array)
        for name, array in self._sets[1 - parity].flat.items():
            bind_output_array(binding, new_name(name), array)

    def run_epoch(self, X, label, sample_weight, order, batch_size, rates):
        """Run one pass of mini-batch updates.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features), input dtype, C-contiguous
        label : ndarray of shape (n_samples,) + label_shape, or of integers
            Labels in the problem's dtype, or, for one-hot labels, the
            position of each sample's 1 in its flattened label (an integer
            array of shape (n_samples,)): the one-hot rows are then made
            batch by batch, never for the whole data.
        sample_weight : ndarray of shape (n_samples,) or None
            None means uniform weights.
        order : ndarray of int
            Sample indices in the order of this epoch.
        batch_size : int
        rates : ndarray of shape (n_batches,)
            Learning rate of each update.

        Returns
        -------
        float
            Mean loss (penalty included) over the samples of the epoch.
        """
        n = len(order)
        n_features = X.shape[1]
        n_full = n // batch_size
        # Full batches, then the last, partial one: one set of buffers each,
        # looked up once, so that a step is a gather, a rate and a run.
        spans = [(batch_size, 0, n_full), (n - n_full * batch_size, n_full, n_full + 1)]
        rates = np.asarray(rates).tolist()
        rate, loss, step_fn = self._rate, self._step_loss, self._step
        total = 0.0
        for size, first, last in spans:
            if size == 0 or first == last:
                continue
            buffers = self._batch_buffers(size, n_features)
            gather = buffers.gather
            span_total = 0.0
            parity = self._parity
            for step in range(first, last):
                start = step * batch_size
                gather(X, label, sample_weight, order[start:start + size])
                rate[()] = rates[step]
                step_fn(buffers, parity)
                # Kept current at every step: an interrupted epoch still
                # hands back the last weights written.
                self._parity = parity = parity ^ 1
                span_total += float(loss)
            total += span_total * size
        return total / n

    def _step(self, buffers, parity):
        """One update on the gathered batch: read weight set ``parity``,
        write the other one, and the objective into ``_step_loss``."""
        raise NotImplementedError

    def _batch_buffers(self, size, n_features):
        """Bound buffers for batches of ``size`` rows (built on first use).

        An epoch needs two sizes at most (the batch size and the last,
        partial batch); partial_fit calls on chunks of varying length bring
        new remainders, so only the two most recently used sizes are kept.
        """
        buffers = self._buffers.pop(size, None)
        if buffers is None or buffers.X.shape[1] != n_features:
            buffers = BatchBuffers(self.problem, size)
            buffers.allocate(n_features)
            self._bind_batch(buffers)
            while len(self._buffers) >= 2:
                del self._buffers[next(iter(self._buffers))]
        self._buffers[size] = buffers  # most recently used last
        return buffers

    def _bind_batch(self, buffers):
        """Bind new batch buffers to the engine's sessions."""
        raise NotImplementedError
