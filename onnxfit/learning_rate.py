"""Learning-rate objects: an update rule and its schedule.

Modelled on scikit-learn's ``neural_network/_stochastic_optimizers.py``:
one small class per update rule.  A learning-rate object holds
hyperparameters only; everything a training run changes (the update count,
the adaptive decay, velocities) lives in a :class:`ScheduleState` and in
state tensors owned by the fitted estimator, so one object can be shared by
several estimators (or be a default argument) and is never mutated by
``fit``.

Every rule takes ``eta0`` and a ``schedule``: one of scikit-learn's SGD
names (``'constant'``, ``'invscaling'``, ``'optimal'``, ``'adaptive'``,
meaning what they mean on ``SGDRegressor``, with the rule's ``power_t`` and
``alpha``), ``'cosine'``, or a schedule object of :mod:`onnxfit.schedules`
(``ConstantSchedule``, ``InvScalingSchedule``, ``OptimalSchedule``,
``AdaptiveSchedule``, ``CosineSchedule``, ``StepSchedule``, each with a
linear warm-up).  The schedule gives the rate of each update
(:meth:`BaseLearningRate.rates`), which the engines feed to the rule as its
``learning_rate`` input (torch's ``lr`` for the torch rules).
:func:`make_learning_rate` resolves an estimator's ``learning_rate`` name,
including scikit-learn's schedule names as plain SGD
(``learning_rate='optimal'`` is ``LearningRateSGD(schedule='optimal')``).

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
count: a rule that needs one keeps it as a state, as
:class:`LearningRateAdam` keeps ``step`` (``new_step = Add(step, one)``);
the rules below are the examples to follow, one small class each:
:class:`LearningRateSGD`, :class:`LearningRateSGDNesterov`,
:class:`LearningRateMomentum`, :class:`LearningRateAdam`,
:class:`LearningRateAdamW`, :class:`LearningRateRMSprop` and
:class:`LearningRateAdagrad` (the last five are ``torch.optim``'s, with its
defaults).
"""

import functools

import numpy as np
from sklearn.base import BaseEstimator

from .onnx_graphs import parse_piece
from .schedules import (
    ScheduleState,  # noqa: F401  (the estimators import it from here)
    make_schedule,
)


class BaseLearningRate(BaseEstimator):
    """Base class: a learning-rate schedule plus an update rule.

    Parameters
    ----------
    eta0 : float
        Initial learning rate.
    schedule : {'constant', 'invscaling', 'optimal', 'adaptive', 'cosine'} or BaseSchedule
        How the rate changes from update to update (see
        :mod:`onnxfit.schedules`).  ``constant``: ``eta0``; ``invscaling``:
        ``eta0 / t**power_t``; ``optimal``: Bottou's ``1 / (alpha (t0 + t -
        1))`` as scikit-learn's SGD; ``adaptive``: ``eta0``, divided by 5
        each time training stops improving (see :meth:`trigger_stopping`);
        ``cosine``: ``CosineSchedule()``, a cosine decay to 0 over the whole
        fit.  ``t`` counts updates (mini-batches), starting at 1.  An object
        (:class:`~onnxfit.schedules.CosineSchedule`,
        :class:`~onnxfit.schedules.StepSchedule`, ..., any with warm-up)
        brings its own hyperparameters.
    power_t : float
        Exponent of ``schedule='invscaling'`` (unused with an object).
    alpha : float
        Regularisation constant of ``schedule='optimal'`` (unused with an
        object).
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
        if not (isinstance(self.eta0, (int, float, np.number)) and self.eta0 > 0):
            raise ValueError(f"eta0 must be a positive number, got {self.eta0!r}.")
        self._get_schedule()

    def _get_schedule(self):
        """The schedule object ``schedule`` names (a new one from a name,
        made with ``power_t`` and ``alpha``), checked."""
        return make_schedule(self.schedule, power_t=self.power_t, alpha=self.alpha)

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
        rates = self._get_schedule().rates_at(t, self.eta0, state)
        state.t += n_steps
        return rates

    def __call__(self, t):
        """Learning rate of update number ``t`` (1-based) of a fresh run
        (before any adaptive decay)."""
        self._check()
        return float(self._get_schedule().rates_at([float(t)], self.eta0)[0])

    def trigger_stopping(self, state, verbose=False):
        """Called when training stopped improving; return True to stop.

        The ``adaptive`` schedule divides the rate by 5 and goes on until it
        falls below 1e-6, as scikit-learn's ``SGDOptimizer`` does; the other
        schedules stop at once.
        """
        self._check()
        return self._get_schedule().trigger_stopping(self.eta0, state, verbose)

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
    schedule : str or BaseSchedule, default='invscaling'
        A name or a schedule object, see :class:`BaseLearningRate`.
    power_t : float, default=0.25
        Used by ``schedule='invscaling'`` only.
    alpha : float, default=1e-4
        Used by ``schedule='optimal'`` only.
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
    schedule : str or BaseSchedule, default='constant'
        A name or a schedule object, see :class:`BaseLearningRate`.
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


def _decayed_gradient(weight_decay):
    """Nodes computing ``grad``: the gradient plus ``weight_decay * weight``
    (torch's L2 weight decay), or the gradient itself."""
    if not weight_decay:
        return """
    grad = Identity(gradient)
"""
    return """
    wd = Constant<value = {T} {{{weight_decay}}}>()
    decay_term = Mul(wd, weight)
    grad = Add(gradient, decay_term)
"""


def _check_range(name, value, low, high=None, high_closed=False):
    ok = isinstance(value, (int, float, np.number)) and value >= low
    if ok and high is not None:
        ok = value <= high if high_closed else value < high
    if not ok:
        bound = "" if high is None else (f", {high}]" if high_closed else f", {high})")
        interval = f"[{low}{bound}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")


class LearningRateMomentum(BaseLearningRate):
    """SGD with heavy-ball momentum, as ``torch.optim.SGD(momentum=mu)``
    (``dampening=0``).

    With ``g = gradient + weight_decay * W``::

        b <- mu b + g
        W <- W - eta b                 (nesterov=False)
        W <- W - eta (g + mu b)        (nesterov=True)

    The rate stays outside the buffer (torch's form), unlike
    :class:`LearningRateSGDNesterov` (scikit-learn's ``v <- mu v - eta g``);
    both agree under a constant rate.

    Parameters
    ----------
    eta0 : float, default=1e-3
        torch's ``lr``.
    momentum : float, default=0.9
    weight_decay : float, default=0.0
        L2 term added to the gradient (torch's ``weight_decay``).
    nesterov : bool, default=False
    schedule : str or BaseSchedule, default='constant'
        A name or a schedule object, see :class:`BaseLearningRate`.
    power_t : float, default=0.25
        Used by ``schedule='invscaling'`` only.
    alpha : float, default=1e-4
        Used by ``schedule='optimal'`` only.
    """

    state_names = ("momentum_buffer",)

    def __init__(
        self, eta0=1e-3, momentum=0.9, weight_decay=0.0, nesterov=False,
        schedule="constant", power_t=0.25, alpha=1e-4,
    ):
        super().__init__(eta0=eta0, schedule=schedule, power_t=power_t, alpha=alpha)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov

    def _check(self):
        super()._check()
        _check_range("momentum", self.momentum, 0, 1)
        _check_range("weight_decay", self.weight_decay, 0)

    def constants(self):
        return {"momentum": self.momentum, "weight_decay": self.weight_decay}

    def update_body(self):
        body = _decayed_gradient(self.weight_decay) + """
    mu = Constant<value = {T} {{{momentum}}}>()
    kept = Mul(mu, momentum_buffer)
    new_momentum_buffer = Add(kept, grad)
"""
        if self.nesterov:
            body += """
    ahead = Mul(mu, new_momentum_buffer)
    direction = Add(grad, ahead)
"""
        else:
            body += """
    direction = Identity(new_momentum_buffer)
"""
        return body + """
    delta = Mul(learning_rate, direction)
    new_weight = Sub(weight, delta)
"""


class LearningRateAdam(BaseLearningRate):
    """Adam, as ``torch.optim.Adam`` (bias-corrected, ``amsgrad=False``).

    With ``g = gradient + weight_decay * W`` and ``t`` the update count
    (kept as the state ``step``)::

        m <- beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g**2
        W <- W - eta / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t)) + epsilon)

    Parameters
    ----------
    eta0 : float, default=1e-3
        torch's ``lr``.
    beta1, beta2 : float, default=0.9, 0.999
        torch's ``betas``.
    epsilon : float, default=1e-8
        torch's ``eps``.
    weight_decay : float, default=0.0
        L2 term added to the gradient, as torch's Adam (see
        :class:`LearningRateAdamW` for decoupled decay).
    schedule : str or BaseSchedule, default='constant'
        A name or a schedule object, see :class:`BaseLearningRate`.
    power_t : float, default=0.25
        Used by ``schedule='invscaling'`` only.
    alpha : float, default=1e-4
        Used by ``schedule='optimal'`` only.
    """

    state_names = ("exp_avg", "exp_avg_sq", "step")

    def __init__(
        self, eta0=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.0,
        schedule="constant", power_t=0.25, alpha=1e-4,
    ):
        super().__init__(eta0=eta0, schedule=schedule, power_t=power_t, alpha=alpha)
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.weight_decay = weight_decay

    def _check(self):
        super()._check()
        _check_range("beta1", self.beta1, 0, 1)
        _check_range("beta2", self.beta2, 0, 1)
        _check_range("epsilon", self.epsilon, 0)
        _check_range("weight_decay", self.weight_decay, 0)

    def constants(self):
        return {
            "b1": self.beta1, "b2": self.beta2, "c1": 1 - self.beta1,
            "c2": 1 - self.beta2, "eps": self.epsilon, "weight_decay": self.weight_decay,
        }

    def _gradient_body(self):
        # ``grad`` and the weight the step starts from
        return _decayed_gradient(self.weight_decay) + """
    decayed_weight = Identity(weight)
"""

    def update_body(self):
        return self._gradient_body() + """
    b1 = Constant<value = {T} {{{b1}}}>()
    b2 = Constant<value = {T} {{{b2}}}>()
    c1 = Constant<value = {T} {{{c1}}}>()
    c2 = Constant<value = {T} {{{c2}}}>()
    eps = Constant<value = {T} {{{eps}}}>()
    one = Constant<value = {T} {{1.0}}>()
    new_step = Add(step, one)
    m_kept = Mul(b1, exp_avg)
    m_part = Mul(c1, grad)
    new_exp_avg = Add(m_kept, m_part)
    grad_sq = Mul(grad, grad)
    v_kept = Mul(b2, exp_avg_sq)
    v_part = Mul(c2, grad_sq)
    new_exp_avg_sq = Add(v_kept, v_part)
    b1t = Pow(b1, new_step)
    b2t = Pow(b2, new_step)
    correction1 = Sub(one, b1t)
    correction2 = Sub(one, b2t)
    v_hat = Div(new_exp_avg_sq, correction2)
    root = Sqrt(v_hat)
    denom = Add(root, eps)
    ratio = Div(new_exp_avg, denom)
    size = Div(learning_rate, correction1)
    delta = Mul(size, ratio)
    new_weight = Sub(decayed_weight, delta)
"""


class LearningRateAdamW(LearningRateAdam):
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay.

    The weight first shrinks, ``W <- W (1 - eta weight_decay)``, then takes
    :class:`LearningRateAdam`'s step computed from the plain gradient.

    Parameters
    ----------
    eta0 : float, default=1e-3
    beta1, beta2 : float, default=0.9, 0.999
    epsilon : float, default=1e-8
    weight_decay : float, default=1e-2
    schedule : str or BaseSchedule, default='constant'
        A name or a schedule object, see :class:`BaseLearningRate`.
    power_t : float, default=0.25
        Used by ``schedule='invscaling'`` only.
    alpha : float, default=1e-4
        Used by ``schedule='optimal'`` only.
    """

    def __init__(
        self, eta0=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=1e-2,
        schedule="constant", power_t=0.25, alpha=1e-4,
    ):
        super().__init__(
            eta0=eta0, beta1=beta1, beta2=beta2, epsilon=epsilon,
            weight_decay=weight_decay, schedule=schedule, power_t=power_t, alpha=alpha,
        )

    def _gradient_body(self):
        return """
    grad = Identity(gradient)
    wd = Constant<value = {T} {{{weight_decay}}}>()
    unit = Constant<value = {T} {{1.0}}>()
    lr_wd = Mul(learning_rate, wd)
    shrink = Sub(unit, lr_wd)
    decayed_weight = Mul(weight, shrink)
"""


class LearningRateRMSprop(BaseLearningRate):
    """RMSprop, as ``torch.optim.RMSprop``.

    With ``g = gradient + weight_decay * W``::

        s <- rho s + (1 - rho) g**2
        a <- rho a + (1 - rho) g                      (centered only)
        d  = sqrt(s - a**2) + epsilon  if centered else sqrt(s) + epsilon
        b <- momentum b + g / d;  W <- W - eta b      (momentum > 0)
        W <- W - eta g / d                            (momentum = 0)

    Parameters
    ----------
    eta0 : float, default=1e-2
        torch's ``lr``.
    rho : float, default=0.99
        Smoothing constant, torch's ``alpha`` (``alpha`` here is the
        ``optimal`` schedule's constant, as in the other rules).
    epsilon : float, default=1e-8
    weight_decay : float, default=0.0
    momentum : float, default=0.0
    centered : bool, default=False
    schedule : str or BaseSchedule, default='constant'
        A name or a schedule object, see :class:`BaseLearningRate`.
    power_t : float, default=0.25
        Used by ``schedule='invscaling'`` only.
    alpha : float, default=1e-4
        Used by ``schedule='optimal'`` only.
    """

    def __init__(
        self, eta0=1e-2, rho=0.99, epsilon=1e-8, weight_decay=0.0, momentum=0.0,
        centered=False, schedule="constant", power_t=0.25, alpha=1e-4,
    ):
        super().__init__(eta0=eta0, schedule=schedule, power_t=power_t, alpha=alpha)
        self.rho = rho
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.centered = centered

    @property
    def state_names(self):
        return (
            ("square_avg",)
            + (("grad_avg",) if self.centered else ())
            + (("momentum_buffer",) if self.momentum else ())
        )

    def _check(self):
        super()._check()
        _check_range("rho", self.rho, 0, 1, high_closed=True)
        _check_range("epsilon", self.epsilon, 0)
        _check_range("weight_decay", self.weight_decay, 0)
        _check_range("momentum", self.momentum, 0, 1)

    def constants(self):
        return {
            "rho": self.rho, "c": 1 - self.rho, "eps": self.epsilon,
            "weight_decay": self.weight_decay, "momentum": self.momentum,
        }

    def update_body(self):
        body = _decayed_gradient(self.weight_decay) + """
    rho = Constant<value = {T} {{{rho}}}>()
    c = Constant<value = {T} {{{c}}}>()
    eps = Constant<value = {T} {{{eps}}}>()
    grad_sq = Mul(grad, grad)
    s_kept = Mul(rho, square_avg)
    s_part = Mul(c, grad_sq)
    new_square_avg = Add(s_kept, s_part)
"""
        if self.centered:
            body += """
    a_kept = Mul(rho, grad_avg)
    a_part = Mul(c, grad)
    new_grad_avg = Add(a_kept, a_part)
    a_sq = Mul(new_grad_avg, new_grad_avg)
    variance = Sub(new_square_avg, a_sq)
    root = Sqrt(variance)
"""
        else:
            body += """
    root = Sqrt(new_square_avg)
"""
        body += """
    denom = Add(root, eps)
    ratio = Div(grad, denom)
"""
        if self.momentum:
            body += """
    mu = Constant<value = {T} {{{momentum}}}>()
    kept = Mul(mu, momentum_buffer)
    new_momentum_buffer = Add(kept, ratio)
    delta = Mul(learning_rate, new_momentum_buffer)
"""
        else:
            body += """
    delta = Mul(learning_rate, ratio)
"""
        return body + """
    new_weight = Sub(weight, delta)
"""


class LearningRateAdagrad(BaseLearningRate):
    """Adagrad, as ``torch.optim.Adagrad``.

    With ``g = gradient + weight_decay * W`` and ``t`` the update count
    (a state ``step``, kept only when ``lr_decay`` is not 0)::

        S <- S + g**2
        W <- W - eta / (1 + (t - 1) lr_decay) * g / (sqrt(S) + epsilon)

    Parameters
    ----------
    eta0 : float, default=1e-2
        torch's ``lr``.
    lr_decay : float, default=0.0
    weight_decay : float, default=0.0
    initial_accumulator_value : float, default=0.0
        Starting value of ``S``.
    epsilon : float, default=1e-10
    schedule : str or BaseSchedule, default='constant'
        A name or a schedule object, see :class:`BaseLearningRate`.
    power_t : float, default=0.25
        Used by ``schedule='invscaling'`` only.
    alpha : float, default=1e-4
        Used by ``schedule='optimal'`` only.
    """

    def __init__(
        self, eta0=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
        epsilon=1e-10, schedule="constant", power_t=0.25, alpha=1e-4,
    ):
        super().__init__(eta0=eta0, schedule=schedule, power_t=power_t, alpha=alpha)
        self.lr_decay = lr_decay
        self.weight_decay = weight_decay
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    @property
    def state_names(self):
        return ("sum",) + (("step",) if self.lr_decay else ())

    def _check(self):
        super()._check()
        _check_range("lr_decay", self.lr_decay, 0)
        _check_range("weight_decay", self.weight_decay, 0)
        _check_range("initial_accumulator_value", self.initial_accumulator_value, 0)
        _check_range("epsilon", self.epsilon, 0)

    def initial_state(self, weight):
        state = super().initial_state(weight)
        state["sum"] = np.full_like(weight, self.initial_accumulator_value)
        return state

    def constants(self):
        return {
            "eps": self.epsilon, "weight_decay": self.weight_decay,
            "lr_decay": self.lr_decay,
        }

    def update_body(self):
        body = _decayed_gradient(self.weight_decay) + """
    eps = Constant<value = {T} {{{eps}}}>()
    grad_sq = Mul(grad, grad)
    new_sum = Add(sum, grad_sq)
    root = Sqrt(new_sum)
    denom = Add(root, eps)
    ratio = Div(grad, denom)
"""
        if self.lr_decay:
            body += """
    one = Constant<value = {T} {{1.0}}>()
    decay = Constant<value = {T} {{{lr_decay}}}>()
    new_step = Add(step, one)
    step_decay = Mul(step, decay)
    slow = Add(one, step_decay)
    rate = Div(learning_rate, slow)
    delta = Mul(rate, ratio)
"""
        else:
            body += """
    delta = Mul(learning_rate, ratio)
"""
        return body + """
    new_weight = Sub(weight, delta)
"""


#: Update rules by name, for ``learning_rate='adam'`` and the like: name ->
#: callable making the rule with its defaults.  scikit-learn's
#: ``SGDRegressor(learning_rate=...)`` schedule names are accepted too, as
#: plain SGD with that schedule (``'invscaling'`` is
#: ``LearningRateSGD(schedule='invscaling')``).
LEARNING_RATES = {
    "sgd": LearningRateSGD,
    "nesterov": LearningRateSGDNesterov,
    "momentum": LearningRateMomentum,
    "adam": LearningRateAdam,
    "adamw": LearningRateAdamW,
    "rmsprop": LearningRateRMSprop,
    "adagrad": LearningRateAdagrad,
    "constant": functools.partial(LearningRateSGD, schedule="constant"),
    "optimal": functools.partial(LearningRateSGD, schedule="optimal"),
    "invscaling": functools.partial(LearningRateSGD, schedule="invscaling"),
    "adaptive": functools.partial(LearningRateSGD, schedule="adaptive"),
}


def make_learning_rate(learning_rate, schedule=None, alpha=None):
    """The update rule an estimator's parameters name.

    Parameters
    ----------
    learning_rate : str or BaseLearningRate
        A name of :data:`LEARNING_RATES`: ``'sgd'``, ``'nesterov'``,
        ``'momentum'``, ``'adam'``, ``'adamw'``, ``'rmsprop'``,
        ``'adagrad'`` (the class with its default parameters) or one of
        scikit-learn's SGD schedule names ``'constant'``, ``'optimal'``,
        ``'invscaling'``, ``'adaptive'`` (:class:`LearningRateSGD` with that
        schedule, as ``SGDRegressor(learning_rate=...)``); or an object,
        returned as is after checking.
    schedule : str or BaseSchedule, default=None
        Replaces the named rule's schedule (see
        :class:`BaseLearningRate`); None keeps it.  An error with a rule
        object, which holds its own.
    alpha : float, default=None
        The named rule's ``alpha``, which the ``'optimal'`` schedule name
        uses (scikit-learn's SGD takes it from the estimator's ``alpha``);
        None keeps the rule's default.  Ignored with a rule object.

    Returns
    -------
    BaseLearningRate
        A new object for a name; the object itself otherwise (never
        modified).
    """
    names = ", ".join(repr(n) for n in LEARNING_RATES)
    if isinstance(learning_rate, str):
        if learning_rate not in LEARNING_RATES:
            raise ValueError(
                f"Unknown learning_rate {learning_rate!r}; use one of {names} "
                "or a BaseLearningRate object."
            )
        rule = LEARNING_RATES[learning_rate]()
        if schedule is not None:
            rule.set_params(schedule=schedule)
        if alpha is not None:
            rule.set_params(alpha=alpha)
        rule._check()
        return rule
    if isinstance(learning_rate, BaseLearningRate):
        if schedule is not None:
            raise ValueError(
                f"schedule={schedule!r} and learning_rate={learning_rate!r} both set "
                "the schedule: give it in the object (its schedule) or name the rule "
                "(learning_rate='sgd', ...) with schedule."
            )
        learning_rate._check()
        return learning_rate
    raise TypeError(
        f"learning_rate must be one of {names} or a BaseLearningRate instance, "
        f"not {type(learning_rate).__name__}."
    )
