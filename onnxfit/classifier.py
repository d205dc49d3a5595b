"""OnnxSGDClassifier: train an ONNX classification graph with SGD."""

import numpy as np
from scipy.special import expit, log_expit, log_softmax, softmax
from sklearn.base import ClassifierMixin, _fit_context
from sklearn.metrics import accuracy_score
from sklearn.utils import compute_class_weight
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d

from .callbacks import with_callbacks
from .classifier_graph import (
    analyse_classifier_graph,
    class_key,
    infer_value_types,
    rewrite_linear_classifiers,
)
from .estimator import BaseOnnxSGD
from .losses import CLASSIFICATION_LOSSES, BaseLoss, HingeLoss, ModifiedHuberLoss, make_loss
from .model import OnnxModel, linear_model


class OnnxSGDClassifier(ClassifierMixin, BaseOnnxSGD):
    """Train an ONNX graph as a classifier with mini-batch SGD.

    Gradients come from the graph itself (onnxfit differentiates it); the update
    comes from a learning-rate object.  ``OnnxSGDClassifier()`` alone trains
    a linear model -- one logit for two classes, one logit per class
    otherwise -- like ``SGDClassifier(loss='log_loss')``.

    **Which value is trained.**  ``output_name`` names the value holding the
    class scores or probabilities; None picks the tensor feeding a ZipMap
    (skl2onnx's default probability output, a sequence of maps with no
    gradient), else the first float tensor output.  When that value is
    computed by a final softmax or sigmoid (skl2onnx's ``LogisticRegression``,
    ``SGDClassifier(loss='log_loss')`` and ``MLPClassifier``, or a hand-written
    graph ending with Softmax), onnxfit trains the scores that feed it, with
    a numerically stable cross-entropy, and keeps the softmax/sigmoid for
    prediction; ``trained_output_`` tells which value that is.  Otherwise the
    value is trained as raw scores (logits), or, for a converted classifier
    (a graph with a label or ZipMap output) whose probabilities could not be
    traced back to scores, as probabilities with a clipped log-likelihood.
    An integer/string label output or a ZipMap output cannot be trained and
    is refused with an explanation.

    skl2onnx writes ``LogisticRegression`` as ``ai.onnx.ml.LinearClassifier``,
    whose coefficients are node attributes: onnxfit replaces that node by
    the same computation in MatMul + Add + Softmax/Sigmoid + Gather, with the
    same output names (converting with ``black_op={'LinearClassifier'}``
    gives a trainable graph as well).

    **Classes.**  ``classes_`` is sorted like scikit-learn's.  When the graph
    names its classes (ZipMap, or a label table as skl2onnx writes), labels
    are matched to the graph's columns by value, so the trained graph's label
    output stays right; a graph built for other classes is refused.  Raw
    scores are read in the order of ``classes_``.

    Parameters
    ----------
    onnx_model : onnx.ModelProto, bytes, str or path-like, default=None
        Graph to train, with one input.  None builds a linear model at
        ``fit`` time, in float64 if X is float64, else float32.
    weights_to_train : list of str, default=None
        Initializers to train; None trains every floating-point initializer
        the trained output depends on, except scalars (constants exporters
        write: an attention scale, the zero an initial state is expanded
        from) and BatchNormalization's running statistics.
    output_name : str, default=None
        Value holding the class scores or probabilities (see above).
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
    learning_rate : str or BaseLearningRate, default='nesterov'
        Update rule and schedule.  ``'nesterov'`` is
        ``LearningRateSGDNesterov()`` (``eta0=0.01``, momentum 0.9, constant
        rate): it matches ``SGDClassifier(loss='log_loss')`` on standardised
        data and trains small networks well, whereas ``SGDClassifier``'s
        ``'optimal'`` schedule (``LearningRateSGD(schedule='optimal')``)
        starts with rates near ``1 / (alpha t0)`` that suit linear models
        only.  ``'sgd'`` is ``LearningRateSGD()`` (invscaling, ``eta0=0.01``),
        the regressor's rule for its linear model; ``'auto'`` is
        ``'nesterov'`` here.  ``'momentum'``, ``'adam'``, ``'adamw'``,
        ``'rmsprop'`` and ``'adagrad'`` are ``LearningRateMomentum()``,
        ``LearningRateAdam()``, ``LearningRateAdamW()``,
        ``LearningRateRMSprop()`` and ``LearningRateAdagrad()``: torch.optim's
        rules with its defaults (constant rate).  Pass an object to search its
        parameters (``learning_rate__eta0``).
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
    loss : {'log_loss', 'hinge', 'modified_huber'} or BaseLoss, default='log_loss'
        ``'log_loss'`` is the sigmoid cross-entropy for one logit (or for
        the one-vs-rest sigmoids of a converted ``SGDClassifier``), the
        softmax cross-entropy for one logit per class, and the clipped
        negative log-likelihood when probabilities are trained.
        ``'hinge'`` and ``'modified_huber'`` are ``SGDClassifier``'s margin
        losses (one-vs-rest over the columns); they need raw scores.
    penalty : {'l2', 'l1', 'elasticnet'}, None, ElasticNetPenalty or dict, default='l2'
        Applied to weight tensors of rank >= 2 (not biases).  A dict
        penalizes weights by name, each as its value says: ``'l2'``,
        ``'l1'`` or ``'elasticnet'`` (with ``alpha`` and ``l1_ratio``), an
        ``ElasticNetPenalty`` (its own strength) or None; a named bias is
        penalized, weights left out are not.
    alpha : float, default=1e-4
    l1_ratio : float, default=0.15
    batch_size : int, default=64
    max_iter : int, default=1000
        Maximum number of epochs.
    tol : float or None, default=1e-3
        Training stops when the loss (or the validation accuracy with early
        stopping) has not improved by ``tol`` for ``n_iter_no_change``
        epochs.  None disables the criterion.
    n_iter_no_change : int, default=5
    shuffle : bool, default=True
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
        accuracy (``score``); ``'loss'``, the validation loss (minimised);
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
    classes_ : ndarray of shape (n_classes,)
    onnx_model_ : onnx.ModelProto
        The graph prepared for training (normalised, LinearClassifier
        rewritten, shapes inferred); ``to_onnx()`` is this graph with the
        trained weights.
    trained_output_ : str
        Value the loss is computed on.
    input_shapes_ : dict of str -> tuple
        Per-sample shape of each graph input, as fitted (X has shape
        ``(n_samples, *input_shapes_[name])``; ``n_features_in_`` is the
        total of their sizes).
    running_statistics_ : dict of str -> ndarray
        BatchNormalization's running means and variances (``train_mode``),
        written into the exported graph; empty otherwise.
    weights_ : dict of str -> ndarray
    weights_to_train_ : list of str
    loss_curve_ : list of float
        Mean training objective (loss + penalty) per epoch.
    validation_scores_ : list of float or None
        Validation score per epoch (the accuracy, or ``scoring``'s), with
        early stopping or validation data; None otherwise.
    validation_loss_curve_ : list of float or None
        Mean validation loss per epoch (no penalty), likewise.
    n_iter_ : int
    t_ : int
        Weight updates (mini-batches) done.
    n_features_in_ : int
    feature_names_in_ : ndarray of str

    Examples
    --------
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from onnxfit import OnnxSGDClassifier
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> model = make_pipeline(StandardScaler(), OnnxSGDClassifier(random_state=0))
    >>> model.fit(X, y).score(X, y) > 0.95
    True
    """

    _parameter_constraints = {
        **BaseOnnxSGD._parameter_constraints,
        "loss": [StrOptions(set(CLASSIFICATION_LOSSES)), BaseLoss],
        "class_weight": [StrOptions({"balanced"}), dict, None],
    }
    _y_numeric = False

    def __init__(
        self, onnx_model=None, *, weights_to_train=None, output_name=None,
        loss_output=None, input_columns=None, train_mode=True, learning_rate="nesterov",
        eta0=None, schedule=None, max_grad_norm=None, loss="log_loss", penalty="l2",
        alpha=1e-4, l1_ratio=0.15, batch_size=64, max_iter=1000, tol=1e-3,
        n_iter_no_change=5, shuffle=True, random_state=None, early_stopping=False,
        validation_fraction=0.1, scoring=None, on_divergence="raise", class_weight=None,
        warm_start=False, verbose=0, engine="fused", n_threads=None,
        gradient_backend="onnxfit", device="cpu",
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
        self.class_weight = class_weight

    # -- training -------------------------------------------------------------
    @with_callbacks
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None, sample_weight=None, *, eval_set=None, X_val=None,
                    y_val=None):
        """Run one epoch over ``(X, y)``, continuing from the current state.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, ...), or dict
            Features: a 2-D array or DataFrame (its columns assigned to the
            graph's inputs, see ``input_columns``), an array of the graph
            input's per-sample shape, or a dict ``{input name: array}``.
            Sparse matrices are refused (a ``TypeError``): pass
            ``X.toarray()``.
        y : array-like of shape (n_samples,)
        classes : array-like of shape (n_classes,), default=None
            Every class of the problem; required on the first call (``y``
            need not contain them all), optional afterwards.
        sample_weight : array-like of shape (n_samples,), default=None
        eval_set, X_val, y_val : default=None
            Validation data whose loss and score are recorded for this
            epoch (see :meth:`fit`).

        Returns
        -------
        self
        """
        if not hasattr(self, "weights_") and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        if isinstance(self.class_weight, str) and self.class_weight == "balanced":
            # Balancing needs the class frequencies of all the data, which a
            # chunk does not have (scikit-learn refuses it too).
            raise ValueError(
                "class_weight 'balanced' is not supported for partial_fit: "
                "compute the weights on a sample of y with "
                "sklearn.utils.compute_class_weight('balanced', classes=classes, "
                "y=y) and pass them as a dict."
            )
        return self._partial_fit(
            X, y, sample_weight, max_iter=1, reset=False, classes=classes,
            validation=(eval_set, X_val, y_val),
        )

    def _validate_targets(self, y, reset, classes=None):
        y = column_or_1d(y, warn=True)
        if y.dtype.kind not in "iub":
            # 1-D integer or boolean labels are binary or multiclass: the
            # check (a np.unique of y) could only accept them.
            check_classification_targets(y)
        if reset:
            new = unique_labels(classes) if classes is not None else np.unique(y)
            previous = getattr(self, "classes_", None)
            if (
                classes is None and self.warm_start and hasattr(self, "weights_")
                and previous is not None and not np.array_equal(previous, new)
            ):
                raise ValueError(
                    f"warm_start=True keeps the weights of the previous fit, made for "
                    f"classes {previous.tolist()}, but y has classes {new.tolist()}."
                )
            if len(new) < 2:
                raise ValueError(
                    "The number of classes has to be greater than one; got "
                    f"{len(new)} class."
                )
            self.classes_ = new
        elif classes is not None and not np.array_equal(self.classes_, unique_labels(classes)):
            raise ValueError(
                f"classes={classes!r} is not the same as on the last call to "
                f"partial_fit, was: {self.classes_!r}."
            )
        return self._class_index(y)

    def _class_index(self, y):
        """Positions of the labels ``y`` in ``classes_``."""
        classes = self.classes_
        lookup = self._class_lookup(y)
        if lookup is not None:
            # Integer labels in a small range: one gather in a table of the
            # smallest integers that hold the positions (labels are the
            # largest array a fit makes besides X).
            low, table = lookup
            index = table.take(y - low if low else y, mode="clip")
            unknown = (y < low) | (y >= low + len(table))
            unknown |= index < 0
        else:
            try:
                index = np.searchsorted(classes, y)
                np.minimum(index, len(classes) - 1, out=index)
                unknown = classes.take(index) != y
            except TypeError:  # labels of another type than classes_
                index, unknown = np.zeros(len(y), dtype=np.intp), np.ones(len(y), dtype=bool)
        if np.any(unknown):
            raise ValueError(
                f"y contains labels {np.unique(y[unknown]).tolist()} that are not "
                f"among the classes {classes.tolist()}."
            )
        return index

    def _class_lookup(self, y):
        """``(lowest class, table)`` mapping integer labels to class
        positions (-1 for labels that are not classes), or None when the
        labels or classes are not integers of a small range."""
        classes = self.classes_
        if y.dtype.kind not in "iu" or classes.dtype.kind not in "iu":
            return None
        low, high = int(classes[0]), int(classes[-1])
        if high - low > 4 * len(classes) + 1024:
            return None
        table = np.full(high - low + 1, -1, dtype=np.min_scalar_type(-len(classes)))
        table[classes.astype(np.int64) - low] = np.arange(len(classes))
        return low, table

    def _weight_samples(self, labels, sample_weight):
        if self.class_weight is None:
            return sample_weight
        y = self.classes_.take(labels)
        weights = compute_class_weight(self.class_weight, classes=self.classes_, y=y)
        weights = np.asarray(weights, dtype=np.float64)
        if isinstance(self.class_weight, dict) and weights.mean() > 0:
            # Only ratios matter: with a fixed learning rate, weights such as
            # {0: 1000, 1: 1e-4} would otherwise multiply the steps by 1000.
            weights = weights / weights.mean()
        per_sample = weights[labels]
        return per_sample if sample_weight is None else sample_weight * per_sample

    def _validation_split(self, n_samples, y, rng):
        from sklearn.model_selection import StratifiedShuffleSplit

        y = column_or_1d(y)
        splitter = StratifiedShuffleSplit(
            test_size=self.validation_fraction, random_state=rng
        )
        try:
            return next(splitter.split(np.zeros(n_samples), y))
        except ValueError:  # a class too small to stratify: plain split
            return super()._validation_split(n_samples, y, rng)

    def _score_output(self, output, y):
        columns = self._columns_of(output, self._graph_info.link)
        return accuracy_score(column_or_1d(y), self.classes_[self._class_of_column[columns]])

    # -- the graph --------------------------------------------------------------
    def _default_model(self, n_features, labels, dtype):
        n_classes = len(self.classes_)
        return linear_model(n_features, 1 if n_classes == 2 else n_classes, dtype)

    def _prepare_model(self, model):
        model = rewrite_linear_classifiers(model)
        model = infer_value_types(model)
        init_names = {i.name for i in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in init_names]
        info = analyse_classifier_graph(model, inputs, self.output_name)
        weights = self.weights_to_train
        if weights is None:
            weights = info.default_weights
        onnx_model = OnnxModel(model, weights, info.trained_output, self.loss_output)
        self._graph_info = info
        return onnx_model

    def _probe_label_shape(self, inputs, labels):
        label_shape = self._output_sample_shape(inputs)
        width = int(np.prod(label_shape)) if label_shape else 1
        self._set_columns(width)
        return label_shape

    def _set_columns(self, width):
        """Match ``classes_`` with the columns of the trained output."""
        info = self._graph_info
        classes = self.classes_
        n_classes = len(classes)
        columns = np.arange(n_classes)
        if info.graph_classes is not None:
            graph_classes = list(info.graph_classes)
            if len(graph_classes) != n_classes:
                raise ValueError(
                    f"The graph was built for {len(graph_classes)} classes "
                    f"{graph_classes}, but y has {n_classes}: {classes.tolist()}."
                )
            columns = _match_classes(classes, graph_classes)
        allowed = (1, 2) if n_classes == 2 and info.link != "probability" else (n_classes,)
        if width not in allowed:
            raise ValueError(
                f"The graph's output {self.trained_output_!r} gives {width} value(s) per "
                f"sample, but y has {n_classes} classes {classes.tolist()}: a "
                "classification graph needs one score (or probability) per class, "
                "or a single score when there are two classes."
            )
        self._class_columns = columns
        self._class_of_column = np.argsort(columns)
        self._n_columns = width

    def _encode_labels(self, labels):
        # One logit: a float column, 1 for the positive class.  One column per
        # class: the column of each sample, as the smallest integers that
        # hold it; the engines build the one-hot rows batch by batch, so the
        # (n, n_columns) matrix never exists.
        compact = self._class_columns.astype(np.min_scalar_type(max(1, self._n_columns - 1)))
        columns = compact.take(labels)
        if self._n_columns == 1:
            return (columns == 1).astype(self.dtype_)[:, None]
        return columns

    def _label_sample_shape(self, spec, labels):
        # A float label input with a symbolic width takes one-hot rows, one
        # column per class (labels here are class positions, not widths).
        if not spec.is_integer and spec.width is None:
            if len(self.classes_) == 2:
                raise ValueError(
                    f"The graph's label input {spec.describe()} is a float tensor of "
                    "symbolic width: with two classes it may take one column (0/1) or "
                    "two (one-hot); declare its width in the graph."
                )
            if sum(d is None for d in spec.shape) != 1:
                raise ValueError(
                    f"The graph's label input {spec.describe()} has several symbolic "
                    "dimensions; declare its per-sample shape."
                )
            return tuple(len(self.classes_) if d is None else d for d in spec.shape)
        return super()._label_sample_shape(spec, labels)

    def _graph_labels(self, labels, spec):
        # Class indices for an integer label input (PyTorch's cross-entropy
        # targets), one-hot rows for a float one as wide as the scores.
        if spec.is_integer or labels.dtype.kind not in "iu":
            return super()._graph_labels(labels, spec)
        width = int(np.prod(spec.shape)) if spec.shape else 1
        if width == self._n_columns and width > 1:
            one_hot = np.eye(width, dtype=spec.dtype)[labels]
            return np.ascontiguousarray(one_hot.reshape((len(labels),) + spec.shape))
        return super()._graph_labels(labels, spec)

    def _scores_kind(self):
        link = self._graph_info.link
        if link == "identity":
            return "sigmoid" if self._n_columns == 1 else "softmax"
        return link

    def _auto_learning_rate(self):
        return "nesterov"

    def _make_loss(self):
        kind = self._scores_kind()
        if kind == "probability" and not (self.loss == "log_loss" or isinstance(self.loss, BaseLoss)):
            raise ValueError(
                f"loss={self.loss!r} needs raw scores, but the trained output "
                f"{self.trained_output_!r} holds probabilities (no softmax or sigmoid "
                "was found before it). Use loss='log_loss', or name the scores with "
                "output_name."
            )
        return make_loss(self.loss, CLASSIFICATION_LOSSES, scores=kind)

    def _prediction_outputs(self):
        """The trained value and, when it differs, the probabilities."""
        return [self.trained_output_, self._graph_info.probability_output]

    # -- prediction ---------------------------------------------------------------
    def _columns_of(self, out, link):
        """Winning column of each row of the trained output."""
        out = out.reshape(len(out), -1)
        if out.shape[1] == 1:
            threshold = 0.5 if link == "probability" else 0.0
            return (out[:, 0] > threshold).astype(np.intp)
        return np.argmax(out, axis=1)

    def _outputs(self, X, names):
        return self._forward(X, names)

    def decision_function(self, X):
        """Scores of the classes: the trained scores (their log when the graph
        is trained on probabilities).

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
        ndarray of shape (n_samples,) for two classes (positive for
        ``classes_[1]``), else (n_samples, n_classes)
        """
        check_is_fitted(self, "weights_")
        out = self._trained_values(X)
        if self._graph_info.link == "probability":
            out = np.log(np.maximum(out, np.finfo(np.float64).tiny))
        columns = self._class_columns
        if out.shape[1] == 1:
            scores = out[:, 0]
            return scores if columns[1] == 1 else -scores
        if len(self.classes_) == 2:
            return out[:, columns[1]] - out[:, columns[0]]
        return out[:, columns]

    def predict(self, X):
        """Predicted class labels.

        For a converted classifier these are the graph's own label output
        (mapped to ``classes_``), as ``to_onnx()`` computes them.

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
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self, "weights_")
        info = self._graph_info
        if info.label_output is not None and info.graph_classes is not None:
            labels = self._outputs(X, [info.label_output])[0]
            lookup = {
                class_key(info.graph_classes[column]): k
                for k, column in enumerate(self._class_columns)
            }
            values, inverse = np.unique(np.ravel(labels), return_inverse=True)
            index = np.array([lookup[class_key(v)] for v in values], dtype=np.intp)
            return self.classes_[index[inverse]]
        if info.probability_output is not None:
            out = self._outputs(X, [info.probability_output])[0]
            columns = self._columns_of(np.asarray(out), "probability")
        else:
            out = self._outputs(X, [self.trained_output_])[0]
            columns = self._columns_of(np.asarray(out), info.link)
        return self.classes_[self._class_of_column[columns]]

    def _is_loss(self, name):
        """Whether ``loss`` is the built-in ``name``, given as its string or
        as an instance of its class."""
        if self.loss == name:
            return True
        cls = {"hinge": HingeLoss, "modified_huber": ModifiedHuberLoss}.get(name)
        return cls is not None and isinstance(self.loss, cls)

    def _trained_values(self, X):
        """The trained output for ``X``, float64, one row per sample."""
        out = self._outputs(X, [self.trained_output_])[0]
        return np.asarray(out, dtype=np.float64).reshape(len(out), -1)

    def _check_proba(self):
        if self._is_loss("hinge"):
            raise AttributeError(
                "probability estimates are not available for the hinge loss"
            )
        return True

    @available_if(_check_proba)
    def predict_proba(self, X):
        """Class probabilities, columns in the order of ``classes_``.

        A graph that computes probabilities (a converted classifier, a graph
        ending with a softmax or sigmoid) gives them itself, as ``to_onnx()``
        does; raw scores go through a sigmoid (one logit) or a softmax.  With
        ``loss='modified_huber'`` raw scores give ``SGDClassifier``'s
        ``(clip(s, -1, 1) + 1) / 2``, normalised.  A converted hinge or
        modified-Huber ``SGDClassifier`` writes raw scores into its
        "probabilities" output: that output is then trained as scores, and
        this method's probabilities differ from it.

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
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self, "weights_")
        info = self._graph_info
        if info.probability_output is not None:
            proba = self._outputs(X, [info.probability_output])[0]
            proba = np.asarray(proba, dtype=np.float64).reshape(len(proba), -1)
            if proba.shape[1] == 1:
                proba = np.hstack([1.0 - proba, proba])
            total = proba.sum(axis=1, keepdims=True)
            if not np.allclose(total, 1.0, atol=1e-5):  # one-vs-rest sigmoids
                proba = _normalise(proba)
        else:
            scores = self._trained_values(X)
            if self._is_loss("modified_huber"):
                proba = (np.clip(scores, -1.0, 1.0) + 1.0) / 2.0
                if proba.shape[1] == 1:
                    proba = np.hstack([1.0 - proba, proba])
                else:
                    proba = _normalise(proba)
            elif scores.shape[1] == 1:
                positive = expit(scores)
                proba = np.hstack([1.0 - positive, positive])
            else:
                proba = softmax(scores, axis=1)
        return proba[:, self._class_columns]

    @available_if(_check_proba)
    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba` (computed stably from raw
        scores with ``loss='log_loss'``).

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
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self, "weights_")
        info = self._graph_info
        if info.probability_output is None and not self._is_loss("modified_huber"):
            scores = self._trained_values(X)
            if scores.shape[1] == 1:
                log_proba = np.hstack([log_expit(-scores), log_expit(scores)])
            else:
                log_proba = log_softmax(scores, axis=1)
            return log_proba[:, self._class_columns]
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags


def _match_classes(classes, graph_classes):
    """Column of each of ``classes`` among the graph's ``graph_classes``."""
    for key in (class_key, lambda v: str(class_key(v))):
        graph_keys = [key(c) for c in graph_classes]
        lookup = {k: j for j, k in enumerate(graph_keys)}
        keys = [key(c) for c in classes]
        if len(lookup) == len(graph_keys) and all(k in lookup for k in keys):
            return np.array([lookup[k] for k in keys], dtype=np.intp)
    raise ValueError(
        f"The graph's classes {list(graph_classes)} are not the classes of y "
        f"{classes.tolist()}: its label output would be wrong. Train it on labels "
        "with the same values, or train a graph without a label output."
    )


def _normalise(proba):
    total = proba.sum(axis=1, keepdims=True)
    empty = total[:, 0] == 0
    if np.any(empty):
        proba = proba.copy()
        proba[empty] = 1.0
        total[empty] = proba.shape[1]
    return proba / total
