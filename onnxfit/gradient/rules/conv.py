"""Rules of convolutions and pooling (1-D, 2-D, and any other spatial rank).

* Conv: dX is a ConvTranspose of dY with the same weights; dW is a Conv
  whose "batch" is the input's channels and whose kernel is dY (strides and
  dilations swap roles), per group.
* ConvTranspose: the adjoint of the above (dX is a Conv).
* MaxPool: dY goes back to the positions of the maxima, which MaxPool's own
  second output (flat indices) gives.
* AveragePool: dY divided by each window's divisor, spread over the window
  by a ConvTranspose with a kernel of ones; the divisor is the one
  onnxruntime uses, read off an AveragePool of ones (count_include_pad and
  ceil_mode both ways).
"""

import numpy as np
from onnx import TensorProto, helper

from .reduction import share_between_ties
from .registry import NotDifferentiable, rule

def _kernel(g, node, w=None):
    kernel = node.attr("kernel_shape")
    if kernel is None and w is not None:
        shape = g.static_shape(w)
        if shape is not None:
            kernel = shape[2:]
    if kernel is None:
        raise NotDifferentiable("the kernel's shape is unknown before run time.")
    return [int(k) for k in kernel]


def _spatial_sizes(g, x):
    """Static spatial dimensions of ``x`` (after batch and channels), or
    None; the batch dimension may be symbolic."""
    shape = g.shape(x)
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return list(shape[2:])


def _geometry(g, node, x, kernel):
    """Strides, dilations and explicit pads ``[begins..., ends...]`` of a
    convolution or pooling node, ``auto_pad`` resolved."""
    rank = len(kernel)
    strides = [int(s) for s in node.attr("strides") or [1] * rank]
    dilations = [int(d) for d in node.attr("dilations") or [1] * rank]
    auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad == "NOTSET":
        return strides, dilations, [int(p) for p in node.attr("pads") or [0] * (2 * rank)]
    if auto_pad == "VALID":
        return strides, dilations, [0] * (2 * rank)
    sizes = _spatial_sizes(g, x)
    if sizes is None:
        raise NotDifferentiable(
            f"auto_pad={auto_pad} on an input whose spatial size is unknown before run "
            "time; export the graph with explicit pads."
        )
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return strides, dilations, begins + ends


def _spatial_axes(rank):
    return list(range(2, 2 + rank))


def _fit_spatial(g, value, x, produced=None):
    """``value`` with its spatial dimensions cut or zero-padded at the end to
    those of ``x`` (``produced``: the spatial size of ``value`` when known)."""
    target = _spatial_sizes(g, x)
    rank = len(produced) if produced is not None else g.rank(x) - 2
    axes = _spatial_axes(rank)
    if target is not None and produced is not None:
        if target == list(produced):
            return value
        if any(p > t for p, t in zip(produced, target)):
            value = g.Slice(value, g.ints([0] * rank), g.ints(target), g.ints(axes))
        missing = [max(0, t - p) for p, t in zip(produced, target)]
        if any(missing):
            value = g.Pad(value, g.ints([0] * (2 + rank) + [0, 0] + missing))
        return value
    target = g.Shape(x, start=2)
    value = g.Slice(value, g.ints([0] * rank), target, g.ints(axes))
    missing = g.Sub(target, g.Shape(value, start=2))
    return g.Pad(value, g.Concat(g.ints([0] * (2 + rank) + [0, 0]), missing, axis=0))


def _windows(g, x, kernel, strides, dilations, pads, ceil_mode=0):
    """Number of windows along each spatial axis of ``x`` (a Conv's or a
    pool's output size), computed from ``x``'s static shape, or None.

    Computed here rather than read from the output's inferred shape: older
    onnx releases infer some of them wrongly.  With ``ceil_mode`` it is left
    to run time (runtimes have disagreed on the last window).
    """
    sizes = _spatial_sizes(g, x)
    if sizes is None or ceil_mode:
        return None
    rank = len(kernel)
    counts = []
    for i, (n, k, s, d) in enumerate(zip(sizes, kernel, strides, dilations)):
        shortfall = n + pads[i] + pads[rank + i] - (k - 1) * d - 1
        if shortfall < 0:
            # A pool shorter than its window (a Conv shorter than its
            # kernel is refused before, see _require_windows): onnxruntime
            # releases disagree on whether a partial window counts (1.32
            # truncates the quotient towards 0 and keeps one, 1.20 floors it
            # and keeps none), so the count is left to run time.
            return None
        counts.append(shortfall // s + 1)
    return counts


def _require_windows(g, node, x, kernel, strides, dilations, pads, empty_ok=False):
    """Refuse a node whose (static) input has no room for a window.

    A Conv needs the padded input at least as large as the kernel's reach,
    ``(kernel - 1) * dilation + 1``; a pool may be empty (onnxruntime gives
    0 windows for an input short of the reach by less than two strides:
    it truncates ``shortfall / stride + 1`` towards 0).
    Otherwise onnxruntime fails at run time, and onnx's shape inference of
    the gradient graph (whose sizes would be negative) can abort the
    process: a clear ValueError first.
    """
    sizes = _spatial_sizes(g, x)
    if sizes is None:
        return
    rank = len(kernel)
    for i, (n, k, s, d) in enumerate(zip(sizes, kernel, strides, dilations)):
        span = n + pads[i] + pads[rank + i]
        reach = (k - 1) * d + 1
        if span >= reach or (empty_ok and span - reach > -2 * s):
            continue
        label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"
        raise ValueError(
            f"The graph's {label} has no window along spatial axis {i}: the input there "
            f"has {n} positions ({span} with padding), fewer than the kernel's reach {reach} "
            f"(kernel_shape {k}, dilation {d}). Give the graph a larger input, or a smaller "
            "kernel, dilation or more padding."
        )


def _spread_size(sizes, kernel, strides, dilations, pads):
    """Spatial size of a ConvTranspose of ``sizes`` windows (None stays None)."""
    if sizes is None:
        return None
    rank = len(kernel)
    return [s * (n - 1) + (k - 1) * d + 1 - pads[i] - pads[rank + i]
            for i, (n, k, s, d) in enumerate(zip(sizes, kernel, strides, dilations))]


def _begin_pads(pads):
    """``pads`` with the end pads set to 0: a ConvTranspose spreading dY back
    must drop the positions of the leading padding only; the trailing ones
    are cut (or missing ones added) by :func:`_fit_spatial`, since a window
    may stop before the end padding when the stride does not divide."""
    rank = len(pads) // 2
    return list(pads[:rank]) + [0] * rank


def _input_gradient(g, dy, w, x, kernel, strides, dilations, pads, group):
    """dX of a Conv: a ConvTranspose of dY, fitted to X's spatial size (X's
    last positions, which no window reached when the stride does not divide
    its size, get zeros)."""
    windows = _windows(g, x, kernel, strides, dilations, pads)
    pads = _begin_pads(pads)
    spread = g.ConvTranspose(dy, w, strides=strides, dilations=dilations, pads=pads,
                             group=group)
    return _fit_spatial(g, spread, x, _spread_size(windows, kernel, strides, dilations, pads))


def _weight_gradient(g, inp, dout, kernel, strides, dilations, pads, group, per_group,
                     maybe_empty=False):
    """``dW[m, c, k] = sum over n, o of dout[n, m, o] inp[n, G(m) + c, o s + k d - pad]``.

    Written as one Conv: the input's channels become its batch (grouped
    channels stacked as ``(per_group, group * N, ...)``), ``dout`` transposed
    to ``(M, N, ...)`` is the kernel, and the forward strides and dilations
    swap roles.  The result is cut to the kernel's size.

    ``maybe_empty``: ``dout`` may be empty along a spatial axis (a
    ConvTranspose's input), and onnxruntime's Conv never returns on an
    empty kernel: the kernel gets one more tap of zeros at the end of each
    axis, and the input as much more end padding, which leaves the sums and
    the number of windows as they were.
    """
    rank = len(kernel)
    spatial = _spatial_axes(rank)
    if group == 1:
        stacked = g.Transpose(inp, perm=[1, 0] + spatial)
    else:
        # Every dimension spelt out and allowzero=1: with no channels per
        # group (or an empty batch) a 0 is a 0, and a -1 cannot be resolved.
        batch = g.Shape(inp, start=0, end=1)
        split = g.Reshape(inp, g.Concat(batch, g.ints([group, per_group]),
                                        g.Shape(inp, start=2), axis=0), allowzero=1)
        moved = g.Transpose(split, perm=[2, 1, 0] + [a + 1 for a in spatial])
        stacked = g.Reshape(moved, g.Concat(g.ints([per_group]), g.Mul(batch, g.ints([group])),
                                            g.Shape(inp, start=2), axis=0), allowzero=1)
    kernels = g.Transpose(dout, perm=[1, 0] + spatial)
    if maybe_empty:
        # A Concat of zeros, not a Pad: with a Pad there, onnxruntime's
        # optimised graph lost the Pad's output ("not a graph input,
        # initializer, or output of a previous node").
        for axis in spatial:
            zeros_shape = g.Concat(g.Shape(kernels, start=0, end=axis), g.ints([1]),
                                   g.Shape(kernels, start=axis + 1), axis=0)
            kernels = g.Concat(kernels, g.zeros(zeros_shape, like=kernels), axis=axis)
        pads = list(pads[:rank]) + [p + s for p, s in zip(pads[rank:], strides)]
    out = g.Conv(stacked, kernels, strides=dilations, dilations=strides, pads=pads, group=group)
    dw = g.Transpose(out, perm=[1, 0] + spatial)
    return g.Slice(dw, g.ints([0] * rank), g.ints(kernel), g.ints(spatial))


def _bias_gradient(g, dy, rank):
    return g.reduce("ReduceSum", dy, [0] + _spatial_axes(rank), keepdims=0)


def _channels_per_group(g, w):
    shape = g.static_shape(w)
    if shape is None:
        raise NotDifferentiable("the weight's shape is unknown before run time.")
    return shape[1]


@rule("Conv")
def conv(g, node, dys):
    dy, = dys
    x, w = node.input[:2]
    kernel = _kernel(g, node, w)
    group = node.attr("group", 1)
    strides, dilations, pads = _geometry(g, node, x, kernel)
    _require_windows(g, node, x, kernel, strides, dilations, pads)
    grads = [None] * len(node.input)
    if node.needs(0):
        grads[0] = _input_gradient(g, dy, w, x, kernel, strides, dilations, pads, group)
    if node.needs(1):
        grads[1] = _weight_gradient(g, x, dy, kernel, strides, dilations, pads, group,
                                    _channels_per_group(g, w))
    if node.has_input(2) and node.needs(2):
        grads[2] = _bias_gradient(g, dy, len(kernel))
    return grads


def _transpose_pads(g, node, x, kernel, strides, dilations):
    """Explicit pads of a ConvTranspose (auto_pad and output_shape resolved
    with the equations of the ONNX specification)."""
    rank = len(kernel)
    auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
    output_shape = node.attr("output_shape")
    if auto_pad == "NOTSET" and output_shape is None:
        return [int(p) for p in node.attr("pads") or [0] * (2 * rank)]
    if auto_pad == "VALID" and output_shape is None:
        return [0] * (2 * rank)
    sizes = _spatial_sizes(g, x)
    if sizes is None:
        raise NotDifferentiable(
            "ConvTranspose with auto_pad or output_shape on an input whose spatial size is "
            "unknown before run time; export it with explicit pads."
        )
    if output_shape is None:  # SAME_UPPER / SAME_LOWER: the input size times the stride
        output_shape = [n * s for n, s in zip(sizes, strides)]
    output_shape = list(output_shape)[-rank:]
    padding = node.attr("output_padding") or [0] * rank
    begins, ends = [], []
    for i in range(rank):
        total = (strides[i] * (sizes[i] - 1) + padding[i]
                 + (kernel[i] - 1) * dilations[i] + 1 - output_shape[i])
        if auto_pad == "SAME_UPPER":
            begins.append(total // 2)
            ends.append(total - total // 2)
        else:
            begins.append(total - total // 2)
            ends.append(total // 2)
    return begins + ends


def _require_transpose_output(g, node, x, kernel, strides, dilations, pads):
    """Refuse a ConvTranspose whose (static) output would have no position
    along some axis (pads larger than what the input spreads to):
    onnxruntime refuses it at run time, and onnx's shape inference of the
    gradient graph can abort the process on it."""
    sizes = _spatial_sizes(g, x)
    if sizes is None:
        return
    rank = len(kernel)
    padding = node.attr("output_padding") or [0] * rank
    for i, (n, p, k, s, d) in enumerate(zip(sizes, padding, kernel, strides, dilations)):
        size = s * (n - 1) + p + (k - 1) * d + 1 - pads[i] - pads[rank + i]
        if size >= 1:
            continue
        label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"
        raise ValueError(
            f"The graph's {label} has an output of size {size} along spatial axis {i}: its "
            f"input there has {n} positions, spread by kernel_shape {k}, stride {s} and "
            f"dilation {d} over fewer positions than pads {pads[i]} + {pads[rank + i]} "
            "remove. Give the graph a larger input, or smaller pads."
        )


@rule("ConvTranspose")
def conv_transpose(g, node, dys):
    dy, = dys
    x, w = node.input[:2]
    kernel = _kernel(g, node, w)
    group = node.attr("group", 1)
    strides = [int(s) for s in node.attr("strides") or [1] * len(kernel)]
    dilations = [int(d) for d in node.attr("dilations") or [1] * len(kernel)]
    pads = _transpose_pads(g, node, x, kernel, strides, dilations)
    _require_transpose_output(g, node, x, kernel, strides, dilations, pads)
    grads = [None] * len(node.input)
    if node.needs(0):
        gathered = g.Conv(dy, w, strides=strides, dilations=dilations, pads=pads, group=group)
        # Sizes from X's static shape: Y's, then the number of windows of the
        # Conv of dY.
        x_sizes = _spatial_sizes(g, x)
        produced = None
        if x_sizes is not None:
            rank = len(kernel)
            padding = node.attr("output_padding") or [0] * rank
            sizes = [s * (n - 1) + p + (k - 1) * d + 1 - pads[i] - pads[rank + i]
                     for i, (n, p, k, s, d) in enumerate(
                         zip(x_sizes, padding, kernel, strides, dilations))]
            produced = [(n + pads[i] + pads[rank + i] - (k - 1) * d - 1) // s + 1
                        for i, (n, k, s, d) in enumerate(zip(sizes, kernel, strides, dilations))]
        grads[0] = _fit_spatial(g, gathered, x, produced)
    if node.needs(1):
        sizes = _spatial_sizes(g, x)
        grads[1] = _weight_gradient(g, dy, x, kernel, strides, dilations, pads, group,
                                    _channels_per_group(g, w),
                                    maybe_empty=sizes is None or 0 in sizes)
    if node.has_input(2) and node.needs(2):
        grads[2] = _bias_gradient(g, dy, len(kernel))
    return grads


def _scatter_flat(g, x, indices, dy):
    """Zeros shaped like ``x`` with ``dy`` added at the flat ``indices``."""
    zeros = g.zeros(g.Unsqueeze(g.Size(x), g.ints([0])), like=dy)
    flat = g.ScatterElements(zeros, g.Reshape(indices, g.ints([-1])),
                             g.Reshape(dy, g.ints([-1])), axis=0, reduction="add")
    return g.Reshape(flat, g.shape_tensor(x))


@rule("MaxPool")
def max_pool(g, node, dys):
    dy = dys[0]
    x = node.input[0]
    if node.attr("storage_order", 0) == 0:
        indices = g.forward_output(node, 1, TensorProto.INT64)
    else:  # the indices must be row-major: ask a second MaxPool for them
        attributes = {a.name: node.attr(a.name) for a in node.proto.attribute}
        attributes["storage_order"] = 0
        _, indices = g.MaxPool(x, n_outputs=2, **attributes)
        g.types[indices] = TensorProto.INT64
    return [_scatter_flat(g, x, indices, dy)]


@rule("AveragePool")
def average_pool(g, node, dys):
    dy, = dys
    x, y = node.input[0], node.output[0]
    kernel = _kernel(g, node)
    rank = len(kernel)
    strides, dilations, pads = _geometry(g, node, x, kernel)
    if not node.attr("ceil_mode", 0):
        _require_windows(g, node, x, kernel, strides, dilations, pads, empty_ok=True)
    ones = np.ones([1, 1] + kernel, dtype=np.float32)
    window = g.constant(ones, like=y)
    if node.attr("count_include_pad", 0) and not node.attr("ceil_mode", 0):
        scaled = g.Div(dy, g.constant(float(np.prod(kernel)), like=y))
    else:
        # 1 / divisor of each window, as onnxruntime computes it: an
        # AveragePool of ones gives (elements in the window) / divisor, and
        # a Conv of ones counts the elements in the window.
        ones_x = g.fill(g.Concat(g.ints([1, 1]), g.Shape(x, start=2), axis=0), 1.0, like=y)
        attributes = {a.name: node.attr(a.name) for a in node.proto.attribute}
        pooled = g.AveragePool(ones_x, **attributes)
        # End padding enough for the Conv to see one whole window even when
        # the pool has none (an input smaller than the window gives an
        # empty pool, but a Conv refuses it); the Slice keeps Y's windows.
        extra = [(s - 1 if node.attr("ceil_mode", 0) else 0) + (k - 1) * d
                 for s, k, d in zip(strides, kernel, dilations)]
        counted = g.Conv(ones_x, window, strides=strides, dilations=dilations,
                         pads=pads[:rank] + [p + e for p, e in zip(pads[rank:], extra)])
        counted = g.Slice(counted, g.ints([0] * rank), g.Shape(y, start=2),
                          g.ints(_spatial_axes(rank)))
        counted = g.Max(counted, g.constant(1.0, like=y))
        scaled = g.Mul(dy, g.Div(pooled, counted))
    # Batch and channels as one axis of rows, its length spelt out (a -1
    # cannot be resolved when the pool is empty).
    batch_channels = g.reduce("ReduceProd", g.Shape(dy, start=0, end=2), [0], keepdims=1)
    rows = g.Reshape(scaled, g.Concat(batch_channels, g.ints([1]), g.Shape(dy, start=2),
                                      axis=0), allowzero=1)
    windows = _windows(g, x, kernel, strides, dilations, pads, node.attr("ceil_mode", 0))
    if rank >= 3 and (windows is None or 0 in windows):
        # onnxruntime's ConvTranspose of three or more spatial axes crashes
        # (SIGSEGV) on an input empty along one of them, as an empty pool
        # gives: one more window of zeros at the end of each axis, which
        # spreads zeros past X's end, cut off below.
        rows = g.Pad(rows, g.ints([0] * (2 + rank) + [0, 0] + [1] * rank))
        if windows is not None:
            windows = [w + 1 for w in windows]
    pads = _begin_pads(pads)
    spread = g.ConvTranspose(rows, window, strides=strides, dilations=dilations, pads=pads)
    spread = _fit_spatial(g, spread, x, _spread_size(windows, kernel, strides, dilations, pads))
    return [g.Reshape(spread, g.shape_tensor(x))]


@rule("GlobalAveragePool")
def global_average_pool(g, node, dys):
    x, y = node.input[0], node.output[0]
    sizes = _spatial_sizes(g, x)
    if sizes is not None:
        count = g.constant(float(np.prod(sizes)), like=y)
    else:
        count = g.CastLike(g.Div(g.Size(x), g.Size(y)), y)
    return [g.Expand(g.Div(dys[0], count), g.shape_tensor(x))]


@rule("GlobalMaxPool")
def global_max_pool(g, node, dys):
    # A ReduceMax over the spatial axes, kept: dY goes to each channel's maxima.
    x, y = node.input[0], node.output[0]
    rank = g.rank(x)
    if rank is None:
        raise NotDifferentiable("GlobalMaxPool on a value of unknown rank.")
    return [share_between_ties(g, x, y, dys[0], _spatial_axes(rank - 2))]


#: Operators whose window attributes :func:`check_window_attributes` checks.
WINDOW_OPS = ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool")


def _window_attribute_error(node, problem):
    label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"
    return ValueError(
        f"The graph's {label} has {problem}. kernel_shape, strides and dilations must be "
        "positive, pads non-negative and group at least 1 (onnxruntime refuses the others "
        "or, for some, kills the process with a floating-point exception); fix the graph."
    )


def check_window_attributes(graph):
    """Refuse convolution and pooling nodes with zero or negative sizes.

    onnxruntime rejects most of them when a session is created, with an
    error of its own, but not all: a Conv with ``group=0`` on zero input
    channels divides by zero in its kernel and kills the process (SIGFPE).
    This check runs before any session does.

    Raises
    ------
    ValueError
        Naming the node, the attribute and its value.
    """
    initializers = {i.name: i for i in graph.initializer}
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                check_window_attributes(attribute.g)
            elif attribute.type == attribute.GRAPHS:
                for subgraph in attribute.graphs:
                    check_window_attributes(subgraph)
        if node.domain not in ("", "ai.onnx") or node.op_type not in WINDOW_OPS:
            continue
        values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for name in ("kernel_shape", "strides", "dilations"):
            value = values.get(name)
            if value is not None and any(int(v) < 1 for v in value):
                raise _window_attribute_error(node, f"{name}={list(value)}")
        pads = values.get("pads")
        if pads is not None and any(int(p) < 0 for p in pads):
            raise _window_attribute_error(node, f"pads={list(pads)}")
        if node.op_type in ("Conv", "ConvTranspose") and int(values.get("group", 1)) < 1:
            raise _window_attribute_error(node, f"group={values['group']}")
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if (node.op_type in ("Conv", "ConvTranspose") and weight is not None
                and any(int(k) < 1 for k in weight.dims[2:])):
            # onnxruntime's Conv never returns on an empty kernel.
            raise _window_attribute_error(
                node, f"a weight {node.input[1]!r} of shape {tuple(weight.dims)} (an empty kernel)")
