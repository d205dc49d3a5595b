"""Rules of the loss operators PyTorch exports: SoftmaxCrossEntropyLoss and
NegativeLogLikelihoodLoss.

Graphs that carry their own loss (``loss_output=`` of the estimators, the
``TrainingSession`` design) end with one of them: ``nn.CrossEntropyLoss``
exports as SoftmaxCrossEntropyLoss with both PyTorch exporters.  Both take
class scores ``(N, C, d1, ...)`` and integer targets ``(N, d1, ...)``,
optional class weights, an ``ignore_index`` and a reduction; the targets
and weights have no derivative.  With ``w_i`` the weight of sample ``i``'s
class (0 where its target is ignored):

* NegativeLogLikelihoodLoss: ``loss_i = -w_i x[i, t_i]``, so
  ``dx = -onehot(t) * c``;
* SoftmaxCrossEntropyLoss: the same on ``LogSoftmax(scores)``, so
  ``dscores = (softmax(scores) - onehot(t)) * c``;

where ``c_i = dy_i w_i`` (reduction ``none``), ``dy w_i`` (``sum``) or
``dy w_i / sum_j w_j`` (``mean``), broadcast over the class axis.
"""

from onnx import TensorProto

from .registry import NotDifferentiable, rule


def _class_axis_column(g, value):
    """``value`` of shape (N, d1, ...) as (N, 1, d1, ...)."""
    return g.Unsqueeze(value, g.ints([1]))


def _weighted_one_hot(g, node, scores, dy):
    """(one-hot targets, per-element coefficient ``c`` shaped (N, 1, d1...))."""
    target = node.input[1]
    rank = g.rank(scores)
    if rank is None:
        raise NotDifferentiable(f"{node.op_type} on scores of unknown rank.")
    ignore = node.attr("ignore_index", None)
    reduction = node.attr("reduction", "mean")
    if isinstance(reduction, bytes):
        reduction = reduction.decode()
    classes = g.Gather(g.shape_of(scores), g.ints([1]))
    index = g.Range(g.constant(0, elem_type=TensorProto.INT64),
                    g.Squeeze(classes, g.ints([0])), g.constant(1, elem_type=TensorProto.INT64))
    column = g.Reshape(index, g.ints([1, -1] + [1] * (rank - 2)))
    target = g.Cast(target, to=TensorProto.INT64)
    one_hot = g.CastLike(g.Equal(_class_axis_column(g, target), column), scores)
    has_weights = len(node.input) > 2 and node.input[2]
    if ignore is not None:
        kept = g.Not(g.Equal(target, g.constant(int(ignore), elem_type=TensorProto.INT64)))
        safe = g.Where(kept, target, g.constant(0, elem_type=TensorProto.INT64))
        weight = g.CastLike(kept, scores)
        if has_weights:
            weight = g.Mul(weight, g.Gather(node.input[2], safe))
    elif has_weights:
        weight = g.Gather(node.input[2], target)
    else:
        weight = None
    if reduction == "none":
        coefficient = dy if weight is None else g.Mul(dy, weight)
    elif reduction in ("sum", "mean"):
        if weight is None:
            weight = g.fill(g.shape_of(target), 1.0, like=scores)
        coefficient = g.Mul(dy, weight)
        if reduction == "mean":
            total = g.reduce("ReduceSum", weight, None, keepdims=0)
            coefficient = g.Div(coefficient, total)
    else:
        raise NotDifferentiable(f"{node.op_type} with reduction={reduction!r}.")
    return one_hot, _class_axis_column(g, coefficient)


@rule("SoftmaxCrossEntropyLoss", constant_inputs=(1, 2))
def softmax_cross_entropy_loss(g, node, dys):
    scores = node.input[0]
    softmax = g.Softmax(scores, axis=1)
    grad = None
    if dys[0] is not None:
        one_hot, coefficient = _weighted_one_hot(g, node, scores, dys[0])
        grad = g.Mul(g.Sub(softmax, one_hot), coefficient)
    if len(dys) > 1 and dys[1] is not None:  # the log_prob output: LogSoftmax's rule
        d_log = dys[1]
        through = g.Sub(d_log, g.Mul(softmax, g.reduce("ReduceSum", d_log, [1], keepdims=1)))
        grad = through if grad is None else g.Add(grad, through)
    return [grad, None, None]


@rule("NegativeLogLikelihoodLoss", constant_inputs=(1, 2))
def negative_log_likelihood_loss(g, node, dys):
    one_hot, coefficient = _weighted_one_hot(g, node, node.input[0], dys[0])
    return [g.Neg(g.Mul(one_hot, coefficient)), None, None]
