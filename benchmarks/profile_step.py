"""Where the time of an epoch goes: ``python -m benchmarks.profile_step W1``.

Breaks one ``partial_fit`` epoch of the fused engine (batch 256, 1 thread)
into its parts, each timed alone in a tight loop (median of 5 loops):

* ``run``     -- ``session.run_with_iobinding`` of the training graph (forward,
  loss, gradients and update: the onnxruntime part);
* ``gather``  -- ``np.take`` of a shuffled batch into the bound buffers;
* ``masks``   -- drawing the Dropout masks of a step (W4; 0 without Dropout);
* ``prepare`` -- what ``partial_fit`` does before the epoch on every call:
  validating X, y (scikit-learn's checks) and encoding the labels;
* ``permute`` -- the epoch's permutation;
* ``rest``    -- what remains (the Python loop, per-epoch label/weight
  preparation).

``--ort-profile`` adds onnxruntime's own profiler (``enable_profiling``):
kernel time per operator type, from a session on the same training graph.
Profiling inflates every kernel, so read its shares, not its microseconds.

This tool reads the fused engine's internals (``_runtime.engine``, its batch
buffers and bindings); it is a developer's aid, not part of the suite's
results, and may need adjusting when the engine changes.
"""

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np


def _loop_us(fn, reps, loops=5):
    out = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - start) / reps)
    return 1e6 * statistics.median(out)


def breakdown(key, n_samples=100_000):
    """Time the parts of one ``partial_fit`` epoch of workload ``key``."""
    from .contestants import OnnxfitContestant
    from .workloads import make_workload

    wl = make_workload(key, n_samples=n_samples)
    c = OnnxfitContestant(wl, "fused")
    c.setup()
    c.epoch()
    est = c.est
    engine = est._runtime.engine
    X, n, b = wl.X, wl.n_samples, wl.batch_size
    steps = -(-n // b)
    buffers = engine._batch_buffers(b)
    name = engine.problem.input_names[0]  # "X" (W1-W3) or the export's "input" (W4, W5)
    inputs = {name: np.ascontiguousarray(X, dtype=buffers.inputs[name].dtype)}
    binding = buffers.bound.bindings[0]
    if wl.task == "classification":
        labels = buffers.label.copy()
        labels = np.resize(labels, (n,) + labels.shape[1:])
    else:
        labels = np.asarray(wl.y, dtype=buffers.label.dtype).reshape((n,) + buffers.label.shape[1:])
    weights = np.ones(n, dtype=buffers.sample_weight.dtype)
    order = np.random.default_rng(0).permutation(n)
    k = [0]

    def gather():
        s = (k[0] % (n // b)) * b
        k[0] += 1
        buffers.gather(inputs, labels, weights, order[s:s + b])

    rng = np.random.RandomState(0)
    parts = {
        "run": _loop_us(lambda: engine._run(binding), 1000) * steps,
        "gather": _loop_us(gather, 1000) * steps,
        "masks": (_loop_us(lambda: buffers.draw_masks(rng), 1000) * steps
                  if engine.problem.masks else 0.0),
        "prepare": _loop_us(lambda: est._prepare_training(
            X, wl.y, None, reset=False, keep_weights=False, first_call=False,
            classes=getattr(wl, "classes", None)), 20),
        "permute": _loop_us(lambda: np.random.RandomState(0).permutation(n), 20),
    }
    epoch = _loop_us(c.epoch, 3)
    parts["rest"] = epoch - sum(parts.values())
    return dict(workload=key, epoch_us=epoch, steps=steps,
                nodes=len(engine.training_model.graph.node),
                parts=parts, training_model=engine.training_model, workload_obj=wl,
                engine=engine)


def ort_profile(info, runs=2000):
    import onnxruntime

    from onnxfit.sessions import session_options

    wl, engine = info["workload_obj"], info["engine"]
    opts = session_options(1)
    opts.enable_profiling = True
    tmp = tempfile.mkdtemp(prefix="onnxfit-ortprof-")
    opts.profile_file_prefix = os.path.join(tmp, "prof")
    sess = onnxruntime.InferenceSession(info["training_model"].SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
    buffers = engine._batch_buffers(wl.batch_size)
    values = dict(buffers.inputs)
    values.update(buffers.masks or {})
    if hasattr(engine, "_sets"):  # weights as views, the flat vectors, running statistics
        values.update(engine._sets[0].views)
        values.update(engine._sets[0].flat)
        values.update(getattr(engine._sets[0], "statistics", {}) or {})
    feeds = {}
    for value in sess.get_inputs():
        name = value.name
        if name in values:
            feeds[name] = values[name]
        elif name.endswith("label"):
            feeds[name] = buffers.label
        elif name.endswith("sample_weight"):
            feeds[name] = buffers.sample_weight
        elif name.endswith("learning_rate"):
            feeds[name] = np.array(1e-3, dtype=engine.problem.dtype)
        else:
            raise KeyError(f"no value for input {name!r}")
    outputs = [o.name for o in sess.get_outputs()]
    for _ in range(runs):
        sess.run(outputs, feeds)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    by_op, per_run = collections.defaultdict(float), []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name", "?")] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            per_run.append(e["dur"])
    os.remove(path)
    os.rmdir(tmp)  # the folder mkdtemp made, now empty
    total = sum(by_op.values())
    return dict(model_run_us=statistics.median(per_run) if per_run else None,
                kernel_us=total / max(1, len(per_run)),
                by_op={op: d / total for op, d in sorted(by_op.items(), key=lambda x: -x[1])})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", default=["W1", "W2"])
    parser.add_argument("--ort-profile", action="store_true")
    args = parser.parse_args(argv)
    for key in args.workloads:
        info = breakdown(key)
        ep, steps = info["epoch_us"], info["steps"]
        print(f"{key}: one partial_fit epoch {ep / 1e3:.2f} ms = {ep / steps:.1f} us per step "
              f"({steps} steps; training graph of {info['nodes']} nodes)")
        for name, us in info["parts"].items():
            print(f"  {name:9s} {us / 1e3:7.2f} ms/epoch  {us / steps:6.1f} us/step  "
                  f"{100 * us / ep:5.1f}%")
        if args.ort_profile:
            prof = ort_profile(info)
            print(f"  onnxruntime profiler: model_run {prof['model_run_us']:.1f} us, kernels "
                  f"{prof['kernel_us']:.1f} us per run (profiling on: inflated); kernel share:")
            print("    " + ", ".join(f"{op} {100 * s:.0f}%" for op, s in prof["by_op"].items()
                                     if s >= 0.01))


if __name__ == "__main__":
    main()
