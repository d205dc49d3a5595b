"""OnnxSGDRegressor: train an ONNX regression graph with SGD."""

import numpy as np
from sklearn.base import RegressorMixin, _fit_context
from sklearn.metrics import r2_score
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import column_or_1d
from numbers import Real

from .callbacks import with_callbacks
from .estimator import BaseOnnxSGD
from .losses import REGRESSION_LOSSES, BaseLoss, make_loss
from .model import linear_model


class OnnxSGDRegressor(RegressorMixin, BaseOnnxSGD):
    """Train an ONNX graph as a regressor with mini-batch SGD.

    Gradients come from the graph itself (onnxfit differentiates it); the
    update comes from a learning-rate object.  ``OnnxSGDRegressor()`` alone trains
    a linear model ``X @ coef + intercept``, like ``SGDRegressor``.

    Parameters
    ----------
    onnx_model : onnx.ModelProto, bytes, str or path-like, default=None
        Graph to train, with one input and a float output.  None builds a
        linear model with one output per target column at ``fit`` time, in
        float64 if X is float64, else float32.
    weights_to_train : list of str, default=None
        Initializers to train; None trains every floating-point initializer
        the trained output depends on, except scalars (constants exporters
        write: an attention scale, the zero an initial state is expanded
        from) and BatchNormalization's running statistics.  Others stay
        frozen.
    output_name : str, default=None
        Output to train when the graph has several; None takes the only
        output or the first float one.
    loss_output : str, default=None
        For a graph that computes its own loss from a label input (as
        onnxruntime-training's ``TrainingSession`` artifacts do): the name
        of that loss, a scalar or one value per sample.  ``fit(X, y)`` then
        feeds y to the graph's label input and minimises that loss
        (``loss`` is not used); ``output_name`` must name the prediction,
        which ``predict`` and ``to_onnx`` use without the loss part.
    input_columns : dict, default=None
        For a graph with several inputs fed from one 2-D X or DataFrame:
        ``{input name: [columns]}``, column names (DataFrame) or positions.
        None assigns the columns in order, by the inputs' declared widths.
        X may also be a dict ``{input name: array}``.  Integer inputs
        (category indices into an embedding) are fed as integers.
    train_mode : bool, default=True
        Dropout and BatchNormalization behave as in PyTorch's
        ``model.train()`` while fitting (Dropout masks drawn from
        ``random_state``; BatchNormalization on batch statistics, its
        running mean and variance updated, see ``running_statistics_``) and
        as in ``model.eval()`` in ``predict`` and ``to_onnx``, whichever mode
        the graph was exported in.  False trains the graph as written.
    learning_rate : str or BaseLearningRate, default='auto'
        Update rule and schedule.  ``'auto'`` is ``'sgd'`` for the linear
        model built when ``onnx_model`` is None (``SGDRegressor``'s
        behaviour) and ``'adam'`` for a given graph: measured on
        skl2onnx and PyTorch MLPs, Adam (torch's default) trains them at
        its default step on unscaled targets as well as scaled ones, where
        plain SGD and momentum diverge (see the README).  ``'sgd'`` is ``LearningRateSGD()`` (``eta0=0.01``,
        invscaling), ``'nesterov'`` is ``LearningRateSGDNesterov()``;
        ``'momentum'``, ``'adam'``, ``'adamw'``, ``'rmsprop'`` and
        ``'adagrad'`` are ``LearningRateMomentum()``, ``LearningRateAdam()``,
        ``LearningRateAdamW()``, ``LearningRateRMSprop()`` and
        ``LearningRateAdagrad()``: torch.optim's rules with its defaults
        (constant rate).  ``'constant'``, ``'invscaling'``, ``'optimal'``
        and ``'adaptive'`` are plain SGD with that schedule, as on
        ``SGDRegressor``.  Pass an object to search its parameters
        (``learning_rate__eta0``) with ``GridSearchCV``.
    eta0 : float, default=None
        Initial step size of the update rule named by ``learning_rate``;
        None keeps the rule's own default.  Searchable as scikit-learn's
        SGD's (``GridSearchCV(est, {'eta0': [...]})``); an error with an
        update-rule object, which holds its own ``eta0``.
    schedule : str or schedule object, default=None
        Learning-rate schedule of the update rule named by
        ``learning_rate``; None keeps the rule's own.  scikit-learn's names
        mean what they mean on ``SGDRegressor`` (``'constant'``,
        ``'invscaling'``, ``'optimal'``, ``'adaptive'``), ``'cosine'``
        anneals over the fit; objects from :mod:`onnxfit.schedules` add
        warm-up and step decay.  An error with an update-rule object, which
        holds its own.
    max_grad_norm : float, default=None
        Clip the gradient (all weights together, penalty included) to this
        global L2 norm before the update, as
        ``torch.nn.utils.clip_grad_norm_``; None does not clip.
    loss : str or BaseLoss, default='squared_error'
        ``'squared_error'``, ``'absolute_error'``, ``'huber'``,
        ``'epsilon_insensitive'``, ``'squared_epsilon_insensitive'``,
        ``'elastic'`` or a loss object.
    penalty : {'l2', 'l1', 'elasticnet'}, None, ElasticNetPenalty or dict, default='l2'
        Applied to weight tensors of rank >= 2 (not biases).  A dict
        penalizes weights by name, each as its value says: ``'l2'``,
        ``'l1'`` or ``'elasticnet'`` (with ``alpha`` and ``l1_ratio``), an
        ``ElasticNetPenalty`` (its own strength) or None; a named bias is
        penalized, weights left out are not.
    alpha : float, default=1e-4
        Penalty strength.
    l1_ratio : float, default=0.15
        L1 share of the ``'elasticnet'`` penalty.
    epsilon : float, default=0.1
        Threshold of the ``huber`` and ``epsilon_insensitive`` losses.
    batch_size : int or 'auto', default='auto'
        Samples per update (capped at the number of samples).  ``'auto'``
        is ``n_samples // 1000`` clipped to [1, 64]: per-sample updates on
        small data, like ``SGDRegressor``, and batches of 64 on large data,
        where they reach the same accuracy sooner.
    max_iter : int, default=1000
        Maximum number of epochs.
    tol : float or None, default=1e-3
        Training stops when the loss (or the validation score with early
        stopping) has not improved by ``tol`` for ``n_iter_no_change``
        epochs.  None disables the criterion.
    n_iter_no_change : int, default=5
    shuffle : bool, default=True
        Shuffle the samples at each epoch.
    random_state : int, RandomState or None, default=None
    early_stopping : bool, default=False
        Stop when the validation score (see ``scoring``) has not improved
        by ``tol`` for ``n_iter_no_change`` epochs, and keep the weights of
        the best epoch.  The validation data is ``fit``'s ``eval_set`` (or
        ``X_val``/``y_val``) when given, else ``validation_fraction`` of X
        held out.
    validation_fraction : float, default=0.1
    scoring : str, callable or None, default=None
        What early stopping maximises on the validation data: None, the
        R² (``score``); ``'loss'``, the validation loss (minimised);
        any scikit-learn scorer name or callable ``scorer(estimator, X, y)``.
    on_divergence : {'raise', 'warn'}, default='raise'
        When a step's loss becomes non-finite or explodes (over a million
        times the loss at the starting weights, see
        :mod:`onnxfit.divergence`): ``'raise'`` a :class:`ConvergenceError`
        naming the likely cause and leave the estimator as it was before
        the call; ``'warn'`` stop with a ``ConvergenceWarning`` and keep the
        weights from before the diverging epoch.
    warm_start : bool, default=False
        ``fit`` starts from the weights of the previous fit.
    verbose : int, default=0
        1: a progress bar over epochs with the current loss; 2: a second
        bar over the updates of each epoch.
    engine : {'fused', 'forward_backward'}, default='fused'
        How a training step runs (see :mod:`onnxfit.engines`).
    n_threads : int or None, default=None
        onnxruntime intra-op threads.  None is onnxruntime's default, one
        thread per core (or ``OMP_NUM_THREADS`` when set, as in joblib's
        workers): a second thread makes layers of a hundred units or more
        faster on an idle machine, and costs nothing to small models.  Set 1
        when other processes compete for the cores.
    gradient_backend : {'onnxfit', 'onnxruntime-training'}, default='onnxfit'
        What differentiates the graph: onnxfit's own rules (any onnxruntime
        build, any Python from 3.10), or the gradient builder of
        onnxruntime-training-cpu 1.19.2 when that build is installed (see
        :mod:`onnxfit.gradient`).
    device : str, default='cpu'
        Where training and prediction run: ``'cpu'``, ``'cuda'`` or
        ``'cuda:N'``.  On a GPU (onnxruntime-gpu installed: ``pip install
        'onnxfit[gpu]'``), weights, update state and running statistics stay
        on the device, each batch is copied there, and only the loss comes
        back per step.

    Attributes
    ----------
    onnx_model_ : onnx.ModelProto
        The graph, normalised for training (opset 17 or newer, within what
        the installed onnxruntime runs).
    input_shapes_ : dict of str -> tuple
        Per-sample shape of each graph input, as fitted (X has shape
        ``(n_samples, *input_shapes_[name])``; ``n_features_in_`` is the
        total of their sizes).
    running_statistics_ : dict of str -> ndarray
        BatchNormalization's running means and variances (``train_mode``),
        written into the exported graph; empty otherwise.
    weights_ : dict of str -> ndarray
        Trained weights.
    weights_to_train_ : list of str
    trained_output_ : str
    loss_curve_ : list of float
        Mean training objective (loss + penalty) per epoch.
    validation_scores_ : list of float or None
        Validation score per epoch (the R², or ``scoring``'s), with
        early stopping or validation data; None otherwise.
    validation_loss_curve_ : list of float or None
        Mean validation loss per epoch (no penalty), likewise.
    n_iter_ : int
        Epochs run by the last ``fit`` (or accumulated by ``partial_fit``).
    t_ : int
        Weight updates (mini-batches) done.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Defined when X has feature names.

    Examples
    --------
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from onnxfit import OnnxSGDRegressor
    >>> X, y = load_diabetes(return_X_y=True)
    >>> model = make_pipeline(StandardScaler(), OnnxSGDRegressor(random_state=0))
    >>> model.fit(X, y).score(X, y) > 0.4
    True
    """

    _parameter_constraints = {
        **BaseOnnxSGD._parameter_constraints,
        "loss": [StrOptions(set(REGRESSION_LOSSES)), BaseLoss],
        "epsilon": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(
        self, onnx_model=None, *, weights_to_train=None, output_name=None,
        loss_output=None, input_columns=None, train_mode=True, learning_rate="auto",
        eta0=None, schedule=None, max_grad_norm=None, loss="squared_error", penalty="l2",
        alpha=1e-4, l1_ratio=0.15, epsilon=0.1, batch_size="auto", max_iter=1000, tol=1e-3,
        n_iter_no_change=5, shuffle=True, random_state=None, early_stopping=False,
        validation_fraction=0.1, scoring=None, on_divergence="raise", warm_start=False,
        verbose=0, engine="fused", n_threads=None, gradient_backend="onnxfit", device="cpu",
    ):
        super().__init__(
            onnx_model, weights_to_train=weights_to_train, output_name=output_name,
            loss_output=loss_output, input_columns=input_columns, train_mode=train_mode,
            learning_rate=learning_rate, eta0=eta0, schedule=schedule,
            max_grad_norm=max_grad_norm, loss=loss, penalty=penalty, alpha=alpha,
            l1_ratio=l1_ratio, batch_size=batch_size, max_iter=max_iter, tol=tol,
            n_iter_no_change=n_iter_no_change, shuffle=shuffle, random_state=random_state,
            early_stopping=early_stopping, validation_fraction=validation_fraction,
            scoring=scoring, on_divergence=on_divergence,
            warm_start=warm_start, verbose=verbose, engine=engine, n_threads=n_threads,
            gradient_backend=gradient_backend, device=device,
        )
        self.epsilon = epsilon

    @with_callbacks
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, sample_weight=None, *, eval_set=None, X_val=None, y_val=None):
        """Run one epoch over ``(X, y)``, continuing from the current state.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, ...), or dict
            Features: a 2-D array or DataFrame (its columns assigned to the
            graph's inputs, see ``input_columns``), an array of the graph
            input's per-sample shape, or a dict ``{input name: array}``.
            Sparse matrices are refused (a ``TypeError``): pass
            ``X.toarray()``.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), default=None
        eval_set, X_val, y_val : default=None
            Validation data whose loss and score are recorded for this
            epoch (see :meth:`fit`).

        Returns
        -------
        self
        """
        return self._partial_fit(X, y, sample_weight, max_iter=1, reset=False,
                                 validation=(eval_set, X_val, y_val))

    def predict(self, X):
        """Predict with the trained graph.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, ...), or dict
            Features: a 2-D array or DataFrame (its columns assigned to the
            graph's inputs, see ``input_columns``), an array of the graph
            input's per-sample shape, or a dict ``{input name: array}``.
            Sparse matrices are refused (a ``TypeError``): pass
            ``X.toarray()``.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs), float64
        """
        out = self._forward(X)
        n = out.shape[0]
        if self._y_ndim == 1:
            return out.reshape(n).astype(np.float64)
        return out.reshape(n, -1).astype(np.float64)

    def _make_loss(self):
        return make_loss(self.loss, REGRESSION_LOSSES, epsilon=self.epsilon)

    def _auto_learning_rate(self):
        return "sgd" if self.onnx_model is None else "adam"

    def _validate_targets(self, y, reset, classes=None):
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 2 and y.shape[1] == 1:
            # scikit-learn's SGDRegressor: a column vector is one target
            # (predictions of shape (n_samples,)), with its warning.
            y = column_or_1d(y, warn=True)
        if reset:
            self._y_ndim = y.ndim
        elif y.ndim != self._y_ndim:
            raise ValueError(
                f"y has {y.ndim} dimensions but the estimator was fitted on "
                f"{self._y_ndim}-dimensional targets."
            )
        return y.reshape(len(y), -1)

    def _default_model(self, n_features, labels, dtype):
        return linear_model(n_features, labels.shape[1], dtype)

    def _score_output(self, output, y):
        return r2_score(y.reshape(len(y), -1), output.reshape(len(output), -1))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
