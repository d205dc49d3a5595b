"""LSTM, GRU and RNN: their expansions into operators with rules.

Every configuration the expansions handle is checked three ways: the
unrolled forward pass against onnxruntime's own kernel (float32), its
gradient against float64 central finite differences of the operator (run
on onnx's reference evaluator, onnxruntime having no float64 LSTM), and
PyTorch exports of LSTM, GRU and RNN models against torch.autograd.  The
configurations the expansions refuse raise GradientError naming the node.
"""

import io

import numpy as np
import onnx
import pytest
from numpy.testing import assert_allclose
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxfit.gradient import GradientError, build_vjp, differentiable_ops
from onnxfit.gradient.rules import EXPANSIONS
from onnxfit.sessions import make_session
from tests.finite_differences import as_float32, check_gradients, node_model

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DIRECTIONS = ("forward", "reverse", "bidirectional")


def recurrent_model(op_type, seed=0, steps=3, batch=2, size=3, hidden=2, direction="forward",
                    layout=0, bias=True, initial_h=True, initial_c=True,
                    outputs=("Y", "Y_h", "Y_c"), unused=(), shapes=None, extra_inputs=(),
                    opset=17, **attributes):
    """A float64 model of one recurrent node and its feeds.

    ``unused``: outputs left out of the node (written as ""), before used
    ones; ``extra_inputs``: (position, name, value) of further inputs
    (sequence_lens, P), given as initializers.
    """
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op_type]
    state = (d, batch, hidden) if layout == 0 else (batch, d, hidden)
    inputs = [
        ("X", rng.standard_normal((steps, batch, size) if layout == 0 else (batch, steps, size))),
        ("W", rng.standard_normal((d, g * hidden, size))),
        ("R", rng.standard_normal((d, g * hidden, hidden))),
        ("B", rng.standard_normal((d, 2 * g * hidden)) if bias else None),
        ("sequence_lens", None),
        ("initial_h", rng.standard_normal(state) if initial_h else None),
    ]
    if op_type == "LSTM":
        inputs += [("initial_c", rng.standard_normal(state) if initial_c else None), ("P", None)]
    constants = {}
    for position, name, value in extra_inputs:
        inputs[position] = (name, value)
        constants[name] = value
    while inputs[-1][1] is None:
        inputs.pop()
    if op_type != "LSTM":
        outputs = tuple(o for o in outputs if o != "Y_c")
    model = node_model(op_type, inputs, outputs=outputs, constants=constants, shapes=shapes,
                       opset=opset, hidden_size=hidden, direction=direction, layout=layout, **attributes)
    feeds = {name: value for name, value in inputs
             if value is not None and name not in constants}
    node = model.graph.node[0]
    for name in unused:
        node.output[list(node.output).index(name)] = ""
    kept = [o for o in model.graph.output if o.name not in unused]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    return model, feeds


CONFIGURATIONS = []
for _op in GATES:
    for _direction in DIRECTIONS:
        for _layout in (0, 1):
            # With every optional input, then without any.
            for _full in (True, False):
                _attributes = {}
                if _op == "GRU":
                    _attributes["linear_before_reset"] = int(_full == (_layout == 0))
                CONFIGURATIONS.append(pytest.param(
                    dict(op_type=_op, direction=_direction, layout=_layout, bias=_full,
                         initial_h=_full, initial_c=_full, **_attributes),
                    id=f"{_op}-{_direction}-layout{_layout}-{'full' if _full else 'bare'}"
                       + (f"-lbr{_attributes['linear_before_reset']}" if _attributes else ""),
                ))
# Mixed optional inputs, single outputs, single steps, other activations.
for _spec, _id in [
    (dict(op_type="LSTM", initial_h=False), "LSTM-initial-c-only"),
    (dict(op_type="LSTM", initial_c=False, bias=False), "LSTM-initial-h-only"),
    (dict(op_type="LSTM", unused=("Y", "Y_h"), direction="bidirectional"), "LSTM-Y_c-only"),
    (dict(op_type="LSTM", outputs=("Y", "Y_h"), unused=("Y",), layout=1), "LSTM-Y_h-only"),
    (dict(op_type="LSTM", steps=1, direction="bidirectional"), "LSTM-one-step"),
    (dict(op_type="LSTM", steps=1, initial_h=False, initial_c=False), "LSTM-one-step-bare"),
    (dict(op_type="LSTM", hidden=4, steps=4, batch=3), "LSTM-hidden4"),
    (dict(op_type="LSTM", activations=["Sigmoid", "Tanh", "Tanh"]), "LSTM-explicit-defaults"),
    (dict(op_type="LSTM", opset=21, direction="bidirectional"), "LSTM-opset21"),
    (dict(op_type="GRU", opset=16, linear_before_reset=1, layout=1), "GRU-opset16"),
    (dict(op_type="GRU", unused=("Y",), linear_before_reset=1, initial_h=False),
     "GRU-Y_h-only-lbr1"),
    (dict(op_type="GRU", steps=1, initial_h=False), "GRU-one-step-bare-lbr0"),
    (dict(op_type="GRU", steps=4, batch=3, hidden=3, direction="bidirectional",
          linear_before_reset=1), "GRU-bidirectional-lbr1-larger"),
    (dict(op_type="RNN", activations=["Relu"]), "RNN-Relu"),
    (dict(op_type="RNN", activations=["Relu", "Tanh"], direction="bidirectional"),
     "RNN-Relu-Tanh"),
    (dict(op_type="RNN", activations=["Sigmoid"], layout=1), "RNN-Sigmoid"),
]:
    CONFIGURATIONS.append(pytest.param(_spec, id=_id))


def _unrolled_outputs(model, feeds, dtype=np.float32):
    """The node's outputs computed by the unrolled graph of its gradient."""
    outputs = [o.name for o in model.graph.output]
    gradient = build_vjp(model, {o: f"d_{o}" for o in outputs}, list(feeds))
    op_types = {n.op_type for n in gradient.model.graph.node}
    assert not op_types & set(GATES), "the recurrent node was not expanded"
    assert {n.op_type for n in model.graph.node} & set(GATES), "the user's model was changed"
    runnable = as_float32(gradient.model) if dtype == np.float32 else gradient.model
    session = make_session(runnable, dtype=dtype)
    cotangents = {f"d_{o.name}": np.zeros([d.dim_value for d in o.type.tensor_type.shape.dim],
                                          dtype) for o in model.graph.output}
    return outputs, session.run(outputs, {**{k: v.astype(dtype) for k, v in feeds.items()},
                                          **cotangents})


def _kernel_outputs(model, feeds, layout):
    """onnxruntime's float32 kernel; it runs layout 0 only, so a layout-1
    node is run as layout 0 on transposed inputs, its outputs transposed
    back."""
    outputs = [o.name for o in model.graph.output]
    model32 = as_float32(model)
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    if layout == 0:
        return make_session(model32).run(outputs, feeds)
    node = model32.graph.node[0]
    for attribute in node.attribute:
        if attribute.name == "layout":
            attribute.i = 0
    turned = {"X": (1, 0, 2), "initial_h": (1, 0, 2), "initial_c": (1, 0, 2)}
    for value in model32.graph.input:
        if value.name in turned:
            dims = value.type.tensor_type.shape.dim
            sizes = [d.dim_value for d in dims]
            for k, axis in enumerate(turned[value.name]):
                dims[k].dim_value = sizes[axis]
    del model32.graph.output[:]
    model32.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    feeds = {k: (v.transpose(turned[k]) if k in turned else v) for k, v in feeds.items()}
    results = make_session(model32).run(outputs, feeds)
    back = {"Y": (2, 0, 1, 3), "Y_h": (1, 0, 2), "Y_c": (1, 0, 2)}
    return [r.transpose(back[o]) for o, r in zip(outputs, results)]


@pytest.mark.parametrize("spec", CONFIGURATIONS)
def test_unrolled_forward_matches_onnxruntime(spec):
    model, feeds = recurrent_model(**spec)
    outputs, got = _unrolled_outputs(model, feeds)
    expected = _kernel_outputs(model, feeds, spec.get("layout", 0))
    for name, a, b in zip(outputs, got, expected):
        assert a.shape == b.shape, name
        assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)


def _reference_runs(model):
    try:
        ReferenceEvaluator(model)
    except RuntimeError:  # onnx's reference RNN knows Tanh and Affine only
        return False
    return True


def _check_against_unrolled(model, feeds, h=1e-6, rtol=1e-6):
    """Central differences of the unrolled forward pass itself (float64 on
    onnxruntime), for what neither onnxruntime (float32 only) nor onnx's
    reference evaluator runs in float64; the unrolled forward pass is
    checked against onnxruntime's kernel by the forward tests."""
    outputs = [o.name for o in model.graph.output]
    gradient = build_vjp(model, {o: f"d_{o}" for o in outputs}, list(feeds))
    session = make_session(gradient.model, dtype=np.float64)
    rng = np.random.default_rng(0)
    cotangents = {f"d_{o.name}": rng.standard_normal(
        [d.dim_value for d in o.type.tensor_type.shape.dim]) for o in model.graph.output}
    names = [gradient.gradient_names[w] for w in feeds]
    grads = dict(zip(feeds, session.run(names, {**feeds, **cotangents})))

    def objective(changed):
        results = session.run(outputs, {**feeds, **changed, **cotangents})
        return sum(float(np.sum(r * cotangents[f"d_{o}"])) for o, r in zip(outputs, results))

    for name, x in feeds.items():
        numeric = np.zeros(x.shape)
        for index in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[index] += h
            minus[index] -= h
            numeric[index] = (objective({name: plus}) - objective({name: minus})) / (2 * h)
        scale = max(1.0, float(np.abs(numeric).max()))
        error = float(np.abs(grads[name] - numeric).max()) / scale
        assert error <= rtol, f"gradient of {name!r} differs by {error:.3g}"


@pytest.mark.parametrize("spec", CONFIGURATIONS)
def test_gradient_matches_finite_differences(spec):
    model, feeds = recurrent_model(**spec)
    if not _reference_runs(model):
        _check_against_unrolled(model, feeds)
        return
    result = check_gradients(model, feeds, max_elements=24)
    assert result["forward"] == "reference"  # onnxruntime has no float64 LSTM


def test_every_expansion_has_rows():
    covered = {spec.values[0]["op_type"] for spec in CONFIGURATIONS}
    assert set(EXPANSIONS) <= covered


def test_symbolic_batch():
    model, feeds = recurrent_model("LSTM", shapes={"X": [3, "n", 3], "initial_h": [1, "n", 2],
                                                   "initial_c": [1, "n", 2]})
    check_gradients(model, feeds)
    model, feeds = recurrent_model("GRU", layout=1, initial_h=False, linear_before_reset=1,
                                   direction="bidirectional", shapes={"X": ["n", 3, 3]})
    check_gradients(model, feeds)


def test_full_sequence_lens_and_zero_peepholes_are_accepted():
    lengths = ("sequence_lens", np.full(2, 3, dtype=np.int32))
    model, feeds = recurrent_model(
        "LSTM", extra_inputs=[(4, *lengths), (7, "P", np.zeros((1, 6)))])
    check_gradients(model, feeds)


def test_recurrent_ops_are_listed():
    assert {"LSTM", "GRU", "RNN"} <= set(differentiable_ops())


def test_a_frozen_recurrent_node_is_left_alone():
    """A node off the gradient path is not expanded, so what it cannot
    expand does not matter."""
    model, feeds = recurrent_model("LSTM", outputs=("Y", "Y_h"), unused=("Y",), clip=1.0)
    graph = model.graph
    graph.node.append(helper.make_node("Mul", ["Y_h", "S"], ["Z"]))
    graph.input.append(helper.make_tensor_value_info("S", onnx.TensorProto.DOUBLE, [1]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("Z", onnx.TensorProto.DOUBLE, [1, 2, 2]))
    gradient = build_vjp(model, {"Z": "d_Z"}, ["S"])
    assert "LSTM" in {n.op_type for n in gradient.model.graph.node}
    with pytest.raises(GradientError, match="clip"):
        build_vjp(model, {"Z": "d_Z"}, ["S", "W"])


# -- refusals ----------------------------------------------------------------------------
REFUSALS = [
    pytest.param(dict(op_type="LSTM", clip=2.0), "clip", id="clip"),
    pytest.param(dict(op_type="LSTM", input_forget=1), "input_forget", id="input-forget"),
    pytest.param(dict(op_type="LSTM", activations=["Sigmoid", "Relu", "Tanh"]), "activations",
                 id="lstm-activations"),
    pytest.param(dict(op_type="GRU", activations=["HardSigmoid", "Tanh"]), "activations",
                 id="gru-activations"),
    pytest.param(dict(op_type="RNN", activations=["Affine"], activation_alpha=[2.0]),
                 "activations", id="rnn-affine"),
    pytest.param(dict(op_type="RNN", activations=["Relu"], direction="bidirectional"),
                 "activations", id="rnn-one-list-for-two-directions"),
    pytest.param(dict(op_type="LSTM", extra_inputs=[(7, "P", np.ones((1, 6)))]), "peephole",
                 id="peepholes"),
    pytest.param(dict(op_type="GRU", extra_inputs=[
        (4, "sequence_lens", np.array([3, 2], dtype=np.int32))]), "sequence_lens",
        id="sequence-lens"),
    pytest.param(dict(op_type="RNN", shapes={"X": ["t", 2, 3]}), "must be static",
                 id="symbolic-length"),
]


@pytest.mark.parametrize("spec, reason", REFUSALS)
def test_refusals_name_the_node(spec, reason):
    model, feeds = recurrent_model(**spec)
    outputs = [o.name for o in model.graph.output]
    with pytest.raises(GradientError, match=reason) as caught:
        build_vjp(model, {o: f"d_{o}" for o in outputs}, ["W", "R"])
    message = str(caught.value)
    assert f"onnxfit cannot differentiate {spec['op_type']}" in message
    assert "weights_to_train" in message and "['W', 'R']" in message


def test_run_time_sequence_lens_is_refused():
    model, feeds = recurrent_model("LSTM")
    node = model.graph.node[0]
    while len(node.input) < 5:
        node.input.append("")
    node.input[4] = "lengths"
    model.graph.input.append(helper.make_tensor_value_info("lengths", onnx.TensorProto.INT32, [2]))
    with pytest.raises(GradientError, match="sequence_lens"):
        build_vjp(model, {"Y": "dY"}, ["W"])


# -- PyTorch -------------------------------------------------------------------------------
#: ONNX gate blocks in PyTorch's order: PyTorch stacks LSTM gates as ifgo and
#: GRU gates as rzn; ONNX as iofc and zrh.
TORCH_ORDER = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}


def _torch_case(cell, batch_first, bidirectional, layers, nonlinearity=None):
    torch = pytest.importorskip("torch")

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            options = {} if nonlinearity is None else {"nonlinearity": nonlinearity}
            self.rnn = getattr(torch.nn, cell)(3, 4, num_layers=layers, batch_first=batch_first,
                                               bidirectional=bidirectional, **options)
            self.head = torch.nn.Linear(4 * (2 if bidirectional else 1), 2)

        def forward(self, x):
            y = self.rnn(x)[0]
            return self.head(y[:, -1] if batch_first else y[-1]).log_softmax(-1)

    torch.manual_seed(0)
    net = Classifier()
    x = torch.randn((3, 4, 3) if batch_first else (4, 3, 3))
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False, input_names=["X"], output_names=["Y"],
                      dynamic_axes={"X": {0 if batch_first else 1: "batch"}})
    return torch, net, x, buffer.getvalue()


TORCH_CASES = [
    pytest.param("LSTM", False, False, 1, None, id="lstm"),
    pytest.param("LSTM", True, True, 2, None, id="lstm-batch-first-bidirectional-2-layers"),
    pytest.param("GRU", False, True, 1, None, id="gru-bidirectional"),
    pytest.param("GRU", True, False, 2, None, id="gru-batch-first-2-layers"),
    pytest.param("RNN", True, True, 2, "tanh", id="rnn-tanh-bidirectional-2-layers"),
    pytest.param("RNN", False, False, 1, "relu", id="rnn-relu"),
]


@pytest.mark.parametrize("cell, batch_first, bidirectional, layers, nonlinearity", TORCH_CASES)
def test_matches_torch_autograd(cell, batch_first, bidirectional, layers, nonlinearity):
    torch, net, x, onnx_bytes = _torch_case(cell, batch_first, bidirectional, layers,
                                            nonlinearity)
    X = x.numpy()
    dY = np.random.default_rng(1).standard_normal(net(x).shape).astype(np.float32)
    model = onnx.load_from_string(onnx_bytes)
    if batch_first:
        from onnxfit import OnnxFunction

        function = OnnxFunction(onnx_bytes, output_name="Y", input_gradient=True, n_threads=1)
        weights = function.initial_weights()
        y = function.forward(X, weights)
        grads, dX = function.backward(dY, return_input_gradient=True)
    else:
        # onnxfit's OnnxFunction and estimators take the first axis as the
        # batch: a time-major graph is differentiated as exported.
        wrt = ["X"] + [i.name for i in model.graph.initializer
                       if i.data_type == onnx.TensorProto.FLOAT]
        gradient = build_vjp(model, {"Y": "dY"}, wrt)
        names = [gradient.gradient_names[w] for w in wrt]
        y, *values = make_session(gradient.model).run(["Y"] + names, {"X": X, "dY": dY})
        grads = dict(zip(wrt, values))
        dX = grads["X"]
    assert_allclose(y, net(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    x.requires_grad_(True)
    net.zero_grad()
    (net(x) * torch.from_numpy(dY)).sum().backward()

    def close(got, want, what):
        scale = max(1.0, float(np.abs(want).max()))
        error = float(np.abs(got - want).max()) / scale
        assert error <= 1e-4, f"{what}: {error:.3g}"

    close(dX, x.grad.numpy(), "dX")
    close(grads["head.weight"], net.head.weight.grad.numpy(), "head.weight")
    nodes = [n for n in model.graph.node if n.op_type == cell]
    assert len(nodes) == layers
    hidden = 4
    for layer, node in enumerate(nodes):
        w, r, b = node.input[1:4]
        for d, suffix in enumerate(["", "_reverse"][:2 if bidirectional else 1]):
            def onnx_order(tensor):
                blocks = tensor.reshape(len(TORCH_ORDER[cell]), hidden, *tensor.shape[1:])
                return blocks[TORCH_ORDER[cell]].reshape(tensor.shape)

            params = {k: v.grad.numpy() for k, v in net.rnn.named_parameters()}
            name = f"l{layer}{suffix}"
            close(grads[w][d], onnx_order(params[f"weight_ih_{name}"]), f"W {name}")
            close(grads[r][d], onnx_order(params[f"weight_hh_{name}"]), f"R {name}")
            bias = np.concatenate([onnx_order(params[f"bias_ih_{name}"]),
                                   onnx_order(params[f"bias_hh_{name}"])])
            close(grads[b][d], bias, f"B {name}")


def test_onnx_names_its_initializers_as_expected():
    """The PyTorch comparison reads W, R, B from the node's inputs: they are
    initializers of the exported graph."""
    _, _, _, onnx_bytes = _torch_case("GRU", False, False, 1)
    model = onnx.load_from_string(onnx_bytes)
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "GRU")
    assert all(name in initializers for name in node.input[1:4])
