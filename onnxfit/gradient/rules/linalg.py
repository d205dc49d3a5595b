"""Rules of Gemm, MatMul, Einsum and Trilu.

Two-dimensional products are written as Gemm with transpose flags (no
Transpose node, one BLAS call each); batched and one-dimensional MatMul
operands follow numpy's rules, their batch dimensions summed back where
they were broadcast.  An Einsum's cotangents are Einsums of the output's
cotangent and the other operands.
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


# -- Einsum ------------------------------------------------------------------------
def _einsum_terms(g, node):
    """The input and output subscripts of an Einsum node, with the ellipsis
    written out as letters of its own and the implicit output made explicit.

    onnxruntime requires every ellipsis of one equation to stand for the
    same number of dimensions, so each becomes the same run of letters
    unused elsewhere; the cotangent equations then need no ellipsis.

    Returns
    -------
    inputs : list of str
    output : str
    """
    equation = node.attr("equation").replace(" ", "")
    if "->" in equation:
        left, output = equation.split("->")
    else:
        left, output = equation, None
    terms = left.split(",")
    if len(terms) != len(node.input):
        raise NotDifferentiable(
            f"its equation {equation!r} names {len(terms)} operands for {len(node.input)} inputs.")
    used = set(equation) - set(".,->")
    spare = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
    widths = {}
    for k, (term, name) in enumerate(zip(terms, node.input)):
        if "..." not in term:
            continue
        rank = g.rank(name)
        if rank is None:
            raise NotDifferentiable(
                "an operand with an ellipsis has an unknown rank (give the graph's inputs "
                "a shape).")
        widths[k] = rank - len(term.replace("...", ""))
    width = max(widths.values(), default=0)
    if width > len(spare):  # pragma: no cover - over 52 distinct dimensions
        raise NotDifferentiable("its equation uses too many letters to write the ellipsis out.")
    ellipsis = "".join(spare[:width])
    # An ellipsis standing for fewer dimensions takes the last letters (numpy's alignment).
    explicit = [term.replace("...", ellipsis[width - widths[k]:]) if k in widths else term
                for k, term in enumerate(terms)]
    if output is None:
        # Implicit output: the ellipsis, then the letters met once, sorted.
        counts = {}
        for term in terms:
            for c in term.replace("...", ""):
                counts[c] = counts.get(c, 0) + 1
        output = ellipsis + "".join(sorted(c for c, n in counts.items() if n == 1))
    else:
        output = output.replace("...", ellipsis)
    return explicit, output


def _letter_size(g, letter, terms, names):
    """What inference knows of the size of ``letter`` among the operands
    ``names`` with subscripts ``terms``: a static size other than 1 wins
    (the others broadcast to it), then one symbol, then 1; None if unknown."""
    sizes = []
    for term, name in zip(terms, names):
        shape = g.shape(name)
        for position, c in enumerate(term):
            if c == letter:
                sizes.append(None if shape is None else shape[position])
    ints = {s for s in sizes if isinstance(s, int) and s != 1}
    if ints:
        return ints.pop()
    if None in sizes:
        return None
    symbols = {s for s in sizes if isinstance(s, str)}
    if len(symbols) == 1:
        return symbols.pop()
    return 1 if not symbols and sizes else None


@rule("Einsum")
def einsum(g, node, dys):
    # The cotangent of operand i is the Einsum of dY and the other operands
    # giving operand i's subscripts.  Letters met only in operand i were
    # summed away by the forward pass: dY is constant along them, so they
    # are left out of that Einsum and broadcast back with Expand; letters
    # where operand i has size 1 and the others more were broadcast by the
    # forward pass, and are summed back.
    dy, = dys
    terms, output = _einsum_terms(g, node)
    x_grads = []
    for i, (x, term) in enumerate(zip(node.input, terms)):
        if not node.needs(i):
            x_grads.append(None)
            continue
        if len(set(term)) != len(term):
            raise NotDifferentiable(
                f"operand {i} repeats a subscript ({term!r}, a diagonal), which has no rule; "
                "take the diagonal before the Einsum (a Mul by an identity matrix, say).")
        others = [(t, name) for k, (t, name) in enumerate(zip(terms, node.input)) if k != i]
        seen = set(output).union(*[set(t) for t, _ in others])
        kept = "".join(c for c in term if c in seen)
        missing = [k for k, c in enumerate(term) if c not in seen]
        if not others and kept == output and not missing:
            x_grads.append(dy)  # an identity Einsum
            continue
        if not others and kept == output:
            value = dy
        else:
            equation = ",".join([output] + [t for t, _ in others]) + "->" + kept
            value = g.Einsum(dy, *[name for _, name in others], equation=equation)
        if missing:
            value = g.Expand(g.Unsqueeze(value, g.ints(missing)), g.shape_tensor(x))
        # The shape of ``value``: operand i's where it was expanded, the
        # broadcast size of each letter among dY and the other operands elsewhere.
        x_shape = g.shape(x)
        sources = [output] + [t for t, _ in others]
        names = [node.output[0]] + [name for _, name in others]
        shape = tuple(
            (None if x_shape is None else x_shape[k]) if k in missing
            else _letter_size(g, c, sources, names)
            for k, c in enumerate(term))
        g.set_shape(value, shape)
        if x_shape is None or tuple(x_shape) != shape:
            value = g.sum_to(value, x, value)
        x_grads.append(value)
    return x_grads


@rule("Trilu", constant_inputs=(1,))
def trilu(g, node, dys):
    # The kept triangle passes dY, the zeroed one nothing: the same Trilu.
    k = [node.input[1]] if node.has_input(1) else []
    return [g.Trilu(dys[0], *k, upper=node.attr("upper", 1))] + [None] * (len(node.input) - 1)
