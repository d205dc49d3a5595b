"""
Part 1: train, tune and export an ONNX model
============================================

An ONNX model is usually the end of a training pipeline: a scikit-learn or
PyTorch model is trained, converted, deployed.  onnxfit lets the ONNX graph
itself be trained, inside scikit-learn: ``OnnxSGDRegressor`` and
``OnnxSGDClassifier`` take a graph and behave as any scikit-learn
estimator.

By default they train with the **fused** design (``engine='fused'``):
onnxfit writes one ONNX graph that does a whole training step (the model's
forward pass, the loss, the gradients and the update) and onnxruntime runs
it once per mini-batch.  This part uses that default; :ref:`part 2
<sphx_glr_tutorial_plot_2_forward_backward.py>` opens the step up.

.. contents::
   :local:
"""

import os
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.compose import TransformedTargetRegressor
from sklearn.datasets import load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from onnxfit import OnnxSGDRegressor

warnings.filterwarnings("ignore", category=ConvergenceWarning)

# %%
# A model to train
# ----------------
# Any ONNX graph with float weights (initializers) can be trained.  The
# quickest way to get one is to convert a scikit-learn model with
# skl2onnx.  Here a small neural network is trained by scikit-learn for a
# few epochs on the diabetes data, then converted; onnxfit will continue
# its training.

X, y = load_diabetes(return_X_y=True)
X = X.astype(np.float32)
y = y.astype(np.float32)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)

scaler = StandardScaler().fit(X_train)
y_mean, y_std = y_train.mean(), y_train.std()
mlp = MLPRegressor(hidden_layer_sizes=(16,), max_iter=5, random_state=0)
mlp.fit(scaler.transform(X_train), (y_train - y_mean) / y_std)

onx = to_onnx(mlp, X_train[:1], target_opset=17)
print("inputs:", [i.name for i in onx.graph.input], " outputs:",
      [o.name for o in onx.graph.output])
print("float weights:", {i.name: tuple(i.dims) for i in onx.graph.initializer
                        if i.data_type == 1})

# %%
# Fit it in a pipeline
# --------------------
# The graph is handed to ``OnnxSGDRegressor`` like a hyperparameter.
# Stochastic gradient descent needs features and target near unit scale:
# a ``StandardScaler`` scales X and a ``TransformedTargetRegressor`` scales
# y, the same way as for scikit-learn's own ``SGDRegressor`` (the
# estimator raises a ``ConvergenceError`` saying so when training diverges
# on unscaled data).

model = make_pipeline(
    StandardScaler(),
    TransformedTargetRegressor(
        regressor=OnnxSGDRegressor(onx, learning_rate="adam", eta0=0.003, batch_size=16,
                                   max_iter=50, random_state=0),
        transformer=StandardScaler(),
    ),
)
model.fit(X_train, y_train)
onnx_step = model[-1].regressor_
print(f"{onnx_step.n_iter_} epochs, {onnx_step.t_} updates")
print(f"R² on the test set: scikit-learn's 5 epochs {mlp.score(scaler.transform(X_test), (y_test - y_mean) / y_std):.3f}, "
      f"after onnxfit {model.score(X_test, y_test):.3f}")

# %%
# The estimator records the mean training loss of each epoch, as
# scikit-learn's neural networks do.

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, onnx_step.n_iter_ + 1), onnx_step.loss_curve_)
ax.set_xlabel("epoch")
ax.set_ylabel("training loss (scaled y)")
ax.set_title("loss_curve_")
plt.tight_layout()

# %%
# Tune it with GridSearchCV
# -------------------------
# Everything is a hyperparameter: the update rule, its step size, the
# penalty, the loss, even the graph.  ``GridSearchCV`` clones the pipeline
# and fits each candidate; the gradient graph of the model is built once
# and shared between the clones.

search = GridSearchCV(
    model,
    {
        "transformedtargetregressor__regressor__eta0": [0.001, 0.003, 0.01],
        "transformedtargetregressor__regressor__alpha": [1e-3, 1e-1],
    },
    cv=3,
)
search.fit(X_train, y_train)
for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
    short = {k.rsplit("__", 1)[1]: v for k, v in params.items()}
    print(f"{short}  R² {score:.3f}")
print("best:", search.best_params_)
best = search.best_estimator_
print(f"best pipeline, test R²: {best.score(X_test, y_test):.3f}")

# %%
# Export it
# ---------
# ``to_onnx()`` returns the original graph with the trained weights: same
# inputs, same outputs, same operators, nothing of the training left in it.

trained = best[-1].regressor_.to_onnx()
path = os.path.join(tempfile.mkdtemp(), "diabetes_mlp.onnx")
with open(path, "wb") as f:
    f.write(trained.SerializeToString())
print(f"{path}: {os.path.getsize(path)} bytes, "
      f"{len(trained.graph.node)} nodes ({len(onx.graph.node)} before training)")

# %%
# Run the export
# --------------
# onnxruntime alone runs it.  The graph predicts the scaled target from the
# scaled features; the scalers around it stay in the pipeline (or can be
# converted too).

session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
x_scaled = best[0].transform(X_test).astype(np.float32)
(y_scaled,) = session.run(None, {session.get_inputs()[0].name: x_scaled})
y_onnx = best[-1].transformer_.inverse_transform(y_scaled.reshape(-1, 1)).ravel()
print("onnxruntime:", np.round(y_onnx[:5], 1))
print("pipeline:   ", np.round(best.predict(X_test[:5]), 1))
print("largest difference:", float(np.abs(y_onnx - best.predict(X_test)).max()))

# %%
# A PyTorch model
# ---------------
# A PyTorch module exported to ONNX trains the same way.  The export needs
# a dynamic batch axis (``dynamic_axes``); ``dynamo=False`` uses the
# TorchScript exporter.

# sphinx_gallery_start_ignore
try:
    import torch
except ImportError:  # the quick CI build has no PyTorch
    torch = None
if torch is not None:
    # sphinx_gallery_end_ignore
    import io

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 10),), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    torch_model = make_pipeline(
        StandardScaler(),
        TransformedTargetRegressor(
            regressor=OnnxSGDRegressor(buffer.getvalue(), learning_rate="adam", eta0=0.003,
                                       batch_size=16, max_iter=50, random_state=0),
            transformer=StandardScaler(),
        ),
    ).fit(X_train, y_train)
    print(f"PyTorch MLP trained by onnxfit, test R²: {torch_model.score(X_test, y_test):.3f}")
    print("trained weights:", torch_model[-1].regressor_.weights_to_train_)
# sphinx_gallery_start_ignore
else:
    print("PyTorch is not installed: this section did not run.")
# sphinx_gallery_end_ignore

# %%
# What ran
# --------
# ``training_graphs()`` returns the graphs training ran.  The fused design
# runs one: the model, the loss, its gradient and the update rule (here
# Adam, whose moments are inputs and outputs of the graph), in one
# onnxruntime session.  :ref:`sphx_glr_auto_examples_plot_training_graphs.py`
# draws such graphs.

graphs = best[-1].regressor_.training_graphs()
for name, graph in graphs.items():
    ops = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print(f"{name}: {len(graph.graph.node)} nodes, inputs "
          f"{[i.name for i in graph.graph.input]}")
    print("   ", dict(sorted(ops.items(), key=lambda kv: -kv[1])))
