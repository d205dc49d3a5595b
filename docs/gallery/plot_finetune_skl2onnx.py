"""
Fine-tuning a model converted with skl2onnx
===========================================

A scikit-learn ``MLPClassifier`` is trained, converted to ONNX with
skl2onnx, and the ONNX graph is trained further by onnxfit: on new data
(here: the other half of the digits), with only the last layer trained
(``weights_to_train=``) and the first one frozen.  The export keeps every
output skl2onnx wrote (the label and the probabilities).
"""

import warnings

import matplotlib.pyplot as plt
import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from onnxfit import OnnxSGDClassifier

warnings.filterwarnings("ignore", category=ConvergenceWarning)

X, y = load_digits(return_X_y=True)
X = (X / 16).astype(np.float32)
# The original model sees digits 0-9 from one half, the fine-tuning the
# other half; both are scored on a held-out test set.
X_old, X_rest, y_old, y_rest = train_test_split(X, y, test_size=0.6, random_state=0)
X_new, X_test, y_new, y_test = train_test_split(X_rest, y_rest, test_size=0.5,
                                                random_state=0)

mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=15, random_state=0).fit(X_old, y_old)
print("scikit-learn MLP, test accuracy:", round(mlp.score(X_test, y_test), 3))

onx = to_onnx(mlp, X[:1], target_opset={"": 17, "ai.onnx.ml": 3},
              options={"zipmap": False})
print("graph outputs:", [o.name for o in onx.graph.output])
print("float initializers:", [(i.name, tuple(i.dims)) for i in onx.graph.initializer
                              if i.data_type == onnx.TensorProto.FLOAT])

# %%
# Train only the output layer (``coefficient1`` and ``intercepts1`` in
# skl2onnx's names), one epoch at a time with ``partial_fit`` to record the
# test accuracy after each.

clf = OnnxSGDClassifier(onx, weights_to_train=["coefficient1", "intercepts1"],
                        learning_rate="adam", eta0=0.003, batch_size=16, random_state=0)
accuracies = [mlp.score(X_test, y_test)]
for epoch in range(20):
    clf.partial_fit(X_new, y_new, classes=np.arange(10))
    accuracies.append(clf.score(X_test, y_test))
print("after fine-tuning, test accuracy:", round(accuracies[-1], 3))

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(accuracies, marker=".")
ax.set_xlabel("epochs of fine-tuning (0: the scikit-learn model)")
ax.set_ylabel("test accuracy")
ax.set_title("MLPClassifier → skl2onnx → onnxfit, last layer trained")
plt.tight_layout()

# %%
# The first layer did not move; the exported graph runs in plain
# onnxruntime and gives the label and the probabilities, as skl2onnx's did.

trained = clf.to_onnx()
before = {i.name: onnx.numpy_helper.to_array(i) for i in onx.graph.initializer}
after = {i.name: onnx.numpy_helper.to_array(i) for i in trained.graph.initializer}
for name in ("coefficient", "coefficient1"):
    print(f"{name}: changed by {np.abs(after[name] - before[name]).max():.4f}")

session = ort.InferenceSession(trained.SerializeToString(),
                               providers=["CPUExecutionProvider"])
label, probabilities = session.run(None, {session.get_inputs()[0].name: X_test[:5]})
print("labels:", label, " predict:", clf.predict(X_test[:5]))
print("probabilities sum to", probabilities.sum(axis=1))
