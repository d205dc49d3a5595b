"""Penalties on the weights, each written once as a small ONNX graph.

With scikit-learn's meaning of ``alpha`` and ``l1_ratio``, the elastic-net
penalty of a weight tensor ``W`` is

.. math:: \\alpha \\left(\\rho \\|W\\|_1 + \\frac{1 - \\rho}{2} \\|W\\|_2^2\\right)

(``l2`` is ``rho = 0``, ``l1`` is ``rho = 1``).  It is added to the loss, and
its gradient comes out of the same differentiation as the model's.  By
default it applies to weight tensors of rank >= 2 only, not to biases.

The piece works on every weight at once, laid end to end in one flat
vector (as the update rules do): per-position scales hold the penalty's
coefficients where a weight is penalized and 0 elsewhere, so a few kernels
over one vector compute the penalty and its gradient for the whole model.
"""

import numpy as np
from sklearn.base import BaseEstimator

from .onnx_graphs import parse_piece

_L1_LINES = """
    scaled1 = Mul(weight, l1_scale)
    magnitude = Abs(scaled1)
    l1 = ReduceSum<keepdims = 0>(magnitude)
"""

_L2_LINES = """
    scaled2 = Mul(weight, l2_root)
    l2 = ReduceSumSquare<keepdims = 0>(scaled2)
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

    def _terms(self):
        ratio = float(self.l1_ratio)
        return [name for name, used in (("l1", ratio > 0), ("l2", ratio < 1)) if used]

    def piece(self, dtype):
        """The penalty as a graph on the flat weight vector.

        Inputs: ``weight`` (every weight laid end to end), and the
        per-position coefficients :meth:`scales` gives (``l1_scale`` and/or
        ``l2_root``); output: the scalar ``penalty``,
        ``sum(|l1_scale w|) + sum((l2_root w)^2)``.

        Returns
        -------
        onnx.GraphProto
        """
        terms = self._terms()
        inputs = ", ".join(["{T}[] weight"] + [
            "{T}[] l1_scale" if t == "l1" else "{T}[] l2_root" for t in terms])
        lines = "".join(_L1_LINES if t == "l1" else _L2_LINES for t in terms)
        total = "penalty = Add(l1, l2)" if len(terms) == 2 else f"penalty = Identity({terms[0]})"
        text = f"""
penalty_graph ({inputs}) => ({{T}} penalty) {{{{
{lines}
    {total}
}}}}
"""
        return parse_piece(text, dtype)

    def scales(self, mask, dtype):
        """Per-position coefficients for the inputs of :meth:`piece`.

        Parameters
        ----------
        mask : ndarray of shape (n_weights,)
            1 where the weight is penalized (see :meth:`applies_to`), 0 elsewhere.
        dtype : numpy dtype

        Returns
        -------
        dict of str -> ndarray
            ``l1_scale = alpha l1_ratio mask``, ``l2_root = sqrt(alpha (1 -
            l1_ratio) / 2) mask`` (only the terms the penalty has).
        """
        mask = np.asarray(mask, dtype=np.float64)
        coefficients = {
            "l1": ("l1_scale", self.alpha * self.l1_ratio),
            "l2": ("l2_root", np.sqrt(0.5 * self.alpha * (1.0 - self.l1_ratio))),
        }
        return {
            coefficients[t][0]: (coefficients[t][1] * mask).astype(dtype)
            for t in self._terms()
        }


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
