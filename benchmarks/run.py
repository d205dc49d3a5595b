"""Entry point of the benchmark suite: ``python -m benchmarks.run``.

Parts (all by default, or those named by ``--only``):

* ``epochs``  -- W1 ... W5: seconds per epoch of onnxfit (every engine in
  ``onnxfit.engines.ENGINES``) and of each peer, interleaved in one process,
  with the float32 GEMM ceiling measured in the same rounds, every row on
  one thread;
* ``backends`` -- onnxfit's two gradient backends (its own rules and
  onnxruntime-training 1.19.2) on each engine, interleaved, on the runtime
  of the training build: run in an environment that has it, or name its
  interpreter with ``--ort-training-python``;
* ``defaults`` -- each library at its own out-of-the-box thread settings
  (onnxfit's default ``n_threads``, PyTorch's default threads, the BLAS
  default of scikit-learn's MLPs), with onnxfit on 1 and 2 threads beside;
* ``memory``  -- peak memory of a one-epoch fit, each in a fresh subprocess
  (the MLPs W1-W3; ``backends`` too);
* ``quality`` -- time to quality on W1;
* ``sweep``   -- the fused engine as N and the batch size grow
  (``--sweep`` runs only this part).

``--quick`` runs every part on small data with one repetition in about a
minute, and works without torch, psutil or matplotlib (PyTorch rows, and
every W4/W5 row, whose graphs are PyTorch exports, are skipped with a
note).  Results go to ``--out`` (default ``benchmarks/results/``): ``results.json``, ``epochs.csv``,
``targets.csv``, ``memory.csv``, ``quality.csv``, ``sweep.csv`` and, with
matplotlib, ``benchmarks.png``.
"""

import argparse
import datetime
import os
import platform
import sys
import time

PARTS = ("epochs", "backends", "defaults", "memory", "quality", "sweep")


def _versions():
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count()}
    for dist in ("numpy", "scikit-learn", "onnx", "onnxruntime-training-cpu", "onnxruntime",
                 "onnxruntime-gpu", "skl2onnx", "torch", "threadpoolctl"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        from .timing import GemmProbe

        out["blas_threads"] = GemmProbe.default_threads()
    except Exception:  # pragma: no cover
        pass
    return out


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - not on every OS
        return None


def run_epochs(keys, n_samples, reps, warmup, two_threads, log):
    from .contestants import lineup
    from .timing import GEMM_SIZE, GemmProbe, run_round_robin
    from .workloads import make_workload

    out = []
    for key in keys:
        start = time.perf_counter()
        wl = make_workload(key, n_samples=n_samples)
        log(f"[epochs] {key}: {wl.title}, N={wl.n_samples}")
        contestants = lineup(wl, two_threads=False, fit_loop=True)
        probes = [GemmProbe(), GemmProbe(threads=1)]
        res = run_round_robin(contestants, probes, reps=reps, warmup=warmup, log=log)
        records = res["records"]
        if two_threads:
            log(f"[epochs] {key}: 2-thread rows (separate phase)")
            extra = [c for c in lineup(wl, two_threads=True) if c.threads != 1]
            res2 = run_round_robin(extra, [], reps=reps, warmup=warmup, log=log)
            for r in res2["records"]:
                r["note"] = (r["note"] + "; " if r["note"] else "") + "timed in a separate phase"
            records += res2["records"]
        # The ceiling is the machine's best GEMM speed: contention from other
        # processes only ever slows the probe (the 2-thread one needs both
        # cores idle), so the fastest round is the honest estimate.
        gemm = min(res["probes"]["gemm-default"])
        gemm_1t = min(res["probes"]["gemm-1t"])
        gflops = GemmProbe.flop() / gemm / 1e9
        gflops_1t = GemmProbe.flop() / gemm_1t / 1e9
        out.append(dict(
            workload=key, title=wl.title, n_samples=wl.n_samples, batch_size=wl.batch_size,
            n_params=wl.n_params, reps=reps, warmup=warmup, records=records,
            gemm_size=GEMM_SIZE, gemm_threads=GemmProbe.default_threads(),
            gemm_s=gemm, gemm_gflops=gflops, gemm_gflops_1t=gflops_1t,
            gemm_times=res["probes"]["gemm-default"], gemm_1t_times=res["probes"]["gemm-1t"],
            flop_basis="params" if hasattr(wl, "weights") else "MACs",
            ceiling_s=wl.epoch_flop() / (gflops * 1e9),
            ceiling_1t_s=wl.epoch_flop() / (gflops_1t * 1e9),
            seconds=time.perf_counter() - start,
        ))
    return out


def run_lineups(keys, n_samples, reps, warmup, make_lineup, log, tag):
    """Time ``make_lineup(workload)`` interleaved, workload by workload."""
    from .timing import run_round_robin
    from .workloads import make_workload

    out = []
    for key in keys:
        start = time.perf_counter()
        wl = make_workload(key, n_samples=n_samples)
        log(f"[{tag}] {key}: {wl.title}, N={wl.n_samples}")
        res = run_round_robin(make_lineup(wl), [], reps=reps, warmup=warmup, log=log)
        out.append(dict(
            workload=key, title=wl.title, n_samples=wl.n_samples, batch_size=wl.batch_size,
            n_params=wl.n_params, reps=reps, warmup=warmup, records=res["records"],
            seconds=time.perf_counter() - start,
        ))
    return out


def run_backends(keys, n_samples, reps, warmup, log, other_python=None):
    """The two gradient backends, interleaved on one runtime: here when the
    training build is installed, else in ``other_python`` (an interpreter
    of an environment that has it)."""
    import json
    import subprocess
    import tempfile

    import onnxruntime

    from onnxfit.sessions import has_training_build

    from .contestants import backend_lineup
    from .workloads import MLP_WORKLOADS

    keys = [k for k in keys if k in MLP_WORKLOADS]  # W4, W5 are PyTorch exports: not there
    if has_training_build():
        return dict(
            runtime=f"onnxruntime-training-cpu {onnxruntime.__version__}",
            python=platform.python_version(),
            workloads=run_lineups(keys, n_samples, reps, warmup, backend_lineup, log, "backends"),
        )
    if not other_python:
        return dict(workloads=[], note=(
            "n/a: the installed onnxruntime has no training build; run in an environment with "
            "onnxruntime-training-cpu 1.19.2 or pass --ort-training-python"))
    with tempfile.TemporaryDirectory() as tmp:
        command = [other_python, "-m", "benchmarks.run", "--only", "backends",
                   "--workloads", ",".join(keys), "--n-samples", str(n_samples),
                   "--reps", str(reps), "--warmup", str(warmup), "--out", tmp, "--no-plot"]
        log(f"[backends] in {other_python}")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(command, cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            return dict(workloads=[], note=f"n/a: {other_python} failed: {done.stderr[-500:]}")
        with open(os.path.join(tmp, "results.json")) as f:
            return json.load(f)["backends"]


def run_memory(keys, n_samples, quick, log):
    from .contestants import lineup
    from .memory import measure
    from .workloads import make_workload

    rows = []
    for key in keys:
        wl = make_workload(key, n_samples=n_samples)
        ids = []
        for c in lineup(wl, two_threads=False):
            reason = c.unavailable()
            if reason:
                rows.append(dict(workload=key, id=c.id, status="n/a", note=reason,
                                 data_bytes=wl.data_bytes, model_bytes=wl.model_bytes))
                continue
            if quick and not (c.id == "onnxfit-fused-1t" or key == "W1" and c.is_peer
                              and c.library == "scikit-learn"):
                continue  # --quick: a smoke test of the probe, kept short
            ids.append(c.id)
        log(f"[memory] {key}: {', '.join(ids)}")
        rows += measure(wl, ids, log=log)
    return rows


def main(argv=None):
    from .workloads import MLP_WORKLOADS, WORKLOADS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small data, 1 repetition: a smoke run under a minute")
    parser.add_argument("--out", default=None,
                        help="output folder (default benchmarks/results)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated parts among {','.join(PARTS)}")
    parser.add_argument("--sweep", action="store_true", help="run only the scaling sweep")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated among %(default)s (memory and backends: the "
                             "MLPs W1-W3 only)")
    parser.add_argument("--n-samples", type=int, default=None,
                        help="rows per workload (default 100000; --quick 4000; W4, W5: "
                             "the 1797 digits at most)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions (default 7; --quick 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--two-threads", action="store_true",
                        help="also time 2-thread rows (onnxfit n_threads=2, torch 2 threads, "
                             "BLAS 2 threads) in a separate phase")
    parser.add_argument("--ort-training-python", default=None,
                        help="interpreter of an environment with onnxruntime-training-cpu "
                             "1.19.2, for the 'backends' part when this one has plain "
                             "onnxruntime")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    if args.sweep:
        parts = ["sweep"]
    elif args.only:
        parts = [p.strip() for p in args.only.split(",") if p.strip()]
        unknown = set(parts) - set(PARTS)
        if unknown:
            parser.error(f"unknown parts {sorted(unknown)}; choose among {PARTS}")
    else:
        parts = list(PARTS)
    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    if set(keys) - set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(set(keys) - set(WORKLOADS))}; choose among "
                     f"{WORKLOADS}")
    n = args.n_samples or (4_000 if args.quick else 100_000)
    reps = args.reps or (1 if args.quick else 7)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

    def log(msg):
        print(msg, flush=True)

    from .contestants import onnxfit_engines, torch_available

    t0 = time.perf_counter()
    results = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        mode="quick" if args.quick else "full", parts=parts, n_samples=n, reps=reps,
        environment=_versions(), engines=onnxfit_engines(), torch=torch_available(),
    )
    if not results["torch"]:
        log("torch is not installed: PyTorch rows are skipped (pip install '.[bench]')")
    timings = {}
    load = results["load"] = {}

    def part(name, fn):
        load[name] = [_loadavg()]
        start = time.perf_counter()
        results[name] = fn()
        timings[name] = time.perf_counter() - start
        load[name].append(_loadavg())

    if "epochs" in parts:
        part("epochs", lambda: run_epochs(keys, n, reps, args.warmup, args.two_threads, log))
    if "backends" in parts:
        part("backends", lambda: run_backends(keys, n, reps, args.warmup, log,
                                              args.ort_training_python))
    if "defaults" in parts:
        from .contestants import defaults_lineup

        part("defaults", lambda: run_lineups(keys, n, reps, args.warmup, defaults_lineup, log,
                                             "defaults"))
    if "memory" in parts:
        # W4/W5: 0.5 MB of data, so the ratio would only measure the libraries' one-time cost.
        mem_keys = [k for k in keys if k in MLP_WORKLOADS and not (args.quick and k == "W3")]
        part("memory", lambda: run_memory(mem_keys, n, args.quick, log))
    if "quality" in parts:
        from . import quality
        from .workloads import regression_data

        log("[quality] W1 time to quality")
        part("quality", lambda: quality.run(*regression_data(n), reps=1 if args.quick else 7,
                                            log=log))
    if "sweep" in parts:
        from . import sweep

        log("[sweep] fused engine scaling")
        part("sweep", lambda: sweep.run(quick=args.quick, reps=1 if args.quick else 3,
                                        warmup=args.warmup, log=log))

    from . import report

    results["targets"] = report.evaluate_targets(results)
    timings["total"] = time.perf_counter() - t0
    results["seconds"] = timings

    env = results["environment"]
    text = [
        "",
        "=" * 100,
        f"onnxfit benchmarks ({results['mode']}), {results['date']}: python {env['python']}, "
        f"{env['cpu_count']} CPUs, {report.runtime_name(env)}, "
        f"scikit-learn {env.get('scikit-learn')}, "
        f"torch {env.get('torch', 'not installed')}, numpy {env.get('numpy')}; "
        f"onnxfit engines: {', '.join(results['engines'])}",
        "Same footing: every row runs on 1 thread (onnxfit n_threads=1, "
        "torch.set_num_threads(1), BLAS limited to 1 thread for scikit-learn's MLPs); "
        "SGDRegressor gets float64 X prepared outside the timer. W4/W5: batch 32, the same "
        "PyTorch module on both sides (onnxfit trains its export), train mode.",
        "",
    ]
    for w in results.get("epochs", []):
        text += [report.format_epochs(w), ""]
    if results.get("backends") is not None:
        text += [report.format_backends(results["backends"]), ""]
    if results.get("defaults"):
        text += [report.format_defaults(results["defaults"]), ""]
    if results.get("memory"):
        text += [report.format_memory(results["memory"]), ""]
    if results.get("quality"):
        text += [report.format_quality(results["quality"]), ""]
    if results.get("sweep"):
        text += [report.format_sweep(results["sweep"]), ""]
    text += [report.format_targets(results["targets"]), ""]
    text.append("Wall time of this run: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    loads = [x for pair in load.values() for x in pair if x is not None]
    if loads:
        text.append("Machine load (1-minute average) before -> after each part: " + ", ".join(
            f"{k} {v[0]:.1f} -> {v[1]:.1f}" for k, v in load.items() if None not in v))
        busy = max(loads) > 0.75 * (os.cpu_count() or 1)
        if busy:
            text.append("WARNING: other processes were competing for the CPUs during this run: "
                        "absolute times are inflated and noisier; the interleaved ratios suffer "
                        "less, but re-run on a quiet machine before trusting a close call.")
    print("\n".join(text), flush=True)
    report.write_files(results, out_dir, plot=not args.no_plot, log=log)
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write("\n".join(text) + "\n")
    log(f"Results written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
