"""Loss functions, each written once as a small ONNX graph.

A loss object turns the model's trained output (``prediction``), the
``label`` (same shape) and per-sample weights into one scalar:

.. math:: L = \\sum_i s_i \\sum_j \\ell(p_{ij}, y_{ij}),
   \\qquad s_i = w_i / n

The graphs take the weights already divided by the number of samples in the
batch (``sample_weight`` holds :math:`s_i`, shaped ``(n, 1, ..., 1)`` to
broadcast against the prediction): the engines prepare that buffer once per
batch size, which keeps a mean and its gradient out of every training step.

Subclasses write the element-wise term :math:`\\ell` (graph text in
``onnx.parser`` syntax, see :mod:`onnxfit.onnx_graphs`); the reduction over
outputs and samples is shared.  A loss may also write the element-wise
derivative :math:`\\partial \\ell / \\partial p` (:meth:`BaseLoss.derivative_body`):
the built-in ones do, since a closed form takes a handful of kernels where
an automatic derivative takes dozens, and each is tested against the
automatic derivative of its own value.  A loss without one is differentiated
through the gradient seam (:func:`loss_gradient_model`).

Writing a custom loss
---------------------
Subclass :class:`BaseLoss`, store hyperparameters in ``__init__`` and
implement :meth:`BaseLoss.elementwise_body`, a list of ONNX nodes computing
``elementwise`` from ``prediction`` and ``label``::

    class LogCoshLoss(BaseLoss):
        def elementwise_body(self):
            return '''
                d = Sub(prediction, label)
                elementwise = ...
            '''

Its derivative is then computed by :func:`onnxfit.gradient.build_vjp`;
writing :meth:`BaseLoss.derivative_body` as well makes training faster.
"""

from onnx import helper
from sklearn.base import BaseEstimator

from .onnx_graphs import (
    OPSET,
    onnx_elem_type,
    parse_piece,
    piece_model,
    rename_value,
    set_outputs,
)

#: Bound on the derivative of the squared terms, as scikit-learn's SGD
#: (``MAX_DLOSS``): a diverging fit (unscaled data, too large a rate) stays
#: finite instead of overflowing.  Written ``0.5 d clip(d)``, whose value is
#: ``0.5 d^2`` and whose derivative is ``d`` as long as ``|d| <= MAX_DLOSS``.
MAX_DLOSS = 1e12

# Lines computing d2 = d * clip(d, -MAX_DLOSS, MAX_DLOSS) from d.
_BOUNDED_SQUARE = """
    max_dloss = Constant<value = {T} {{{max_dloss}}}>()
    min_dloss = Neg(max_dloss)
    d_clipped = Clip(d, min_dloss, max_dloss)
    d2 = Mul(d, d_clipped)
"""

# The weights come divided by the batch size and shaped to broadcast against
# the prediction (see the module docstring): the mean over samples is a sum.
_LOSS_TEMPLATE = """
loss_graph ({T}[] prediction, {T}[] label, {T}[] sample_weight) => ({T} loss) {{
    {body}
    weighted = Mul(elementwise, sample_weight)
    loss = ReduceSum<keepdims = 0>(weighted)
}}
"""

_LOSS_AND_GRADIENT_TEMPLATE = """
loss_and_gradient ({T}[] prediction, {T}[] label, {T}[] sample_weight)
    => ({T} loss, {T}[] prediction_grad) {{
    {body}
    {derivative}
    weighted = Mul(elementwise, sample_weight)
    loss = ReduceSum<keepdims = 0>(weighted)
    prediction_grad = Mul(derivative, sample_weight)
}}
"""


# Each sample's loss: the element-wise terms summed over all but the batch axis.
_PER_SAMPLE_TEMPLATE = """
per_sample_loss ({T}[] prediction, {T}[] label) => ({T}[] losses) {{
    {body}
    rows = Flatten<axis = 1>(elementwise)
    axis = Constant<value = int64[1] {{1}}>()
    losses = ReduceSum<keepdims = 0>(rows, axis)
}}
"""


class BaseLoss(BaseEstimator):
    """Base class of losses: subclasses write the element-wise term.

    Loss objects hold hyperparameters only (``get_params``/``set_params``
    work, so they can be searched by ``GridSearchCV``).
    """

    def elementwise_body(self):
        """ONNX nodes computing ``elementwise`` from ``prediction`` and
        ``label``; ``{T}`` is the element type, ``{name}`` fields are filled
        from :meth:`constants`."""
        raise NotImplementedError

    def derivative_body(self):
        """ONNX nodes computing ``derivative``, the derivative of
        ``elementwise`` with respect to ``prediction``, or None.

        The nodes follow :meth:`elementwise_body` and may read any value it
        defines.  None (the default) differentiates :meth:`piece` instead
        (:func:`onnxfit.gradient.build_vjp`).
        """
        return None

    def constants(self):
        """Hyperparameters substituted in the bodies."""
        return {}

    def check_label_shape(self, label_shape):
        """Raise ValueError if the loss is undefined for outputs of one
        sample shaped ``label_shape``."""

    def prediction_shape(self, label_shape):
        """Declared shape of the prediction the loss reads, for one sample's
        label shaped ``label_shape``: ``['N', *label_shape]``."""
        return ["N"] + list(label_shape)

    def _parse(self, text, dtype):
        # The bodies are formatted together with the template: fields are
        # filled in one pass by parse_piece.
        text = text.replace("{body}", self.elementwise_body())
        return parse_piece(text, dtype, **{"max_dloss": MAX_DLOSS, **self.constants()})

    def piece(self, dtype):
        """The loss as a graph: ``(prediction, label, sample_weight) -> loss``.

        ``sample_weight`` holds each sample's weight divided by the number of
        samples in the batch, shaped ``(n, 1, ..., 1)`` to broadcast against
        the prediction (see the module docstring): the loss is their
        weighted sum.

        Parameters
        ----------
        dtype : numpy dtype
            float32 or float64, the type of the model's output.

        Returns
        -------
        onnx.GraphProto
        """
        return self._parse(_LOSS_TEMPLATE, dtype)

    def per_sample_piece(self, dtype):
        """Each sample's (unweighted) loss: ``(prediction, label) -> losses``
        of shape ``(n,)``, from the same element-wise term as :meth:`piece`.

        Returns
        -------
        onnx.GraphProto
        """
        return self._parse(_PER_SAMPLE_TEMPLATE, dtype)

    def gradient_piece(self, dtype):
        """The loss and its closed-form gradient, or None without one.

        Returns
        -------
        onnx.GraphProto or None
            ``(prediction, label, sample_weight) -> (loss, prediction_grad)``.
        """
        derivative = self.derivative_body()
        if derivative is None:
            return None
        text = _LOSS_AND_GRADIENT_TEMPLATE.replace("{derivative}", derivative)
        return self._parse(text, dtype)


def loss_gradient_model(loss, dtype, label_shape, closed_form=True, opset=OPSET,
                        backend="onnxfit"):
    """The loss and its gradient with respect to the prediction, as a model.

    Uses the loss's closed-form derivative when it has one, otherwise
    differentiates its value (:func:`onnxfit.gradient.build_vjp`).

    Parameters
    ----------
    loss : BaseLoss
    dtype : numpy dtype
        float32 or float64.
    label_shape : tuple
        Shape of one sample's prediction (without the batch dimension).
    closed_form : bool, default=True
        False differentiates the value even when the loss has a closed-form
        derivative (the reference the closed forms are tested against).
    opset : int, default=OPSET
        Opset of the model (the fused engine appends it to the user's graph,
        whose opset may be anything from 17 to the runtime's highest).
    backend : str, default='onnxfit'
        Gradient backend differentiating a loss without a closed form.

    Returns
    -------
    onnx.ModelProto
        Inputs ``prediction``, ``label`` (shape ``(N,) + label_shape``) and
        ``sample_weight`` (see the module docstring); outputs the scalar
        ``loss`` and ``prediction_grad``.
    """
    from .gradient import build_vjp

    loss.check_label_shape(tuple(label_shape))
    piece = loss.gradient_piece(dtype) if closed_form else None
    closed_form = piece is not None
    if not closed_form:
        piece = loss.piece(dtype)
    elem = onnx_elem_type(dtype)
    shape = loss.prediction_shape(label_shape)
    for value in piece.input:
        if value.name == "prediction":
            value.CopyFrom(helper.make_tensor_value_info(value.name, elem, shape))
        elif value.name == "label":
            value.CopyFrom(helper.make_tensor_value_info(
                value.name, elem, ["N"] + list(label_shape)))
        else:
            value.CopyFrom(helper.make_tensor_value_info(
                value.name, elem, ["N"] + [1] * len(label_shape)))
    outputs = [("loss", elem, [])] + ([("prediction_grad", elem, shape)] if closed_form else [])
    set_outputs(piece, outputs)
    model = piece_model(piece, opset=opset)
    if closed_form:
        return model
    result = build_vjp(model, {"loss": 1}, ["prediction"], backend=backend)
    model = result.model
    rename_value(model.graph, result.gradient_names["prediction"], "prediction_grad")
    # Report the loss in the element type of the closed forms.
    set_outputs(model.graph, outputs + [("prediction_grad", elem, shape)])
    return model


class SquaredLoss(BaseLoss):
    """Half squared error ``0.5 (p - y)^2``, as scikit-learn's SGD.

    Its derivative is bounded by :data:`MAX_DLOSS`, as in scikit-learn.
    """

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
""" + _BOUNDED_SQUARE + """
    half = Constant<value = {T} {{0.5}}>()
    elementwise = Mul(d2, half)
"""

    def derivative_body(self):
        return """
    derivative = Identity(d_clipped)
"""


class AbsoluteLoss(BaseLoss):
    """Absolute error ``|p - y|``."""

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    elementwise = Abs(d)
"""

    def derivative_body(self):
        return """
    derivative = Sign(d)
"""


class HuberLoss(BaseLoss):
    """Huber loss: quadratic below ``epsilon``, linear above.

    ``0.5 r^2`` if ``|r| <= epsilon`` else ``epsilon |r| - 0.5 epsilon^2``,
    written as ``0.5 m^2 + epsilon (|r| - m)`` with ``m = min(|r|, epsilon)``.

    Parameters
    ----------
    epsilon : float, default=0.1
    """

    def __init__(self, epsilon=0.1):
        self.epsilon = epsilon

    def constants(self):
        return {"epsilon": self.epsilon}

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    a = Abs(d)
    eps = Constant<value = {T} {{{epsilon}}}>()
    m = Min(a, eps)
    m2 = Mul(m, m)
    half = Constant<value = {T} {{0.5}}>()
    quadratic = Mul(m2, half)
    excess = Sub(a, m)
    linear = Mul(excess, eps)
    elementwise = Add(quadratic, linear)
"""

    def derivative_body(self):
        return """
    neg_eps = Neg(eps)
    derivative = Clip(d, neg_eps, eps)
"""


class EpsilonInsensitiveLoss(BaseLoss):
    """``max(0, |p - y| - epsilon)``, as in ``SGDRegressor``.

    Parameters
    ----------
    epsilon : float, default=0.1
    """

    def __init__(self, epsilon=0.1):
        self.epsilon = epsilon

    def constants(self):
        return {"epsilon": self.epsilon}

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    a = Abs(d)
    eps = Constant<value = {T} {{{epsilon}}}>()
    shifted = Sub(a, eps)
    elementwise = Relu(shifted)
"""

    def derivative_body(self):
        # sign(d) where |d| > epsilon, 0 elsewhere (elementwise >= 0).
        return """
    direction = Sign(d)
    outside = Sign(elementwise)
    derivative = Mul(direction, outside)
"""


class SquaredEpsilonInsensitiveLoss(BaseLoss):
    """``max(0, |p - y| - epsilon)^2``, as in ``SGDRegressor``.

    Parameters
    ----------
    epsilon : float, default=0.1
    """

    def __init__(self, epsilon=0.1):
        self.epsilon = epsilon

    def constants(self):
        return {"epsilon": self.epsilon}

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    a = Abs(d)
    eps = Constant<value = {T} {{{epsilon}}}>()
    max_dloss = Constant<value = {T} {{{max_dloss}}}>()
    min_dloss = Neg(max_dloss)
    shifted = Sub(a, eps)
    r = Relu(shifted)
    r_clipped = Clip(r, min_dloss, max_dloss)
    elementwise = Mul(r, r_clipped)
"""

    def derivative_body(self):
        return """
    direction = Sign(d)
    two = Constant<value = {T} {{2.0}}>()
    slope = Mul(r_clipped, two)
    derivative = Mul(slope, direction)
"""


class ElasticLoss(BaseLoss):
    """A mix of absolute and half squared error.

    ``l1_ratio |r| + (1 - l1_ratio) 0.5 r^2``: robust to outliers like the
    absolute error, smooth near zero like the squared error.

    Parameters
    ----------
    l1_ratio : float, default=0.5
    """

    def __init__(self, l1_ratio=0.5):
        self.l1_ratio = l1_ratio

    def constants(self):
        return {
            "l1": self.l1_ratio,
            "l2": 0.5 * (1.0 - self.l1_ratio),
            "l2_slope": 1.0 - self.l1_ratio,
        }

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    a = Abs(d)
""" + _BOUNDED_SQUARE + """
    c1 = Constant<value = {T} {{{l1}}}>()
    c2 = Constant<value = {T} {{{l2}}}>()
    t1 = Mul(a, c1)
    t2 = Mul(d2, c2)
    elementwise = Add(t1, t2)
"""

    def derivative_body(self):
        return """
    direction = Sign(d)
    c3 = Constant<value = {T} {{{l2_slope}}}>()
    g1 = Mul(direction, c1)
    g2 = Mul(d_clipped, c3)
    derivative = Add(g1, g2)
"""


_GRAPH_SCALAR_LOSS = """
graph_loss ({T}[] prediction, {T}[] label, {T}[] sample_weight)
    => ({T} loss, {T}[] prediction_grad) {{
    total_weight = ReduceSum<keepdims = 0>(sample_weight)
    loss = Mul(prediction, total_weight)
    prediction_grad = Identity(total_weight)
}}
"""


class GraphLoss(BaseLoss):
    """The loss a graph computes itself (``loss_output=`` of the estimators).

    The "prediction" this loss receives is the graph's own loss value: per
    sample (shape ``(n, ...)``), it is weighted and summed like every
    other loss, so sample weights apply; a scalar (already a mean over the
    batch) is taken as it is, and training refuses non-uniform sample
    weights for it.

    Parameters
    ----------
    per_sample : bool, default=True
        Whether the graph's loss has one value per sample.
    """

    def __init__(self, per_sample=True):
        self.per_sample = per_sample

    def elementwise_body(self):
        return "elementwise = Identity(prediction)"

    def derivative_body(self):
        return """
    one = Constant<value = {T} {{1.0}}>()
    prediction_shape = Shape(prediction)
    derivative = Expand(one, prediction_shape)
"""

    def prediction_shape(self, label_shape):
        return super().prediction_shape(label_shape) if self.per_sample else []

    def piece(self, dtype):
        if self.per_sample:
            return super().piece(dtype)
        piece = parse_piece(_GRAPH_SCALAR_LOSS, dtype)
        del piece.output[1:]
        return piece

    def gradient_piece(self, dtype):
        if self.per_sample:
            return super().gradient_piece(dtype)
        return parse_piece(_GRAPH_SCALAR_LOSS, dtype)


REGRESSION_LOSSES = {
    "squared_error": lambda epsilon: SquaredLoss(),
    "absolute_error": lambda epsilon: AbsoluteLoss(),
    "huber": lambda epsilon: HuberLoss(epsilon=epsilon),
    "epsilon_insensitive": lambda epsilon: EpsilonInsensitiveLoss(epsilon=epsilon),
    "squared_epsilon_insensitive": lambda epsilon: SquaredEpsilonInsensitiveLoss(
        epsilon=epsilon
    ),
    "elastic": lambda epsilon: ElasticLoss(),
}


def make_loss(loss, table, **kwargs):
    """Resolve a loss given as a string (a key of ``table``) or an object.

    Parameters
    ----------
    loss : str or BaseLoss
    table : dict
        Name -> factory taking ``**kwargs``.

    Returns
    -------
    BaseLoss
    """
    if isinstance(loss, str):
        if loss not in table:
            raise ValueError(
                f"Unknown loss {loss!r}; choose one of {sorted(table)} or pass a "
                "BaseLoss object."
            )
        return table[loss](**kwargs)
    if isinstance(loss, BaseLoss):
        return loss
    raise TypeError(
        f"loss must be a string or a BaseLoss instance, not {type(loss).__name__}."
    )


# -- classification --------------------------------------------------------------
# Labels of the classification losses are 0/1 floats shaped like the trained
# output: one column per class (one-hot), or a single column (1 for the
# positive class) when a binary problem is scored by one logit.  Margin losses
# map them to -1/+1 inside the graph.  Every term is written with operators
# both gradient backends differentiate (Relu, Abs, Exp, Log, LogSoftmax, Min,
# Max, ReduceSum with axes as an input) and that are valid from opset 17 on,
# since the fused engine appends the piece to the user's graph at the
# graph's own opset.


class SigmoidCrossEntropyLoss(BaseLoss):
    """Logistic loss on raw scores, one sigmoid per column.

    ``log(1 + exp(p)) - y p``, written ``max(p, 0) - y p + log(1 + exp(-|p|))``
    so that it stays finite for any score (no overflow of ``exp``).  With one
    column this is the binary log-loss of ``SGDClassifier``; with several
    columns it is its one-vs-rest objective.
    """

    def elementwise_body(self):
        return """
    positive = Relu(prediction)
    magnitude = Abs(prediction)
    negative = Neg(magnitude)
    exp_negative = Exp(negative)
    one = Constant<value = {T} {{1.0}}>()
    shifted = Add(exp_negative, one)
    softplus_rest = Log(shifted)
    label_score = Mul(label, prediction)
    softplus = Add(positive, softplus_rest)
    elementwise = Sub(softplus, label_score)
"""

    def derivative_body(self):
        return """
    probability = Sigmoid(prediction)
    derivative = Sub(probability, label)
"""


class SoftmaxCrossEntropyLoss(BaseLoss):
    """Multinomial log-loss on raw scores (logits), softmax over the last axis.

    ``-sum_j y_j log softmax(p)_j``, with ``LogSoftmax``, which shifts the
    scores by their largest before exponentiating, so it stays finite for
    any score.  Labels are one-hot (or any rows of weights).
    """

    def check_label_shape(self, label_shape):
        if len(label_shape) == 0 or label_shape[-1] < 2:
            raise ValueError(
                "SoftmaxCrossEntropyLoss needs one column of scores per class (two "
                f"or more), but the trained output has shape {('n',) + label_shape}: "
                "a softmax over one value is constant and nothing would train."
            )

    def elementwise_body(self):
        return """
    log_probability = LogSoftmax<axis = -1>(prediction)
    label_log_probability = Mul(label, log_probability)
    elementwise = Neg(label_log_probability)
"""

    def derivative_body(self):
        # softmax(p) * sum_j y_j - y (the sum is 1 for one-hot labels).
        return """
    softmax = Exp(log_probability)
    last_axis = Constant<value = int64[1] {{-1}}>()
    label_total = ReduceSum<keepdims = 1>(label, last_axis)
    expected = Mul(softmax, label_total)
    derivative = Sub(expected, label)
"""


class NegativeLogLikelihoodLoss(BaseLoss):
    """Log-loss of an output that already holds probabilities.

    ``-sum_j y_j log(max(p_j, eps))``: the probability of the true class is
    clipped from below, as ``sklearn.metrics.log_loss`` does, so a zero
    probability gives a large but finite loss.  Labels are one-hot.

    Parameters
    ----------
    eps : float, default=1e-7
        Smallest probability used in the logarithm.
    """

    def __init__(self, eps=1e-7):
        self.eps = eps

    def constants(self):
        return {"eps": self.eps}

    def elementwise_body(self):
        return """
    eps = Constant<value = {T} {{{eps}}}>()
    clipped = Max(prediction, eps)
    log_p = Log(clipped)
    label_log_p = Mul(label, log_p)
    elementwise = Neg(label_log_p)
"""

    def derivative_body(self):
        # -y / p where p > eps; 0 where the probability is clipped.
        return """
    ratio = Div(label, clipped)
    above = Greater(prediction, eps)
    kept = CastLike(above, ratio)
    kept_ratio = Mul(ratio, kept)
    derivative = Neg(kept_ratio)
"""


_SIGNED_LABEL = """
    two = Constant<value = {T} {{2.0}}>()
    one = Constant<value = {T} {{1.0}}>()
    double_label = Mul(label, two)
    sign = Sub(double_label, one)
    margin = Mul(sign, prediction)
"""


class HingeLoss(BaseLoss):
    """Hinge loss ``max(0, threshold - z)`` with ``z = y p``, ``y`` in {-1, +1}.

    As ``SGDClassifier(loss='hinge')`` (one-vs-rest over the columns).

    Parameters
    ----------
    threshold : float, default=1.0
    """

    def __init__(self, threshold=1.0):
        self.threshold = threshold

    def constants(self):
        return {"threshold": self.threshold}

    def elementwise_body(self):
        return _SIGNED_LABEL + """
    threshold = Constant<value = {T} {{{threshold}}}>()
    gap = Sub(threshold, margin)
    elementwise = Relu(gap)
"""

    def derivative_body(self):
        # -sign where margin <= threshold: at the kink too, as scikit-learn's
        # Hinge (with threshold=0 and zero weights, a 0 there never trains).
        return """
    within = LessOrEqual(margin, threshold)
    active = CastLike(within, margin)
    signed = Mul(sign, active)
    derivative = Neg(signed)
"""


class ModifiedHuberLoss(BaseLoss):
    """Modified Huber loss of ``SGDClassifier``, ``z = y p``, ``y`` in {-1, +1}.

    ``max(0, 1 - z)^2`` for ``z >= -1``, ``-4 z`` below; written with
    ``u = max(0, 1 - z)`` and ``m = min(u, 2)`` as ``m^2 + 4 (u - m)``.
    """

    def elementwise_body(self):
        return _SIGNED_LABEL + """
    gap = Sub(one, margin)
    u = Relu(gap)
    cap = Constant<value = {T} {{2.0}}>()
    m = Min(u, cap)
    quadratic = Mul(m, m)
    excess = Sub(u, m)
    four = Constant<value = {T} {{4.0}}>()
    linear = Mul(excess, four)
    elementwise = Add(quadratic, linear)
"""

    def derivative_body(self):
        # d/du (m^2 + 4 (u - m)) = 2 m, and du/dz = -1 wherever u > 0
        # (m = 0 elsewhere): the derivative is -2 m sign.
        return """
    minus_two = Constant<value = {T} {{-2.0}}>()
    slope = Mul(m, minus_two)
    derivative = Mul(slope, sign)
"""


def _log_loss(scores):
    return {
        "softmax": SoftmaxCrossEntropyLoss,
        "sigmoid": SigmoidCrossEntropyLoss,
        "probability": NegativeLogLikelihoodLoss,
    }[scores]()


#: Classification losses by name.  Factories take ``scores``, what the trained
#: output holds: ``'softmax'`` (logits of one softmax), ``'sigmoid'`` (one
#: logit per column: binary or one-vs-rest) or ``'probability'``.
CLASSIFICATION_LOSSES = {
    "log_loss": _log_loss,
    "hinge": lambda scores: HingeLoss(),
    "modified_huber": lambda scores: ModifiedHuberLoss(),
}
