"""What OnnxSGDRegressor and OnnxSGDClassifier share: parameters, the
training loop, early stopping, prediction and export.

As in scikit-learn's ``linear_model/_stochastic_gradient.py``, ``fit`` is a
reset followed by the same ``_partial_fit`` loop that ``partial_fit`` runs
for one epoch: there is one path for all training.
"""

import copy
import hashlib
import os
import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import onnx
from onnx import helper
from sklearn import config_context, get_config
from sklearn.base import BaseEstimator, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import assert_all_finite, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .callbacks import CallbackSupportMixin, EpochCallbacks, with_callbacks
from .divergence import (
    REFERENCE_SAMPLES,
    SMALL_BATCH,
    ConvergenceError,
    DivergenceGuard,
    divergence_message,
    likely_causes,
)
from .engines import ENGINES, TrainingProblem, make_engine
from .engines.problem import LABEL
from .engines.steps import declare_input
from .gradient import BACKENDS, check_backend
from .inputs import InputSpec, is_input_dict, n_samples, take_rows, to_graph_inputs
from .learning_rate import LEARNING_RATES, BaseLearningRate, ScheduleState, make_learning_rate
from .losses import BaseLoss, GraphLoss
from .model import OnnxModel, load_onnx, normalise_model
from .onnx_graphs import append_piece, onnx_elem_type, set_outputs
from .penalties import BasePenalty, make_penalty
from .sessions import ONNXRUNTIME_ERRORS, check_device, make_session, parse_device
from .training_mode import (
    TrainingGraph,
    batch_shapes,
    inference_graph,
    statistics_as_inputs,
    training_graph,
)


class _Runtime:
    """onnxruntime objects of a fitted estimator, rebuilt on demand.

    The estimator keeps one instance for its whole life; pickling drops its
    content (sessions cannot be pickled) and the next call rebuilds it.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        self.model = None
        self.training_graph = None
        self.predict_model = None
        self.predict_session = None
        self.loss_session = None
        self.export_session = None
        self.engine = None
        self.engine_key = None


def _shape_text(sample_shape):
    """``(n, ...)``: the shape of a batch of samples of ``sample_shape``."""
    return "(" + ", ".join(["n", *map(str, sample_shape)]) + ")"


def _check_indices(inputs, model):
    """Category indices of ``inputs`` within the embedding tables that the
    graph's Gather nodes read them from (see :meth:`OnnxModel.index_tables`):
    onnxruntime would stop mid-training on one out of range."""
    for name, tables in model.index_tables().items():
        values = inputs.get(name)
        if values is None or not values.size:
            continue
        low, high = int(values.min()), int(values.max())
        for node, table, rows in tables:
            if low < -rows or high >= rows:
                label = f"Gather node {node.name!r}" if node.name else "a Gather node"
                raise ValueError(
                    f"X feeds the graph input {name!r} category indices from {low} to "
                    f"{high}, but {label} reads them as rows of {table!r}, which has "
                    f"{rows}: indices must lie in [0, {rows - 1}] (or count from the end, "
                    f"down to -{rows}). Encode the categories as 0 to {rows - 1} "
                    "(OrdinalEncoder), or give the graph a larger table."
                )


def _params_key(obj):
    if obj is None:
        return None
    if isinstance(obj, BaseEstimator):
        return (type(obj).__qualname__, tuple(sorted(
            (k, _params_key(v) if isinstance(v, BaseEstimator) else repr(v))
            for k, v in obj.get_params(deep=False).items()
        )))
    return repr(obj)


def assert_finite(array, input_name, estimator):
    """scikit-learn's check that ``array`` holds no NaN or infinity.

    The first pass sums the array, as scikit-learn does, but with
    ``np.einsum`` (a plain SIMD loop, half the time of ``ndarray.sum``'s
    pairwise summation: this check is the largest fixed cost of a
    ``partial_fit`` call on large data).  A NaN or an infinity always makes
    the sum non-finite; an overflowing sum of finite values only sends the
    array to scikit-learn's exact check, which also writes the error.
    """
    if get_config()["assume_finite"] or not isinstance(array, np.ndarray) or not array.size:
        return
    if array.dtype.kind == "O":  # labels: scikit-learn looks for NaN among them
        assert_all_finite(array, estimator_name=type(estimator).__name__, input_name=input_name)
        return
    if array.dtype.kind != "f":
        return
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.einsum("abcdefgh"[:array.ndim] + "->", array)
    if not np.isfinite(total):
        assert_all_finite(array, estimator_name=type(estimator).__name__, input_name=input_name)


class _StoppingRule:
    """scikit-learn's SGD stopping rule: stop after ``n_iter_no_change``
    epochs in a row without improving the best value by ``tol`` (never with
    ``tol=None``); with a validation score, the best epoch's state is kept.
    """

    def __init__(self, tol, n_iter_no_change):
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.best_loss = np.inf
        self.best_score = -np.inf
        self.best_state = None
        self.no_improvement = 0

    def lower_is_better(self, loss):
        """Record a training loss; whether it improved on the best by tol."""
        improved = self.tol is None or loss < self.best_loss - self.tol
        self.best_loss = min(self.best_loss, loss)
        return improved

    def higher_is_better(self, score, state):
        """Record a validation score and its state; whether it improved."""
        if score > self.best_score:
            self.best_state = state
        improved = self.tol is None or score > self.best_score + self.tol
        self.best_score = max(self.best_score, score)
        return improved

    def patience_ran_out(self, improved):
        if self.tol is None:
            return False
        self.no_improvement = 0 if improved else self.no_improvement + 1
        return self.no_improvement >= self.n_iter_no_change

    def reset(self):
        self.no_improvement = 0


#: The curves a training call appends to (a failed call truncates them back).
_CURVES = ("loss_curve_", "validation_loss_curve_", "validation_scores_")
#: What scikit-learn's callback machinery sets on the estimator during a call.
_CALLBACK_CONTEXT = ("_callback_fit_ctx", "_skl_callbacks_to_teardown", "_parent_callback_ctx")


@dataclass
class _Validation:
    """Validation data as training takes it: the graph ``inputs``, the
    targets ``y`` as validated, the encoded ``labels``, and ``X`` for
    scorers (the user's X_val, or a dict of inputs for a held-out split)."""

    inputs: dict
    y: np.ndarray
    labels: np.ndarray
    X: object


def _from_attributes(estimator, attributes):
    """A shallow copy of ``estimator`` with ``attributes`` set (scikit-learn's
    callbacks make their ``fitted_estimator`` the same way)."""
    view = copy.copy(estimator)
    for name, value in attributes.items():
        setattr(view, name, value)
    return view


class _Progress:
    """``verbose`` display: 1, a tqdm bar over epochs with the loss; 2 and
    more, a tqdm bar over the updates of each epoch as well."""

    def __init__(self, estimator, max_iter, n_batches):
        self.epochs = self.steps = None
        self.n_batches = n_batches
        if not estimator.verbose:
            return
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        name = type(estimator).__name__
        self.epochs = tqdm(total=max_iter, desc=name, unit="epoch")
        if estimator.verbose >= 2:
            self.steps = tqdm(total=n_batches, desc="updates", unit="batch", leave=False)

    def step(self, index, loss):
        if self.steps is not None:
            self.steps.update(1)
            if index % 16 == 0:
                self.steps.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def epoch(self, loss):
        if self.epochs is not None:
            self.epochs.update(1)
            self.epochs.set_postfix(loss=f"{loss:.6g}")
        if self.steps is not None:
            self.steps.reset(total=self.n_batches)

    def close(self):
        for bar in (self.steps, self.epochs):
            if bar is not None:
                bar.close()


class BaseOnnxSGD(CallbackSupportMixin, BaseEstimator):
    """Base class of the onnxfit estimators (not to be used directly)."""

    _parameter_constraints = {
        "onnx_model": [None, onnx.ModelProto, bytes, str, os.PathLike],
        "weights_to_train": [None, list, tuple, str],
        "output_name": [None, str],
        "loss_output": [None, str],
        "input_columns": [None, dict],
        "train_mode": ["boolean"],
        "learning_rate": [StrOptions(set(LEARNING_RATES) | {"auto"}), BaseLearningRate],
        "eta0": [Interval(Real, 0, None, closed="neither"), None],
        "schedule": [str, BaseEstimator, None],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "loss": [str, BaseLoss],
        "penalty": [StrOptions({"l2", "l1", "elasticnet"}), None, BasePenalty, dict],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "l1_ratio": [Interval(Real, 0, 1, closed="both")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, None, None, closed="neither"), None],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "scoring": [None, str, callable],
        "on_divergence": [StrOptions({"raise", "warn"})],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "engine": [StrOptions(set(ENGINES))],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
        "gradient_backend": [StrOptions(set(BACKENDS))],
        "device": [str],
    }

    def __init__(
        self, onnx_model=None, *, weights_to_train=None, output_name=None,
        loss_output=None, input_columns=None, train_mode=True, learning_rate="auto",
        eta0=None, schedule=None, max_grad_norm=None, loss="squared_error", penalty="l2",
        alpha=1e-4, l1_ratio=0.15, batch_size="auto", max_iter=1000, tol=1e-3,
        n_iter_no_change=5, shuffle=True, random_state=None, early_stopping=False,
        validation_fraction=0.1, scoring=None, on_divergence="raise", warm_start=False,
        verbose=0, engine="fused", n_threads=None, gradient_backend="onnxfit",
        device="cpu",
    ):
        # The parameters both estimators share, assigned in one place (as
        # scikit-learn's BaseSGD); each estimator's __init__ lists them again
        # with its own defaults, as get_params reads that signature.
        self.onnx_model = onnx_model
        self.weights_to_train = weights_to_train
        self.output_name = output_name
        self.loss_output = loss_output
        self.input_columns = input_columns
        self.train_mode = train_mode
        self.learning_rate = learning_rate
        self.eta0 = eta0
        self.schedule = schedule
        self.max_grad_norm = max_grad_norm
        self.loss = loss
        self.penalty = penalty
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.shuffle = shuffle
        self.random_state = random_state
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.scoring = scoring
        self.on_divergence = on_divergence
        self.warm_start = warm_start
        self.verbose = verbose
        self.engine = engine
        self.n_threads = n_threads
        self.gradient_backend = gradient_backend
        self.device = device

    # -- hooks for the subclasses -----------------------------------------
    #: Whether ``validate_data`` must check that y is numeric.
    _y_numeric = True

    def _make_loss(self):
        raise NotImplementedError

    def _validate_targets(self, y, reset, classes=None):
        """Return y checked and encoded for ``_encode_labels``: the targets as
        floats (regression) or each sample's class index (classification)."""
        raise NotImplementedError

    def _default_model(self, n_features, labels, dtype):
        """The linear graph used when ``onnx_model`` is None."""
        raise NotImplementedError

    def _score_output(self, output, y):
        """Score (R² or accuracy) of the trained ``output`` against ``y``."""
        raise NotImplementedError

    def _validation_split(self, n_samples, y, rng):
        from sklearn.model_selection import ShuffleSplit

        splitter = ShuffleSplit(test_size=self.validation_fraction, random_state=rng)
        return next(splitter.split(np.zeros(n_samples), y))

    # -- fitting ------------------------------------------------------------
    @with_callbacks
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, *, eval_set=None, X_val=None, y_val=None,
            initial_weights=None):
        """Train the graph on ``(X, y)``, starting from its initial weights.

        With ``warm_start=True`` training starts from the weights of the
        previous fit instead (the learning-rate schedule and update-rule
        state restart).  If training fails (a :class:`ConvergenceError`, any
        exception, an interruption), the estimator is left as it was before
        the call.

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
        eval_set : list of one (X_val, y_val) pair, default=None
            Validation data (the convention of XGBoost and LightGBM): its
            loss and score are recorded after every epoch
            (``validation_loss_curve_``, ``validation_scores_``), and early
            stopping monitors it instead of holding out
            ``validation_fraction`` of X.
        X_val, y_val : default=None
            The same, under scikit-learn's names (``HistGradientBoosting``);
            a ``Pipeline(..., transform_input=['X_val'])`` transforms X_val
            with the steps before the estimator.
        initial_weights : dict of str -> array-like, default=None
            Values to start from for some or all trained weights (the
            graph's own values for the others).

        Returns
        -------
        self
        """
        keep_weights = self.warm_start and hasattr(self, "weights_")
        return self._partial_fit(
            X, y, sample_weight, max_iter=self.max_iter, reset=True,
            keep_weights=keep_weights, use_early_stopping=self.early_stopping,
            validation=(eval_set, X_val, y_val), initial_weights=initial_weights,
        )

    def _partial_fit(
        self, X, y, sample_weight, max_iter, reset, keep_weights=False,
        use_early_stopping=False, classes=None, validation=(None, None, None),
        initial_weights=None,
    ):
        first_call = not hasattr(self, "weights_")
        # Whatever happens until the call returns (an error, a divergence, an
        # interruption), a failure leaves the estimator as it was.
        previous = self._snapshot()
        try:
            y_given = y
            inputs, y, labels, sample_weight, uniform = self._prepare_training(
                X, y, sample_weight, reset, keep_weights, first_call, classes
            )
            if initial_weights is not None:
                self.weights_ = {**self.weights_, **self._checked_weights(
                    initial_weights, "initial_weights", partial=True)}
            validation = self._validation_data(*validation)
            self._check_scoring()
            if use_early_stopping and validation is None:
                # Split before any session is built: a split that cannot be
                # made is a refusal of the data, like the checks above.
                (inputs, labels, sample_weight), validation = self._hold_out(
                    inputs, y, labels, sample_weight)
            self._get_engine()
            return self._run_epochs(
                inputs, y, labels, sample_weight, uniform, max_iter, use_early_stopping,
                validation, callbacks_data=(X, y_given), use_all_epochs=reset,
            )
        except BaseException:
            self._restore(previous)
            raise

    def _snapshot(self):
        """What :meth:`_restore` needs to undo a call: the attributes (a
        call replaces them, never changes them in place, except what is
        noted here), the lengths of the curves it appends to, the states of
        the schedule and the random generator it advances, and the key of
        the engine it may rebuild."""
        state = dict(self.__dict__)
        lengths = {name: len(state[name]) for name in _CURVES if state.get(name) is not None}
        schedule = copy.copy(state.get("_schedule_state"))
        rng = state.get("_rng")
        runtime = state.get("_runtime")
        return (state, lengths, schedule, None if rng is None else rng.get_state(),
                None if runtime is None else runtime.engine_key)

    def _restore(self, snapshot):
        """Put back the state :meth:`_snapshot` saw.  scikit-learn's
        callback machinery, set up during the call, stays: it tears the
        callbacks down once the call is over."""
        state, lengths, schedule, rng_state, engine_key = snapshot
        callback_context = {k: v for k, v in self.__dict__.items() if k in _CALLBACK_CONTEXT}
        self.__dict__.clear()
        self.__dict__.update(state)
        self.__dict__.update(callback_context)
        for name, length in lengths.items():
            del getattr(self, name)[length:]
        if schedule is not None:
            vars(self._schedule_state).update(vars(schedule))
        if rng_state is not None:
            self._rng.set_state(rng_state)
        runtime = self.__dict__.get("_runtime")
        if runtime is not None and runtime.engine_key != engine_key:
            # The call rebuilt the engine for new parameters (another update
            # rule, say): the restored update state belongs to the old one,
            # so the next call rebuilds it and reconciles the two.
            runtime.engine = runtime.engine_key = None

    def _check_scoring(self):
        """Resolve ``scoring`` before training (a misspelt scorer fails now,
        not after an epoch)."""
        if self.scoring is not None and self.scoring != "loss":
            from sklearn.metrics import check_scoring

            check_scoring(self, scoring=self.scoring)

    def _prepare_training(self, X, y, sample_weight, reset, keep_weights, first_call, classes):
        """Validate the data and (on a reset) rebuild the model and state.

        Returns
        -------
        inputs, y, labels, sample_weight, uniform
            One array per graph input (see :mod:`onnxfit.inputs`), y as
            validated, labels in the graph's dtype (or one-hot column
            indices, see ``_encode_labels``); ``uniform`` is True when every
            sample weight is 1 (the engines then skip gathering them), and
            ``sample_weight`` is None when none was given and no class
            weights apply.
        """
        if keep_weights and not first_call:
            self._check_same_model()
        elif not reset and not first_call and (
                self._current_model_spec(with_source=False)
                != getattr(self, "_model_spec", (None,))[1:]):
            # (The graph itself is not hashed again at every call.)
            raise ValueError(
                "partial_fit continues training the fitted graph, but weights_to_train, "
                "output_name, loss_output or train_mode changed since it was fitted; "
                "call fit to train the new configuration."
            )
        check_backend(self.gradient_backend)
        check_device(self.device)
        start = reset or first_call
        rebuild = start and not (keep_weights and not first_call)
        # The graph decides how X feeds it: load it before validating X.
        onnx_model = self._load_model() if rebuild else None
        # scikit-learn's finiteness checks, with a faster first pass (see
        # assert_finite); everything else is validated as usual.
        with config_context(assume_finite=True):
            inputs, y = self._validate_inputs(
                X, y, onnx_model, rebuild, reset=reset and not keep_weights or first_call)
            uniform = sample_weight is None
            if sample_weight is not None:
                sample_weight = _check_sample_weight(
                    sample_weight, np.empty((n_samples(inputs), 0)), dtype=np.float64,
                    ensure_non_negative=True,
                )
                if not np.any(sample_weight):  # scikit-learn < 1.7 lets it through
                    raise ValueError(
                        "sample_weight is all zeros, so no sample would count: give at "
                        "least one positive weight."
                    )
        self._assert_finite_data(inputs, y, "X", "y")
        model = onnx_model if rebuild else self._get_model()
        if model is not None:
            _check_indices(inputs, model)
        if sample_weight is not None:
            assert_finite(sample_weight, "sample_weight", self)
        labels = self._validate_targets(y, reset=start, classes=classes)
        # Uniform weights stay None (no array of ones is made or gathered)
        # unless the hook weights the samples, as class weights do.
        sample_weight = self._weight_samples(labels, sample_weight)
        if sample_weight is not None:
            uniform = uniform and bool(np.all(sample_weight == 1))
        if start:
            self._start(inputs, labels, onnx_model, keep_weights=not rebuild)
        if sample_weight is not None:
            sample_weight = sample_weight.astype(self.dtype_, copy=False)
        labels = self._training_labels(labels)
        if self.running_statistics_ and min(n_samples(inputs), self._batch_size(
                n_samples(inputs))) < 2:
            raise ValueError(
                "BatchNormalization normalises with batch statistics while training "
                "(train_mode=True), which a batch of one sample does not have: use "
                "batch_size=2 or more and give partial_fit 2 samples or more (PyTorch "
                "refuses such batches too), or set train_mode=False."
            )
        if self._label_input is not None:
            # The graph computes its loss: y feeds its label input, and the
            # loss piece only weights the graph's loss (its label is unused).
            spec = self._label_spec()
            inputs[spec.name] = self._graph_labels(labels, spec)
            scalar_loss = self._loss_shape is None
            if scalar_loss and sample_weight is not None and np.ptp(sample_weight):
                raise ValueError(
                    f"The graph's loss {self._loss_output!r} is a scalar, so sample weights "
                    "(or class weights) cannot weight its samples; make the graph compute "
                    "one loss per sample (reduction='none' in PyTorch) to use them."
                )
            labels = np.zeros((len(labels),) + (self._loss_shape or ()), dtype=self.dtype_)
        return inputs, y, labels, sample_weight, uniform

    def _assert_finite_data(self, inputs, y, x_name, y_name):
        """scikit-learn's finiteness check of every input and of y."""
        for name, values in inputs.items():
            assert_finite(values, x_name if len(inputs) == 1 else f"{x_name}[{name!r}]", self)
        assert_finite(y, y_name, self)

    def _training_labels(self, labels):
        """Labels from :meth:`_validate_targets` as the loss takes them
        (:meth:`_encode_labels`, in the trained output's per-sample shape),
        checked against the fitted targets' shape."""
        labels = self._encode_labels(labels)
        label_shape = self.label_shape_
        if labels.dtype.kind in "iu":  # one-hot labels as column indices
            per_sample = int(np.prod(label_shape))
        else:
            per_sample = int(np.prod(labels.shape[1:]))
        if per_sample != int(np.prod(label_shape)):
            raise ValueError(
                f"y has {per_sample} value(s) per sample, but the estimator was fitted "
                f"on targets of shape {('n',) + label_shape} (the graph's output "
                f"{self.trained_output_!r}); refit with warm_start=False to change it."
            )
        if labels.dtype.kind not in "iu":
            labels = labels.reshape((len(labels),) + label_shape).astype(self.dtype_, copy=False)
        return labels

    def _label_spec(self):
        """The graph's label input, with the per-sample shape of the labels."""
        model = self._get_model()
        return InputSpec(model.label_name, model.label_spec.dtype,
                         self.input_shapes_[model.label_name])

    def _graph_labels(self, labels, spec):
        """Hook: ``labels`` (as :meth:`_encode_labels` gives them) as the
        graph's label input ``spec`` takes them."""
        return np.ascontiguousarray(labels.reshape((len(labels),) + spec.shape),
                                    dtype=spec.dtype)

    def _load_model(self):
        """The :class:`OnnxModel` of ``onnx_model`` (None for the default
        linear model, which is built once X's width is known)."""
        if self.onnx_model is None:
            if self.loss_output is not None:
                raise ValueError("loss_output names an output of onnx_model, which is None.")
            return None
        if self.loss_output is not None and self.output_name is None:
            raise ValueError(
                f"loss_output={self.loss_output!r} needs output_name=, the prediction the "
                "loss is computed from (predict and to_onnx use it)."
            )
        return self._prepare_model(normalise_model(load_onnx(self.onnx_model)))

    def _input_specs(self):
        """The graph inputs with the per-sample shapes of the fitted data."""
        return [InputSpec(s.name, s.dtype, self.input_shapes_[s.name])
                for s in self._get_model().input_specs]

    def _validate_inputs(self, X, y, onnx_model, rebuild, reset):
        """``X`` split into the graph's inputs (see :func:`to_graph_inputs`)
        and ``y`` validated; ``onnx_model`` is the graph to fit on a rebuild
        (None: the default linear model)."""
        check = dict(multi_output=True, y_numeric=self._y_numeric)
        if rebuild and onnx_model is None:
            if is_input_dict(X) or self.input_columns is not None:
                raise ValueError(
                    "The default linear model has one input fed by every column of a 2-D "
                    "X; a dict X and input_columns are for an onnx_model with several "
                    "inputs."
                )
            X, y = validate_data(self, X, y, reset=reset, dtype=[np.float64, np.float32],
                                 **check)
            return {"X": np.ascontiguousarray(X)}, y
        specs = onnx_model.input_specs if rebuild else self._input_specs()
        return to_graph_inputs(self, X, y, specs, self.input_columns, reset, **check)

    def _run_epochs(self, inputs, y, labels, sample_weight, uniform, max_iter,
                    use_early_stopping, validation=None, callbacks_data=(None, None),
                    use_all_epochs=False):
        """The training loop shared by ``fit`` and ``partial_fit``."""
        engine = self._get_engine()
        engine.set_state(self.weights_, self._update_state, self.running_statistics_)
        schedule_state, learning_rate = self._schedule_state, self._learning_rate
        weights = None if uniform else sample_weight
        n = n_samples(inputs)
        batch_size = self._batch_size(n)
        n_batches = engine.n_steps(n, batch_size)
        if use_all_epochs:
            # What a schedule over "the whole fit" (cosine) spans.
            schedule_state.total_steps = max_iter * n_batches
        # The first step's loss is the reference (see onnxfit.divergence),
        # with a mean over the data when that step sees few samples.
        guard = DivergenceGuard(
            self._mean_loss(inputs, labels, weights) if batch_size < SMALL_BATCH else None)
        stopping = _StoppingRule(self.tol, self.n_iter_no_change)
        callbacks = EpochCallbacks(self, *callbacks_data, max_iter, self._fitted_view)
        progress = _Progress(self, max_iter, n_batches)
        completed, before = False, None
        try:
            for _ in range(max_iter):
                callbacks.begin_epoch()
                loss, before = self._run_epoch(engine, inputs, y, labels, weights, batch_size,
                                               n_batches, guard, progress)
                if loss is None:  # diverged, and on_divergence='warn'
                    break
                self.loss_curve_.append(loss)
                progress.epoch(loss)
                if validation is not None:
                    state = engine.get_state()
                    monitored = self._validate_epoch(validation, state)
                if use_early_stopping:
                    improved = stopping.higher_is_better(monitored, state)
                else:
                    improved = stopping.lower_is_better(loss)
                stop = callbacks.end_epoch()
                if stopping.patience_ran_out(improved):
                    if learning_rate.trigger_stopping(schedule_state, self.verbose):
                        break
                    stopping.reset()
                if stop:
                    break
            else:
                if max_iter > 1 and self.tol is not None:
                    warnings.warn(
                        f"Maximum number of epochs ({max_iter}) reached before "
                        "convergence. Consider increasing max_iter.",
                        ConvergenceWarning,
                    )
            if engine.diverged_at is None:
                self.weights_, self._update_state, self.running_statistics_ = \
                    engine.get_state()
                self._check_final_weights(engine, inputs, y, labels, weights, guard, before)
            if stopping.best_state is not None:
                # The best epoch's weights with their own update-rule state, so
                # that a later partial_fit continues from that epoch.
                self.weights_, self._update_state, self.running_statistics_ = \
                    stopping.best_state
            self._runtime.export_session = None
            self.best_loss_ = stopping.best_loss
            completed = True
        finally:
            progress.close()
            callbacks.end_fit(completed)
        return self

    def _run_epoch(self, engine, inputs, y, labels, weights, batch_size, n_batches, guard,
                   progress):
        """One epoch: its mean loss (None when it diverged and
        ``on_divergence='warn'``: the state is then the one before it), and
        with ``on_divergence='warn'``, the state it started from."""
        rng, schedule_state = self._rng, self._schedule_state
        before = None
        if self.on_divergence == "warn":
            before = (engine.get_state(), copy.copy(schedule_state), rng.get_state())
        # intp indices: int32 would save half of this array's memory but cost
        # 7 % of a linear model's epoch (a cast in every take, a slower shuffle).
        order = rng.permutation(len(labels)) if self.shuffle else np.arange(len(labels))
        rates = self._learning_rate.rates(schedule_state, n_batches)
        try:
            loss = engine.run_epoch(
                inputs, labels, weights, order, batch_size, rates, rng=rng, guard=guard,
                on_step=progress.step if progress.steps is not None else None,
            )
        except ONNXRUNTIME_ERRORS as exc:
            raise ValueError(
                f"onnxruntime failed while training, at epoch {self.n_iter_ + 1}: "
                f"{' '.join(str(exc).split())}"
            ) from exc
        if engine.diverged_at is not None:
            self._diverged(engine.last_step_loss, guard, engine.diverged_at + 1, inputs, y,
                           engine, before)
            return None, before
        self.n_iter_ += 1
        self.t_ += n_batches
        return loss, before

    def _check_final_weights(self, engine, inputs, y, labels, weights, guard, before):
        """The last update of a call is not followed by a step that would
        check it: look at the loss at the final weights (see
        :mod:`onnxfit.divergence`); ``before`` is the state the last epoch
        started from (``on_divergence='warn'``)."""
        final = self._mean_loss(inputs, labels, weights)
        if guard.limit is not None and guard.diverged(final):
            self._diverged(final, guard, None, inputs, y, engine, before)
            if before is not None:  # the diverging epoch is undone
                self.n_iter_ -= 1
                self.t_ -= engine.n_steps(len(labels), self._batch_size(len(labels)))
                del self.loss_curve_[-1:]
                for name in ("validation_loss_curve_", "validation_scores_"):
                    curve = getattr(self, name)
                    if curve:
                        del curve[-1:]

    def _diverged(self, loss, guard, step, inputs, y, engine, before):
        """A loss diverged at ``step`` of the epoch (None: at the weights
        the call ends with): raise a :class:`ConvergenceError`, or, with
        ``on_divergence='warn'`` and the state ``before`` the epoch, warn and
        go back to that state."""
        epoch = self.n_iter_ + (1 if step is not None else 0)
        label = self._label_input
        causes = likely_causes(
            inputs={k: v for k, v in inputs.items() if k != label},
            y=inputs[label] if label is not None else y,
            regression=self._y_numeric, learning_rate=self._learning_rate,
            has_dropout=bool(self._get_training_graph().masks),
        )
        message = divergence_message(loss, guard.reference, epoch, step, causes,
                                     self.on_divergence if before is not None else "raise")
        if before is None:
            raise ConvergenceError(message, epoch=epoch, step=step, loss=loss,
                                   reference=guard.reference)
        warnings.warn(message, ConvergenceWarning)
        state, schedule, rng_state = before
        engine.set_state(*state)
        self.weights_, self._update_state, self.running_statistics_ = state
        vars(self._schedule_state).update(vars(schedule))
        self._rng.set_state(rng_state)

    def _validate_epoch(self, validation, state):
        """Record the validation loss and score of ``state``; return the
        value early stopping maximises (see ``scoring``)."""
        weights, _, statistics = state
        losses, output = self._sample_losses(validation.inputs, validation.labels,
                                             weights, statistics, with_output=True)
        loss = float(np.mean(losses)) if losses.ndim else float(losses)
        if self.validation_loss_curve_ is None:
            self.validation_loss_curve_, self.validation_scores_ = [], []
        # One entry per epoch: NaN for the epochs (partial_fit calls) that
        # had no validation data.
        for curve in (self.validation_loss_curve_, self.validation_scores_):
            curve.extend([np.nan] * (self.n_iter_ - 1 - len(curve)))
        self.validation_loss_curve_.append(loss)
        if self.scoring is None or self.scoring == "loss":
            score = self._score_output(output, validation.y)
        else:
            from sklearn.metrics import check_scoring

            scorer = check_scoring(self, scoring=self.scoring)
            view = _from_attributes(self, self._fitted_view(weights, statistics))
            score = float(scorer(view, validation.X, validation.y))
        self.validation_scores_.append(score)
        return -loss if self.scoring == "loss" else score

    def _fitted_view(self, weights=None, statistics=None):
        """Attributes that make a copy of the estimator predict with
        ``weights`` and ``statistics`` (default: the engine's current ones),
        for callbacks and scorers (see :func:`_from_attributes`)."""
        if weights is None:
            weights, _, statistics = self._get_engine().get_state()
        runtime = _Runtime()
        runtime.model = self._runtime.model
        return {"weights_": weights, "running_statistics_": statistics, "_runtime": runtime}

    def _hold_out(self, inputs, y, labels, sample_weight):
        """Early stopping's split: ``(inputs, labels, sample_weight)`` of
        the training part, and the :class:`_Validation` part."""
        n = n_samples(inputs)
        try:
            train_idx, val_idx = self._validation_split(n, y, self._rng)
        except ValueError:  # scikit-learn's splitter refuses an empty part
            train_idx = val_idx = ()
        if len(val_idx) == 0 or len(train_idx) == 0:
            raise ValueError(
                f"validation_fraction={self.validation_fraction} leaves an empty "
                f"training or validation set for {n} samples: give more samples, "
                "pass the validation data as eval_set=[(X_val, y_val)], or set "
                "early_stopping=False."
            )
        validation_inputs = take_rows(inputs, val_idx)
        # Predictions (a scorer's X) read no label input.
        predicted = {k: v for k, v in validation_inputs.items() if k != self._label_input}
        validation = _Validation(validation_inputs, y[val_idx], labels[val_idx], predicted)
        if sample_weight is not None:
            sample_weight = sample_weight[train_idx]
        return (take_rows(inputs, train_idx), labels[train_idx], sample_weight), validation

    def _validation_data(self, eval_set, X_val, y_val):
        """The :class:`_Validation` of ``fit``'s validation arguments, or None."""
        if eval_set is not None:
            if X_val is not None or y_val is not None:
                raise ValueError("Give the validation data once: eval_set or X_val/y_val.")
            pairs = list(eval_set)
            if len(pairs) != 1 or len(pairs[0]) != 2:
                raise ValueError(
                    "eval_set must be a list of one (X_val, y_val) pair, as "
                    f"eval_set=[(X_val, y_val)]; got {len(pairs)} item(s)."
                )
            X_val, y_val = pairs[0]
        elif (X_val is None) != (y_val is None):
            raise ValueError("X_val and y_val go together: give both or neither.")
        if X_val is None:
            return None
        inputs, y, labels = self._evaluation_inputs(X_val, y_val, "X_val", "y_val")
        return _Validation(inputs, y, labels, X_val)

    def _evaluation_inputs(self, X, y, x_name="X", y_name="y"):
        """Data to evaluate the fitted graph on: ``(inputs, y, labels)`` as
        training takes them (see :meth:`_prepare_training`)."""
        with config_context(assume_finite=True):
            inputs, y = to_graph_inputs(
                self, X, y, self._input_specs(), self.input_columns, reset=False,
                multi_output=True, y_numeric=self._y_numeric)
        self._assert_finite_data(inputs, y, x_name, y_name)
        _check_indices(inputs, self._get_model())
        labels = self._training_labels(self._validate_targets(y, reset=False))
        if self._label_input is not None:
            inputs[self._label_input] = self._graph_labels(labels, self._label_spec())
        return inputs, y, labels

    # -- losses -----------------------------------------------------------------
    def losses(self, X, y, sample_weight=None):
        """Each sample's loss under the trained model.

        Computed by the loss piece training minimises (or the graph's own
        per-sample loss, with ``loss_output``), in inference behaviour
        (Dropout off, BatchNormalization on its running statistics), without
        the penalty: sort by it to find the hardest examples.

        Parameters
        ----------
        X : array-like or dict
            As for :meth:`fit`.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), default=None
            Multiplies each sample's loss.

        Returns
        -------
        ndarray of shape (n_samples,), float64
        """
        check_is_fitted(self, "weights_")
        if self._label_input is not None and self._loss_shape is None:
            raise ValueError(
                f"The graph's loss {self._loss_output!r} is a scalar (a mean over the "
                "batch): it has no per-sample values. Export the graph with one loss per "
                "sample (reduction='none' in PyTorch) to get them."
            )
        inputs, _, labels = self._evaluation_inputs(X, y)
        losses = self._sample_losses(inputs, labels, self.weights_, self.running_statistics_)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, losses[:, None],
                                                 dtype=np.float64)
            losses = losses * sample_weight
        return losses

    def _mean_loss(self, inputs, labels, sample_weight):
        """The (sample-weighted) mean loss at the current weights on up to
        ``REFERENCE_SAMPLES`` samples spread over the data, in inference
        behaviour (see :mod:`onnxfit.divergence`); inf when not finite."""
        rows = np.unique(np.linspace(0, len(labels) - 1, min(REFERENCE_SAMPLES, len(labels)))
                         .astype(np.intp))
        losses = self._sample_losses(take_rows(inputs, rows), labels[rows], self.weights_,
                                     self.running_statistics_)
        if losses.ndim == 0:  # a graph's scalar loss
            mean = float(losses)
        else:
            mean = float(np.average(losses, weights=None if sample_weight is None
                                    else sample_weight[rows] + 1e-300))
        return mean if np.isfinite(mean) else np.inf

    def _sample_losses(self, inputs, labels, weights, statistics, with_output=False):
        """Per-sample losses (float64, or the scalar of a graph's scalar
        loss) of ``weights``; with ``with_output``, also the trained output."""
        session, names = self._get_loss_session()
        chunk = 4096
        losses, outputs = [], []
        for start in range(0, len(labels), chunk):
            rows = slice(start, start + chunk)
            feeds = take_rows(inputs, rows)
            if self._label_input is None:
                feeds[LABEL] = self._dense_labels(labels[rows])
            feeds.update(weights)
            feeds.update(statistics)
            loss, output = session.run(names, feeds)
            losses.append(loss.reshape(len(loss), -1).sum(axis=1) if loss.ndim else loss)
            outputs.append(output)
        if losses and losses[0].ndim == 0:  # a scalar graph loss: one value per chunk
            sizes = [len(o) for o in outputs]
            loss = np.average(np.asarray(losses, dtype=np.float64), weights=sizes)
        else:
            loss = np.concatenate(losses).astype(np.float64)
        return (loss, np.concatenate(outputs)) if with_output else loss

    def _dense_labels(self, labels):
        """Labels as the loss piece reads them: one-hot rows for class
        column indices (see ``_encode_labels``), else as they are."""
        if labels.dtype.kind not in "iu":
            return labels
        width = int(np.prod(self.label_shape_))
        dense = np.zeros((len(labels), width), dtype=self.dtype_)
        dense[np.arange(len(labels)), labels] = 1
        return dense.reshape((len(labels),) + self.label_shape_)

    def _get_loss_session(self):
        """A session computing each sample's loss and the trained output, in
        inference behaviour: ``(session, [loss name, output name])``."""
        runtime = self._runtime
        if runtime.loss_session is None:
            output = self.trained_output_
            if self._label_input is not None:
                model = self._get_model().forward_model(sample_shapes=self.input_shapes_)
                if self.train_mode:
                    model = inference_graph(model)
                    statistics_as_inputs(model.graph, self.running_statistics_)
                loss = self._loss_output
                elem = onnx_elem_type(self.dtype_)
                set_outputs(model.graph, [(loss, elem, None), (output, elem, None)])
            else:
                model = onnx.ModelProto()
                model.CopyFrom(self._get_predict_model())
                piece = self._make_loss().per_sample_piece(self.dtype_)
                declare_input(model.graph, LABEL, self.dtype_, ["N", *self.label_shape_])
                loss = append_piece(model.graph, piece, "onnxfit.losses.",
                                    {"prediction": output, "label": LABEL})["losses"]
                elem = onnx_elem_type(self.dtype_)
                set_outputs(model.graph, [(loss, elem, ["N"]), (output, elem, None)])
            runtime.loss_session = (
                make_session(model, self.n_threads, self.dtype_, self._device()), [loss, output])
        return runtime.loss_session

    def _batch_size(self, n_samples):
        """Samples per update for a call on ``n_samples`` samples.

        ``'auto'`` is ``n_samples // 1000`` clipped to [1, 64]: per-sample
        updates on small data, as scikit-learn's SGD (whose accuracy per
        epoch they match), and batches of 64 from 64,000 samples on, where
        the cost of a step is amortised over enough samples to beat
        per-sample updates in time to the same accuracy.  A graph
        normalising with batch statistics (BatchNormalization with
        ``train_mode``) gets 32 to 64.
        """
        if self.batch_size == "auto":
            if self.running_statistics_:
                # Batch statistics need batches (PyTorch users' usual 32).
                return int(min(n_samples, max(32, min(64, n_samples // 1000))))
            return int(min(64, max(1, n_samples // 1000)))
        return min(self.batch_size, n_samples)

    def _weight_samples(self, labels, sample_weight):
        """Hook for class weights: ``sample_weight`` (None for uniform
        weights) times any per-sample factor, given the targets as
        :meth:`_validate_targets` returned them; regression uses it as is."""
        return sample_weight

    def _encode_labels(self, labels):
        """Hook: labels from :meth:`_validate_targets` in the form the trained
        output needs, once the graph is known: classification gives each
        sample's column in the graph's class order (the engines expand them
        to one-hot rows batch by batch); regression uses them as they are."""
        return labels

    def _prepare_model(self, model):
        """Hook: the :class:`OnnxModel` to train for the normalised graph
        ``model`` (classification rewrites some converter operators and picks
        the scores to train)."""
        return OnnxModel(model, self.weights_to_train, self.output_name, self.loss_output)

    def _prediction_outputs(self):
        """Values that predictions read: the trained output (subclasses add
        more, e.g. probabilities)."""
        return [self.trained_output_]

    def _prediction_model(self):
        """:meth:`to_onnx` with each of :meth:`_prediction_outputs` exposed
        as a graph output (the trained value may be an intermediate one)."""
        model = self.to_onnx()
        graph = model.graph
        present = {o.name for o in graph.output}
        infos = {v.name: v for v in graph.value_info}
        for name in self._prediction_outputs():
            if name and name not in present:
                info = infos.get(name)
                if info is None:
                    info = helper.make_tensor_value_info(name, onnx_elem_type(self.dtype_), None)
                graph.output.append(info)
                present.add(name)
        return model

    def _start(self, inputs, labels, onnx_model, keep_weights):
        """Build the model and reset the training state (``fit`` or the first
        ``partial_fit``); ``onnx_model`` is the loaded graph (None: the
        default linear model)."""
        if not keep_weights:
            self._runtime = runtime = _Runtime()
            self._model_spec = self._current_model_spec()
            if onnx_model is None:
                X = inputs["X"]
                dtype = np.float64 if X.dtype == np.float64 else np.float32
                onnx_model = self._prepare_model(
                    self._default_model(X.shape[1], labels, dtype))
            runtime.model = onnx_model
            self.onnx_model_ = onnx_model.model
            self.trained_output_ = onnx_model.output_name
            self.weights_to_train_ = list(onnx_model.weight_names)
            self.dtype_ = onnx_model.dtype
            self.input_dtype_ = onnx_model.input_dtype
            self.input_shapes_ = {name: tuple(v.shape[1:]) for name, v in inputs.items()}
            self._loss_output = onnx_model.loss_output
            self._label_input = onnx_model.label_name
            if self._label_input is not None:
                self.input_shapes_[self._label_input] = self._label_sample_shape(
                    onnx_model.label_spec, labels)
            self.weights_ = onnx_model.initial_weights()
            self.running_statistics_ = dict(self._get_training_graph().initial_statistics)
            self.label_shape_ = self._probe_label_shape(inputs, labels)
            self._loss_shape = self._graph_loss_shape() if self._label_input else None
        learning_rate = self._update_rule()
        self._update_state = {
            w: learning_rate.initial_state(a) for w, a in self.weights_.items()
        }
        self._schedule_state = ScheduleState()
        self._rng = check_random_state(self.random_state)
        self.n_iter_ = 0
        self.t_ = 0
        self.loss_curve_ = []
        self.validation_scores_ = [] if self.early_stopping else None
        self.validation_loss_curve_ = [] if self.early_stopping else None

    def _current_model_spec(self, with_source=True):
        """What defines the trained graph: the model (by content, unless
        ``with_source=False``), the weights to train, the outputs and the
        training behaviour."""
        weights = self.weights_to_train
        if weights is not None and not isinstance(weights, str):
            weights = tuple(weights)
        rest = (weights, self.output_name, self.loss_output, self.train_mode)
        if not with_source:
            return rest
        source = self.onnx_model
        if isinstance(source, onnx.ModelProto):
            source = hashlib.sha256(source.SerializeToString()).hexdigest()
        elif isinstance(source, (bytes, bytearray)):
            source = hashlib.sha256(bytes(source)).hexdigest()
        elif source is not None:
            source = os.fspath(source)
        return (source,) + rest

    def _check_same_model(self):
        """A warm start keeps weights: the graph they belong to must not change."""
        if self._current_model_spec() != getattr(self, "_model_spec", None):
            raise ValueError(
                "warm_start=True keeps the weights of the previous fit, but onnx_model, "
                "weights_to_train, output_name, loss_output or train_mode changed since; set "
                "warm_start=False "
                "to train the new configuration from its initial weights."
            )

    def _label_sample_shape(self, spec, labels):
        """Per-sample shape of the graph's label input: as declared, its
        symbolic dimension (at most one) sized by the labels."""
        width = int(np.prod(labels.shape[1:])) if labels.ndim > 1 else 1
        if spec.width is not None:
            return tuple(spec.shape)
        if sum(d is None for d in spec.shape) > 1:
            raise ValueError(
                f"The graph's label input {spec.describe()} has several symbolic "
                "dimensions; declare its per-sample shape."
            )
        known = int(np.prod([d for d in spec.shape if d is not None]))
        return tuple(width // known if d is None else d for d in spec.shape)

    def _graph_loss_shape(self):
        """Per-sample shape of the graph's own loss: None for a scalar loss,
        else its shape without the batch dimension (``()`` for ``(N,)``)."""
        graph = self._get_training_graph()
        shape = batch_shapes(graph.model, self.input_shapes_)[0].get(self._loss_output)
        if shape is None or False in shape or (shape and shape[0] is not None) or (
                None in shape[1:]):
            raise ValueError(
                f"The shape of loss_output={self._loss_output!r} is not known from the "
                f"graph ({'unknown' if shape is None else shape}); it must be a scalar or "
                "have one value per sample (a first dimension that is the batch)."
            )
        return tuple(shape[1:]) if shape else None

    def _probe_label_shape(self, inputs, labels):
        """The trained output's per-sample shape: from onnx's shape inference
        on the data's shapes when it tells (no onnxruntime call), else from
        running the graph on one row, checked against y's."""
        label_shape = self._output_sample_shape(inputs)
        want = labels.shape[1:]
        if int(np.prod(label_shape)) != int(np.prod(want)):
            raise ValueError(
                f"The graph's output {self.trained_output_!r} has shape "
                f"{_shape_text(label_shape)} but y has shape {_shape_text(want)}; they must "
                "hold the same number of values per sample: give y one column per value "
                "of the output, or name another output with output_name=."
            )
        return label_shape

    def _output_sample_shape(self, inputs):
        """Per-sample shape of the trained output for ``inputs``: by shape
        inference when it tells (see :meth:`_static_output_shape`), else
        by running the graph on one row."""
        shape = self._static_output_shape(inputs)
        if shape is not None:
            return shape
        try:
            out = self._predict_raw(take_rows(inputs, slice(0, 1)), self.weights_)
        except RuntimeError as exc:  # onnxruntime's own errors
            raise ValueError(
                f"The graph fails on one sample of X fed as {self._fed_shapes(inputs)}: {exc}"
            ) from exc
        return tuple(out.shape[1:]) if out.ndim > 1 else ()

    @staticmethod
    def _fed_shapes(inputs):
        return "{" + ", ".join(f"{name!r}: {_shape_text(values.shape[1:])}"
                               for name, values in inputs.items()) + "}"

    def _static_output_shape(self, inputs):
        """Per-sample shape of the trained output by onnx's shape inference
        with the data's per-sample shapes, at two batch sizes; None when
        inference cannot tell.

        Raises
        ------
        ValueError
            When strict inference finds that the data's shapes do not fit
            a standard operator of the graph (a width the weights cannot
            take), before onnxruntime would fail on it.
        """
        model = self._get_model().forward_model(prediction=True)
        standard = all(n.domain in ("", "ai.onnx", "ai.onnx.ml") for n in model.graph.node)
        found = []
        for batch in (2, 3):
            probe = onnx.ModelProto()
            probe.CopyFrom(model)
            # Only what X implies: shapes the graph declares for its values
            # (often wrong in exported graphs, and onnxruntime ignores them)
            # are inferred again.
            del probe.graph.value_info[:]
            for value in probe.graph.output:
                if value.type.HasField("tensor_type"):
                    value.type.tensor_type.ClearField("shape")
            for value in probe.graph.input:
                if value.name in inputs:
                    value.CopyFrom(helper.make_tensor_value_info(
                        value.name, value.type.tensor_type.elem_type,
                        [batch, *inputs[value.name].shape[1:]]))
            try:
                probe = onnx.shape_inference.infer_shapes(probe, strict_mode=True,
                                                          data_prop=True)
            except onnx.shape_inference.InferenceError as exc:
                if not standard:
                    return None
                detail = " ".join(str(exc).split())
                raise ValueError(
                    f"X does not fit the graph: fed as {self._fed_shapes(inputs)}, the "
                    f"graph fails onnx's shape inference ({detail}). Give X the per-sample "
                    "shape the graph's weights take."
                ) from exc
            except Exception:  # shape inference cannot tell
                return None
            value = next((v for v in list(probe.graph.output) + list(probe.graph.value_info)
                          if v.name == self.trained_output_), None)
            if value is None or not value.type.HasField("tensor_type") or \
                    not value.type.tensor_type.HasField("shape"):
                return None
            dims = value.type.tensor_type.shape.dim
            if not all(d.HasField("dim_value") for d in dims):
                return None
            found.append(tuple(d.dim_value for d in dims))
        (first, *rest), (second, *other) = found[0] or (0,), found[1] or (0,)
        if (first, second) != (2, 3) or rest != other:
            return None
        return tuple(rest)

    def _get_model(self):
        """The :class:`OnnxModel` of the fitted graph, built on first use."""
        runtime = self._runtime
        if runtime.model is None:
            runtime.model = OnnxModel(
                self.onnx_model_, self.weights_to_train_, self.trained_output_,
                self._loss_output,
            )
        return runtime.model

    def _get_training_graph(self):
        """The forward graph training runs: with Dropout and BatchNormalization
        in training behaviour when ``train_mode`` (see
        :mod:`onnxfit.training_mode`), else the graph as written."""
        runtime = self._runtime
        if runtime.training_graph is None:
            forward = self._get_model().forward_model(sample_shapes=self.input_shapes_)
            if self.train_mode:
                runtime.training_graph = training_graph(
                    forward, self.input_shapes_, self.weights_)
            else:
                runtime.training_graph = TrainingGraph(forward)
        return runtime.training_graph

    def _get_predict_model(self):
        """The forward graph predictions run during training (validation
        scores): inference behaviour, running statistics as inputs."""
        runtime = self._runtime
        if runtime.predict_model is None:
            model = self._get_model().forward_model(prediction=True)
            if self.train_mode:
                # forward_model gives a copy of its own: changed in place.
                model = inference_graph(model)
                statistics_as_inputs(model.graph, self.running_statistics_)
            runtime.predict_model = model
        return runtime.predict_model

    def _auto_learning_rate(self):
        """Hook: the rule name ``learning_rate='auto'`` stands for."""
        raise NotImplementedError

    def _update_rule(self):
        """The update-rule object ``learning_rate`` names, with ``eta0``."""
        name = self._auto_learning_rate() if self.learning_rate == "auto" else self.learning_rate
        rule = make_learning_rate(name, schedule=self.schedule, alpha=self.alpha)
        if self.eta0 is not None:
            if not isinstance(self.learning_rate, str):
                raise ValueError(
                    f"eta0={self.eta0!r} and learning_rate={self.learning_rate!r} both set "
                    "the step size: give it in the object (its eta0) or name the rule "
                    "(learning_rate='sgd', ...) with eta0."
                )
            rule.set_params(eta0=self.eta0)
            rule._check()
        return rule

    def _training_pieces(self):
        """The loss, penalty and update-rule objects the parameters name."""
        loss = GraphLoss(per_sample=self._loss_shape is not None) \
            if self._label_input is not None \
            else self._make_loss()
        return (loss, make_penalty(self.penalty, self.alpha, self.l1_ratio),
                self._update_rule())

    def _build_problem(self, pieces=None):
        """The :class:`TrainingProblem` of the current parameters."""
        loss, penalty, learning_rate = pieces or self._training_pieces()
        graph = self._get_training_graph()
        own_loss = self._label_input is not None
        return TrainingProblem(
            forward_model=graph.model,
            inputs=self._input_specs() + ([self._label_spec()] if own_loss else []),
            output_name=self._loss_output if own_loss else self.trained_output_,
            weight_names=list(self.weights_to_train_),
            weight_shapes={w: a.shape for w, a in self.weights_.items()},
            dtype=self.dtype_,
            label_shape=(self._loss_shape or ()) if own_loss else self.label_shape_,
            masks=list(graph.masks),
            statistics=dict(graph.statistics),
            statistic_shapes={n: a.shape for n, a in self.running_statistics_.items()},
            loss=loss,
            penalty=penalty,
            learning_rate=learning_rate,
            n_threads=self.n_threads,
            gradient_backend=self.gradient_backend,
            device=parse_device(self.device),
            max_grad_norm=self.max_grad_norm,
        )

    def _get_engine(self):
        """The training engine, rebuilt when a parameter it depends on changed."""
        runtime = self._runtime
        pieces = self._training_pieces()
        key = (self.engine, *map(_params_key, pieces), self.n_threads, self.gradient_backend,
               str(parse_device(self.device)), self.max_grad_norm)
        if runtime.engine is None or runtime.engine_key != key:
            problem = self._build_problem(pieces)
            runtime.engine = make_engine(self.engine, problem)
            runtime.engine_key = key
            # set_params may have switched to an update rule with other state
            # tensors: keep those that exist, start the new ones at zero.
            rule = problem.learning_rate
            self._update_state = {
                w: {
                    name: self._update_state.get(w, {}).get(name, fresh)
                    for name, fresh in rule.initial_state(self.weights_[w]).items()
                }
                for w in self.weights_
            }
        self._learning_rate = runtime.engine.problem.learning_rate
        return runtime.engine

    # -- prediction -----------------------------------------------------------
    def _predict_raw(self, inputs, weights, statistics=None):
        """The trained output for validated ``inputs`` (one array per graph
        input), ``weights`` and running ``statistics`` (default: the
        fitted ones), in inference behaviour."""
        runtime = self._runtime
        if runtime.predict_session is None:
            runtime.predict_session = make_session(
                self._get_predict_model(), self.n_threads, self.dtype_, self._device()
            )
        feeds = dict(inputs)
        feeds.update(weights)
        feeds.update(self.running_statistics_ if statistics is None else statistics)
        return runtime.predict_session.run([self.trained_output_], feeds)[0]

    def _device(self):
        """The device of the ``device`` parameter, checked (see
        :func:`onnxfit.sessions.check_device`)."""
        return check_device(self.device)

    def _forward(self, X, output_names=None):
        """Run the exported graph (see :meth:`to_onnx`) on ``X``.

        Predictions come from the very graph ``to_onnx`` returns, so that an
        ``InferenceSession`` on the export reproduces them exactly.

        Returns
        -------
        ndarray or list of ndarray
            The trained output, or the outputs named in ``output_names``.
        """
        check_is_fitted(self, "weights_")
        feeds, _ = to_graph_inputs(self, X, None, self._input_specs(), self.input_columns,
                                   reset=False)
        # After the cast to the graph's types: a dict X is not checked before,
        # and float64 values may overflow a float32 input.
        self._assert_finite_data(feeds, None, "X", None)
        _check_indices(feeds, self._get_model())
        runtime = self._runtime
        if runtime.export_session is None:
            runtime.export_session = make_session(
                self._prediction_model(), self.n_threads, self.dtype_, self._device()
            )
        names = [self.trained_output_] if output_names is None else list(output_names)
        try:
            outputs = runtime.export_session.run(names, feeds)
        except ONNXRUNTIME_ERRORS as exc:
            raise ValueError(
                f"onnxruntime failed to predict on X fed as {self._fed_shapes(feeds)}: "
                f"{' '.join(str(exc).split())}"
            ) from exc
        return outputs[0] if output_names is None else outputs

    def training_graphs(self):
        """The ONNX graphs training runs, by name, to save or view.

        The fused engine runs one graph per step (``'training_step'``:
        forward, loss, gradients and update); the forward-backward engine
        runs ``'model_forward'``, ``'loss'``, ``'model_backward'``,
        ``'penalty'`` (when weights are penalized) and ``'update'``.

        Returns
        -------
        dict of str -> onnx.ModelProto
            Copies: changing them changes nothing in the estimator.
        """
        check_is_fitted(self, "weights_")
        return self._get_engine().graphs()

    # -- state in and out -------------------------------------------------------
    def get_state(self):
        """Everything a continued training needs, as a dict of arrays.

        Returns
        -------
        dict
            ``'weights'`` (name -> array), ``'update_state'`` (weight ->
            state name -> array: the update rule's velocities, moments...),
            ``'running_statistics'`` (name -> array), ``'schedule'``
            (``{'t': updates done, 'decay': adaptive factor, ...}``),
            ``'n_iter'``, ``'t'`` and ``'random_state'`` (the shuffling and
            Dropout generator's state).  Copies: changing them changes
            nothing in the estimator.  :meth:`set_state` takes it back, and
            a fit continued from it equals one that never stopped.
        """
        check_is_fitted(self, "weights_")
        return copy.deepcopy({
            "weights": self.weights_,
            "update_state": self._update_state,
            "running_statistics": self.running_statistics_,
            "schedule": dict(vars(self._schedule_state)),
            "n_iter": self.n_iter_,
            "t": self.t_,
            "random_state": self._rng.get_state(legacy=False),
        })

    def set_state(self, state):
        """Load weights and training state (as :meth:`get_state` gives them)
        into a fitted estimator of the same graph.

        Parameters
        ----------
        state : dict
            ``'weights'`` is required; the other entries of
            :meth:`get_state` are optional (missing ones keep their current
            value).  Nothing in ``state`` is modified or kept by reference.

        Returns
        -------
        self
        """
        check_is_fitted(self, "weights_")
        if not isinstance(state, dict) or "weights" not in state:
            raise ValueError("state must be a dict with a 'weights' entry, as get_state gives.")
        known = {"weights", "update_state", "running_statistics", "schedule", "n_iter", "t",
                 "random_state"}
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"Unknown state entries {unknown}; expected some of {sorted(known)}.")
        weights = self._checked_weights(state["weights"], "state['weights']", partial=False)
        update_state = self._update_state
        if "update_state" in state:
            rule_states = {w: set(s) for w, s in self._update_state.items()}
            given = state["update_state"]
            if not isinstance(given, dict) or {w: set(s) for w, s in given.items()} != rule_states:
                raise ValueError(
                    "state['update_state'] does not hold the state of this estimator's update "
                    f"rule ({type(self._update_rule()).__name__}: "
                    f"{sorted(next(iter(rule_states.values()), []))} per weight)."
                )
            update_state = {w: {k: self._checked_array(v, self.weights_[w].shape,
                                                       f"state['update_state'][{w!r}][{k!r}]")
                                for k, v in s.items()} for w, s in given.items()}
        statistics = self.running_statistics_
        if "running_statistics" in state:
            given = state["running_statistics"]
            if set(given) != set(statistics):
                raise ValueError(
                    f"state['running_statistics'] has {sorted(given)}, the graph "
                    f"{sorted(statistics)}."
                )
            statistics = {k: self._checked_array(v, statistics[k].shape,
                                                 f"state['running_statistics'][{k!r}]")
                          for k, v in given.items()}
        schedule = copy.deepcopy(self._schedule_state)
        for name, value in state.get("schedule", {}).items():
            if not hasattr(schedule, name):
                raise ValueError(f"Unknown schedule state {name!r}.")
            setattr(schedule, name, copy.deepcopy(value))
        rng = self._rng
        if "random_state" in state:
            rng = np.random.RandomState()
            rng.set_state(copy.deepcopy(state["random_state"]))
        self.weights_, self._update_state, self.running_statistics_ = (
            weights, update_state, statistics)
        self._schedule_state, self._rng = schedule, rng
        self.n_iter_ = int(state.get("n_iter", self.n_iter_))
        self.t_ = int(state.get("t", self.t_))
        self._runtime.export_session = None
        return self

    def _checked_array(self, value, shape, what):
        array = np.array(value, dtype=self.dtype_, copy=True)
        if array.shape != tuple(shape):
            raise ValueError(f"{what} has shape {array.shape}; the graph's is {tuple(shape)}.")
        assert_finite(array, what, self)
        return array

    def _checked_weights(self, weights, what, partial):
        """Copies of ``weights`` (name -> array) checked against the trained
        weights: known names, same shapes, finite values; every weight
        unless ``partial``."""
        if not isinstance(weights, dict):
            raise TypeError(f"{what} must be a dict of weight name -> array.")
        unknown = sorted(set(weights) - set(self.weights_))
        missing = [] if partial else sorted(set(self.weights_) - set(weights))
        if unknown or missing:
            raise ValueError(
                f"{what} " + (f"names weights the estimator does not train: {unknown}"
                              if unknown else f"misses weights: {missing}")
                + f"; the trained weights are {sorted(self.weights_)}."
            )
        return {name: self._checked_array(value, self.weights_[name].shape,
                                          f"{what}[{name!r}]")
                for name, value in weights.items()}

    def to_onnx(self):
        """The user's graph (all its outputs) with the trained weights.

        Returns
        -------
        onnx.ModelProto
            ``onnxruntime.InferenceSession`` on it computes what ``predict``
            does.
        """
        check_is_fitted(self, "weights_")
        model = self._get_model().export({**self.weights_, **self.running_statistics_})
        return inference_graph(model) if self.train_mode else model

    # -- pickling ---------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        if "_runtime" in state:
            state = dict(state)
            state["_runtime"] = _Runtime()
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        tags.non_deterministic = False
        return tags
