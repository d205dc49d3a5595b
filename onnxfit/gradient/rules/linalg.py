"""Rules of Gemm and MatMul.

Two-dimensional products are written as Gemm with transpose flags (no
Transpose node, one BLAS call each); batched and one-dimensional MatMul
operands follow numpy's rules, their batch dimensions summed back where
they were broadcast.
"""

from .registry import NotDifferentiable, rule


@rule("Gemm")
def gemm(g, node, dys):
    # Y = alpha op(A) op(B) + beta C, op transposing when transA/transB.
    dy, = dys
    a, b = node.input[:2]
    alpha = node.attr("alpha", 1.0)
    beta = node.attr("beta", 1.0)
    trans_a, trans_b = node.attr("transA", 0), node.attr("transB", 0)
    scale = None if alpha == 1.0 else alpha
    grads = [None, None, None]
    if node.needs(0):
        if trans_a:  # dA = alpha op(B) dY^T
            grads[0] = g.Gemm(b, dy, transA=trans_b, transB=1, alpha=scale)
        else:  # dA = alpha dY op(B)^T
            grads[0] = g.Gemm(dy, b, transB=1 - trans_b, alpha=scale)
    if node.needs(1):
        if trans_b:  # dB = alpha dY^T op(A)
            grads[1] = g.Gemm(dy, a, transA=1, transB=trans_a, alpha=scale)
        else:  # dB = alpha op(A)^T dY
            grads[1] = g.Gemm(a, dy, transA=1 - trans_a, alpha=scale)
    if node.has_input(2) and node.needs(2):
        c, y = node.input[2], node.output[0]
        scaled = dy if beta == 1.0 else g.Mul(dy, g.constant(beta, like=y))
        grads[2] = g.sum_to(scaled, c, y)
    return grads


def _swap_last(g, x, rank):
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return g.Transpose(x, perm=perm)


def _rows(g, x, width_of, axis):
    """``x`` reshaped to 2-D, ``(-1, width)`` with the width taken from
    dimension ``axis`` of ``width_of``."""
    shape = g.static_shape(width_of)
    width = g.ints([shape[axis]]) if shape is not None else g.Shape(
        width_of, start=axis, end=axis + 1)
    return g.Reshape(x, g.Concat(g.ints([-1]), width, axis=0))


@rule("MatMul")
def matmul(g, node, dys):
    dy, = dys
    a, b = node.input
    y = node.output[0]
    rank_a, rank_b = g.rank(a), g.rank(b)
    if rank_a is None or rank_b is None:
        raise NotDifferentiable(
            "the rank of an operand is unknown before run time (give the graph's "
            "inputs a shape)."
        )
    need_a, need_b = node.needs(0), node.needs(1)
    if rank_a == 1 and rank_b == 1:  # a dot product
        return [g.Mul(dy, b) if need_a else None, g.Mul(dy, a) if need_b else None]
    if rank_b == 1:  # (..., n, k) @ (k,) -> (..., n)
        da = g.MatMul(g.Unsqueeze(dy, g.ints([-1])), g.Unsqueeze(b, g.ints([0]))) \
            if need_a else None
        db = None
        if need_b:
            db = g.MatMul(dy, a) if rank_a == 2 else g.MatMul(
                g.Reshape(dy, g.ints([-1])), _rows(g, a, b, 0))
        return [da, db]
    if rank_a == 1:  # (k,) @ (..., k, m) -> (..., m)
        if rank_b == 2:
            return [g.MatMul(b, dy) if need_a else None,
                    g.MatMul(g.Unsqueeze(a, g.ints([1])), g.Unsqueeze(dy, g.ints([0])))
                    if need_b else None]
        dy_row = g.Unsqueeze(dy, g.ints([-2]))  # (..., 1, m)
        da = None
        if need_a:
            full = g.MatMul(dy_row, _swap_last(g, b, rank_b))  # (..., 1, k)
            da = g.Reshape(g.reduce("ReduceSum", full, list(range(rank_b - 1)), keepdims=0),
                           g.ints([-1]))
        db = g.MatMul(g.Unsqueeze(a, g.ints([1])), dy_row) if need_b else None
        return [da, db]
    if rank_b == 2:  # (..., n, k) @ (k, m): batch dimensions come from A only
        if rank_a == 2:
            return [g.Gemm(dy, b, transB=1) if need_a else None,
                    g.Gemm(a, dy, transA=1) if need_b else None]
        da = g.Reshape(g.Gemm(_rows(g, dy, b, 1), b, transB=1), g.shape_tensor(a)) \
            if need_a else None
        db = g.Gemm(_rows(g, a, b, 0), _rows(g, dy, b, 1), transA=1) if need_b else None
        return [da, db]
    # Both operands have two or more dimensions: batch dimensions broadcast.
    out_shape = g.shape(y)
    grads = [None, None]
    for index, (x, full) in enumerate((
        (a, lambda: g.MatMul(dy, _swap_last(g, b, rank_b))),
        (b, lambda: g.MatMul(_swap_last(g, a, rank_a), dy)),
    )):
        if not node.needs(index):
            continue
        value = full()
        x_shape = g.shape(x)
        if out_shape is not None and x_shape is not None:
            g.set_shape(value, tuple(out_shape[:-2]) + tuple(x_shape[-2:]))
            grads[index] = g.sum_to(value, x, value)
        else:
            grads[index] = g.sum_to(value, x, None)
    return grads
