"""Rules of operators that move elements: reshapes, transposes, joins,
splits, slices, gathers, pads, tiles.

Operators that only pick, copy or reorder elements (Slice, GatherND, Pad
in any mode, Compress) share one rule: the operator is run again on a
tensor holding each input element's position, which tells where each
output element came from, and the cotangent is scattered back there
(``ScatterElements`` with ``reduction='add'``, so copies add up).  Gather,
an embedding lookup most often, scatters its cotangent into the rows its
indices name directly, without a position tensor as large as the table.
"""

import numpy as np
from onnx import TensorProto

from .registry import NotDifferentiable, rule


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(g, node, dys):
    x = node.input[0]
    return [g.Reshape(dys[0], g.shape_tensor(x))] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose(g, node, dys):
    perm = node.attr("perm")
    if perm is None:
        rank = g.rank(node.input[0])
        if rank is None:
            raise NotDifferentiable("Transpose without perm on a value of unknown rank.")
        perm = list(reversed(range(rank)))
    return [g.Transpose(dys[0], perm=[int(k) for k in np.argsort(perm)])]


@rule("Expand")
def expand(g, node, dys):
    return [g.sum_to(dys[0], node.input[0], node.output[0]), None]


@rule("Tile")
def tile(g, node, dys):
    # Y viewed as (r0, d0, r1, d1, ...): sum over the repeat axes.
    x, repeats = node.input
    rank = g.rank(x)
    if rank is None:
        raise NotDifferentiable("Tile on a value of unknown rank.")
    static_repeats = g.const_value(repeats)
    shape = g.static_shape(x)
    if static_repeats is not None and shape is not None:
        interleaved = g.ints([v for pair in zip(static_repeats.tolist(), shape) for v in pair])
    else:
        pairs = g.Concat(g.Unsqueeze(repeats, g.ints([1])),
                         g.Unsqueeze(g.shape_of(x), g.ints([1])), axis=1)
        interleaved = g.Reshape(pairs, g.ints([-1]))
    split = g.Reshape(dys[0], interleaved)
    return [g.reduce("ReduceSum", split, list(range(0, 2 * rank, 2)), keepdims=0), None]


def _axis_sizes(g, values, axis):
    """Sizes of ``values`` along ``axis``, as an int64 tensor."""
    shapes = [g.static_shape(v) for v in values]
    if all(s is not None for s in shapes):
        return g.ints([s[axis] for s in shapes])
    return g.Concat(*[g.Gather(g.shape_of(v), g.ints([axis])) for v in values], axis=0)


def _positive_axis(g, node, value, axis):
    if axis >= 0:
        return axis
    rank = g.rank(value)
    if rank is None:
        raise NotDifferentiable(f"{node.op_type} with a negative axis on a value of unknown rank.")
    return axis + rank


@rule("Concat")
def concat(g, node, dys):
    inputs = node.input
    if len(inputs) == 1:
        return [dys[0]]
    axis = _positive_axis(g, node, inputs[0], node.attr("axis"))
    parts = g.Split(dys[0], _axis_sizes(g, inputs, axis), axis=axis, n_outputs=len(inputs))
    return [part if node.needs(k) else None for k, part in enumerate(parts)]


@rule("Split")
def split(g, node, dys):
    axis = node.attr("axis", 0)
    pieces = [dy if dy is not None else g.zeros_like(y) for dy, y in zip(dys, node.output)]
    return [g.Concat(*pieces, axis=axis)] + [None] * (len(node.input) - 1)


def _scatter_back(g, node, dy, fill=None):
    """Cotangent of an operator that only picks, copies or reorders the
    elements of its first input (see the module docstring).

    Parameters
    ----------
    fill : int, optional
        Index of the input holding a Pad's constant value: it becomes -1,
        which marks output elements that come from no input element.
    """
    x = node.input[0]
    int64 = TensorProto.INT64
    size = g.Size(x)
    zero, one = g.constant(0, elem_type=int64), g.constant(1, elem_type=int64)
    inputs = [g.Reshape(g.Range(zero, size, one), g.shape_tensor(x))] + node.input[1:]
    if fill is not None:
        inputs += [""] * (fill + 1 - len(inputs))
        inputs[fill] = g.constant(-1, elem_type=int64)
    attributes = {a.name: node.attr(a.name) for a in node.proto.attribute}
    sources = g.Reshape(g.op(node.op_type, *inputs, **attributes), g.ints([-1]))
    slots = size
    if fill is not None:  # elements from nowhere go to one extra slot, dropped after
        sources = g.Where(g.Less(sources, zero), size, sources)
        slots = g.Add(size, one)
    zeros = g.zeros(g.Unsqueeze(slots, g.ints([0])), like=dy)
    flat = g.ScatterElements(zeros, sources, g.Reshape(dy, g.ints([-1])), axis=0,
                             reduction="add")
    if fill is not None:
        flat = g.Slice(flat, g.ints([0]), g.Unsqueeze(size, g.ints([0])))
    return g.Reshape(flat, g.shape_tensor(x))


@rule("Slice")
def slice_(g, node, dys):
    dy = dys[0]
    pads = _slice_as_pads(g, node)
    if pads is not None:  # unit steps, constant bounds, static shape: a Pad
        return [g.Pad(dy, g.ints(pads))] + [None] * (len(node.input) - 1)
    return [_scatter_back(g, node, dy)] + [None] * (len(node.input) - 1)


def _slice_as_pads(g, node):
    """The Pad that inverts a Slice with unit steps, when everything is static."""
    x = node.input[0]
    shape = g.static_shape(x)
    values = [g.const_value(name) if node.has_input(k) else None
              for k, name in enumerate(node.input)]
    if shape is None or values[1] is None or values[2] is None:
        return None
    if node.has_input(3) and values[3] is None or node.has_input(4) and values[4] is None:
        return None
    starts, ends = values[1].tolist(), values[2].tolist()
    axes = values[3].tolist() if node.has_input(3) else list(range(len(starts)))
    steps = values[4].tolist() if node.has_input(4) else [1] * len(starts)
    if any(step != 1 for step in steps):
        return None
    rank = len(shape)
    begin, end = [0] * rank, [0] * rank
    for start, stop, axis in zip(starts, ends, axes):
        axis = axis + rank if axis < 0 else axis
        first, last, _ = slice(start, stop, 1).indices(shape[axis])
        if last < first:
            return None  # an empty slice: leave it to the general rule
        begin[axis], end[axis] = first, shape[axis] - last
    return begin + end


@rule("GatherND", "Compress")
def gather_nd(g, node, dys):
    return [_scatter_back(g, node, dys[0])] + [None] * (len(node.input) - 1)


@rule("Gather")
def gather(g, node, dys):
    # An embedding lookup: dX is dY added into the rows the indices name,
    # repeated indices adding up.  dY, shaped X.shape[:axis] + indices.shape
    # + X.shape[axis+1:], is flattened to one index axis and scattered with
    # ScatterElements (reduction='add') along it, the indices broadcast
    # over the other axes: the work and memory follow the lookups, where the
    # general rule of the module docstring builds a position tensor as
    # large as the table.  (ScatterND with reduction='add' would need no
    # broadcast indices, but onnxruntime's is not safe against repeated
    # indices on several threads.)
    x, indices = node.input
    dy, = dys
    rank, index_rank = g.rank(x), g.rank(indices)
    if rank is None or index_rank is None:
        return [_scatter_back(g, node, dy), None]
    axis = _positive_axis(g, node, x, node.attr("axis", 0))
    int64 = TensorProto.INT64
    shape = g.static_shape(x)
    constant = g.const_value(indices)
    if constant is not None and shape is not None:
        # Negative indices count from the end; ScatterElements is given
        # them counted from the start.
        flat = constant.astype(np.int64).reshape(-1)
        index = g.ints((flat % shape[axis]).tolist())
    else:
        if g.elem_type(indices) != int64:  # int32 indices
            indices = g.Cast(indices, to=int64)
        flat = g.Reshape(indices, g.ints([-1]))
        size = (g.ints([shape[axis]]) if shape is not None
                else g.Shape(x, start=axis, end=axis + 1))
        index = g.Where(g.Less(flat, g.ints([0])), g.Add(flat, size), flat)
    if shape is not None:
        target = g.ints(list(shape[:axis]) + [-1] + list(shape[axis + 1:]))
    else:
        parts = [g.ints([-1])]
        if axis > 0:
            parts.insert(0, g.Shape(x, start=0, end=axis))
        if axis < rank - 1:
            parts.append(g.Shape(x, start=axis + 1))
        target = g.Concat(*parts, axis=0)
    updates = g.Reshape(dy, target)
    if rank > 1:
        column = [1] * axis + [-1] + [1] * (rank - axis - 1)
        index = g.Expand(g.Reshape(index, g.ints(column)), g.Shape(updates))
    return [g.ScatterElements(g.zeros_like(x), index, updates, axis=axis, reduction="add"),
            None]


@rule("Pad")
def pad(g, node, dys):
    mode = node.attr("mode", "constant")
    rest = [None] * (len(node.input) - 1)
    if node.needs(2):
        raise NotDifferentiable("the padding value depends on a trained weight.")
    pads = g.const_value(node.input[1])
    if mode == "constant" and pads is not None and not node.has_input(3) and (pads >= 0).all():
        # Cut the padding off again: a Slice.
        rank = len(pads) // 2
        ends = [-p if p > 0 else np.iinfo(np.int64).max for p in pads[rank:].tolist()]
        return [g.Slice(dys[0], g.ints(pads[:rank].tolist()), g.ints(ends),
                        g.ints(list(range(rank))))] + rest
    return [_scatter_back(g, node, dys[0], fill=2 if mode == "constant" else None)] + rest


@rule("GatherElements")
def gather_elements(g, node, dys):
    x, indices = node.input
    zeros = g.zeros_like(x)
    return [g.ScatterElements(zeros, indices, dys[0], axis=node.attr("axis", 0),
                              reduction="add"), None]


@rule("TopK")
def top_k(g, node, dys):
    x = node.input[0]
    if dys[0] is None:
        return [None, None]
    indices = node.output[1]
    scattered = g.ScatterElements(g.zeros_like(x), indices, dys[0],
                                  axis=node.attr("axis", -1), reduction="add")
    return [scattered, None]
