"""Learning-rate schedules: the step size of each update.

A schedule holds hyperparameters only (scikit-learn style: its ``__init__``
stores them, ``get_params``/``set_params``/``clone`` work); everything a
training run changes lives in a :class:`ScheduleState` (plain data) owned by
the fitted estimator, so one schedule can be shared and is never mutated by
training.  An update rule (:mod:`onnxfit.learning_rate`) takes a schedule as
its ``schedule`` parameter, by name or as one of these objects, and supplies
the initial rate ``eta0``.

``t`` counts updates (mini-batches), from 1 for the first update of a fit.
The rate of update ``t`` is::

    rate(t) = warmup(t) * base(t)
    warmup(t) = min(1, t / warmup_steps)     (1 when warmup_steps == 0)

``base`` is the schedule's own formula, evaluated at the same ``t`` (as
``torch.optim.lr_scheduler.ChainedScheduler`` chains ``LinearLR`` with
another scheduler), except for :class:`CosineSchedule`, whose decay starts
after the warm-up (as ``transformers.get_cosine_schedule_with_warmup``): it
stays at ``eta0`` during the warm-up.

The warm-up factor ``t / warmup_steps`` is that of
``torch.optim.lr_scheduler.LinearLR(start_factor=1 / warmup_steps,
total_iters=warmup_steps - 1)``: the first update already moves, at
``eta0 / warmup_steps``, and update ``warmup_steps`` is the first at the full
rate.  (``transformers``' warm-up lambdas give ``(t - 1) / warmup_steps``:
the same ramp one update later, starting with a zero step.)

The schedules and their ``base(t)``:

* :class:`ConstantSchedule`: ``eta0``;
* :class:`InvScalingSchedule`: ``eta0 / t**power_t``;
* :class:`OptimalSchedule`: ``1 / (alpha (t0 + t - 1))`` (ignores ``eta0``);
* :class:`AdaptiveSchedule`: ``eta0 * decay``, ``decay`` divided by 5 each
  time training stops improving;
* :class:`CosineSchedule`: ``eta_min + (eta0 - eta_min) (1 + cos(pi k / T)) / 2``
  with ``k = t - 1 - warmup_steps`` the decay updates done before update
  ``t`` and ``T`` their total;
* :class:`StepSchedule`: ``eta0 * gamma**floor((t - 1) / step_size)``.

The first four are scikit-learn's ``SGDRegressor``/``SGDClassifier``
``learning_rate`` names, with the same ``t``: ``SGDRegressor`` starts its
count at 1 (``t_ = 1.0`` before the first sample) and takes one update per
sample.
"""

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator


@dataclass
class ScheduleState:
    """What a training run changes in a schedule.

    Attributes
    ----------
    t : int
        Number of updates done so far.
    decay : float
        Factor applied by :class:`AdaptiveSchedule` (divided by 5 each time
        training stalls).
    total_steps : int or None
        Number of updates the whole fit may take (``max_iter`` times the
        updates per epoch), set by the estimator before training; what
        :class:`CosineSchedule` ``(n_steps=None)`` decays over.
    """

    t: int = 0
    decay: float = 1.0
    total_steps: int | None = None


def _is_number(value):
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_count(value):
    return isinstance(value, Integral) and not isinstance(value, bool)


class BaseSchedule(BaseEstimator):
    """Base class of the schedules.

    Subclasses write :meth:`base_rates`, the schedule's formula, and may
    override :meth:`trigger_stopping` (only :class:`AdaptiveSchedule` does)
    and :meth:`_check` (calling ``super()._check()``).

    Parameters
    ----------
    warmup_steps : int, default=0
        Number of linear warm-up updates: update ``t <= warmup_steps`` takes
        ``t / warmup_steps`` of the schedule's rate.  0 for none.
    """

    def __init__(self, warmup_steps=0):
        self.warmup_steps = warmup_steps

    def _check(self):
        """Raise ValueError on a bad hyperparameter."""
        if not (_is_count(self.warmup_steps) and self.warmup_steps >= 0):
            raise ValueError(
                f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}."
            )

    def base_rates(self, t, eta0, state):
        """The schedule's formula, before warm-up.

        Parameters
        ----------
        t : ndarray of float64
            Update numbers (1-based).
        eta0 : float
            Initial learning rate of the update rule.
        state : ScheduleState
            Read only.

        Returns
        -------
        ndarray of float64, shaped like ``t``
        """
        raise NotImplementedError

    def warmup_factors(self, t):
        """``min(1, t / warmup_steps)`` (ones without warm-up).

        Parameters
        ----------
        t : ndarray of float64
            Update numbers (1-based).

        Returns
        -------
        ndarray of float64, shaped like ``t``
        """
        if not self.warmup_steps:
            return np.ones_like(t)
        return np.minimum(1.0, t / self.warmup_steps)

    def rates_at(self, t, eta0, state=None):
        """Learning rates of updates number ``t``; reads ``state``, never
        changes it.

        Parameters
        ----------
        t : array-like of float64
            Update numbers (1-based).
        eta0 : float
            Initial learning rate of the update rule.
        state : ScheduleState, default=None
            None for a fresh one (no adaptive decay, no ``total_steps``).

        Returns
        -------
        ndarray of float64, shaped like ``t``
        """
        self._check()
        t = np.asarray(t, dtype=np.float64)
        state = ScheduleState() if state is None else state
        return self.warmup_factors(t) * self.base_rates(t, float(eta0), state)

    def trigger_stopping(self, eta0, state, verbose=False):
        """Called when training stopped improving; return True to stop.

        Only :class:`AdaptiveSchedule` goes on (with a lower rate); the
        others stop at once and leave ``state`` alone.

        Parameters
        ----------
        eta0 : float
        state : ScheduleState
        verbose : bool, default=False

        Returns
        -------
        bool
        """
        return True


class ConstantSchedule(BaseSchedule):
    """``eta0`` at every update (scikit-learn's ``'constant'``).

    Parameters
    ----------
    warmup_steps : int, default=0
        Linear warm-up, see :class:`BaseSchedule`.
    """

    def base_rates(self, t, eta0, state):
        return np.full_like(t, eta0)


class InvScalingSchedule(BaseSchedule):
    """``eta0 / t**power_t`` (scikit-learn's ``'invscaling'``).

    Parameters
    ----------
    power_t : float, default=0.25
        Exponent (scikit-learn's ``SGDRegressor`` default).
    warmup_steps : int, default=0
        Linear warm-up, see :class:`BaseSchedule`.
    """

    def __init__(self, power_t=0.25, warmup_steps=0):
        super().__init__(warmup_steps=warmup_steps)
        self.power_t = power_t

    def _check(self):
        super()._check()
        if not _is_number(self.power_t):
            raise ValueError(f"power_t must be a real number, got {self.power_t!r}.")

    def base_rates(self, t, eta0, state):
        return eta0 / t**self.power_t


class OptimalSchedule(BaseSchedule):
    """Bottou's ``1 / (alpha (t0 + t - 1))``, as scikit-learn's SGD
    ``'optimal'``; it ignores ``eta0``.

    ``t0 = 1 / (typw alpha)`` with ``typw = sqrt(1 / sqrt(alpha))``, so that
    the first rate is ``typw``: scikit-learn divides ``typw`` by
    ``max(1, dloss(1, -typw))``, which is 1 for all its losses (their
    derivative there is negative).

    Parameters
    ----------
    alpha : float, default=1e-4
        Regularisation constant (scikit-learn uses the estimator's
        ``alpha``, even with ``penalty=None``).
    warmup_steps : int, default=0
        Linear warm-up, see :class:`BaseSchedule`.
    """

    def __init__(self, alpha=1e-4, warmup_steps=0):
        super().__init__(warmup_steps=warmup_steps)
        self.alpha = alpha

    def _check(self):
        super()._check()
        if not (_is_number(self.alpha) and self.alpha > 0):
            raise ValueError(f"The 'optimal' schedule needs alpha > 0, got {self.alpha!r}.")

    def t0(self):
        """The offset ``t0`` of the update count (float)."""
        typw = math.sqrt(1.0 / math.sqrt(self.alpha))
        return 1.0 / (typw * self.alpha)

    def base_rates(self, t, eta0, state):
        return 1.0 / (self.alpha * (self.t0() + t - 1.0))


class AdaptiveSchedule(BaseSchedule):
    """``eta0``, divided by 5 each time training stops improving
    (scikit-learn's ``'adaptive'``).

    The division is :meth:`trigger_stopping`'s; training stops once the
    rate is at most 1e-6, as scikit-learn's SGD.

    Parameters
    ----------
    warmup_steps : int, default=0
        Linear warm-up, see :class:`BaseSchedule`.
    """

    def base_rates(self, t, eta0, state):
        return np.full_like(t, eta0 * state.decay)

    def trigger_stopping(self, eta0, state, verbose=False):
        if eta0 * state.decay <= 1e-6:
            return True
        state.decay /= 5.0
        if verbose:
            print(f"Learning rate set to {eta0 * state.decay:g}")
        return False


class CosineSchedule(BaseSchedule):
    """Cosine decay from ``eta0`` to ``eta_min``, after the warm-up.

    With ``W = warmup_steps``, ``T = n_steps - W`` updates of decay and
    ``k = t - 1 - W`` (0 at the first update after the warm-up)::

        base(t) = eta0                                           t <= W
        base(t) = eta_min + (eta0 - eta_min) (1 + cos(pi k / T)) / 2   W < t <= n_steps
        base(t) = eta_min                                        t > n_steps

    Without warm-up this is ``torch.optim.lr_scheduler.CosineAnnealingLR
    (T_max=n_steps, eta_min=eta_min)`` stepped once per update (which would
    rise again after ``n_steps``; this one stays at ``eta_min``); with it,
    ``transformers.get_cosine_schedule_with_warmup(W, n_steps)`` for
    ``eta_min=0`` (whose warm-up is one update later, see
    :mod:`onnxfit.schedules`).  The last update of an ``n_steps``-update fit
    still has a rate above ``eta_min``, as in both.

    Parameters
    ----------
    n_steps : int, default=None
        Number of updates, warm-up included, at whose end the rate reaches
        ``eta_min``.  None for the whole fit: ``max_iter`` times the updates
        per epoch (``ScheduleState.total_steps``, set by the estimator).
    eta_min : float, default=0.0
        Final rate.
    warmup_steps : int, default=0
        Linear warm-up, see :class:`BaseSchedule`.
    """

    def __init__(self, n_steps=None, eta_min=0.0, warmup_steps=0):
        super().__init__(warmup_steps=warmup_steps)
        self.n_steps = n_steps
        self.eta_min = eta_min

    def _check(self):
        super()._check()
        if self.n_steps is not None and not (
            _is_count(self.n_steps) and self.n_steps > self.warmup_steps
        ):
            raise ValueError(
                "n_steps must be None or an integer > warmup_steps "
                f"({self.warmup_steps!r}), got {self.n_steps!r}."
            )
        if not (_is_number(self.eta_min) and self.eta_min >= 0):
            raise ValueError(f"eta_min must be a number >= 0, got {self.eta_min!r}.")

    def _total_steps(self, state):
        n_steps = self.n_steps if self.n_steps is not None else state.total_steps
        if n_steps is None:
            raise ValueError(
                "CosineSchedule(n_steps=None) decays over the whole fit, whose length "
                "(ScheduleState.total_steps) is unknown here (partial_fit, or a rule "
                "used outside fit): give n_steps."
            )
        if n_steps <= self.warmup_steps:
            raise ValueError(
                f"The fit takes {n_steps} updates, not more than warmup_steps="
                f"{self.warmup_steps}: no update is left for the cosine decay."
            )
        return n_steps

    def base_rates(self, t, eta0, state):
        decay_steps = self._total_steps(state) - self.warmup_steps
        k = np.clip(t - 1.0 - self.warmup_steps, 0.0, decay_steps)
        cosine = 0.5 * (1.0 + np.cos(np.pi * k / decay_steps))
        return self.eta_min + (eta0 - self.eta_min) * cosine


class StepSchedule(BaseSchedule):
    """``eta0 * gamma**floor((t - 1) / step_size)``: the rate is multiplied
    by ``gamma`` every ``step_size`` updates, as
    ``torch.optim.lr_scheduler.StepLR`` stepped once per update.

    Parameters
    ----------
    step_size : int
        Number of updates between two decays.
    gamma : float, default=0.1
        Factor of each decay.
    warmup_steps : int, default=0
        Linear warm-up, see :class:`BaseSchedule` (it multiplies this
        schedule's rate at the same ``t``).
    """

    def __init__(self, step_size, gamma=0.1, warmup_steps=0):
        super().__init__(warmup_steps=warmup_steps)
        self.step_size = step_size
        self.gamma = gamma

    def _check(self):
        super()._check()
        if not (_is_count(self.step_size) and self.step_size >= 1):
            raise ValueError(f"step_size must be an integer >= 1, got {self.step_size!r}.")
        if not (_is_number(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a number > 0, got {self.gamma!r}.")

    def base_rates(self, t, eta0, state):
        return eta0 * self.gamma ** np.floor((t - 1.0) / self.step_size)


#: Schedules by name, for ``schedule='cosine'`` and the like: name ->
#: function of the update rule's ``power_t`` and ``alpha`` making the object.
SCHEDULES = {
    "constant": lambda power_t, alpha: ConstantSchedule(),
    "invscaling": lambda power_t, alpha: InvScalingSchedule(power_t=power_t),
    "optimal": lambda power_t, alpha: OptimalSchedule(alpha=alpha),
    "adaptive": lambda power_t, alpha: AdaptiveSchedule(),
    "cosine": lambda power_t, alpha: CosineSchedule(),
}


def make_schedule(schedule, power_t=0.25, alpha=1e-4):
    """Resolve a schedule name or object.

    Parameters
    ----------
    schedule : {'constant', 'invscaling', 'optimal', 'adaptive', 'cosine'} or BaseSchedule
        A name gives the schedule with ``power_t`` (``'invscaling'``) or
        ``alpha`` (``'optimal'``); ``'cosine'`` is ``CosineSchedule()``,
        over the whole fit.  An object is returned as is, after checking.
    power_t : float, default=0.25
    alpha : float, default=1e-4

    Returns
    -------
    BaseSchedule
    """
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(
                f"Unknown schedule {schedule!r}; choose one of {list(SCHEDULES)} "
                "or a BaseSchedule object."
            )
        schedule = SCHEDULES[schedule](power_t, alpha)
    elif not isinstance(schedule, BaseSchedule):
        raise TypeError(
            f"schedule must be one of {list(SCHEDULES)} or a BaseSchedule object, "
            f"got {schedule!r}."
        )
    schedule._check()
    return schedule
