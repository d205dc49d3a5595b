"""onnxfit's own reverse-mode differentiation of ONNX graphs (backend ``'onnxfit'``).

:func:`vjp` walks a graph backwards from the seeded values and asks the rule
of each operator on the way (:mod:`onnxfit.gradient.rules`) for the
cotangents of its inputs; cotangents reaching one value from several
consumers are summed.  Everything written is a default-domain ONNX
operator, so the result runs on any onnxruntime build, CPU or GPU.

Operators with an expansion instead of a rule (LSTM, GRU, RNN) are first
replaced, in the returned graph only, by the equivalent subgraph their
expansion writes, which the rules then differentiate.

Before writing anything, the graph is checked: every operator between a
differentiated weight and a seed must have a rule, and every weight must
reach a seed through something other than operators whose derivative is
zero (Floor, ArgMax, comparisons, ...).  Otherwise :class:`GradientError`
names the operators, their nodes and the weights behind them.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnx_graphs import NodeWriter, node_reads, value_types
from .rules import CONSTANT_INPUTS, EXPANSIONS, RULES, ZERO_DERIVATIVE, NotDifferentiable
from .rules.conv import check_window_attributes

#: Oldest default-domain opset the rules write for: they use Shape with
#: start/end and CastLike (opset 15) and ScatterElements with
#: reduction='add' (opset 16).
MIN_OPSET = 16

#: Element types that carry a gradient.
FLOAT_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
})


class GradientError(ValueError):
    """A graph cannot be differentiated with respect to the weights asked for."""


# -- what a rule sees -------------------------------------------------------------
class NodeView:
    """A node as its rule sees it.

    Attributes
    ----------
    proto : onnx.NodeProto
        The forward node (rules may add optional outputs through
        :meth:`RuleContext.forward_output`).
    op_type, name : str
    input, output : list of str
        Names; ``""`` stands for an omitted optional input or output.
    """

    def __init__(self, proto, needs):
        self.proto = proto
        self.op_type = proto.op_type
        self.name = proto.name
        self.input = list(proto.input)
        self.output = list(proto.output)
        self._needs = needs
        self._attributes = {a.name: a for a in proto.attribute}

    def attr(self, name, default=None):
        """Value of attribute ``name`` (strings decoded), or ``default``."""
        attribute = self._attributes.get(name)
        if attribute is None:
            return default
        value = helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode() for v in value]
        return value

    def has_input(self, index):
        """Whether optional input ``index`` is given."""
        return index < len(self.input) and self.input[index] != ""

    def needs(self, index):
        """Whether input ``index`` needs a cotangent (it depends on a
        differentiated weight or input)."""
        return index < len(self._needs) and self._needs[index]


class RuleContext(NodeWriter):
    """A :class:`~onnxfit.onnx_graphs.NodeWriter` that also knows the forward
    graph: the static shapes inferred for its values, its constants, and how
    to reduce a broadcast cotangent.

    Shapes are tuples whose entries are ints (static), strings (symbolic
    dimensions, equal when their names are) or None (unknown); a shape is
    None when even the rank is unknown.
    """

    def __init__(self, prefix, opset, types, shapes, constants, taken):
        super().__init__(prefix, opset, types, taken)
        self._shapes = shapes
        self._constant_values = constants
        self._shape_nodes = {}
        # Shape tensors that spell every dimension out (no -1): a Reshape to
        # one of them must take a 0 as 0 (allowzero=1), not as "copy the
        # input's dimension", or an empty value gets the wrong shape.
        self._exact_shapes = set()

    def Reshape(self, data, shape, **attributes):
        """``Reshape``, with ``allowzero=1`` to a shape of :meth:`shape_tensor`."""
        if shape in self._exact_shapes and "allowzero" not in attributes:
            attributes["allowzero"] = 1
        return self.op("Reshape", data, shape, **attributes)

    # -- what is known about forward values -----------------------------------------
    def shape(self, name):
        """Inferred shape of ``name`` (see the class docstring), or None."""
        return self._shapes.get(name)

    def rank(self, name):
        """Rank of ``name``, or None when unknown."""
        shape = self._shapes.get(name)
        return None if shape is None else len(shape)

    def static_shape(self, name):
        """Shape of ``name`` as ints when every dimension is static, else None."""
        shape = self._shapes.get(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(shape)

    def set_shape(self, name, shape):
        """Record the shape of a value a rule wrote (so that ``sum_to`` can
        reason about it)."""
        self._shapes[name] = None if shape is None else tuple(shape)

    def const_value(self, name):
        """Value of ``name`` when it is an initializer or a Constant, else None."""
        if not name:
            return None
        value = self._constant_values.get(name)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
            self._constant_values[name] = value
        return value

    # -- helpers rules share --------------------------------------------------------------
    def shape_of(self, name):
        """``Shape(name)``, written once per value."""
        if name not in self._shape_nodes:
            self._shape_nodes[name] = self.Shape(name)
            self._exact_shapes.add(self._shape_nodes[name])
        return self._shape_nodes[name]

    def shape_tensor(self, name):
        """An int64 tensor of ``name``'s shape: a constant when static."""
        static = self.static_shape(name)
        result = self.ints(static) if static is not None else self.shape_of(name)
        self._exact_shapes.add(result)
        return result

    def fill(self, shape, value, like):
        """A tensor of the int64 ``shape`` filled with ``value``, typed like ``like``."""
        filler = numpy_helper.from_array(np.full(1, value, dtype=self._numpy_type(like)))
        return self.ConstantOfShape(shape, value=filler)

    def zeros(self, shape, like):
        """Zeros of the int64 ``shape`` tensor, typed like ``like``."""
        return self.fill(shape, 0.0, like)

    def zeros_like(self, name):
        """Zeros of the shape and type of ``name``."""
        return self.zeros(self.shape_tensor(name), like=name)

    def _numpy_type(self, name):
        elem = self.elem_type(name)
        return helper.tensor_dtype_to_np_dtype(elem if elem else TensorProto.FLOAT)

    def forward_output(self, node, index, elem_type=None):
        """Name of output ``index`` of the forward ``node``, adding it when the
        graph omitted this optional output (MaxPool's indices, say)."""
        outputs = node.proto.output
        while len(outputs) <= index:
            outputs.append("")
        if not outputs[index]:
            outputs[index] = self.fresh(f"{node.op_type}_out{index}")
            if elem_type is not None:
                self.types[outputs[index]] = elem_type
        node.output = list(outputs)
        return outputs[index]

    def sum_to(self, dy, x, y):
        """Reduce ``dy``, shaped like the broadcast result ``y``, to ``x``'s shape.

        Axes where ``x`` was broadcast are summed.  Where the inferred
        shapes leave it open whether a dimension was broadcast (``x`` has a
        symbolic or unknown dimension where ``y``'s differs), the axes are
        chosen at run time from ``x``'s actual shape.
        """
        xs, ys = self.shape(x), self.shape(y)
        if xs is None or ys is None:
            return self._sum_to_dynamic(dy, x)
        lead = len(ys) - len(xs)
        axes = list(range(lead))
        undecided = []
        for k, dim in enumerate(xs):
            out_dim = ys[lead + k]
            if dim == out_dim and dim is not None:
                continue  # same static size or same symbol: not broadcast
            if dim == 1:
                axes.append(lead + k)
            elif isinstance(dim, int):
                continue  # a static size other than 1 is never broadcast
            else:
                undecided.append(k)
        if not axes and not undecided:
            return dy
        total = dy
        offset = lead  # where x's axis k lies in ``total``
        if axes:
            width = ys[-1] if ys else None
            if (lead == 1 and len(ys) == 2 and axes == [0] and not undecided
                    and isinstance(width, int) and width >= 16):
                # A bias of a dense layer: ones @ dY is one vectorised kernel
                # where ReduceSum over the batch axis is a slower loop.
                rows = self.Shape(dy, start=0, end=1)
                return self.MatMul(self.fill(rows, 1.0, like=dy), dy)
            keep = 0 if len(axes) == lead else 1
            total = self.reduce("ReduceSum", total, axes, keepdims=keep)
            if keep == 0:
                offset = 0
            if not undecided and (keep == 0 or lead == 0):
                return total
        if undecided:
            # Sum over the axes where x's actual dimension is 1.
            dims = self.Gather(self.shape_of(x), self.ints(undecided))
            is_one = self.Equal(dims, self.ints([1]))
            picked = self.Compress(self.ints([k + offset for k in undecided]), is_one, axis=0)
            total = self.reduce("ReduceSum", total, picked, keepdims=1, noop_with_empty_axes=1)
        return self.Reshape(total, self.shape_tensor(x))

    def _sum_to_dynamic(self, dy, x):
        """:meth:`sum_to` when a rank is unknown: every axis decided at run time."""
        x_shape = self.shape_of(x)
        dy_shape = self.Shape(dy)
        zero, one = self.ints([0]), self.ints([1])
        lead = self.Sub(self.Size(dy_shape), self.Size(x_shape))
        lead_axes = self.Range(self.Squeeze(zero), lead, self.Squeeze(one))
        total = self.reduce("ReduceSum", dy, lead_axes, keepdims=0, noop_with_empty_axes=1)
        all_axes = self.Range(self.Squeeze(zero), self.Size(x_shape), self.Squeeze(one))
        ones = self.Compress(all_axes, self.Equal(x_shape, one), axis=0)
        total = self.reduce("ReduceSum", total, ones, keepdims=1, noop_with_empty_axes=1)
        return self.Reshape(total, x_shape)

    def accumulate(self, names):
        """The sum of several cotangents of one value (None for none)."""
        if not names:
            return None
        if len(names) == 1:
            return names[0]
        if len(names) == 2:
            return self.Add(*names)
        return self.Sum(*names)


# -- the reverse pass -----------------------------------------------------------------
def _static_shapes(model):
    shapes = {}
    graph = model.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
        if tensor is None or not tensor.HasField("shape"):
            continue
        dims = []
        for d in tensor.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[value.name] = tuple(dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _infer(model):
    """The model with shapes inferred as far as onnx can (data propagation
    included, so that shapes computed by Shape/Concat/Reshape are known)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a partially known graph is still differentiable
        return model


def _constants(graph):
    values = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attribute = {a.name: a for a in node.attribute}
            if "value" in attribute:
                values[node.output[0]] = attribute["value"].t
    return values


def _is_default_domain(node):
    return node.domain in ("", "ai.onnx")


def _constant_positions(node):
    """Positions of ``node``'s inputs without a derivative (see
    :data:`onnxfit.gradient.rules.CONSTANT_INPUTS`)."""
    if not _is_default_domain(node):
        return frozenset()
    return CONSTANT_INPUTS.get(node.op_type, frozenset())


def _subgraph_mask(node, masks):
    """Weights that the subgraphs of ``node`` read from the outer graph."""
    mask = 0
    for name in node_reads(node) - {i for i in node.input if i}:
        mask |= masks.get(name, 0)
    return mask


def _refusal(node, reason, wrt, through_rules, bits):
    """The GradientError of a node its rule or expansion cannot handle,
    naming the weights behind it and what works instead."""
    weights = [w for w in wrt if any(
        through_rules.get(i, 0) & bits[w] for i in node.input if i)]
    return GradientError(
        f"onnxfit cannot differentiate {_node_label(node)}: {reason} It lies "
        f"between the differentiated {weights} and the loss; freeze them "
        "(weights_to_train=...) or train another output (output_name=...)."
    )


def _node_label(node):
    return f"{node.op_type} (node {node.name or node.output[0]!r})"


def _dependencies(nodes, wrt, seeds, types):
    """Which weights each value depends on, and which values the seeds need.

    Returns
    -------
    bits : dict of str -> int
        The bit of each weight of ``wrt``.
    through_rules, at_all : dict of str -> int
        Masks of the weights each value depends on through differentiable
        operators, and at all.  What a node reads includes what its
        subgraphs (If, Loop, Scan) read.
    on_path : set of str
        Values some seed depends on.
    """
    bits = {name: 1 << k for k, name in enumerate(wrt)}
    through_rules, at_all = dict(bits), dict(bits)
    for node in nodes:
        mask_any = 0
        mask_diff = 0
        constant = _constant_positions(node)
        for name in node_reads(node):
            mask_any |= at_all.get(name, 0)
        for index, name in enumerate(node.input):
            if index not in constant:
                mask_diff |= through_rules.get(name, 0)
        mask_diff |= _subgraph_mask(node, through_rules)
        if not mask_any:
            continue
        passes = not (_is_default_domain(node) and node.op_type in ZERO_DERIVATIVE)
        for name in node.output:
            if not name:
                continue
            at_all[name] = mask_any
            if mask_diff and passes and types.get(name, TensorProto.FLOAT) in FLOAT_TYPES:
                through_rules[name] = mask_diff
    on_path = set(seeds)
    for node in reversed(nodes):
        if any(name in on_path for name in node.output):
            on_path.update(node_reads(node))
    return bits, through_rules, at_all, on_path


def _expand(graph, nodes, types, shapes, through_rules, on_path, bits, wrt, opset, prefix):
    """Replace, in ``graph``, each node with an expansion (LSTM, GRU, RNN)
    that lies between a differentiated weight and a seed by the subgraph its
    expansion writes (see :data:`onnxfit.gradient.rules.EXPANSIONS`).

    Returns
    -------
    bool
        Whether a node was replaced (shapes must then be inferred again).

    Raises
    ------
    GradientError
        When an expansion refuses its node.
    """
    targets = [
        node for node in nodes
        if _is_default_domain(node) and node.op_type in EXPANSIONS
        and any(through_rules.get(name, 0) for name in node.input if name)
        and any(name in on_path for name in node.output if name)
    ]
    if not targets:
        return False
    taken = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    taken |= {o for n in nodes for o in n.output} | {n.name for n in nodes}
    ctx = RuleContext(prefix + "expand.", opset, types, dict(shapes), _constants(graph), taken)
    replaced = {}
    for node in targets:
        start = len(ctx.nodes)
        view = NodeView(node, [bool(name) and name in through_rules for name in node.input])
        try:
            values = EXPANSIONS[node.op_type](ctx, view)
        except NotDifferentiable as exc:
            raise _refusal(node, exc, wrt, through_rules, bits) from None
        written = ctx.nodes[start:]
        _bind(ctx, written, values, node.output)
        replaced[id(node)] = written
    kept = []
    for node in nodes:
        kept.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(kept)
    return True


def _bind(ctx, written, values, outputs):
    """Make the ``written`` nodes compute ``values`` under the names of the
    replaced node's ``outputs``: rename the producing node's output when no
    other written node reads the value, otherwise copy it with Identity
    (appended to ``written``)."""
    producers = {o: node for node in written for o in node.output}
    readers = {}
    for node in written:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    renamed = {}
    for value, target in zip(values, outputs):
        if not target or value is None:
            continue
        node = producers.get(value)
        if node is not None and not readers.get(value) and value not in renamed:
            node.output[list(node.output).index(value)] = target
            renamed[value] = target
        else:
            start = len(ctx.nodes)
            ctx.Identity(renamed.get(value, value), outputs=[target])
            written.extend(ctx.nodes[start:])


def vjp(model, seeds, wrt, gradient_names, prefix="onnxfit.vjp."):
    """Append to ``model`` the vector-Jacobian products of its seeded values.

    See :func:`onnxfit.gradient.build_vjp`, which validates the arguments
    and calls this for the ``'onnxfit'`` backend.

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified.
    seeds : dict of str -> str or 1
        Seeded value -> name of its cotangent input, or 1.
    wrt : list of str
        Graph inputs or initializers to differentiate with respect to.
    gradient_names : dict of str -> str
        Name of the gradient output of each name of ``wrt``.
    prefix : str
        Prefix of the names of the nodes and values written.

    Returns
    -------
    onnx.ModelProto
        Inputs: the model's, then each cotangent input not already defined;
        outputs: the model's, then the gradients.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < MIN_OPSET:
        raise GradientError(
            f"onnxfit differentiates graphs at opset {MIN_OPSET} or newer; this one is at "
            f"opset {opset}. Convert it first (onnx.version_converter.convert_version; "
            "OnnxFunction and the estimators convert older graphs themselves)."
        )
    check_window_attributes(model.graph)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    inferred = _infer(result)
    types = value_types(inferred)
    shapes = _static_shapes(inferred)
    nodes = list(graph.node)
    bits, through_rules, at_all, on_path = _dependencies(nodes, wrt, seeds, types)
    if _expand(graph, nodes, types, shapes, through_rules, on_path, bits, wrt, opset, prefix):
        inferred = _infer(result)
        types = value_types(inferred)
        shapes = _static_shapes(inferred)
        nodes = list(graph.node)
        bits, through_rules, at_all, on_path = _dependencies(nodes, wrt, seeds, types)

    _check(nodes, seeds, wrt, bits, through_rules, at_all, on_path)

    taken = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    taken |= {o for n in nodes for o in n.output} | set(seeds.values()) - {1}
    taken |= set(gradient_names.values())
    ctx = RuleContext(prefix, opset, types, shapes, _constants(graph), taken)
    cotangents = {}
    declared = {i.name for i in graph.input} | {o for n in nodes for o in n.output}
    for value, seed in seeds.items():
        if isinstance(seed, str):
            cotangents[value] = [seed]
            if seed not in declared:
                elem = types.get(value, TensorProto.FLOAT)
                shape = shapes.get(value)
                graph.input.append(helper.make_tensor_value_info(
                    seed, elem, None if shape is None else list(shape)))
                ctx.types[seed] = elem
                declared.add(seed)
        else:
            one = ctx.constant(1.0, like=value)
            if shapes.get(value) != ():
                one = ctx.Expand(one, ctx.shape_tensor(value))
            cotangents[value] = [one]

    for node in reversed(nodes):
        if not any(name in cotangents for name in node.output):
            continue
        constant = _constant_positions(node)
        needs = [bool(name) and name in through_rules and k not in constant
                 for k, name in enumerate(node.input)]
        if not any(needs) or not (_is_default_domain(node) and node.op_type in RULES):
            # Zero-derivative operators and values that no weight reaches.
            for name in node.output:
                cotangents.pop(name, None)
            continue
        output_cotangents = [ctx.accumulate(cotangents.pop(name, None)) for name in node.output]
        view = NodeView(node, needs)
        try:
            input_cotangents = RULES[node.op_type](ctx, view, output_cotangents)
        except NotDifferentiable as exc:
            raise _refusal(node, exc, wrt, through_rules, bits) from None
        input_cotangents = list(input_cotangents)
        input_cotangents += [None] * (len(node.input) - len(input_cotangents))
        for index, (name, cotangent) in enumerate(zip(node.input, input_cotangents)):
            if needs[index] and cotangent is None:  # pragma: no cover - a rule's bug
                raise GradientError(
                    f"The rule of {node.op_type} gave no cotangent for input {index} "
                    f"({name!r}) of node {node.name!r}, which needs one."
                )
            if cotangent is not None and needs[index]:
                cotangents.setdefault(name, []).append(cotangent)

    finals = {}
    for name in wrt:
        total = ctx.accumulate(cotangents.get(name))
        finals[name] = ctx.zeros_like(name) if total is None else total
    _name_outputs(ctx, finals, gradient_names, declared)
    graph.node.extend(ctx.nodes)
    for name in wrt:
        elem = types.get(name, TensorProto.FLOAT)
        shape = shapes.get(name)
        graph.output.append(helper.make_tensor_value_info(
            gradient_names[name], elem, None if shape is None else list(shape)))
    return result


def _name_outputs(ctx, finals, gradient_names, declared):
    """Give each gradient its output name: rename the node that computes it
    when nothing else reads that value, otherwise copy it with Identity."""
    producers = {o: node for node in ctx.nodes for o in node.output}
    readers = {}
    for node in ctx.nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    claimed = {}
    for weight, value in finals.items():
        claimed[value] = claimed.get(value, 0) + 1
    for weight, value in finals.items():
        target = gradient_names[weight]
        node = producers.get(value)
        if (node is not None and value not in declared and not readers.get(value)
                and claimed[value] == 1):
            node.output[list(node.output).index(value)] = target
        else:
            ctx.Identity(value, outputs=[target])


def _without_rule(nodes, wrt, bits, through_rules, on_path, known):
    """``(node, weights)`` for each node between the weights and the seeds
    whose operator is not in ``known``, with the weights whose path crosses
    it."""
    missing = []
    for node in nodes:
        reads = node_reads(node)
        feeds = any(through_rules.get(name, 0) for name in reads)
        reaches = any(name in on_path for name in node.output)
        if not (feeds and reaches):
            continue
        if _is_default_domain(node) and node.op_type in known:
            continue
        weights = [w for w in wrt if any(through_rules.get(name, 0) & bits[w] for name in reads)]
        missing.append((node, weights))
    return missing


def missing_rules(model, seeds, wrt):
    """The operators between weights ``wrt`` and outputs ``seeds`` that
    onnxfit cannot differentiate (no rule, no expansion), without refusing.

    The walk training runs before differentiating, which refuses the graph
    at the first such operator (see :func:`build_vjp`); this lists them all
    (``onnxfit info`` shows them).

    Parameters
    ----------
    model : onnx.ModelProto
    seeds : iterable of str
        Outputs the derivative starts from.
    wrt : list of str
        Weights.

    Returns
    -------
    list of (onnx.NodeProto, list of str)
        Each node, with the weights whose path to the seeds crosses it.
    """
    types = value_types(onnx.shape_inference.infer_shapes(model))
    nodes = list(model.graph.node)
    bits, through, _, on_path = _dependencies(nodes, list(wrt), {s: 1 for s in seeds}, types)
    known = set(RULES) | set(EXPANSIONS) | set(ZERO_DERIVATIVE)
    return _without_rule(nodes, list(wrt), bits, through, on_path, known)


def _check(nodes, seeds, wrt, bits, through_rules, at_all, on_path):
    """Refuse, before writing anything, what cannot be differentiated."""
    missing = _without_rule(nodes, wrt, bits, through_rules, on_path,
                            set(RULES) | set(ZERO_DERIVATIVE))
    if missing:
        listed = "; ".join(
            f"{_node_label(node)}{' in domain ' + repr(node.domain) if node.domain else ''}, "
            f"reached from {weights}"
            for node, weights in missing[:5]
        )
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise GradientError(
            f"onnxfit has no gradient rule for {listed}{more}. Weights whose path to "
            "the loss crosses such an operator cannot be trained: freeze them "
            "(weights_to_train= listing only the others), or train an output that "
            "does not depend on them through it (output_name=...). "
            "onnxfit.gradient.differentiable_ops() lists the operators onnxfit "
            "differentiates."
        )
    reached_diff = 0
    reached_any = 0
    for seed in seeds:
        reached_diff |= through_rules.get(seed, 0)
        reached_any |= at_all.get(seed, 0)
    frozen = [w for w in wrt if reached_any & bits[w] and not reached_diff & bits[w]]
    if frozen:
        # Where a frozen weight's differentiable path ends: a node it reaches
        # whose outputs on the way to the loss carry no derivative of it
        # (zero-derivative operators, casts to integers, type-only inputs).
        lost = 0
        for w in frozen:
            lost |= bits[w]
        blockers = sorted({
            _node_label(node) for node in nodes
            if any(through_rules.get(name, 0) & lost for name in node_reads(node))
            and any(name in on_path and not through_rules.get(name, 0) & lost
                    for name in node.output if name)
        })
        raise GradientError(
            f"{frozen} reach the loss only through operators whose derivative is "
            f"zero ({', '.join(blockers)}): training would never move them. Freeze "
            "them (weights_to_train= listing only the others), or train another "
            "output (output_name=...)."
        )
