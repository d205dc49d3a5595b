"""Graphs that carry their own loss (``loss_output=``, the seed's
``TrainingSession`` design): the same weights as the model given without its
loss and with the matching ``loss=``."""

import os

import numpy as np
import onnx
import onnxruntime
import pytest
from numpy.testing import assert_allclose
from onnx import TensorProto, helper, numpy_helper
from onnx.utils import Extractor
from sklearn.datasets import load_iris

import onnxfit

rng = np.random.default_rng(0)
W1 = rng.normal(size=(4, 8)) * 0.5
W2 = rng.normal(size=(8, 1)) * 0.5
D = TensorProto.DOUBLE


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _mlp(loss=None):
    """X (N, 4) -> tanh MLP -> pred (N, 1); ``loss``: None, 'mean' (a scalar
    mean of half squared errors) or 'per-sample' (N, 1)."""
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("Tanh", ["H"], ["T"]),
             helper.make_node("MatMul", ["T", "W2"], ["pred"])]
    inputs = [helper.make_tensor_value_info("X", D, ["N", 4])]
    outputs = [helper.make_tensor_value_info("pred", D, ["N", 1])]
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")]
    if loss is not None:
        inputs.append(helper.make_tensor_value_info("target", D, ["N", 1]))
        nodes += [helper.make_node("Sub", ["pred", "target"], ["d"]),
                  helper.make_node("Mul", ["d", "d"], ["d2"]),
                  helper.make_node("Mul", ["d2", "half"], ["per_sample"])]
        inits.append(numpy_helper.from_array(np.array(0.5), "half"))
        if loss == "mean":
            nodes.append(helper.make_node("ReduceMean", ["per_sample"], ["loss"], keepdims=0))
            outputs.append(helper.make_tensor_value_info("loss", D, []))
        else:
            nodes.append(helper.make_node("Identity", ["per_sample"], ["loss"]))
            outputs.append(helper.make_tensor_value_info("loss", D, ["N", 1]))
    return _model(nodes, inputs, outputs, inits)


def _regression_data():
    X = rng.normal(size=(120, 4))
    y = np.tanh(X @ W1 * 0.7) @ W2[:, 0] + 0.1
    return X, y


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
@pytest.mark.parametrize("loss", ["mean", "per-sample"])
def test_a_graph_with_its_loss_trains_like_the_model_with_the_matching_loss(engine, loss):
    X, y = _regression_data()
    common = dict(max_iter=4, tol=None, random_state=0, engine=engine, batch_size=16)
    reference = onnxfit.OnnxSGDRegressor(_mlp(), loss="squared_error", **common).fit(X, y)
    own = onnxfit.OnnxSGDRegressor(_mlp(loss), loss_output="loss", output_name="pred",
                                   **common).fit(X, y)
    for name in reference.weights_:
        assert_allclose(own.weights_[name], reference.weights_[name], rtol=1e-10, atol=1e-12)
    assert_allclose(own.loss_curve_, reference.loss_curve_, rtol=1e-10)
    # The prediction without the loss part: no label input in the export.
    exported = own.to_onnx()
    assert [i.name for i in exported.graph.input] == ["X"]
    assert [o.name for o in exported.graph.output] == ["pred"]
    session = onnxruntime.InferenceSession(exported.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    assert_allclose(session.run(None, {"X": X})[0].ravel(), own.predict(X), rtol=1e-12)
    assert_allclose(own.predict(X), reference.predict(X), rtol=1e-9)


def test_sample_weights_need_a_loss_per_sample():
    X, y = _regression_data()
    weights = rng.uniform(0.5, 2.0, size=len(y))
    common = dict(max_iter=3, tol=None, random_state=0, batch_size=16)
    reference = onnxfit.OnnxSGDRegressor(_mlp(), **common).fit(X, y, sample_weight=weights)
    own = onnxfit.OnnxSGDRegressor(_mlp("per-sample"), loss_output="loss", output_name="pred",
                                   **common).fit(X, y, sample_weight=weights)
    for name in reference.weights_:
        assert_allclose(own.weights_[name], reference.weights_[name], rtol=1e-10, atol=1e-12)
    scalar = onnxfit.OnnxSGDRegressor(_mlp("mean"), loss_output="loss", output_name="pred",
                                      **common)
    with pytest.raises(ValueError, match="'loss' is a scalar.*reduction='none'"):
        scalar.fit(X, y, sample_weight=weights)
    scalar.fit(X, y, sample_weight=np.ones(len(y)))  # uniform weights are fine


def _classifier(loss):
    """X (N, 4) -> scores (N, 3), with PyTorch's exported cross-entropy
    (SoftmaxCrossEntropyLoss on int64 targets) when ``loss``."""
    W = rng.normal(size=(3, 4)) * 0.1
    b = np.zeros(3)
    nodes = [helper.make_node("Gemm", ["X", "W", "b"], ["scores"], transB=1)]
    inputs = [helper.make_tensor_value_info("X", D, ["N", 4])]
    outputs = [helper.make_tensor_value_info("scores", D, ["N", 3])]
    if loss:
        inputs.append(helper.make_tensor_value_info("target", TensorProto.INT64, ["N"]))
        nodes.append(helper.make_node("SoftmaxCrossEntropyLoss", ["scores", "target"], ["loss"],
                                      reduction="mean", ignore_index=-100))
        outputs.append(helper.make_tensor_value_info("loss", D, []))
    return _model(nodes, inputs, outputs,
                  [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_a_classifier_with_pytorch_cross_entropy_inside(engine):
    X, y = load_iris(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    common = dict(max_iter=5, tol=None, random_state=0, engine=engine, batch_size=10)
    state = rng.bit_generator.state
    reference = onnxfit.OnnxSGDClassifier(_classifier(False), loss="log_loss", **common)
    rng.bit_generator.state = state  # the same initial weights
    own = onnxfit.OnnxSGDClassifier(_classifier(True), loss_output="loss",
                                    output_name="scores", **common)
    reference.fit(X, y)
    own.fit(X, y)
    for name in reference.weights_:
        assert_allclose(own.weights_[name], reference.weights_[name], rtol=1e-10, atol=1e-12)
    assert own.score(X, y) > 0.85
    assert_allclose(own.predict_proba(X), reference.predict_proba(X), rtol=1e-9)


def test_errors_say_what_the_loss_needs():
    X, y = _regression_data()
    with pytest.raises(ValueError, match="loss_output='loss' needs output_name="):
        onnxfit.OnnxSGDRegressor(_mlp("mean"), loss_output="loss").fit(X, y)
    with pytest.raises(ValueError, match="inputs \\['target'\\] do not feed the output 'pred'"):
        onnxfit.OnnxSGDRegressor(_mlp("mean"), output_name="pred").fit(X, y)
    with pytest.raises(ValueError, match="loss_output='T' must read exactly one graph input"):
        onnxfit.OnnxSGDRegressor(_mlp("mean"), loss_output="T", output_name="pred").fit(X, y)
    with pytest.raises(ValueError, match="onnx_model, which is None"):
        onnxfit.OnnxSGDRegressor(loss_output="loss").fit(X, y)


WITH_LOSS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo", "with_loss")


@pytest.mark.parametrize("name", ["torch_mlp_cross_entropy", "torch_mlp_cross_entropy_dynamo"])
def test_a_pytorch_module_returning_its_loss_trains_like_its_prediction_with_log_loss(name):
    """PyTorch's export of a module returning ``(pred, CrossEntropyLoss)``:
    trained on its own loss, the weights are those of its prediction graph
    trained with loss='log_loss' (float32: to rounding), and the export is
    the prediction alone."""
    model = onnx.load(os.path.join(WITH_LOSS, f"{name}.onnx"))
    prediction = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(
        ["X"], ["pred"])
    X, y = load_iris(return_X_y=True)
    X = ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)
    common = dict(max_iter=8, tol=None, random_state=0, batch_size=16)
    own = onnxfit.OnnxSGDClassifier(model, loss_output="loss", output_name="pred", **common)
    own.fit(X, y)
    reference = onnxfit.OnnxSGDClassifier(prediction, loss="log_loss", **common).fit(X, y)
    assert sorted(own.weights_) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    for weight in own.weights_:
        assert_allclose(own.weights_[weight], reference.weights_[weight], rtol=1e-4, atol=1e-5)
    assert own.score(X, y) > 0.85
    exported = own.to_onnx()
    assert [i.name for i in exported.graph.input] == ["X"]
    assert "SoftmaxCrossEntropyLoss" not in {n.op_type for n in exported.graph.node}


def _mlp_loss_per_row(shape):
    """``_mlp('per-sample')`` whose loss has shape ``shape``: (N,) as
    PyTorch's reduction='none' gives, or (N, 1)."""
    model = _mlp("per-sample")
    if shape == "N":
        graph = model.graph
        node = next(n for n in graph.node if n.output[0] == "loss")
        node.op_type = "Squeeze"
        node.input.append("axis1")
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
        graph.output[1].CopyFrom(helper.make_tensor_value_info("loss", D, ["N"]))
    return model


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_a_loss_per_row_of_shape_n_is_weighted_like_n_by_1(engine):
    X, y = _regression_data()
    weights = rng.uniform(0.5, 2.0, size=len(y))
    common = dict(max_iter=3, tol=None, random_state=0, batch_size=16, engine=engine)
    reference = onnxfit.OnnxSGDRegressor(_mlp(), **common).fit(X, y, sample_weight=weights)
    flat = onnxfit.OnnxSGDRegressor(_mlp_loss_per_row("N"), loss_output="loss",
                                    output_name="pred", **common)
    flat.fit(X, y, sample_weight=weights)
    for name in reference.weights_:
        assert_allclose(flat.weights_[name], reference.weights_[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["regressor", "classifier"])
def test_early_stopping_validates_the_prediction_of_a_graph_with_its_loss(estimator):
    if estimator == "regressor":
        X, y = _regression_data()
        est = onnxfit.OnnxSGDRegressor(_mlp("mean"), loss_output="loss", output_name="pred",
                                       early_stopping=True, max_iter=30, random_state=0)
    else:
        X, y = load_iris(return_X_y=True)
        est = onnxfit.OnnxSGDClassifier(_classifier(True), loss_output="loss",
                                        output_name="scores", early_stopping=True,
                                        max_iter=30, random_state=0)
    est.fit(X, y)
    assert len(est.validation_scores_) == est.n_iter_ and np.isfinite(est.validation_scores_).all()


def test_a_float_one_hot_label_of_symbolic_width_gets_one_column_per_class():
    X, y = load_iris(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)

    def model(width):
        W = np.full((3, 4), 0.01)
        nodes = [helper.make_node("Gemm", ["X", "W"], ["scores"], transB=1),
                 helper.make_node("LogSoftmax", ["scores"], ["logp"], axis=1),
                 helper.make_node("Mul", ["logp", "target"], ["picked"]),
                 helper.make_node("ReduceSum", ["picked", "one"], ["per_row"], keepdims=0),
                 helper.make_node("Neg", ["per_row"], ["loss"])]
        return _model(
            nodes,
            [helper.make_tensor_value_info("X", D, ["N", 4]),
             helper.make_tensor_value_info("target", D, ["N", width])],
            [helper.make_tensor_value_info("scores", D, ["N", 3]),
             helper.make_tensor_value_info("loss", D, ["N"])],
            [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([1]), "one")])

    common = dict(loss_output="loss", output_name="scores", max_iter=5, tol=None,
                  random_state=0)
    symbolic = onnxfit.OnnxSGDClassifier(model("C"), **common).fit(X, y)
    declared = onnxfit.OnnxSGDClassifier(model(3), **common).fit(X, y)
    assert symbolic.input_shapes_["target"] == (3,)
    assert_allclose(symbolic.weights_["W"], declared.weights_["W"], rtol=1e-10)
    assert symbolic.score(X, y) > 0.8
