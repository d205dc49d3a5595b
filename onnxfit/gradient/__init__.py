"""The gradient seam: how onnxfit gets the gradient of a graph.

Everything that needs a gradient -- the two training engines,
:class:`onnxfit.OnnxFunction`, losses without a closed-form derivative --
calls this package, never a backend directly:

* :func:`build_vjp` appends to a model the vector-Jacobian products of some
  of its values ("seeds": each value's cotangent is a new graph input, or 1
  for a scalar such as a penalty) with respect to weights or inputs, and
  names the gradient outputs;
* :func:`split_gradient_graph` cuts such a graph into a forward graph (the
  model's outputs plus what the backward pass needs) and a backward graph,
  and :class:`ForwardBackwardRunner` runs the two as plain onnxruntime
  sessions, passing OrtValues between them.

Two backends build the graphs:

* ``'onnxfit'`` (the default, :mod:`.own`): onnxfit's own reverse-mode
  differentiation, a table of per-operator rules (:mod:`.rules`) that write
  standard ONNX operators only, run by any onnxruntime build;
* ``'onnxruntime-training'`` (:mod:`.ort_training`): the gradient builder
  of onnxruntime-training-cpu 1.19.2, when that build is installed (Python
  3.12 and older), kept as a second opinion: onnxfit's rules are checked
  against finite differences, PyTorch and gradients saved from it.
"""

from dataclasses import dataclass, field

import onnx

from ..onnx_graphs import existing_names
from .own import GradientError
from .rules import differentiable_ops
from .split import ForwardBackwardRunner, SplitGradient, split_gradient_graph

#: Names of the gradient backends, the default first.
BACKENDS = ("onnxfit", "onnxruntime-training")
DEFAULT_BACKEND = "onnxfit"

__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "GradientGraph", "GradientError", "ForwardBackwardRunner",
    "SplitGradient", "available_backends", "build_vjp", "check_backend", "differentiable_ops",
    "gradient_output_name", "split_gradient_graph",
]


@dataclass
class GradientGraph:
    """A model extended with vector-Jacobian products (see :func:`build_vjp`).

    Attributes
    ----------
    model : onnx.ModelProto
        Inputs: the model's inputs, then one cotangent input per seed given
        by name (unless the model defines that value itself); outputs: the
        model's outputs, then one gradient per differentiated name.
    output_names : list of str
        The model's own outputs.
    gradient_names : dict of str -> str
        Differentiated weight or input -> name of its gradient output.
    cotangent_names : dict of str -> str
        Seeded value -> name of the input holding its cotangent (seeds of 1
        have none).
    backend : str
    """

    model: onnx.ModelProto
    output_names: list
    gradient_names: dict
    cotangent_names: dict = field(default_factory=dict)
    backend: str = DEFAULT_BACKEND


def gradient_output_name(name):
    """Name of the gradient output of weight or input ``name``."""
    return f"onnxfit.grad.{name}"


def _backend_module(name):
    if name == "onnxfit":
        from . import own

        return own
    if name == "onnxruntime-training":
        from . import ort_training

        return ort_training
    raise ValueError(f"Unknown gradient backend {name!r}; choose one of {list(BACKENDS)}.")


def check_backend(name):
    """Raise a clear error unless backend ``name`` is usable here.

    Raises
    ------
    ValueError
        For an unknown name.
    ImportError
        When the backend needs a runtime that is not installed (the
        onnxruntime-training build, say), with how to install it.
    """
    module = _backend_module(name)
    check = getattr(module, "check_available", None)
    if check is not None:
        check()
    return module


def available_backends():
    """Names of the gradient backends usable with the installed onnxruntime."""
    usable = []
    for name in BACKENDS:
        try:
            check_backend(name)
        except ImportError:
            continue
        usable.append(name)
    return usable


def build_vjp(model, seeds, wrt, backend=DEFAULT_BACKEND):
    """Append to ``model`` the vector-Jacobian products of its seeded values.

    The gradient outputs hold ``sum over seeds of J(seed)^T cotangent`` with
    respect to each name of ``wrt``: with one seed ``Y`` and its cotangent
    dL/dY, the gradients dL/dW of the weights.

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified.
    seeds : dict of str -> str or 1
        Value of the graph -> name of the graph input that will hold its
        cotangent (it may also be a value the caller defines later, when it
        appends more nodes), or 1 for a scalar value (a penalty, a loss).
    wrt : list of str
        Graph inputs or initializers to differentiate with respect to.
    backend : {'onnxfit', 'onnxruntime-training'}, default='onnxfit'

    Returns
    -------
    GradientGraph

    Raises
    ------
    GradientError
        When a weight's path to a seed crosses an operator without a rule,
        or only operators whose derivative is zero; the message names the
        operators, their nodes and the weights behind them.
    """
    if not seeds:
        raise ValueError("build_vjp needs at least one seeded value.")
    wrt = list(wrt)
    if not wrt or len(set(wrt)) != len(wrt):
        raise ValueError(f"wrt must list distinct names, got {wrt}.")
    graph = model.graph
    defined = existing_names(graph)
    unknown = [v for v in seeds if v not in defined]
    if unknown:
        raise ValueError(f"{unknown} are not values of the graph.")
    leaves = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    computed = [w for w in wrt if w not in leaves]
    if computed:
        raise ValueError(
            f"wrt must name graph inputs or initializers; {computed} are "
            + ("computed by the graph." if set(computed) <= defined else "not values of the graph.")
        )
    for value, seed in seeds.items():
        if not (isinstance(seed, str) or seed == 1):
            raise ValueError(f"The seed of {value!r} must be an input name or 1, not {seed!r}.")
    module = check_backend(backend)
    names = {w: gradient_output_name(w) for w in wrt}
    result = module.vjp(model, dict(seeds), wrt, names)
    return GradientGraph(
        model=result,
        output_names=[o.name for o in model.graph.output],
        gradient_names=names,
        cotangent_names={v: s for v, s in seeds.items() if isinstance(s, str)},
        backend=backend,
    )
