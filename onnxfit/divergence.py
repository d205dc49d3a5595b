"""Catching a diverging fit, and saying why it diverged.

A fit diverges when a step's loss is not finite, or when it explodes while
staying finite: the squared-error derivative is bounded as in scikit-learn's
SGD (:data:`onnxfit.losses.MAX_DLOSS`), so a far too large learning rate can
keep the loss at 1e34 for ever instead of overflowing.  The rule is
relative, so that it holds for any loss and any target scale:

    a step's loss above ``DIVERGENCE_FACTOR`` times the reference loss

where the reference is the mean loss at the weights training starts from,
on up to ``REFERENCE_SAMPLES`` samples of the data (computed before the
first update: a first epoch's mean may already have exploded), floored at
``REFERENCE_FLOOR`` (a model that starts at a zero loss, a hinge loss with
every margin met, must not make any later loss look like an explosion).
Training never multiplies its starting loss by a million on purpose; a
diverging run does within a few steps.

:class:`ConvergenceError` is a :class:`ValueError`, so that
``GridSearchCV(error_score=np.nan)`` records the failed fit and goes on.
"""

import numpy as np

#: A step's loss above this many times the reference loss is a divergence.
DIVERGENCE_FACTOR = 1e6
#: Samples the reference loss is computed on (the first ones of the data).
REFERENCE_SAMPLES = 1024
#: Smallest reference loss: keeps the limit positive for a perfect start.
REFERENCE_FLOOR = 1e-6


class ConvergenceError(ValueError):
    """Training diverged: the loss became non-finite or exploded.

    Raised by ``fit`` and ``partial_fit`` (with ``on_divergence='raise'``,
    the default) before any weight of the failed call is kept: the
    estimator is left as it was before the call.  The message names the
    epoch and step, the loss and the likely cause.

    Attributes
    ----------
    epoch : int
        Epoch (1-based, counted over the estimator's life) of the step.
    step : int
        Update (1-based, within the epoch) whose loss diverged.
    loss : float
        That loss.
    reference : float
        The loss at the starting weights the rule compares with.
    """

    def __init__(self, message, epoch=None, step=None, loss=None, reference=None):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.loss = loss
        self.reference = reference


def loss_limit(reference):
    """The largest step loss that is not a divergence, for ``reference``."""
    return DIVERGENCE_FACTOR * max(float(reference), REFERENCE_FLOOR)


def _spread(values):
    """(mean, standard deviation) of float ``values`` by column, or None."""
    if values is None or not hasattr(values, "dtype") or values.dtype.kind != "f" \
            or not values.size:
        return None
    flat = values.reshape(len(values), -1)[:REFERENCE_SAMPLES * 4]
    return np.abs(flat.mean(axis=0)), flat.std(axis=0)


def likely_causes(*, inputs, y, regression, learning_rate, has_dropout):
    """Sentences naming what probably made a fit diverge, most likely first.

    Parameters
    ----------
    inputs : dict of str -> ndarray
        The training inputs as the graph takes them.
    y : ndarray or None
        The targets (regression) or None.
    regression : bool
    learning_rate : BaseLearningRate
        The update rule, with its ``eta0``.
    has_dropout : bool
        Whether Dropout masks are drawn while training.

    Returns
    -------
    list of str
    """
    causes = []
    spread = _spread(y) if regression else None
    if spread is not None:
        mean, std = spread
        scale = float(np.max(np.maximum(mean, std)))
        if scale > 10 or float(np.max(std)) < 0.1:
            causes.append(
                f"the target y is far from unit scale (largest |mean| or std of a column: "
                f"{scale:.3g}); standardise it with "
                "TransformedTargetRegressor(regressor=..., transformer=StandardScaler())"
            )
    for name, values in inputs.items():
        spread = _spread(values)
        if spread is None:
            continue
        mean, std = spread
        scale = float(np.max(np.maximum(mean, std)))
        if scale > 10:
            label = "X" if len(inputs) == 1 else f"the input {name!r}"
            causes.append(
                f"{label} is far from unit scale (largest |mean| or std of a feature: "
                f"{scale:.3g}); put a StandardScaler in front of the estimator"
            )
    rate = getattr(learning_rate, "eta0", None)
    causes.append(
        f"the learning rate (eta0={rate:g}) is too large for this problem; lower it "
        "(eta0=) or clip the gradient (max_grad_norm=)" if rate is not None else
        "the learning rate is too large; lower it or clip the gradient (max_grad_norm=)"
    )
    if has_dropout:
        causes.append(
            "Dropout is active while training (train_mode=True) and makes the loss "
            "noisy; try train_mode=False or a lower rate to check"
        )
    return causes


def divergence_message(loss, reference, epoch, step, causes):
    """The message of a :class:`ConvergenceError` (see :func:`likely_causes`)."""
    what = (f"the loss became {loss}" if not np.isfinite(loss) else
            f"the loss exploded to {loss:.3g}, over {DIVERGENCE_FACTOR:.0e} times the "
            f"loss at the starting weights ({reference:.3g})")
    lines = [f"Training diverged at epoch {epoch}, step {step}: {what}."]
    if causes:
        lines.append("Likely cause" + ("s" if len(causes) > 1 else "") + ": "
                     + "; ".join(causes) + ".")
    lines.append(
        "The estimator was left as it was before this call; with "
        "on_divergence='warn', training stops with a warning and keeps the last "
        "weights before the divergence instead."
    )
    return " ".join(lines)
