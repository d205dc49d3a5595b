"""onnxfit's vector-Jacobian rules, one small function per ONNX operator.

The table lives in :mod:`.registry`; the rules are grouped by family:

* :mod:`.elementwise` -- arithmetic with broadcasting, activations, Min/Max,
  Clip, Where, Sum/Mean, casts;
* :mod:`.linalg` -- Gemm, MatMul, Einsum and Trilu;
* :mod:`.reduction` -- ReduceSum, ReduceMean, ReduceMax, ..., Softmax,
  LogSoftmax;
* :mod:`.shape` -- Reshape, Transpose, Concat, Split, Slice, Gather, Pad, ...;
* :mod:`.conv` -- Conv, ConvTranspose and the pooling operators;
* :mod:`.normalization` -- BatchNormalization and LayerNormalization;
* :mod:`.loss` -- SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss;
* :mod:`.recurrent` -- LSTM, GRU and RNN, as expansions (unrolled into
  operators that have rules before the reverse pass) rather than rules.
"""

from . import (  # noqa: F401
    conv, elementwise, linalg, loss, normalization, recurrent, reduction, shape,
)
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
