"""Rules of element-wise operators: arithmetic with broadcasting,
activations, Min/Max/Clip/Where, variadic sums, casts.

Each rule receives ``g`` (the rule context: ``g.Mul(a, b)`` writes a node),
the node, and ``dys``, the cotangent of each output; it returns the cotangent
of each input (None where none is needed).  Broadcast operands get their
cotangent summed back to their own shape with ``g.sum_to``.
"""

import math

from onnx import TensorProto

from .registry import NotDifferentiable, rule


def _binary(g, node, da, db):
    """Cotangents of a broadcasting binary operator, each summed to its
    operand's shape; ``da``/``db`` build them (called only when needed).

    Operands of one and the same inferred shape were not broadcast against
    each other, whatever their symbols: no reduction is written.
    """
    a, b = node.input[:2]
    y = node.output[0]
    same = g.shape(a) is not None and g.shape(a) == g.shape(b)
    if same:
        return [da() if node.needs(0) else None, db() if node.needs(1) else None]
    return [
        g.sum_to(da(), a, y) if node.needs(0) else None,
        g.sum_to(db(), b, y) if node.needs(1) else None,
    ]


def _mask(g, condition, like):
    """A 0/1 tensor of ``like``'s type from a boolean ``condition``.

    ``Cast(bool)`` then ``Mul`` runs as fast as any arithmetic form of the
    mask, and is exact for every input (subnormal numbers included).
    """
    return g.Cast(condition, to=g.elem_type(like) or TensorProto.FLOAT)


# -- arithmetic -------------------------------------------------------------------
@rule("Add")
def add(g, node, dys):
    dy, = dys
    return _binary(g, node, lambda: dy, lambda: dy)


@rule("Sub")
def sub(g, node, dys):
    dy, = dys
    return _binary(g, node, lambda: dy, lambda: g.Neg(dy))


@rule("Mul")
def mul(g, node, dys):
    dy, = dys
    a, b = node.input
    return _binary(g, node, lambda: g.Mul(dy, b), lambda: g.Mul(dy, a))


@rule("Div")
def div(g, node, dys):
    # y = a / b: da = dy / b, db = -dy a / b^2 = -dy y / b.
    dy, = dys
    b, y = node.input[1], node.output[0]
    return _binary(g, node, lambda: g.Div(dy, b), lambda: g.Neg(g.Div(g.Mul(dy, y), b)))


@rule("Pow")
def pow_(g, node, dys):
    # y = a^b: da = dy b a^(b - 1), db = dy y log(a); both 0 where PyTorch
    # makes them 0 (da where b = 0, db where a = 0 and b >= 0) instead of
    # the 0 * inf of the formulas.
    dy, = dys
    a, b = node.input
    y = node.output[0]
    zero = g.constant(0.0, like=a)

    def da():
        exponent = g.const_value(b)
        if exponent is not None and exponent.size == 1:
            e = float(exponent.reshape(()))
            if e == 0.0:
                return g.Mul(dy, zero)
            if e == 2.0:
                return g.Mul(dy, g.Mul(a, g.constant(2.0, like=a)))
            return g.Mul(dy, g.Mul(g.Pow(a, g.constant(e - 1.0, like=a)), g.constant(e, like=a)))
        b_like_a = b if g.elem_type(b) == g.elem_type(a) else g.CastLike(b, a)
        lowered = g.Sub(b_like_a, g.constant(1.0, like=a))
        slope = g.Mul(g.Pow(a, lowered), b_like_a)
        return g.Mul(dy, g.Where(g.Equal(b_like_a, zero), zero, slope))

    def db():
        at_zero = g.And(g.Equal(a, zero), g.GreaterOrEqual(b, g.constant(0.0, like=b)))
        return g.Where(at_zero, g.constant(0.0, like=b), g.Mul(dy, g.Mul(y, g.Log(a))))

    return _binary(g, node, da, db)


@rule("Neg")
def neg(g, node, dys):
    return [g.Neg(dys[0])]


@rule("Abs")
def abs_(g, node, dys):
    return [g.Mul(dys[0], g.Sign(node.input[0]))]


@rule("Sqrt")
def sqrt(g, node, dys):
    y = node.output[0]
    return [g.Div(dys[0], g.Mul(y, g.constant(2.0, like=y)))]


@rule("Reciprocal")
def reciprocal(g, node, dys):
    y = node.output[0]
    return [g.Neg(g.Mul(dys[0], g.Mul(y, y)))]


@rule("Exp")
def exp(g, node, dys):
    return [g.Mul(dys[0], node.output[0])]


@rule("Log")
def log(g, node, dys):
    return [g.Div(dys[0], node.input[0])]


@rule("Sin")
def sin(g, node, dys):
    return [g.Mul(dys[0], g.Cos(node.input[0]))]


@rule("Cos")
def cos(g, node, dys):
    return [g.Neg(g.Mul(dys[0], g.Sin(node.input[0])))]


@rule("Erf")
def erf(g, node, dys):
    x = node.input[0]
    slope = g.Mul(g.Exp(g.Neg(g.Mul(x, x))), g.constant(2.0 / math.sqrt(math.pi), like=x))
    return [g.Mul(dys[0], slope)]


# -- activations -----------------------------------------------------------------------
@rule("Relu")
def relu(g, node, dys):
    y = node.output[0]
    return [g.Mul(dys[0], _mask(g, g.Greater(y, g.constant(0.0, like=y)), y))]


@rule("LeakyRelu")
def leaky_relu(g, node, dys):
    x, = node.input
    dy, = dys
    alpha = node.attr("alpha", 0.01)
    positive = g.Greater(x, g.constant(0.0, like=x))
    return [g.Where(positive, dy, g.Mul(dy, g.constant(alpha, like=x)))]


@rule("PRelu")
def prelu(g, node, dys):
    x, slope = node.input
    dy, = dys
    y = node.output[0]
    positive = g.Greater(x, g.constant(0.0, like=x))
    zero = g.constant(0.0, like=x)
    return [
        g.Where(positive, dy, g.Mul(dy, slope)) if node.needs(0) else None,
        g.sum_to(g.Where(positive, zero, g.Mul(dy, x)), slope, y) if node.needs(1) else None,
    ]


@rule("Elu")
def elu(g, node, dys):
    # y = alpha (exp(x) - 1) below zero: dy/dx = y + alpha there.
    x, = node.input
    dy, = dys
    y = node.output[0]
    alpha = node.attr("alpha", 1.0)
    positive = g.Greater(x, g.constant(0.0, like=x))
    return [g.Where(positive, dy, g.Mul(dy, g.Add(y, g.constant(alpha, like=y))))]


@rule("Celu")
def celu(g, node, dys):
    # y = alpha (exp(x / alpha) - 1) below zero: dy/dx = exp(x / alpha) there.
    x, = node.input
    dy, = dys
    alpha = node.attr("alpha", 1.0)
    positive = g.Greater(x, g.constant(0.0, like=x))
    return [g.Where(positive, dy, g.Mul(dy, g.Exp(g.Div(x, g.constant(alpha, like=x)))))]


@rule("Selu")
def selu(g, node, dys):
    # y = gamma x above zero, gamma alpha (exp(x) - 1) below: slope y + gamma alpha.
    x, = node.input
    dy, = dys
    y = node.output[0]
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    positive = g.Greater(x, g.constant(0.0, like=x))
    below = g.Mul(dy, g.Add(y, g.constant(gamma * alpha, like=y)))
    return [g.Where(positive, g.Mul(dy, g.constant(gamma, like=x)), below)]


@rule("Sigmoid")
def sigmoid(g, node, dys):
    y = node.output[0]
    return [g.Mul(g.Mul(dys[0], y), g.Sub(g.constant(1.0, like=y), y))]


@rule("HardSigmoid")
def hard_sigmoid(g, node, dys):
    # y = clip(alpha x + beta, 0, 1): slope alpha strictly inside (0, 1).
    y = node.output[0]
    alpha = node.attr("alpha", 0.2)
    inside = g.And(g.Greater(y, g.constant(0.0, like=y)), g.Less(y, g.constant(1.0, like=y)))
    return [g.Mul(dys[0], g.Mul(_mask(g, inside, y), g.constant(alpha, like=y)))]


@rule("HardSwish")
def hard_swish(g, node, dys):
    # y = x clip(x / 6 + 1 / 2, 0, 1): slope 0 below -3, 1 above 3, (2x + 3) / 6 between.
    x, = node.input
    lower, upper = g.constant(-3.0, like=x), g.constant(3.0, like=x)
    middle = g.Add(g.Div(x, g.constant(3.0, like=x)), g.constant(0.5, like=x))
    slope = g.Where(g.Less(x, lower), g.constant(0.0, like=x),
                    g.Where(g.Greater(x, upper), g.constant(1.0, like=x), middle))
    return [g.Mul(dys[0], slope)]


@rule("Tanh")
def tanh(g, node, dys):
    y = node.output[0]
    return [g.Mul(dys[0], g.Sub(g.constant(1.0, like=y), g.Mul(y, y)))]


@rule("Softplus")
def softplus(g, node, dys):
    return [g.Mul(dys[0], g.Sigmoid(node.input[0]))]


@rule("Softsign")
def softsign(g, node, dys):
    # y = x / (1 + |x|): dy/dx = 1 / (1 + |x|)^2.
    x, = node.input
    denominator = g.Add(g.Abs(x), g.constant(1.0, like=x))
    return [g.Div(dys[0], g.Mul(denominator, denominator))]


@rule("Gelu")
def gelu(g, node, dys):
    x, = node.input
    dy, = dys
    approximate = node.attr("approximate", "none")
    half = g.constant(0.5, like=x)
    if approximate == "tanh":
        # y = x/2 (1 + t), t = tanh(k (x + c x^3)):
        # dy/dx = (1 + t)/2 + x/2 (1 - t^2) k (1 + 3 c x^2).
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        x2 = g.Mul(x, x)
        inner = g.Mul(g.Add(x, g.Mul(g.Mul(x2, x), g.constant(c, like=x))), g.constant(k, like=x))
        t = g.Tanh(inner)
        one = g.constant(1.0, like=x)
        d_inner = g.Mul(g.Add(one, g.Mul(x2, g.constant(3 * c, like=x))), g.constant(k, like=x))
        slope = g.Add(g.Mul(g.Add(one, t), half),
                      g.Mul(g.Mul(g.Mul(x, half), g.Sub(one, g.Mul(t, t))), d_inner))
        return [g.Mul(dy, slope)]
    if approximate != "none":
        raise NotDifferentiable(f"Gelu with approximate={approximate!r} is not an ONNX option.")
    # y = x Phi(x): dy/dx = Phi(x) + x phi(x).
    cdf = g.Mul(g.Add(g.Erf(g.Mul(x, g.constant(1.0 / math.sqrt(2.0), like=x))),
                      g.constant(1.0, like=x)), half)
    pdf = g.Mul(g.Exp(g.Mul(g.Mul(x, x), g.constant(-0.5, like=x))),
                g.constant(1.0 / math.sqrt(2.0 * math.pi), like=x))
    return [g.Mul(dy, g.Add(cdf, g.Mul(x, pdf)))]


# -- selections ------------------------------------------------------------------------
def _extremum(g, node, dys):
    # The output equals the inputs that hold the extremum; ties share the
    # cotangent equally (as PyTorch's maximum and amax).
    dy, = dys
    y = node.output[0]
    inputs = node.input
    masks = [_mask(g, g.Equal(x, y), y) for x in inputs]
    if len(inputs) == 1:
        return [dy]
    count = g.accumulate(masks)
    share = g.Div(dy, count)
    return [
        g.sum_to(g.Mul(share, mask), x, y) if node.needs(k) else None
        for k, (x, mask) in enumerate(zip(inputs, masks))
    ]


rule("Min")(_extremum)
rule("Max")(_extremum)


@rule("Clip")
def clip(g, node, dys):
    # y = min(max(x, lo), hi): dy passes where lo <= x <= hi (as PyTorch's
    # clamp); a tensor bound gets dy where it is the value y takes (hi
    # everywhere when lo > hi, as ONNX defines it).
    dy, = dys
    x = node.input[0]
    lo = node.input[1] if node.has_input(1) else None
    hi = node.input[2] if node.has_input(2) else None
    low = g.Max(x, lo) if lo is not None else x
    passes_hi = g.LessOrEqual(low, hi) if hi is not None else None
    below_hi = dy if passes_hi is None else g.Mul(dy, _mask(g, passes_hi, x))
    grads = [below_hi if lo is None else g.Mul(below_hi, _mask(g, g.GreaterOrEqual(x, lo), x))]
    total = lambda value: g.reduce("ReduceSum", value, None, keepdims=0)  # noqa: E731
    grads.append(total(g.Mul(below_hi, _mask(g, g.Less(x, lo), x)))
                 if lo is not None and node.needs(1) else None)
    grads.append(total(g.Mul(dy, _mask(g, g.Not(passes_hi), x)))
                 if hi is not None and node.needs(2) else None)
    return grads


@rule("Where")
def where(g, node, dys):
    dy, = dys
    condition, a, b = node.input
    y = node.output[0]
    zero = g.constant(0.0, like=y)
    return [
        None,
        g.sum_to(g.Where(condition, dy, zero), a, y) if node.needs(1) else None,
        g.sum_to(g.Where(condition, zero, dy), b, y) if node.needs(2) else None,
    ]


@rule("Sum")
def sum_(g, node, dys):
    dy, = dys
    y = node.output[0]
    return [g.sum_to(dy, x, y) if node.needs(k) else None for k, x in enumerate(node.input)]


@rule("Mean")
def mean(g, node, dys):
    y = node.output[0]
    share = g.Div(dys[0], g.constant(float(len(node.input)), like=y))
    return [g.sum_to(share, x, y) if node.needs(k) else None for k, x in enumerate(node.input)]


# -- identities and casts -----------------------------------------------------------------
@rule("Identity")
def identity(g, node, dys):
    return [dys[0]]


@rule("Dropout", constant_inputs=(1, 2))
def dropout(g, node, dys):
    # Inference form (no training_mode, or a constant False): the identity.
    # Training form: dy where the forward pass kept the value, scaled as it.
    dy = dys[0]
    if not node.has_input(2):
        return [dy, None, None]
    training = g.const_value(node.input[2])
    if training is None:
        raise NotDifferentiable(
            "Dropout's training_mode is computed at run time; export the graph with a "
            "constant one (eval mode for inference)."
        )
    if not bool(training.reshape(-1)[0]):
        return [dy, None, None]
    ratio = 0.5
    if node.has_input(1):
        value = g.const_value(node.input[1])
        if value is None:
            raise NotDifferentiable("Dropout in training mode needs a constant ratio.")
        ratio = float(value.reshape(-1)[0])
    if not 0.0 <= ratio < 1.0:
        raise NotDifferentiable(f"Dropout with ratio={ratio} drops everything.")
    y = node.output[0]
    kept = g.forward_output(node, 1, TensorProto.BOOL)
    return [g.Mul(g.Mul(dy, _mask(g, kept, y)), g.constant(1.0 / (1.0 - ratio), like=y)),
            None, None]


@rule("Cast")
def cast(g, node, dys):
    x = node.input[0]
    return [g.Cast(dys[0], to=g.elem_type(x))] if g.elem_type(x) else [g.CastLike(dys[0], x)]


@rule("CastLike", constant_inputs=(1,))
def cast_like(g, node, dys):
    return [g.CastLike(dys[0], node.input[0]), None]
