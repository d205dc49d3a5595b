"""
Loss curves of the update rules
===============================

Every onnxfit estimator records the mean training objective (loss plus
penalty) of each epoch in ``loss_curve_``, as scikit-learn's
``MLPRegressor`` does.  Here a small multi-layer perceptron, trained by
scikit-learn for one epoch and converted with skl2onnx, is trained further
by onnxfit with each update rule, from the same starting weights.
"""

import warnings

import matplotlib.pyplot as plt
import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

from onnxfit import OnnxSGDRegressor

warnings.filterwarnings("ignore", category=ConvergenceWarning)

X, y = load_diabetes(return_X_y=True)
X = StandardScaler().fit_transform(X).astype(np.float32)
y = ((y - y.mean()) / y.std()).astype(np.float32)

# Starting weights: one epoch of scikit-learn, then ONNX.
mlp = MLPRegressor(hidden_layer_sizes=(32,), max_iter=1, random_state=0).fit(X, y)
onx = to_onnx(mlp, X[:1], target_opset=17)

# %%
# Each rule with its usual step size, 30 epochs of batches of 32.

rules = {"sgd": 0.05, "nesterov": 0.01, "momentum": 0.01, "adam": 0.003,
         "rmsprop": 0.001, "adagrad": 0.05}
curves = {}
for name, eta0 in rules.items():
    est = OnnxSGDRegressor(onx, learning_rate=name, eta0=eta0, batch_size=32,
                           max_iter=30, tol=None, random_state=0)
    est.fit(X, y)
    curves[name] = est.loss_curve_
    print(f"{name:9s} eta0={eta0:<6g} final loss {est.loss_curve_[-1]:.4f}  "
          f"R² {est.score(X, y):.3f}")

fig, ax = plt.subplots(figsize=(7, 4))
for name, curve in curves.items():
    ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
ax.set_xlabel("epoch")
ax.set_ylabel("training objective (loss + penalty)")
ax.set_yscale("log")
ax.set_title("MLP 10→32→1 on diabetes, continued by onnxfit")
ax.legend()
plt.tight_layout()

# %%
# A schedule changes the rate from update to update: a cosine decay with a
# warm-up of 50 updates, against the constant rate of the same rule.

from onnxfit.schedules import CosineSchedule  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4))
for label, schedule in [("constant", "constant"),
                        ("cosine, 50 warm-up updates", CosineSchedule(warmup_steps=50))]:
    est = OnnxSGDRegressor(onx, learning_rate="nesterov", eta0=0.02, schedule=schedule,
                           batch_size=32, max_iter=30, tol=None, random_state=0).fit(X, y)
    ax.plot(np.arange(1, est.n_iter_ + 1), est.loss_curve_, label=label)
ax.set_xlabel("epoch")
ax.set_ylabel("training objective")
ax.set_yscale("log")
ax.legend()
plt.tight_layout()
