"""Learning-rate objects: a schedule and an update rule.

Modelled on scikit-learn's ``neural_network/_stochastic_optimizers.py``:
one small class per update rule.  A learning-rate object holds
hyperparameters only; everything a training run changes (the update count,
the adaptive decay, velocities) lives in a :class:`ScheduleState` and in
state tensors owned by the fitted estimator, so one object can be shared by
several estimators (or be a default argument) and is never mutated by
``fit``.

The update rule is written once, as ONNX graph text
(:meth:`BaseLearningRate.update_piece`), and applied once to every weight
laid end to end in one flat vector: the fused engine appends it to its
training graph, the forward-backward engine runs it as its own small
session.

Writing a new update rule
-------------------------
Subclass :class:`BaseLearningRate`, list the per-weight state tensors in
``state_names`` and write :meth:`BaseLearningRate.update_body`: nodes that
compute ``new_weight`` and ``new_<state>`` for each state from ``weight``,
``gradient``, the scalar ``learning_rate`` and each ``<state>`` (state
tensors start as zeros shaped like the weight).  The engines feed no update
count: a rule that needs one keeps it as a state, as ``count`` below
(``new_count = Add(count, one)``).  For example, Adam
(``tests/test_learning_rate.py`` has the complete rule)::

    class LearningRateAdam(BaseLearningRate):
        state_names = ("m", "v", "count")

        def __init__(self, eta0=0.001, beta1=0.9, beta2=0.999, epsilon=1e-8,
                     schedule="constant", power_t=0.25, alpha=1e-4):
            super().__init__(eta0=eta0, schedule=schedule,
                             power_t=power_t, alpha=alpha)
            self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon

        def constants(self):
            return {"b1": self.beta1, "b2": self.beta2, "eps": self.epsilon, ...}

        def update_body(self):
            return '''
                ... new_m = ..., new_v = ..., new_weight = ...
            '''
"""

import math
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator

from .onnx_graphs import parse_piece

SCHEDULES = ("constant", "invscaling", "optimal", "adaptive")


@dataclass
class ScheduleState:
    """What a training run changes in a schedule.

    Attributes
    ----------
    t : int
        Number of updates done so far.
    decay : float
        Factor applied by the ``adaptive`` schedule (divided by 5 each time
        training stalls).
    """

    t: int = 0
    decay: float = 1.0


class BaseLearningRate(BaseEstimator):
    """Base class: a learning-rate schedule plus an update rule.

    Parameters
    ----------
    eta0 : float
        Initial learning rate.
    schedule : {'constant', 'invscaling', 'optimal', 'adaptive'}
        ``constant``: ``eta0``; ``invscaling``: ``eta0 / t**power_t``;
        ``optimal``: Bottou's ``1 / (alpha (t0 + t))`` as scikit-learn's SGD;
        ``adaptive``: ``eta0``, divided by 5 each time training stops
        improving (see :meth:`trigger_stopping`).  ``t`` counts updates
        (mini-batches), starting at 1.
    power_t : float
        Exponent of ``invscaling``.
    alpha : float
        Regularisation constant used by ``optimal``.
    """

    #: Names of the per-weight state tensors of the update rule.
    state_names = ()

    def __init__(self, eta0=0.01, schedule="invscaling", power_t=0.25, alpha=1e-4):
        self.eta0 = eta0
        self.schedule = schedule
        self.power_t = power_t
        self.alpha = alpha

    # -- schedule --------------------------------------------------------
    def _check(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"Unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}."
            )
        if not (isinstance(self.eta0, (int, float, np.number)) and self.eta0 > 0):
            raise ValueError(f"eta0 must be a positive number, got {self.eta0!r}.")
        if self.schedule == "optimal" and not self.alpha > 0:
            raise ValueError("The 'optimal' schedule needs alpha > 0.")

    def _optimal_t0(self):
        # Bottou's heuristic as in scikit-learn's SGD, with a loss derivative
        # bounded by 1 at the typical weight (true for hinge and log losses).
        typw = math.sqrt(1.0 / math.sqrt(self.alpha))
        return 1.0 / (typw * self.alpha)

    def rates(self, state, n_steps):
        """Learning rates of the next ``n_steps`` updates; advances ``state``.

        Parameters
        ----------
        state : ScheduleState
        n_steps : int

        Returns
        -------
        ndarray of shape (n_steps,), float64
        """
        self._check()
        t = np.arange(state.t + 1, state.t + n_steps + 1, dtype=np.float64)
        state.t += n_steps
        if self.schedule == "invscaling":
            rates = self.eta0 / t ** self.power_t
        elif self.schedule == "optimal":
            rates = 1.0 / (self.alpha * (self._optimal_t0() + t - 1.0))
        else:
            rates = np.full(n_steps, float(self.eta0))
        return rates * state.decay

    def __call__(self, t):
        """Learning rate of update number ``t`` (1-based), before any
        adaptive decay."""
        return float(self.rates(ScheduleState(t=int(t) - 1), 1)[0])

    def trigger_stopping(self, state, verbose=False):
        """Called when training stopped improving; return True to stop.

        The ``adaptive`` schedule divides the rate by 5 and goes on until it
        falls below 1e-6, as scikit-learn's ``SGDOptimizer`` does.
        """
        if self.schedule != "adaptive":
            return True
        if self.eta0 * state.decay <= 1e-6:
            return True
        state.decay /= 5.0
        if verbose:
            print(f"Learning rate set to {self.eta0 * state.decay:g}")
        return False

    # -- update rule -----------------------------------------------------
    def constants(self):
        """Hyperparameters substituted in :meth:`update_body`."""
        return {}

    def update_body(self):
        """ONNX nodes computing ``new_weight`` (and ``new_<state>``)."""
        raise NotImplementedError

    def initial_state(self, weight):
        """State tensors of a fresh run for ``weight`` (name -> zeros)."""
        return {name: np.zeros_like(weight) for name in self.state_names}

    def update_piece(self, dtype):
        """The update rule as a graph, element-wise on tensors of any shape
        (the engines give it every weight laid end to end).

        Inputs: ``weight``, ``gradient``, ``learning_rate`` (scalar) and one
        tensor per state; outputs: ``new_weight`` and ``new_<state>``.

        Returns
        -------
        onnx.GraphProto
        """
        state_in = "".join(f", {{T}}[] {s}" for s in self.state_names)
        state_out = "".join(f", {{T}}[] new_{s}" for s in self.state_names)
        text = (
            "update_graph ({T}[] weight, {T}[] gradient, {T} learning_rate"
            + state_in
            + ") => ({T}[] new_weight"
            + state_out
            + ") {{"
            + self.update_body()
            + "}}"
        )
        return parse_piece(text, dtype, **self.constants())


class LearningRateSGD(BaseLearningRate):
    """Plain SGD: ``W <- W - eta g``.

    Parameters
    ----------
    eta0 : float, default=0.01
    schedule : {'constant', 'invscaling', 'optimal', 'adaptive'}, default='invscaling'
    power_t : float, default=0.25
    alpha : float, default=1e-4
        Used by the ``optimal`` schedule only.
    """

    def update_body(self):
        return """
    step = Mul(learning_rate, gradient)
    new_weight = Sub(weight, step)
"""


class LearningRateSGDNesterov(BaseLearningRate):
    """SGD with momentum, Nesterov's by default (scikit-learn's formulas).

    ``v <- mu v - eta g``; the step is ``mu v - eta g`` (with the new ``v``)
    with Nesterov, ``v`` without.

    Parameters
    ----------
    eta0 : float, default=0.01
    momentum : float, default=0.9
    nesterov : bool, default=True
    schedule : {'constant', 'invscaling', 'optimal', 'adaptive'}, default='constant'
    power_t : float, default=0.25
    alpha : float, default=1e-4
    """

    state_names = ("velocity",)

    def __init__(
        self, eta0=0.01, momentum=0.9, nesterov=True, schedule="constant",
        power_t=0.25, alpha=1e-4,
    ):
        super().__init__(eta0=eta0, schedule=schedule, power_t=power_t, alpha=alpha)
        self.momentum = momentum
        self.nesterov = nesterov

    def _check(self):
        super()._check()
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}.")

    def constants(self):
        return {"momentum": self.momentum}

    def update_body(self):
        body = """
    mu = Constant<value = {T} {{{momentum}}}>()
    scaled_gradient = Mul(learning_rate, gradient)
    kept = Mul(mu, velocity)
    new_velocity = Sub(kept, scaled_gradient)
"""
        if self.nesterov:
            body += """
    ahead = Mul(mu, new_velocity)
    step = Sub(ahead, scaled_gradient)
    new_weight = Add(weight, step)
"""
        else:
            body += """
    new_weight = Add(weight, new_velocity)
"""
        return body


def make_learning_rate(learning_rate):
    """Resolve ``'sgd'``, ``'nesterov'`` or a :class:`BaseLearningRate`."""
    if isinstance(learning_rate, str):
        shortcuts = {"sgd": LearningRateSGD, "nesterov": LearningRateSGDNesterov}
        if learning_rate not in shortcuts:
            raise ValueError(
                f"Unknown learning_rate {learning_rate!r}; use 'sgd', 'nesterov' "
                "or a BaseLearningRate object."
            )
        return shortcuts[learning_rate]()
    if isinstance(learning_rate, BaseLearningRate):
        learning_rate._check()
        return learning_rate
    raise TypeError(
        "learning_rate must be 'sgd', 'nesterov' or a BaseLearningRate instance, "
        f"not {type(learning_rate).__name__}."
    )
