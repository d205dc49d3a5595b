"""Whole real graphs against saved gradient references: the zoo.

tests/zoo/ holds small graphs converted by skl2onnx and exported by PyTorch
(``python -m tests.zoo.make_zoo`` writes them) with, per graph, an input
batch ``X`` (any rank; ``input.<name>`` per input for graphs with several
inputs), a cotangent ``dY`` of the differentiated output and, for the
PyTorch ones, the gradients of ``sum(Y * dY)`` torch.autograd computed in
float64 (``weights``, where saved, names the initializers to train: the
dynamo exporter also stores constants as float initializers);
``<name>.ort1192.npz`` holds the gradients onnxruntime-training 1.19.2
computed where it could (``python -m tests.zoo.make_zoo --ort-training`` in
a venv with that build).  The user models (``torch_<model>`` from the
TorchScript exporter, ``torch_<model>_dynamo`` from the dynamo one) are
described in make_zoo.py.  For every graph:

* onnxfit's gradients (OnnxFunction, default backend) match float64
  central finite differences of a float64 copy of the graph;
* they match the torch and 1.19.2 references;
* both training engines move the weights by exactly minus that gradient
  after one SGD step on a loss whose output gradient is ``dY``;
* every graph onnxfit builds holds default-domain operators only;
* with the training build installed, the two gradient backends agree live;
* one training-mode SGD step of cnn_digits (batch statistics, a saved
  Dropout mask) matches torch's (``cnn_digits_train_step.npz``).

Neither torch nor the training build is needed: references are files.
"""

import functools
import os
import tempfile

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.utils import Extractor

import onnxfit
from onnxfit.gradient_check import _all_nodes, _to_double
from onnxfit.sessions import has_training_build
from tests.finite_differences import Erf, Gelu
from tests.zoo.make_zoo import set_dropout_ratio

ZOO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo")
ZOO = sorted(f[:-5] for f in os.listdir(ZOO_DIR) if f.endswith(".onnx"))

#: Elements checked by finite differences per tensor.
FD_POSITIONS = 40
FD_STEP = 1e-6
#: A float32 gradient against a reference: max |error| <= TOL * max |reference| per tensor
#: (errors seen: below 6e-7 for every tensor of the zoo).  Relative to each tensor's
#: own scale, since layers far from the output have small gradients: a rule off
#: by 0.1% would pass an absolute bound there.
FD_TOL = 1e-5
REFERENCE_TOL = 1e-5
ENGINE_TOL = 1e-5


def test_the_zoo_is_there():
    assert len(ZOO) >= 23, ZOO
    for name in ZOO:
        assert os.path.exists(os.path.join(ZOO_DIR, f"{name}.npz")), name
    assert os.path.exists(os.path.join(ZOO_DIR, "cnn_digits_train_step.npz"))
    total = sum(os.path.getsize(os.path.join(ZOO_DIR, f)) for f in os.listdir(ZOO_DIR))
    assert total < 1_500_000


# -- helpers ------------------------------------------------------------------------------------
def _path(name):
    return os.path.join(ZOO_DIR, f"{name}.onnx")


@functools.lru_cache(maxsize=None)
def zoo_data(name):
    data = dict(np.load(os.path.join(ZOO_DIR, f"{name}.npz")))
    data["output"] = str(data["output"])
    if "weights" in data:
        data["weights"] = [str(w) for w in data["weights"]]
    return data


def _graph_inputs(model):
    """Names of the graph inputs that are not initializers, in order."""
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


@functools.lru_cache(maxsize=None)
def zoo_model(name):
    """The graph to differentiate: the file, except that the training-mode
    export gets the Dropout ratio its references were computed with (0: no
    reference can share onnxruntime's random mask)."""
    model = onnx.load(_path(name))
    data = zoo_data(name)
    if "dropout_ratio" in data:
        model = set_dropout_ratio(model, float(data["dropout_ratio"]))
    return model


@functools.lru_cache(maxsize=None)
def zoo_inputs(name):
    """{npz key: (graph input name, array)}: ``X`` for the one input of
    most graphs, ``input.<name>`` per input otherwise."""
    data = zoo_data(name)
    if "X" in data:
        (input_name,) = _graph_inputs(zoo_model(name))
        return {"X": (input_name, data["X"])}
    return {k: (k[len("input."):], v) for k, v in data.items() if k.startswith("input.")}


def differentiated_inputs(name):
    """Keys of :func:`zoo_inputs` holding floating-point inputs."""
    return [k for k, (_, v) in zoo_inputs(name).items() if v.dtype.kind == "f"]


def _feed(name):
    """X for a graph with one input, else the dict graph input -> array
    (as OnnxFunction and the estimators take several inputs)."""
    inputs = zoo_inputs(name)
    if list(inputs) == ["X"]:
        return inputs["X"][1]
    return {input_name: value for input_name, value in inputs.values()}


def _weights_to_train(name):
    return zoo_data(name).get("weights")


@functools.lru_cache(maxsize=None)
def own_gradients(name):
    """(function, initial weights, Y0, weight gradients, input gradients) from
    OnnxFunction with the default backend; the input gradients are a dict
    keyed like :func:`differentiated_inputs`."""
    data = zoo_data(name)
    f = onnxfit.OnnxFunction(zoo_model(name), weights_to_train=_weights_to_train(name),
                             output_name=data["output"], input_gradient=True)
    weights = f.initial_weights()
    Y0 = f.forward(_feed(name), weights)
    grads, grad_inputs = f.backward(data["dY"], return_input_gradient=True)
    inputs = zoo_inputs(name)
    if not isinstance(grad_inputs, dict):  # one input
        grad_inputs = {"X": grad_inputs}
    else:  # graph input name -> gradient
        grad_inputs = {key: grad_inputs[inputs[key][0]] for key in differentiated_inputs(name)}
    return f, weights, Y0, grads, grad_inputs


def _error(actual, expected, floor=1e-6):
    """max |actual - expected| / max |expected| (at least ``floor``)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.size == 0:
        return 0.0
    return float(np.abs(actual - expected).max() / max(floor, np.abs(expected).max()))


def _assert_close(name, what, actual, expected, tol, floors=None):
    # A gradient that is zero by mathematics (a bias before a batch-statistics
    # normalisation) is float32 noise in a float32 backward pass, as small as
    # the rounding of the largest gradient of the same pass: a reference below
    # float32's resolution of that scale is measured against the scale.
    scale = max(float(np.abs(np.asarray(v, dtype=np.float64)).max()) if np.size(v) else 0.0
                for v in expected.values())
    floors = dict(floors or {})
    for k, v in expected.items():
        if np.size(v) and float(np.abs(np.asarray(v, dtype=np.float64)).max()) <= 1e-6 * scale:
            floors[k] = max(floors.get(k, 1e-6), scale)
    errors = {k: _error(actual[k], expected[k], *([floors[k]] if k in floors else []))
              for k in expected}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, (
        f"{name}: {what} differ beyond {tol:g} (max |error| / max |reference|) "
        f"for {sorted(bad)}: " + ", ".join(f"{k}: {e:.3g}" for k, e in sorted(bad.items()))
    )


# -- float64 reference of the graph -------------------------------------------------------------
# The float64 copy is onnxfit.check_gradients' (tested on its own to fail on
# a wrong rule); its node walk covers subgraphs.


class Float64Loss:
    """``sum(Y * dY)`` of a float64 copy of the graph, as a function of the
    input and the trained weights (graph inputs of the copy).

    onnxruntime runs it where it has float64 kernels for every operator;
    otherwise (Conv, AveragePool, GlobalAveragePool, Erf, ... have none on
    the CPU) onnx's reference evaluator does, with a float64 Erf.
    """

    def __init__(self, name):
        data = zoo_data(name)
        f = own_gradients(name)[0]
        model = zoo_model(name)
        inferred = onnx.shape_inference.infer_shapes(model)
        model = Extractor(inferred).extract_model(_graph_inputs(model), [data["output"]])
        graph = model.graph
        weights = set(f.weight_names)
        moved = [init for init in graph.initializer if init.name in weights]
        kept = [init for init in graph.initializer if init.name not in weights]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.input.extend(
            helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in moved)
        model = _to_double(model)
        self.dY = data["dY"].astype(np.float64)
        serialized = model.SerializeToString()
        try:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = onnxruntime.InferenceSession(
                serialized, options, providers=["CPUExecutionProvider"])
            self.evaluator = "onnxruntime"
            self._run = lambda feeds: session.run(None, feeds)[0]
            # LSTM and GRU have float64 kernels registered that refuse to run.
            self._run(feeds_for(name))
        except Exception:  # no float64 kernel for some operator
            reference = ReferenceEvaluator(model, new_ops=[Erf, Gelu])
            self.evaluator = "onnx.reference"
            self._run = lambda feeds: reference.run(None, feeds)[0]

    def __call__(self, values):
        return float(np.sum(self._run(values) * self.dY))


def feeds_for(name):
    """The graph inputs of the npz, float ones in float64, and the weights
    (float64), as :class:`Float64Loss` takes them."""
    f, weights = own_gradients(name)[:2]
    values = {w: v.astype(np.float64) for w, v in weights.items()}
    for input_name, value in zoo_inputs(name).values():
        values[input_name] = value.astype(np.float64) if value.dtype.kind == "f" else value
    return values


def finite_difference_check(name, positions=FD_POSITIONS, step=FD_STEP):
    """(own gradients, central finite differences) at up to ``positions``
    random elements of every weight and of every float input, keyed by
    weight name and input key ('X', 'input.<name>')."""
    f, weights, _, grads, grad_inputs = own_gradients(name)
    loss = Float64Loss(name)
    values = feeds_for(name)
    own = dict(grads, **grad_inputs)
    rng = np.random.default_rng(sum(map(ord, name)))
    actual, expected = {}, {}
    inputs = zoo_inputs(name)
    for key, value_name in [(w, w) for w in f.weight_names] + [
            (k, inputs[k][0]) for k in differentiated_inputs(name)]:
        value = values[value_name]
        flat = value.reshape(-1)
        picked = rng.choice(flat.size, min(positions, flat.size), replace=False)
        differences = []
        for k in picked:
            saved = flat[k]
            flat[k] = saved + step
            up = loss(values)
            flat[k] = saved - step
            down = loss(values)
            flat[k] = saved
            differences.append((up - down) / (2 * step))
        actual[key] = np.asarray(own[key]).reshape(-1)[picked]
        expected[key] = np.array(differences)
    return actual, expected, loss.evaluator


# -- a. finite differences ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ZOO)
def test_gradients_match_float64_finite_differences(name):
    actual, expected, _ = finite_difference_check(name)
    _assert_close(name, "own gradients and float64 finite differences", actual, expected, FD_TOL)


# -- b. saved references ------------------------------------------------------------------------
TORCH_ZOO = [n for n in ZOO if any(k.startswith("torch.") for k in zoo_data(n))]
ORT1192_ZOO = [n for n in ZOO if os.path.exists(os.path.join(ZOO_DIR, f"{n}.ort1192.npz"))]


def torch_references(name):
    """(weight gradients, input gradients keyed like differentiated_inputs)."""
    data = zoo_data(name)
    weights, inputs = {}, {}
    for key, value in data.items():
        if key == "torch.X":
            inputs["X"] = value
        elif key.startswith("torch.input."):
            inputs[key[len("torch."):]] = value
        elif key.startswith("torch.") and key != "torch.Y":
            weights[key[len("torch."):]] = value
    return weights, inputs


@pytest.mark.parametrize("name", TORCH_ZOO)
def test_gradients_match_torch(name):
    data = zoo_data(name)
    f, _, Y0, grads, grad_inputs = own_gradients(name)
    expected, expected_inputs = torch_references(name)
    # Every trained weight has its torch gradient and nothing else does.
    assert sorted(expected) == sorted(f.weight_names)
    assert sorted(expected_inputs) == sorted(differentiated_inputs(name))
    _assert_close(name, "outputs of the graph and of torch",
                  {"Y": Y0}, {"Y": data["torch.Y"]}, REFERENCE_TOL)
    _assert_close(name, "own and torch gradients", dict(grads, **grad_inputs),
                  dict(expected, **expected_inputs), REFERENCE_TOL)


@pytest.mark.parametrize("name", ORT1192_ZOO)
def test_gradients_match_saved_onnxruntime_training_1_19_2(name):
    f, _, _, grads, grad_inputs = own_gradients(name)
    expected = dict(np.load(os.path.join(ZOO_DIR, f"{name}.ort1192.npz")))
    assert sorted(expected) == sorted(f.weight_names + differentiated_inputs(name))
    _assert_close(name, "own and onnxruntime-training 1.19.2 gradients",
                  dict(grads, **grad_inputs), expected, REFERENCE_TOL)


# -- c, d. the training engines -----------------------------------------------------------------
def one_step(name, engine):
    """Fit one full-batch SGD step (eta=1) on labels making dLoss/dY = dY.

    The squared loss is mean over samples of 0.5 * sum((Y - y)^2), whose
    gradient with respect to Y is (Y - y) / n: with y = Y0 - n * dY it is
    dY, so the step moves the weights by minus the gradient of sum(Y * dY).
    Returns (estimator, weight change).
    """
    data = zoo_data(name)
    f, weights, Y0, _, _ = own_gradients(name)
    X = _feed(name)  # an N-D array, or a dict for several inputs
    n = len(data["dY"])
    y = Y0.astype(np.float64) - n * data["dY"].astype(np.float64)
    # The graph as written: eval-mode exports stay in inference mode, the
    # training-mode export (Dropout ratio 0 here) keeps its batch statistics.
    mode = {}
    if "train_mode" in onnxfit.OnnxSGDRegressor().get_params():  # being added
        mode["train_mode"] = "dropout_ratio" in data
    est = onnxfit.OnnxSGDRegressor(
        zoo_model(name), weights_to_train=_weights_to_train(name), output_name=data["output"],
        learning_rate=onnxfit.LearningRateSGD(eta0=1.0, schedule="constant"),
        penalty=None, batch_size=n, max_iter=1, tol=None, shuffle=False, engine=engine, **mode,
    )
    est.fit(X, y.reshape(n, -1))
    assert est.trained_output_ == f.output_name
    assert est.t_ == 1
    assert sorted(est.weights_) == sorted(weights)
    return est, {w: est.weights_[w].astype(np.float64) - weights[w] for w in weights}


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
@pytest.mark.parametrize("name", ZOO)
def test_one_engine_step_moves_the_weights_by_minus_the_gradient(name, engine):
    est, change = one_step(name, engine)
    _, weights, _, grads, _ = own_gradients(name)
    # The new float32 weights are rounded to their own scale: a gradient far
    # smaller than its weight is known to that precision only.
    floors = {w: max(1e-6, 1e-2 * float(np.abs(v).max())) for w, v in weights.items()}
    _assert_close(name, f"{engine} engine step and minus the OnnxFunction gradient",
                  change, {w: -g for w, g in grads.items()}, ENGINE_TOL, floors)

    # d. Every graph onnxfit built runs on any onnxruntime build.
    runtime_engine = est._runtime.engine
    if engine == "fused":
        graphs = {"fused training graph": runtime_engine.training_model}
    else:
        split = runtime_engine.model_runner.split
        graphs = {"forward graph": split.forward, "backward graph": split.backward,
                  "loss graph": runtime_engine.loss_model,
                  "update graph": runtime_engine.update_model}
    for what, model in graphs.items():
        foreign = sorted({f"{n.domain}:{n.op_type}" for n in _all_nodes(model.graph)
                          if n.domain not in ("", "ai.onnx")})
        assert not foreign, f"{name}: the {what} holds non-default-domain operators {foreign}"


# -- e. the two backends, live ------------------------------------------------------------------
@pytest.mark.skipif(not has_training_build(),
                    reason="needs onnxruntime-training-cpu 1.19.2")
@pytest.mark.parametrize("name", ZOO)
def test_backends_agree_live(name):
    # In a child process: some 1.19.2 gradient kernels kill the process.
    from tests.zoo.make_zoo import run_ort_training_child

    with tempfile.TemporaryDirectory() as out_dir:
        report = run_ort_training_child(name, out_dir)
        if "saved" not in report:
            assert "crash" not in report, (
                f"{name}: OnnxFunction(gradient_backend='onnxruntime-training') crashed: "
                f"{report['error']}")
            # What 1.19.2 cannot differentiate is refused with onnxfit's message,
            # and is exactly what no saved reference exists for.
            assert name not in ORT1192_ZOO, f"{name}: {report['error']}"
            assert "cannot differentiate" in report["error"] or (
                "could not build the gradient graph" in report["error"]), report["error"]
            return
        assert name in ORT1192_ZOO, f"{name}: 1.19.2 differentiates it now; save its reference"
        expected = dict(np.load(os.path.join(out_dir, f"{name}.ort1192.npz")))
    f, _, _, grads, grad_inputs = own_gradients(name)
    assert sorted(expected) == sorted(f.weight_names + differentiated_inputs(name))
    _assert_close(name, "the onnxfit and onnxruntime-training gradients",
                  dict(grads, **grad_inputs), expected, REFERENCE_TOL)


# -- f. one training-mode SGD step of cnn_digits, from torch ----------------------------------
TRAIN_STEP = os.path.join(ZOO_DIR, "cnn_digits_train_step.npz")


@functools.lru_cache(maxsize=None)
def train_step_data():
    return dict(np.load(TRAIN_STEP))


def _with_initializers(model, values):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(np.float32), init.name))
    return model


def _in_inference_mode(model):
    """The training-mode export of cnn_digits as an eval-mode graph:
    BatchNormalization on the running statistics, Dropout the identity."""
    model = set_dropout_ratio(onnx.ModelProto.FromString(model.SerializeToString()), 0.0)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            for attribute in node.attribute:
                if attribute.name == "training_mode":
                    attribute.i = 0
            del node.output[1:]
    return model


def _with_dropout_mask(model, mask, p):
    """The training-mode export of cnn_digits with its Dropout replaced by
    the product with ``mask / (1 - p)`` (a Constant)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    (k, node), = [(k, n) for k, n in enumerate(graph.node) if n.op_type == "Dropout"]
    scale = numpy_helper.from_array((mask / (1 - p)).astype(np.float32))
    graph.node.remove(node)
    graph.node.insert(k, helper.make_node("Mul", [node.input[0], "zoo.dropout_scale"],
                                          [node.output[0]]))
    graph.node.insert(k, helper.make_node("Constant", [], ["zoo.dropout_scale"], value=scale))
    return model


def test_the_cnn_digits_training_step_reference_is_consistent():
    """The saved torch step starts from the exported weights, and its
    stepped weights and running statistics give its eval-mode predictions
    through the exported graph (run in inference mode)."""
    step = train_step_data()
    model = onnx.load(_path("torch_cnn_digits_train"))
    initial = {k[len("initial."):]: v for k, v in step.items() if k.startswith("initial.")}
    stepped = {k[len("stepped."):]: v for k, v in step.items() if k.startswith("stepped.")}
    graph_values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert sorted(initial) == sorted(stepped) == sorted(graph_values)
    for name, value in initial.items():
        np.testing.assert_array_equal(graph_values[name], value, err_msg=name)
    assert step["mask"].shape == (16, 64) and set(np.unique(step["mask"])) <= {0.0, 1.0}
    session = onnxruntime.InferenceSession(
        _with_initializers(_in_inference_mode(model), stepped).SerializeToString(),
        providers=["CPUExecutionProvider"])
    logits = session.run(["output"], {"input": step["X"]})[0]
    _assert_close("cnn_digits_train_step", "eval-mode outputs of the graph and of torch",
                  {"Y": logits}, {"Y": step["eval_output"]}, REFERENCE_TOL)


def test_one_training_mode_sgd_step_of_cnn_digits_matches_torch():
    """OnnxFunction's gradient of the mean cross-entropy through the
    training-mode graph (batch statistics, the saved Dropout mask) moves the
    parameters as torch.optim.SGD(lr=0.1) did."""
    step = train_step_data()
    model = _with_dropout_mask(onnx.load(_path("torch_cnn_digits_train")), step["mask"],
                               float(step["dropout_p"]))
    weights_to_train = zoo_data("torch_cnn_digits_train")["weights"]
    f = onnxfit.OnnxFunction(model, weights_to_train=weights_to_train, output_name="output")
    initial = {w: step[f"initial.{w}"] for w in f.weight_names}
    logits = f.forward(step["X"], initial).astype(np.float64)
    y = step["y"]
    n = len(y)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(probabilities[np.arange(n), y]))
    np.testing.assert_allclose(loss, step["loss"], rtol=1e-5)
    dY = probabilities.copy()
    dY[np.arange(n), y] -= 1
    grads = f.backward((dY / n).astype(np.float32))
    lr = float(step["lr"])
    # The first convolution's bias has a zero gradient (the batch mean takes
    # it out): errors are relative to at least 1% of each weight's scale, as
    # float32 weights after a step are known to that precision only.
    floors = {w: max(1e-6, 1e-2 * float(np.abs(v).max())) for w, v in initial.items()}
    _assert_close("cnn_digits_train_step", "the torch SGD step and minus lr * the gradient",
                  {w: step[f"stepped.{w}"].astype(np.float64) - initial[w] for w in f.weight_names},
                  {w: -lr * g.astype(np.float64) for w, g in grads.items()}, 1e-4, floors)


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_graphs_with_a_penalty_and_a_loss_without_closed_form_are_standard_too(engine):
    """The penalty graph and an automatically differentiated loss are built
    through the same seam: default-domain operators only."""
    from tests.test_losses import PseudoHuberLoss

    name = "torch_conv_maxpool"
    data = zoo_data(name)
    X = data["X"]
    est = onnxfit.OnnxSGDRegressor(
        _path(name), loss=PseudoHuberLoss(), penalty="elasticnet", alpha=0.01, max_iter=1,
        tol=None, engine=engine, batch_size=len(X),
    ).fit(X, np.zeros((len(X), data["dY"].shape[1])))
    runtime_engine = est._runtime.engine
    models = [runtime_engine.training_model] if engine == "fused" else [
        runtime_engine.penalty_model, runtime_engine.loss_model]
    assert all(m is not None for m in models)
    for model in models:
        assert {n.domain for n in _all_nodes(model.graph)} <= {""}
