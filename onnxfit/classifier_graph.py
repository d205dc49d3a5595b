"""What a classification graph computes: scores, probabilities, labels.

:class:`~onnxfit.classifier.OnnxSGDClassifier` accepts three families of
graphs, and this module finds in each which value to train and how it turns
into probabilities and labels:

* **raw-score graphs** (hand-written, PyTorch exports, onnxfit's default
  linear model): the output holds one logit per class, or one logit for a
  binary problem;
* **graphs ending with a softmax or a sigmoid** (hand-written, or skl2onnx
  conversions of ``LogisticRegression``, ``SGDClassifier`` and
  ``MLPClassifier``): onnxfit trains the *scores* that feed the final
  softmax/sigmoid, with a numerically stable cross-entropy, and leaves the
  softmax/sigmoid in place for prediction;
* **skl2onnx classifiers** also have a label output and, by default, a ZipMap
  output (a sequence of maps, which has no gradient): the probabilities are
  the tensor feeding the ZipMap.

The scores are found structurally (the last affine operator -- MatMul, Gemm,
Conv, possibly followed by a bias Add -- on every path to the probabilities)
and the function from scores to probabilities is recognised *numerically*:
the sub-graph between the two is run on random scores and compared with
softmax, sigmoid and the one-vs-rest normalised sigmoid of ``SGDClassifier``.
This covers the many ways converters write the same function (Softmax,
Softmax + Normalizer, ``Concat(1 - Sigmoid(s), Sigmoid(s))``,
``Reciprocal(1 + Exp(-s))`` normalised by its sum, ...).

``ai.onnx.ml.LinearClassifier`` -- what skl2onnx writes for
``LogisticRegression`` -- stores its coefficients as node attributes, which
cannot be trained: :func:`rewrite_linear_classifiers` replaces it with the
equivalent MatMul + Add + Softmax/Sigmoid + Gather.
"""

import numbers
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, softmax
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.utils import Extractor

from .onnx_graphs import numpy_dtype, tensor_elem_type, value_types

_ML_DOMAIN = "ai.onnx.ml"
_AFFINE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
_LABEL_TYPES = {
    TensorProto.INT64, TensorProto.INT32, TensorProto.STRING, TensorProto.BOOL,
}


# -- ai.onnx.ml.LinearClassifier -> standard operators ---------------------------
def rewrite_linear_classifiers(model):
    """Replace ``ai.onnx.ml.LinearClassifier`` nodes by trainable operators.

    ``LinearClassifier`` keeps its weights in attributes (no initializer, no
    gradient).  Each node becomes ``scores = X @ coef + intercept`` with
    ``coef``/``intercept`` initializers, then the node's ``post_transform``
    (``NONE``, ``LOGISTIC`` or ``SOFTMAX``) and ``label = classes[argmax]``,
    with the node's own output names, so the rest of the graph (Normalizer,
    ZipMap, Cast) is unchanged.  skl2onnx writes a binary logistic regression
    as two opposite rows ``[-w, w]``; they become one trainable logit and
    ``Concat(1 - Sigmoid(s), Sigmoid(s))``, which stays a probability while
    training.

    Parameters
    ----------
    model : onnx.ModelProto

    Returns
    -------
    onnx.ModelProto
        ``model`` itself when it has no LinearClassifier, else a new model.

    Raises
    ------
    ValueError
        For configurations skl2onnx does not write for LogisticRegression
        (one coefficient row for two classes, PROBIT or SOFTMAX_ZERO).
    """
    graph = model.graph
    if not any(_is_linear_classifier(n) for n in graph.node):
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    types = value_types(result)
    nodes = list(graph.node)
    del graph.node[:]
    used = _all_names(result)
    for k, node in enumerate(nodes):
        if not _is_linear_classifier(node):
            graph.node.append(node)
            continue
        prefix = _fresh(used, (node.name or f"LinearClassifier_{k}") + "_onnxfit")
        new_nodes, inits = _linear_classifier_nodes(node, prefix, types)
        graph.node.extend(new_nodes)
        graph.initializer.extend(inits)
    if not any(o.domain in ("", "ai.onnx") for o in result.opset_import):
        result.opset_import.append(helper.make_opsetid("", 17))
    onnx.checker.check_model(result)
    return result


def _is_linear_classifier(node):
    return node.op_type == "LinearClassifier" and node.domain == _ML_DOMAIN


def _fresh(used, base):
    name, k = base, 0
    while any(u.startswith(name) for u in used):
        k += 1
        name = f"{base}{k}"
    used.add(name)
    return name


def _linear_classifier_nodes(node, prefix, types):
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("classlabels_strings"):
        classes = np.array([s.decode() for s in attrs["classlabels_strings"]], dtype=object)
    else:
        classes = np.array(attrs.get("classlabels_ints", []), dtype=np.int64)
    post = attrs.get("post_transform", b"NONE")
    post = post.decode() if isinstance(post, bytes) else str(post)
    coefficients = np.asarray(attrs["coefficients"], dtype=np.float32)
    intercepts = np.asarray(attrs.get("intercepts", []), dtype=np.float32)
    n_rows = len(intercepts) if len(intercepts) else len(classes)
    if n_rows == 0 or coefficients.size % n_rows:
        raise ValueError(
            f"LinearClassifier {node.name!r}: cannot read its coefficients "
            f"({coefficients.size} values for {n_rows} rows)."
        )
    coef = coefficients.reshape(n_rows, -1)
    if not len(intercepts):
        intercepts = np.zeros(n_rows, dtype=np.float32)
    if post not in ("NONE", "LOGISTIC", "SOFTMAX") or n_rows != len(classes):
        raise ValueError(
            f"LinearClassifier {node.name!r} (post_transform={post}, {n_rows} "
            f"coefficient row(s) for {len(classes)} classes) cannot be turned into "
            "trainable operators by onnxfit. Convert the scikit-learn model with "
            "skl2onnx's black_op={'LinearClassifier'}, which writes MatMul + Add "
            "instead."
        )
    x_name, label_name = node.input[0], node.output[0]
    scores_out = node.output[1] if len(node.output) > 1 and node.output[1] else prefix + "_Z"
    nodes, inits = [], []
    if types.get(x_name) != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x_name], [prefix + "_X"], to=TensorProto.FLOAT))
        x_name = prefix + "_X"
    binary_pair = (
        n_rows == 2 and post == "LOGISTIC"
        and np.allclose(coef[0], -coef[1]) and np.isclose(intercepts[0], -intercepts[1])
    )
    if binary_pair:
        coef, intercepts = coef[1:], intercepts[1:]
    inits.append(numpy_helper.from_array(np.ascontiguousarray(coef.T), prefix + "_coef"))
    inits.append(numpy_helper.from_array(intercepts, prefix + "_intercept"))
    scores = prefix + "_scores"
    nodes.append(helper.make_node("MatMul", [x_name, prefix + "_coef"], [prefix + "_XW"]))
    nodes.append(helper.make_node("Add", [prefix + "_XW", prefix + "_intercept"], [scores]))
    if binary_pair:
        inits.append(numpy_helper.from_array(np.ones(1, dtype=np.float32), prefix + "_one"))
        nodes += [
            helper.make_node("Sigmoid", [scores], [prefix + "_positive"]),
            helper.make_node("Sub", [prefix + "_one", prefix + "_positive"],
                             [prefix + "_negative"]),
            helper.make_node("Concat", [prefix + "_negative", prefix + "_positive"],
                             [scores_out], axis=1),
            # The label follows the raw score (no sigmoid saturation).
            helper.make_node("Neg", [scores], [prefix + "_neg_scores"]),
            helper.make_node("Concat", [prefix + "_neg_scores", scores],
                             [prefix + "_label_scores"], axis=1),
        ]
        label_scores = prefix + "_label_scores"
    else:
        op = {"NONE": "Identity", "LOGISTIC": "Sigmoid", "SOFTMAX": "Softmax"}[post]
        kwargs = {"axis": 1} if op == "Softmax" else {}
        nodes.append(helper.make_node(op, [scores], [scores_out], **kwargs))
        label_scores = scores
    inits.append(numpy_helper.from_array(classes, prefix + "_classes"))
    nodes += [
        helper.make_node("ArgMax", [label_scores], [prefix + "_index"], axis=1, keepdims=0),
        helper.make_node("Gather", [prefix + "_classes", prefix + "_index"], [label_name],
                         axis=0),
    ]
    return nodes, inits


# -- analysis -------------------------------------------------------------------
def infer_value_types(model):
    """``model`` with inferred shapes, and a float type for the ZipMap inputs
    and Normalizer outputs that onnx's inference leaves untyped (both are
    float tensors by definition); needed to extract sub-graphs ending there."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a convenience: without it, fewer
        return model   # intermediate values can be named or recognised
    graph = model.graph
    typed = set(value_types(model))
    untyped = set()
    for node in graph.node:
        if node.domain != _ML_DOMAIN:
            continue
        if node.op_type == "ZipMap":
            untyped.add(node.input[0])
        elif node.op_type == "Normalizer":
            untyped.add(node.output[0])
    for name in sorted(untyped - typed):
        graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


@dataclass
class ClassifierGraph:
    """What :func:`analyse_classifier_graph` found.

    Attributes
    ----------
    trained_output : str
        Value to train: the scores, or the probabilities when no softmax or
        sigmoid could be recognised before them.
    link : str
        How ``trained_output`` becomes probabilities: ``'identity'`` (raw
        scores, the graph computes no probability), ``'softmax'``,
        ``'sigmoid'`` (one logit per column, one-vs-rest when there are
        several) or ``'probability'`` (``trained_output`` holds the
        probabilities).
    probability_output : str or None
        Value holding the graph's own probabilities (the ZipMap input of a
        skl2onnx classifier); None for raw-score graphs.
    label_output : str or None
        Graph output holding predicted labels, if any.
    graph_classes : list or None
        Class labels of the graph's columns (ZipMap or label table), if found.
    default_weights : list of str or None
        Weights to train when the user names none (None: every float
        initializer ``trained_output`` depends on).
    """

    trained_output: str
    link: str
    probability_output: object = None
    label_output: object = None
    graph_classes: object = None
    default_weights: object = None


def analyse_classifier_graph(model, input_names, output_name=None):
    """Find the value to train and the probability/label outputs.

    Parameters
    ----------
    model : onnx.ModelProto
        Graph with inferred shapes (``onnx.shape_inference.infer_shapes``)
        and no LinearClassifier (see :func:`rewrite_linear_classifiers`).
    input_names : list of str
        The graph inputs (the data).
    output_name : str or None
        The user's choice: the value holding the class scores or
        probabilities.  None picks the tensor feeding a ZipMap, else the
        first float tensor output.

    Returns
    -------
    ClassifierGraph

    Raises
    ------
    ValueError
        When ``output_name`` names a ZipMap or label output, or a value that
        does not exist, or when the graph has no float tensor output.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output if o}
    types = value_types(model)
    zipmaps = [n for n in graph.node if n.op_type == "ZipMap" and n.domain == _ML_DOMAIN]
    label_output = next(
        (o.name for o in graph.output if tensor_elem_type(o) in _LABEL_TYPES), None
    )
    float_outputs = [o.name for o in graph.output if numpy_dtype(tensor_elem_type(o)) is not None]

    probabilities = _probabilities(graph, output_name, producers, types, zipmaps,
                                   float_outputs)
    labelled = bool(zipmaps) or label_output is not None
    # Only a converted classifier (label or ZipMap output) names its classes.
    graph_classes = _graph_classes(model, zipmaps, probabilities) if labelled else None

    scores = _find_scores(graph, input_names, producers, probabilities)
    link = None
    if scores is not None:
        link = _identify_link(model, scores, probabilities, types)
    if link is not None:
        return ClassifierGraph(
            trained_output=scores,
            link=link,
            probability_output=None if link == "identity" else probabilities,
            label_output=label_output,
            graph_classes=graph_classes,
        )
    if labelled:
        # Probabilities computed some other way: train them directly, and
        # only the weights that feed the scores (not constants such as a
        # "1" in 1 - p).
        default = None
        if scores is not None:
            default = _float_initializers_feeding(model, input_names, scores)
        return ClassifierGraph(
            trained_output=probabilities,
            link="probability",
            probability_output=probabilities,
            label_output=label_output,
            graph_classes=graph_classes,
            default_weights=default,
        )
    return ClassifierGraph(trained_output=probabilities, link="identity")


def _probabilities(graph, output_name, producers, types, zipmaps, float_outputs):
    """The value holding the class scores or probabilities: ``output_name``
    once checked, else the tensor feeding a ZipMap, else the first float
    tensor output."""
    outputs = {o.name: o for o in graph.output}
    if output_name is None:
        if zipmaps:
            return zipmaps[0].input[0]
        if float_outputs:
            return float_outputs[0]
        raise ValueError(
            "The graph has no float tensor output to train; its outputs are "
            f"{list(outputs)}."
        )
    producer = producers.get(output_name)
    value = outputs.get(output_name)
    is_map = value is not None and not value.type.HasField("tensor_type")
    if is_map or (producer is not None and producer.op_type == "ZipMap"):
        source = producer.input[0] if producer is not None else None
        raise ValueError(
            f"output_name={output_name!r} is a ZipMap output (a sequence of "
            "maps), which has no gradient and cannot be trained. Train the "
            f"tensor that feeds it ({source!r}), or leave output_name=None, "
            "which does that."
        )
    if output_name not in types and output_name not in producers:
        raise ValueError(
            f"output_name={output_name!r} is not a value of the graph; its "
            f"outputs are {list(outputs)}."
        )
    if types.get(output_name) in _LABEL_TYPES:
        raise ValueError(
            f"output_name={output_name!r} holds labels (an integer or string "
            "tensor), which have no gradient: train the scores or the "
            f"probabilities instead (float tensor outputs: {float_outputs})."
        )
    return output_name


def _all_names(model):
    graph = model.graph
    names = {v.name for v in list(graph.input) + list(graph.output)}
    names.update(i.name for i in graph.initializer)
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


def _graph_classes(model, zipmaps, probabilities):
    """Class labels of the graph's probability columns, if written down."""
    for node in zipmaps:
        if node.input[0] != probabilities and len(zipmaps) > 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("classlabels_strings"):
            return [s.decode() for s in attrs["classlabels_strings"]]
        if attrs.get("classlabels_int64s"):
            return [int(v) for v in attrs["classlabels_int64s"]]
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("ArrayFeatureExtractor", "Gather") and node.input[0] in inits:
            init = inits[node.input[0]]
            if init.data_type not in _LABEL_TYPES or len(init.dims) != 1:
                continue
            values = numpy_helper.to_array(init)
            if init.data_type == TensorProto.STRING:
                return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
            return [int(v) for v in values]
    return None


def _is_constant(name, graph_inits, producers):
    if name in graph_inits:
        return True
    node = producers.get(name)
    return node is not None and node.op_type == "Constant"


def _find_scores(graph, input_names, producers, target):
    """The one value that every path from the input to ``target`` leaves
    through last affine operator (MatMul/Gemm/Conv, or a bias Add after one);
    None if paths end on several such values or reach the input directly."""
    inits = {i.name for i in graph.initializer}
    dynamic = set(input_names)
    for node in graph.node:  # nodes of a valid graph are topologically sorted
        if any(i in dynamic for i in node.input if i):
            dynamic.update(o for o in node.output if o)
    if target not in dynamic:
        return None
    found, seen, stack = set(), set(), [target]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None:  # reached the graph input without an affine operator
            return None
        if node.op_type in _AFFINE_OPS or _is_bias_add(node, dynamic, producers, inits):
            found.add(name)
            continue
        stack.extend(i for i in node.input if i and i in dynamic)
    return found.pop() if len(found) == 1 else None


def _is_bias_add(node, dynamic, producers, inits):
    if node.op_type != "Add":
        return False
    moving = [i for i in node.input if i in dynamic]
    fixed = [i for i in node.input if i not in dynamic]
    if len(moving) != 1 or len(fixed) != 1:
        return False
    source = producers.get(moving[0])
    return (
        source is not None and source.op_type in _AFFINE_OPS
        and _is_constant(fixed[0], inits, producers)
    )


def _float_initializers_feeding(model, input_names, name):
    forward = Extractor(model).extract_model(list(input_names), [name])
    return [
        i.name for i in forward.graph.initializer if numpy_dtype(i.data_type) is not None
    ]


def _identify_link(model, scores, probabilities, types):
    """Recognise the function from ``scores`` to ``probabilities`` by running
    the sub-graph between them on random scores."""
    if scores == probabilities:
        return "identity"
    dtype = numpy_dtype(types.get(scores))
    if dtype is None:
        return None
    try:
        sub = Extractor(model).extract_model([scores], [probabilities])
        shape = sub.graph.input[0].type.tensor_type.shape
        width = shape.dim[-1].dim_value if len(shape.dim) == 2 else 0
        if width <= 0:
            return None
        from .sessions import make_session

        rng = np.random.default_rng(0)
        s = (3.0 * rng.standard_normal((16, width))).astype(dtype)
        p = make_session(sub, 1, dtype).run(None, {sub.graph.input[0].name: s})[0]
    except Exception:  # not a self-contained function of the scores
        return None
    p = np.asarray(p, dtype=np.float64).reshape(len(s), -1)
    s = s.astype(np.float64)

    def close(reference):
        return p.shape == reference.shape and np.allclose(p, reference, rtol=1e-4, atol=1e-5)

    if width == 1:
        sig = expit(s)
        if close(sig) or close(np.hstack([1.0 - sig, sig])):
            return "sigmoid"
        # skl2onnx writes a binary hinge/modified-Huber SGDClassifier's
        # "probabilities" as Concat(-s, s) of the raw score s.
        return "identity" if close(s) or close(np.hstack([-s, s])) else None
    if close(softmax(s, axis=1)):
        return "softmax"
    sig = expit(s)
    if close(sig / sig.sum(axis=1, keepdims=True)) or close(sig):
        return "sigmoid"
    if close(s):
        return "identity"
    return None


def class_key(value):
    """Comparable form of a class label: integral numbers (and booleans) as
    ``int``, everything else as ``str``."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, (bool, np.bool_, numbers.Integral)):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    return str(value)
