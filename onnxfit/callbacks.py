"""scikit-learn's callback API (``sklearn.callback``, scikit-learn >= 1.9)
on the onnxfit estimators.

A fit is one task whose subtasks are the epochs: callbacks such as
``ProgressBar`` and ``ScoringMonitor`` see each epoch begin and end, and
an ``on_fit_task_end`` hook that returns True stops training after that
epoch.  The ``fitted_estimator`` a hook may ask for is a shallow copy of the
estimator with the epoch's weights, ready to predict.

With an older scikit-learn the estimators have no ``set_callbacks`` and
train exactly as without callbacks.
"""

try:
    from sklearn.callback import CallbackSupportMixin, with_callbacks

    HAS_CALLBACKS = True
except ImportError:  # scikit-learn < 1.9
    HAS_CALLBACKS = False

    class CallbackSupportMixin:
        """Stands in for scikit-learn's mixin where it does not exist."""

    def with_callbacks(method):
        """Stands in for scikit-learn's decorator: the method as it is."""
        return method


class EpochCallbacks:
    """The callback hooks of one ``fit`` or ``partial_fit`` call.

    Parameters
    ----------
    estimator : BaseOnnxSGD
    X, y
        The data as the user gave it (scorers of ``ScoringMonitor`` predict
        on it).
    max_epochs : int
    fitted_view : callable
        ``fitted_view()`` returns the reconstruction attributes of the
        current state (see ``sklearn.callback``).
    """

    def __init__(self, estimator, X, y, max_epochs, fitted_view):
        self.estimator = estimator
        self.X, self.y = X, y
        self.fitted_view = fitted_view
        self.context = None
        self.epoch = None
        if HAS_CALLBACKS and getattr(estimator, "_skl_callbacks", None):
            self.context = estimator._init_callback_context(max_subtasks=max_epochs)
            self.context.call_on_fit_task_begin(estimator=estimator, X=X, y=y)

    def _hook(self, context, name):
        call = getattr(context, f"call_on_fit_task_{name}")
        return call(estimator=self.estimator, X=self.X, y=self.y,
                    reconstruction_attributes=self.fitted_view)

    def begin_epoch(self):
        """Begin an epoch's task."""
        if self.context is not None:
            self.epoch = self.context.subcontext(task_name="epoch")
            self._hook(self.epoch, "begin")

    def end_epoch(self):
        """End the epoch's task; True when a callback asks to stop."""
        if self.epoch is None:
            return False
        epoch, self.epoch = self.epoch, None
        return bool(self._hook(epoch, "end"))

    def end_fit(self, completed=True):
        """End the call's task (and an epoch left open: a divergence with
        ``on_divergence='warn'``, an error).  A call that did not complete
        ends its tasks without a fitted estimator for the hooks."""
        if self.context is None:
            return
        if self.epoch is not None:
            self.epoch.call_on_fit_task_end(estimator=self.estimator)
            self.epoch = None
        if completed:
            self._hook(self.context, "end")
        else:
            self.context.call_on_fit_task_end(estimator=self.estimator)
