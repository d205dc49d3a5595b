"""
Part 2: the forward-backward design, an update rule and a loss of your own
==========================================================================

The fused design of :ref:`part 1 <sphx_glr_tutorial_plot_1_fused.py>` runs
a training step as one graph.  The **forward-backward** design cuts it
into pieces that can be taken apart:

* the model as a differentiable function, :class:`onnxfit.OnnxFunction`:
  ``forward(X, weights)`` gives the prediction, ``backward(dL/dY)`` the
  gradient of every weight.  The loss, the update and the loop can then be
  anything, written in numpy or inside another framework;
* inside the estimators (``engine='forward_backward'``): the model forward,
  the loss, the model backward, the penalty and the update rule run as five
  graphs, so a loss or an update rule of your own plugs in without
  rebuilding the model's gradient graph.

This part writes a training loop by hand, then an update rule and a loss,
and measures what the freedom costs.

.. contents::
   :local:
"""

import textwrap
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

from docs_helpers import benchmark_tables, draw_graph
from onnxfit import (BaseLearningRate, BaseLoss, LearningRateMomentum, OnnxFunction,
                     OnnxSGDRegressor)

warnings.filterwarnings("ignore", category=ConvergenceWarning)

X, y = load_diabetes(return_X_y=True)
X = StandardScaler().fit_transform(X).astype(np.float32)
y = ((y - y.mean()) / y.std()).astype(np.float32)
mlp = MLPRegressor(hidden_layer_sizes=(16,), max_iter=1, random_state=0).fit(X, y)
onx = to_onnx(mlp, X[:1], target_opset=17)

# %%
# The model as a differentiable function
# --------------------------------------
# ``OnnxFunction`` builds the gradient graph of the model once, cut in two
# onnxruntime sessions.  ``initial_weights()`` reads the weights stored in
# the graph; ``forward`` keeps what ``backward`` needs.

f = OnnxFunction(onx)
weights = f.initial_weights()
print({name: w.shape for name, w in weights.items()})

Y = f.forward(X[:4], weights)
grads = f.backward(np.ones_like(Y))  # dL/dY = 1: the gradient of sum(Y)
print("Y:", Y.ravel())
print({name: g.shape for name, g in grads.items()})

# %%
# A training loop written by hand: mini-batches, a squared error written in
# numpy, gradient descent with momentum.  onnxruntime runs the model and its
# gradient; everything else is Python.

rng = np.random.default_rng(0)
velocity = {name: np.zeros_like(w) for name, w in weights.items()}
hand_losses = []
start = time.perf_counter()
for epoch in range(20):
    order = rng.permutation(len(X))
    total = 0.0
    for batch in np.array_split(order, len(X) // 32):
        xb, yb = X[batch], y[batch].reshape(-1, 1)
        pred = f.forward(xb, weights)
        residual = pred - yb
        total += float((residual ** 2).sum()) / 2
        grads = f.backward(residual / len(batch))  # d(mean of residual²/2)/dY
        for name in weights:
            velocity[name] = 0.9 * velocity[name] - 0.01 * grads[name]
            weights[name] = weights[name] + velocity[name]
    hand_losses.append(total / len(X))
hand_seconds = (time.perf_counter() - start) / 20
print(f"loss after 20 epochs: {hand_losses[-1]:.4f} ({hand_seconds * 1e3:.1f} ms per epoch)")

# %%
# The same model in the estimator, forward-backward engine
# --------------------------------------------------------
# ``engine='forward_backward'`` runs the same ``OnnxFunction`` pieces, with
# the loss, the penalty and the update as ONNX graphs as well.

est = OnnxSGDRegressor(onx, engine="forward_backward", learning_rate="momentum", eta0=0.01,
                       penalty=None, batch_size=32, max_iter=20, tol=None, random_state=0)
est.fit(X, y)
print("graphs:", list(est.training_graphs()))
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, 21), hand_losses, label="hand-written loop (numpy)")
ax.plot(np.arange(1, 21), est.loss_curve_, label="OnnxSGDRegressor, forward_backward")
ax.set_xlabel("epoch")
ax.set_ylabel("mean squared error / 2")
ax.legend()
plt.tight_layout()

# %%
# An update rule of your own
# --------------------------
# An update rule is a :class:`~onnxfit.BaseLearningRate` subclass whose
# ``update_body`` returns ONNX nodes (in ``onnx.parser`` text) computing
# ``new_weight`` from ``weight``, ``gradient`` and the scalar
# ``learning_rate``; ``state_names`` lists per-weight state tensors, which
# start at zero and come back as ``new_<name>``.  ``{T}`` stands for the
# element type, ``{name}`` for the values returned by ``constants()``.
#
# Here: the sign of a moving average of the gradient, a "signed momentum".
# The rule is applied to all the weights at once, laid end to end.


class SignMomentum(BaseLearningRate):
    """``m <- beta m + (1 - beta) g``; ``w <- w - eta sign(m)``."""

    state_names = ("average",)

    def __init__(self, eta0=0.001, beta=0.9, schedule="constant"):
        super().__init__(eta0=eta0, schedule=schedule)
        self.beta = beta

    def constants(self):
        return {"beta": self.beta, "one_minus_beta": 1 - self.beta}

    def update_body(self):
        return """
    beta = Constant<value = {T} {{{beta}}}>()
    rest = Constant<value = {T} {{{one_minus_beta}}}>()
    kept = Mul(beta, average)
    added = Mul(rest, gradient)
    new_average = Add(kept, added)
    direction = Sign(new_average)
    step = Mul(learning_rate, direction)
    new_weight = Sub(weight, step)
"""


signed = OnnxSGDRegressor(onx, engine="forward_backward", learning_rate=SignMomentum(eta0=0.002),
                          penalty=None, batch_size=32, max_iter=20, tol=None, random_state=0)
signed.fit(X, y)
print(f"SignMomentum: loss {signed.loss_curve_[-1]:.4f}, R² {signed.score(X, y):.3f}")
state = signed.get_state()["update_state"]
print("its state after training:",
      {weight: {name: a.shape for name, a in per_weight.items()}
       for weight, per_weight in state.items()})

# %%
# Its update graph, as the engine runs it:

draw_graph(signed.training_graphs()["update"], title="update graph of SignMomentum")
plt.tight_layout()

# %%
# A loss of your own
# ------------------
# A loss is a :class:`~onnxfit.BaseLoss` subclass whose ``elementwise_body``
# computes ``elementwise`` from ``prediction`` and ``label``; the sum over
# outputs and the weighted mean over samples are added by onnxfit.  Without
# a ``derivative_body`` onnxfit differentiates the loss graph itself.
#
# Here: the Cauchy loss ``c²/2 log(1 + (d/c)²)``, which grows like
# ``log |d|`` for large errors and so barely listens to outliers.  We add
# outliers to the targets and compare it with the squared error.


class CauchyLoss(BaseLoss):
    """``c²/2 · log(1 + ((prediction - label) / c)²)``."""

    def __init__(self, c=1.0):
        self.c = c

    def constants(self):
        return {"c": self.c, "half_c2": self.c ** 2 / 2}

    def elementwise_body(self):
        return """
    d = Sub(prediction, label)
    c = Constant<value = {T} {{{c}}}>()
    scaled = Div(d, c)
    square = Mul(scaled, scaled)
    one = Constant<value = {T} {{1.0}}>()
    inside = Add(square, one)
    log = Log(inside)
    half_c2 = Constant<value = {T} {{{half_c2}}}>()
    elementwise = Mul(log, half_c2)
"""


y_noisy = y.copy()
outliers = np.random.default_rng(1).choice(len(y), 40, replace=False)
y_noisy[outliers] += 8
scores = {}
for loss in ["squared_error", CauchyLoss(c=1.0)]:
    model = OnnxSGDRegressor(onx, engine="forward_backward", loss=loss, learning_rate="adam",
                             eta0=0.003, batch_size=32, max_iter=30, tol=None,
                             random_state=0).fit(X, y_noisy)
    clean = np.setdiff1d(np.arange(len(y)), outliers)
    scores[str(loss)] = model.score(X[clean], y[clean])
    print(f"{str(loss):20s} R² on the clean samples: {scores[str(loss)]:.3f}")
cauchy = model

# %%
# The loss graph of the forward-backward engine computes the loss and its
# derivative with respect to the prediction (``prediction_gradient``), the
# value the model's backward pass starts from:

draw_graph(cauchy.training_graphs()["loss"], title="loss graph of CauchyLoss")
plt.tight_layout()

# %%
# What the freedom costs
# ----------------------
# Each design on the same model and data, one thread, seconds per epoch:
# the fused engine (one session per step), the forward-backward engine
# (five sessions per step) and the hand-written loop above (two sessions
# per step and numpy in between).  The model is tiny (10→16→1), so fixed
# costs per step dominate: this is the worst case for the split designs.


def seconds_per_epoch(engine, learning_rate, repeats=3):
    best = np.inf
    for _ in range(repeats):
        est = OnnxSGDRegressor(onx, engine=engine, learning_rate=learning_rate, penalty=None,
                               batch_size=32, max_iter=10, tol=None, random_state=0,
                               n_threads=1)
        start = time.perf_counter()
        est.fit(X, y)
        best = min(best, (time.perf_counter() - start) / est.n_iter_)
    return best


timings = {
    "fused": seconds_per_epoch("fused", LearningRateMomentum(eta0=0.01)),
    "forward_backward": seconds_per_epoch("forward_backward", LearningRateMomentum(eta0=0.01)),
    "fused, SignMomentum": seconds_per_epoch("fused", SignMomentum()),
    "forward_backward, SignMomentum": seconds_per_epoch("forward_backward", SignMomentum()),
    "hand-written loop": hand_seconds,
}
for name, seconds in timings.items():
    print(f"{name:32s} {seconds * 1e3:6.2f} ms per epoch "
          f"({seconds / timings['fused']:.2f}× fused)")

# %%
# On the benchmark suite's larger workloads (``python -m benchmarks.run``,
# recorded in :doc:`/performance`), the five sessions of the
# forward-backward design cost little: a few microseconds per session next
# to the matrix products.  An update rule or a loss of your own runs in
# either engine; the forward-backward one swaps it without rebuilding the
# model's gradient graph.

tables = benchmark_tables()
names = list(tables)
ratio = [tables[w]["forward_backward"] / tables[w]["onnxfit fused"] for w in names]
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.bar(range(len(names)), ratio, color="C9")
ax.axhline(1, color="black", lw=0.8)
ax.set_xticks(range(len(names)))
ax.set_xticklabels([textwrap.fill(n, 12) for n in names], fontsize=8)
ax.set_ylabel("forward_backward / fused")
ax.set_title("time per epoch, benchmark suite (1 thread)")
plt.tight_layout()
