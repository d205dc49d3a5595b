"""Helpers shared by the tutorial and gallery scripts (not part of onnxfit).

* :func:`draw_graph` draws an ONNX graph with matplotlib: a layered layout,
  one row per depth, no graphviz needed.
* :func:`benchmark_tables` reads the measured seconds per epoch from
  ``docs/performance.md`` (the output of ``python -m benchmarks.run``), so
  that the charts show the recorded figures without running benchmarks
  during the build.
"""

import re
from pathlib import Path

import matplotlib.pyplot as plt

DOCS = Path(__file__).resolve().parent

# Colours: data and labels, weights and state, operators, outputs.
_COLOURS = {"input": "#cfe2f3", "weight": "#fce5cd", "op": "#ffffff", "output": "#d9ead3"}


def _short(name):
    """Drop onnxfit's ``onnxfit.`` prefix from value names in drawings."""
    return name[len("onnxfit."):] if name.startswith("onnxfit.") else name


def draw_graph(model, ax=None, title=None, hide_constants=True):
    """Draw ``model`` (an onnx.ModelProto) top to bottom on ``ax``.

    Graph inputs are blue (data, labels, the learning rate) or orange
    (initializers and inputs whose name says weight or state), operators
    white, graph outputs green.  Constant nodes are left out (their values
    are attributes, not computations) unless ``hide_constants`` is False.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    nodes = [n for n in graph.node if not (hide_constants and n.op_type == "Constant")]

    # Boxes: graph inputs, operators, graph outputs; edges follow values.
    boxes, kind, producer = [], [], {}
    for inp in graph.input:
        if inp.name in initializers and inp.name not in _used(nodes):
            continue
        producer[inp.name] = len(boxes)
        boxes.append(_short(inp.name))
        weightish = inp.name in initializers or any(
            w in inp.name for w in ("weight", "coef", "intercept", "state", "velocity"))
        kind.append("weight" if weightish else "input")
    for init in graph.initializer:
        if init.name not in producer and init.name in _used(nodes):
            producer[init.name] = len(boxes)
            boxes.append(_short(init.name))
            kind.append("weight")
    edges = []
    for node in nodes:
        index = len(boxes)
        boxes.append(node.op_type)
        kind.append("op")
        for name in node.input:
            if name in producer:
                edges.append((producer[name], index))
        for name in node.output:
            producer[name] = index
    for out in graph.output:
        index = len(boxes)
        boxes.append(_short(out.name))
        kind.append("output")
        if out.name in producer:
            edges.append((producer[out.name], index))

    # Layers: longest path from the sources; outputs on the last layer.
    depth = [0] * len(boxes)
    for _ in range(len(boxes)):
        changed = False
        for a, b in edges:
            if depth[b] < depth[a] + 1:
                depth[b] = depth[a] + 1
                changed = True
        if not changed:
            break
    last = max(depth) if depth else 0
    for i, k in enumerate(kind):
        if k == "output":
            depth[i] = last
    # Sources (inputs, operators fed by constants only) sit right above their
    # first consumer.
    targets = {}
    for a, b in edges:
        targets.setdefault(a, []).append(b)
    has_parent = {b for _, b in edges}
    for i in range(len(boxes)):
        if i not in has_parent and i in targets:
            depth[i] = max(0, min(depth[b] for b in targets[i]) - 1)

    # Order within a layer by the mean position of the parents (one sweep).
    rows = {}
    for i in sorted(range(len(boxes)), key=lambda i: depth[i]):
        rows.setdefault(depth[i], []).append(i)
    x = {}
    for d in sorted(rows):
        members = rows[d]
        first = {i: j - (len(members) - 1) / 2 for j, i in enumerate(members)}

        def parent_x(i):
            xs = [x[a] for a, b in edges if b == i and a in x]
            return sum(xs) / len(xs) if xs else first[i]
        members.sort(key=parent_x)
        width = len(members)
        for j, i in enumerate(members):
            x[i] = j - (width - 1) / 2

    widest = max(len(r) for r in rows.values()) if rows else 1
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4, 1.9 * widest), max(3, 0.75 * (last + 1))))
    for a, b in edges:
        ax.annotate("", xy=(x[b], -depth[b]), xytext=(x[a], -depth[a]),
                    arrowprops=dict(arrowstyle="->", color="#777777", lw=0.8,
                                    shrinkA=8, shrinkB=8))
    for i, label in enumerate(boxes):
        ax.text(x[i], -depth[i], label, ha="center", va="center", fontsize=7,
                family="monospace", zorder=3,
                bbox=dict(boxstyle="round,pad=0.3", fc=_COLOURS[kind[i]], ec="#444444",
                          lw=0.8))
    ax.set_xlim(-widest / 2 - 0.6, widest / 2 + 0.6)
    ax.set_ylim(-last - 0.6, 0.6)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def _used(nodes):
    return {name for n in nodes for name in n.input}


def benchmark_tables(path=None):
    """The "same footing" tables of ``docs/performance.md``.

    Returns
    -------
    dict of str -> dict of str -> float
        workload (``'W1'``...) -> column (``'onnxfit fused'``,
        ``'forward_backward'``, ``'scikit-learn'``, ``'PyTorch'``) ->
        seconds per epoch (the first figure of the cell), every library on
        one thread.
    """
    text = Path(path or DOCS / "performance.md").read_text(encoding="utf-8")
    result, header = {}, None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "workload":
            header = cells if "onnxfit fused" in cells and "forward_backward" in cells else None
            continue
        if header is None or set(cells[0]) <= set("-: "):
            continue
        workload = cells[0]
        row = {}
        for name, cell in zip(header[1:], cells[1:]):
            number = re.search(r"\d+\.\d+", cell)
            column = "PyTorch" if name.startswith("PyTorch") else name
            if number and column in ("onnxfit fused", "forward_backward", "scikit-learn",
                                     "PyTorch"):
                row[column] = float(number.group())
        result[workload] = row
    return result
