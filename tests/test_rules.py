"""Every gradient rule against float64 central finite differences.

One row per operator configuration: broadcasting, every attribute variant
the rule handles, opset variants (axes as an attribute or an input).  A
failure names the operator (see tests/finite_differences.py).  The last
tests check that the table covers every registered rule and the rules that
cannot be checked by finite differences (random Dropout).
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from onnxfit.gradient import GradientError, build_vjp, differentiable_ops
from onnxfit.gradient.rules.registry import EXPANSIONS
from onnxfit.sessions import make_session, onnxruntime_version
from tests.finite_differences import check_gradients, node_model

rng = np.random.default_rng(20261129)


def normal(*shape):
    return np.asarray(rng.standard_normal(shape))


def apart(*shape, low=0.2):
    """Values at least ``low`` away from 0 (the kink of Relu, Abs, ...)."""
    return np.asarray(rng.uniform(low, 2.0, shape) * rng.choice([-1.0, 1.0], shape))


def positive(*shape):
    return np.asarray(rng.uniform(0.5, 2.0, shape))


def distinct(*shape):
    """Values far apart from each other (no ties for Max, MaxPool, ...)."""
    n = int(np.prod(shape))
    return rng.permutation(np.linspace(-2.0, 2.0, n)).reshape(shape)


def ints(*values):
    return np.array(values, dtype=np.int64)


CASES = []


#: Operators linear in each input: their float32 gradients on onnxruntime are
#: also checked against finite differences of onnxruntime's own forward pass,
#: which are exact for them (AveragePool's divisor in ceil mode changed
#: between onnxruntime releases: the rule follows the runtime it runs on).
LINEAR = {"Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool"}


def case(op_type, inputs, id, constants=None, wrt=None, opset=17, outputs=("Y",),
         shapes=None, rtol=1e-6, h=1e-6, refused_before=None, **attributes):
    """A row of the table: ``inputs`` as (name, array) pairs, in node order.

    ``refused_before``: an onnxruntime version before which the rule refuses
    the configuration (the runtime's forward pass is wrong there).
    """
    CASES.append(pytest.param(
        dict(op_type=op_type, inputs=inputs, constants=constants or {}, wrt=wrt, opset=opset,
             outputs=outputs, shapes=shapes, rtol=rtol, h=h, attributes=attributes,
             linear=op_type in LINEAR, refused_before=refused_before),
        id=f"{op_type}-{id}",
    ))


# -- arithmetic with broadcasting ---------------------------------------------------------
BROADCASTS = [
    ("same", (3, 4), (3, 4)), ("row", (3, 4), (4,)), ("column", (3, 1), (1, 4)),
    ("rank3", (2, 3, 4), (3, 1)), ("scalar", (3, 4), ()),
]
for name, sa, sb in BROADCASTS:
    case("Add", [("A", normal(*sa)), ("B", normal(*sb))], name)
    case("Sub", [("A", normal(*sa)), ("B", normal(*sb))], name)
    case("Mul", [("A", normal(*sa)), ("B", normal(*sb))], name)
    case("Div", [("A", normal(*sa)), ("B", apart(*sb, low=0.5))], name)
case("Add", [("A", normal(3, 4)), ("B", normal(1, 4))], "symbolic",
     shapes={"A": ["n", 4], "B": ["m", 4]})
case("Mul", [("A", normal(1, 4)), ("B", normal(3, 4))], "symbolic-first",
     shapes={"A": ["n", 4], "B": ["m", 4]})
case("Pow", [("A", positive(3, 4)), ("B", normal(3, 4))], "tensor-exponent")
case("Pow", [("A", positive(3, 4)), ("B", normal(4))], "broadcast-exponent")
case("Pow", [("A", normal(3, 4)), ("B", np.array(2.0))], "square", constants={"B": np.array(2.0)})
case("Pow", [("A", positive(3, 4)), ("B", np.array(-1.5))], "constant", constants={"B": np.array(-1.5)})
case("Pow", [("A", positive(3, 4)), ("B", np.array(3, dtype=np.int64))], "int-exponent",
     constants={"B": np.array(3, dtype=np.int64)})
case("Pow", [("A", np.array([[0.0, 0.5, -1.5]])), ("B", np.array(0.0))], "zero-exponent",
     constants={"B": np.array(0.0)})
case("Neg", [("X", normal(3, 4))], "plain")
case("Abs", [("X", apart(3, 4))], "plain")
case("Sqrt", [("X", positive(3, 4))], "plain")
case("Reciprocal", [("X", apart(3, 4, low=0.5))], "plain")
case("Exp", [("X", normal(3, 4))], "plain")
case("Log", [("X", positive(3, 4))], "plain")
case("Sin", [("X", normal(3, 4))], "plain")
case("Cos", [("X", normal(3, 4))], "plain")
case("Erf", [("X", normal(3, 4))], "plain")

# -- activations -----------------------------------------------------------------------------
case("Relu", [("X", apart(3, 4))], "plain")
case("LeakyRelu", [("X", apart(3, 4))], "alpha", alpha=0.3)
case("LeakyRelu", [("X", apart(3, 4))], "default")
case("PRelu", [("X", apart(2, 3, 4)), ("S", normal(3, 1))], "per-channel")
case("PRelu", [("X", apart(3, 4)), ("S", normal(4))], "per-feature")
case("Elu", [("X", apart(3, 4))], "alpha", alpha=0.7)
case("Celu", [("X", apart(3, 4))], "alpha", alpha=1.5)
case("Selu", [("X", apart(3, 4))], "default")
case("Selu", [("X", apart(3, 4))], "custom", alpha=1.2, gamma=0.9)
case("Sigmoid", [("X", normal(3, 4))], "plain")
case("HardSigmoid", [("X", apart(3, 4) * 2)], "custom", alpha=0.4, beta=0.3)
case("HardSigmoid", [("X", rng.uniform(-4, 4, (3, 4)))], "default")
case("HardSwish", [("X", np.array([[-4.0, -2.0, -0.5, 0.7], [1.5, 2.9, 3.5, -3.2]]))], "regions")
case("Tanh", [("X", normal(3, 4))], "plain")
case("Softplus", [("X", normal(3, 4) * 3)], "plain")
case("Softsign", [("X", normal(3, 4))], "plain")
case("Gelu", [("X", normal(3, 4))], "exact", opset=20)
case("Gelu", [("X", normal(3, 4))], "tanh", opset=20, approximate="tanh")
case("Softmax", [("X", normal(2, 3, 4))], "last")
case("Softmax", [("X", normal(2, 3, 4))], "axis1", axis=1)
case("Softmax", [("X", normal(2, 3, 4))], "axis0", axis=0)
case("LogSoftmax", [("X", normal(2, 3, 4))], "last")
case("LogSoftmax", [("X", normal(2, 3, 4))], "axis-2", axis=-2)

# -- selections ----------------------------------------------------------------------------------
case("Max", [("A", distinct(3, 4)), ("B", distinct(3, 4) + 0.01)], "two")
case("Max", [("A", distinct(3, 4)), ("B", distinct(4) + 0.013), ("C", distinct(3, 1) + 0.017)],
     "broadcast3")
case("Min", [("A", distinct(3, 4)), ("B", distinct(3, 4) + 0.01)], "two")
case("Min", [("A", distinct(2, 3))], "one")
case("Clip", [("X", np.linspace(-2, 2, 12).reshape(3, 4) + 0.05), ("lo", np.array(-1.0)),
              ("hi", np.array(1.0))], "both", wrt=["X", "lo", "hi"])
case("Clip", [("X", np.linspace(-2, 2, 12).reshape(3, 4) + 0.05), ("lo", np.array(-0.5))],
     "min-only", wrt=["X", "lo"])
case("Clip", [("X", np.linspace(-2, 2, 12).reshape(3, 4) + 0.05), ("lo", None),
              ("hi", np.array(0.5))], "max-only", wrt=["X", "hi"])
case("Clip", [("X", normal(3, 4))], "no-bounds")
case("Clip", [("X", np.linspace(-2, 2, 12).reshape(3, 4) + 0.05), ("lo", np.array(1.0)),
              ("hi", np.array(-1.0))], "low-above-high", wrt=["X", "lo", "hi"])
case("Where", [("C", rng.random((3, 4)) > 0.5), ("A", normal(3, 4)), ("B", normal(4))],
     "broadcast", constants={"C": rng.random((3, 4)) > 0.5})
case("Sum", [("A", normal(3, 4)), ("B", normal(4)), ("C", normal(3, 1))], "three")
case("Mean", [("A", normal(3, 4)), ("B", normal(4)), ("C", normal(3, 1))], "three")

# -- identities and casts ------------------------------------------------------------------------
case("Identity", [("X", normal(3, 4))], "plain")
case("Dropout", [("X", normal(3, 4))], "inference")
case("Dropout", [("X", normal(3, 4)), ("r", np.array(0.3)), ("t", np.array(False))],
     "training-false", constants={"r": np.array(0.3), "t": np.array(False)}, opset=16)
# A float32 output: a large step (Cast is linear) keeps rounding out of the differences.
case("Cast", [("X", normal(3, 4))], "to-float32", to=1, h=0.25, rtol=1e-6)
case("CastLike", [("X", normal(3, 4)), ("T", np.zeros(1, np.float32))], "to-float32",
     constants={"T": np.zeros(1, np.float32)}, h=0.25, rtol=1e-6)

# -- linear algebra -------------------------------------------------------------------------------
for ta in (0, 1):
    for tb in (0, 1):
        A = normal(4, 3) if ta else normal(3, 4)
        B = normal(5, 4) if tb else normal(4, 5)
        case("Gemm", [("A", A), ("B", B), ("C", normal(3, 5))], f"tA{ta}-tB{tb}",
             transA=ta, transB=tb, alpha=0.7, beta=1.3)
for name, shape in [("row", (5,)), ("row2d", (1, 5)), ("column", (3, 1)), ("scalar", ())]:
    case("Gemm", [("A", normal(3, 4)), ("B", normal(5, 4)), ("C", normal(*shape))],
         f"C-{name}", transB=1)
case("Gemm", [("A", normal(3, 4)), ("B", normal(4, 5))], "no-C")
case("Gemm", [("A", normal(3, 4)), ("B", normal(4, 20)), ("C", normal(20))], "wide-bias")
MATMULS = [
    ("2x2", (3, 4), (4, 5)), ("3x3", (2, 3, 4), (2, 4, 5)), ("3x2", (2, 3, 4), (4, 5)),
    ("2x3", (3, 4), (2, 4, 5)), ("1x2", (4,), (4, 5)), ("2x1", (3, 4), (4,)), ("1x1", (4,), (4,)),
    ("1x3", (4,), (2, 4, 5)), ("3x1", (2, 3, 4), (4,)), ("4x4-broadcast", (2, 1, 3, 4), (1, 3, 4, 5)),
]
for name, sa, sb in MATMULS:
    case("MatMul", [("A", normal(*sa)), ("B", normal(*sb))], name)
case("MatMul", [("A", normal(3, 4)), ("B", normal(4, 20))], "symbolic-batch",
     shapes={"A": ["n", 4]})
case("MatMul", [("A", normal(2, 3, 4)), ("B", normal(1, 4, 5))], "symbolic-broadcast",
     shapes={"A": ["b", 3, 4], "B": ["c", 4, 5]})

EINSUMS = [
    ("matmul", "ij,jk->ik", [(3, 4), (4, 5)]),
    ("batched-matmul", "bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("bilinear", "bi,ij,bj->b", [(3, 4), (4, 5), (3, 5)]),
    ("chain3", "ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),
    ("ellipsis", "...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),
    ("ellipsis-broadcast", "...ij,...jk->...ik", [(2, 1, 3, 4), (1, 3, 4, 5)]),
    ("ellipsis-last", "i...->...i", [(2, 3, 4)]),
    ("transpose", "ij->ji", [(3, 4)]),
    ("sum-over-index", "ij->i", [(3, 4)]),
    ("sum-all", "ij->", [(3, 4)]),
    ("only-in-one-operand", "ij,k->ik", [(3, 4), (5,)]),
    ("outer", "i,j->ij", [(3,), (4,)]),
    ("implicit", "ij,jk", [(3, 4), (4, 5)]),
    ("implicit-dot", "i,i", [(4,), (4,)]),
    ("implicit-transposed", "ba", [(3, 4)]),
    ("attention-scores", "bhqd,bhkd->bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)]),
    ("diagonal-other-operand", "ii,ij->j", [(3, 3), (3, 4)]),
]
for name, equation, shapes in EINSUMS:
    operands = [(chr(ord("A") + k), normal(*shape)) for k, shape in enumerate(shapes)]
    wrt = [n for n, _ in operands][1:] if name == "diagonal-other-operand" else None
    case("Einsum", operands, name, equation=equation, wrt=wrt)
case("Einsum", [("A", normal(2, 3, 4)), ("B", normal(4, 5))], "symbolic",
     shapes={"A": ["n", 3, 4]}, equation="bij,jk->bik")
case("Einsum", [("A", normal(2, 3, 4)), ("B", normal(1, 4, 5))], "symbolic-ellipsis-broadcast",
     shapes={"A": ["n", 3, 4], "B": ["m", 4, 5]}, equation="...ij,...jk->...ik")
case("Trilu", [("X", normal(2, 4, 5))], "upper")
case("Trilu", [("X", normal(4, 5)), ("k", np.array(-1, np.int64))], "lower-k",
     constants={"k": np.array(-1, np.int64)}, upper=0)

# -- reductions ---------------------------------------------------------------------------------------
REDUCTIONS = ["ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceMax", "ReduceMin"]
for op in REDUCTIONS:
    x = distinct(2, 3, 4) if op in ("ReduceMax", "ReduceMin") else (
        apart(2, 3, 4) if op == "ReduceL1" else normal(2, 3, 4))
    axes_input = 16 if op == "ReduceSum" else 18
    # axes as an attribute (opset 17, ReduceSum before 13) and as an input
    if op != "ReduceSum":  # its axes are an input from opset 13, onnxfit's floor
        case(op, [("X", x)], "axes-attr", axes=[1], keepdims=0)
        case(op, [("X", x)], "axes-attr-keep", axes=[0, 2], keepdims=1)
    case(op, [("X", x), ("axes", ints(-1, 0))], "axes-input", opset=axes_input,
         constants={"axes": ints(-1, 0)}, keepdims=0)
    case(op, [("X", x), ("axes", ints(1))], "axes-input-keep", opset=axes_input,
         constants={"axes": ints(1)})
    case(op, [("X", x)], "all", opset=axes_input, keepdims=0)
case("ReduceSum", [("X", normal(2, 3)), ("axes", ints())], "noop", opset=16,
     constants={"axes": ints()}, noop_with_empty_axes=1)
for op in REDUCTIONS:  # axes computed at run time (a graph input), empty or not
    x = distinct(2, 3) if op in ("ReduceMax", "ReduceMin") else (
        apart(2, 3) if op == "ReduceL1" else normal(2, 3))
    case(op, [("X", x), ("axes", ints())], "run-time-empty-noop", opset=18,
         noop_with_empty_axes=1,
         refused_before=(1, 24) if op in ("ReduceSumSquare", "ReduceL1") else None)
    case(op, [("X", x), ("axes", ints(-1))], "run-time-axes", opset=18, keepdims=0)
case("ReduceMean", [("X", normal(3, 4))], "symbolic", opset=18, shapes={"X": ["n", 4]},
     keepdims=0)

# -- moving elements ---------------------------------------------------------------------------------
case("Reshape", [("X", normal(2, 3, 4)), ("s", ints(6, -1))], "plain", constants={"s": ints(6, -1)})
case("Flatten", [("X", normal(2, 3, 4))], "axis2", axis=2)
case("Squeeze", [("X", normal(2, 1, 4)), ("a", ints(1))], "input", constants={"a": ints(1)})
case("Unsqueeze", [("X", normal(2, 4)), ("a", ints(0, 3))], "input", constants={"a": ints(0, 3)})
case("Transpose", [("X", normal(2, 3, 4))], "perm", perm=[2, 0, 1])
case("Transpose", [("X", normal(2, 3, 4))], "default")
case("Expand", [("X", normal(3, 1)), ("s", ints(2, 3, 4))], "plain", constants={"s": ints(2, 3, 4)})
case("Tile", [("X", normal(2, 3)), ("r", ints(2, 3))], "plain", constants={"r": ints(2, 3)})
case("Concat", [("A", normal(2, 3)), ("B", normal(2, 1)), ("C", normal(2, 4))], "axis1", axis=1)
case("Concat", [("A", normal(2, 3)), ("B", normal(1, 3))], "axis-neg", axis=-2)
case("Concat", [("A", normal(2, 3)), ("B", normal(2, 3))], "symbolic", axis=0,
     shapes={"A": ["n", 3], "B": ["m", 3]})
case("Split", [("X", normal(2, 6)), ("s", ints(1, 2, 3))], "sizes", outputs=("Y0", "Y1", "Y2"),
     constants={"s": ints(1, 2, 3)}, axis=1)
case("Split", [("X", normal(6, 2))], "equal", outputs=("Y0", "Y1"), opset=16)
case("Split", [("X", normal(2, 7))], "num-outputs", outputs=("Y0", "Y1", "Y2"), opset=18,
     axis=1, num_outputs=3)
SLICES = [
    ("simple", ints(1), ints(3), ints(1), None),
    ("steps", ints(0, 4), ints(2, 0), ints(0, 1), ints(1, -2)),
    ("negative", ints(-2), ints(100), ints(-1), None),
    ("step2", ints(0), ints(5), ints(1), ints(2)),
]
for name, starts, ends, axes, steps in SLICES:
    inputs = [("X", normal(3, 5)), ("s", starts), ("e", ends), ("a", axes)]
    constants = {"s": starts, "e": ends, "a": axes}
    if steps is not None:
        inputs.append(("p", steps))
        constants["p"] = steps
    case("Slice", inputs, name, constants=constants)
case("Slice", [("X", normal(3, 5)), ("s", ints(1)), ("e", ints(3)), ("a", ints(1))], "symbolic",
     constants={"s": ints(1), "e": ints(3), "a": ints(1)}, shapes={"X": ["n", 5]})
case("Gather", [("X", normal(5, 3)), ("i", ints(0, 2, 2, -1))], "axis0-duplicates",
     constants={"i": ints(0, 2, 2, -1)})
case("Gather", [("X", normal(2, 5, 3)), ("i", np.array([[1, 4], [0, 1]], np.int64))],
     "axis1-2d", constants={"i": np.array([[1, 4], [0, 1]], np.int64)}, axis=1)
case("Gather", [("X", normal(4, 3)), ("i", np.array(2, np.int64))], "scalar",
     constants={"i": np.array(2, np.int64)})
EMBEDDING_IDS = np.array([[0, 5, -1, 2], [5, 0, 0, -6]], np.int64)  # 5 = -1, 0 = -6
case("Gather", [("X", normal(6, 4)), ("i", EMBEDDING_IDS)], "embedding-repeated-negative",
     constants={"i": EMBEDDING_IDS})
case("Gather", [("X", normal(3, 6)), ("i", EMBEDDING_IDS)], "last-axis-repeated-negative",
     constants={"i": EMBEDDING_IDS}, axis=-1)
case("Gather", [("X", normal(2, 6, 3)), ("i", EMBEDDING_IDS)], "run-time-indices", axis=1)
case("Gather", [("X", normal(6, 3)), ("i", EMBEDDING_IDS.astype(np.int32))], "run-time-int32")
case("Gather", [("X", normal(4, 6)), ("i", EMBEDDING_IDS)], "symbolic",
     constants={"i": EMBEDDING_IDS}, shapes={"X": ["n", 6]}, axis=1)
case("Gather", [("X", normal(4, 6, 2)), ("i", EMBEDDING_IDS)], "symbolic-run-time",
     shapes={"X": ["n", 6, "m"], "i": ["b", "l"]}, axis=1)
case("GatherElements", [("X", normal(3, 4)), ("i", np.array([[0, 2], [1, 1], [3, 0]], np.int64))],
     "axis1", constants={"i": np.array([[0, 2], [1, 1], [3, 0]], np.int64)}, axis=1)
case("GatherElements", [("X", normal(3, 4)), ("i", np.array([[0, 2, 2, 1]], np.int64))],
     "axis0-duplicates", constants={"i": np.array([[0, 2, 2, 1]], np.int64)}, axis=0)
case("GatherND", [("X", normal(3, 4)), ("i", np.array([[0, 1], [2, 3], [0, 1]], np.int64))],
     "pairs", constants={"i": np.array([[0, 1], [2, 3], [0, 1]], np.int64)})
case("Compress", [("X", normal(4, 3)), ("c", np.array([True, False, True, True]))], "axis0",
     constants={"c": np.array([True, False, True, True])}, axis=0)
case("TopK", [("X", distinct(3, 5)), ("k", ints(2))], "last", outputs=("V", "I"),
     constants={"k": ints(2)})
for mode, pads in [("constant", ints(0, 1, 2, 0)), ("constant", ints(1, -1, 0, 2)),
                   ("reflect", ints(1, 2, 1, 1)), ("edge", ints(0, 2, 1, 3))]:
    case("Pad", [("X", normal(3, 4)), ("p", pads)], f"{mode}-{'-'.join(map(str, pads))}",
         constants={"p": pads}, mode=mode)
case("Pad", [("X", normal(3, 4)), ("p", ints(1, 2)), ("v", None), ("a", ints(1))], "axes",
     opset=18, constants={"p": ints(1, 2), "a": ints(1)})
case("Pad", [("X", normal(3, 4)), ("p", ints(0, 1, 2, 0))], "symbolic",
     constants={"p": ints(0, 1, 2, 0)}, shapes={"X": ["n", 4]})

# -- convolutions and pooling -----------------------------------------------------------------------
CONVS = [
    ("2d", (2, 3, 5, 5), (4, 3, 3, 3), {}),
    ("2d-stride2-pads", (2, 3, 6, 7), (4, 3, 3, 3), dict(strides=[2, 2], pads=[1, 0, 1, 2])),
    ("2d-stride-undivided", (1, 2, 8, 7), (3, 2, 3, 2), dict(strides=[3, 2])),
    ("2d-dilations", (1, 2, 7, 7), (2, 2, 2, 3), dict(dilations=[2, 1], pads=[1, 1, 1, 1])),
    ("2d-groups", (2, 4, 5, 5), (6, 2, 3, 3), dict(group=2, strides=[2, 1])),
    ("2d-depthwise", (2, 3, 5, 4), (3, 1, 3, 3), dict(group=3, pads=[1, 1, 1, 1])),
    ("2d-same-upper", (1, 2, 5, 6), (2, 2, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ("2d-same-lower", (1, 2, 6, 5), (2, 2, 2, 3), dict(auto_pad="SAME_LOWER")),
    ("2d-valid", (1, 2, 5, 5), (2, 2, 3, 3), dict(auto_pad="VALID", strides=[2, 2])),
    ("1d", (2, 3, 9), (4, 3, 3), dict(strides=[2], pads=[1, 1])),
    ("1d-groups-dilations", (2, 4, 10), (4, 2, 3), dict(group=2, dilations=[2])),
]
for name, sx, sw, attributes in CONVS:
    case("Conv", [("X", normal(*sx)), ("W", normal(*sw)), ("B", normal(sw[0]))], name,
         **attributes)
case("Conv", [("X", normal(2, 2, 5, 5)), ("W", normal(3, 2, 3, 3))], "no-bias")
case("Conv", [("X", normal(2, 2, 6, 5)), ("W", normal(3, 2, 3, 3)), ("B", normal(3))],
     "symbolic", shapes={"X": ["n", 2, "h", "w"]}, strides=[2, 2], pads=[1, 0, 0, 1])
case("Conv", [("X", normal(2, 2, 5, 6)), ("W", normal(3, 2, 3, 3)), ("B", normal(3))],
     "symbolic-batch-same", shapes={"X": ["n", 2, 5, 6]}, strides=[2, 2], auto_pad="SAME_UPPER")
TRANSPOSED = [
    ("2d", (2, 3, 4, 4), (3, 2, 3, 3), {}),
    ("2d-stride-pads", (1, 3, 3, 4), (3, 2, 3, 2), dict(strides=[2, 2], pads=[1, 0, 0, 1])),
    ("2d-output-padding", (1, 2, 3, 3), (2, 2, 3, 3), dict(strides=[2, 2], output_padding=[1, 0])),
    ("2d-groups-dilations", (1, 4, 3, 3), (4, 1, 2, 2), dict(group=2, dilations=[2, 1])),
    ("1d", (2, 3, 5), (3, 2, 3), dict(strides=[3])),
    ("2d-output-shape", (1, 2, 3, 3), (2, 2, 3, 3), dict(strides=[2, 2], output_shape=[6, 6])),
    ("2d-same-upper", (1, 2, 3, 4), (2, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    ("2d-same-lower", (1, 2, 3, 3), (2, 2, 2, 2), dict(strides=[2, 2], auto_pad="SAME_LOWER")),
]
for name, sx, sw, attributes in TRANSPOSED:
    case("ConvTranspose", [("X", normal(*sx)), ("W", normal(*sw)), ("B", normal(sw[1] * attributes.get("group", 1)))],
         name, **attributes)
# Symbolic spatial sizes: the weight gradient's Conv then gets one zero tap
# more (an input empty along an axis would leave onnxruntime's Conv an empty
# kernel); the gradient must not change.
case("ConvTranspose", [("X", normal(2, 2, 3, 4)), ("W", normal(2, 3, 2, 2)), ("B", normal(3))],
     "symbolic", shapes={"X": ["n", 2, "h", "w"]}, strides=[2, 1])
case("ConvTranspose", [("X", normal(1, 1, 2, 3, 2)), ("W", normal(1, 2, 2, 1, 2)),
                       ("B", normal(2))],
     "3d-symbolic", shapes={"X": ["n", 1, "a", "b", "c"]}, strides=[1, 2, 1])
POOLS = [
    ("2x2", (2, 2, 4, 4), dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("overlap", (1, 2, 5, 5), dict(kernel_shape=[3, 3])),
    ("pads", (1, 2, 5, 4), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 1, 1, 0])),
    ("ceil", (1, 1, 5, 6), dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ("1d", (2, 3, 7), dict(kernel_shape=[3], strides=[2])),
    ("same-upper", (1, 2, 5, 5), dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
]
for name, sx, attributes in POOLS:
    case("MaxPool", [("X", distinct(*sx))], name, **attributes)
    case("AveragePool", [("X", normal(*sx))], name, **attributes)
case("MaxPool", [("X", distinct(1, 2, 6, 6))], "dilations", kernel_shape=[2, 2], dilations=[2, 2])
case("MaxPool", [("X", distinct(1, 2, 4, 4))], "indices-output", outputs=("Y", "I"),
     kernel_shape=[2, 2])
case("MaxPool", [("X", distinct(1, 2, 4, 5))], "storage-order", kernel_shape=[2, 2],
     storage_order=1)
for include in (0, 1):
    case("AveragePool", [("X", normal(1, 2, 5, 5))], f"count-include-pad{include}",
         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=include)
    case("AveragePool", [("X", normal(1, 1, 6, 5))], f"ceil-pads-include{include}",
         kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1,
         count_include_pad=include)
case("AveragePool", [("X", normal(1, 2, 7, 7))], "dilations", opset=19, kernel_shape=[2, 2],
     dilations=[2, 2])
case("AveragePool", [("X", normal(2, 2, 4, 6))], "symbolic", shapes={"X": ["n", 2, "h", "w"]},
     kernel_shape=[2, 2], strides=[2, 2])
case("AveragePool", [("X", normal(1, 1, 3, 4, 5))], "3d-symbolic",
     shapes={"X": ["n", 1, "a", "b", "c"]}, kernel_shape=[2, 3, 2], strides=[1, 2, 2])
case("AveragePool", [("X", normal(2, 2, 5, 6))], "symbolic-batch-same",
     shapes={"X": ["n", 2, 5, 6]}, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")
case("MaxPool", [("X", distinct(2, 2, 5, 6))], "symbolic-batch-same",
     shapes={"X": ["n", 2, 5, 6]}, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
case("GlobalAveragePool", [("X", normal(2, 3, 4, 5))], "2d")
case("GlobalAveragePool", [("X", normal(2, 3, 6))], "symbolic", shapes={"X": ["n", 3, "l"]})
case("GlobalMaxPool", [("X", distinct(2, 3, 4, 5))], "2d")

# -- normalization ------------------------------------------------------------------------------------
case("BatchNormalization", [("X", normal(2, 3, 4, 4)), ("s", normal(3)), ("b", normal(3)),
                            ("m", normal(3)), ("v", positive(3))], "4d", epsilon=1e-3)
case("BatchNormalization", [("X", normal(5, 3)), ("s", normal(3)), ("b", normal(3)),
                            ("m", normal(3)), ("v", positive(3))], "2d")
case("LayerNormalization", [("X", normal(2, 3, 5)), ("s", normal(5)), ("b", normal(5))], "last")
case("LayerNormalization", [("X", normal(2, 3, 4)), ("s", normal(3, 4)), ("b", normal(3, 4))],
     "axis1", axis=1, epsilon=1e-3)
case("LayerNormalization", [("X", normal(4, 6)), ("s", normal(6))], "no-bias")


# -- losses a graph carries ----------------------------------------------------------------------
_TARGETS = ints(0, 2, 1, 2)
_TARGETS_3D = np.array([[0, 2, 1], [1, 1, 0]], dtype=np.int64)
for _op, _scores in (("SoftmaxCrossEntropyLoss", normal(4, 3)), ("NegativeLogLikelihoodLoss",
                                                                 normal(4, 3))):
    for _reduction in ("mean", "sum", "none"):
        case(_op, [("S", _scores), ("t", _TARGETS)], f"{_reduction}",
             constants={"t": _TARGETS}, reduction=_reduction)
    case(_op, [("S", _scores), ("t", _TARGETS), ("w", positive(3))], "weighted-mean",
         constants={"t": _TARGETS, "w": positive(3)})
    case(_op, [("S", _scores), ("t", ints(0, -1, 1, 2))], "ignore-index-mean",
         constants={"t": ints(0, -1, 1, 2)}, ignore_index=-1)
    case(_op, [("S", normal(2, 3, 3)), ("t", _TARGETS_3D), ("w", positive(3))],
         "3d-weighted-ignore-sum", constants={"t": _TARGETS_3D, "w": positive(3)},
         reduction="sum", ignore_index=1)
case("SoftmaxCrossEntropyLoss", [("S", normal(4, 3)), ("t", _TARGETS)], "log-prob-output",
     constants={"t": _TARGETS}, outputs=("Y", "log_prob"))
case("SoftmaxCrossEntropyLoss", [("S", normal(4, 3)), ("t", _TARGETS)], "symbolic",
     constants={"t": _TARGETS}, shapes={"S": ["n", "c"]})


@pytest.mark.parametrize("spec", CASES)
def test_rule_matches_finite_differences(spec):
    inputs = spec["inputs"]
    model = node_model(spec["op_type"], inputs, outputs=spec["outputs"], opset=spec["opset"],
                       constants=spec["constants"], shapes=spec["shapes"], **spec["attributes"])
    feeds = {name: value for name, value in inputs
             if value is not None and name not in spec["constants"]}
    if spec["refused_before"] and onnxruntime_version()[:2] < spec["refused_before"]:
        with pytest.raises(GradientError, match="upgrade onnxruntime"):
            build_vjp(model, {o: f"d_{o}" for o in spec["outputs"]}, list(feeds))
        return
    check_gradients(model, feeds, wrt=spec["wrt"], rtol=spec["rtol"], h=spec["h"],
                    linear=spec["linear"])


def test_the_table_covers_every_rule():
    covered = {spec.values[0]["op_type"] for spec in CASES}
    # Recurrent operators are expanded into ruled ones; tests/test_recurrent.py
    # checks each configuration against finite differences.
    missing = sorted(set(differentiable_ops()) - covered - set(EXPANSIONS))
    assert not missing, f"rules without a finite-difference row: {missing}"


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 3)], ids=["4d", "2d"])
def test_batch_normalization_in_training_mode_matches_finite_differences(shape):
    """Batch statistics: the gradient goes through the batch's mean and
    variance.  The running-statistic outputs are state: a separate test, as
    the table seeds every output."""
    inputs = [("X", normal(*shape)), ("s", normal(3)), ("b", normal(3)),
              ("m", normal(3)), ("v", positive(3))]
    model = node_model("BatchNormalization", inputs, outputs=("Y", "rm", "rv"),
                       constants={"m": inputs[3][1], "v": inputs[4][1]}, epsilon=1e-3,
                       training_mode=1)
    del model.graph.output[1:]
    check_gradients(model, {name: value for name, value in inputs[:3]}, wrt=["X", "s", "b"])
    model = node_model("BatchNormalization", inputs, outputs=("Y", "rm", "rv"),
                       constants={"m": inputs[3][1], "v": inputs[4][1]}, training_mode=1)
    with pytest.raises(GradientError, match="running-statistic outputs reach the loss"):
        build_vjp(model, {"Y": "dY", "rm": "drm"}, ["X"])


def test_dropout_in_training_mode_scales_the_kept_values():
    """Random, so no finite differences: the gradient is dY where the
    forward pass kept the value, times 1 / (1 - ratio)."""
    ratio = 0.25
    model = node_model("Dropout", [("X", apart(50, 4)), ("r", np.array(ratio)),
                                   ("t", np.array(True))],
                       constants={"r": np.array(ratio), "t": np.array(True)}, seed=3)
    gradient = build_vjp(model, {"Y": "dY"}, ["X"])
    session = make_session(gradient.model, dtype=np.float64)
    X, dY = apart(50, 4), normal(50, 4)
    Y, dX = session.run(["Y", gradient.gradient_names["X"]], {"X": X, "dY": dY})
    kept = Y != 0
    assert 0.5 < kept.mean() < 0.95
    assert_allclose(Y[kept], X[kept] / (1 - ratio))
    assert_allclose(dX, dY * kept / (1 - ratio))


def test_einsum_refuses_a_diagonal_of_a_trained_operand():
    """The cotangent of an operand with a repeated subscript would have to be
    written onto its diagonal: refused, with the reason, before training."""
    model = node_model("Einsum", [("A", normal(3, 3))], equation="ii->i")
    with pytest.raises(GradientError, match="repeats a subscript"):
        build_vjp(model, {"Y": "dY"}, ["A"])
