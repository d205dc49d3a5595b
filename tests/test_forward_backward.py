"""engine='forward_backward' trains exactly like engine='fused'.

Both engines run the same loss, penalty and update pieces (the fused one in
one graph, the forward-backward one as separate sessions around the model's
forward and backward passes), so on the same data, batches, seed and
hyperparameters they must end with the same weights.  Changing the loss,
the penalty or the learning rate must reuse the model's gradient graph.
"""

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_classification, make_regression
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier, MLPRegressor

from onnxfit import (
    BaseLoss,
    HuberLoss,
    LearningRateSGD,
    LearningRateSGDNesterov,
    OnnxSGDClassifier,
    OnnxSGDRegressor,
)
from onnxfit.engines import ENGINES, ForwardBackwardEngine
from onnxfit.engines.forward_backward import PREDICTION, PREDICTION_GRADIENT, build_loss_model
from onnxfit.function import model_gradient_cache
from onnxfit.sessions import make_session
from onnxfit.model import OnnxModel, load_onnx, normalise_model
from tests.graphs import convert, gemm_mlp_graph, mlp_graph

N_FEATURES = 6


def regression_data(n=320, seed=0):
    X, y = make_regression(n, N_FEATURES, n_informative=4, noise=0.5, random_state=seed)
    y = (y - y.mean()) / y.std()
    sample_weight = np.random.default_rng(seed).uniform(0.2, 2.0, n)
    return X.astype(np.float32), y, sample_weight


def skl2onnx_mlp_regressor():
    X, y, _ = regression_data(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPRegressor(hidden_layer_sizes=(10,), max_iter=10, random_state=0).fit(X, y)
    return convert(mlp, X)


MODELS = {
    "default_linear": lambda: None,
    "skl2onnx_mlp": skl2onnx_mlp_regressor,
    "gemm_mlp": lambda: gemm_mlp_graph(N_FEATURES, (12, 8), 1),
}


def relative_difference(weights, reference):
    """Largest relative difference over the weight tensors."""
    return max(
        float(np.abs(weights[k] - reference[k]).max() / np.abs(reference[k]).max())
        for k in reference
    )


def fit_both(model, X, y, sample_weight=None, estimator=OnnxSGDRegressor, **params):
    fitted = {}
    for engine in ("fused", "forward_backward"):
        est = estimator(
            model, engine=engine, max_iter=3, tol=None, random_state=0, batch_size=32,
            **params,
        )
        fitted[engine] = est.fit(X, y, sample_weight=sample_weight)
        assert type(est._runtime.engine) is ENGINES[engine]
    return fitted["fused"], fitted["forward_backward"]


def test_engine_is_registered():
    assert ENGINES["forward_backward"] is ForwardBackwardEngine


@pytest.mark.parametrize("with_sample_weight", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("penalty", [None, "l2"])
@pytest.mark.parametrize("learning_rate", ["sgd", "nesterov"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_same_weights_as_fused_engine(model_name, learning_rate, penalty, with_sample_weight):
    X, y, sample_weight = regression_data()
    model = MODELS[model_name]()
    fused, forward_backward = fit_both(
        model, X, y, sample_weight if with_sample_weight else None,
        learning_rate=learning_rate, penalty=penalty, alpha=0.01,
    )
    assert forward_backward.dtype_ == np.float32
    assert forward_backward.n_iter_ == 3 and forward_backward.t_ == fused.t_ == 30
    # Training moved the weights (well beyond the tolerance below).
    if model is None:
        initial = {k: np.zeros_like(v) for k, v in fused.weights_.items()}
    else:
        initial = OnnxModel(normalise_model(load_onnx(model))).initial_weights()
    assert relative_difference(initial, fused.weights_) > 1e-2
    assert relative_difference(forward_backward.weights_, fused.weights_) <= 1e-5
    np.testing.assert_allclose(forward_backward.loss_curve_, fused.loss_curve_, rtol=1e-5)
    np.testing.assert_allclose(forward_backward.predict(X), fused.predict(X), rtol=1e-4, atol=1e-5)


def classification_data(n_classes, n=320, seed=0):
    X, y = make_classification(
        n, N_FEATURES, n_informative=4, n_redundant=0, n_classes=n_classes, random_state=seed
    )
    sample_weight = np.random.default_rng(seed).uniform(0.2, 2.0, n)
    return X.astype(np.float32), y, sample_weight


def skl2onnx_mlp_classifier():
    X, y, _ = classification_data(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(10,), max_iter=10, random_state=0).fit(X, y)
    return convert(mlp, X)  # with its ZipMap: the classifier trains the logits


CLASSIFIERS = {
    "default_binary": (lambda: None, 2),
    "default_3_classes": (lambda: None, 3),
    "skl2onnx_mlp": (skl2onnx_mlp_classifier, 3),
}


@pytest.mark.parametrize("with_sample_weight", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("penalty", [None, "l2"])
@pytest.mark.parametrize("learning_rate", ["sgd", "nesterov"])
@pytest.mark.parametrize("model_name", list(CLASSIFIERS))
def test_classifier_same_weights_as_fused_engine(
    model_name, learning_rate, penalty, with_sample_weight
):
    make_model, n_classes = CLASSIFIERS[model_name]
    X, y, sample_weight = classification_data(n_classes)
    fused, forward_backward = fit_both(
        make_model(), X, y, sample_weight if with_sample_weight else None,
        estimator=OnnxSGDClassifier, learning_rate=learning_rate, penalty=penalty, alpha=0.01,
    )
    assert forward_backward.t_ == fused.t_ == 30
    assert relative_difference(forward_backward.weights_, fused.weights_) <= 1e-5
    np.testing.assert_allclose(forward_backward.loss_curve_, fused.loss_curve_, rtol=1e-5)
    np.testing.assert_array_equal(forward_backward.predict(X), fused.predict(X))
    assert fused.loss_curve_[-1] < fused.loss_curve_[0]  # it trained


def test_same_weights_in_float64():
    X, y, sample_weight = regression_data()
    fused, forward_backward = fit_both(
        None, X.astype(np.float64), y, sample_weight, learning_rate="nesterov", alpha=0.01
    )
    assert forward_backward.dtype_ == np.float64
    assert relative_difference(forward_backward.weights_, fused.weights_) <= 1e-12


def test_same_weights_multi_output_and_partial_fit():
    X, y, _ = regression_data()
    Y = np.c_[y, -0.5 * y + X[:, 0]]
    models = {}
    for engine in ("fused", "forward_backward"):
        est = OnnxSGDRegressor(
            mlp_graph(N_FEATURES, (7,), 2, "Tanh"), engine=engine, learning_rate="nesterov",
            random_state=0, batch_size=50,
        )
        for _ in range(3):
            est.partial_fit(X, Y)
        models[engine] = est
    assert models["forward_backward"].t_ == 21  # 7 batches of 50 (the last one of 20) x 3
    assert relative_difference(models["forward_backward"].weights_, models["fused"].weights_) <= 1e-5


def test_one_step_with_elastic_net_penalty_and_huber_loss():
    # With an L1 term, a weight near zero whose sign differs by rounding gets
    # another gradient, so long runs may drift apart: one step must agree.
    X, y, sample_weight = regression_data()
    fused, forward_backward = fit_both(
        gemm_mlp_graph(N_FEATURES, (12,), 1), X[:32], y[:32], sample_weight[:32],
        loss=HuberLoss(epsilon=0.5), penalty="elasticnet", alpha=0.05, l1_ratio=0.5,
    )
    assert fused.t_ == 3
    assert relative_difference(forward_backward.weights_, fused.weights_) <= 1e-6
    np.testing.assert_allclose(forward_backward.loss_curve_, fused.loss_curve_, rtol=1e-6)


def test_loss_graph_gives_the_closed_form_gradient():
    X, y, sample_weight = regression_data(n=40)
    est = OnnxSGDRegressor(engine="forward_backward", max_iter=1, tol=None).fit(X, y)
    problem = est._build_problem()
    session = make_session(build_loss_model(problem))
    prediction = np.random.default_rng(0).standard_normal((40, 1)).astype(np.float32)
    label = y.reshape(-1, 1).astype(np.float32)
    weight = sample_weight.astype(np.float32)
    # The loss graphs take the weights divided by the batch size, as a column.
    scaled = (weight / 40).reshape(-1, 1)
    loss, gradient = session.run(
        None, {PREDICTION: prediction, "onnxfit.label": label, "onnxfit.sample_weight": scaled}
    )
    residual = prediction.astype(np.float64) - label
    np.testing.assert_allclose(loss, np.mean(0.5 * residual[:, 0] ** 2 * weight), rtol=1e-6)
    np.testing.assert_allclose(gradient, residual * weight[:, None] / 40, rtol=1e-5)
    assert session.get_outputs()[1].name == PREDICTION_GRADIENT


# -- the model's gradient graph is reused ---------------------------------------------
def test_changing_loss_penalty_or_learning_rate_reuses_the_gradient_graph():
    X, y, _ = regression_data()
    est = OnnxSGDRegressor(
        mlp_graph(N_FEATURES, (9,), 1, seed=101), engine="forward_backward", max_iter=2,
        tol=None, random_state=0,
    )
    builds = model_gradient_cache.builds
    est.fit(X, y)
    assert model_gradient_cache.builds == builds + 1
    first_engine = est._runtime.engine
    variants = [
        {"loss": "huber"},
        {"penalty": "elasticnet", "alpha": 0.001},
        {"penalty": None},
        {"learning_rate": LearningRateSGDNesterov(eta0=0.005)},
        {"learning_rate": LearningRateSGD(eta0=0.02, schedule="constant")},
    ]
    losses = []
    for params in variants:
        est.set_params(**params).fit(X, y)
        losses.append(est.loss_curve_[-1])
        assert est._runtime.engine is not first_engine  # loss/penalty/update rebuilt ...
        assert est._runtime.engine.model_runner is first_engine.model_runner  # ... not this
    assert model_gradient_cache.builds == builds + 1
    assert len(set(losses)) == len(losses)  # the variants really trained differently


def test_grid_search_builds_the_model_gradient_once():
    X, y, _ = regression_data()
    search = GridSearchCV(
        OnnxSGDRegressor(
            gemm_mlp_graph(N_FEATURES, (8,), 1, seed=102), engine="forward_backward",
            max_iter=20, tol=None, random_state=0,
        ),
        {
            "loss": ["squared_error", "huber"],
            "alpha": [1e-4, 1e-2],
            "learning_rate": ["sgd", "nesterov"],
        },
        cv=2,
    )
    builds, hits = model_gradient_cache.builds, model_gradient_cache.hits
    search.fit(X, y)
    assert model_gradient_cache.builds == builds + 1
    assert model_gradient_cache.hits >= hits + 2 * 8  # every other fit (refit included)
    assert search.best_score_ > 0.5


class _SoftmaxTanhLoss(BaseLoss):
    """A loss without a closed form whose automatic derivative needs a
    com.microsoft operator (SoftmaxGrad_13)."""

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    s = Softmax<axis = -1>(d)
    t = Tanh(d)
    r = Relu(d)
    e1 = Mul(s, t)
    elementwise = Add(e1, r)
"""


def test_loss_without_closed_form_using_training_operators_in_both_engines():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(37, 4)).astype(np.float32)  # SoftmaxGrad_13 is float32 only
    y = rng.normal(size=(37, 3))
    models = {
        engine: OnnxSGDRegressor(loss=_SoftmaxTanhLoss(), engine=engine, max_iter=2, tol=None,
                                 penalty=None, batch_size=8, random_state=0).fit(X, y)
        for engine in ("fused", "forward_backward")
    }
    assert relative_difference(models["forward_backward"].weights_, models["fused"].weights_) <= 1e-5
    np.testing.assert_allclose(models["forward_backward"].loss_curve_, models["fused"].loss_curve_,
                               rtol=1e-6)
    assert models["fused"].loss_curve_[1] < models["fused"].loss_curve_[0]


class _LossNamingAValuePartial0(BaseLoss):
    """Its intermediate value shares a name with the objective's partial sums."""

    def elementwise_body(self):
        return """
    partial0 = Sub(prediction, label)
    elementwise = Mul(partial0, partial0)
"""

    def derivative_body(self):
        return """
    two = Constant<value = {T} {{2.0}}>()
    derivative = Mul(partial0, two)
"""


def test_loss_value_names_never_collide_with_the_objective_sum():
    X, y, sample_weight = regression_data()
    fused, forward_backward = fit_both(
        gemm_mlp_graph(N_FEATURES, (6,), 1), X, y, sample_weight,
        loss=_LossNamingAValuePartial0(), penalty="l2", alpha=0.01,
    )
    assert relative_difference(forward_backward.weights_, fused.weights_) <= 1e-5


def test_values_kept_for_the_backward_pass_are_bound_again_when_shapes_may_depend_on_data():
    """TopK with k computed from the data: onnx cannot tell the shape of the
    indices the backward pass reads, so they are bound at each step (a
    constant k is bound once): same weights as the fused engine."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    W = rng.normal(size=(5, 6)).astype(np.float32)

    def topk_model(k_from_data):
        nodes = [helper.make_node("MatMul", ["X", "W"], ["S"])]
        if k_from_data:  # k = 2 * max |sign(X)| = 2, known only at run time
            nodes += [helper.make_node("Sign", ["X"], ["sx"]),
                      helper.make_node("Abs", ["sx"], ["ax"]),
                      helper.make_node("ReduceMax", ["ax"], ["m"], keepdims=0),
                      helper.make_node("Mul", ["m", "two"], ["kf"]),
                      helper.make_node("Cast", ["kf"], ["k0"], to=TensorProto.INT64),
                      helper.make_node("Reshape", ["k0", "one"], ["k"])]
        nodes.append(helper.make_node("TopK", ["S", "k"], ["Y", "I"], axis=1))
        inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(
            np.array([1], np.int64), "one"), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
        if not k_from_data:
            inits.append(numpy_helper.from_array(np.array([2], np.int64), "k"))
        graph = helper.make_graph(
            nodes, "topk", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 5])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    X, _, _ = regression_data(n=64)
    X = X[:, :5]
    y = rng.normal(size=(64, 2))
    for k_from_data in (True, False):
        fused, forward_backward = fit_both(topk_model(k_from_data), X, y, weights_to_train=["W"])
        bound = [b.bound for b in forward_backward._runtime.engine._buffers.values()]
        assert all(bool(b.rebound) is k_from_data for b in bound)
        assert relative_difference(forward_backward.weights_, fused.weights_) <= 1e-6
        assert not np.allclose(fused.weights_["W"], W)  # it trained
