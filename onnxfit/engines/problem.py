"""What a training engine is asked to do, and the names of what it adds.

A :class:`TrainingProblem` gathers everything both engines build their graphs
from: the model's forward graph, the weights, the loss, the penalty, the
update rule and the gradient backend.  The reserved names below are the
values the engines add around the model (labels, sample weights, the
learning rate, the loss, the flat weight and gradient vectors).
"""

from dataclasses import dataclass, field

import numpy as np
import onnx

#: Reserved names of the values the engines add around the model.
LABEL = "onnxfit.label"
SAMPLE_WEIGHT = "onnxfit.sample_weight"
LEARNING_RATE = "onnxfit.learning_rate"
LOSS = "onnxfit.loss"
DATA_LOSS = "onnxfit.data_loss"
PENALTY = "onnxfit.penalty"
#: The flat vector holding every trained weight, one after the other.
FLAT_WEIGHTS = "onnxfit.weights"
#: The flat vector of the objective's gradient, in the same order.
FLAT_GRADIENT = "onnxfit.gradient"


def state_value_name(weight, state):
    """Name of the update-rule state tensor ``state`` of ``weight``."""
    return f"{weight}.{state}"


def flat_state_name(state):
    """Name of the flat vector holding the update-rule state ``state``."""
    return state_value_name(FLAT_WEIGHTS, state)


def updated_name(name):
    """Name of the value that replaces ``name`` after a training step."""
    return f"{name}.new"


@dataclass
class TrainingProblem:
    """Everything an engine needs to build its graphs.

    Attributes
    ----------
    forward_model : onnx.ModelProto
        The model with inputs: the data inputs, the weights, then the
        Dropout masks and running statistics of ``masks`` and
        ``statistics``; outputs: ``output_name``, then the new value of each
        statistic (see :meth:`onnxfit.model.OnnxModel.forward_model` and
        :func:`onnxfit.training_mode.training_graph`).
    inputs : list of onnxfit.inputs.InputSpec
        The graph inputs fed from the data, with the per-sample shapes of the
        data (static).
    output_name : str
    weight_names : list of str
    weight_shapes : dict of str -> tuple
    dtype : numpy dtype
        Element type of the output, labels, weights and updates.
    label_shape : tuple
        Shape of one sample's label (the model output without its batch
        dimension).
    loss : onnxfit.losses.BaseLoss
    penalty : onnxfit.penalties.ElasticNetPenalty or None
    learning_rate : onnxfit.learning_rate.BaseLearningRate
    n_threads : int or None
    gradient_backend : str
        Name of the gradient backend (see :mod:`onnxfit.gradient`).
    masks : list of onnxfit.training_mode.DropoutMask
        Inputs the engine fills with a fresh Dropout mask at each step.
    statistics : dict of str -> str
        Running statistic (a graph input, not trained) -> output holding its
        new value after a step.
    statistic_shapes : dict of str -> tuple
    device : onnxfit.sessions.Device or None
        Where the engine's sessions run (None: the CPU).
    max_grad_norm : float or None
        Bound on the global L2 norm of the gradient (all weights together,
        penalty included), applied in the step graph before the update rule
        (``torch.nn.utils.clip_grad_norm_``); None: no clipping.
    penalized : list of str
        The weights the penalty applies to with a non-zero strength, in
        order (set from ``penalty``).
    """

    forward_model: onnx.ModelProto
    inputs: list
    output_name: str
    weight_names: list
    weight_shapes: dict
    dtype: np.dtype
    label_shape: tuple
    loss: object
    penalty: object
    learning_rate: object
    n_threads: object = None
    gradient_backend: str = "onnxfit"
    masks: list = field(default_factory=list)
    statistics: dict = field(default_factory=dict)
    statistic_shapes: dict = field(default_factory=dict)
    device: object = None
    max_grad_norm: object = None
    penalized: list = field(init=False)

    def __post_init__(self):
        self.dtype = np.dtype(self.dtype)
        if self.penalty is None:
            self.penalized = []
        else:
            # a per-name penalty can only be checked here, where the names are known
            self.penalty.check_names(self.weight_names)
            self.penalized = [
                n for n in self.weight_names
                if self.penalty.coefficients(n, self.weight_shapes[n]) is not None
            ]

    @property
    def input_names(self):
        """Names of the graph inputs fed from the data."""
        return [spec.name for spec in self.inputs]

    @property
    def state_names(self):
        """Names of the update rule's state tensors."""
        return tuple(self.learning_rate.state_names)

    @property
    def n_weights(self):
        """Number of trained values, all weights together."""
        return sum(int(np.prod(self.weight_shapes[w])) for w in self.weight_names)

    def weight_offsets(self):
        """``(start, stop)`` of each weight in the flat vectors, in order."""
        offsets, start = {}, 0
        for weight in self.weight_names:
            stop = start + int(np.prod(self.weight_shapes[weight]))
            offsets[weight] = (start, stop)
            start = stop
        return offsets

    def penalty_mask(self):
        """Each position's penalty coefficients in the flat weight vector.

        Built here, where the weights' names and offsets are known, so that
        one penalty piece serves weights of different strengths (see
        :meth:`onnxfit.penalties.BasePenalty.scales`, which reads it).

        Returns
        -------
        dict of str -> ndarray of shape (n_weights,)
            ``'alpha'``: the strength of the weight at that position, 0
            where it is not penalized; ``'l1_ratio'``: its L1 share (0 where
            it is not penalized).  float64, cast by the scales.
        """
        alpha = np.zeros(self.n_weights)
        ratio = np.zeros(self.n_weights)
        penalized = set(self.penalized)
        for weight, (start, stop) in self.weight_offsets().items():
            if weight in penalized:
                alpha[start:stop], ratio[start:stop] = self.penalty.coefficients(
                    weight, self.weight_shapes[weight])
        return {"alpha": alpha, "l1_ratio": ratio}
