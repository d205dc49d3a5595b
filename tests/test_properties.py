"""Property-based tests (issue 13): random shapes, dtypes, values and
parameters fed to the estimators and to :class:`onnxfit.OnnxFunction`.

The property: each call either succeeds (finite outputs of the right
shape) or raises a documented exception -- ValueError (ConvergenceError,
GradientError and sklearn's NotFittedError are ValueErrors) or TypeError --
never anything else, and never kills the process.  onnxruntime's kernels
are native code, so each property runs in a child process (one child per
property, all its examples in it); the parent fails with the last example
the child printed when the child dies of a signal.

The searches are deterministic (``derandomize=True``, no example database)
and bounded, so the file runs in about half a minute on two cores.  Run one
property by hand with ``python -c "import tests.test_properties as t;
t.property_function_graphs()"``.
"""

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]

#: Examples each property runs (its child's share of the time budget).
EXAMPLES = {
    "property_function_graphs": 400,
    "property_regressor": 200,
    "property_classifier": 150,
}

SETTINGS = {"database": None, "derandomize": True, "deadline": None, "print_blob": False,
            "suppress_health_check": list(HealthCheck)}

#: The exceptions a bad argument or graph may raise.
DOCUMENTED = (ValueError, TypeError)


# -- the child process ---------------------------------------------------------------------

def _run_child(name, timeout=240):
    """Run property ``name`` in a child process; its output on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    code = f"import tests.test_properties as t; t.{name}()"
    try:
        result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # a hang: the example it hung on
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        examples = [line for line in out.splitlines() if line.startswith("EXAMPLE ")]
        pytest.fail(f"{name}: the child ran past {timeout} s; last example:\n"
                    f"{examples[-1] if examples else '(none printed)'}")
    lines = result.stdout.splitlines()
    if result.returncode < 0:
        examples = [line for line in lines if line.startswith("EXAMPLE ")]
        last = examples[-1] if examples else "(none printed)"
        pytest.fail(f"{name}: the child died of {signal.Signals(-result.returncode).name}; "
                    f"last example:\n{last}\n{result.stderr[-2000:]}")
    assert result.returncode == 0, (
        f"{name} failed:\n" + "\n".join(lines[-30:]) + "\n" + result.stderr[-6000:])
    counts = [line for line in lines if line.startswith("EXAMPLES RUN ")]
    assert counts, result.stdout[-2000:]
    print(name, [line for line in lines if line.startswith("OUTCOMES ")][-1], counts[-1])
    return int(counts[-1].split()[-1])


class _Counter:
    """Examples run, and how they ended (printed by the child)."""

    def __init__(self):
        self.n = 0
        self.outcomes = {}

    def show(self, example):
        self.n += 1
        print("EXAMPLE", example, flush=True)

    def outcome(self, what):
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


def _finish(counter):
    print("OUTCOMES", dict(sorted(counter.outcomes.items())), flush=True)
    print("EXAMPLES RUN", counter.n, flush=True)


def _quiet_onnxruntime():
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    warnings.simplefilter("ignore")


# -- values ------------------------------------------------------------------------------



def _values(rng, shape, dtype, special):
    """An array of ``shape`` and ``dtype`` with some ``special`` entries."""
    base = rng.normal(size=shape)
    if base.size:
        where = rng.random(shape) < 0.2
        where.flat[0] = True
        if special == "nan":
            base[where] = np.nan
        elif special == "inf":
            base[where] = np.inf
        elif special == "huge":
            base[where] = 1e300
        elif special == "subnormal":
            base[where] = 5e-324
        elif special == "zero":
            base[:] = 0.0
    if dtype == "str":
        return base.astype(str)
    if dtype == "object":
        return base.astype(object)
    if dtype in ("int64", "int32"):
        return np.nan_to_num(base * 3, nan=0, posinf=7, neginf=-7).clip(-1e9, 1e9).astype(dtype)
    if dtype == "bool":
        return base > 0
    with np.errstate(over="ignore"):
        return base.astype(dtype)


def _moderate(array):
    """Whether predictions for ``array`` must be finite: finite numbers of
    moderate size (huge ones may overflow float32 legitimately)."""
    try:
        values = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(values).all() and (np.abs(values) < 1e6).all())


def _check_documented(exc, example, counter):
    counter.outcome(type(exc).__name__)
    if not isinstance(exc, DOCUMENTED):
        pytest.fail(f"undocumented {type(exc).__module__}.{type(exc).__name__}: {exc}\n"
                    f"example: {example}")


# -- OnnxFunction on random small graphs -------------------------------------------------

def _rarely(valid, invalid, one_in=8):
    """``valid``, but ``invalid`` about once in ``one_in`` draws (the middle
    value of a range: Hypothesis favours a range's bounds)."""
    return st.integers(0, one_in - 1).flatmap(
        lambda i: invalid if i == one_in // 2 else valid)


@st.composite
def _dense_graph(draw):
    """MatMul / Gemm / Relu / Add chains on (n, features)."""
    n_in = draw(_rarely(st.integers(1, 5), st.just(0)))
    weighted = st.sampled_from(["MatMul", "Gemm", "Gemm_t"])
    layers = [draw(weighted)] + draw(st.lists(
        st.sampled_from(["MatMul", "Gemm", "Gemm_t", "Relu", "Relu", "Add"]), max_size=3))
    sizes = draw(st.lists(_rarely(st.integers(1, 4), st.just(0)),
                          min_size=len(layers), max_size=len(layers)))
    return {"kind": "dense", "n_in": n_in, "layers": list(zip(layers, sizes)),
            "static": draw(st.booleans())}


@st.composite
def _window_graph(draw):
    """Conv / AveragePool / MaxPool / Relu chains on (n, C, spatial...);
    a Conv first (the weights), then any of them."""
    rank = draw(st.integers(1, 3))

    def sizes(low, high, count=rank):
        return st.lists(st.integers(low, high), min_size=count, max_size=count)

    ops = [draw(st.sampled_from(["Conv", "Conv", "ConvTranspose"]))] + draw(st.lists(
        st.sampled_from(["Conv", "ConvTranspose", "AveragePool", "AveragePool", "MaxPool",
                         "Relu"]), max_size=2))
    layers = []
    for op in ops:
        attrs = {}
        if op != "Relu":
            attrs["kernel_shape"] = draw(sizes(1, 3))
            if draw(st.booleans()):
                attrs["strides"] = draw(sizes(1, 3))
            choice = draw(st.sampled_from(["none", "pads", "pads", "auto"]))
            if choice == "pads":
                attrs["pads"] = draw(st.lists(st.integers(0, 2), min_size=2 * rank,
                                              max_size=2 * rank))
            elif choice == "auto":
                attrs["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID"]))
            if op != "AveragePool" and draw(st.booleans()):
                attrs["dilations"] = draw(sizes(1, 2))
        if op in ("Conv", "ConvTranspose"):
            attrs["out"] = draw(_rarely(st.integers(1, 3), st.just(0)))
        if op == "Conv" and draw(st.booleans()):
            attrs["group"] = draw(_rarely(st.integers(1, 2), st.just(0)))
        if op in ("AveragePool", "MaxPool") and draw(st.booleans()):
            attrs["ceil_mode"] = draw(st.integers(0, 1))
        if op == "AveragePool" and draw(st.booleans()):
            attrs["count_include_pad"] = draw(st.integers(0, 1))
        layers.append((op, attrs))
    # Now and then one attribute of one layer out of range (0 or -1).
    corrupt = draw(_rarely(st.none(), st.tuples(
        st.integers(0, len(layers) - 1),
        st.sampled_from(["kernel_shape", "strides", "dilations", "pads", "group"]),
        st.integers(-1, 0))))
    if corrupt is not None:
        index, name, value = corrupt
        op, attrs = layers[index]
        if op in ("Conv", "ConvTranspose") or (op != "Relu" and name != "group"):
            count = 2 * rank if name == "pads" else 1 if name == "group" else rank
            if name == "pads":
                value = -1
            attrs[name] = value if name == "group" else [1] * (count - 1) + [value]
            attrs.pop("auto_pad", None) if name == "pads" else None
    return {"kind": "window", "rank": rank,
            "channels": draw(_rarely(st.integers(1, 4), st.just(0))),
            "spatial": draw(st.lists(_rarely(st.integers(2, 7), st.integers(0, 1)),
                                     min_size=rank, max_size=rank)),
            "layers": layers, "static": draw(st.booleans())}


def _build_graph(spec, dtype, rng):
    """The model of a graph spec, and the shape of its input."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    nodes, inits = [], []
    current = "X"

    def weight(name, shape):
        inits.append(numpy_helper.from_array(
            (0.5 * rng.normal(size=shape)).astype(dtype), name))
        return name

    if spec["kind"] == "dense":
        width = spec["n_in"]
        x_shape = [spec["n_in"]]
        for k, (op, size) in enumerate(spec["layers"]):
            out = f"h{k}"
            if op == "MatMul":
                nodes.append(helper.make_node("MatMul", [current, weight(f"W{k}", (width, size))],
                                              [out]))
                width = size
            elif op in ("Gemm", "Gemm_t"):
                transposed = op == "Gemm_t"
                shape = (size, width) if transposed else (width, size)
                nodes.append(helper.make_node(
                    "Gemm", [current, weight(f"W{k}", shape), weight(f"B{k}", (size,))], [out],
                    transB=int(transposed)))
                width = size
            elif op == "Add":
                nodes.append(helper.make_node("Add", [current, weight(f"B{k}", (width,))], [out]))
            else:
                nodes.append(helper.make_node("Relu", [current], [out]))
            current = out
        declared = ["N", spec["n_in"]] if spec["static"] else ["N", "F"]
    else:
        channels = spec["channels"]
        x_shape = [channels] + list(spec["spatial"])
        for k, (op, attrs) in enumerate(spec["layers"]):
            attrs = dict(attrs)
            out = f"h{k}"
            if op == "Conv":
                n_out = attrs.pop("out")
                group = attrs.get("group", 1)
                per_group = channels // group if group > 0 and channels % group == 0 else channels
                kernel = attrs.pop("kernel_shape")
                w = weight(f"W{k}", [n_out, per_group] + [max(int(s), 1) for s in kernel])
                nodes.append(helper.make_node("Conv", [current, w, weight(f"B{k}", (n_out,))],
                                              [out], kernel_shape=kernel, **attrs))
                channels = n_out
            elif op == "ConvTranspose":
                n_out = attrs.pop("out")
                kernel = attrs.pop("kernel_shape")
                w = weight(f"W{k}", [channels, n_out] + [max(int(s), 1) for s in kernel])
                nodes.append(helper.make_node(
                    "ConvTranspose", [current, w, weight(f"B{k}", (n_out,))], [out],
                    kernel_shape=kernel, **attrs))
                channels = n_out
            elif op == "Relu":
                nodes.append(helper.make_node("Relu", [current], [out]))
            else:
                nodes.append(helper.make_node(op, [current], [out], **attrs))
            current = out
        rank = spec["rank"]
        declared = (["N", spec["channels"]] + list(spec["spatial"]) if spec["static"]
                    else ["N", spec["channels"]] + [f"s{i}" for i in range(rank)])
    nodes.append(helper.make_node("Identity", [current], ["Y"]))
    out_shape = ["N"] + [f"y{i}" for i in range(len(declared) - 1)]
    graph = helper.make_graph(
        nodes, "property_graph", [helper.make_tensor_value_info("X", elem, declared)],
        [helper.make_tensor_value_info("Y", elem, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 8
    return model, x_shape


_counter_function = _Counter()


@settings(max_examples=EXAMPLES["property_function_graphs"], **SETTINGS)
@given(spec=st.one_of(_dense_graph(), _window_graph()),
       dtype=st.sampled_from([np.float32, np.float64]),
       n=st.integers(0, 3),
       x_dtype=_rarely(st.just("same"), st.sampled_from(["other", "int64"])),
       wrong_shape=_rarely(st.just(False), st.just(True)),
       input_gradient=st.booleans(),
       seed=st.integers(0, 3))
def _function_graphs(spec, dtype, n, x_dtype, wrong_shape, input_gradient, seed):
    from onnxfit import OnnxFunction

    example = {"spec": spec, "dtype": np.dtype(dtype).name, "n": n, "x_dtype": x_dtype,
               "wrong_shape": wrong_shape, "input_gradient": input_gradient, "seed": seed}
    _counter_function.show(example)
    rng = np.random.default_rng(seed)
    model, x_shape = _build_graph(spec, dtype, rng)
    if wrong_shape:
        x_shape = [s + 1 for s in x_shape]
    want = {"same": dtype, "other": np.float64 if dtype == np.float32 else np.float32,
            "int64": np.int64}[x_dtype]
    X = rng.normal(size=[n] + x_shape).astype(want)
    try:
        f = OnnxFunction(model, input_gradient=input_gradient)
        weights = f.initial_weights()
        y = f.forward(X, weights)
    except Exception as exc:  # noqa: BLE001 - the property is about the type
        _check_documented(exc, example, _counter_function)
        return
    assert isinstance(y, np.ndarray) and y.dtype == f.dtype, example
    assert y.shape[:1] == (n,), (y.shape, example)
    assert np.isfinite(y).all(), example
    try:
        result = f.backward(np.ones_like(y), return_input_gradient=input_gradient)
    except Exception as exc:  # noqa: BLE001
        _check_documented(exc, example, _counter_function)
        return
    _counter_function.outcome("ok")
    grads, dx = result if input_gradient else (result, None)
    for name, grad in grads.items():
        assert grad.shape == tuple(weights[name].shape), (name, grad.shape, example)
        assert np.isfinite(grad).all(), (name, example)
    if dx is not None:
        assert dx.shape == X.shape and np.isfinite(dx).all(), example


def property_function_graphs():
    """OnnxFunction.forward/backward on random small graphs (child process)."""
    _quiet_onnxruntime()
    _function_graphs()
    _finish(_counter_function)


# -- the estimators ------------------------------------------------------------------------

_PARAMS = {
    "batch_size": _rarely(st.sampled_from(["auto", 1, 4, 64]), st.sampled_from([0, -1, 2.5]),
                          32),
    "max_iter": st.integers(1, 3),
    "eta0": _rarely(st.sampled_from([None, 0.01, 0.1, 1e3]), st.sampled_from([0.0, -1.0]), 32),
    "penalty": _rarely(st.sampled_from(["l2", "l1", "elasticnet", None]), st.just("bogus"), 32),
    "alpha": _rarely(st.sampled_from([0.0, 1e-4, 10.0]), st.just(-1.0), 32),
    "engine": st.sampled_from(["fused", "forward_backward"]),
    "early_stopping": st.booleans(),
    "shuffle": st.booleans(),
}

_REGRESSION_RATES = ["auto", "sgd", "adam", "invscaling", "optimal", "adaptive", "constant",
                     "momentum", "nesterov", "rmsprop", "adagrad", "adamw", "nope"]
_CLASSIFICATION_RATES = [r for r in _REGRESSION_RATES if r != "auto"]


@st.composite
def _data(draw, classifier):
    n = draw(_rarely(st.integers(2, 40), st.integers(0, 1), 12))
    d = draw(_rarely(st.integers(1, 6), st.just(0), 12))
    dtype = draw(_rarely(st.sampled_from(["float32", "float64", "float16", "int64", "int32"]),
                         st.sampled_from(["bool", "object", "str"]), 6))
    special = draw(_rarely(st.sampled_from(["finite", "subnormal", "zero"]),
                           st.sampled_from(["nan", "inf", "huge"]), 6))
    if classifier:
        y_kind = draw(_rarely(st.sampled_from(["int", "str"]),
                              st.sampled_from(["column", "wide", "one", "float"]), 6))
    else:
        y_kind = draw(_rarely(st.sampled_from(["1d", "column", "int"]),
                              st.sampled_from(["wide", "nan", "short"]), 6))
    weight_kind = draw(_rarely(st.sampled_from(["none", "ones", "random", "scalar"]),
                               st.sampled_from(["negative", "short", "nan", "zeros"]), 6))
    return {"n": n, "d": d, "dtype": dtype, "special": special, "y_kind": y_kind,
            "weight_kind": weight_kind, "seed": draw(st.integers(0, 2))}


def _make_data(data, classifier):
    rng = np.random.default_rng(data["seed"])
    n, d = data["n"], data["d"]
    X = _values(rng, (n, d), data["dtype"], data["special"])
    kind = data["y_kind"]
    if classifier:
        labels = rng.integers(0, 3, size=n)
        y = {"int": labels, "str": np.array(["a", "b", "c"])[labels] if n else np.array([], str),
             "float": rng.normal(size=n), "column": labels.reshape(-1, 1),
             "wide": rng.integers(0, 2, size=(n, 3)), "one": np.zeros(n, int)}[kind]
    else:
        y = {"1d": rng.normal(size=n), "column": rng.normal(size=(n, 1)),
             "wide": rng.normal(size=(n, 2)), "nan": np.full(n, np.nan),
             "int": rng.integers(0, 5, size=n), "short": rng.normal(size=max(n - 1, 0))}[kind]
    weights = {"none": None, "ones": np.ones(n), "random": rng.random(n), "zeros": np.zeros(n),
               "negative": -np.ones(n), "short": np.ones(n + 1), "nan": np.full(n, np.nan),
               "scalar": 2.0}[data["weight_kind"]]
    return X, y, weights


def _mlp(n_in, n_out, seed):
    from tests.graphs import mlp_graph

    return mlp_graph(max(n_in, 1), [3], n_out, seed=seed)


def _conv1d(length, n_out, seed):
    """Conv (kernel 2) -> Relu -> Flatten -> MatMul + Add on X of shape
    (n, 1, length): a graph that wants 3-D samples."""
    rng = np.random.default_rng(seed)
    length = max(length, 2)
    inits = [("W", 0.5 * rng.normal(size=(2, 1, 2))), ("B", np.zeros(2)),
             ("W2", 0.5 * rng.normal(size=(2 * (length - 1), n_out))), ("B2", np.zeros(n_out))]
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["H"]),
             helper.make_node("Relu", ["H"], ["R"]),
             helper.make_node("Flatten", ["R"], ["F"]),
             helper.make_node("MatMul", ["F", "W2"], ["M"]),
             helper.make_node("Add", ["M", "B2"], ["Y"])]
    graph = helper.make_graph(
        nodes, "conv1d", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, length])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _estimator_property(classifier, data, params, method, model, loss, learning_rate, example,
                        counter):
    from onnxfit import OnnxSGDClassifier, OnnxSGDRegressor

    X, y, sample_weight = _make_data(data, classifier)
    onnx_model = None
    if model == "mlp":
        onnx_model = _mlp(data["d"], 3 if classifier else 1, data["seed"])
    elif model == "conv1d":
        onnx_model = _conv1d(data["d"], 3 if classifier else 1, data["seed"])
        X = X.reshape(len(X), 1, data["d"])
    cls = OnnxSGDClassifier if classifier else OnnxSGDRegressor
    estimator = cls(onnx_model=onnx_model, loss=loss, learning_rate=learning_rate,
                    random_state=0, n_iter_no_change=1, tol=None, **params)
    try:
        if method == "predict_unfitted":
            estimator.predict(X)
            raise AssertionError(f"predict before fit succeeded: {example}")
        if method == "partial_fit":
            if classifier:
                estimator.partial_fit(X, y, classes=np.unique(y) if np.size(y) else None,
                                      sample_weight=sample_weight)
            else:
                estimator.partial_fit(X, y, sample_weight=sample_weight)
        else:
            estimator.fit(X, y, sample_weight=sample_weight)
        prediction = estimator.predict(X)
    except Exception as exc:  # noqa: BLE001 - the property is about the type
        _check_documented(exc, example, counter)
        return
    counter.outcome("ok")
    prediction = np.asarray(prediction)
    assert prediction.shape[0] == len(X), (prediction.shape, example)
    if classifier:
        assert np.isin(prediction, estimator.classes_).all(), example
    elif _moderate(X):
        assert np.isfinite(prediction).all(), example
    # The fitted estimator on X of another width, rank or dtype.
    for other in (np.concatenate([X, X[:, :1]], axis=1) if X.shape[1] else X[:, None],
                  X.reshape(len(X), -1)[:, :, None], X.astype(np.float64)[:0],
                  X.astype(str)):
        try:
            estimator.predict(other)
        except Exception as exc:  # noqa: BLE001
            _check_documented(exc, dict(example, predict_shape=other.shape,
                                        predict_dtype=str(other.dtype)), counter)


_counter_regressor = _Counter()


@settings(max_examples=EXAMPLES["property_regressor"], **SETTINGS)
@given(data=_data(classifier=False), params=st.fixed_dictionaries(_PARAMS),
       method=_rarely(st.sampled_from(["fit", "partial_fit"]), st.just("predict_unfitted"), 16),
       model=st.sampled_from(["linear", "linear", "mlp", "conv1d"]),
       loss=_rarely(st.sampled_from(["squared_error", "absolute_error", "huber",
                                     "epsilon_insensitive", "squared_epsilon_insensitive",
                                     "elastic"]), st.just("log_loss"), 32),
       learning_rate=_rarely(st.sampled_from(_REGRESSION_RATES[:-1]), st.just("nope"), 32))
def _regressor(data, params, method, model, loss, learning_rate):
    example = {"data": data, "params": params, "method": method, "model": model, "loss": loss,
               "learning_rate": learning_rate}
    _counter_regressor.show(example)
    _estimator_property(False, data, params, method, model, loss, learning_rate, example,
                        _counter_regressor)


def property_regressor():
    """OnnxSGDRegressor fit/partial_fit/predict on random data and parameters."""
    _quiet_onnxruntime()
    _regressor()
    _finish(_counter_regressor)


_counter_classifier = _Counter()


@settings(max_examples=EXAMPLES["property_classifier"], **SETTINGS)
@given(data=_data(classifier=True), params=st.fixed_dictionaries(_PARAMS),
       method=_rarely(st.sampled_from(["fit", "partial_fit"]), st.just("predict_unfitted"), 16),
       model=st.sampled_from(["linear", "linear", "mlp", "conv1d"]),
       loss=_rarely(st.sampled_from(["log_loss", "hinge", "modified_huber"]),
                    st.just("squared_error"), 32),
       learning_rate=_rarely(st.sampled_from(_CLASSIFICATION_RATES[:-1]), st.just("nope"), 32))
def _classifier(data, params, method, model, loss, learning_rate):
    example = {"data": data, "params": params, "method": method, "model": model, "loss": loss,
               "learning_rate": learning_rate}
    _counter_classifier.show(example)
    _estimator_property(True, data, params, method, model, loss, learning_rate, example,
                        _counter_classifier)


def property_classifier():
    """OnnxSGDClassifier fit/partial_fit/predict on random data and parameters."""
    _quiet_onnxruntime()
    _classifier()
    _finish(_counter_classifier)


# -- the tests -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_property(name):
    ran = _run_child(name)
    assert ran >= EXAMPLES[name] // 2, ran


_SIGFPE_GRAPH = textwrap.dedent("""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxfit import OnnxFunction

    # Conv with group=0 on zero input channels, then AveragePool: onnxruntime's
    # Conv kernel divided by the group and killed the process (SIGFPE).
    w = numpy_helper.from_array(np.ones((1, 0, 1, 4), np.float32), "W")
    nodes = [helper.make_node("Conv", ["X", "W"], ["H"], group=0),
             helper.make_node("AveragePool", ["H"], ["Y"], kernel_shape=[4, 2],
                              strides=[1, 2], auto_pad="SAME_LOWER")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 0, 3, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1, 3, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 8
    try:
        f = OnnxFunction(model)
        f.backward(np.ones_like(f.forward(np.ones((2, 0, 3, 4), np.float32),
                                          f.initial_weights())))
    except ValueError as exc:
        print("REFUSED", exc)
""")


def test_conv_group_zero_is_refused_not_a_crash():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _SIGFPE_GRAPH], check=False, cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "REFUSED" in result.stdout and "group=0" in result.stdout, result.stdout


@pytest.mark.parametrize("attribute, value", [("strides", [0, 0]), ("kernel_shape", [0, 2]),
                                              ("pads", [-1, 0, 0, 0])])
def test_window_attributes_refused_by_name(attribute, value):
    from onnxfit import OnnxFunction

    attrs = {"kernel_shape": [2, 2], attribute: value}
    nodes = [helper.make_node("AveragePool", ["X"], ["Y"], **attrs)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1, "h", "w"])],
        [numpy_helper.from_array(np.ones(1, np.float32), "unused")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(ValueError, match=f"AveragePool node has {attribute}="):
        OnnxFunction(model, weights_to_train=[])


@pytest.mark.parametrize("x_size, kernel", [(5, 3), (6, 4)])
def test_average_pool_gradient_of_an_empty_pool_is_zero(x_size, kernel):
    """A pool window one larger than the Conv's output: Y is empty (no
    window fits), and dW and dB are zeros, not an onnxruntime error."""
    from onnxfit import OnnxFunction

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["H"]),
             helper.make_node("AveragePool", ["H"], ["Y"], kernel_shape=[4, 4])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, x_size, x_size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2, "h", "w"])],
        [numpy_helper.from_array(rng.normal(size=(2, 1, kernel, kernel)).astype(np.float32),
                                 "W"),
         numpy_helper.from_array(np.zeros(2, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    f = OnnxFunction(model)
    y = f.forward(np.ones((2, 1, x_size, x_size), np.float32), f.initial_weights())
    grads = f.backward(np.ones_like(y))
    assert y.shape == (2, 2, 0, 0)
    assert not grads["W"].any() and not grads["B"].any()


_SIGABRT_GRAPH = textwrap.dedent("""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxfit import OnnxFunction

    # A Conv whose dilated kernel (reach 3) is longer than its input (2) along
    # one axis: onnx's shape inference of the gradient graph aborted the
    # process (std::clamp assertion, SIGABRT) while the function was built.
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in [("W0", (1, 3, 1, 1, 1)), ("W1", (2, 1, 1, 2, 2))]]
    nodes = [helper.make_node("Conv", ["X", "W0"], ["H"]),
             helper.make_node("Conv", ["H", "W1"], ["Y"], strides=[3, 3, 1],
                              dilations=[2, 2, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 6, 2, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2, "a", "b", "c"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 8
    try:
        OnnxFunction(model)
    except ValueError as exc:
        print("REFUSED", exc)
""")


def test_conv_without_a_window_is_refused_not_a_crash():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _SIGABRT_GRAPH], check=False, cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "REFUSED" in result.stdout and "no window along spatial axis 1" in result.stdout, (
        result.stdout)


def _float64_conv_graph():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["X", "W"], ["H"]),
             helper.make_node("ReduceMean", ["H"], ["Y"], axes=[1, 2], keepdims=0)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.DOUBLE, ["N", 1, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["N"])],
        [numpy_helper.from_array(rng.normal(size=(2, 1, 2)), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_function_onnxruntime_refusal_is_a_value_error():
    """onnxruntime has no float64 Conv on the CPU: its NotImplemented comes
    out of OnnxFunction as a ValueError that keeps onnxruntime's message."""
    from onnxfit import OnnxFunction

    with pytest.raises(ValueError, match="onnxruntime could not load.*Conv"):
        OnnxFunction(_float64_conv_graph())


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_estimator_onnxruntime_refusal_is_a_value_error(engine):
    """The same refusal from the estimators (through sessions.make_session)."""
    from onnxfit import OnnxSGDRegressor

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(10, 1, 6)), rng.normal(size=10)
    with pytest.raises(ValueError, match="Conv"):
        OnnxSGDRegressor(_float64_conv_graph(), max_iter=1, engine=engine).fit(X, y)


@pytest.mark.parametrize("channels, layers", [
    (1, [("Conv", {"kernel_shape": [1], "out": 0}), ("AveragePool", {"kernel_shape": [1]})]),
    (0, [("Conv", {"kernel_shape": [1], "out": 2, "group": 2})]),
])
def test_gradients_of_empty_values_keep_their_shapes(channels, layers):
    """Empty values on an empty batch: Conv with 0 output channels before an
    AveragePool, a grouped Conv with 0 channels per group.  The gradients
    have the weights' shapes (Reshapes took a 0 as "copy the input's
    dimension", or could not resolve a -1, and gave W a gradient of shape
    (1, 1, 1) or (2, 2, 1))."""
    from onnxfit import OnnxFunction

    spec = {"kind": "window", "rank": 1, "channels": channels, "spatial": [2],
            "static": False, "layers": layers}
    model, x_shape = _build_graph(spec, np.float32, np.random.default_rng(0))
    f = OnnxFunction(model)
    weights = f.initial_weights()
    y = f.forward(np.ones([0, *x_shape], np.float32), weights)
    grads = f.backward(np.ones_like(y))
    assert y.shape[0] == 0
    assert {k: v.shape for k, v in grads.items()} == {k: v.shape for k, v in weights.items()}


_SIGSEGV_GRAPH = textwrap.dedent("""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxfit import OnnxFunction

    # A 3-D AveragePool whose window is longer than its input along one axis
    # (an empty pool), spatial sizes symbolic: its gradient's ConvTranspose
    # got an input empty along that axis, and onnxruntime's 3-D
    # ConvTranspose crashed on it (SIGSEGV) in the backward pass.
    w = numpy_helper.from_array(np.ones((2, 1, 1, 2, 2), np.float32), "W")
    nodes = [helper.make_node("Conv", ["X", "W"], ["H"], strides=[2, 1, 2]),
             helper.make_node("AveragePool", ["H"], ["Y"], kernel_shape=[2, 2, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, "a", "b", "c"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2, "d", "e", "f"])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 8
    f = OnnxFunction(model)
    y = f.forward(np.ones((1, 1, 2, 5, 2), np.float32), f.initial_weights())
    grads = f.backward(np.ones_like(y))
    print("SHAPES", y.shape, grads["W"].shape, bool(np.any(grads["W"])))
""")


def test_average_pool_3d_empty_gradient_is_not_a_crash():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _SIGSEGV_GRAPH], check=False, cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "SHAPES (1, 2, 0, 3, 1) (2, 1, 1, 2, 2) False" in result.stdout, result.stdout


def test_deep_conv_transpose_on_an_empty_axis_is_refused_not_a_crash():
    """onnxruntime's ConvTranspose of three spatial axes crashes (SIGSEGV)
    on an input empty along one of them: OnnxFunction refuses it first."""
    code = textwrap.dedent("""
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper
        from onnxfit import OnnxFunction

        w = numpy_helper.from_array(np.ones((1, 1, 1, 2, 1), np.float32), "W")
        graph = helper.make_graph(
            [helper.make_node("ConvTranspose", ["X", "W"], ["Y"])], "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, "a", "b", "c"])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1, "d", "e", "f"])],
            [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        f = OnnxFunction(model)
        print("EMPTY BATCH", f.forward(np.ones((0, 1, 2, 1, 2), np.float32),
                                       f.initial_weights()).shape)
        try:
            f.forward(np.ones((2, 1, 2, 0, 2), np.float32), f.initial_weights())
        except ValueError as exc:
            print("REFUSED", exc)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "EMPTY BATCH (0, 1, 2, 2, 2)" in result.stdout, result.stdout
    assert "REFUSED" in result.stdout and "ConvTranspose" in result.stdout, result.stdout


@pytest.mark.parametrize("length, kernel, stride", [(1, 2, 2), (3, 4, 2), (3, 5, 3), (2, 3, 1)])
def test_average_pool_partial_windows_static_as_symbolic(length, kernel, stride):
    """An input shorter than the pool's window: onnxruntime truncates the
    window count towards 0 (one partial window, or none); the gradient of a
    graph with static sizes agrees with the one with symbolic sizes (the
    static one was refused, or failed in onnxruntime, where the window
    count was computed with a floor)."""
    from onnxfit import OnnxFunction

    results = []
    for dims in ([length], ["L"]):
        nodes = [helper.make_node("Conv", ["X", "W"], ["H"]),
                 helper.make_node("AveragePool", ["H"], ["Y"], kernel_shape=[kernel],
                                  strides=[stride])]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, *dims])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1, "l"])],
            [numpy_helper.from_array(np.full((1, 1, 1), 0.5, np.float32), "W")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        model.ir_version = 8
        f = OnnxFunction(model)
        X = np.arange(2 * length, dtype=np.float32).reshape(2, 1, length)
        y = f.forward(X, f.initial_weights())
        results.append((y, f.backward(np.ones_like(y))["W"]))
    (y_static, dw_static), (y_symbolic, dw_symbolic) = results
    np.testing.assert_array_equal(y_static, y_symbolic)
    np.testing.assert_allclose(dw_static, dw_symbolic, rtol=1e-6)


def test_conv_transpose_without_output_is_refused_not_a_crash():
    """A ConvTranspose whose pads remove more than its input spreads to:
    onnx's shape inference of the gradient graph aborted the process
    (SIGABRT, std::clamp assertion) while the function was built."""
    code = textwrap.dedent("""
        import numpy as np
        from onnxfit import OnnxFunction
        from tests.test_properties import _build_graph

        # The example the search found (0 channels in, 0 out of the first Conv).
        spec = {"kind": "window", "rank": 2, "channels": 0, "spatial": [2, 3], "static": True,
                "layers": [
                    ("Conv", {"kernel_shape": [2, 1], "strides": [3, 2], "pads": [0, 2, 0, 2],
                              "out": 0, "group": 1}),
                    ("ConvTranspose", {"kernel_shape": [2, 1], "pads": [1, 0, 2, 2], "out": 2}),
                    ("Conv", {"kernel_shape": [1, 2], "pads": [0, 2, 2, 1], "dilations": [2, 1],
                              "out": 1})]}
        model, _ = _build_graph(spec, np.float32, np.random.default_rng(0))
        try:
            OnnxFunction(model, input_gradient=True)
        except ValueError as exc:
            print("REFUSED", exc)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "REFUSED" in result.stdout and "ConvTranspose" in result.stdout, result.stdout


_HANG_GRAPHS = textwrap.dedent("""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxfit import OnnxFunction

    def model(op, w_shape, x_dims, y_dims):
        w = numpy_helper.from_array(np.ones(w_shape, np.float32), "W")
        graph = helper.make_graph(
            [helper.make_node(op, ["X", "W"], ["Y"])], "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, *x_dims])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1, *y_dims])], [w])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    # A ConvTranspose's weight gradient is a Conv whose kernel is the input:
    # an input empty along an axis gave onnxruntime's Conv an empty kernel,
    # and it never returned.
    f = OnnxFunction(model("ConvTranspose", (1, 1, 3, 3), ["a", "b"], ["c", "d"]))
    y = f.forward(np.ones((1, 1, 0, 2), np.float32), f.initial_weights())
    grads = f.backward(np.ones_like(y))
    print("GRADIENT", y.shape, grads["W"].shape, bool(np.any(grads["W"])))
    # The same from a graph's own Conv with an empty weight: refused.
    try:
        OnnxFunction(model("Conv", (1, 1, 0, 2), ["a", "b"], ["c", "d"]))
    except ValueError as exc:
        print("REFUSED", exc)
""")


def test_empty_kernels_do_not_hang():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _HANG_GRAPHS], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "GRADIENT (1, 1, 2, 4) (1, 1, 3, 3) False" in result.stdout, result.stdout
    assert "REFUSED" in result.stdout and "empty kernel" in result.stdout, result.stdout
