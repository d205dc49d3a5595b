"""Training engines: the two ways of running a training step.

* :class:`~onnxfit.engines.fused.FusedEngine` (``engine='fused'``): one
  onnxruntime graph computes forward, loss, gradients and the update.
* :class:`~onnxfit.engines.forward_backward.ForwardBackwardEngine`
  (``engine='forward_backward'``): the model's forward and backward, the
  loss, the penalty and the update run as separate graphs.

Both assemble the same pieces (:mod:`.steps`) around a
:class:`~onnxfit.engines.problem.TrainingProblem`, and share the batch loop
and the weight buffers (:mod:`.base`, :mod:`.buffers`).
"""

from .base import BaseEngine
from .forward_backward import ForwardBackwardEngine
from .fused import FusedEngine
from .problem import TrainingProblem

ENGINES = {"fused": FusedEngine, "forward_backward": ForwardBackwardEngine}


def make_engine(name, problem, memory=None):
    """Build the engine called ``name`` for ``problem`` (``memory``: see
    :class:`onnxfit.engines.buffers.EngineMemory`; default: the problem's
    device's)."""
    if name not in ENGINES:
        raise ValueError(f"Unknown engine {name!r}; choose one of {sorted(ENGINES)}.")
    return ENGINES[name](problem, memory)


__all__ = [
    "BaseEngine", "TrainingProblem", "FusedEngine", "ForwardBackwardEngine", "make_engine",
    "ENGINES",
]
