"""Soak test: many fit/predict/pickle cycles in one process, looking for
leaks (issue 13).  A script, not a unit test:

    python -m benchmarks.soak                 # 500 cycles + 50 GridSearchCV(n_jobs=2)
    python -m benchmarks.soak --quick         # 50 + 5
    python -m benchmarks.soak --cycles 200 --grid-cycles 0 --json soak.json

A cycle fits two small estimators (an ``OnnxSGDRegressor`` on the default
linear model and an ``OnnxSGDClassifier`` on a hand-written MLP with
BatchNormalization and Dropout, the engine alternating between cycles),
predicts, pickles, unpickles and predicts again (the unpickled copy builds
its onnxruntime sessions anew), and checks that both predictions agree.
A grid cycle runs ``GridSearchCV(OnnxSGDRegressor(...), 4 candidates, cv=2,
n_jobs=2)`` (joblib's loky workers, reused between grid cycles).

Resources are read after a few warm-up cycles of each kind (one-time costs:
imports, onnxruntime's arenas, loky's worker processes) and again at the
end, each time after ``gc.collect()``:

* resident memory (psutil ``memory_info().rss``) of this process, and its
  peak; the summed resident memory of its child processes (joblib's
  workers, in the grid phase); the slope of a least-squares line through samples taken every
  ``--sample-every`` cycles;
* open file descriptors (psutil ``num_fds``);
* threads: ``threading.active_count()`` (Python) and psutil
  ``num_threads()`` (all, onnxruntime's pools included);
* temporary files: the process runs with a private temporary directory
  (``TMPDIR``, ``tempfile.tempdir``, ``JOBLIB_TEMP_FOLDER``) whose entries are
  counted, plus entries of the system temporary directory and /dev/shm
  whose names contain this process's id (joblib's memmapping folders,
  loky's semaphores); new entries of the system temporary directory named
  like "onnx" are listed, not judged (other processes share that folder).
  onnxruntime writes a 51-byte ``$TMPDIR/.ses`` when imported: present
  before the first reading, so never counted as growth.

The run exits with status 1 when a limit is exceeded: RSS growth (this
process's, or its workers' together) over ``--rss-limit-mb`` (50), or any more descriptors, threads or temporary
files at the end than after the warm-up.
"""

import argparse
import gc
import json
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

_MB = 1024 * 1024


def _private_tmpdir():
    """A fresh temporary directory for everything this process (and its
    joblib workers) writes, so that other processes' files don't count."""
    path = tempfile.mkdtemp(prefix="onnxfit-soak-")
    os.environ["TMPDIR"] = path
    os.environ["JOBLIB_TEMP_FOLDER"] = path
    tempfile.tempdir = path
    return path


def _bn_dropout_classifier_graph(n_in, n_classes, hidden=16, seed=0):
    """X -> MatMul -> BatchNormalization -> Relu -> Dropout(0.25) -> MatMul+Add
    (logits), built without torch."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (n_in, hidden)).astype(f), "W0"),
        numpy_helper.from_array(np.ones(hidden, f), "gamma"),
        numpy_helper.from_array(np.zeros(hidden, f), "beta"),
        numpy_helper.from_array(np.zeros(hidden, f), "mean"),
        numpy_helper.from_array(np.ones(hidden, f), "var"),
        numpy_helper.from_array(np.array(0.25, f), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
        numpy_helper.from_array(rng.normal(0, 0.5, (hidden, n_classes)).astype(f), "W1"),
        numpy_helper.from_array(np.zeros(n_classes, f), "B1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["Z0"]),
        helper.make_node("BatchNormalization", ["Z0", "gamma", "beta", "mean", "var"],
                         ["N0", "running_mean", "running_var"], epsilon=1e-5, momentum=0.9,
                         training_mode=1),
        helper.make_node("Relu", ["N0"], ["H0"]),
        helper.make_node("Dropout", ["H0", "ratio", "training"], ["D0"]),
        helper.make_node("MatMul", ["D0", "W1"], ["L0"]),
        helper.make_node("Add", ["L0", "B1"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "soak_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class Workload:
    """The data and the estimators of a cycle."""

    def __init__(self, n_samples=300, n_features=8):
        rng = np.random.default_rng(0)
        self.X = rng.normal(size=(n_samples, n_features)).astype(np.float32)
        score = self.X @ rng.normal(size=n_features)
        self.y_reg = (score + 0.1 * rng.normal(size=n_samples)).astype(np.float32)
        self.y_clf = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))
        self.graph = _bn_dropout_classifier_graph(n_features, 3)

    def cycle(self, index):
        """fit, predict, pickle, unpickle, predict: both estimators."""
        from onnxfit import OnnxSGDClassifier, OnnxSGDRegressor

        engine = ("fused", "forward_backward")[index % 2]
        estimators = [
            (OnnxSGDRegressor(max_iter=5, tol=None, batch_size=32, engine=engine,
                              random_state=index), self.y_reg),
            (OnnxSGDClassifier(self.graph, max_iter=5, tol=None, batch_size=32,
                               engine=engine, random_state=index), self.y_clf),
        ]
        for est, y in estimators:
            est.fit(self.X, y)
            before = est.predict(self.X)
            copy = pickle.loads(pickle.dumps(est))
            after = copy.predict(self.X)
            if not np.array_equal(before, after):
                raise AssertionError(f"{type(est).__name__}/{engine}: the unpickled copy "
                                     "predicts otherwise")
            if hasattr(copy, "predict_proba"):
                copy.predict_proba(self.X)

    def grid_cycle(self, index):
        from sklearn.model_selection import GridSearchCV

        from onnxfit import OnnxSGDRegressor

        grid = GridSearchCV(
            OnnxSGDRegressor(max_iter=5, tol=None, batch_size=32, random_state=index),
            {"alpha": [1e-4, 1e-2], "engine": ["fused", "forward_backward"]},
            cv=2, n_jobs=2,
        )
        grid.fit(self.X, self.y_reg)
        grid.predict(self.X)


def _entries(folder, match=None):
    try:
        names = os.listdir(folder)
    except OSError:
        return set()
    return {os.path.join(folder, n) for n in names if match is None or match(n)}


class Probe:
    """Reads the resources of this process."""

    def __init__(self, private_tmp):
        import psutil

        self.process = psutil.Process()
        self.private_tmp = private_tmp
        self.system_tmp = os.path.dirname(private_tmp)
        pid = str(os.getpid())
        self.ours = lambda name: pid in name

    def temp_entries(self):
        """What this process has in the temporary folders: everything in its
        private one, and what carries its id in the system's and /dev/shm."""
        found = set()
        for root, dirs, files in os.walk(self.private_tmp):
            found.update(os.path.join(root, n) for n in dirs + files)
        found |= {e for e in _entries(self.system_tmp, self.ours)
                  if not e.startswith(self.private_tmp)}
        found |= _entries("/dev/shm", self.ours)
        return found

    def onnx_named_entries(self):
        """Entries of the system temporary folder named like onnx: reported
        only (any process on the machine may make them)."""
        return sorted(_entries(self.system_tmp, lambda n: "onnx" in n.lower()
                               and not n.startswith("onnxfit-soak-")))

    def read(self):
        gc.collect()
        import psutil

        children = self.process.children(recursive=True)
        child_rss = 0
        for child in children:
            try:
                child_rss += child.memory_info().rss
            except psutil.NoSuchProcess:  # a worker that just exited
                continue
        return {
            "rss_mb": self.process.memory_info().rss / _MB,
            "fds": self.process.num_fds(),
            "threads_python": threading.active_count(),
            "threads_os": self.process.num_threads(),
            "temp_entries": sorted(self.temp_entries()),
            "onnx_named_system_temp": self.onnx_named_entries(),
            "children": len(children),
            "children_rss_mb": child_rss / _MB,
        }


def _slope_per_100(samples):
    """Least-squares MB per 100 cycles through (cycle, rss) samples."""
    if len(samples) < 3:
        return float("nan")
    x, y = np.array(samples, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 100)


def _phase(name, n, warmup, step, probe, sample_every, log):
    """Run ``step`` ``warmup`` times, read, run it ``n`` times, read."""
    for i in range(warmup):
        step(10_000 + i)  # warm-up: seeds of their own
    start = probe.read()
    samples, peak = [(0, start["rss_mb"])], start["rss_mb"]
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
        if (i + 1) % sample_every == 0 or i + 1 == n:
            rss = probe.process.memory_info().rss / _MB
            peak = max(peak, rss)
            samples.append((i + 1, rss))
            log(f"  {name} {i + 1}/{n}: rss {rss:.1f} MB, "
                f"{time.perf_counter() - t0:.0f} s")
    seconds = time.perf_counter() - t0
    end = probe.read()
    return {"name": name, "cycles": n, "seconds": seconds, "start": start, "end": end,
            "peak_rss_mb": max(peak, end["rss_mb"]), "samples": samples,
            "slope_mb_per_100": _slope_per_100(samples)}


def _judge(phase, limits):
    start, end = phase["start"], phase["end"]
    growth = end["rss_mb"] - start["rss_mb"]
    checks = [
        ("rss growth MB", f"{start['rss_mb']:.1f} -> {end['rss_mb']:.1f}", growth,
         growth < limits["rss_mb"], f"< {limits['rss_mb']:g}"),
        ("open fds", f"{start['fds']} -> {end['fds']}", end["fds"] - start["fds"],
         end["fds"] <= start["fds"], "<= 0"),
        ("threads (python)", f"{start['threads_python']} -> {end['threads_python']}",
         end["threads_python"] - start["threads_python"],
         end["threads_python"] <= start["threads_python"], "<= 0"),
        ("threads (os)", f"{start['threads_os']} -> {end['threads_os']}",
         end["threads_os"] - start["threads_os"],
         end["threads_os"] <= start["threads_os"], "<= 0"),
    ]
    if start["children"] or end["children"]:
        workers = end["children_rss_mb"] - start["children_rss_mb"]
        checks.append((
            "workers rss MB",
            f"{start['children_rss_mb']:.0f} ({start['children']}) -> "
            f"{end['children_rss_mb']:.0f} ({end['children']})",
            workers, workers < limits["rss_mb"], f"< {limits['rss_mb']:g}"))
    new_temp = sorted(set(end["temp_entries"]) - set(start["temp_entries"]))
    checks.append(("temp entries",
                   f"{len(start['temp_entries'])} -> {len(end['temp_entries'])}",
                   len(new_temp), not new_temp, "none new"))
    return checks, new_temp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=500,
                        help="fit/predict/pickle/unpickle cycles (default 500)")
    parser.add_argument("--grid-cycles", type=int, default=50,
                        help="GridSearchCV(n_jobs=2) cycles (default 50)")
    parser.add_argument("--quick", action="store_true", help="50 cycles and 5 grid cycles")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed cycles of each kind before the first reading")
    parser.add_argument("--sample-every", type=int, default=None,
                        help="cycles between RSS samples (default: cycles/10)")
    parser.add_argument("--rss-limit-mb", type=float, default=50.0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.cycles, args.grid_cycles = 50, 5

    private_tmp = _private_tmpdir()
    warnings.simplefilter("ignore")  # ConvergenceWarning and the like, every cycle
    import onnxruntime
    import sklearn

    import onnxfit

    def log(message):
        print(message, flush=True)

    try:
        probe = Probe(private_tmp)
        work = Workload()
        t0 = time.perf_counter()
        initial = probe.read()
        phases = []
        if args.cycles:
            phases.append(_phase(
                "cycles", args.cycles, args.warmup, work.cycle, probe,
                args.sample_every or max(1, args.cycles // 10), log))
        if args.grid_cycles:
            phases.append(_phase(
                "grid", args.grid_cycles, min(args.warmup, 2), work.grid_cycle, probe,
                args.sample_every or max(1, args.grid_cycles // 10), log))
        wall = time.perf_counter() - t0
        final = probe.read()

        limits = {"rss_mb": args.rss_limit_mb}
        failed = False
        print()
        print(f"onnxfit {onnxfit.__version__}, onnxruntime {onnxruntime.__version__}, "
              f"scikit-learn {sklearn.__version__}, python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
        header = f"{'phase':<8} {'measure':<18} {'after warm-up -> end':<24} " \
                 f"{'growth':>9} {'limit':>9}  ok"
        print(header)
        print("-" * len(header))
        report = {"args": vars(args), "wall_s": wall, "initial": initial, "final": final,
                  "phases": []}
        for phase in phases:
            checks, new_temp = _judge(phase, limits)
            for measure, values, growth, ok, limit in checks:
                failed |= not ok
                shown = f"{growth:+.1f}" if isinstance(growth, float) else f"{growth:+d}"
                print(f"{phase['name']:<8} {measure:<18} {values:<24} {shown:>9} "
                      f"{limit:>9}  {'yes' if ok else 'NO'}")
            print(f"{phase['name']:<8} {phase['cycles']} cycles in {phase['seconds']:.0f} s "
                  f"({phase['seconds'] / phase['cycles']:.2f} s each); peak rss "
                  f"{phase['peak_rss_mb']:.1f} MB; trend {phase['slope_mb_per_100']:+.2f} "
                  f"MB/100 cycles; child processes {phase['end']['children']} "
                  f"({phase['end']['children_rss_mb']:.0f} MB)")
            for entry in new_temp:
                print(f"         left behind: {entry}")
            foreign = sorted(set(phase["end"]["onnx_named_system_temp"])
                             - set(phase["start"]["onnx_named_system_temp"]))
            for entry in foreign:
                print(f"         new in the system temp folder (not judged: any process "
                      f"may have made it): {entry}")
            report["phases"].append({**phase, "checks": [
                {"measure": m, "values": v, "growth": g, "ok": bool(o), "limit": lim}
                for m, v, g, o, lim in checks], "new_temp_entries": new_temp})
        print(f"whole run: rss {initial['rss_mb']:.1f} -> {final['rss_mb']:.1f} MB "
              f"(imports and warm-up included), wall {wall:.0f} s")
        print("PASS" if not failed else "FAIL: a limit was exceeded")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
