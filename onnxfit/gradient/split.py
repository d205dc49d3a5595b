"""A gradient graph cut in two: a forward session and a backward session.

:func:`split_gradient_graph` cuts a :class:`~onnxfit.gradient.GradientGraph`
(whose only seeds are named cotangents, dL/dY for each output) into:

* the **forward** graph: the nodes the model's outputs need; it returns the
  outputs and every value of the forward pass that the backward pass reads
  (the "saved" values: activations, masks, pooling indices);
* the **backward** graph: every other node; it reads the saved values, the
  graph inputs it needs (weights, X) and the cotangents, and returns the
  gradients.

Nodes that only prepare the backward pass (a transposed weight, say) land in
the backward graph, so a forward pass computes the model and little more;
the shapes of forward values that the backward pass reads are computed in
the forward graph, so that the values themselves need not be kept.  :class:`ForwardBackwardRunner` runs the two graphs as plain
``InferenceSession`` objects; values stay ``OrtValue`` objects in between.
"""

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from ..onnx_graphs import node_reads, value_types
from ..sessions import as_ortvalue, make_session


@dataclass
class SplitGradient:
    """The two halves of a gradient graph (see the module docstring).

    Attributes
    ----------
    forward, backward : onnx.ModelProto
    input_names : list of str
        Inputs of the forward graph (the model's inputs: data and weights).
    output_names : list of str
        The model's outputs, first among the forward graph's outputs.
    saved_names : list of str
        Forward values the backward graph reads, returned by the forward
        graph after ``output_names`` (a saved value that is also an output
        is returned once, as an output).
    backward_input_names : list of str
        What the backward graph reads: saved values, forward inputs, then
        cotangents.
    cotangent_names : dict of str -> str
        Differentiated output -> name of its cotangent input.
    gradient_names : dict of str -> str
        Differentiated name -> gradient output of the backward graph.
    """

    forward: onnx.ModelProto
    backward: onnx.ModelProto
    input_names: list
    output_names: list
    saved_names: list
    backward_input_names: list
    cotangent_names: dict
    gradient_names: dict

    @property
    def forward_output_names(self):
        """Outputs of the forward graph, in order."""
        return self.output_names + [s for s in self.saved_names if s not in self.output_names]


def _needed(nodes, targets, producers):
    """Indices of the nodes the values ``targets`` need."""
    needed, stack = set(), list(targets)
    while stack:
        k = producers.get(stack.pop())
        if k is not None and k not in needed:
            needed.add(k)
            stack.extend(node_reads(nodes[k]))
    return needed


def _value_info(name, types, infos):
    if name in infos:
        return infos[name]
    return helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None)


def split_gradient_graph(gradient_graph):
    """Cut a gradient graph into forward and backward graphs.

    Parameters
    ----------
    gradient_graph : onnxfit.gradient.GradientGraph
        Seeded on the model's outputs only, each by a named cotangent;
        outputs without a seed (running statistics, say) are computed by
        the forward graph and not differentiated.

    Returns
    -------
    SplitGradient
    """
    model = gradient_graph.model
    graph = model.graph
    nodes = list(graph.node)
    producers = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    output_names = list(gradient_graph.output_names)
    cotangents = dict(gradient_graph.cotangent_names)
    if not cotangents or set(cotangents) - set(output_names):
        raise ValueError(
            "split_gradient_graph needs a graph seeded on the model's outputs by named "
            f"cotangents; outputs {output_names}, seeds {sorted(cotangents)}."
        )
    gradients = list(gradient_graph.gradient_names.values())
    forward_ids = _needed(nodes, output_names, producers)
    backward_ids = _needed(nodes, gradients, producers) - forward_ids
    inputs = {i.name: i for i in graph.input}
    initializers = {i.name: i for i in graph.initializer}
    # The shape of a forward value is kept, not the value: a rule that only
    # needs X's shape would otherwise make the forward pass hand X over.
    available = {o for k in forward_ids for o in nodes[k].output if o}
    available |= set(initializers) | set(inputs) - set(cotangents.values())
    for k in sorted(backward_ids):
        node = nodes[k]
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx") and (
                node.input[0] in available):
            forward_ids.add(k)
            backward_ids.discard(k)
            available.update(node.output)
    forward_nodes = [nodes[k] for k in sorted(forward_ids)]
    backward_nodes = [nodes[k] for k in sorted(backward_ids)]

    backward_reads = set()
    for node in backward_nodes:
        backward_reads |= node_reads(node)
    backward_reads |= set(gradients)  # a gradient may be a forward value itself
    saved = [v for v in _ordered(forward_nodes) if v in backward_reads]
    cotangent_inputs = set(cotangents.values())
    forward_inputs = [i.name for i in graph.input if i.name not in cotangent_inputs]
    read_inputs = [name for name in forward_inputs if name in backward_reads]

    inferred = onnx.shape_inference.infer_shapes(model)
    types = value_types(inferred)
    # What the graph declared (the onnxruntime-training builder declares the
    # shapes of its gradients: its MaxPoolGrad kernel crashes without them),
    # completed by what onnx infers.
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    infos.update((v.name, v) for v in graph.value_info)
    infos.update(inputs)

    forward_reads = set()
    for node in forward_nodes:
        forward_reads |= node_reads(node)
    forward_outputs = output_names + [s for s in saved if s not in output_names]
    forward = helper.make_graph(
        forward_nodes, graph.name + "_forward",
        [inputs[name] for name in forward_inputs],
        [_value_info(name, types, infos) for name in forward_outputs],
        [init for name, init in initializers.items() if name in forward_reads],
        value_info=_inner_infos(forward_nodes, infos, set(forward_outputs)),
    )
    backward_input_names = saved + read_inputs + [
        cotangents[o] for o in output_names if o in cotangents]
    backward = helper.make_graph(
        backward_nodes, graph.name + "_backward",
        [_value_info(name, types, infos) for name in backward_input_names],
        [_value_info(name, types, infos) for name in gradients],
        [init for name, init in initializers.items() if name in backward_reads],
        value_info=_inner_infos(backward_nodes, infos, set(gradients)),
    )
    return SplitGradient(
        forward=_model_like(model, forward),
        backward=_model_like(model, backward),
        input_names=forward_inputs,
        output_names=output_names,
        saved_names=saved,
        backward_input_names=backward_input_names,
        cotangent_names=cotangents,
        gradient_names=dict(gradient_graph.gradient_names),
    )


def _inner_infos(nodes, infos, outputs):
    """Declared shapes of the values ``nodes`` compute, graph outputs aside."""
    return [infos[name] for name in _ordered(nodes) if name in infos and name not in outputs]


def _ordered(nodes):
    """Values the nodes produce, in production order."""
    return [o for node in nodes for o in node.output if o]


def _model_like(model, graph):
    result = helper.make_model(graph, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result


class ForwardBackwardRunner:
    """The two halves of a :class:`SplitGradient` as two sessions.

    The runner holds no per-call state: any number of forward passes may
    wait for their backward passes, each with the values its forward pass
    returned (see :meth:`forward`), and one runner may serve several
    functions or engines at once.

    Parameters
    ----------
    split : SplitGradient
    n_threads : int or None, default=1
        onnxruntime intra-op threads.
    dtype : numpy dtype, default=float32
        Element type of the graph's float tensors.
    device : onnxfit.sessions.Device or None, default=None
        Where the sessions run (None: the CPU).

    Attributes
    ----------
    split : SplitGradient
    forward_session, backward_session : onnxruntime.InferenceSession
    """

    def __init__(self, split, n_threads=1, dtype="float32", device=None):
        self.split = split
        self.forward_session = make_session(split.forward, n_threads, dtype, device)
        self.backward_session = make_session(split.backward, n_threads, dtype, device)
        self._forward_outputs = split.forward_output_names
        self._gradient_outputs = list(split.gradient_names.values())

    def forward(self, inputs):
        """Run the forward graph.

        Parameters
        ----------
        inputs : dict of str -> OrtValue or ndarray
            One value per name of ``split.input_names`` (arrays are shared,
            not copied).

        Returns
        -------
        dict of str -> onnxruntime.OrtValue
            The model's outputs and the saved values, by name.
        """
        feeds = {name: as_ortvalue(inputs[name]) for name in self.split.input_names}
        values = self.forward_session.run_with_ort_values(self._forward_outputs, feeds)
        return dict(zip(self._forward_outputs, values))

    def backward(self, inputs, forward_values, output_gradients):
        """Run the backward graph of one forward pass.

        Parameters
        ----------
        inputs : dict of str -> OrtValue or ndarray
            The values the forward pass was given.
        forward_values : dict of str -> OrtValue
            What :meth:`forward` returned.
        output_gradients : dict of str -> OrtValue or ndarray
            dL/d(output) for each output.

        Returns
        -------
        dict of str -> onnxruntime.OrtValue
            Differentiated name -> its gradient.
        """
        split = self.split
        feeds = {}
        for name in split.backward_input_names:
            if name in forward_values:
                feeds[name] = forward_values[name]
            elif name in inputs:
                feeds[name] = as_ortvalue(inputs[name])
        for output, cotangent in split.cotangent_names.items():
            feeds[cotangent] = as_ortvalue(output_gradients[output])
        values = self.backward_session.run_with_ort_values(self._gradient_outputs, feeds)
        return dict(zip(split.gradient_names, values))
