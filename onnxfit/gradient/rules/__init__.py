"""onnxfit's vector-Jacobian rules, one small function per ONNX operator.

The table lives in :mod:`.registry`; the rules are grouped by family:

* :mod:`.elementwise` -- arithmetic with broadcasting, activations, Min/Max,
  Clip, Where, Sum/Mean, casts;
* :mod:`.linalg` -- Gemm and MatMul;
* :mod:`.reduction` -- ReduceSum, ReduceMean, ReduceMax, ..., Softmax,
  LogSoftmax;
* :mod:`.shape` -- Reshape, Transpose, Concat, Split, Slice, Gather, Pad, ...;
* :mod:`.conv` -- Conv, ConvTranspose and the pooling operators;
* :mod:`.normalization` -- BatchNormalization and LayerNormalization;
* :mod:`.recurrent` -- LSTM, GRU and RNN, as expansions (unrolled into
  operators that have rules before the reverse pass) rather than rules.
"""

from . import conv, elementwise, linalg, normalization, recurrent, reduction, shape  # noqa: F401
from .registry import (
    CONSTANT_INPUTS,
    EXPANSIONS,
    RULES,
    ZERO_DERIVATIVE,
    NotDifferentiable,
    differentiable_ops,
    expansion,
    rule,
)

__all__ = [
    "CONSTANT_INPUTS", "EXPANSIONS", "RULES", "ZERO_DERIVATIVE", "NotDifferentiable",
    "differentiable_ops", "expansion", "rule",
]
