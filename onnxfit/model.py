"""The model graph and its trainable weights.

:class:`OnnxModel` takes whatever the user passed as ``onnx_model`` (a
``ModelProto``, serialized bytes or a path), brings it within the limits of
the installed onnxruntime without touching the user's object, finds the
graph input, the output to train and the weights to train, and gives the
two views of the graph that training needs:

* :meth:`OnnxModel.forward_model` -- the graph pruned to the trained output,
  with the trainable weights turned into graph inputs, so that one session
  can run any weights and gradient builders can differentiate with respect
  to them;
* :meth:`OnnxModel.export` -- the user's whole graph (all outputs kept) with
  trained weights written back into its initializers.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter
from onnx.utils import Extractor

from .inputs import input_specs
from .loading import load_onnx  # noqa: F401  (callers import it from here)
from .onnx_graphs import OPSET, node_reads, numpy_dtype, onnx_elem_type, tensor_elem_type
from .sessions import SUPPORTED_EVERYWHERE, runtime_limits


def normalise_model(model):
    """Bring ``model`` (a private copy) within what onnxfit and the installed
    onnxruntime run: opset 17 to the runtime's highest, IR up to its highest.

    Opsets above the runtime's highest are converted down (onnxruntime-
    training 1.19.2 runs opset 21 at most; current builds run what current
    onnx writes); opsets below 17 are converted up, because the loss,
    penalty, update and gradient graphs onnxfit adds use opset-17 operators
    (``CastLike``, ``ReduceSum`` with axes as an input, ...).  skl2onnx's
    default conversions, at opset 9 to 15, need this.

    Raises
    ------
    ValueError
        If onnx cannot convert the default-domain opset.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    # Probing the runtime costs a little memory: graphs every supported
    # runtime loads do not need it.
    if model.ir_version <= SUPPORTED_EVERYWHERE[0] and (opset or 0) <= SUPPORTED_EVERYWHERE[1]:
        max_ir, max_opset = SUPPORTED_EVERYWHERE
    else:
        max_ir, max_opset = runtime_limits()
    target = None
    if opset is not None and opset > max_opset:
        target = max_opset
    elif opset is not None and opset < OPSET:
        target = OPSET
    if target is not None:
        try:
            model = version_converter.convert_version(model, target)
        except Exception as exc:
            raise ValueError(
                f"The graph uses opset {opset}; onnxfit trains graphs at opset "
                f"{OPSET} to {max_opset} (the highest the installed onnxruntime runs) "
                f"and onnx could not convert it to {target}: {exc}"
            ) from exc
    if model.ir_version > max_ir:
        model.ir_version = max_ir
    _free_batch_dimension(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"onnx_model is not a valid ONNX graph: {exc}") from exc
    return model


def _value_kind(value):
    """What a graph value is, in words: 'an int64 tensor', 'a sequence', ..."""
    kind = value.type.WhichOneof("value")
    if kind == "tensor_type":
        elem = value.type.tensor_type.elem_type
        try:
            name = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
        except Exception:  # an element type numpy lacks (string, bfloat16...)
            name = onnx.TensorProto.DataType.Name(elem).lower()
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name} tensor"
    if kind == "sequence_type":
        return "a sequence"
    if kind == "map_type":
        return "a map"
    if kind == "optional_type":
        return "an optional"
    return "of unknown type"


def _free_batch_dimension(model):
    """Make a fixed first dimension of the graph's data input and outputs
    symbolic.

    ``torch.onnx.export`` without ``dynamic_axes`` fixes the batch size to
    the example's (often 1); training feeds mini-batches, so the first
    dimension of the (non-initializer) inputs and of the outputs becomes
    ``"N"``.  Reshapes inside the graph that hard-code the batch size are
    not rewritten: such graphs still fail, with onnxruntime's message.
    """
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    values = [v for v in graph.input if v.name not in init_names] + list(graph.output)
    for value in values:
        if not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        if len(shape.dim) >= 1 and shape.dim[0].HasField("dim_value"):
            shape.dim[0].Clear()
            shape.dim[0].dim_param = "N"


def linear_model(n_features, n_outputs, dtype):
    """The default model ``X @ coef + intercept`` with zero weights.

    Parameters
    ----------
    n_features : int
    n_outputs : int
    dtype : numpy dtype (float32 or float64)

    Returns
    -------
    onnx.ModelProto
    """
    elem = onnx_elem_type(dtype)
    coef = numpy_helper.from_array(np.zeros((n_features, n_outputs), dtype=dtype), "coef")
    intercept = numpy_helper.from_array(np.zeros((n_outputs,), dtype=dtype), "intercept")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "coef"], ["XW"]),
            helper.make_node("Add", ["XW", "intercept"], ["Y"]),
        ],
        "onnxfit_linear",
        [helper.make_tensor_value_info("X", elem, ["N", n_features])],
        [helper.make_tensor_value_info("Y", elem, ["N", n_outputs])],
        [coef, intercept],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def inputs_feeding(graph, name):
    """Names of the graph inputs and initializers that value ``name``
    depends on (through subgraphs too)."""
    producer = {o: node for node in graph.node for o in node.output if o}
    seen, stack, found = set(), [name], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        node = producer.get(value)
        if node is None:
            found.add(value)
        else:
            stack.extend(node_reads(node))
    return found


class OnnxModel:
    """A user's ONNX graph prepared for training.

    Parameters
    ----------
    model : onnx.ModelProto
        Normalised graph (see :func:`normalise_model`); kept as is.
    weights_to_train : list of str or None
        Initializers to train; None means every floating-point initializer
        the trained output depends on, but scalars (constants) and
        BatchNormalization's running statistics.
    output_name : str or None
        The prediction; None picks the only output, or the first
        floating-point tensor output (the first that is not ``loss_output``).
    loss_output : str or None
        A scalar (or per-sample) loss the graph computes itself from the
        prediction and a label input: it is then what training minimises.
    unused_inputs : {'refuse', 'ignore'}, default='refuse'
        What to do with graph inputs the trained value does not read:
        training refuses them (X would feed nothing); a gradient check
        leaves them out.

    Attributes
    ----------
    input_names : list of str
        The graph inputs the prediction reads (features), in graph order.
    input_specs : list of onnxfit.inputs.InputSpec
    label_name : str or None
        With ``loss_output``: the graph input that only the loss reads.
    label_spec : onnxfit.inputs.InputSpec or None
        Its declared type and per-sample shape.
    output_name : str
        The prediction.
    trained_name : str
        What training differentiates: ``loss_output``, or the prediction.
    weight_names : list of str
        Trainable initializers, in graph order.
    dtype : numpy dtype
        Element type of the trained value; labels and updates use it.
    input_dtype : numpy dtype
        Element type of the first float input (the features X of a one-input
        graph).
    """

    def __init__(self, model, weights_to_train=None, output_name=None, loss_output=None,
                 unused_inputs="refuse"):
        self.model = model
        graph = model.graph
        init_names = {i.name for i in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in init_names]
        if not inputs:
            raise ValueError("The graph has no input: there is nothing to feed X to.")
        self.loss_output = loss_output
        self.output_name = self._select_output(output_name)
        if loss_output is not None:
            self._select_output(loss_output)
            if loss_output == self.output_name:
                raise ValueError(
                    f"loss_output and output_name both name {loss_output!r}; output_name "
                    "is the prediction, loss_output the loss computed from it."
                )
        feeding = inputs_feeding(graph, self.output_name)
        self.input_names = [n for n in inputs if n in feeding]
        if not self.input_names:
            raise ValueError(
                f"The output {self.output_name!r} does not depend on any graph input "
                f"({inputs}): it cannot be trained on data."
            )
        self.label_name = None
        if loss_output is not None:
            labels = [n for n in inputs if n in inputs_feeding(graph, loss_output)
                      and n not in feeding]
            if len(labels) != 1:
                raise ValueError(
                    f"loss_output={loss_output!r} must read exactly one graph input besides "
                    f"those of the prediction {self.output_name!r} ({self.input_names}): "
                    f"its label input; it reads {labels or 'none'}."
                )
            self.label_name = labels[0]
        else:
            unused = [n for n in inputs if n not in feeding]
            if unused and unused_inputs == "refuse":
                raise ValueError(
                    f"The graph inputs {unused} do not feed the output {self.output_name!r}. "
                    "If the graph computes its own loss from a label input, name that "
                    "loss with loss_output= (and the prediction with output_name=); "
                    "otherwise pick the output that reads every input."
                )
        self.input_specs = input_specs(graph, self.input_names)
        self.label_spec = input_specs(graph, [self.label_name])[0] if self.label_name else None
        floats = [s for s in self.input_specs if not s.is_integer]
        self.input_dtype = floats[0].dtype if floats else np.dtype(np.float32)
        self.input_name = self.input_names[0]
        self.trained_name = loss_output or self.output_name
        self._forward = self._extract(self.trained_name)
        elem = tensor_elem_type(
            next(o for o in self._forward.graph.output if o.name == self.trained_name)
        )
        self.dtype = numpy_dtype(elem)
        self.weight_names = self._select_weights(weights_to_train)
        self._prediction = None

    # -- selection -----------------------------------------------------
    def float_outputs(self):
        """Names of the graph outputs that are float/double tensors."""
        return [
            o.name for o in self.model.graph.output
            if numpy_dtype(tensor_elem_type(o)) is not None
        ]

    def _select_output(self, output_name):
        outputs = [o.name for o in self.model.graph.output]
        if output_name is None:
            if len(outputs) == 1:
                output_name = outputs[0]
            else:
                floats = [o for o in self.float_outputs() if o != self.loss_output]
                if not floats:
                    raise ValueError(
                        f"No output of the graph is a float tensor: {outputs}."
                    )
                output_name = floats[0]
        if output_name not in outputs and output_name not in self._all_values():
            raise ValueError(
                f"output_name={output_name!r} is not a value of the graph; "
                f"its outputs are {outputs}."
            )
        return output_name

    def _all_values(self):
        graph = self.model.graph
        return {o for n in graph.node for o in n.output}

    def _extract(self, output_name, with_label=True):
        try:
            # The extractor needs the type of an intermediate output_name,
            # which only shape inference records.
            inferred = onnx.shape_inference.infer_shapes(self.model)
            names = self.input_names + (
                [self.label_name] if self.label_name and with_label else [])
            forward = Extractor(inferred).extract_model(names, [output_name])
        except Exception as exc:
            raise ValueError(
                f"Cannot extract the part of the graph computing {output_name!r}: {exc}"
            ) from exc
        out = next(o for o in forward.graph.output if o.name == output_name)
        if numpy_dtype(tensor_elem_type(out)) is None:
            producer = next((n for n in self.model.graph.node if output_name in n.output), None)
            feeding = [i for i in (producer.input if producer is not None else []) if i]
            hint = f" (the values its node {producer.op_type} reads: {feeding})" \
                if feeding else ""
            raise ValueError(
                f"Output {output_name!r} is not a float or double tensor "
                f"({_value_kind(out)}) and cannot be trained: name a float tensor of the "
                f"graph with output_name={hint}; float tensor outputs are "
                f"{self.float_outputs()}."
            )
        forward.ir_version = self.model.ir_version
        return forward

    def _select_weights(self, weights_to_train):
        float_inits = [
            i.name for i in self._forward.graph.initializer
            if numpy_dtype(i.data_type) is not None
        ]
        all_inits = {i.name: i for i in self.model.graph.initializer}
        if weights_to_train is None:
            statistics = self.running_statistics()
            float_inits = [n for n in float_inits if n not in statistics]
            if self.label_name:
                # The loss's own constants are not parameters of the model.
                prediction = inputs_feeding(self.model.graph, self.output_name)
                float_inits = [n for n in float_inits if n in prediction]
            # Scalars are constants written by exporters and converters (an
            # attention scale, the zero an initial state is expanded from, a
            # 0.5 in a formula), not parameters: weights_to_train names one
            # to train it.
            scalars = {i.name for i in self._forward.graph.initializer if not i.dims}
            float_inits = [n for n in float_inits if n not in scalars]
            if not float_inits:
                ops = sorted({n.op_type for n in self._forward.graph.node})
                raise ValueError(
                    f"The graph has no floating-point initializer that {self.output_name!r} "
                    f"depends on, so nothing can be trained (initializers: {sorted(all_inits)}; "
                    f"operators: {ops}). Weights stored as node attributes, as in "
                    "ai.onnx.ml operators, cannot be trained: with skl2onnx, convert "
                    "linear models with black_op={'LinearRegressor'} or "
                    "options={'zipmap': False} and MatMul-based operators."
                )
            return float_inits
        if isinstance(weights_to_train, str):
            weights_to_train = [weights_to_train]
        names = list(weights_to_train)
        if not names:
            raise ValueError(
                "weights_to_train is empty; trainable initializers are "
                f"{float_inits}."
            )
        unknown = [n for n in names if n not in all_inits]
        if unknown:
            raise ValueError(
                f"weights_to_train names unknown initializers {unknown}; the graph's "
                f"floating-point initializers are {float_inits}."
            )
        not_float = [n for n in names if numpy_dtype(all_inits[n].data_type) is None]
        if not_float:
            raise ValueError(
                f"weights_to_train names non-float initializers {not_float}; only "
                f"floating-point initializers can be trained: {float_inits}."
            )
        unused = [n for n in names if n not in float_inits]
        if unused:
            raise ValueError(
                f"Output {self.output_name!r} does not depend on {unused}; "
                f"trainable initializers for it are {float_inits}."
            )
        if len(set(names)) != len(names):
            raise ValueError(f"weights_to_train has duplicates: {names}.")
        return [n for n in float_inits if n in names]

    def index_tables(self):
        """Integer data inputs that a Gather reads directly as indices into
        an initializer (an embedding table): input name -> list of
        ``(node, table name, rows)``, rows being the table's size along
        the gathered axis."""
        if getattr(self, "_index_tables", None) is None:
            graph = self.model.graph
            inits = {i.name: i for i in graph.initializer}
            found = {}
            for node in graph.node:
                if (node.op_type != "Gather" or node.domain not in ("", "ai.onnx")
                        or len(node.input) != 2 or node.input[0] not in inits
                        or node.input[1] not in self.input_names):
                    continue
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = list(inits[node.input[0]].dims)
                if -len(dims) <= axis < len(dims):
                    found.setdefault(node.input[1], []).append(
                        (node, node.input[0], int(dims[axis])))
            self._index_tables = found
        return self._index_tables

    def running_statistics(self):
        """Initializers that only serve as BatchNormalization's running mean
        and variance: statistics, not parameters, so not trained unless
        ``weights_to_train`` names them (PyTorch keeps them as buffers)."""
        graph = self._forward.graph
        as_statistic, elsewhere = set(), set()
        for node in graph.node:
            for k, name in enumerate(node.input):
                if node.op_type == "BatchNormalization" and k in (3, 4):
                    as_statistic.add(name)
                else:
                    elsewhere.add(name)
        return as_statistic - elsewhere

    # -- views -----------------------------------------------------------
    def initial_weights(self):
        """Trainable weights as stored in the graph (name -> new array)."""
        inits = {i.name: i for i in self._forward.graph.initializer}
        return {n: numpy_helper.to_array(inits[n]).copy() for n in self.weight_names}

    def forward_model(self, sample_shapes=None, prediction=False):
        """The pruned graph with the trainable weights as graph inputs.

        Graph inputs are ``input_names`` (then ``label_name`` when the graph
        computes its loss) and ``weight_names``; the only output is
        ``trained_name``.

        Parameters
        ----------
        sample_shapes : dict of str -> tuple, optional
            Per-sample shapes to declare for the data inputs (the batch
            dimension stays symbolic): the shapes of the data being fitted,
            so that shape inference knows every dimension but the batch
            size (recurrent operators unroll over a known length).
        prediction : bool, default=False
            The graph of the prediction ``output_name`` instead (which reads
            no label input), with the same weights as inputs (those it does
            not read included).
        """
        model = onnx.ModelProto()
        if prediction and self.label_name:
            if getattr(self, "_prediction", None) is None:
                self._prediction = self._extract(self.output_name, with_label=False)
            model.CopyFrom(self._prediction)
        else:
            model.CopyFrom(self._forward)
        graph = model.graph
        keep = []
        moved = {}
        for init in graph.initializer:
            if init.name in self.weight_names:
                moved[init.name] = helper.make_tensor_value_info(
                    init.name, init.data_type, list(init.dims)
                )
            else:
                keep.append(init)
        del graph.initializer[:]
        graph.initializer.extend(keep)
        declared = {i.name: i for i in graph.input}
        data = [n for n in self.input_names + [self.label_name] if n in declared]
        data_inputs = [declared[n] for n in data]
        for value in data_inputs:
            if sample_shapes and value.name in sample_shapes:
                value.CopyFrom(helper.make_tensor_value_info(
                    value.name, value.type.tensor_type.elem_type,
                    ["N"] + list(sample_shapes[value.name])))
        del graph.input[:]
        graph.input.extend(data_inputs)
        if prediction:
            inits = {i.name: i for i in self._forward.graph.initializer}
            for name in self.weight_names:
                if name not in moved:
                    moved[name] = helper.make_tensor_value_info(
                        name, inits[name].data_type, list(inits[name].dims))
        graph.input.extend(moved[n] for n in self.weight_names)
        return model

    def export(self, weights):
        """The whole user graph with ``weights`` written into its initializers.

        Parameters
        ----------
        weights : dict of str -> ndarray

        Returns
        -------
        onnx.ModelProto
        """
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        written = set()
        for init in graph.initializer:
            if init.name in weights:
                array = np.asarray(weights[init.name])
                dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
                init.CopyFrom(numpy_helper.from_array(
                    array.astype(dtype, copy=False), init.name
                ))
                written.add(init.name)
        # A value the exporter wrote as Identity(initializer) (PyTorch does
        # so for BatchNormalization statistics equal to its affine
        # parameters) becomes an initializer of its own.
        for node in list(graph.node):
            name = node.output[0] if node.output else None
            if node.op_type == "Identity" and name in weights and name not in written:
                graph.node.remove(node)
                graph.initializer.append(numpy_helper.from_array(np.asarray(weights[name]), name))
                written.add(name)
        missing = sorted(set(weights) - written)
        if missing:  # pragma: no cover - weights come from this graph
            raise ValueError(f"The graph has no initializer {missing}.")
        if self.label_name:
            model = self._without_loss(model)
        return model

    def _without_loss(self, model):
        """``model`` without what reads the label input: the prediction and
        every output that does not depend on the label."""
        graph = model.graph
        outputs = [o.name for o in graph.output
                   if self.label_name not in inputs_feeding(graph, o.name)]
        if self.output_name not in outputs:
            outputs.append(self.output_name)
        inferred = onnx.shape_inference.infer_shapes(model)
        part = Extractor(inferred).extract_model(list(self.input_names), outputs)
        part.ir_version = model.ir_version
        del part.graph.value_info[:]
        return part
