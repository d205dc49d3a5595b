"""Rules of BatchNormalization and LayerNormalization.

BatchNormalization in inference form is an affine map per channel: its
scale and bias train like any weight; the running mean and variance are
differentiable too, although onnxfit does not train them by default
(:class:`onnxfit.model.OnnxModel` treats them as statistics, as PyTorch
treats its buffers).  In training mode it normalises with the batch's
statistics, which the gradient goes through (PyTorch's formula); its
running-statistic outputs are state, not differentiated.  Both forms and
LayerNormalization recompute their statistics in the backward pass from
the input.
"""

from .registry import NotDifferentiable, rule


def _channel_column(g, value, rank):
    """A per-channel vector shaped ``(C, 1, ..., 1)`` to broadcast against
    an ``(N, C, ...)`` tensor of ``rank`` dimensions."""
    if rank <= 2:
        return value
    return g.Unsqueeze(value, g.ints(list(range(1, rank - 1))))


@rule("BatchNormalization")
def batch_normalization(g, node, dys):
    if any(dy is not None for dy in dys[1:]):
        raise NotDifferentiable(
            "BatchNormalization's running-statistic outputs reach the loss; they are "
            "state, updated by training, not differentiated."
        )
    dy = dys[0]
    x, scale, bias, mean, var = node.input[:5]
    rank = g.rank(x)
    if rank is None:
        raise NotDifferentiable("BatchNormalization on a value of unknown rank.")
    axes = [0] + list(range(2, rank))
    if node.attr("training_mode", 0):
        return _batch_statistics_normalization(g, node, dy, axes, rank)
    inv_std = g.Reciprocal(g.Sqrt(g.Add(var, g.constant(node.attr("epsilon", 1e-5), like=var))))
    grads = [None] * 5
    if node.needs(0):
        grads[0] = g.Mul(dy, _channel_column(g, g.Mul(scale, inv_std), rank))
    summed = g.reduce("ReduceSum", dy, axes, keepdims=0) if (
        node.needs(2) or node.needs(3)) else None
    centred = g.Sub(x, _channel_column(g, mean, rank)) if (
        node.needs(1) or node.needs(4)) else None
    if node.needs(1):
        normalised = g.Mul(centred, _channel_column(g, inv_std, rank))
        grads[1] = g.reduce("ReduceSum", g.Mul(dy, normalised), axes, keepdims=0)
    if node.needs(2):
        grads[2] = summed
    if node.needs(3):
        grads[3] = g.Neg(g.Mul(summed, g.Mul(scale, inv_std)))
    if node.needs(4):
        # d/dvar of (x - mean) scale (var + eps)^(-1/2) = -(x - mean) scale inv_std^3 / 2
        inv_cubed = g.Mul(g.Mul(inv_std, inv_std), inv_std)
        weighted = g.reduce("ReduceSum", g.Mul(dy, centred), axes, keepdims=0)
        grads[4] = g.Mul(g.Mul(weighted, g.Mul(scale, inv_cubed)),
                         g.constant(-0.5, like=var))
    return grads


def _batch_statistics_normalization(g, node, dy, axes, rank):
    """BatchNormalization in training mode: ``y = scale * xhat + bias`` with
    ``xhat`` normalised by the batch's mean and biased variance; then
    ``dx = scale * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat))``."""
    x, scale = node.input[:2]
    mean = g.reduce("ReduceMean", x, axes, keepdims=1)
    centred = g.Sub(x, mean)
    var = g.reduce("ReduceMean", g.Mul(centred, centred), axes, keepdims=1)
    inv_std = g.Reciprocal(g.Sqrt(g.Add(var, g.constant(node.attr("epsilon", 1e-5), like=x))))
    normalised = g.Mul(centred, inv_std)
    grads = [None] * 5
    if node.needs(0):
        mean_dy = g.reduce("ReduceMean", dy, axes, keepdims=1)
        mean_dy_xhat = g.reduce("ReduceMean", g.Mul(dy, normalised), axes, keepdims=1)
        inner = g.Sub(g.Sub(dy, mean_dy), g.Mul(normalised, mean_dy_xhat))
        grads[0] = g.Mul(g.Mul(inner, inv_std), _channel_column(g, scale, rank))
    if node.needs(1):
        grads[1] = g.reduce("ReduceSum", g.Mul(dy, normalised), axes, keepdims=0)
    if node.needs(2):
        grads[2] = g.reduce("ReduceSum", dy, axes, keepdims=0)
    return grads


@rule("LayerNormalization")
def layer_normalization(g, node, dys):
    if any(dy is not None for dy in dys[1:]):
        raise NotDifferentiable("LayerNormalization's Mean or InvStdDev output reaches the loss.")
    dy = dys[0]
    x, scale = node.input[:2]
    y = node.output[0]
    rank = g.rank(x)
    if rank is None:
        raise NotDifferentiable("LayerNormalization on a value of unknown rank.")
    axis = node.attr("axis", -1)
    axes = list(range(axis % rank, rank))
    mean = g.reduce("ReduceMean", x, axes, keepdims=1)
    centred = g.Sub(x, mean)
    var = g.reduce("ReduceMean", g.Mul(centred, centred), axes, keepdims=1)
    inv_std = g.Reciprocal(g.Sqrt(g.Add(var, g.constant(node.attr("epsilon", 1e-5), like=x))))
    normalised = g.Mul(centred, inv_std)
    grads = [None] * len(node.input)
    if node.needs(0):
        d_norm = g.Mul(dy, scale)
        mean_d = g.reduce("ReduceMean", d_norm, axes, keepdims=1)
        mean_dn = g.reduce("ReduceMean", g.Mul(d_norm, normalised), axes, keepdims=1)
        grads[0] = g.Mul(inv_std, g.Sub(g.Sub(d_norm, mean_d), g.Mul(normalised, mean_dn)))
    if node.needs(1):
        grads[1] = g.sum_to(g.Mul(dy, normalised), scale, y)
    if node.has_input(2) and node.needs(2):
        grads[2] = g.sum_to(dy, node.input[2], y)
    return grads
