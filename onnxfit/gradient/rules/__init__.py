"""onnxfit's vector-Jacobian rules, one small function per ONNX operator.

The table lives in :mod:`.registry`; the rules are grouped by family:

* :mod:`.elementwise` -- arithmetic with broadcasting, activations, Min/Max,
  Clip, Where, Sum/Mean, casts;
* :mod:`.linalg` -- Gemm and MatMul;
* :mod:`.reduction` -- ReduceSum, ReduceMean, ReduceMax, ..., Softmax,
  LogSoftmax;
* :mod:`.shape` -- Reshape, Transpose, Concat, Split, Slice, Gather, Pad, ...;
* :mod:`.conv` -- Conv, ConvTranspose and the pooling operators;
* :mod:`.normalization` -- BatchNormalization and LayerNormalization.
"""

from . import conv, elementwise, linalg, normalization, reduction, shape  # noqa: F401
from .registry import (
    CONSTANT_INPUTS,
    RULES,
    ZERO_DERIVATIVE,
    NotDifferentiable,
    differentiable_ops,
    rule,
)

__all__ = [
    "CONSTANT_INPUTS", "RULES", "ZERO_DERIVATIVE", "NotDifferentiable", "differentiable_ops",
    "rule",
]
