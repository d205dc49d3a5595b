"""
Validation curves and early stopping
====================================

``fit(X, y, eval_set=[(X_val, y_val)])`` scores the model on held-out data
after every epoch: ``validation_loss_curve_`` holds the validation loss
(without the penalty) and ``validation_scores_`` the score early stopping
watches (R² or accuracy, or any scikit-learn scorer given as ``scoring=``).
With ``early_stopping=True`` training stops when that score has not
improved for ``n_iter_no_change`` epochs, and the weights of the best epoch
are kept.
"""

import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split, validation_curve

from onnxfit import OnnxSGDClassifier

warnings.filterwarnings("ignore", category=ConvergenceWarning)

X, y = load_digits(return_X_y=True)
X = (X / 16).astype(np.float32)
X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.3, random_state=0)

# %%
# Training and validation loss, epoch by epoch
# --------------------------------------------
# A linear model (the estimator's default graph) with a softmax
# cross-entropy, no penalty, a large constant step: the training loss keeps
# falling while the validation loss levels off.

clf = OnnxSGDClassifier(learning_rate="sgd", eta0=0.5, schedule="constant", penalty=None,
                        batch_size=16, max_iter=40, tol=None, random_state=0)
clf.fit(X_train, y_train, eval_set=[(X_val, y_val)])
epochs = np.arange(1, clf.n_iter_ + 1)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
ax1.plot(epochs, clf.loss_curve_, label="training objective")
ax1.plot(epochs, clf.validation_loss_curve_, label="validation loss")
ax1.set_xlabel("epoch")
ax1.set_ylabel("log loss")
ax1.legend()
ax2.plot(epochs, clf.validation_scores_, color="C2")
ax2.set_xlabel("epoch")
ax2.set_ylabel("validation accuracy")
plt.tight_layout()

# %%
# Early stopping on the validation loss
# -------------------------------------
# ``scoring='loss'`` stops on the validation loss; the estimator keeps the
# weights of the epoch with the lowest one.

stopped = OnnxSGDClassifier(learning_rate="sgd", eta0=0.5, schedule="constant",
                            penalty=None, batch_size=16, max_iter=200, tol=1e-4,
                            n_iter_no_change=5, early_stopping=True, scoring="loss",
                            random_state=0)
stopped.fit(X_train, y_train, eval_set=[(X_val, y_val)])
best = int(np.argmin(stopped.validation_loss_curve_)) + 1
print(f"stopped after {stopped.n_iter_} epochs, best epoch {best}, "
      f"validation accuracy {stopped.score(X_val, y_val):.3f}")

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(np.arange(1, stopped.n_iter_ + 1), stopped.validation_loss_curve_, marker=".")
ax.axvline(best, color="C3", ls="--", label=f"kept: epoch {best}")
ax.set_xlabel("epoch")
ax.set_ylabel("validation loss")
ax.legend()
plt.tight_layout()

# %%
# A validation curve over the penalty
# -----------------------------------
# The estimators are scikit-learn estimators, so scikit-learn's model
# selection tools work as they are: here ``validation_curve`` over the
# strength of the L2 penalty, 3-fold cross-validation.

alphas = np.logspace(-5, -1, 5)
train_scores, test_scores = validation_curve(
    OnnxSGDClassifier(learning_rate="sgd", eta0=0.1, batch_size=32, max_iter=10, tol=None,
                      random_state=0, n_threads=1),
    X, y, param_name="alpha", param_range=alphas, cv=3)
fig, ax = plt.subplots(figsize=(7, 4))
ax.semilogx(alphas, train_scores.mean(axis=1), marker="o", label="training")
ax.semilogx(alphas, test_scores.mean(axis=1), marker="o", label="cross-validation")
ax.set_xlabel("alpha (L2 penalty)")
ax.set_ylabel("accuracy")
ax.legend()
plt.tight_layout()
