"""
A Conv net on the digits images
===============================

A PyTorch module with convolutions, BatchNorm and Dropout is exported to
ONNX once and trained by onnxfit on the 8×8 digits images, given as a 4-D
``X`` of shape ``(n, 1, 8, 8)``.  While fitting, BatchNorm normalises with
batch statistics and Dropout draws a fresh mask per step (as PyTorch's
``model.train()``); ``predict`` and the export use the running statistics
and no Dropout (``model.eval()``).

This example needs PyTorch (``pip install torch``); quick documentation
builds (``ONNXFIT_DOCS_QUICK=1``) skip it.
"""

import io
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from onnxfit import OnnxSGDClassifier

warnings.filterwarnings("ignore", category=ConvergenceWarning)

X, y = load_digits(return_X_y=True)
X = (X / 16).astype(np.float32).reshape(-1, 1, 8, 8)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)

# %%
# The module and its export
# -------------------------
# Exported in training mode so that Dropout stays in the graph; the batch
# axis is dynamic.

torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
    torch.nn.Flatten(), torch.nn.Dropout(0.25), torch.nn.Linear(64, 10),
)
buffer = io.BytesIO()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the exporter's notes on training mode
    torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), buffer, dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
                      training=torch.onnx.TrainingMode.TRAINING)
onx = buffer.getvalue()

# %%
# Training
# --------
# Nesterov momentum, batches of 32, the accuracy on held-out images after
# each epoch.

clf = OnnxSGDClassifier(onx, learning_rate="nesterov", eta0=0.01, penalty=None,
                        batch_size=32, max_iter=15, tol=None, random_state=0)
clf.fit(X_train, y_train, eval_set=[(X_test, y_test)])
print(f"{clf.n_iter_} epochs, test accuracy {clf.score(X_test, y_test):.3f}")
print("trained weights:", clf.weights_to_train_)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
epochs = np.arange(1, clf.n_iter_ + 1)
ax1.plot(epochs, clf.loss_curve_, label="training (Dropout on)")
ax1.plot(epochs, clf.validation_loss_curve_, label="held out (eval mode)")
ax1.set_xlabel("epoch")
ax1.set_ylabel("cross-entropy")
ax1.legend()
ax2.plot(epochs, clf.validation_scores_, color="C2")
ax2.set_xlabel("epoch")
ax2.set_ylabel("held-out accuracy")
plt.tight_layout()

# %%
# What it gets wrong
# ------------------

predicted = clf.predict(X_test)
wrong = np.flatnonzero(predicted != y_test)[:10]
fig, axes = plt.subplots(1, max(len(wrong), 1), figsize=(1.3 * max(len(wrong), 1), 1.8))
for ax, i in zip(np.atleast_1d(axes), wrong):
    ax.imshow(X_test[i, 0], cmap="gray_r")
    ax.set_title(f"{y_test[i]} → {predicted[i]}", fontsize=9)
    ax.axis("off")
plt.tight_layout()

# %%
# The first convolution's filters after training
# ----------------------------------------------
# ``weights_`` holds the trained weights by initializer name.

name = next(n for n in clf.weights_ if clf.weights_[n].ndim == 4)
filters = clf.weights_[name]
fig, axes = plt.subplots(1, filters.shape[0], figsize=(1.2 * filters.shape[0], 1.5))
for ax, f in zip(axes, filters[:, 0]):
    ax.imshow(f, cmap="RdBu_r")
    ax.axis("off")
fig.suptitle(f"{name}: {filters.shape}", fontsize=9)
plt.tight_layout()
