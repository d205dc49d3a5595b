"""Layers that behave differently in training (onnxfit.training_mode).

The references come from torch (tests/zoo/cnn_digits_train_step.npz, written
by tests/zoo/make_zoo.py): one torch.optim.SGD step of a Conv net with
BatchNorm2d and Dropout in ``model.train()`` on a batch, with a known
Dropout mask, and the network's ``model.eval()`` output after the step.
"""

import os

import numpy as np
import onnx
import onnxruntime
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

import onnxfit
from onnxfit.training_mode import DropoutMask, inference_graph, training_graph

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo")
TRAIN_EXPORT = os.path.join(ZOO, "torch_cnn_digits_train.onnx")
EVAL_EXPORT = os.path.join(ZOO, "torch_cnn_digits.onnx")


def _step():
    return dict(np.load(os.path.join(ZOO, "cnn_digits_train_step.npz")))


def _with_initial_weights(path, step):
    """The zoo graph with the weights torch started its step from."""
    model = onnx.load(path)
    for init in model.graph.initializer:
        key = f"initial.{init.name}"
        if key in step:
            init.CopyFrom(numpy_helper.from_array(step[key].astype(np.float32), init.name))
    return model


def _one_step(model, step, engine, monkeypatch, mask=None):
    """One plain SGD step of the classifier on the saved batch, the Dropout
    mask replaced by ``mask`` (default: torch's)."""
    mask = step["mask"] if mask is None else mask

    def draw(self, rng, out, *scratch):
        out[...] = mask / (1.0 - self.ratio)

    monkeypatch.setattr(DropoutMask, "draw", draw)
    clf = onnxfit.OnnxSGDClassifier(
        model, learning_rate=onnxfit.LearningRateSGD(eta0=float(step["lr"]), schedule="constant"),
        penalty=None, batch_size=len(step["y"]), shuffle=False, engine=engine, random_state=0,
    )
    clf.partial_fit(step["X"], step["y"], classes=np.arange(10))
    return clf


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_one_training_step_matches_torch_train_mode(engine, monkeypatch):
    """Batch statistics, the Dropout mask, the running statistics' update
    (PyTorch's momentum and unbiased variance): the weights and statistics
    after one step are torch's, and the exported graph predicts as
    ``model.eval()`` does after that step."""
    step = _step()
    clf = _one_step(_with_initial_weights(TRAIN_EXPORT, step), step, engine, monkeypatch)
    for name, value in clf.weights_.items():
        expected = step[f"stepped.{name}"]
        scale = max(float(np.abs(expected).max()), 1e-3)
        assert np.abs(value - expected).max() <= 1e-5 * scale, name
    assert sorted(clf.running_statistics_) == ["features.1.running_mean",
                                               "features.1.running_var"]
    for name, value in clf.running_statistics_.items():
        assert_allclose(value, step[f"stepped.{name}"], rtol=1e-5, atol=1e-6)
    exported = clf.to_onnx()
    ops = {n.op_type for n in exported.graph.node}
    assert "Dropout" not in ops
    assert all(not any(a.name == "training_mode" and a.i for a in n.attribute)
               for n in exported.graph.node if n.op_type == "BatchNormalization")
    session = onnxruntime.InferenceSession(exported.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: step["X"]})[0]
    assert_allclose(out, step["eval_output"], rtol=1e-4, atol=1e-5)
    assert_allclose(clf.decision_function(step["X"]), out, rtol=1e-6, atol=1e-6)


BN_EXPORT = os.path.join(ZOO, "torch_batchnorm.onnx")  # Conv, Relu, eval-mode BatchNorm


def _bn_input(X):
    """The value the zoo graph's BatchNormalization normalises, for X."""
    from onnx.utils import Extractor

    model = onnx.shape_inference.infer_shapes(onnx.load(BN_EXPORT))
    part = Extractor(model).extract_model(["input"], ["/2/Relu_output_0"])
    session = onnxruntime.InferenceSession(part.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X})[0].astype(np.float64)


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_an_eval_mode_export_trains_batch_norm_on_batch_statistics(engine):
    """The exporter's default (eval) writes BatchNormalization with its
    running statistics (where it cannot fold it into a Conv): training
    still normalises with the batch's statistics and moves the running ones
    as PyTorch does; train_mode=False trains the graph as written."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 50)).astype(np.float32)
    y = rng.normal(size=(40, 2))
    common = dict(penalty=None, batch_size=40, shuffle=False, random_state=0, engine=engine,
                  learning_rate=onnxfit.LearningRateSGD(eta0=0.01, schedule="constant"))
    model = onnx.load(BN_EXPORT)
    initial = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    trained = onnxfit.OnnxSGDRegressor(BN_EXPORT, **common).partial_fit(X, y)
    batch = _bn_input(X)
    for name, statistic in (("3.running_mean", batch.mean(axis=(0, 2, 3))),
                            ("3.running_var", batch.var(axis=(0, 2, 3), ddof=1))):
        assert_allclose(trained.running_statistics_[name],
                        0.9 * initial[name] + 0.1 * statistic, rtol=1e-5)
    exported = {i.name: numpy_helper.to_array(i) for i in trained.to_onnx().graph.initializer}
    assert_array_equal(exported["3.running_mean"], trained.running_statistics_["3.running_mean"])
    as_written = onnxfit.OnnxSGDRegressor(BN_EXPORT, train_mode=False, **common)
    as_written.partial_fit(X, y)
    assert as_written.running_statistics_ == {}
    assert not np.allclose(as_written.weights_["1.weight"], trained.weights_["1.weight"])
    exported = {i.name: numpy_helper.to_array(i)
                for i in as_written.to_onnx().graph.initializer}
    assert_array_equal(exported["3.running_mean"], initial["3.running_mean"])


def _digit_images():
    X, y = load_digits(return_X_y=True)
    return (X / 16).astype(np.float32).reshape(-1, 1, 8, 8), y


def test_masks_come_from_random_state():
    X, y = _digit_images()
    X, y = X[:200], y[:200]

    def fit(seed):
        return onnxfit.OnnxSGDClassifier(TRAIN_EXPORT, max_iter=2, tol=None, batch_size=32,
                                         random_state=seed).fit(X, y).weights_["fc.weight"]

    assert_array_equal(fit(3), fit(3))
    assert not np.array_equal(fit(3), fit(4))


def test_a_conv_net_with_batch_norm_and_dropout_learns_digits():
    from sklearn.model_selection import train_test_split

    X_train, X_test, y_train, y_test = train_test_split(*_digit_images(), random_state=0)
    clf = onnxfit.OnnxSGDClassifier(TRAIN_EXPORT, max_iter=20, batch_size=32, random_state=0)
    clf.fit(X_train, y_train)
    assert clf.score(X_test, y_test) >= 0.95
    # Predictions do not draw masks: the same every time.
    assert_array_equal(clf.predict_proba(X_test), clf.predict_proba(X_test))


# -- the rewrite itself ---------------------------------------------------------------------
def _bn_dropout_graph(training_mode):
    """X (N, 3) -> BatchNormalization -> Dropout(0.5) -> Y, statistics as
    initializers."""
    nodes = [
        helper.make_node("BatchNormalization", ["X", "scale", "bias", "mean", "var"],
                         ["H"] + (["rm", "rv"] if training_mode else []), epsilon=1e-5,
                         momentum=0.9, training_mode=training_mode),
        helper.make_node("Dropout", ["H", "ratio", "training"], ["Y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1.0, 2.0, 0.5], np.float32), "scale"),
        numpy_helper.from_array(np.array([0.0, 1.0, -1.0], np.float32), "bias"),
        numpy_helper.from_array(np.array([0.5, -0.5, 0.0], np.float32), "mean"),
        numpy_helper.from_array(np.array([2.0, 1.0, 0.5], np.float32), "var"),
        numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
        numpy_helper.from_array(np.array(bool(training_mode)), "training"),
    ]
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])], inits)
    # IR 8: what every supported onnxruntime loads (the tests run it directly).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("training_mode", [0, 1])
def test_training_graph_computes_batch_statistics_and_masks(training_mode):
    model = _bn_dropout_graph(training_mode)
    trained = training_graph(model, {"X": (3,)}, {})
    assert [m.shape for m in trained.masks] == [(None, 3)]
    assert trained.statistics == {"mean": "mean.new", "var": "var.new"}
    onnx.checker.check_model(trained.model)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 3)).astype(np.float32)
    mask = np.where(rng.random((6, 3)) < 0.5, 0.0, 2.0).astype(np.float32)
    session = onnxruntime.InferenceSession(trained.model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    feeds = {"X": X, trained.masks[0].name: mask, **trained.initial_statistics}
    Y, mean, var = session.run(None, feeds)
    batch_mean, batch_var = X.mean(axis=0), X.var(axis=0)
    expected = ((X - batch_mean) / np.sqrt(batch_var + 1e-5) * [1.0, 2.0, 0.5]
                + [0.0, 1.0, -1.0]) * mask
    assert_allclose(Y, expected, rtol=1e-5, atol=1e-6)
    assert_allclose(mean, 0.9 * np.array([0.5, -0.5, 0.0]) + 0.1 * batch_mean, rtol=1e-5)
    assert_allclose(var, 0.9 * np.array([2.0, 1.0, 0.5]) + 0.1 * X.var(axis=0, ddof=1),
                    rtol=1e-5)


def test_inference_graph_uses_running_statistics_and_no_dropout():
    model = _bn_dropout_graph(1)
    evaluated = inference_graph(model)
    assert "Dropout" not in {n.op_type for n in evaluated.graph.node}
    assert model.graph.node[1].op_type == "Dropout"  # the input is not modified
    X = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(evaluated.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    expected = ((X - [0.5, -0.5, 0.0]) / np.sqrt(np.array([2.0, 1.0, 0.5]) + 1e-5)
                * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0])
    assert_allclose(session.run(None, {"X": X})[0], expected, rtol=1e-5)
    assert inference_graph(evaluated) is evaluated  # nothing left to change


def test_dropout_mask_draws_inverted_dropout():
    mask = DropoutMask("m", (None, 1000), 0.25, np.dtype(np.float32))
    out = np.empty(mask.shape_for(50), np.float32)
    mask.draw(np.random.RandomState(0), out)
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    assert abs((out == 0).mean() - 0.25) < 0.01


def test_refusals_name_the_node_and_the_way_out():
    model = _bn_dropout_graph(0)
    model.graph.node[1].input[1] = "computed_ratio"
    model.graph.node.insert(0, helper.make_node("Identity", ["ratio"], ["computed_ratio"]))
    model.graph.node.insert(0, helper.make_node("Abs", ["X"], ["unused"]))
    # Identity of an initializer still counts as computed for a ratio.
    with pytest.raises(ValueError, match="ratio .*computed at run time.*train_mode=False"):
        training_graph(model, {"X": (3,)}, {})
    model = _bn_dropout_graph(0)
    with pytest.raises(ValueError, match="running statistic 'mean' as a trained weight"):
        inputs_model = onnx.ModelProto()
        inputs_model.CopyFrom(model)
        inputs_model.graph.input.append(helper.make_tensor_value_info("mean", 1, [3]))
        kept = [i for i in inputs_model.graph.initializer if i.name != "mean"]
        del inputs_model.graph.initializer[:]
        inputs_model.graph.initializer.extend(kept)
        training_graph(inputs_model, {"X": (3,)}, {"mean": np.zeros(3, np.float32)})


def test_function_train_mode_draws_masks_and_updates_statistics():
    model = _bn_dropout_graph(0)
    f = onnxfit.OnnxFunction(model, weights_to_train=["scale", "bias"], train_mode=True,
                             random_state=0)
    X = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    w = f.initial_weights()
    mask = np.full((8, 3), 2.0, np.float32)
    Y = f.forward(X, w, masks={f.masks[0].name: mask})
    normalised = (X - X.mean(axis=0)) / np.sqrt(X.var(axis=0) + 1e-5)
    assert_allclose(Y, (normalised * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]) * 2, rtol=1e-5,
                    atol=1e-6)
    assert_allclose(f.running_statistics["mean"], 0.1 * X.mean(axis=0) + 0.9 * np.array(
        [0.5, -0.5, 0.0]), rtol=1e-5)
    grads = f.backward(np.ones_like(Y))
    assert_allclose(grads["bias"], np.full(3, 16.0), rtol=1e-6)
    # As written (the default): inference statistics, no mask.
    g = onnxfit.OnnxFunction(model, weights_to_train=["scale", "bias"])
    expected = ((X - [0.5, -0.5, 0.0]) / np.sqrt(np.array([2.0, 1.0, 0.5]) + 1e-5)
                * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0])
    assert_allclose(g.forward(X, w), expected, rtol=1e-5)


def test_a_small_remainder_joins_the_last_batch_under_batch_statistics():
    """With BatchNormalization on batch statistics, a remainder under half a
    batch joins the last full one (a batch of 3 gave a gradient ten times
    the usual); every sample is still used, and other graphs keep their
    partial batch."""
    X, y = _digit_images()
    common = dict(max_iter=1, tol=None, batch_size=32, random_state=0)
    steps = {}
    for n in (35, 48, 64):
        clf = onnxfit.OnnxSGDClassifier(TRAIN_EXPORT, **common)
        clf.partial_fit(X[:n], y[:n], classes=np.arange(10))
        steps[n] = clf.t_
    assert steps == {35: 1, 48: 2, 64: 2}
    no_statistics = onnxfit.OnnxSGDClassifier(EVAL_EXPORT, **common)
    no_statistics.partial_fit(X[:35], y[:35], classes=np.arange(10))
    assert no_statistics.t_ == 2


def test_batch_statistics_never_see_a_batch_of_one():
    X, y = _digit_images()
    X, y = X[:65], y[:65]
    auto = onnxfit.OnnxSGDClassifier(TRAIN_EXPORT, batch_size="auto", max_iter=1, tol=None,
                                     random_state=0)
    auto.partial_fit(X, y, classes=np.arange(10))
    assert auto.t_ == 2  # batches of 32 and 33 ('auto' would give 1 without them)
    pairs = onnxfit.OnnxSGDClassifier(TRAIN_EXPORT, batch_size=2, max_iter=1, tol=None,
                                      random_state=0)
    pairs.partial_fit(X, y, classes=np.arange(10))
    assert pairs.t_ == 32  # the 65th sample joins the last pair
    before = {k: v.copy() for k, v in pairs.running_statistics_.items()}
    with pytest.raises(ValueError, match="a batch of one sample"):
        pairs.partial_fit(X[:1], y[:1])
    for name, value in before.items():
        assert_array_equal(pairs.running_statistics_[name], value)
    with pytest.raises(ValueError, match="batch_size=2 or more"):
        onnxfit.OnnxSGDClassifier(TRAIN_EXPORT, batch_size=1).fit(X, y)
    onnxfit.OnnxSGDClassifier(TRAIN_EXPORT, batch_size=1, train_mode=False, max_iter=1,
                              tol=None).fit(X, y)  # as written: running statistics


def test_partial_fit_refuses_a_changed_train_mode():
    X, y = _digit_images()
    clf = onnxfit.OnnxSGDClassifier(TRAIN_EXPORT, max_iter=1, tol=None, random_state=0)
    clf.partial_fit(X[:64], y[:64], classes=np.arange(10))
    clf.set_params(train_mode=False)
    with pytest.raises(ValueError, match="partial_fit continues .* train_mode changed"):
        clf.partial_fit(X[:64], y[:64])
    clf.fit(X[:64], y[:64])  # fit starts again
    assert clf.running_statistics_ == {}


def test_function_refuses_masks_it_does_not_have():
    model = _bn_dropout_graph(0)
    f = onnxfit.OnnxFunction(model, weights_to_train=["scale", "bias"], train_mode=True)
    X = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="not Dropout masks of the graph"):
        f.forward(X, f.initial_weights(), masks={"other": np.ones((4, 3), np.float32)})
