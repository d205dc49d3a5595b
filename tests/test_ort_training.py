"""The 'onnxruntime-training' gradient backend (onnxruntime-training-cpu
1.19.2): its builder wrapper, the rewrites of its training-only operators,
what it rewrites before the builder (BatchNormalization, inference-mode
Dropout, ReduceSumSquare), the estimators on graphs with several inputs,
their own loss, training-mode layers (the same weights as the own backend),
its refusals, and the message a missing training build gives.

Everything but the last test needs the training build; CI runs them in the
lane that installs it instead of plain onnxruntime.
"""

import os

import numpy as np
import onnx
import onnxruntime
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from onnx import TensorProto, helper, numpy_helper, parser

import onnxfit
from onnxfit.gradient import ort_training
from onnxfit.sessions import has_training_build, make_session
from tests.graphs import mlp_graph

needs_training_build = pytest.mark.skipif(
    not has_training_build(),
    reason="needs onnxruntime-training-cpu 1.19.2 (installed instead of onnxruntime)",
)

RANK1_WEIGHT_LOSS = """
<ir_version: 8, opset_import: ["" : 17]>
rank1 ({T}[N, 3] X, {T}[3] w, {T}[N] t) => ({T} loss) {{
    y = MatMul(X, w)
    d = Sub(y, t)
    d2 = Mul(d, d)
    loss = ReduceSum<keepdims = 0>(d2)
}}
"""


def _run(model, feeds, dtype=np.float32):
    session = make_session(model, dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


@needs_training_build
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank1_weight_after_matmul_has_the_right_gradient(dtype):
    # 1.19.2's FusedMatMul(X, dY, transA=1) is wrong for a 1-D dY; the
    # builder emits it for X @ w with w of shape (k,).
    type_name = "float" if dtype == np.float32 else "double"
    model = parser.parse_model(RANK1_WEIGHT_LOSS.format(T=type_name))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 3)).astype(dtype)
    w = rng.standard_normal(3).astype(dtype)
    t = rng.standard_normal(5).astype(dtype)
    grad_model = ort_training.build_gradient_model(model, "loss", ["w"])
    assert not any(n.op_type == "FusedMatMul" for n in grad_model.graph.node)
    out = _run(grad_model, {"X": X, "w": w, "t": t}, dtype)
    expected = 2 * X.astype(np.float64).T @ (X.astype(np.float64) @ w - t)
    assert_allclose(out["w_grad"], expected, rtol=1e-5)


def _mlp_loss_model(activation):
    # Hidden layers of 32 and 16: their biases get the ones @ dZ rewrite,
    # the output bias (2 values) keeps its ReduceSum.
    model = mlp_graph(6, (32, 16), 2, activation=activation)
    graph = model.graph
    # Turn the weights into inputs and append 0.5 * sum((Y - T)^2).
    weights = [i for i in graph.initializer]
    del graph.initializer[:]
    for w in weights:
        graph.input.append(onnx.helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    graph.input.append(onnx.helper.make_tensor_value_info("T", onnx.TensorProto.FLOAT, ["N", 2]))
    graph.node.extend([
        onnx.helper.make_node("Sub", ["Y", "T"], ["D"]),
        onnx.helper.make_node("Mul", ["D", "D"], ["D2"]),
        onnx.helper.make_node("ReduceSum", ["D2"], ["loss"], keepdims=0),
    ])
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, []))
    feeds = {w.name: onnx.numpy_helper.to_array(w) for w in weights}
    return model, feeds


@needs_training_build
@pytest.mark.parametrize(
    "activation, training_op", [("Relu", "ReluGrad"), ("Tanh", "TanhGrad"), ("Sigmoid", "SigmoidGrad")]
)
def test_rewritten_activation_gradients_are_bit_identical(activation, training_op):
    model, feeds = _mlp_loss_model(activation)
    rng = np.random.default_rng(3)
    feeds["X"] = rng.standard_normal((64, 6)).astype(np.float32)
    feeds["T"] = rng.standard_normal((64, 2)).astype(np.float32)
    names = [n for n in feeds if n.startswith(("W", "B"))]
    original = ort_training.build_gradient_model(model, "loss", names, rewrite=False)
    rewritten = ort_training.build_gradient_model(model, "loss", names, rewrite=True)
    assert any(n.op_type == training_op for n in original.graph.node)
    assert not any(n.domain == "com.microsoft" for n in rewritten.graph.node)
    bias_sums = [n for n in rewritten.graph.node if n.op_type == "ReduceSum"
                 and n.output[0] in ("B0_grad", "B1_grad", "B2_grad")]
    assert [n.output[0] for n in bias_sums] == ["B2_grad"]
    expected = _run(original, feeds)
    actual = _run(rewritten, feeds)
    for name in names:
        if name.startswith("W"):
            assert_array_equal(actual[name + "_grad"], expected[name + "_grad"])
        else:  # bias gradients: ones @ dZ instead of ReduceSum, same sum
            # (float32 sums of 64 terms in another order: tolerance relative
            # to the largest component, since single components may cancel)
            scale = np.abs(expected[name + "_grad"]).max()
            assert_allclose(
                actual[name + "_grad"], expected[name + "_grad"], rtol=1e-5, atol=1e-6 * scale
            )


def test_missing_training_build_is_explained(monkeypatch):
    """What a user of plain onnxruntime reads when asking for the backend."""
    from onnxfit import OnnxSGDRegressor

    monkeypatch.setattr(ort_training, "has_training_build", lambda: False)
    with pytest.raises(ort_training.TrainingRuntimeError, match=r"pip install 'onnxfit\[ort-training\]'"):
        ort_training.check_available()
    est = OnnxSGDRegressor(gradient_backend="onnxruntime-training")
    with pytest.raises(ImportError, match="has no gradient builder"):
        est.fit(np.ones((4, 2)), np.ones(4))
    assert not hasattr(est, "weights_")


@needs_training_build
def test_read_output_gradient_gives_the_vector_jacobian_product():
    """A backward pass started from a given dL/dY equals the closed form
    X^T (g * relu'(XW)), whatever computes that gradient."""
    from onnxfit.onnx_graphs import prune_graph

    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    vjp (float[N, 3] X, float[3, 2] W, float[N, 2] G) => (float s) {
        Z = MatMul(X, W)
        Y = Relu(Z)
        P = Mul(Y, G)
        s = ReduceSum<keepdims = 0>(P)
    }
    """
    model = ort_training.build_gradient_model(parser.parse_model(text), "s", ["W"])
    ort_training.read_output_gradient(model, "Y", "G2")
    graph = model.graph
    # G2 = 3 G, computed after the backward nodes that read it: pruning sorts.
    graph.node.append(onnx.helper.make_node("Mul", ["G", "three"], ["G2"]))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(3.0, np.float32), "three"))
    keep = [o for o in graph.output if o.name == "W_grad"]
    del graph.output[:]
    graph.output.extend(keep)
    prune_graph(graph)
    onnx.checker.check_model(model)
    assert not any(node.op_type == "ReduceSum" for node in graph.node)  # <Y, G> is gone
    rng = np.random.default_rng(0)
    X, W, G = (rng.standard_normal(s).astype(np.float32) for s in ((5, 3), (3, 2), (5, 2)))
    out = _run(model, {"X": X, "W": W, "G": G})
    assert_allclose(out["W_grad"], X.T @ (3 * G * (X @ W > 0)), rtol=1e-5, atol=1e-6)


# -- BatchNormalization: differentiated as written ----------------------------------------------
ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo")
BN_EXPORT = os.path.join(ZOO, "torch_batchnorm.onnx")  # Conv, Relu, eval-mode BatchNorm
EMBEDDING = os.path.join(ZOO, "torch_embedding_mlp.onnx")  # num (N, 4) float, cat (N, 2) int64
CNN = os.path.join(ZOO, "torch_cnn_digits.onnx")  # input (N, 1, 8, 8), AveragePool
BACKENDS = ["onnxfit", "onnxruntime-training"]


def _inference_output(model, feeds):
    if not isinstance(model, (str, bytes)):
        model = model.SerializeToString()
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@needs_training_build
def test_eval_mode_batch_norm_runs_and_differentiates_as_written():
    """1.19.2 has no gradient for BatchNormalization (its training pipeline
    swaps in BatchNormInternal, which uses the batch's statistics): the
    backend writes the node out with its running statistics, so the forward
    pass is the graph's own and the gradients are PyTorch's in eval mode."""
    zoo = np.load(BN_EXPORT.replace(".onnx", ".npz"))
    X, dY = zoo["X"], zoo["dY"]
    expected = _inference_output(BN_EXPORT, {"input": X})
    results = {}
    for backend in BACKENDS:
        f = onnxfit.OnnxFunction(BN_EXPORT, gradient_backend=backend, input_gradient=True)
        weights = f.initial_weights()
        assert {"3.weight", "3.bias"} <= set(f.weight_names)
        Y = f.forward(X, weights)
        assert_allclose(Y, expected, rtol=1e-5, atol=1e-5)
        assert_allclose(Y, zoo["torch.Y"], rtol=1e-5, atol=1e-5)
        # One row: batch statistics would make every normalised value 0.
        assert_allclose(f.forward(X[:1], weights, keep_for_backward=False), expected[:1],
                        rtol=1e-5, atol=1e-5)
        Y = f.forward(X, weights)
        grads, grad_x = f.backward(dY, return_input_gradient=True)
        results[backend] = grads
        for name, grad in grads.items():
            reference = zoo[f"torch.{name}"]
            assert_allclose(grad, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max(),
                            err_msg=f"{backend}: {name}")
        assert_allclose(grad_x, zoo["torch.X"], rtol=1e-4, atol=1e-6)
    for name, grad in results["onnxfit"].items():
        assert_allclose(results["onnxruntime-training"][name], grad, rtol=1e-5,
                        atol=1e-6 * np.abs(grad).max(), err_msg=name)


def _bn_graph(training_mode, rank, statistics_out=False):
    """X (N, 3[, 2, 2]) -> BatchNormalization -> Y; scale, bias, mean, var
    as initializers."""
    shape = ["N", 3] + [2] * (rank - 2)
    outputs = ["Y"] + (["rm", "rv"] if training_mode else [])  # onnxruntime wants all 3
    nodes = [helper.make_node("BatchNormalization", ["X", "scale", "bias", "mean", "var"],
                              outputs, name="bn", epsilon=1e-3, momentum=0.9,
                              training_mode=training_mode)]
    inits = [
        numpy_helper.from_array(np.array([1.0, 2.0, 0.5], np.float32), "scale"),
        numpy_helper.from_array(np.array([0.0, 1.0, -1.0], np.float32), "bias"),
        numpy_helper.from_array(np.array([0.5, -0.5, 0.0], np.float32), "mean"),
        numpy_helper.from_array(np.array([2.0, 1.0, 0.5], np.float32), "var"),
    ]
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3])
           for n in (outputs[1:] if statistics_out else [])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@needs_training_build
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("training_mode", [0, 1])
def test_batch_norm_decomposition_matches_onnxruntime_and_the_own_rules(training_mode, rank):
    model = _bn_graph(training_mode, rank)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(6, 3) + (2,) * (rank - 2)).astype(np.float32)
    dY = rng.normal(size=X.shape).astype(np.float32)
    decomposed = onnx.ModelProto()
    decomposed.CopyFrom(model)
    ort_training.decompose_batch_normalization(decomposed)
    assert not any(n.op_type == "BatchNormalization" for n in decomposed.graph.node)
    onnx.checker.check_model(decomposed, full_check=True)
    expected = _inference_output(model, {"X": X})
    assert_allclose(_inference_output(decomposed, {"X": X}), expected, rtol=1e-5, atol=1e-6)
    results = {}
    for backend in BACKENDS:
        f = onnxfit.OnnxFunction(model, weights_to_train=["scale", "bias"], input_gradient=True,
                                 gradient_backend=backend)
        assert_allclose(f.forward(X, f.initial_weights()), expected, rtol=1e-5, atol=1e-6)
        results[backend] = f.backward(dY, return_input_gradient=True)
    (own, own_x), (ort, ort_x) = results["onnxfit"], results["onnxruntime-training"]
    for name in own:
        assert_allclose(ort[name], own[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert_allclose(ort_x, own_x, rtol=1e-4, atol=1e-5)


@needs_training_build
@pytest.mark.parametrize("training_mode", [0, 1])
def test_batch_norm_gradients_of_every_input(training_mode):
    from onnxfit.gradient import build_vjp

    model = _bn_graph(training_mode, 4)
    wrt = ["X", "scale", "bias"] + ([] if training_mode else ["mean", "var"])
    rng = np.random.default_rng(2)
    X = rng.normal(size=(5, 3, 2, 2)).astype(np.float32)
    dY = rng.normal(size=X.shape).astype(np.float32)
    grads = {}
    for backend in BACKENDS:
        vjp = build_vjp(model, {"Y": "dY"}, wrt, backend=backend)
        out = _run(vjp.model, {"X": X, "dY": dY})
        grads[backend] = {w: out[vjp.gradient_names[w]] for w in wrt}
    for w in wrt:
        assert_allclose(grads["onnxruntime-training"][w], grads["onnxfit"][w], rtol=1e-4,
                        atol=1e-5, err_msg=w)


@needs_training_build
def test_batch_norm_refusals_name_the_node_and_the_way_out():
    from onnxfit.gradient import GradientError, build_vjp

    model = _bn_graph(1, 4, statistics_out=True)
    with pytest.raises(GradientError, match=r"node 'bn' in training mode.*"
                                            r"gradient_backend='onnxfit'.*train_mode=True"):
        build_vjp(model, {"Y": "dY"}, ["scale"], backend="onnxruntime-training")
    # The own backend trains it (the statistics are not seeded).
    build_vjp(model, {"Y": "dY"}, ["scale"])


# -- the estimators on this week's features, both backends --------------------------------------
def _fit_both(make, fit, tol):
    """Fit ``make(backend)`` with both backends; compare the weights."""
    fitted = {backend: fit(make(backend)) for backend in BACKENDS}
    own, ort = fitted["onnxfit"], fitted["onnxruntime-training"]
    assert sorted(own.weights_) == sorted(ort.weights_)
    for name, value in own.weights_.items():
        scale = max(1.0, float(np.abs(value).max()))
        assert_allclose(ort.weights_[name], value, rtol=tol, atol=tol * scale, err_msg=name)
    return own, ort


ENGINES = ["fused", "forward_backward"]


@needs_training_build
@pytest.mark.parametrize("engine", ENGINES)
def test_an_embedding_graph_with_a_dict_x_trains_alike(engine):
    rng = np.random.default_rng(0)
    num = rng.normal(size=(96, 4)).astype(np.float32)
    cat = rng.integers(0, 7, size=(96, 2))
    y = num @ np.array([1.0, -1.0, 0.5, 0.0]) + np.linspace(-1, 1, 7)[cat[:, 0]]

    def make(backend):
        return onnxfit.OnnxSGDRegressor(
            EMBEDDING, max_iter=3, tol=None, batch_size=16, random_state=0, penalty=None,
            engine=engine, gradient_backend=backend,
            learning_rate=onnxfit.LearningRateSGDNesterov(eta0=0.01))

    own, ort = _fit_both(make, lambda est: est.fit({"num": num, "cat": cat}, y), 1e-4)
    assert_allclose(ort.predict({"num": num, "cat": cat}), own.predict({"num": num, "cat": cat}),
                    rtol=1e-4, atol=1e-4)


def _mlp_with_loss(loss):
    """X (N, 4) -> tanh MLP -> pred (N, 1), float32, with its own squared
    error: a scalar mean, or one per sample."""
    rng = np.random.default_rng(2)
    F = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("Tanh", ["H"], ["T"]),
             helper.make_node("MatMul", ["T", "W2"], ["pred"]),
             helper.make_node("Sub", ["pred", "target"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("Mul", ["d2", "half"], ["per_sample"])]
    if loss == "mean":
        nodes.append(helper.make_node("ReduceMean", ["per_sample"], ["loss"], keepdims=0))
    else:
        nodes.append(helper.make_node("Identity", ["per_sample"], ["loss"]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("X", F, ["N", 4]),
         helper.make_tensor_value_info("target", F, ["N", 1])],
        [helper.make_tensor_value_info("pred", F, ["N", 1]),
         helper.make_tensor_value_info("loss", F, [] if loss == "mean" else ["N", 1])],
        [numpy_helper.from_array((rng.normal(size=(4, 8)) * 0.5).astype(np.float32), "W1"),
         numpy_helper.from_array((rng.normal(size=(8, 1)) * 0.5).astype(np.float32), "W2"),
         numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _cross_entropy_classifier(nll=False):
    """X (N, 4) -> scores (N, 3) -> SoftmaxCrossEntropyLoss on int64 targets
    (LogSoftmax and NegativeLogLikelihoodLoss with ``nll``)."""
    rng = np.random.default_rng(3)
    F = TensorProto.FLOAT
    if nll:
        loss = [helper.make_node("LogSoftmax", ["scores"], ["log_prob"], axis=1),
                helper.make_node("NegativeLogLikelihoodLoss", ["log_prob", "target"], ["loss"],
                                 reduction="mean")]
    else:
        loss = [helper.make_node("SoftmaxCrossEntropyLoss", ["scores", "target"], ["loss"],
                                 reduction="mean", ignore_index=-100)]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["X", "W", "b"], ["scores"], transB=1)] + loss,
        "g",
        [helper.make_tensor_value_info("X", F, ["N", 4]),
         helper.make_tensor_value_info("target", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("scores", F, ["N", 3]),
         helper.make_tensor_value_info("loss", F, [])],
        [numpy_helper.from_array((rng.normal(size=(3, 4)) * 0.1).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(3, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@needs_training_build
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("loss", ["mean", "per-sample", "cross-entropy", "nll"])
def test_a_graph_with_its_own_loss_trains_alike(loss, engine):
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    X = ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)
    common = dict(max_iter=3, tol=None, random_state=0, engine=engine, batch_size=10,
                  loss_output="loss")
    if loss in ("cross-entropy", "nll"):
        def make(backend):
            return onnxfit.OnnxSGDClassifier(_cross_entropy_classifier(loss == "nll"),
                                             output_name="scores", gradient_backend=backend,
                                             **common)
    else:
        y = X[:, 0] - 0.5 * X[:, 1]

        def make(backend):
            return onnxfit.OnnxSGDRegressor(_mlp_with_loss(loss), output_name="pred",
                                            gradient_backend=backend, **common)
    _fit_both(make, lambda est: est.fit(X, y), 1e-4)


def _bn_dropout_mlp():
    """X (N, 6) -> Gemm -> BatchNormalization (eval) -> Relu -> Dropout ->
    Gemm -> Y (N, 2)."""
    rng = np.random.default_rng(4)
    F = TensorProto.FLOAT
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "b1"], ["H"], transB=1),
        helper.make_node("BatchNormalization", ["H", "scale", "bias", "mean", "var"], ["N1"],
                         epsilon=1e-5, momentum=0.9),
        helper.make_node("Relu", ["N1"], ["R"]),
        helper.make_node("Constant", [], ["ratio"],
                         value=numpy_helper.from_array(np.array(0.25, np.float32))),
        helper.make_node("Dropout", ["R", "ratio"], ["D"]),
        helper.make_node("Gemm", ["D", "W2", "b2"], ["Y"], transB=1),
    ]
    inits = {
        "W1": rng.normal(size=(8, 6)) * 0.4, "b1": np.zeros(8),
        "scale": 1 + 0.2 * rng.normal(size=8), "bias": 0.1 * rng.normal(size=8),
        "mean": 0.2 * rng.normal(size=8), "var": 0.5 + rng.random(8),
        "W2": rng.normal(size=(2, 8)) * 0.4, "b2": np.zeros(2),
    }
    graph = helper.make_graph(
        nodes, "bn_dropout", [helper.make_tensor_value_info("X", F, ["N", 6])],
        [helper.make_tensor_value_info("Y", F, ["N", 2])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@needs_training_build
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("train_mode", [True, False])
def test_batch_norm_and_dropout_train_alike(train_mode, engine):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.normal(size=(64, 2))

    # Plain SGD: the bias before the BatchNormalization has a zero gradient
    # up to rounding, which differs between backends; Adam (the default for
    # a graph) would turn that noise into full steps.
    def make(backend):
        return onnxfit.OnnxSGDRegressor(
            _bn_dropout_mlp(), learning_rate="sgd", max_iter=3, tol=None, batch_size=16,
            random_state=0, engine=engine, train_mode=train_mode, gradient_backend=backend)

    own, ort = _fit_both(make, lambda est: est.fit(X, y), 1e-4)
    for name, value in own.running_statistics_.items():
        assert_allclose(ort.running_statistics_[name], value, rtol=1e-5, atol=1e-6)
    assert bool(own.running_statistics_) == train_mode


@needs_training_build
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("penalty", ["l2", "l1", "elasticnet"])
def test_penalties_train_alike(penalty, engine):
    # The fused engine adds the penalty to the loss after the gradient: it
    # must survive the backend's pruning; 1.19.2 has no gradient for the
    # L2 term's ReduceSumSquare.
    rng = np.random.default_rng(6)
    X = rng.normal(size=(64, 5))
    y = X @ rng.normal(size=5)

    def make(backend):
        return onnxfit.OnnxSGDRegressor(penalty=penalty, alpha=0.01, max_iter=3, tol=None,
                                        random_state=0, engine=engine, batch_size=16,
                                        gradient_backend=backend)

    _fit_both(make, lambda est: est.fit(X, y), 1e-9)


def _image_net():
    """X (N, 1, 8, 8) -> Conv -> Relu -> MaxPool -> Flatten -> Gemm -> (N, 3)."""
    rng = np.random.default_rng(7)
    F = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["X", "K", "c"], ["C"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["C"], ["R"]),
        helper.make_node("MaxPool", ["R"], ["P"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["P"], ["F"]),
        helper.make_node("Gemm", ["F", "W", "b"], ["Y"], transB=1),
    ]
    inits = {"K": rng.normal(size=(4, 1, 3, 3)) * 0.5, "c": np.zeros(4),
             "W": rng.normal(size=(3, 64)) * 0.2, "b": np.zeros(3)}
    graph = helper.make_graph(
        nodes, "images", [helper.make_tensor_value_info("X", F, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("Y", F, ["N", 3])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@needs_training_build
@pytest.mark.parametrize("engine", ENGINES)
def test_images_train_alike(engine):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    images = (X[:160] / 16).astype(np.float32).reshape(-1, 1, 8, 8)

    def make(backend):
        return onnxfit.OnnxSGDClassifier(_image_net(), max_iter=2, tol=None, random_state=0,
                                         batch_size=32, engine=engine, gradient_backend=backend)

    own, ort = _fit_both(make, lambda est: est.fit(images, y[:160] % 3), 1e-4)
    assert ort.input_shapes_ == {"X": (1, 8, 8)}


@needs_training_build
def test_images_need_the_own_backend_for_average_pooling():
    """N-D X reaches the graph as images; the digits net's AveragePool is
    refused by name (its 1.19.2 gradient kernel crashes the process)."""
    from sklearn.datasets import load_digits

    from onnxfit.gradient import GradientError

    X, y = load_digits(return_X_y=True)
    images = (X[:64] / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    est = onnxfit.OnnxSGDClassifier(CNN, max_iter=1, tol=None, random_state=0,
                                    gradient_backend="onnxruntime-training")
    with pytest.raises(GradientError, match="cannot differentiate AveragePool.*"
                                            "gradient_backend='onnxfit'"):
        est.fit(images, y[:64])
    own = onnxfit.OnnxSGDClassifier(CNN, max_iter=1, tol=None, random_state=0).fit(images, y[:64])
    assert own.input_shapes_ == {"input": (1, 8, 8)}


@needs_training_build
@pytest.mark.parametrize("name, op", [("torch_lstm_classifier", "LSTM"),
                                      ("torch_gru_classifier", "GRU")])
def test_recurrent_graphs_are_refused_clearly(name, op):
    path = os.path.join(ZOO, f"{name}.onnx")
    with pytest.raises(ValueError, match=rf"cannot differentiate operator '{op}' \(node .*"
                                         r"gradient_backend='onnxfit'"):
        onnxfit.OnnxFunction(path, gradient_backend="onnxruntime-training")
    onnxfit.OnnxFunction(path)  # the own backend unrolls it


def _nll_graph(reduction, weighted, ignore, rank):
    """X (N, 3[, 2]) log-probabilities, t (N[, 2]) int64 -> NegativeLogLikelihoodLoss."""
    F = TensorProto.FLOAT
    attrs = dict(reduction=reduction)
    if ignore:
        attrs["ignore_index"] = 1
    inputs = ["X", "t"] + (["w"] if weighted else [])
    extra = [2] * (rank - 2)
    loss_shape = [] if reduction != "none" else ["N"] + extra
    graph = helper.make_graph(
        [helper.make_node("NegativeLogLikelihoodLoss", inputs, ["loss"], **attrs)], "nll",
        [helper.make_tensor_value_info("X", F, ["N", 3] + extra),
         helper.make_tensor_value_info("t", TensorProto.INT64, ["N"] + extra)],
        [helper.make_tensor_value_info("loss", F, loss_shape)],
        [numpy_helper.from_array(np.array([0.5, 2.0, 1.5], np.float32), "w")] if weighted else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@needs_training_build
@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_negative_log_likelihood_decomposition(reduction, weighted, ignore, rank):
    from onnxfit.gradient import build_vjp

    model = _nll_graph(reduction, weighted, ignore, rank)
    rng = np.random.default_rng(8)
    X = rng.normal(size=(6, 3) + (2,) * (rank - 2)).astype(np.float32)
    t = rng.integers(0, 3, size=(6,) + (2,) * (rank - 2))
    t.flat[0] = 1  # at least one ignored target
    decomposed = onnx.ModelProto()
    decomposed.CopyFrom(model)
    ort_training.prepare_for_builder(decomposed)
    assert not any(n.op_type == "NegativeLogLikelihoodLoss" for n in decomposed.graph.node)
    expected = _inference_output(model, {"X": X, "t": t})
    assert_allclose(_inference_output(decomposed, {"X": X, "t": t}), expected, rtol=1e-6)
    dloss = rng.normal(size=expected.shape).astype(np.float32)
    grads = {}
    for backend in BACKENDS:
        vjp = build_vjp(model, {"loss": "dloss"}, ["X"], backend=backend)
        out = _run(vjp.model, {"X": X, "t": t, "dloss": dloss})
        assert_allclose(out["loss"], expected, rtol=1e-6)
        grads[backend] = out[vjp.gradient_names["X"]]
    assert_allclose(grads["onnxruntime-training"], grads["onnxfit"], rtol=1e-6, atol=1e-7)
