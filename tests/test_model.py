"""The model graph: how onnx_model is given, normalisation, which weights and
which output are trained, float32/float64 graphs, and the errors for graphs
that cannot be trained."""

import numpy as np
import onnx
import onnxruntime
import pytest
from numpy.testing import assert_allclose
from onnx import TensorProto, helper, numpy_helper

from onnxfit import OnnxSGDRegressor
from onnxfit import model as model_module
from onnxfit.sessions import runtime_limits
from tests.graphs import mlp_graph

COMMON = dict(random_state=0, max_iter=3, tol=None, batch_size=16)


def _data(n_features=3, n=48, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features))
    y = X @ rng.normal(size=n_features) + 0.5
    return X, y


def _model(nodes, inputs, outputs, inits, ir_version=8, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    if opset is None:  # onnx's defaults: the newest IR version and opset
        return helper.make_model(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _linear(n_in=3, elem=TensorProto.FLOAT, **kwargs):
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    rng = np.random.default_rng(1)
    return _model(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])],
        [helper.make_tensor_value_info("X", elem, ["N", n_in])],
        [helper.make_tensor_value_info("Y", elem, ["N", 1])],
        [
            numpy_helper.from_array(rng.normal(size=(n_in, 1)).astype(dtype), "W"),
            numpy_helper.from_array(np.array([0.1], dtype=dtype), "B"),
        ],
        **kwargs,
    )


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _mse(est, X, y):
    return float(np.mean((est.predict(X) - y) ** 2))


def _session_outputs(model, X):
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    input_type = session.get_inputs()[0].type
    X = X.astype(np.float64 if "double" in input_type else np.float32)
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: X})))


# -- ways to pass the model ---------------------------------------------------

def test_model_as_proto_bytes_and_path(tmp_path):
    X, y = _data()
    model = mlp_graph(3, (5,), 1)
    original = model.SerializeToString()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)

    from_proto = OnnxSGDRegressor(model, **COMMON).fit(X, y)
    assert model.SerializeToString() == original  # the user's object is untouched
    assert from_proto.onnx_model_ is not model
    from_bytes = OnnxSGDRegressor(original, **COMMON).fit(X, y)
    from_path = OnnxSGDRegressor(str(path), **COMMON).fit(X, y)
    from_pathlike = OnnxSGDRegressor(path, **COMMON).fit(X, y)
    from_proto.predict(X)
    assert model.SerializeToString() == original

    initial = _initializers(model)
    for other in (from_bytes, from_path, from_pathlike):
        assert sorted(other.weights_) == ["B0", "B1", "W0", "W1"]
        for name, value in from_proto.weights_.items():
            np.testing.assert_array_equal(other.weights_[name], value)
            assert not np.array_equal(value, initial[name])  # trained


def test_bad_model_arguments():
    X, y = _data()
    with pytest.raises(ValueError, match="not an ONNX model"):
        OnnxSGDRegressor(b"certainly not protobuf", **COMMON).fit(X, y)
    with pytest.raises(ValueError, match="does not exist"):
        OnnxSGDRegressor("/nonexistent/model.onnx", **COMMON).fit(X, y)
    broken = _linear()
    broken.graph.node[1].input[0] = "undefined_value"
    with pytest.raises(ValueError, match="not a valid ONNX graph"):
        OnnxSGDRegressor(broken, **COMMON).fit(X, y)


def _default_opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("limits", ["installed", "1.19.2"])
def test_new_ir_and_opset_are_normalised_without_touching_the_user_model(limits, monkeypatch):
    """A graph newer than the runtime is converted down to the runtime's
    limits (1.19.2's are IR 10 / opset 21), one the runtime runs is kept."""
    if limits == "1.19.2":
        monkeypatch.setattr(model_module, "runtime_limits", lambda: (10, 21))
    max_ir, max_opset = model_module.runtime_limits()
    X, y = _data()
    model = _linear(opset=None)
    original = model.SerializeToString()
    est = OnnxSGDRegressor(model, learning_rate="sgd", random_state=0, max_iter=30, tol=None,
                           batch_size=8).fit(X, y)
    assert est.onnx_model_.ir_version == min(model.ir_version, max_ir)
    assert _default_opset(est.onnx_model_) == min(_default_opset(model), max_opset)
    if limits == "1.19.2":
        assert _default_opset(model) > 21  # onnx writes newer graphs than 1.19.2 runs
    assert model.SerializeToString() == original
    start = OnnxSGDRegressor(model, **COMMON).fit(X, y)
    start.weights_ = _initializers(model)  # the untrained weights
    assert _mse(est, X, y) < 0.5 * _mse(start, X, y)
    # the exported graph loads in onnxruntime and agrees with predict
    assert_allclose(_session_outputs(est.to_onnx(), X)["Y"].ravel(), est.predict(X), rtol=1e-6)


# -- weights to train -------------------------------------------------------------

@pytest.mark.parametrize("weights_to_train", [["W1", "B1"], ("B1", "W1"), "W1"])
def test_weights_to_train_freezes_the_others(weights_to_train):
    X, y = _data()
    model = mlp_graph(3, (6,), 1)
    initial = _initializers(model)
    est = OnnxSGDRegressor(model, weights_to_train=weights_to_train, **COMMON).fit(X, y)
    trained = ["W1", "B1"] if weights_to_train != "W1" else ["W1"]
    assert sorted(est.weights_to_train_) == sorted(trained)
    assert sorted(est.weights_) == sorted(trained)
    exported = _initializers(est.to_onnx())
    for name in ["W0", "B0", "W1", "B1"]:
        if name in trained:
            assert not np.array_equal(exported[name], initial[name])
            np.testing.assert_array_equal(exported[name], est.weights_[name])
        else:  # frozen: bit for bit
            assert exported[name].tobytes() == initial[name].tobytes()


def test_weights_to_train_none_means_every_float_initializer_of_the_output():
    X, y = _data()
    est = OnnxSGDRegressor(mlp_graph(3, (4, 4), 1), **COMMON).fit(X, y)
    assert est.weights_to_train_ == ["W0", "B0", "W1", "B1", "W2", "B2"]


def _reshape_model():
    """Y = Reshape(X @ W, shape): an int64 initializer next to a float one."""
    return _model(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Reshape", ["XW", "shape"], ["Y"]),
        ],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [
            numpy_helper.from_array(np.ones((3, 1), np.float32), "W"),
            numpy_helper.from_array(np.array([-1, 1], np.int64), "shape"),
        ],
    )


def test_reshape_model_trains_its_float_weight():
    X, y = _data()
    est = OnnxSGDRegressor(_reshape_model(), **COMMON).fit(X, y)
    assert est.weights_to_train_ == ["W"]


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        (mlp_graph(3, (4,), 1), {"weights_to_train": ["W0", "nope"]}, r"unknown initializers \['nope'\].*'W0'"),
        (mlp_graph(3, (4,), 1), {"weights_to_train": []}, r"weights_to_train is empty.*'W0'"),
        (_reshape_model(), {"weights_to_train": ["shape"]}, r"non-float initializers \['shape'\]"),
    ],
    ids=["unknown", "empty", "non_float"],
)
def test_weights_to_train_errors_name_the_problem(model, kwargs, match):
    X, y = _data()
    with pytest.raises(ValueError, match=match):
        OnnxSGDRegressor(model, **kwargs, **COMMON).fit(X, y)


def test_graph_with_nothing_trainable():
    X, y = _data()
    model = _model(
        [helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=1)],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    with pytest.raises(ValueError, match="no floating-point initializer.*nothing can be trained.*axes"):
        OnnxSGDRegressor(model, **COMMON).fit(X, y)


def test_op_without_gradient_is_named():
    X, y = _data()
    rng = np.random.default_rng(0)
    model = _model(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Floor", ["XW"], ["F"]),
            helper.make_node("Add", ["F", "B"], ["Y"]),
        ],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [
            numpy_helper.from_array(rng.normal(size=(3, 1)).astype(np.float32), "W"),
            numpy_helper.from_array(np.zeros(1, np.float32), "B"),
        ],
    )
    est = OnnxSGDRegressor(model, **COMMON)
    with pytest.raises(ValueError, match=r"\['W'\] reach the loss only through .*Floor \(node 'F'\)"):
        est.fit(X, y)
    assert not hasattr(est, "weights_")  # refused before any training
    # Freezing W leaves B, which the loss reaches through Add: that trains.
    OnnxSGDRegressor(model, weights_to_train=["B"], **COMMON).fit(X, y)


def test_scalar_initializers_are_constants_unless_named():
    """Exporters write constants as scalar initializers (an attention scale,
    the zero of an initial state): not trained by default, trainable by name."""
    X, y = _data()
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]),
         helper.make_node("Mul", ["XW", "scale"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.ones((3, 1), np.float32), "W"),
         numpy_helper.from_array(np.array(0.5, np.float32), "scale")],
    )
    assert OnnxSGDRegressor(model, **COMMON).fit(X, y).weights_to_train_ == ["W"]
    named = OnnxSGDRegressor(model, weights_to_train=["W", "scale"], **COMMON).fit(X, y)
    assert named.weights_to_train_ == ["W", "scale"] and named.weights_["scale"] != 0.5


def test_a_graph_input_the_output_does_not_read_is_explained():
    X, y = _data()
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("Neg", ["Z"], ["T"])],
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 1]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("T", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.ones((3, 1), np.float32), "W")],
    )
    with pytest.raises(ValueError, match=r"inputs \['Z'\] do not feed the output 'Y'.*loss_output"):
        OnnxSGDRegressor(model, **COMMON).fit(X, y)


# -- output selection ---------------------------------------------------------------

def _two_output_model():
    """Two heads on X: Y1 = X W1 + B1 and Y2 = X W2 + B2, and an int64
    output ``idx`` (ArgMax of Y2) listed first."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 1)).astype(np.float32), "W1"),
        numpy_helper.from_array(np.zeros(1, np.float32), "B1"),
        numpy_helper.from_array(rng.normal(size=(3, 1)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.zeros(1, np.float32), "B2"),
    ]
    return _model(
        [
            helper.make_node("MatMul", ["X", "W1"], ["XW1"]),
            helper.make_node("Add", ["XW1", "B1"], ["Y1"]),
            helper.make_node("MatMul", ["X", "W2"], ["XW2"]),
            helper.make_node("Add", ["XW2", "B2"], ["Y2"]),
            helper.make_node("ArgMax", ["Y2"], ["idx"], axis=1),
        ],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1]),
            helper.make_tensor_value_info("Y1", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("Y2", TensorProto.FLOAT, ["N", 1]),
        ],
        inits,
    )


def test_output_name_selects_the_trained_output():
    X, y = _data()
    model = _two_output_model()
    initial = _initializers(model)
    est = OnnxSGDRegressor(model, output_name="Y2", **COMMON).fit(X, y)
    assert est.trained_output_ == "Y2"
    assert est.weights_to_train_ == ["W2", "B2"]
    exported = est.to_onnx()
    assert [o.name for o in exported.graph.output] == ["idx", "Y1", "Y2"]  # all outputs kept
    outputs = _session_outputs(exported, X)
    assert_allclose(outputs["Y2"].ravel(), est.predict(X), rtol=1e-6)
    weights = _initializers(exported)
    for name in ("W1", "B1"):
        assert weights[name].tobytes() == initial[name].tobytes()
    assert not np.array_equal(weights["W2"], initial["W2"])

    default = OnnxSGDRegressor(model, **COMMON).fit(X, y)
    assert default.trained_output_ == "Y1"  # the first float output
    assert default.weights_to_train_ == ["W1", "B1"]


def test_output_name_errors():
    X, y = _data()
    with pytest.raises(ValueError, match="output_name='Q'.*'Y1'"):
        OnnxSGDRegressor(_two_output_model(), output_name="Q", **COMMON).fit(X, y)
    with pytest.raises(ValueError, match="'Y2' does not depend on \\['W1'\\]"):
        OnnxSGDRegressor(
            _two_output_model(), output_name="Y2", weights_to_train=["W1"], **COMMON
        ).fit(X, y)
    with pytest.raises(ValueError, match="'idx' is not a float"):
        OnnxSGDRegressor(_two_output_model(), output_name="idx", **COMMON).fit(X, y)


# -- element types -------------------------------------------------------------------

def test_float64_graph_trains_in_float64():
    X, y = _data()
    model = mlp_graph(3, (5,), 1, dtype=np.float64)
    start = _initializers(model)
    est = OnnxSGDRegressor(model, **COMMON).fit(X.astype(np.float32), y)
    assert est.dtype_ == np.float64 and est.input_dtype_ == np.float64
    assert all(w.dtype == np.float64 for w in est.weights_.values())
    exported = est.to_onnx()
    assert all(i.data_type == TensorProto.DOUBLE for i in exported.graph.initializer)
    assert_allclose(_session_outputs(exported, X)["Y"].ravel(), est.predict(X), rtol=1e-12)
    untrained = OnnxSGDRegressor(model, **COMMON).fit(X, y)
    untrained.weights_ = start
    assert _mse(est, X, y) < _mse(untrained, X, y)


def test_float32_graph_casts_float64_input():
    X, y = _data()
    est = OnnxSGDRegressor(mlp_graph(3, (5,), 1), **COMMON).fit(X, y)
    assert est.dtype_ == np.float32 and est.input_dtype_ == np.float32
    assert all(w.dtype == np.float32 for w in est.weights_.values())
    assert est.predict(X).dtype == np.float64
    assert_allclose(
        est.predict(X), est.predict(X.astype(np.float32)), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_linear_model_follows_the_dtype_of_X(dtype):
    X, y = _data()
    est = OnnxSGDRegressor(**COMMON).fit(X.astype(dtype), y)
    assert est.dtype_ == dtype
    assert est.weights_["coef"].shape == (3, 1) and est.weights_["intercept"].shape == (1,)
    assert est.onnx_model_.ir_version <= runtime_limits()[0]


def test_intermediate_value_as_output_name():
    # Train the hidden layer's activations (a value, not a graph output).
    model = mlp_graph(4, (3,), 1)
    rng = np.random.default_rng(0)
    X = rng.random((60, 4)).astype(np.float32)
    y = rng.random((60, 3))
    est = OnnxSGDRegressor(model, output_name="H0", max_iter=3, tol=None, random_state=0)
    est.fit(X, y)
    assert est.trained_output_ == "H0"
    assert est.weights_to_train_ == ["W0", "B0"]
    assert est.predict(X).shape == (60, 3)
    session = onnxruntime.InferenceSession(
        _with_output(est.to_onnx(), "H0").SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    np.testing.assert_array_equal(session.run(["H0"], {"X": X})[0], est.predict(X))


def _with_output(model, name):
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model
