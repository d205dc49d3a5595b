"""How X feeds the graph's inputs: N-D inputs, several inputs, integer inputs
(onnxfit.inputs and the estimators)."""

import os

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from onnx import TensorProto, helper, numpy_helper
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import onnxfit

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo")
CNN = os.path.join(ZOO, "torch_cnn_digits.onnx")  # input (N, 1, 8, 8)
EMBEDDING = os.path.join(ZOO, "torch_embedding_mlp.onnx")  # num (N, 4) float, cat (N, 2) int64

COMMON = dict(max_iter=3, tol=None, random_state=0)


def _session(model):
    return onnxruntime.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])


# -- N-D inputs ---------------------------------------------------------------------------------
def _digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16).astype(np.float32), y


def test_images_or_flat_rows_train_the_same_conv_net():
    X, y = _digits()
    X, y = X[:300], y[:300]
    images = onnxfit.OnnxSGDClassifier(CNN, batch_size=32, **COMMON).fit(X.reshape(-1, 1, 8, 8), y)
    rows = onnxfit.OnnxSGDClassifier(CNN, batch_size=32, **COMMON).fit(X, y)
    assert images.n_features_in_ == rows.n_features_in_ == 64
    assert images.input_shapes_ == {"input": (1, 8, 8)}
    for name in images.weights_:
        assert_array_equal(images.weights_[name], rows.weights_[name])
    assert_array_equal(images.predict(X.reshape(-1, 1, 8, 8)), rows.predict(X))


def test_a_conv_net_in_a_pipeline_learns_digits_and_exports():
    X, y = _digits()
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)
    pipe = make_pipeline(StandardScaler(), onnxfit.OnnxSGDClassifier(
        CNN, max_iter=25, batch_size=32, random_state=0))
    pipe.fit(X_train, y_train)
    assert pipe.score(X_test, y_test) >= 0.93
    clf = pipe[-1]
    images = pipe[0].transform(X_test).astype(np.float32).reshape(-1, 1, 8, 8)
    scores = _session(clf.to_onnx()).run(None, {"input": images})[0]
    assert_array_equal(clf.classes_[scores.argmax(axis=1)], pipe.predict(X_test))


def test_a_wrong_sample_shape_names_both_shapes():
    X, y = _digits()
    clf = onnxfit.OnnxSGDClassifier(CNN, **COMMON)
    with pytest.raises(ValueError, match=r"samples of shape \(8, 8\).*\(1, 8, 8\).*\(n, 1, 8, 8\)"):
        clf.fit(X[:50].reshape(-1, 8, 8), y[:50])
    with pytest.raises(ValueError, match="X has 63 columns .* takes 64 values per sample"):
        clf.fit(X[:50, :63], y[:50])
    clf.fit(X[:50], y[:50])
    with pytest.raises(ValueError, match=r"samples of shape \(1, 4, 16\)"):
        clf.predict(X[:5].reshape(-1, 1, 4, 16))
    with pytest.raises(ValueError, match="contains NaN"):
        bad = X[:50].copy().reshape(-1, 1, 8, 8)
        bad[3, 0, 2, 2] = np.nan
        onnxfit.OnnxSGDClassifier(CNN, **COMMON).fit(bad, y[:50])


def test_a_symbolic_sample_dimension_takes_the_data_shape():
    """A sequence graph (N, T, 3) with T symbolic: N-D X of any T trains; the
    fitted per-sample shape is then fixed, and flat X cannot be reshaped."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["X", "axes"], ["S"], keepdims=0),
         helper.make_node("MatMul", ["S", "W"], ["Y"])],
        "seq", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", "T", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes"),
         numpy_helper.from_array(np.zeros((3, 1), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 5, 3)).astype(np.float32)
    y = X.sum(axis=1) @ np.array([1.0, -2.0, 0.5])
    reg = onnxfit.OnnxSGDRegressor(model, learning_rate="sgd", max_iter=30,
                                   random_state=0).fit(X, y)
    assert reg.input_shapes_ == {"X": (5, 3)} and reg.n_features_in_ == 15
    assert reg.score(X, y) > 0.99
    with pytest.raises(ValueError, match="not fixed, so they cannot be reshaped"):
        onnxfit.OnnxSGDRegressor(model, **COMMON).fit(X.reshape(64, -1), y)
    with pytest.raises(ValueError, match=r"samples of shape \(6, 3\).*\(5, 3\)"):
        reg.predict(rng.normal(size=(4, 6, 3)).astype(np.float32))


# -- several inputs -----------------------------------------------------------------------------
def _embedding_data(n=600, seed=0):
    """Numeric features and two category columns (indices below 7) with an
    effect of their own."""
    rng = np.random.default_rng(seed)
    num = rng.normal(size=(n, 4)).astype(np.float32)
    cat = rng.integers(0, 7, size=(n, 2))
    effect = np.linspace(-1.5, 1.5, 7)
    y = num @ np.array([1.0, -1.0, 0.5, 0.0]) + effect[cat[:, 0]] - effect[cat[:, 1]]
    return num, cat, y


def _embedding_regressor(**kwargs):
    params = dict(max_iter=20, batch_size=16, random_state=0, penalty=None,
                  learning_rate=onnxfit.LearningRateSGDNesterov(eta0=0.01))
    params.update(kwargs)
    return onnxfit.OnnxSGDRegressor(EMBEDDING, **params)


def test_two_inputs_from_a_dict_an_array_or_a_dataframe_train_the_same():
    num, cat, y = _embedding_data(200)
    by_dict = _embedding_regressor(max_iter=3).fit({"num": num, "cat": cat}, y)
    by_array = _embedding_regressor(max_iter=3).fit(np.hstack([num, cat]), y)
    frame = pd.DataFrame(np.hstack([cat, num]), columns=["c0", "c1", "a", "b", "c", "d"])
    by_frame = _embedding_regressor(
        max_iter=3, input_columns={"num": ["a", "b", "c", "d"], "cat": ["c0", "c1"]},
    ).fit(frame, y)
    assert by_dict.n_features_in_ == by_array.n_features_in_ == by_frame.n_features_in_ == 6
    assert list(by_frame.feature_names_in_) == ["c0", "c1", "a", "b", "c", "d"]
    for name in by_dict.weights_:
        assert_allclose(by_array.weights_[name], by_dict.weights_[name], rtol=1e-6)
        assert_allclose(by_frame.weights_[name], by_dict.weights_[name], rtol=1e-6)
    assert_allclose(by_frame.predict(frame), by_dict.predict({"num": num, "cat": cat}),
                    rtol=1e-6)


def test_an_embedding_learns_category_effects_and_the_export_predicts_alike():
    num, cat, y = _embedding_data()
    reg = _embedding_regressor().fit({"num": num[:500], "cat": cat[:500]}, y[:500])
    test = {"num": num[500:], "cat": cat[500:]}
    assert reg.score(test, y[500:]) > 0.97
    table = [n for n, w in reg.weights_.items() if w.shape == (7, 3)]
    assert len(table) == 1  # the embedding table is trained; the indices are not
    out = _session(reg.to_onnx()).run(None, {"num": num[500:], "cat": cat[500:]})[0]
    assert_allclose(out.ravel(), reg.predict(test), rtol=1e-6)


def test_only_the_rows_of_seen_categories_move():
    num, cat, y = _embedding_data(200)
    seen = cat % 3  # categories 0, 1 and 2 only
    reg = _embedding_regressor(max_iter=2).fit({"num": num, "cat": seen}, y)
    initial = {i.name: numpy_helper.to_array(i) for i in onnx.load(EMBEDDING).graph.initializer}
    name = next(n for n, w in reg.weights_.items() if w.shape == (7, 3))
    moved = np.abs(reg.weights_[name] - initial[name]).max(axis=1) > 0
    assert_array_equal(moved, [True, True, True, False, False, False, False])


def test_a_column_transformer_in_front_and_a_grid_search():
    num, cat, y = _embedding_data(300)
    frame = pd.DataFrame(np.hstack([num, cat]), columns=["a", "b", "c", "d", "c0", "c1"])
    pipe = make_pipeline(
        ColumnTransformer([("num", StandardScaler(), ["a", "b", "c", "d"]),
                           ("cat", "passthrough", ["c0", "c1"])]),
        _embedding_regressor(max_iter=10),
    )
    search = GridSearchCV(pipe, {"onnxsgdregressor__alpha": [1e-4, 1e-2]}, cv=2)
    search.fit(frame, y)
    assert len(search.cv_results_["mean_test_score"]) == 2
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert search.score(frame, y) > 0.9


def test_several_inputs_errors_say_what_to_do():
    num, cat, y = _embedding_data(50)
    reg = _embedding_regressor(max_iter=1)
    with pytest.raises(ValueError, match=r"X has 5 columns but the graph's inputs take 6"):
        reg.fit(np.hstack([num, cat[:, :1]]), y)
    with pytest.raises(ValueError, match=r"missing: \['cat'\]"):
        reg.fit({"num": num}, y)
    with pytest.raises(ValueError, match=r"unknown keys: \['other'\]"):
        reg.fit({"num": num, "cat": cat, "other": cat}, y)
    fractional = np.hstack([num, cat + 0.5])
    with pytest.raises(ValueError, match="integer graph input 'cat'.*not whole numbers"):
        reg.fit(fractional, y)
    with pytest.raises(ValueError, match="input_columns names column 'zz'"):
        _embedding_regressor(max_iter=1, input_columns={"num": ["a", "b", "c", "zz"],
                                                        "cat": ["c0", "c1"]}).fit(
            pd.DataFrame(np.hstack([num, cat]), columns=["a", "b", "c", "d", "c0", "c1"]), y)
    with pytest.raises(ValueError, match=r"input_columns must name every graph input.*missing"):
        _embedding_regressor(max_iter=1, input_columns={"num": [0, 1, 2, 3]}).fit(
            np.hstack([num, cat]), y)
    with pytest.raises(ValueError, match="gives 3 column"):
        _embedding_regressor(max_iter=1, input_columns={"num": [0, 1, 2], "cat": [4, 5]}).fit(
            np.hstack([num, cat]), y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        reg.fit({"num": num, "cat": cat[:40]}, y)
    reg.fit({"num": num, "cat": cat}, y)
    with pytest.raises(ValueError, match=r"X\['num'\] has shape \(50, 3\) but .*\(n, 4\)"):
        reg.predict({"num": num[:, :3], "cat": cat})


def test_inputs_without_a_fixed_width_need_input_columns():
    graph = helper.make_graph(
        [helper.make_node("Concat", ["A", "B"], ["AB"], axis=1),
         helper.make_node("MatMul", ["AB", "W"], ["Y"])],
        "two", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["N", "k"]),
                helper.make_tensor_value_info("B", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.zeros((5, 1), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    X = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    y = X.sum(axis=1)
    with pytest.raises(ValueError, match="'A' \\(n, \\?\\) has no fixed width.*input_columns"):
        onnxfit.OnnxSGDRegressor(model, **COMMON).fit(X, y)
    reg = onnxfit.OnnxSGDRegressor(model, input_columns={"A": [0, 1, 2], "B": [3, 4]},
                                   **COMMON).fit(X, y)
    assert reg.input_shapes_ == {"A": (3,), "B": (2,)}


def test_a_graph_of_several_inputs_via_onnx_function():
    num, cat, _ = _embedding_data(8)
    f = onnxfit.OnnxFunction(EMBEDDING, input_gradient=True)
    assert f.input_names == ["num", "cat"]
    w = f.initial_weights()
    Y = f.forward({"num": num, "cat": cat}, w)
    grads, input_grads = f.backward(np.ones_like(Y), return_input_gradient=True)
    assert sorted(input_grads) == ["num"]  # integer inputs have no gradient
    assert input_grads["num"].shape == num.shape
    with pytest.raises(TypeError, match="give X as a dict"):
        f.forward(num, w)


def test_input_columns_and_dicts_are_refused_where_they_mean_nothing():
    X, y = _digits()
    with pytest.raises(ValueError, match="default linear model has one input"):
        onnxfit.OnnxSGDClassifier(**COMMON).fit({"X": X[:50]}, y[:50])
    with pytest.raises(ValueError, match="default linear model has one input"):
        onnxfit.OnnxSGDClassifier(input_columns={"X": [0, 1]}, **COMMON).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="input_columns assigns the columns of a 2-D X"):
        onnxfit.OnnxSGDClassifier(CNN, input_columns={"input": list(range(64))}, **COMMON).fit(
            X[:50].reshape(-1, 1, 8, 8), y[:50])
    num, cat, y = _embedding_data(50)
    with pytest.raises(ValueError, match="X is a dict"):
        _embedding_regressor(max_iter=1, input_columns={"num": [0, 1, 2, 3], "cat": [4, 5]}).fit(
            {"num": num, "cat": cat}, y)
