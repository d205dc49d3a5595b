"""An ONNX graph as a differentiable function: forward, then backward.

:class:`OnnxFunction` runs a graph's forward pass and, on request, the
backward pass of that same run: given dL/dY it returns dL/d(weights) (and
dL/dX).  The loss, the update rule and the loop stay in the caller's hands,
so the function can sit inside a hand-written training loop or inside
another framework's automatic differentiation.  It runs the two halves of
the graph's gradient (:func:`onnxfit.gradient.split_gradient_graph`) as
two plain onnxruntime sessions; the forward-backward training engine
(:mod:`onnxfit.engines.forward_backward`) runs the same objects.

Building a model's gradient graph and its session takes milliseconds to
seconds, so built gradients are kept in a small process-wide cache,
:data:`model_gradient_cache`: functions and engines built on the same graph
with the same weights share one (when ``GridSearchCV`` tries several
losses, penalties or learning rates on one model, say).

Examples
--------
A few steps of plain gradient descent on a linear model, with the squared
error written in numpy:

>>> import numpy as np
>>> from onnxfit.function import OnnxFunction
>>> from onnxfit.model import linear_model
>>> f = OnnxFunction(linear_model(3, 1, np.float32))
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(64, 3)).astype(np.float32)
>>> t = X @ np.array([[1.0], [-2.0], [0.5]], dtype=np.float32)
>>> w = f.initial_weights()
>>> for _ in range(200):
...     y = f.forward(X, w)
...     grads = f.backward((y - t) / len(X))
...     w = {k: w[k] - 0.2 * grads[k] for k in w}
>>> bool(np.abs(f.forward(X, w, keep_for_backward=False) - t).max() < 1e-3)
True
"""

import hashlib
import threading
from collections import OrderedDict

import numpy as np
import onnx
from sklearn.utils import check_random_state

from .gradient import (
    DEFAULT_BACKEND,
    ForwardBackwardRunner,
    build_vjp,
    check_backend,
    split_gradient_graph,
)
from .gradient.rules.conv import check_window_attributes
from .model import OnnxModel, load_onnx, normalise_model
from .sessions import (
    ONNXRUNTIME_ERRORS,
    as_ortvalue,
    is_ortvalue,
    ortvalue_dtype,
    zeros_ortvalue,
)
from .training_mode import training_graph

__all__ = ["OnnxFunction", "ForwardContext", "ModelGradientCache", "model_gradient_cache"]


def _deep_conv_transposes(graph):
    """Names of the ConvTranspose nodes of ``graph`` with three or more
    spatial axes (their kernel_shape, or their weight's initializer)."""
    initializers = {i.name: len(i.dims) for i in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx"):
            continue
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
        rank = len(kernel) if kernel else initializers.get(node.input[1], 0) - 2
        if rank >= 3:
            found.append(node.name or node.output[0])
    return found


def _run_error(exc, what):
    """A ValueError carrying onnxruntime's message ``exc`` about ``what``."""
    message = str(exc).strip()
    return ValueError(f"onnxruntime could not {what}: {message}")


def build_model_runner(forward_model, weight_names, input_names_with_gradient=(), n_threads=None,
                       backend=DEFAULT_BACKEND, constant_outputs=(), device=None):
    """The forward and backward sessions of ``forward_model``'s gradient.

    Every output of ``forward_model`` but ``constant_outputs`` (running
    statistics) is seeded by its own cotangent input.

    Returns
    -------
    onnxfit.gradient.ForwardBackwardRunner
    """
    outputs = [o for o in forward_model.graph.output if o.name not in set(constant_outputs)]
    seeds = {o.name: f"onnxfit.cotangent.{o.name}" for o in outputs}
    wrt = list(weight_names) + list(input_names_with_gradient)
    gradient = build_vjp(forward_model, seeds, wrt, backend=backend)
    split = split_gradient_graph(gradient)
    weights = [i for i in forward_model.graph.input if i.name in set(weight_names)]
    elem = weights[0].type.tensor_type.elem_type if weights else onnx.TensorProto.FLOAT
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    return ForwardBackwardRunner(split, n_threads, dtype, device)


class ModelGradientCache:
    """A bounded process-wide cache of built model gradients.

    An entry is a :class:`onnxfit.gradient.ForwardBackwardRunner`: a model's
    forward and backward graphs with their onnxruntime sessions.  Runners
    hold no per-call state, so one entry serves any number of
    :class:`OnnxFunction` objects and training engines at once.

    The key is the serialized forward model (which fixes the element type),
    the weights differentiated (and their order), the inputs whose gradient
    is returned, the number of threads and the gradient backend.  The least
    recently used entry is dropped beyond ``maxsize`` entries.  The cache
    lives in one process: ``GridSearchCV`` with process-based ``n_jobs``
    fills one per worker.

    Parameters
    ----------
    maxsize : int, default=8

    Attributes
    ----------
    builds : int
        Gradient graphs built so far (cache misses).
    hits : int
        Requests answered from the cache.
    """

    def __init__(self, maxsize=8):
        self.maxsize = int(maxsize)
        self.builds = 0
        self.hits = 0
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def get(self, forward_model, weight_names, input_names_with_gradient=(), n_threads=None,
            backend=DEFAULT_BACKEND, constant_outputs=(), device=None):
        """The runner of ``forward_model``'s gradient, built on first use.

        Parameters
        ----------
        forward_model : onnx.ModelProto
            Graph whose weights are graph inputs of static shape (as
            :meth:`onnxfit.model.OnnxModel.forward_model` gives).
        weight_names : list of str
            Weights to differentiate, in call order.
        input_names_with_gradient : sequence of str, default=()
        n_threads : int or None, default=None
            onnxruntime intra-op threads (see :func:`onnxfit.sessions.default_threads`).
        backend : str, default='onnxfit'
            Gradient backend (see :mod:`onnxfit.gradient`).
        constant_outputs : sequence of str, default=()
            Outputs not differentiated (running statistics).
        device : onnxfit.sessions.Device or None, default=None
            Where the sessions run (None: the CPU).

        Returns
        -------
        onnxfit.gradient.ForwardBackwardRunner
        """
        digest = hashlib.sha256(forward_model.SerializeToString()).hexdigest()
        key = (digest, tuple(weight_names), tuple(input_names_with_gradient),
               None if n_threads is None else int(n_threads), backend, tuple(constant_outputs),
               str(device) if device is not None else "cpu")
        with self._lock:
            runner = self._entries.get(key)
            if runner is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return runner
            runner = build_model_runner(forward_model, weight_names, input_names_with_gradient,
                                        n_threads, backend, constant_outputs, device)
            self.builds += 1
            self._entries[key] = runner
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            return runner

    def clear(self):
        """Drop every entry (the counters are kept)."""
        with self._lock:
            self._entries.clear()

    def __len__(self):
        return len(self._entries)


#: The cache used by :class:`OnnxFunction` and the forward-backward engine.
model_gradient_cache = ModelGradientCache()


class ForwardContext:
    """What a backward pass needs from its forward pass.

    Returned by ``OnnxFunction.forward(..., return_context=True)`` and
    consumed by :meth:`OnnxFunction.backward`.  It keeps the inputs and
    weights of the forward run, and the values the backward pass reads
    (activations, masks), alive: the backward pass reads the inputs again,
    so they must not be modified in between.

    Attributes
    ----------
    output_shape : tuple of int
    consumed : bool
        Whether the backward pass of this forward run already ran (it can
        run only once).
    """

    def __init__(self, inputs, forward_values, kept, output_shape, weights_as_dict):
        self._inputs = inputs
        self._forward_values = forward_values
        self._kept = kept
        self.output_shape = output_shape
        self._weights_as_dict = weights_as_dict
        self.consumed = False

    def _release(self):
        self.consumed = True
        self._inputs = self._forward_values = self._kept = None


class OnnxFunction:
    """An ONNX graph as a differentiable function ``Y = f(X; weights)``.

    :meth:`forward` computes ``Y`` and keeps what the backward pass needs;
    :meth:`backward` turns dL/dY into dL/d(weights), and dL/dX on request.
    Arrays and OrtValues are both accepted: results are OrtValues when the
    main argument (``X``, ``output_gradient``) is one, numpy arrays
    otherwise.  Numpy results stay valid after later calls.

    Parameters
    ----------
    onnx_model : onnx.ModelProto, bytes or path-like
        The graph; it is copied and brought within what the installed
        onnxruntime runs.  With several inputs, ``X`` is a dict of arrays.
    weights_to_train : list of str, default=None
        Initializers to differentiate with respect to; None means every
        floating-point initializer the output depends on.  Others stay
        constant, with their values in the graph.
    output_name : str, default=None
        Output to compute; None takes the only output or the first float
        one.
    input_gradient : bool, default=False
        Also build dL/dX for the float inputs (see ``return_input_gradient``
        of :meth:`backward`).
    n_threads : int or None, default=None
        onnxruntime intra-op threads (None: one per core, see
        :func:`onnxfit.sessions.default_threads`).
    gradient_backend : {'onnxfit', 'onnxruntime-training'}, default='onnxfit'
        What builds the gradient graph (see :mod:`onnxfit.gradient`).
    train_mode : bool, default=False
        False computes the graph as written.  True gives Dropout and
        BatchNormalization their training behaviour, as PyTorch's
        ``model.train()`` (see :mod:`onnxfit.training_mode`): each forward
        pass draws Dropout masks from ``random_state`` (or takes ``masks=``)
        and updates :attr:`running_statistics`.
    random_state : int, RandomState or None, default=None
        Draws the Dropout masks with ``train_mode=True``.

    Attributes
    ----------
    input_names : list of str
        The graph inputs (the data); ``input_name`` is the first.
    input_name, output_name : str
    weight_names : list of str
        The weights, in the order of list arguments and results.
    weight_shapes : dict of str -> tuple
    dtype : numpy dtype
        Element type of the output, the weights and the gradients.
    input_dtype : numpy dtype
        Element type of ``X`` (of the first input).
    running_statistics : dict of str -> ndarray
        With ``train_mode=True``: BatchNormalization's running means and
        variances, updated by each forward pass.
    masks : list of onnxfit.training_mode.DropoutMask
        With ``train_mode=True``: the Dropout masks a forward pass takes.

    Notes
    -----
    The inputs and weights given to :meth:`forward` are shared with
    onnxruntime, not copied, and read again by :meth:`backward`: do not
    modify them in between (write updated weights into new arrays, or into
    a second set of buffers, as the training engines do).

    A function pickles as its graph and parameters; onnxruntime objects are
    rebuilt (or taken from :data:`model_gradient_cache`) when it is loaded.
    A forward pass still waiting for its backward pass is not pickled.

    Examples
    --------
    >>> import numpy as np
    >>> from onnxfit.function import OnnxFunction
    >>> from onnxfit.model import linear_model
    >>> f = OnnxFunction(linear_model(2, 1, np.float32))
    >>> X = np.array([[1.0, 2.0]], dtype=np.float32)
    >>> w = {"coef": np.array([[3.0], [4.0]], np.float32),
    ...      "intercept": np.array([1.0], np.float32)}
    >>> f.forward(X, w)
    array([[12.]], dtype=float32)
    >>> grads = f.backward(np.ones((1, 1), np.float32))
    >>> grads["coef"].ravel(), grads["intercept"]
    (array([1., 2.], dtype=float32), array([1.], dtype=float32))
    """

    def __init__(
        self, onnx_model, weights_to_train=None, output_name=None, input_gradient=False,
        n_threads=None, gradient_backend=DEFAULT_BACKEND, train_mode=False, random_state=None,
    ):
        check_backend(gradient_backend)
        model = normalise_model(load_onnx(onnx_model))
        check_window_attributes(model.graph)
        self._model = OnnxModel(model, weights_to_train, output_name)
        self.input_names = list(self._model.input_names)
        self.input_name = self.input_names[0]
        self.output_name = self._model.output_name
        self.weight_names = list(self._model.weight_names)
        self.dtype = np.dtype(self._model.dtype)
        self.input_dtype = np.dtype(self._model.input_dtype)
        self.input_gradient = bool(input_gradient)
        self.n_threads = None if n_threads is None else int(n_threads)
        self.gradient_backend = gradient_backend
        self.train_mode = bool(train_mode)
        self.random_state = random_state
        forward_model = self._model.forward_model()
        graph_inputs = {v.name: v for v in forward_model.graph.input}
        self.weight_shapes = {
            name: tuple(d.dim_value for d in graph_inputs[name].type.tensor_type.shape.dim)
            for name in self.weight_names
        }
        self._specs = {spec.name: spec for spec in self._model.input_specs}
        self._deep_conv_transposes = _deep_conv_transposes(model.graph)
        self.masks, self.running_statistics, self._statistics = [], {}, {}
        if self.train_mode:
            trained = training_graph(
                forward_model, {n: s.shape for n, s in self._specs.items()},
                self.initial_weights())
            forward_model = trained.model
            self.masks = list(trained.masks)
            self._statistics = dict(trained.statistics)
            self.running_statistics = {k: v.copy() for k, v in
                                       trained.initial_statistics.items()}
        self._rng = check_random_state(random_state)
        self._float_inputs = [n for n in self.input_names if not self._specs[n].is_integer]
        try:
            self._runner = model_gradient_cache.get(
                forward_model,
                self.weight_names,
                self._float_inputs if self.input_gradient else (),
                self.n_threads,
                gradient_backend,
                constant_outputs=list(self._statistics.values()),
            )
        except ONNXRUNTIME_ERRORS as exc:
            raise _run_error(exc, "load the graph or its gradient") from exc
        self._context = None

    # -- helpers ---------------------------------------------------------------
    def initial_weights(self):
        """The weights stored in the graph (name -> new array)."""
        return self._model.initial_weights()

    def _tensor(self, value, what, dtype, shape):
        """Validate ``value``; return (OrtValue, object to keep alive)."""
        if is_ortvalue(value):
            got_dtype = ortvalue_dtype(value)
            got_shape = tuple(value.shape())
            if value.device_name().lower() != "cpu":
                raise ValueError(f"{what} must be on the CPU, not {value.device_name()}.")
            keep = value
        else:
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"{what} must be a numpy array or an onnxruntime.OrtValue, not "
                    f"{type(value).__name__}."
                )
            got_dtype, got_shape = value.dtype, value.shape
            keep = value = np.ascontiguousarray(value)
        if got_dtype != dtype:
            raise ValueError(f"{what} must be {np.dtype(dtype)}, not {got_dtype}.")
        if shape is not None and (
            len(got_shape) != len(shape)
            or any(want is not None and want != got for want, got in zip(shape, got_shape))
        ):
            expected = tuple("n" if s is None else s for s in shape)
            raise ValueError(f"{what} must have shape {expected}, not {got_shape}.")
        return as_ortvalue(value), keep

    def _input_values(self, X, kept):
        """OrtValues of the data inputs from ``X`` (an array or OrtValue for
        a one-input graph, else a dict by input name)."""
        if isinstance(X, dict):
            unknown = sorted(set(X) - set(self.input_names))
            missing = [n for n in self.input_names if n not in X]
            if unknown or missing:
                raise ValueError(
                    f"X must hold one value per graph input {self.input_names}; "
                    + (f"unknown: {unknown}. " if unknown else "")
                    + (f"missing: {missing}." if missing else ""))
            items = [(n, X[n], f"X[{n!r}]") for n in self.input_names]
        elif len(self.input_names) == 1:
            items = [(self.input_name, X, "X")]
        else:
            raise TypeError(
                f"The graph has {len(self.input_names)} inputs {self.input_names}: give X "
                "as a dict {input name: array}.")
        values = {}
        for name, value, what in items:
            spec = self._specs[name]
            ort, keep = self._tensor(value, what, spec.dtype, (None,) + tuple(spec.shape))
            values[name] = ort
            kept.append(keep)
        return values

    def _weight_list(self, weights):
        if isinstance(weights, dict):
            missing = [n for n in self.weight_names if n not in weights]
            if missing:
                raise ValueError(f"weights lacks {missing}; expected {self.weight_names}.")
            return [weights[n] for n in self.weight_names], True
        weights = list(weights)
        if len(weights) != len(self.weight_names):
            raise ValueError(
                f"Expected {len(self.weight_names)} weights ({self.weight_names}), "
                f"got {len(weights)}."
            )
        return weights, False

    # -- the two passes ----------------------------------------------------------
    def forward(self, X, weights, keep_for_backward=True, return_context=False, masks=None):
        """Compute the output for ``X`` and ``weights``.

        Parameters
        ----------
        X : ndarray, onnxruntime.OrtValue or dict of them
            Input of the graph's input type and shape; a dict by input name
            for a graph with several inputs.
        weights : dict of str -> array or OrtValue, or sequence
            One value per name of :attr:`weight_names` (a sequence follows
            that order), of the weight's exact shape and :attr:`dtype`.
        keep_for_backward : bool, default=True
            Keep what :meth:`backward` needs (replacing what a previous
            forward pass kept).  False for inference only.
        return_context : bool, default=False
            Return the :class:`ForwardContext` instead of keeping it, so
            that several forward passes can wait for their backward passes
            at once.
        masks : dict of str -> ndarray, optional
            With ``train_mode=True``: the Dropout masks to use (name ->
            array of 0 and ``1 / (1 - ratio)``, see :attr:`masks`); drawn
            from ``random_state`` when not given.

        Returns
        -------
        Y : ndarray or onnxruntime.OrtValue
            OrtValue when ``X`` is one.
        context : ForwardContext
            Only with ``return_context=True``.
        """
        kept = []
        inputs = self._input_values(X, kept)
        weight_list, as_dict = self._weight_list(weights)
        for name, weight in zip(self.weight_names, weight_list):
            value, keep = self._tensor(
                weight, f"weight {name!r}", self.dtype, self.weight_shapes[name]
            )
            inputs[name] = value
            kept.append(keep)
        if masks is not None and not self.masks:
            raise ValueError("masks= is for a function with train_mode=True and Dropout nodes.")
        if masks is not None:
            unknown = sorted(set(masks) - {mask.name for mask in self.masks})
            if unknown:
                raise ValueError(
                    f"masks names {unknown}, which are not Dropout masks of the graph; "
                    f"its masks are {[mask.name for mask in self.masks]}."
                )
        batch = next(iter(inputs.values())).shape()[0]
        if self._deep_conv_transposes and batch:
            empty = {name: tuple(inputs[name].shape()) for name in self.input_names
                     if 0 in tuple(inputs[name].shape())[1:]}
            if empty:
                raise ValueError(
                    f"X is empty along an axis other than the batch ({empty}), and the graph "
                    f"has a ConvTranspose with three or more spatial axes "
                    f"({self._deep_conv_transposes[0]!r}): onnxruntime's kernel crashes the "
                    "process on such inputs. Give every sample at least one position "
                    "along each axis.")
        for mask in self.masks:
            shape = mask.shape_for(batch)
            if masks is not None and mask.name in masks:
                value, keep = self._tensor(masks[mask.name], f"mask {mask.name!r}",
                                           mask.dtype, shape)
            else:
                array = np.empty(shape, dtype=mask.dtype)
                mask.draw(self._rng, array)
                value, keep = as_ortvalue(array), array
            inputs[mask.name] = value
            kept.append(keep)
        for name, array in self.running_statistics.items():
            inputs[name] = as_ortvalue(array)
            kept.append(array)
        try:
            values = self._runner.forward(inputs)
        except ONNXRUNTIME_ERRORS as exc:
            shapes = {name: tuple(value.shape()) for name, value in inputs.items()
                      if name in self.input_names}
            raise _run_error(exc, f"run the graph on inputs of shape {shapes}") from exc
        for name, new in self._statistics.items():
            self.running_statistics[name] = values[new].numpy().copy()
        output = values[self.output_name]
        context = None
        if keep_for_backward or return_context:
            context = ForwardContext(inputs, values, kept, tuple(output.shape()), as_dict)
        if not return_context and keep_for_backward:
            self._context = context
        result = output if is_ortvalue(X) else output.numpy()
        return (result, context) if return_context else result

    def backward(self, output_gradient, return_input_gradient=False, context=None):
        """Gradients of the last forward pass (or of ``context``'s).

        Parameters
        ----------
        output_gradient : ndarray or onnxruntime.OrtValue
            dL/dY, of the output's exact shape and :attr:`dtype`.
        return_input_gradient : bool, default=False
            Also return dL/dX (a dict by input name for a graph with several
            inputs: its float inputs); needs ``input_gradient=True`` at
            construction.
        context : ForwardContext, default=None
            From ``forward(..., return_context=True)``; None uses the one
            kept by the last forward pass.  Either is used once.

        Returns
        -------
        weight_gradients : dict of str -> ndarray or OrtValue, or list
            A dict when the forward pass got a dict of weights, else a list
            in :attr:`weight_names` order.  OrtValues when
            ``output_gradient`` is one.
        input_gradient : ndarray or OrtValue
            dL/dX, only with ``return_input_gradient=True``.
        """
        if return_input_gradient and not self.input_gradient:
            raise ValueError(
                "return_input_gradient=True needs a function built with input_gradient=True."
            )
        kept_context = context is None
        if kept_context:
            context = self._context
            if context is None:
                raise RuntimeError("backward needs a forward pass first (keep_for_backward=True).")
        if context.consumed:
            raise RuntimeError("The backward pass of this forward pass already ran.")
        dy_value, dy_kept = self._tensor(
            output_gradient, "output_gradient", self.dtype, context.output_shape
        )
        if kept_context:
            self._context = None
        try:
            if 0 in tuple(context.output_shape):
                # An empty output (an empty batch): every gradient is a sum
                # over no element, zeros (onnxruntime 1.20 never returns
                # from the ConvTranspose gradient of an empty batch).
                gradients = {name: zeros_ortvalue(context._inputs[name].shape(),
                                                  ortvalue_dtype(context._inputs[name]))
                             for name in list(self.weight_names) + self._float_inputs}
            else:
                gradients = self._runner.backward(
                    context._inputs, context._forward_values, {self.output_name: dy_value})
        except ONNXRUNTIME_ERRORS as exc:
            context._release()
            raise _run_error(
                exc, f"run the backward pass (output of shape {context.output_shape})") from exc
        context._release()
        del dy_kept
        if is_ortvalue(output_gradient):
            def convert(name):
                return gradients[name]
        else:
            def convert(name):
                return gradients[name].numpy()
        grads = [convert(name) for name in self.weight_names]
        if context._weights_as_dict:
            grads = dict(zip(self.weight_names, grads))
        if return_input_gradient:
            if len(self.input_names) == 1:
                return grads, convert(self.input_name)
            return grads, {name: convert(name) for name in self._float_inputs}
        return grads

    __call__ = forward

    # -- pickling -------------------------------------------------------------
    def __getstate__(self):
        return {
            "onnx_model": self._model.model.SerializeToString(),
            "weights_to_train": self.weight_names,
            "output_name": self.output_name,
            "input_gradient": self.input_gradient,
            "n_threads": self.n_threads,
            "gradient_backend": self.gradient_backend,
            "train_mode": self.train_mode,
            "random_state": self.random_state,
            "running_statistics": {k: v.copy() for k, v in self.running_statistics.items()},
        }

    def __setstate__(self, state):
        statistics = state.pop("running_statistics", None)
        self.__init__(**state)
        if statistics:
            self.running_statistics = statistics

    def __repr__(self):
        return (
            f"OnnxFunction({', '.join(map(repr, self.input_names))} -> {self.output_name!r}, "
            f"weights={self.weight_names}, dtype={self.dtype})"
        )
