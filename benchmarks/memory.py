"""Peak memory of a fit, each fit in a fresh subprocess.

The parent writes the workload's data to .npy files; a child process
(``python -m benchmarks.memory SPEC``) imports the libraries, loads the
data, and then measures:

* ``rss_extra_first``: the peak resident memory of the first one-epoch
  ``fit`` above the resident memory just before it (data loaded, libraries
  imported).  Linux's peak counter (VmHWM) is reset right before the fit by
  writing 5 to /proc/self/clear_refs; where that is impossible the
  process-lifetime peak (``resource.getrusage``) is used instead, which can
  only overstate the fit's peak.  This first fit pays every one-time cost
  (graph building, onnxruntime session creation, first-use allocations).
* ``rss_extra_second``: the same for a second fresh fit in the same process.
* ``traced_peak``: ``tracemalloc``'s peak for a third fit -- the Python-side
  allocations (numpy arrays included, onnxruntime's C++ allocations not).

The figure judged against the target is ``(data + rss_extra_first) /
(data + model)``: the memory a fit occupies, its input data included,
relative to the data and the model alone (the target: at most 2).
"""

import gc
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc

import numpy as np

_KIB = 1024


def _status(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * _KIB
    except OSError:
        return None
    return None


def _rss():
    value = _status("VmRSS")
    if value is not None:
        return value
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover
        return _maxrss()


def _maxrss():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * _KIB


def _reset_peak():
    """Reset the kernel's peak-RSS counter; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmHWM") is not None
    except OSError:
        return False


def _peak(resettable):
    return _status("VmHWM") if resettable else _maxrss()


def _measure_fit(contestant):
    gc.collect()
    base = _rss()
    resettable = _reset_peak()
    contestant.fit_once()
    peak = _peak(resettable)
    return max(0, peak - base), resettable


def child(spec):
    """Run in the subprocess: measure one contestant, print JSON."""
    from .contestants import contestant_by_id
    from .workloads import make_workload

    X = np.load(spec["X"])
    y = np.load(spec["y"])
    workload = make_workload(spec["workload"], data=(X, y))
    contestant = contestant_by_id(workload, spec["id"])
    # Import what the fit needs before the baseline: libraries are not the fit.
    import sklearn.linear_model  # noqa: F401
    import sklearn.neural_network  # noqa: F401

    if contestant.library == "onnxfit":
        import onnxruntime  # noqa: F401

        import onnxfit  # noqa: F401
    elif contestant.library == "pytorch":
        import torch  # noqa: F401
    reason = contestant.unavailable()
    if reason:
        print(json.dumps({"status": "n/a", "note": reason}))
        return
    first, exact = _measure_fit(contestant)
    second, _ = _measure_fit(contestant)
    gc.collect()
    tracemalloc.start()
    contestant.fit_once()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({
        "status": "ok", "rss_extra_first": first, "rss_extra_second": second,
        "traced_peak": traced, "peak_reset": exact,
    }))


def measure(workload, ids, log=print, timeout=300):
    """Measure each contestant id of ``workload`` in its own subprocess.

    Returns
    -------
    list of dict
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxfit-bench-") as tmp:
        paths = {"X": os.path.join(tmp, "X.npy"), "y": os.path.join(tmp, "y.npy")}
        np.save(paths["X"], workload.X)
        np.save(paths["y"], workload.y)
        for cid in ids:
            spec = dict(paths, workload=workload.key, id=cid)
            row = dict(workload=workload.key, id=cid, data_bytes=workload.data_bytes,
                       model_bytes=workload.model_bytes)
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
                    cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
                )
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    row.update(status="error", note=tail[:200])
                else:
                    row.update(json.loads(lines[-1]))
            except subprocess.TimeoutExpired:
                row.update(status="error", note=f"timed out after {timeout} s")
            if row.get("status") == "ok":
                total = workload.data_bytes + row["rss_extra_first"]
                row["peak_bytes"] = total
                row["ratio"] = total / (workload.data_bytes + workload.model_bytes)
            rows.append(row)
            log(f"  memory {workload.key} {cid}: {row.get('status')}"
                + (f" ratio {row['ratio']:.2f}" if "ratio" in row else f" {row.get('note', '')}"))
    return rows


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
