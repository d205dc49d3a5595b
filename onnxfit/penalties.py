"""Penalties on the weights, each written once as a small ONNX graph.

With scikit-learn's meaning of ``alpha`` and ``l1_ratio``, the elastic-net
penalty of a weight tensor ``W`` is

.. math:: \\alpha \\left(\\rho \\|W\\|_1 + \\frac{1 - \\rho}{2} \\|W\\|_2^2\\right)

(``l2`` is ``rho = 0``, ``l1`` is ``rho = 1``).  It is added to the loss, and
its gradient comes out of the same differentiation as the model's.

Two penalty objects say which weights are penalized and how strongly:

* :class:`ElasticNetPenalty`, one ``alpha``/``l1_ratio`` for every weight
  tensor of rank >= 2 (biases too with ``include_biases=True``);
* :class:`WeightPenalties`, one entry per weight name (the estimator's
  ``penalty={'W0': 'l1', 'b0': None, ...}``), each with its own strength.

Both come down to the same math: the piece works on every weight at once,
laid end to end in one flat vector (as the update rules do), and
per-position scales hold each weight's own coefficients where it is
penalized and 0 elsewhere, so a few kernels over one vector compute the
penalty and its gradient for the whole model, whatever mix of strengths the
weights have.
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

#: Piece input holding each term's per-position coefficient.
_SCALE_NAMES = {"l1": "l1_scale", "l2": "l2_root"}


def _terms_of(l1_ratio):
    """The terms an elastic net with this ``l1_ratio`` has, of 'l1', 'l2'."""
    ratio = float(l1_ratio)
    return {name for name, used in (("l1", ratio > 0), ("l2", ratio < 1)) if used}


class BasePenalty(BaseEstimator):
    """What the engines use of a penalty: the piece and its scales.

    A subclass says which ``(alpha, l1_ratio)`` each weight has
    (:meth:`coefficients`); the piece and the per-position scales are
    written here once for every kind of penalty.
    """

    def coefficients(self, name, shape):
        """``(alpha, l1_ratio)`` of the weight ``name``, or None if not penalized."""
        raise NotImplementedError

    def check_names(self, weight_names):
        """Raise ValueError if the penalty names a weight not in ``weight_names``."""

    def _terms(self):
        """The terms of the piece, 'l1' before 'l2'."""
        raise NotImplementedError

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
        inputs = ", ".join(["{T}[] weight"] + [f"{{T}}[] {_SCALE_NAMES[t]}" for t in terms])
        lines = "".join(_L1_LINES if t == "l1" else _L2_LINES for t in terms)
        total = "penalty = Add(l1, l2)" if len(terms) == 2 else f"penalty = Identity({terms[0]})"
        text = f"""
penalty_graph ({inputs}) => ({{T}} penalty) {{{{
{lines}
    {total}
}}}}
"""
        return parse_piece(text, dtype)

    def scales(self, coefficients, dtype):
        """Per-position coefficients for the inputs of :meth:`piece`.

        Parameters
        ----------
        coefficients : dict
            ``'alpha'`` and ``'l1_ratio'``, two ndarrays of shape
            (n_weights,): each position's own strength (0 where its weight
            is not penalized) and L1 share (see
            :meth:`onnxfit.engines.problem.TrainingProblem.penalty_mask`).
        dtype : numpy dtype

        Returns
        -------
        dict of str -> ndarray
            ``l1_scale = alpha l1_ratio``, ``l2_root = sqrt(alpha (1 -
            l1_ratio) / 2)``, position by position (only the terms the
            penalty has).
        """
        alpha = np.asarray(coefficients["alpha"], dtype=np.float64)
        ratio = np.asarray(coefficients["l1_ratio"], dtype=np.float64)
        values = {
            "l1": alpha * ratio,
            # clipped: a ratio of 1 may leave -0.0 or a rounding below 0
            "l2": np.sqrt(np.maximum(0.5 * alpha * (1.0 - ratio), 0.0)),
        }
        return {_SCALE_NAMES[t]: values[t].astype(dtype) for t in self._terms()}


class ElasticNetPenalty(BasePenalty):
    """Elastic-net penalty ``alpha (l1_ratio |W|_1 + (1 - l1_ratio)/2 |W|^2)``.

    Parameters
    ----------
    alpha : float, default=1e-4
        Strength of the penalty.
    l1_ratio : float, default=0.15
        Share of the L1 term (0: pure L2, 1: pure L1).
    include_biases : bool, default=False
        Penalise rank-0 and rank-1 tensors (biases) too.  Ignored for an
        entry of :class:`WeightPenalties`, which names the weight it applies
        to.
    """

    def __init__(self, alpha=1e-4, l1_ratio=0.15, include_biases=False):
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.include_biases = include_biases

    def applies_to(self, shape):
        """Whether a weight of this shape is penalised."""
        return self.include_biases or len(shape) >= 2

    def coefficients(self, name, shape):
        """``(alpha, l1_ratio)`` for weights it applies to; None otherwise or if alpha is 0."""
        if self.alpha == 0 or not self.applies_to(shape):
            return None
        return float(self.alpha), float(self.l1_ratio)

    def _terms(self):
        return sorted(_terms_of(self.l1_ratio))


class WeightPenalties(BasePenalty):
    """One elastic-net penalty per weight name, each with its own strength.

    What the estimator's ``penalty={'W0': 'l1', 'b0': None, ...}`` becomes
    (see :func:`make_penalty`).  Only the weights named are penalized, at
    any rank (naming a bias says it is wanted); the others are not.  There
    is no default entry for the weights left out: name each weight to
    penalize.

    Parameters
    ----------
    penalties : dict of str -> ElasticNetPenalty or None
        The penalty of each named weight; None (or an ``alpha`` of 0)
        leaves it unpenalized.  An entry's ``include_biases`` is ignored.
        Not modified.
    """

    def __init__(self, penalties):
        self.penalties = penalties

    def coefficients(self, name, shape):
        """``(alpha, l1_ratio)`` of the weight's entry; None if unnamed, None or alpha 0."""
        entry = self.penalties.get(name)
        if entry is None or entry.alpha == 0:
            return None
        return float(entry.alpha), float(entry.l1_ratio)

    def check_names(self, weight_names):
        """Raise ValueError naming the entries that are not trained weights."""
        known = set(weight_names)
        unknown = [name for name in self.penalties if name not in known]
        if unknown:
            raise ValueError(
                f"penalty names weight(s) {unknown} that are not trained; the trained "
                f"weights are {list(weight_names)}."
            )

    def _terms(self):
        # the union of the entries' terms: a weight without one of them gets
        # a scale of 0 there (see scales)
        used = set()
        for entry in self.penalties.values():
            if entry is not None and entry.alpha != 0:
                used |= _terms_of(entry.l1_ratio)
        return sorted(used)


_CHOICES = "'l2', 'l1', 'elasticnet', None or an ElasticNetPenalty object"


def _resolve(penalty, alpha, l1_ratio, where):
    """One named penalty as an ElasticNetPenalty (None when not penalized)."""
    if penalty is None or isinstance(penalty, ElasticNetPenalty):
        return penalty
    ratios = {"l2": 0.0, "l1": 1.0, "elasticnet": l1_ratio}
    if not isinstance(penalty, str) or penalty not in ratios:
        raise ValueError(f"Unknown penalty {penalty!r}{where}; choose one of {_CHOICES}.")
    return ElasticNetPenalty(alpha=alpha, l1_ratio=ratios[penalty])


def make_penalty(penalty, alpha, l1_ratio):
    """Resolve the estimator's ``penalty``/``alpha``/``l1_ratio`` parameters.

    Parameters
    ----------
    penalty : {'l2', 'l1', 'elasticnet'}, None, ElasticNetPenalty, dict or WeightPenalties
        A dict maps weight names to any of the other choices but a dict
        (see :class:`WeightPenalties`): a name's string uses ``alpha`` and
        ``l1_ratio``, an object its own.  The names are checked against the
        trained weights by :class:`~onnxfit.engines.problem.TrainingProblem`.
    alpha, l1_ratio : float

    Returns
    -------
    BasePenalty or None
        None when nothing is penalised; a :class:`WeightPenalties` (on a new
        dict) for a dict.

    Raises
    ------
    ValueError
        For an unknown penalty, or a dict entry that is neither a choice
        above nor keyed by a string (the message names the key).
    """
    if isinstance(penalty, WeightPenalties):
        return penalty
    if isinstance(penalty, dict):
        resolved = {}
        for name, entry in penalty.items():
            if not isinstance(name, str):
                # ValueError as for any bad parameter value (scikit-learn's usage)
                raise ValueError(  # noqa: TRY004
                    f"penalty dict keys are weight names (str), got {name!r}.")
            resolved[name] = _resolve(entry, alpha, l1_ratio, f" for weight {name!r}")
        return WeightPenalties(resolved)
    penalty = _resolve(penalty, alpha, l1_ratio, "")
    if penalty is None or penalty.alpha == 0:
        return None
    return penalty
