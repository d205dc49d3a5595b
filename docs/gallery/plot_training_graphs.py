"""
The graphs each training design runs
====================================

onnxfit trains by running ONNX graphs.  ``est.training_graphs()`` returns
them after ``fit``; this page draws the real graphs of a small linear
regression, built while the documentation was built.

* ``engine='fused'`` runs **one graph per step**: the model's forward pass,
  the loss, the gradients of both, the penalty and the update rule, all
  inside one onnxruntime session.
* ``engine='forward_backward'`` runs **five smaller graphs** per step: the
  model forward, the loss (with its derivative), the model backward (the
  gradient graph onnxfit wrote from the model), the penalty, and the
  update.  Any of the last four can be swapped without rebuilding the
  model's gradient graph.

Blue boxes are data (X, the label, the learning rate), orange ones weights,
white ones operators and green ones the outputs.  Constant nodes are left
out.
"""

import numpy as np
import matplotlib.pyplot as plt
from sklearn.datasets import load_diabetes
from sklearn.preprocessing import StandardScaler

from onnxfit import OnnxSGDRegressor
from docs_helpers import draw_graph

X, y = load_diabetes(return_X_y=True)
X = StandardScaler().fit_transform(X).astype(np.float32)
y = ((y - y.mean()) / y.std()).astype(np.float32)

fused = OnnxSGDRegressor(engine="fused", max_iter=3, tol=None, random_state=0).fit(X, y)
split = OnnxSGDRegressor(engine="forward_backward", max_iter=3, tol=None,
                         random_state=0).fit(X, y)

# %%
# The fused step
# --------------
# One graph: ``X`` and the weights go in, the loss and the new weights
# (laid end to end in one vector, ``weights.new``) come out.  The model's
# ``MatMul`` and ``Add`` are at the top, the gradient (``Gemm``,
# ``ReduceSum``) in the middle, the update (``Mul``, ``Sub``) at the bottom.

graphs = fused.training_graphs()
print({name: len(g.graph.node) for name, g in graphs.items()})
draw_graph(graphs["training_step"], title="engine='fused': training_step")
plt.tight_layout()

# %%
# The forward-backward design
# ---------------------------
# The same step, cut where a user of :class:`onnxfit.OnnxFunction` would
# cut it: the model's forward pass, the loss and its derivative with
# respect to the prediction, the model's backward pass (the gradient of the
# weights given that derivative), the penalty added to the loss and to the
# gradient, and the update rule.

graphs = split.training_graphs()
print({name: len(g.graph.node) for name, g in graphs.items()})
order = ["model_forward", "loss", "model_backward", "penalty", "update"]
fig, axes = plt.subplots(1, len(order), figsize=(17, 6),
                         gridspec_kw={"width_ratios": [1, 1.2, 1.2, 1.5, 1]})
for ax, name in zip(axes, order):
    draw_graph(graphs[name], ax=ax, title=name)
fig.suptitle("engine='forward_backward': five graphs per step")
plt.tight_layout()

# %%
# The update rule is its own graph
# --------------------------------
# An update rule is a few ONNX nodes applied to every weight at once.  With
# Adam the update graph carries the rule's state (the moments and the step
# count) in and out; the other four graphs do not change.

adam = OnnxSGDRegressor(engine="forward_backward", learning_rate="adam", max_iter=2,
                        tol=None, random_state=0).fit(X, y)
draw_graph(adam.training_graphs()["update"], title="update graph of learning_rate='adam'")
plt.tight_layout()
