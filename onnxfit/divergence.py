"""Catching a diverging fit, and saying why it diverged.

A fit diverges when a step's loss is not finite, or when it explodes while
staying finite: the squared-error derivative is bounded as in scikit-learn's
SGD (:data:`onnxfit.losses.MAX_DLOSS`), so a far too large learning rate can
keep the loss at 1e34 for ever instead of overflowing.  The rule is
relative, so that it holds for any loss and any target scale:

    a loss above the reference loss plus ``DIVERGENCE_FACTOR`` times its
    magnitude (floored at ``REFERENCE_FLOOR``)

The reference is the loss at the weights each ``fit`` or ``partial_fit``
call starts from (a first epoch's mean may already have exploded; a stream
of chunks may drift), the larger of two measures of it: the first step's
loss, the objective training reports (penalty, sample weights, Dropout and
batch statistics included), and, when that step saw fewer than
``SMALL_BATCH`` samples, the weighted mean loss on up to
``REFERENCE_SAMPLES`` samples spread over the data (one sample's loss may be
far below the typical one).  The floor keeps a model that starts at a zero
loss (a hinge loss with every margin met) from making any later loss look
like an explosion.  Training never multiplies its starting loss by a
million on purpose; a diverging run does within a few steps.

Every step is checked (:class:`DivergenceGuard`), and so is the loss at the
weights a call ends with: the last update of a call is otherwise never
looked at.

:class:`ConvergenceError` is a :class:`ValueError`, so that
``GridSearchCV(error_score=np.nan)`` records the failed fit and goes on.
"""

import math

import numpy as np

#: A loss this many times the reference's magnitude above it is a divergence.
DIVERGENCE_FACTOR = 1e6
#: Samples the reference loss is computed on (spread over the data).
REFERENCE_SAMPLES = 1024
#: Smallest magnitude of the reference: keeps the limit above a perfect start.
REFERENCE_FLOOR = 1e-6
#: A first batch smaller than this is too noisy to be the only reference.
SMALL_BATCH = 32


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
    step : int or None
        Update (1-based, within the epoch) whose loss diverged; None when
        the loss at the weights the call ends with did (after the last
        update).
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
    """The largest loss that is not a divergence, for ``reference``."""
    reference = float(reference)
    return reference + DIVERGENCE_FACTOR * max(abs(reference), REFERENCE_FLOOR)


class DivergenceGuard:
    """Decides, step by step, whether a training call diverged.

    Parameters
    ----------
    reference : float or None
        A measure of the loss at the starting weights known before the
        first step (see the module docstring), or None.  The first step's
        loss is the other measure: the larger one sets the limit.
    """

    def __init__(self, reference=None):
        self.reference = reference
        self.limit = None

    def diverged(self, loss):
        """Whether ``loss``, the loss of the next step, is a divergence."""
        if not math.isfinite(loss):
            return True
        if self.limit is None:  # the first step: the loss at the starting weights
            if self.reference is None or not math.isfinite(self.reference):
                self.reference = loss
            else:
                self.reference = max(self.reference, loss)
            self.limit = loss_limit(self.reference)
            return False
        return loss > self.limit


def _spread(values):
    """(|mean|, standard deviation) of float ``values`` by column, on the
    first samples (a few thousand tell the scale), or None."""
    if values is None or not hasattr(values, "dtype") or values.dtype.kind != "f" \
            or not values.size:
        return None
    flat = values.reshape(len(values), -1)[:4 * REFERENCE_SAMPLES].astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
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
        Whether ``y`` holds regression targets (a target scale is then a
        likely cause; class labels have none).
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


def divergence_message(loss, reference, epoch, step, causes, on_divergence="raise"):
    """The message of a :class:`ConvergenceError` (see :func:`likely_causes`),
    or of the warning ``on_divergence='warn'`` gives."""
    what = (f"the loss became {loss}" if not np.isfinite(loss) else
            f"the loss exploded to {loss:.3g}, over {DIVERGENCE_FACTOR:.0e} times the "
            f"loss at the starting weights ({reference:.3g})")
    where = f"step {step}" if step is not None else "after its last step"
    lines = [f"Training diverged at epoch {epoch}, {where}: {what}."]
    if causes:
        lines.append("Likely cause" + ("s" if len(causes) > 1 else "") + ": "
                     + "; ".join(causes) + ".")
    if on_divergence == "raise":
        lines.append(
            "The estimator was left as it was before this call; with "
            "on_divergence='warn', training stops with a warning and keeps the last "
            "weights before the divergence instead."
        )
    else:
        lines.append("Training stopped (on_divergence='warn') and keeps the weights from "
                     "before the diverging epoch.")
    return " ".join(lines)
