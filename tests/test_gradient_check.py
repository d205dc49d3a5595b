"""onnxfit.check_gradients: the public gradient check.

It passes on real graphs (skl2onnx and PyTorch ones from tests/zoo, a Conv
graph the float64 reference runs on onnx's reference evaluator, a graph
with two inputs), and fails -- naming the weight -- when a rule is wrong,
which proves it can fail.  Inputs it cannot invent are refused clearly, and
the user's model is left as it was.
"""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfit
from onnxfit.gradient import GradientError
from onnxfit.gradient.rules import RULES
from onnxfit.gradient_check import GradientCheck
from tests.graphs import mlp_graph

ZOO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo")


def _zoo(name):
    data = np.load(os.path.join(ZOO_DIR, f"{name}.npz"))
    return os.path.join(ZOO_DIR, f"{name}.onnx"), str(data["output"]), data["X"]


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "check", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _init(rng, name, shape):
    return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)


def conv_graph(opset=17):
    """Conv -> Tanh -> AveragePool -> Flatten -> Gemm: no float64 Conv or
    AveragePool kernel on onnxruntime's CPU, so the reference evaluator runs."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    return _model(
        [
            helper.make_node("Conv", ["X", "W", "B"], ["C"], pads=[1, 1, 1, 1]),
            helper.make_node("Tanh", ["C"], ["T"]),
            helper.make_node("AveragePool", ["T"], ["P"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["P"], ["F"]),
            helper.make_node("Gemm", ["F", "G", "H"], ["Y"], transB=1),
        ],
        [helper.make_tensor_value_info("X", f, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("Y", f, ["N", 2])],
        [_init(rng, "W", (3, 2, 3, 3)), _init(rng, "B", (3,)), _init(rng, "G", (2, 27)),
         _init(rng, "H", (2,))],
        opset=opset,
    )


def two_input_graph():
    """Y = T + E[idx], T = tanh(A @ Wa + B @ Wb): two float inputs, indices
    and two outputs."""
    rng = np.random.default_rng(1)
    f = TensorProto.FLOAT
    return _model(
        [
            helper.make_node("MatMul", ["A", "Wa"], ["AW"]),
            helper.make_node("MatMul", ["B", "Wb"], ["BW"]),
            helper.make_node("Add", ["AW", "BW"], ["S"]),
            helper.make_node("Tanh", ["S"], ["T"]),
            helper.make_node("Gather", ["E", "idx"], ["G"], axis=0),
            helper.make_node("Add", ["T", "G"], ["Y"]),
        ],
        [helper.make_tensor_value_info("A", f, ["N", 3]),
         helper.make_tensor_value_info("B", f, ["N", 2]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("Y", f, ["N", 4]),
         helper.make_tensor_value_info("T", f, ["N", 4])],
        [_init(rng, "Wa", (3, 4)), _init(rng, "Wb", (2, 4)), _init(rng, "E", (5, 4))],
    )


# -- it passes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["skl_mlp_tanh", "skl_mlp_classifier", "torch_gemm_mlp",
                                  "torch_layernorm", "torch_batchnorm", "torch_conv_maxpool"])
def test_zoo_graphs_pass(name):
    path, output, X = _zoo(name)
    result = onnxfit.check_gradients(path, X, output_name=output, random_state=0)
    assert isinstance(result, GradientCheck)
    assert result.passed, str(result)
    assert result.output_name == output and result.dtype == np.float32
    assert result.output_rel_diff < 1e-5
    # The estimators' weights: every trainable initializer, BatchNormalization's
    # running statistics excluded.
    expected = onnxfit.OnnxFunction(path, output_name=output).weight_names
    assert list(result.max_rel_error) == expected
    assert result.worst_weight in expected
    assert max(result.max_rel_error.values()) == result.max_rel_error[result.worst_weight]
    assert "PASSED" in str(result) and result.worst_weight in str(result)


def test_generated_inputs_on_a_conv_graph_use_the_reference_evaluator():
    result = onnxfit.check_gradients(conv_graph(), random_state=0, n_positions=10)
    assert result.passed, str(result)
    assert result.reference == "onnx.reference"
    assert sorted(result.max_abs_error) == ["B", "G", "H", "W"]
    assert all(len(c.positions) == min(10, int(np.prod(c.shape)))
               for c in result.weights.values())
    # The generated batch has the default size: the output's rows.
    assert result.weights["W"].gradient.shape == (10,)


def test_a_graph_with_two_inputs_given_as_a_dict():
    model = two_input_graph()
    rng = np.random.default_rng(0)
    X = {"A": rng.normal(size=(6, 3)).astype(np.float32),
         "B": rng.normal(size=(6, 2)),  # float64: cast to the input's type
         "idx": np.array([0, 4, 2, 2, 1, 3])}
    result = onnxfit.check_gradients(model, X, random_state=0, input_gradient=True)
    assert result.passed, str(result)
    assert result.output_name == "Y"
    assert sorted(result.max_rel_error) == ["A", "B", "E", "Wa", "Wb"]
    # T reads neither idx nor E: idx is not needed and E is no weight of T.
    tanh = onnxfit.check_gradients(model, {"A": X["A"], "B": X["B"]}, output_name="T",
                                   random_state=0)
    assert tanh.passed, str(tanh)
    assert sorted(tanh.max_rel_error) == ["Wa", "Wb"]
    # A float input left out is generated, with the batch the others give.
    partial = onnxfit.check_gradients(model, {"idx": X["idx"]}, random_state=1)
    assert partial.passed, str(partial)


def test_bytes_float64_graph_and_backend_names():
    model = mlp_graph(3, [5], 2, activation="Sigmoid", dtype=np.float64)
    result = onnxfit.check_gradients(model.SerializeToString(), random_state=0)
    assert result.passed, str(result)
    assert result.dtype == np.float64 and result.tolerance == 1e-6
    assert result.reference == "onnxruntime" and result.backend == "onnxfit"
    only = onnxfit.check_gradients(model, weights_to_train=["W1"], random_state=0)
    assert list(only.max_rel_error) == ["W1"]


# -- it fails -----------------------------------------------------------------------------------
def test_a_wrong_rule_fails_and_names_the_worst_weight(monkeypatch):
    path, output, X = _zoo("skl_mlp_tanh")
    right = RULES["Tanh"]

    def wrong(g, node, dys):
        # One percent off: a subtle error, far above float32 rounding.
        return [g.Mul(right(g, node, dys)[0], g.constant(1.01, like=node.output[0]))]

    monkeypatch.setitem(RULES, "Tanh", wrong)
    result = onnxfit.check_gradients(path, X, output_name=output, random_state=0)
    assert not result.passed
    # The first layer's weights reach the output through the Tanh, the last
    # layer's do not.
    assert result.worst_weight in ("coefficient", "intercepts")
    assert not result.weights[result.worst_weight].passed
    assert result.weights["coefficient1"].passed and result.weights["intercepts1"].passed
    assert 1e-3 < result.max_rel_error[result.worst_weight] < 0.1
    text = str(result)
    assert "FAILED" in text and f"{result.worst_weight} " in text and "<- worst" in text


def test_an_operator_without_a_rule_is_refused():
    f = TensorProto.FLOAT
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Z"]), helper.make_node("Atan", ["Z"], ["Y"])],
        [helper.make_tensor_value_info("X", f, ["N", 2])],
        [helper.make_tensor_value_info("Y", f, ["N", 1])],
        [numpy_helper.from_array(np.ones((2, 1), np.float32), "W")],
    )
    with pytest.raises(GradientError, match="Atan"):
        onnxfit.check_gradients(model)


# -- inputs it cannot invent ----------------------------------------------------------------------
def test_symbolic_feature_dimension_needs_X():
    model = mlp_graph(3, [4], 1)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    with pytest.raises(ValueError, match="dimension 1 \\(features\\) is symbolic.*give"):
        onnxfit.check_gradients(model)
    X = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    assert onnxfit.check_gradients(model, X, random_state=0).passed


def test_integer_inputs_must_be_given():
    with pytest.raises(ValueError, match="'idx' is int64.*give it in X"):
        onnxfit.check_gradients(two_input_graph(), {"A": np.zeros((4, 3), np.float32)})
    with pytest.raises(ValueError, match="give X as a dict"):
        onnxfit.check_gradients(two_input_graph(), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="not inputs of the graph"):
        onnxfit.check_gradients(two_input_graph(), {"C": np.zeros(3)})
    with pytest.raises(ValueError, match="must have shape"):
        onnxfit.check_gradients(mlp_graph(3, [4], 1), np.zeros((4, 2), np.float32))


def test_the_users_model_is_not_modified():
    # An opset onnxfit converts up (to 17) and a fixed batch it makes
    # symbolic: both happen to the check's copy only.
    model = conv_graph(opset=13)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    before = model.SerializeToString()
    result = onnxfit.check_gradients(model, random_state=0, n_positions=3)
    assert result.passed, str(result)
    assert model.SerializeToString() == before
    skl = onnx.load(_zoo("skl_mlp_relu")[0])
    before = skl.SerializeToString()
    onnxfit.check_gradients(skl, random_state=0, n_positions=3)
    assert skl.SerializeToString() == before
