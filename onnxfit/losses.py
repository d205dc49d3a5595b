"""Loss functions, each written once as a small ONNX graph.

A loss object turns the model's trained output (``prediction``), the
``label`` (same shape) and a per-sample ``sample_weight`` into one scalar:

.. math:: L = \\frac{1}{n} \\sum_i w_i \\sum_j \\ell(p_{ij}, y_{ij})

Subclasses only write the element-wise term :math:`\\ell` (graph text in
``onnx.parser`` syntax, see :mod:`onnxfit.onnx_graphs`); the reduction over
outputs and samples is shared.  Gradients are never written by hand: the
fused engine differentiates the loss together with the model, the
forward-backward engine differentiates the loss graph alone, both with
onnxruntime-training (:mod:`onnxfit.gradient`).

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
"""

from sklearn.base import BaseEstimator

from .onnx_graphs import parse_piece

_LOSS_TEMPLATE = """
loss_graph ({T}[] prediction, {T}[] label, {T}[N] sample_weight) => ({T} loss) {{
    {body}
    flat = Flatten<axis = 1>(elementwise)
    axis1 = Constant<value = int64[1] {{1}}>()
    per_sample = ReduceSum<keepdims = 0>(flat, axis1)
    weighted = Mul(per_sample, sample_weight)
    loss = ReduceMean<keepdims = 0>(weighted)
}}
"""


class BaseLoss(BaseEstimator):
    """Base class of losses: subclasses write the element-wise term only.

    Loss objects hold hyperparameters only (``get_params``/``set_params``
    work, so they can be searched by ``GridSearchCV``).
    """

    #: Whether the loss expects one-hot labels (classification).
    one_hot_labels = False

    def elementwise_body(self):
        """ONNX nodes computing ``elementwise`` from ``prediction`` and
        ``label``; ``{T}`` is the element type, ``{name}`` fields are filled
        from :meth:`constants`."""
        raise NotImplementedError

    def constants(self):
        """Hyperparameters substituted in :meth:`elementwise_body`."""
        return {}

    def piece(self, dtype):
        """The loss as a graph: ``(prediction, label, sample_weight) -> loss``.

        Parameters
        ----------
        dtype : numpy dtype
            float32 or float64, the type of the model's output.

        Returns
        -------
        onnx.GraphProto
        """
        body = self.elementwise_body()
        # The body is formatted together with the template: escape nothing,
        # fields are filled in one pass by parse_piece.
        text = _LOSS_TEMPLATE.replace("{body}", body)
        return parse_piece(text, dtype, **self.constants())


class SquaredLoss(BaseLoss):
    """Half squared error ``0.5 (p - y)^2``, as scikit-learn's SGD."""

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    d2 = Mul(d, d)
    half = Constant<value = {T} {{0.5}}>()
    elementwise = Mul(d2, half)
"""


class AbsoluteLoss(BaseLoss):
    """Absolute error ``|p - y|``."""

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    elementwise = Abs(d)
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
    shifted = Sub(a, eps)
    r = Relu(shifted)
    elementwise = Mul(r, r)
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
        return {"l1": self.l1_ratio, "l2": 0.5 * (1.0 - self.l1_ratio)}

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    a = Abs(d)
    d2 = Mul(d, d)
    c1 = Constant<value = {T} {{{l1}}}>()
    c2 = Constant<value = {T} {{{l2}}}>()
    t1 = Mul(a, c1)
    t2 = Mul(d2, c2)
    elementwise = Add(t1, t2)
"""


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
