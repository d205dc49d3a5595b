"""onnxfit.onnx_graphs: pieces, pruning, constant folding, the node writer."""

import numpy as np
import onnx
import pytest
from numpy.testing import assert_array_equal
from onnx import TensorProto, helper, numpy_helper, parser

from onnxfit.onnx_graphs import NodeWriter, prune_graph
from onnxfit.sessions import make_session


def _run(model, feeds, dtype=np.float32):
    session = make_session(model, dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def test_prune_graph_sorts_and_drops_what_no_output_needs():
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "one"], ["c"]),       # reads a, defined below
            helper.make_node("Neg", ["x"], ["a"]),
            helper.make_node("Mul", ["x", "unused_init"], ["dead"]),  # feeds no output
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "one"),
         numpy_helper.from_array(np.ones(2, np.float32), "unused_init")],
    )
    prune_graph(graph)
    assert [n.op_type for n in graph.node] == ["Neg", "Add"]
    assert [i.name for i in graph.initializer] == ["one"]
    assert [i.name for i in graph.input] == ["x"]
    cyclic = helper.make_graph(
        [helper.make_node("Neg", ["b"], ["a"]), helper.make_node("Neg", ["a"], ["b"])],
        "g", [], [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ValueError, match="cycle"):
        prune_graph(cyclic)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_cast_like_turns_typed_constants_into_constants(dtype):
    from onnxfit.onnx_graphs import fold_cast_like

    T = "float" if dtype == np.float32 else "double"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({T}[N, 3] x) => ({T}[N, 3] y, {T}[3] s) {{
        c_f = Constant<value = float {{2.5}}>()
        c = CastLike(c_f, x)
        n = Shape<start = 0, end = 1>(x)
        ones_f = ConstantOfShape<value = float[1] {{1}}>(n)
        ones = CastLike(ones_f, x)
        y = Mul(x, c)
        s = MatMul(ones, x)
    }}
    """
    model = parser.parse_model(text)
    x = np.arange(12, dtype=dtype).reshape(4, 3)
    before = _run(model, {"x": x}, dtype)
    fold_cast_like(model)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == [
        "Constant", "Shape", "ConstantOfShape", "Mul", "MatMul"]
    after = _run(model, {"x": x}, dtype)
    assert_array_equal(after["y"], before["y"])
    assert_array_equal(after["s"], before["s"])
    assert after["y"].dtype == dtype



def test_node_writer_types_names_and_reductions():
    w = NodeWriter("p.", 17, {"x": TensorProto.DOUBLE})
    half = w.constant(0.5, like="x")
    assert w.constant(0.5, like="x") == half  # written once
    y = w.Mul("x", half)
    assert w.elem_type(y) == TensorProto.DOUBLE
    assert w.elem_type(w.Shape(y)) == TensorProto.INT64
    assert w.elem_type(w.Greater(y, half)) == TensorProto.BOOL
    # ReduceMean takes its axes as an attribute before opset 18, as an input from 18
    mean17 = w.reduce("ReduceMean", y, [1], keepdims=0)
    assert [a.name for a in w.nodes[-1].attribute] == ["axes", "keepdims"]
    w18 = NodeWriter("q.", 18, {"x": TensorProto.DOUBLE})
    w18.reduce("ReduceMean", "x", [1], keepdims=0)
    assert len(w18.nodes[-1].input) == 2
    with pytest.raises(ValueError, match="static axes only"):
        w.reduce("ReduceMean", y, "axes_tensor")
    graph = helper.make_graph(
        w.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])],
        [helper.make_tensor_value_info(mean17, TensorProto.DOUBLE, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert_array_equal(_run(model, {"x": x}, np.float64)[mean17], (x * 0.5).mean(axis=1))
    assert all(n.output[0].startswith("p.") for n in w.nodes)
