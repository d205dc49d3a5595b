"""Whole real graphs against saved gradient references: the zoo.

tests/zoo/ holds small graphs converted by skl2onnx and exported by PyTorch
(``python -m tests.zoo.make_zoo`` writes them) with, per graph, an input
batch ``X``, a cotangent ``dY`` of the differentiated output and, for the
PyTorch ones, the gradients of ``sum(Y * dY)`` torch.autograd computed in
float64; ``<name>.ort1192.npz`` holds the gradients onnxruntime-training
1.19.2 computed where it could (``python -m tests.zoo.make_zoo
--ort-training`` in a venv with that build).  For every graph:

* onnxfit's gradients (OnnxFunction, default backend) match float64
  central finite differences of a float64 copy of the graph;
* they match the torch and 1.19.2 references;
* both training engines move the weights by exactly minus that gradient
  after one SGD step on a loss whose output gradient is ``dY``;
* every graph onnxfit builds holds default-domain operators only;
* with the training build installed, the two gradient backends agree live.

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
from onnxfit.sessions import has_training_build
from tests.finite_differences import Erf, Gelu

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
    assert len(ZOO) >= 12, ZOO
    for name in ZOO:
        assert os.path.exists(os.path.join(ZOO_DIR, f"{name}.npz")), name
    total = sum(os.path.getsize(os.path.join(ZOO_DIR, f)) for f in os.listdir(ZOO_DIR))
    assert total < 500_000


# -- helpers ------------------------------------------------------------------------------------
def _path(name):
    return os.path.join(ZOO_DIR, f"{name}.onnx")


@functools.lru_cache(maxsize=None)
def zoo_data(name):
    data = dict(np.load(os.path.join(ZOO_DIR, f"{name}.npz")))
    data["output"] = str(data["output"])
    return data


@functools.lru_cache(maxsize=None)
def own_gradients(name):
    """(function, initial weights, Y0, weight gradients, input gradient) from
    OnnxFunction with the default backend."""
    data = zoo_data(name)
    f = onnxfit.OnnxFunction(_path(name), output_name=data["output"], input_gradient=True)
    weights = f.initial_weights()
    Y0 = f.forward(data["X"], weights)
    grads, grad_x = f.backward(data["dY"], return_input_gradient=True)
    return f, weights, Y0, grads, grad_x


def _error(actual, expected, floor=1e-6):
    """max |actual - expected| / max |expected| (at least ``floor``)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.size == 0:
        return 0.0
    return float(np.abs(actual - expected).max() / max(floor, np.abs(expected).max()))


def _assert_close(name, what, actual, expected, tol, floors=None):
    errors = {k: _error(actual[k], expected[k], *([floors[k]] if floors else []))
              for k in expected}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, (
        f"{name}: {what} differ beyond {tol:g} (max |error| / max |reference|) "
        f"for {sorted(bad)}: " + ", ".join(f"{k}: {e:.3g}" for k, e in sorted(bad.items()))
    )


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


# -- float64 reference of the graph -------------------------------------------------------------
def _double_tensor(tensor):
    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)


def _to_double(model):
    """A copy of float32 ``model`` computing in float64."""
    double = onnx.ModelProto()
    double.CopyFrom(model)
    graph = double.graph
    for k, init in enumerate(graph.initializer):
        graph.initializer[k].CopyFrom(_double_tensor(init))
    for node in _all_nodes(graph):
        if node.op_type == "Constant" and node.attribute[0].name in ("value_float", "value_floats"):
            value = np.array(helper.get_attribute_value(node.attribute[0]), dtype=np.float64)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                attribute.t.CopyFrom(_double_tensor(attribute.t))
            elif node.op_type == "Cast" and attribute.name == "to" and (
                attribute.i == TensorProto.FLOAT
            ):
                attribute.i = TensorProto.DOUBLE
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    return double


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
        model = onnx.load(_path(name))
        inferred = onnx.shape_inference.infer_shapes(model)
        model = Extractor(inferred).extract_model([f.input_name], [data["output"]])
        graph = model.graph
        weights = set(f.weight_names)
        moved = [init for init in graph.initializer if init.name in weights]
        kept = [init for init in graph.initializer if init.name not in weights]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.input.extend(
            helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in moved)
        model = _to_double(model)
        self.input_name = f.input_name
        self.dY = data["dY"].astype(np.float64)
        serialized = model.SerializeToString()
        try:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = onnxruntime.InferenceSession(
                serialized, options, providers=["CPUExecutionProvider"])
            self.evaluator = "onnxruntime"
            self._run = lambda feeds: session.run(None, feeds)[0]
        except Exception:  # no float64 kernel for some operator
            reference = ReferenceEvaluator(model, new_ops=[Erf, Gelu])
            self.evaluator = "onnx.reference"
            self._run = lambda feeds: reference.run(None, feeds)[0]

    def __call__(self, values):
        return float(np.sum(self._run(values) * self.dY))


def finite_difference_check(name, positions=FD_POSITIONS, step=FD_STEP):
    """(own gradients, central finite differences) at up to ``positions``
    random elements of every weight and of X, keyed by weight name and 'X'."""
    data = zoo_data(name)
    f, weights, _, grads, grad_x = own_gradients(name)
    loss = Float64Loss(name)
    values = {w: v.astype(np.float64) for w, v in weights.items()}
    values[f.input_name] = data["X"].astype(np.float64)
    own = dict(grads, X=grad_x)
    rng = np.random.default_rng(sum(map(ord, name)))
    actual, expected = {}, {}
    for key, value_name in [(w, w) for w in f.weight_names] + [("X", f.input_name)]:
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


@pytest.mark.parametrize("name", TORCH_ZOO)
def test_gradients_match_torch(name):
    data = zoo_data(name)
    f, _, Y0, grads, grad_x = own_gradients(name)
    expected = {k[len("torch."):]: v for k, v in data.items()
                if k.startswith("torch.") and k not in ("torch.X", "torch.Y")}
    # Every trained weight has its torch gradient and nothing else does.
    assert sorted(expected) == sorted(f.weight_names)
    _assert_close(name, "outputs of the graph and of torch",
                  {"Y": Y0}, {"Y": data["torch.Y"]}, REFERENCE_TOL)
    _assert_close(name, "own and torch gradients", dict(grads, X=grad_x),
                  dict(expected, X=data["torch.X"]), REFERENCE_TOL)


@pytest.mark.parametrize("name", ORT1192_ZOO)
def test_gradients_match_saved_onnxruntime_training_1_19_2(name):
    f, _, _, grads, grad_x = own_gradients(name)
    expected = dict(np.load(os.path.join(ZOO_DIR, f"{name}.ort1192.npz")))
    assert sorted(expected) == sorted(f.weight_names + ["X"])
    _assert_close(name, "own and onnxruntime-training 1.19.2 gradients",
                  dict(grads, X=grad_x), expected, REFERENCE_TOL)


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
    X = data["X"]
    n = len(X)
    y = Y0.astype(np.float64) - n * data["dY"].astype(np.float64)
    est = onnxfit.OnnxSGDRegressor(
        _path(name), output_name=data["output"],
        learning_rate=onnxfit.LearningRateSGD(eta0=1.0, schedule="constant"),
        penalty=None, batch_size=n, max_iter=1, tol=None, shuffle=False, engine=engine,
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
    f, _, _, grads, grad_x = own_gradients(name)
    assert sorted(expected) == sorted(f.weight_names + ["X"])
    _assert_close(name, "the onnxfit and onnxruntime-training gradients",
                  dict(grads, X=grad_x), expected, REFERENCE_TOL)


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
