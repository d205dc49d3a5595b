"""Penalties on the weights, each written once as a small ONNX graph.

With scikit-learn's meaning of ``alpha`` and ``l1_ratio``, the elastic-net
penalty of a weight tensor ``W`` is

.. math:: \\alpha \\left(\\rho \\|W\\|_1 + \\frac{1 - \\rho}{2} \\|W\\|_2^2\\right)

(``l2`` is ``rho = 0``, ``l1`` is ``rho = 1``).  It is added to the loss, so
its gradient, scaled by the learning rate like the loss gradient, comes out
of the same automatic differentiation.  By default it applies to weight
tensors of rank >= 2 only, not to biases.
"""

from sklearn.base import BaseEstimator

from .onnx_graphs import parse_piece

_PENALTY_TEXT = """
penalty_graph ({T}[] weight) => ({T} penalty) {{
    a = Abs(weight)
    l1 = ReduceSum<keepdims = 0>(a)
    w2 = Mul(weight, weight)
    l2 = ReduceSum<keepdims = 0>(w2)
    c1 = Constant<value = {T} {{{c1}}}>()
    c2 = Constant<value = {T} {{{c2}}}>()
    t1 = Mul(l1, c1)
    t2 = Mul(l2, c2)
    penalty = Add(t1, t2)
}}
"""


class ElasticNetPenalty(BaseEstimator):
    """Elastic-net penalty ``alpha (l1_ratio |W|_1 + (1 - l1_ratio)/2 |W|^2)``.

    Parameters
    ----------
    alpha : float, default=1e-4
        Strength of the penalty.
    l1_ratio : float, default=0.15
        Share of the L1 term (0: pure L2, 1: pure L1).
    include_biases : bool, default=False
        Penalise rank-0 and rank-1 tensors (biases) too.
    """

    def __init__(self, alpha=1e-4, l1_ratio=0.15, include_biases=False):
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.include_biases = include_biases

    def applies_to(self, shape):
        """Whether a weight of this shape is penalised."""
        return self.include_biases or len(shape) >= 2

    def piece(self, dtype):
        """The penalty as a graph ``weight -> penalty`` (a scalar).

        Returns
        -------
        onnx.GraphProto
        """
        return parse_piece(
            _PENALTY_TEXT,
            dtype,
            c1=self.alpha * self.l1_ratio,
            c2=0.5 * self.alpha * (1.0 - self.l1_ratio),
        )


def make_penalty(penalty, alpha, l1_ratio):
    """Resolve the estimator's ``penalty``/``alpha``/``l1_ratio`` parameters.

    Parameters
    ----------
    penalty : {'l2', 'l1', 'elasticnet'}, None or ElasticNetPenalty
    alpha, l1_ratio : float

    Returns
    -------
    ElasticNetPenalty or None
        None when nothing is penalised.
    """
    if penalty is None:
        return None
    if isinstance(penalty, ElasticNetPenalty):
        return penalty if penalty.alpha != 0 else None
    ratios = {"l2": 0.0, "l1": 1.0, "elasticnet": l1_ratio}
    if penalty not in ratios:
        raise ValueError(
            f"Unknown penalty {penalty!r}; choose one of {sorted(ratios)}, None "
            "or an ElasticNetPenalty object."
        )
    if alpha == 0:
        return None
    return ElasticNetPenalty(alpha=alpha, l1_ratio=ratios[penalty])
