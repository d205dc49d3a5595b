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


def state_value_name(weight, state):
    """Name of the update-rule state tensor ``state`` of ``weight``."""
    return f"{weight}.{state}"


def new_name(name):
    """Name of the updated value of ``name`` in the training graph."""
    return f"{name}.new"


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
        self.sample_weight = np.ones((self.size,), dtype=problem.dtype)
        self.uniform_weights = True

    def gather(self, X, label, sample_weight, indices):
        """Copy the rows ``indices`` into the buffers.

        ``sample_weight=None`` means uniform weights: the buffer is filled
        with ones once instead of being gathered at every step.
        """
        # mode="clip" avoids numpy's extra buffering of mode="raise" (the
        # indices come from a permutation, so they are always in range); the
        # ndarray method skips np.take's Python wrapper, which costs about as
        # much as gathering a small batch.
        X.take(indices, axis=0, out=self.X, mode="clip")
        label.take(indices, axis=0, out=self.label, mode="clip")
        if sample_weight is None:
            if not self.uniform_weights:
                self.sample_weight.fill(1)
                self.uniform_weights = True
        else:
            sample_weight.take(indices, axis=0, out=self.sample_weight, mode="clip")
            self.uniform_weights = False


class BaseEngine:
    """Interface of the training engines.

    Parameters
    ----------
    problem : TrainingProblem
    """

    def __init__(self, problem):
        self.problem = problem
        self._buffers = {}

    def set_state(self, weights, states):
        """Copy weights and update-rule state into the engine.

        Parameters
        ----------
        weights : dict of str -> ndarray
        states : dict of str -> dict of str -> ndarray
            ``states[weight][state_name]``.
        """
        raise NotImplementedError

    def get_state(self):
        """Copies of the current weights and update-rule state."""
        raise NotImplementedError

    def run_epoch(self, X, label, sample_weight, order, batch_size, rates):
        """Run one pass of mini-batch updates.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features), input dtype, C-contiguous
        label : ndarray of shape (n_samples,) + label_shape
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
        raise NotImplementedError

    def _batch_buffers(self, size, n_features):
        buffers = self._buffers.get(size)
        if buffers is None or buffers.X.shape[1] != n_features:
            buffers = BatchBuffers(self.problem, size)
            buffers.allocate(n_features)
            self._bind_batch(buffers)
            self._buffers[size] = buffers
        return buffers

    def _bind_batch(self, buffers):
        """Bind new batch buffers to the engine's sessions."""
        raise NotImplementedError
