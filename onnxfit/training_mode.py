"""Layers that behave differently in training: Dropout and BatchNormalization.

PyTorch users expect ``model.train()`` during fitting and ``model.eval()``
at prediction.  An exported graph holds one of the two: the exporter's
default (eval) writes BatchNormalization with its running statistics and
drops Dropout; ``training=TrainingMode.TRAINING`` writes BatchNormalization
in training mode and Dropout with ``training_mode=True``.  Whatever was
exported, :func:`training_graph` rewrites the graph that training runs:

* **Dropout** becomes ``X * mask``, where ``mask`` is a new graph input
  holding 0 or ``1 / (1 - ratio)`` per element (PyTorch's inverted dropout).
  The training engines draw a fresh mask for each batch from the
  estimator's ``random_state`` (:class:`DropoutMask`), so masks are
  reproducible, and differentiating ``X * mask`` needs no random operator.
* **BatchNormalization** normalises with the batch's mean and (biased)
  variance, which the gradient goes through, as in PyTorch; its running
  mean and variance become state, graph inputs whose new values
  (``momentum * running + (1 - momentum) * batch statistic``, with the
  unbiased batch variance as PyTorch uses) are graph outputs, fed back at
  the next step, never trained.  ONNX's ``momentum`` is PyTorch's
  ``1 - momentum`` (the exporter writes 0.9 for PyTorch's default 0.1).

:func:`inference_graph` does the opposite for a graph exported in training
mode: what ``predict`` and ``to_onnx`` run uses the running statistics and
no Dropout, as ``model.eval()``.
"""

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graphs import NodeWriter, existing_names, prune_graph, value_types

#: Operators whose behaviour depends on training.
TRAINING_OPS = ("Dropout", "BatchNormalization")
#: Prefix of the values the rewrite adds.
PREFIX = "onnxfit.train."


def mask_name(node_output):
    """Name of the mask input of the Dropout node computing ``node_output``."""
    return f"{PREFIX}dropout_mask.{node_output}"


def statistic_update_name(statistic):
    """Name of the output holding the new value of running statistic ``statistic``."""
    return f"{statistic}.new"


@dataclass
class DropoutMask:
    """A Dropout mask the engine draws for each batch.

    Attributes
    ----------
    name : str
        The graph input.
    shape : tuple
        Its shape, ``None`` where the batch size goes.
    ratio : float
        Probability of dropping an element.
    dtype : numpy dtype
    """

    name: str
    shape: tuple
    ratio: float
    dtype: np.dtype

    def shape_for(self, batch_size):
        return tuple(batch_size if d is None else d for d in self.shape)

    def draw(self, rng, out, uniform=None, keep=None):
        """Fill ``out`` with 0 (probability ``ratio``) or ``1 / (1 - ratio)``.

        ``uniform`` and ``keep`` (float and bool arrays of ``out``'s shape)
        let a ``numpy.random.Generator`` draw without allocating: the
        training engines draw a mask at every step.
        """
        if uniform is not None and isinstance(rng, np.random.Generator):
            rng.random(out=uniform, dtype=uniform.dtype)
            keep = np.greater_equal(uniform, self.ratio, out=keep)
        else:
            keep = rng.random(out.shape) >= self.ratio
        np.multiply(keep, 1.0 / (1.0 - self.ratio), out=out, casting="unsafe")


@dataclass
class TrainingGraph:
    """A forward graph with training behaviour (see the module docstring).

    Attributes
    ----------
    model : onnx.ModelProto
        Inputs: the original ones, then the masks, then the running
        statistics; outputs: the original ones, then each statistic's new
        value.
    masks : list of DropoutMask
    statistics : dict of str -> str
        Running statistic (an input of ``model``) -> output of its new value.
    initial_statistics : dict of str -> ndarray
        The statistics stored in the graph.
    """

    model: onnx.ModelProto
    masks: list = field(default_factory=list)
    statistics: dict = field(default_factory=dict)
    initial_statistics: dict = field(default_factory=dict)


def has_training_layers(graph):
    """Whether ``graph`` holds a Dropout or a BatchNormalization node."""
    return any(n.op_type in TRAINING_OPS and n.domain in ("", "ai.onnx") for n in graph.node)


def _constant_value(graph, name):
    """Value of ``name`` when it is an initializer or a Constant's output."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                return numpy_helper.to_array(attr.t)
    return None


def _attr(node, name, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _dropout_ratio(graph, node):
    if len(node.input) > 1 and node.input[1]:
        ratio = _constant_value(graph, node.input[1])
        if ratio is None:
            raise ValueError(
                f"Dropout node {node.name or node.output[0]!r} takes its ratio from the "
                f"value {node.input[1]!r}, computed at run time; onnxfit needs a constant "
                "ratio to draw masks (or set train_mode=False to run the graph as written)."
            )
        return float(np.asarray(ratio).reshape(()))
    return 0.5


#: Two batch sizes the shapes are inferred with: a dimension that follows
#: the batch size is told from the static ones by comparing the two (onnx
#: cannot name the first dimension of Flatten's output, say).
_PROBE_BATCHES = (97, 89)


def batch_shapes(model, sample_shapes):
    """Per value: its shape, ``None`` for a dimension equal to the batch size
    and ``False`` for one that shape inference cannot tell; and the element
    type of each value."""
    probes = []
    for size in _PROBE_BATCHES:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for value in probe.graph.input:
            if value.name in sample_shapes:
                value.CopyFrom(helper.make_tensor_value_info(
                    value.name, value.type.tensor_type.elem_type,
                    [size] + list(sample_shapes[value.name])))
        try:
            probe = onnx.shape_inference.infer_shapes(probe, data_prop=True)
        except Exception:  # a partially known graph: shapes stay unknown
            pass
        probes.append({
            v.name: tuple(d.dim_value if d.HasField("dim_value") else 0
                          for d in v.type.tensor_type.shape.dim)
            for v in list(probe.graph.value_info) + list(probe.graph.input)
            + list(probe.graph.output) if v.type.tensor_type.HasField("shape")})
    first, second = probes
    shapes = {}
    for name, dims in first.items():
        other = second.get(name)
        if other is None or len(other) != len(dims):
            continue
        shapes[name] = tuple(
            a if a == b and a > 0 else (None if (a, b) == _PROBE_BATCHES else False)
            for a, b in zip(dims, other))
    return shapes, value_types(onnx.shape_inference.infer_shapes(model))


def training_graph(forward_model, sample_shapes, weights, batch="N"):
    """The forward graph with training behaviour (see the module docstring).

    Parameters
    ----------
    forward_model : onnx.ModelProto
        Weights are graph inputs; running statistics initializers.
    sample_shapes : dict of str -> tuple
        Per-sample shape of each graph input fed from the data (as fitted),
        so that mask shapes are known.
    weights : dict of str -> ndarray
        Values of the weights (graph inputs): a running statistic the
        exporter deduplicated into ``Identity(weight)`` (PyTorch does so
        while the statistics equal the affine parameters) starts from them.
    batch : str
        Symbol given to the batch dimension.

    Returns
    -------
    TrainingGraph
        ``model`` is ``forward_model`` itself (not a copy) when the graph
        has no Dropout or BatchNormalization.

    Raises
    ------
    ValueError
        A Dropout whose ratio is computed at run time or whose input shape
        is unknown, a running statistic that is also trained or shared.
    """
    graph = forward_model.graph
    if not has_training_layers(graph):
        return TrainingGraph(forward_model)
    model = onnx.ModelProto()
    model.CopyFrom(forward_model)
    graph = model.graph
    for value in graph.input:
        if value.name in sample_shapes:
            elem = value.type.tensor_type.elem_type
            value.CopyFrom(helper.make_tensor_value_info(
                value.name, elem, [batch] + list(sample_shapes[value.name])))
    shapes, types = batch_shapes(model, sample_shapes)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    writer = NodeWriter(PREFIX, opset, types, existing_names(graph))
    inputs = {i.name for i in graph.input}
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # A statistic the exporter wrote as Identity(initializer or weight) gets
    # its own state, starting from that value.
    aliases = {n.output[0]: n for n in graph.node if n.op_type == "Identity"
               and (n.input[0] in initializers or n.input[0] in weights)}
    result = TrainingGraph(model)
    nodes = []
    dropped = set()
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            for statistic in node.input[3:5]:
                if statistic in aliases and statistic not in initializers:
                    source = aliases[statistic].input[0]
                    initializers[statistic] = np.array(
                        initializers[source] if source in initializers else weights[source])
                    dropped.add(statistic)
    readers = {i for n in graph.node for i in n.input if n.op_type != "BatchNormalization"}
    readers |= {o.name for o in graph.output}
    if dropped & readers:
        raise ValueError(
            f"The running statistics {sorted(dropped & readers)} are read by other nodes "
            "than BatchNormalization; onnxfit cannot make them state (set train_mode=False)."
        )
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TRAINING_OPS:
            nodes.append(node)
            continue
        writer.nodes = []
        if node.op_type == "Dropout":
            _dropout(graph, node, writer, shapes, types, result)
        else:
            _batch_normalization(node, writer, shapes, inputs, initializers, result)
        nodes.extend(writer.nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    for mask in result.masks:
        graph.input.append(helper.make_tensor_value_info(
            mask.name, onnx.helper.np_dtype_to_tensor_dtype(mask.dtype),
            [batch if d is None else d for d in mask.shape]))
    statistics_as_inputs(graph, result.initial_statistics)
    for name, new in result.statistics.items():
        array = result.initial_statistics[name]
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        graph.output.append(helper.make_tensor_value_info(new, elem, list(array.shape)))
    prune_graph(graph)
    return result


def statistics_as_inputs(graph, statistics):
    """Make each running statistic of ``statistics`` (name -> array) a graph
    input of ``graph`` (changed in place), in place of its initializer or of
    the ``Identity`` the exporter aliased it with."""
    names = set(statistics)
    kept = [i for i in graph.initializer if i.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in names)]
    del graph.node[:]
    graph.node.extend(nodes)
    for name, array in statistics.items():
        graph.input.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype),
            list(np.shape(array))))


def _dropout(graph, node, w, shapes, types, result):
    ratio = _dropout_ratio(graph, node)
    x, y = node.input[0], node.output[0]
    mask_out = node.output[1] if len(node.output) > 1 and node.output[1] else None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"Dropout node {node.name or y!r} has ratio {ratio}, not in [0, 1).")
    if ratio == 0.0:
        w.Identity(x, outputs=[y])
        if mask_out:
            w.ConstantOfShape(w.Shape(x), outputs=[mask_out], value=helper.make_tensor(
                "one", onnx.TensorProto.BOOL, [1], [True]))
        return
    shape = shapes.get(x)
    elem = types.get(x)
    if shape is None or False in shape or elem is None:
        raise ValueError(
            f"The shape of the input {x!r} of Dropout node {node.name or y!r} is not known "
            "from the graph (beyond the batch size), so no mask can be drawn for it; "
            "declare the graph input's per-sample shape, or set train_mode=False to "
            "run the graph as written."
        )
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    mask = DropoutMask(mask_name(y), shape, ratio, dtype)
    result.masks.append(mask)
    w.types[mask.name] = elem
    w.Mul(x, mask.name, outputs=[y])
    if mask_out:
        w.Cast(mask.name, to=onnx.TensorProto.BOOL, outputs=[mask_out])


def _batch_normalization(node, w, shapes, inputs, initializers, result):
    x, scale, bias, mean, var = node.input[:5]
    label = node.name or node.output[0]
    for statistic in (mean, var):
        if statistic in inputs:
            raise ValueError(
                f"BatchNormalization node {label!r} reads its running statistic "
                f"{statistic!r} as a trained weight or graph input; with train_mode=True "
                "running statistics are averages of batch statistics, not trained: leave "
                "them out of weights_to_train, or set train_mode=False to train the "
                "graph as written."
            )
        if statistic not in initializers:
            raise ValueError(
                f"BatchNormalization node {label!r} reads its running statistic "
                f"{statistic!r} from a computed value; onnxfit updates running "
                "statistics stored as initializers (or set train_mode=False)."
            )
        if statistic in result.statistics:
            raise ValueError(
                f"The running statistic {statistic!r} is shared by several "
                "BatchNormalization nodes; each needs its own (or set train_mode=False)."
            )
    shape = shapes.get(x)
    if shape is None or len(shape) < 2:
        raise ValueError(
            f"The rank of the input {x!r} of BatchNormalization node {label!r} is not "
            "known, so its batch statistics cannot be computed; declare the graph "
            "input's shape, or set train_mode=False."
        )
    epsilon = float(_attr(node, "epsilon", 1e-5))
    momentum = float(_attr(node, "momentum", 0.9))
    axes = [0] + list(range(2, len(shape)))
    broadcast = [0] + list(range(2, len(shape)))  # (C,) -> (1, C, 1, ...)
    batch_mean = w.reduce("ReduceMean", x, axes)
    centred = w.Sub(x, batch_mean)
    batch_var = w.reduce("ReduceMean", w.Mul(centred, centred), axes)
    inv_std = w.Reciprocal(w.Sqrt(w.Add(batch_var, w.constant(epsilon, like=x))))
    gain = w.Mul(inv_std, w.Unsqueeze(scale, w.ints(broadcast)))
    w.Add(w.Mul(centred, gain), w.Unsqueeze(bias, w.ints(broadcast)), outputs=[node.output[0]])
    # Running statistics, as PyTorch: the variance is the unbiased one.
    channels = w.ints([-1])
    flat_mean = w.Reshape(batch_mean, channels)
    flat_var = w.Reshape(batch_var, channels)
    count = w.Div(w.CastLike(w.Size(x), x), w.CastLike(w.Size(scale), x))
    unbiased = w.Div(count, w.Max(w.Sub(count, w.constant(1.0, like=x)),
                                  w.constant(1.0, like=x)))
    keep = w.constant(momentum, like=x)
    take = w.constant(1.0 - momentum, like=x)
    new_mean, new_var = statistic_update_name(mean), statistic_update_name(var)
    w.Add(w.Mul(mean, keep), w.Mul(flat_mean, take), outputs=[new_mean])
    w.Add(w.Mul(var, keep), w.Mul(w.Mul(flat_var, unbiased), take), outputs=[new_var])
    for k, statistic in ((1, mean), (2, var)):
        if len(node.output) > k and node.output[k]:  # training-mode outputs, if read
            w.Identity(statistic_update_name(statistic), outputs=[node.output[k]])
    for statistic in (mean, var):
        result.statistics[statistic] = statistic_update_name(statistic)
        result.initial_statistics[statistic] = np.array(initializers[statistic])


def inference_graph(model):
    """``model`` with Dropout and BatchNormalization in inference mode.

    Dropout becomes the identity; BatchNormalization in training mode uses
    its running statistics.  Returns ``model`` itself when nothing changes,
    a modified copy otherwise.
    """
    graph = model.graph
    if not any(
        (n.op_type == "Dropout") or (n.op_type == "BatchNormalization"
                                     and _attr(n, "training_mode", 0))
        for n in graph.node if n.domain in ("", "ai.onnx")
    ):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    opset = next(o.version for o in copy.opset_import if o.domain in ("", "ai.onnx"))
    writer = NodeWriter(PREFIX + "eval.", opset, value_types(copy), existing_names(graph))
    nodes = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        writer.nodes = []
        if node.op_type == "Dropout":
            writer.Identity(node.input[0], outputs=[node.output[0]])
            if len(node.output) > 1 and node.output[1]:
                writer.ConstantOfShape(
                    writer.Shape(node.input[0]), outputs=[node.output[1]],
                    value=helper.make_tensor("one", onnx.TensorProto.BOOL, [1], [True]))
            nodes.extend(writer.nodes)
        elif node.op_type == "BatchNormalization" and _attr(node, "training_mode", 0):
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute
                          if a.name in ("epsilon", "momentum")}
            nodes.append(helper.make_node(
                "BatchNormalization", list(node.input[:5]), [node.output[0]],
                name=node.name, **attributes))
            for k in (1, 2):
                if len(node.output) > k and node.output[k]:
                    writer.Identity(node.input[2 + k], outputs=[node.output[k]])
            nodes.extend(writer.nodes)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    prune_graph(graph)  # Dropout's ratio and mode constants are read no more
    return copy
