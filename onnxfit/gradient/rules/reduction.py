"""Rules of reductions and of Softmax/LogSoftmax.

A reduction's cotangent is put back on the reduced axes (``Unsqueeze`` when
``keepdims=0``) and broadcast over them; axes come as an attribute (before
opset 18, ReduceSum before 13) or as a constant or computed input.
"""

import numpy as np

from ...sessions import onnxruntime_version
from .registry import NotDifferentiable, rule


def _axes(g, node):
    """The reduced axes: a list of ints, the name of an axes tensor, None
    for every axis, or ``"none"`` when the node reduces nothing."""
    noop = node.attr("noop_with_empty_axes", 0)
    if node.has_input(1):
        value = g.const_value(node.input[1])
        axes = node.input[1] if value is None else [int(a) for a in value.reshape(-1)]
    else:
        axes = node.attr("axes")
    if axes is not None and not isinstance(axes, str) and len(axes) == 0:
        axes = None
    if axes is None and noop:
        return "none"
    return axes


def _restored(g, node, value, axes):
    """``value`` (shaped like the reduction's output) with the reduced axes
    back as dimensions of size 1, so that it broadcasts against the input."""
    if node.attr("keepdims", 1) or axes is None:
        return value  # keepdims, or a scalar that broadcasts as it is
    return g.Unsqueeze(value, axes if isinstance(axes, str) else g.ints(axes))


def _count(g, node, axes):
    """Number of input elements averaged into each output element."""
    x, y = node.input[0], node.output[0]
    shape = g.static_shape(x)
    if shape is not None and not isinstance(axes, str):
        picked = range(len(shape)) if axes is None else axes
        return g.constant(float(np.prod([shape[a] for a in picked])), like=y)
    return g.CastLike(g.Div(g.Size(x), g.Size(y)), y)


#: Reductions that onnxruntime before 1.24 computes as the identity when
#: their axes, given at run time, are empty and noop_with_empty_axes=1 (the
#: specification squares, or takes the absolute value): no gradient can
#: match both.
_NOOP_FIXED_IN = {"ReduceSumSquare": (1, 24), "ReduceL1": (1, 24)}


def _reduction(compute):
    """Wrap ``compute(g, node, dy_restored, axes) -> dx``; handles the
    reductions that reduce nothing."""

    def differentiate(g, node, dys):
        axes = _axes(g, node)
        if axes == "none":
            return [dys[0], None]
        fixed = _NOOP_FIXED_IN.get(node.op_type)
        if (fixed and isinstance(axes, str) and node.attr("noop_with_empty_axes", 0)
                and onnxruntime_version()[:2] < fixed):
            raise NotDifferentiable(
                f"onnxruntime {'.'.join(map(str, onnxruntime_version()))} computes it as the "
                "identity when its run-time axes are empty (noop_with_empty_axes=1), against "
                f"the ONNX specification: upgrade onnxruntime to {'.'.join(map(str, fixed))} "
                "or newer."
            )
        restored = _restored(g, node, dys[0], axes)
        return [compute(g, node, restored, axes), None]

    return differentiate


@rule("ReduceSum")
@_reduction
def reduce_sum(g, node, dy, axes):
    return g.Expand(dy, g.shape_tensor(node.input[0]))


@rule("ReduceMean")
@_reduction
def reduce_mean(g, node, dy, axes):
    return g.Expand(g.Div(dy, _count(g, node, axes)), g.shape_tensor(node.input[0]))


@rule("ReduceSumSquare")
@_reduction
def reduce_sum_square(g, node, dy, axes):
    # 2 dy first: dy is the reduced (small) tensor, x the large one.
    x = node.input[0]
    return g.Mul(x, g.Mul(dy, g.constant(2.0, like=x)))


@rule("ReduceL1")
@_reduction
def reduce_l1(g, node, dy, axes):
    return g.Mul(dy, g.Sign(node.input[0]))


@rule("ReduceL2")
@_reduction
def reduce_l2(g, node, dy, axes):
    # x / |x| times dy; 0 where the norm is 0 (as PyTorch's norm).
    x = node.input[0]
    norm = _restored(g, node, node.output[0], axes)
    zero = g.constant(0.0, like=x)
    ratio = g.Div(dy, norm)
    return g.Mul(x, g.Where(g.Equal(norm, zero), zero, ratio))


@rule("ReduceLogSumExp")
@_reduction
def reduce_log_sum_exp(g, node, dy, axes):
    x = node.input[0]
    total = _restored(g, node, node.output[0], axes)
    return g.Mul(dy, g.Exp(g.Sub(x, total)))


def share_between_ties(g, x, best, dy, axes, noop_with_empty_axes=0):
    """dy sent to the elements of ``x`` equal to ``best`` (the extremum over
    ``axes``, kept as dimensions of size 1), shared equally between ties,
    as PyTorch's amax/amin."""
    mask = g.Cast(g.Equal(x, best), to=g.elem_type(x))
    ties = g.reduce("ReduceSum", mask, axes, keepdims=1,
                    noop_with_empty_axes=noop_with_empty_axes)
    return g.Mul(mask, g.Div(dy, ties))


def _extremum(g, node, dy, axes):
    best = _restored(g, node, node.output[0], axes)
    return share_between_ties(g, node.input[0], best, dy, axes,
                              node.attr("noop_with_empty_axes", 0))


rule("ReduceMax")(_reduction(_extremum))
rule("ReduceMin")(_reduction(_extremum))


def _softmax_axis(g, node):
    return [node.attr("axis", -1)]  # opset >= 13: one axis, default the last


@rule("Softmax")
def softmax(g, node, dys):
    # dx = y (dy - sum(dy y)) over the softmax axis.
    dy, = dys
    y = node.output[0]
    inner = g.reduce("ReduceSum", g.Mul(dy, y), _softmax_axis(g, node), keepdims=1)
    return [g.Mul(y, g.Sub(dy, inner))]


@rule("LogSoftmax")
def log_softmax(g, node, dys):
    # dx = dy - softmax(x) sum(dy) over the axis, softmax(x) = exp(y).
    dy, = dys
    y = node.output[0]
    total = g.reduce("ReduceSum", dy, _softmax_axis(g, node), keepdims=1)
    return [g.Sub(dy, g.Mul(g.Exp(y), total))]
