"""
The benchmark chart
===================

Seconds per epoch of onnxfit's two designs next to scikit-learn and
PyTorch, every library on one thread, as measured by ``python -m
benchmarks.run`` and recorded in :doc:`/performance` (the chart reads that
page: nothing is re-run while the documentation builds).

The workloads: W1 a linear model 100→1, W2 an MLP 100→128→64→1, W3 an MLP
50→128→10 with a cross-entropy (scikit-learn's ``SGDRegressor``,
``MLPRegressor`` and ``MLPClassifier`` as the scikit-learn side), W4 a
small Conv net and W5 an LSTM, both PyTorch modules exported to ONNX and
trained on the digits.  Lower is faster.
"""

import textwrap

import matplotlib.pyplot as plt
import numpy as np

from docs_helpers import benchmark_tables

tables = benchmark_tables()
columns = ["onnxfit fused", "forward_backward", "scikit-learn", "PyTorch"]
colours = ["C0", "C9", "C1", "C3"]
for workload, row in tables.items():
    print(workload, row)

# %%
# Absolute times (log scale), then each library's time over onnxfit's
# fused engine on the same workload: the fused engine is the baseline at 1.

workloads = list(tables)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
width = 0.2
for k, (column, colour) in enumerate(zip(columns, colours)):
    xs, seconds, ratios = [], [], []
    for i, workload in enumerate(workloads):
        if column in tables[workload]:
            xs.append(i + (k - 1.5) * width)
            seconds.append(tables[workload][column])
            ratios.append(tables[workload][column] / tables[workload]["onnxfit fused"])
    ax1.bar(xs, seconds, width, label=column, color=colour)
    ax2.bar(xs, ratios, width, label=column, color=colour)
for ax in (ax1, ax2):
    ax.set_xticks(np.arange(len(workloads)))
    ax.set_xticklabels([textwrap.fill(w, 12) for w in workloads], fontsize=8)
ax1.set_yscale("log")
ax1.set_ylabel("seconds per epoch, 1 thread")
ax1.legend(fontsize=8)
ax2.axhline(1, color="black", lw=0.8)
ax2.set_ylabel("time / onnxfit fused")
ax2.set_title("how many times slower than the fused engine")
plt.tight_layout()

# %%
# The forward-backward design costs little on these workloads: it runs five
# sessions a step instead of one, a fixed cost of a few microseconds per
# session, small next to the matrix products of an MLP or a Conv net, and
# largest on the smallest model (W1).

for workload in workloads:
    row = tables[workload]
    print(f"{workload:24s} forward_backward / fused = "
          f"{row['forward_backward'] / row['onnxfit fused']:.2f}")
