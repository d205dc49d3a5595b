"""Small ONNX graphs: the one place where onnxfit writes ONNX by hand.

Losses, penalties and weight updates are written as ``onnx.parser`` text
(readable, and checked by ``onnx.checker`` like any other model) and turned
into ``GraphProto`` pieces here.  The engines then either *append* a piece to
a larger graph (the fused engine) or run it as its own small session (the
forward-backward engine); both go through the helpers of this module, so each
piece of math is written exactly once.

Gradient rules, whose nodes depend on the shapes and attributes of the node
they differentiate, write their nodes through :class:`NodeWriter` instead:
one call per node (``w.Mul(a, b)``), fresh names, typed constants.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, parser

#: Opset used for the graphs onnxfit writes itself, and the lowest opset of
#: the graphs the estimators and OnnxFunction train (they convert older
#: ones up to it; the gradient rules alone need 16).
OPSET = 17
#: Opsets onnxfit asks skl2onnx for (demo, tests): every supported onnxruntime
#: runs them, and onnxfit trains them without converting them.
CONVERTER_OPSETS = {"": OPSET, "ai.onnx.ml": 3}

_NUMPY_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
}
_ONNX_TO_NUMPY = {v: k for k, v in _NUMPY_TO_ONNX.items()}
_ONNX_TYPE_NAMES = {TensorProto.FLOAT: "float", TensorProto.DOUBLE: "double"}


def onnx_elem_type(dtype):
    """Return the ONNX element type of a floating numpy dtype (float32/64)."""
    try:
        return _NUMPY_TO_ONNX[np.dtype(dtype)]
    except KeyError:
        raise ValueError(
            f"onnxfit trains float32 or float64 graphs, not {np.dtype(dtype)}."
        ) from None


def numpy_dtype(elem_type):
    """Return the numpy dtype of an ONNX float element type, or None."""
    return _ONNX_TO_NUMPY.get(elem_type)


def tensor_elem_type(value_info):
    """Element type of a ValueInfoProto, or None when it is not a tensor."""
    if not value_info.type.HasField("tensor_type"):
        return None
    return value_info.type.tensor_type.elem_type


def value_types(model):
    """Element type of every tensor value ``model`` declares: inputs,
    outputs, value_info (after shape inference, intermediate values) and
    initializers."""
    graph = model.graph
    types = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        elem = tensor_elem_type(value)
        if elem:
            types[value.name] = elem
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def parse_piece(text, dtype, **constants):
    """Parse one piece of math written in ``onnx.parser`` graph syntax.

    Parameters
    ----------
    text : str
        Graph text.  ``{T}`` stands for the element type (``float`` or
        ``double``); other ``{name}`` fields are filled from ``constants``.
    dtype : numpy dtype
        Element type of the piece.
    **constants
        Values substituted in the text (hyperparameters such as a momentum
        or a Huber threshold), formatted with full precision.

    Returns
    -------
    onnx.GraphProto
    """
    type_name = _ONNX_TYPE_NAMES[onnx_elem_type(dtype)]
    fields = {k: repr(float(v)) for k, v in constants.items()}
    graph = parser.parse_graph(text.format(T=type_name, **fields))
    return graph


def piece_model(graph, opset=OPSET, other_opsets=()):
    """Wrap a piece in a ModelProto that every supported onnxruntime loads.

    ``other_opsets`` are OperatorSetIdProto of other domains the piece uses
    (``com.microsoft`` in an automatic derivative, say).
    """
    imports = [helper.make_opsetid("", opset)] + [
        o for o in other_opsets if o.domain not in ("", "ai.onnx")
    ]
    model = helper.make_model(graph, opset_imports=imports)
    # The oldest IR that carries these opsets: every supported runtime loads it.
    model.ir_version = helper.find_min_ir_version_for(imports, ignore_unknown=True)
    check_graph(model)
    return model


def check_graph(model, check_types=True):
    """``onnx.checker`` for graphs whose inputs or outputs have an unknown
    rank (pieces take tensors of any rank, ``{T}[]``; a reduction over axes
    given at run time has an output of unknown rank).

    ``onnx.checker.check_model`` rejects those on a main graph ("Field
    'shape' of 'type' is required") while onnxruntime runs them: every node
    is checked, then types with strict shape inference, instead.

    Parameters
    ----------
    model : onnx.ModelProto
    check_types : bool, default=True
        Also run strict type inference.

    Raises
    ------
    onnx.checker.ValidationError, onnx.shape_inference.InferenceError
    """
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):  # onnx knows no other domain's schemas
            onnx.checker.check_node(node, ctx)
    if check_types:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def existing_names(graph):
    """All value names defined in ``graph``: inputs, initializers, outputs
    of nodes."""
    names = {i.name for i in graph.input}
    names.update(i.name for i in graph.initializer)
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def append_piece(graph, piece, prefix, inputs=None, outputs=None):
    """Append the nodes of ``piece`` to ``graph`` in place.

    Parameters
    ----------
    graph : onnx.GraphProto
        Graph to extend (modified in place: callers pass their own copy).
    piece : onnx.GraphProto
        Piece made by :func:`parse_piece`.
    prefix : str
        Prefix given to the piece's intermediate names so that several
        copies of one piece (one per weight, say) never collide.
    inputs : dict, optional
        Maps a piece input to a name in ``graph``.  Piece inputs that are
        not mapped keep their own name: if ``graph`` already defines that
        name they connect to it, otherwise they become new graph inputs.
    outputs : dict, optional
        Maps a piece output to the name it gets in ``graph``.  Unmapped
        outputs are named ``prefix + name``.

    Returns
    -------
    dict
        Piece output name -> name in ``graph``.
    """
    inputs = dict(inputs or {})
    outputs = dict(outputs or {})
    defined = existing_names(graph)
    rename = {}
    for value in piece.input:
        target = inputs.get(value.name, value.name)
        rename[value.name] = target
        if target not in defined:
            new_input = graph.input.add()
            new_input.CopyFrom(value)
            new_input.name = target
            defined.add(target)
    for value in piece.output:
        rename[value.name] = outputs.get(value.name, prefix + value.name)
    for init in piece.initializer:
        rename[init.name] = prefix + init.name
        new_init = graph.initializer.add()
        new_init.CopyFrom(init)
        new_init.name = rename[init.name]
    for node in piece.node:
        new_node = graph.node.add()
        new_node.CopyFrom(node)
        new_node.name = prefix + (node.name or node.output[0])
        for seq in (new_node.input, new_node.output):
            for k, name in enumerate(seq):
                if name:
                    seq[k] = rename.setdefault(name, prefix + name)
    return {v.name: rename[v.name] for v in piece.output}


_ADD_TEXT = """
add_terms ({T}[] a, {T}[] b) => ({T}[] total) {{
    total = Add(a, b)
}}
"""

_SAME_TEXT = """
same ({T}[] a) => ({T}[] same) {{
    same = Identity(a)
}}
"""


def append_sum(graph, terms, total, dtype, prefix):
    """Append ``total = terms[0] + terms[1] + ...`` (values of ``dtype``).

    A chain of ``Add`` (onnxruntime-training 1.19.2 differentiates no
    ``Sum``).  Intermediate names start with ``prefix``, which must not be
    the prefix of another piece of ``graph``.
    """
    if len(terms) == 1:
        append_piece(graph, parse_piece(_SAME_TEXT, dtype), prefix, {"a": terms[0]},
                     {"same": total})
        return
    add = parse_piece(_ADD_TEXT, dtype)
    current = terms[0]
    for k, term in enumerate(terms[1:]):
        out = total if k == len(terms) - 2 else f"{prefix}partial{k}"
        append_piece(graph, add, f"{prefix}add{k}.", {"a": current, "b": term}, {"total": out})
        current = out


def set_outputs(graph, names_and_types):
    """Replace the outputs of ``graph`` by ``(name, elem_type, shape)``."""
    del graph.output[:]
    for name, elem_type, shape in names_and_types:
        graph.output.append(helper.make_tensor_value_info(name, elem_type, shape))


def rename_value(graph, old, new):
    """Rename value ``old`` to ``new`` wherever ``graph`` defines or reads it
    (nodes and graph outputs)."""
    for node in graph.node:
        for seq in (node.input, node.output):
            for k, name in enumerate(seq):
                if name == old:
                    seq[k] = new
    for value in graph.output:
        if value.name == old:
            value.name = new


def scalar_input(name, dtype):
    """Value info of a scalar graph input of ``dtype``."""
    return helper.make_tensor_value_info(name, onnx_elem_type(dtype), [])


def merge_opset_imports(model, other):
    """Add to ``model`` the opset imports of ``other`` that it lacks (after
    pasting ``other``'s nodes into it, say)."""
    domains = {o.domain for o in model.opset_import}
    for opset in other.opset_import:
        if opset.domain not in domains:
            model.opset_import.append(opset)
            domains.add(opset.domain)
    return model


def prune_graph(graph):
    """Keep only the nodes the outputs need, in a topological order.

    Nodes that no graph output depends on and initializers no kept node
    reads are removed (graph inputs are kept); the remaining nodes are
    ordered so that every value is defined before it is read, keeping the
    original order where it already is.

    Parameters
    ----------
    graph : onnx.GraphProto
        Modified in place.
    """
    reads = [node_reads(node) for node in graph.node]
    producer = {}
    for k, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer[name] = k
    needed, stack = set(), [o.name for o in graph.output]
    while stack:
        k = producer.get(stack.pop())
        if k is not None and k not in needed:
            needed.add(k)
            stack.extend(reads[k])
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    pending = sorted(needed)
    ordered = []
    while pending:
        remaining = []
        for k in pending:
            # Values a subgraph defines for itself count as read too: harmless.
            if all(i in ready for i in reads[k] if i in producer):
                ordered.append(k)
                ready.update(graph.node[k].output)
            else:
                remaining.append(k)
        if len(remaining) == len(pending):
            missing = sorted({i for k in remaining for i in reads[k] if i not in ready})
            raise ValueError(f"The graph has a cycle through {missing[:5]}")
        pending = remaining
    used = {i for k in ordered for i in reads[k]}
    used.update(o.name for o in graph.output)
    initializers = [i for i in graph.initializer if i.name in used]
    nodes = [graph.node[k] for k in ordered]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def node_reads(node):
    """Names a node reads: its inputs and what its subgraphs read."""
    names = {i for i in node.input if i}
    for attribute in node.attribute:
        graphs = list(attribute.graphs)
        if attribute.HasField("g"):
            graphs.append(attribute.g)
        for subgraph in graphs:
            for inner in subgraph.node:
                names |= node_reads(inner)
    return names


def fold_cast_like(model):
    """Replace ``CastLike`` of constants by constants of the target type.

    Pieces written once for float32 and float64 take their constants
    through ``CastLike(constant, x)``; onnxruntime cannot fold those (``x``
    is not constant), so each would cost a kernel per run.  Where onnx's
    shape inference knows the element type of ``x``, ``CastLike(Constant)``
    becomes a ``Constant`` and ``CastLike(ConstantOfShape)`` a
    ``ConstantOfShape`` of that type; the other ones are left as they are.

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place.

    Returns
    -------
    onnx.ModelProto
    """
    graph = model.graph
    try:
        types = value_types(onnx.shape_inference.infer_shapes(model))
    except Exception:  # inference is an optimisation here, never a requirement
        return model
    producers = {o: node for node in graph.node for o in node.output}
    folded = set()
    for k, node in enumerate(graph.node):
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx"):
            continue
        target = types.get(node.input[1])
        source = producers.get(node.input[0])
        if target not in _ONNX_TO_NUMPY or source is None or source.domain not in ("", "ai.onnx"):
            continue
        if source.op_type == "Constant" and [a.name for a in source.attribute] == ["value"]:
            inputs = []
        elif source.op_type == "ConstantOfShape":
            inputs = list(source.input)
        else:
            continue
        value = numpy_helper.to_array(source.attribute[0].t) if source.attribute else (
            np.zeros(1, np.float32))  # ConstantOfShape's default value
        tensor = numpy_helper.from_array(value.astype(_ONNX_TO_NUMPY[target]))
        graph.node[k].CopyFrom(helper.make_node(
            source.op_type, inputs, list(node.output), name=node.name or node.output[0],
            value=tensor,
        ))
        folded.update(source.output)
    if folded:
        # Drop the float32 constants nothing reads any more.
        read = {i for node in graph.node for i in node_reads(node)}
        read.update(o.name for o in graph.output)
        kept = [n for n in graph.node if not (set(n.output) <= folded and not read & set(n.output))]
        del graph.node[:]
        graph.node.extend(kept)
    return model


# -- Writing nodes one by one: the gradient rules' pen ------------------------------
#: Operators whose outputs are int64 or bool whatever their inputs.
_INT64_OUTPUT_OPS = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}
_BOOL_OUTPUT_OPS = {
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or",
    "Xor", "IsNaN", "IsInf",
}
#: First opset where each reduction takes its axes as an input, not an attribute.
_AXES_AS_INPUT_SINCE = {"ReduceSum": 13}
_AXES_AS_INPUT_SINCE_DEFAULT = 18


class NodeWriter:
    """Write ONNX nodes one call at a time, with fresh names and typed constants.

    ``w.Mul(a, b)`` appends ``Mul(a, b)`` to :attr:`nodes` and returns the
    name of its output; attributes are keyword arguments
    (``w.Transpose(x, perm=[1, 0])``) and ``n_outputs=k`` returns a list of
    ``k`` names.  The element type of every value the writer creates is
    tracked, so constants can be typed like the values they combine with
    (``w.constant(0.5, like=x)``) instead of being cast at run time.

    Parameters
    ----------
    prefix : str
        Every new node and value name starts with it.
    opset : int
        Default-domain opset of the graph the nodes go into: reductions take
        their axes as an attribute or an input accordingly.
    types : dict, optional
        Element type (``TensorProto`` enum) of values that already exist;
        the writer adds the values it creates.
    taken : iterable of str, optional
        Names already used in the graph.

    Attributes
    ----------
    nodes : list of onnx.NodeProto
        The nodes written, in order.
    """

    def __init__(self, prefix, opset, types=None, taken=()):
        self.prefix = prefix
        self.opset = int(opset)
        self.types = dict(types or {})
        self.nodes = []
        self._taken = set(taken)
        self._count = 0
        self._constants = {}

    # -- names and types -----------------------------------------------------------
    def fresh(self, hint="v"):
        """A new value name starting with :attr:`prefix`."""
        while True:
            self._count += 1
            name = f"{self.prefix}{hint}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def elem_type(self, name):
        """Element type of ``name`` (a ``TensorProto`` enum), or None if unknown."""
        return self.types.get(name)

    def _output_type(self, op_type, inputs, attributes):
        if op_type in _INT64_OUTPUT_OPS:
            return TensorProto.INT64
        if op_type in _BOOL_OUTPUT_OPS:
            return TensorProto.BOOL
        if op_type == "Cast":
            return attributes["to"]
        if op_type in ("Constant", "ConstantOfShape"):
            value = attributes.get("value")
            return value.data_type if value is not None else TensorProto.FLOAT
        if op_type == "CastLike":
            return self.types.get(inputs[1])
        if op_type == "Where":
            return self.types.get(inputs[1])
        return next((self.types[i] for i in inputs if i in self.types), None)

    # -- nodes -------------------------------------------------------------------------
    def op(self, op_type, *inputs, n_outputs=1, outputs=None, domain="", **attributes):
        """Append a node; return its output name (or list of names).

        Parameters
        ----------
        op_type : str
        *inputs : str
            Input names; ``""`` skips an optional input.
        n_outputs : int, default=1
            Number of outputs, named freshly (ignored when ``outputs`` is given).
        outputs : list of str, optional
            Names to give the outputs.
        domain : str, default=""
        **attributes
            Node attributes (``None`` values are left out).
        """
        attributes = {k: v for k, v in attributes.items() if v is not None}
        if outputs is None:
            outputs = [self.fresh(op_type) for _ in range(n_outputs)]
        else:
            self._taken.update(outputs)
        node = helper.make_node(
            op_type, list(inputs), list(outputs), name=self.fresh(op_type + "_node"),
            domain=domain or None, **attributes,
        )
        self.nodes.append(node)
        elem = self._output_type(op_type, inputs, attributes)
        if elem is not None:
            for name in outputs:
                self.types.setdefault(name, elem)
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def __getattr__(self, name):
        # w.Mul(a, b) is w.op("Mul", a, b): operator names start with a capital.
        if name[:1].isupper():
            return lambda *inputs, **attributes: self.op(name, *inputs, **attributes)
        raise AttributeError(name)

    # -- constants -------------------------------------------------------------------
    def constant(self, value, like=None, elem_type=None):
        """A constant of the element type of ``like`` (or ``elem_type``).

        Constants are written once per value and type.  When the type of
        ``like`` is unknown, the constant is cast at run time with
        ``CastLike``.
        """
        if elem_type is None and like is not None:
            elem_type = self.types.get(like)
        array = np.asarray(value)
        if elem_type is None:
            return self.CastLike(self.constant(array, elem_type=TensorProto.DOUBLE), like)
        array = array.astype(helper.tensor_dtype_to_np_dtype(elem_type))
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh("const")
            self.op("Constant", outputs=[name], value=numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def ints(self, values):
        """A 1-D int64 constant."""
        return self.constant(np.asarray(values, dtype=np.int64).reshape(-1),
                             elem_type=TensorProto.INT64)

    def reduce(self, op_type, x, axes, keepdims=1, noop_with_empty_axes=0):
        """A reduction over ``axes`` written for the writer's opset.

        Parameters
        ----------
        op_type : str
            ``ReduceSum``, ``ReduceMean``, ``ReduceMax``, ...
        x : str
        axes : list of int, str or None
            Static axes, the name of an int64 tensor of axes, or None for all.
        keepdims : int, default=1
        noop_with_empty_axes : int, default=0
            With 1, empty ``axes`` leave ``x`` as it is (axes as an input only).
        """
        since = _AXES_AS_INPUT_SINCE.get(op_type, _AXES_AS_INPUT_SINCE_DEFAULT)
        noop = noop_with_empty_axes or None
        if self.opset >= since:
            if axes is None:
                return self.op(op_type, x, keepdims=keepdims)
            axes_input = axes if isinstance(axes, str) else self.ints(axes)
            return self.op(op_type, x, axes_input, keepdims=keepdims,
                           noop_with_empty_axes=noop)
        if isinstance(axes, str):
            raise ValueError(
                f"{op_type} at opset {self.opset} takes static axes only; got a tensor."
            )
        return self.op(op_type, x, keepdims=keepdims,
                       axes=None if axes is None else [int(a) for a in axes])
