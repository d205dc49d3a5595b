"""The table of vector-Jacobian rules, and what a rule receives.

A rule differentiates one ONNX operator: given the node and the cotangent of
each of its outputs (dL/dY, the name of a value, or None when that output
does not reach the loss), it writes the nodes computing the cotangent of
each input (dL/dX) and returns their names, None for inputs that need none.
Rules are registered by operator name with :func:`rule`, as PyTorch's
``derivatives.yaml`` or JAX's ``ad`` rules, and write only default-domain
ONNX operators, so any onnxruntime build runs the result.

A rule writes through its first argument, a ``RuleContext``
(:mod:`onnxfit.gradient.own`): ``g.Mul(a, b)`` appends a node and returns its
output; ``g.constant(0.5, like=x)`` is a constant of ``x``'s type;
``g.shape(x)`` is the static shape inference found; ``g.sum_to(dy, x, y)``
reduces a cotangent shaped like the broadcast result ``y`` back to ``x``'s
shape.  A rule that cannot handle a configuration of its operator raises
:class:`NotDifferentiable` with the reason: the graph is then refused before
training, with the node and the weights behind it named.

Operators too large for one rule (LSTM, GRU, RNN) have an *expansion*
instead, registered with :func:`expansion`: before the reverse pass, each
such node on the way from a differentiated weight to the loss is replaced,
in the gradient graph only, by an equivalent subgraph of operators that have
rules (the recurrence unrolled over its time steps), which the rules then
differentiate.  An expansion receives the same context and node as a rule,
writes the subgraph's nodes, and returns the value computing each output of
the node (None for outputs the graph does not use); it raises
:class:`NotDifferentiable` as a rule does.
"""

#: Operator name -> rule function ``rule(g, node, dys) -> list``.
RULES = {}

#: Operator name -> expansion function ``expand(g, node) -> list``, for
#: operators replaced by a subgraph of operators with rules before the
#: reverse pass (see the module docstring).
EXPANSIONS = {}

#: Operator name -> positions of float inputs the output has no derivative
#: with respect to (CastLike's type source, Dropout's ratio): nothing flows
#: back into them, and a weight reaching the loss only through one of them
#: is refused as one behind a zero derivative.
CONSTANT_INPUTS = {}

#: Operators whose outputs have a zero derivative almost everywhere (or no
#: float output): nothing flows back through them, as in PyTorch.  A weight
#: whose every path to the loss crosses one of them would never move, and is
#: refused.
ZERO_DERIVATIVE = frozenset({
    "Shape", "Size", "ConstantOfShape", "Constant", "Range", "EyeLike", "OneHot",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero",
    "Floor", "Ceil", "Round", "Sign", "Hardmax",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
})


class NotDifferentiable(Exception):
    """A rule cannot differentiate this configuration of its operator.

    The message says why (and, where there is one, what works instead).
    """


def rule(*op_types, constant_inputs=()):
    """Register the decorated function as the rule of ``op_types``.

    ``constant_inputs`` lists the positions of inputs without a derivative
    (see :data:`CONSTANT_INPUTS`); the rule returns None for them.
    """

    def register(function):
        for op_type in op_types:
            if op_type in RULES:  # pragma: no cover - a programming error
                raise ValueError(f"Two rules for {op_type}.")
            RULES[op_type] = function
            CONSTANT_INPUTS[op_type] = frozenset(constant_inputs)
        return function

    return register


def expansion(*op_types):
    """Register the decorated function as the expansion of ``op_types``
    (see :data:`EXPANSIONS`)."""

    def register(function):
        for op_type in op_types:
            if op_type in EXPANSIONS or op_type in RULES:  # pragma: no cover - a programming error
                raise ValueError(f"Two ways to differentiate {op_type}.")
            EXPANSIONS[op_type] = function
        return function

    return register


def differentiable_ops():
    """Names of the operators onnxfit differentiates (by a rule or an
    expansion), sorted."""
    return sorted(set(RULES) | set(EXPANSIONS))
