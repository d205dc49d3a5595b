"""Tables, targets, CSV/JSON files and the chart of a benchmark run."""

import csv
import json
import os

#: The targets: (description, numerator, denominator, limit).
#: Numerators/denominators are ``(workload, contestant id)`` or special keys.
TARGETS = [
    ("W1 fused / SGDRegressor", ("W1", "onnxfit-fused-1t"), ("W1", "sklearn-SGDRegressor"), 0.3),
    ("W1 fused / PyTorch", ("W1", "onnxfit-fused-1t"), ("W1", "torch-1t"), 0.2),
    ("W2 fused / PyTorch", ("W2", "onnxfit-fused-1t"), ("W2", "torch-1t"), 0.35),
    ("W2 fused / MLPRegressor", ("W2", "onnxfit-fused-1t"), ("W2", "sklearn-MLPRegressor-1t"),
     0.3),
    ("W2 fused / GEMM ceiling", ("W2", "onnxfit-fused-1t"), ("W2", "ceiling"), 1.5),
    ("W3 fused / PyTorch", ("W3", "onnxfit-fused-1t"), ("W3", "torch-1t"), 0.3),
    ("W4 fused / PyTorch", ("W4", "onnxfit-fused-1t"), ("W4", "torch-1t"), 0.7),
    ("W5 fused / PyTorch", ("W5", "onnxfit-fused-1t"), ("W5", "torch-1t"), 1.0),
    ("W2 forward_backward / fused", ("W2", "onnxfit-forward_backward-1t"),
     ("W2", "onnxfit-fused-1t"), 1.3),
]


def runtime_name(env):
    """The onnxruntime build a run used, in words."""
    if env.get("onnxruntime-training-cpu"):
        return f"onnxruntime-training-cpu {env['onnxruntime-training-cpu']}"
    if env.get("onnxruntime-gpu"):
        return f"onnxruntime-gpu {env['onnxruntime-gpu']}"
    return f"onnxruntime {env.get('onnxruntime', '?')}"


def _fmt(x, spec=".4f", missing="-"):
    return missing if x is None else format(x, spec)


def _sec(x, width=8):
    """Seconds with 4 decimals, or in scientific notation when tiny."""
    if x is None:
        return "-".rjust(width)
    return f"{x:{width}.4f}" if x >= 1e-3 else f"{x:{width}.1e}"


def _mb(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def epoch_lookup(epochs, best=False):
    """(workload, id) -> s/epoch (median, or fastest rep with ``best``),
    including each workload's ceiling."""
    out = {}
    for w in epochs:
        for r in w["records"]:
            if r["s_per_epoch"] is not None:
                out[(w["workload"], r["id"])] = min(r["times"]) if best else r["s_per_epoch"]
        if w.get("ceiling_s") is not None:
            out[(w["workload"], "ceiling")] = w["ceiling_s"]
    return out


def evaluate_targets(results):
    rows = []
    lookup = epoch_lookup(results.get("epochs", []))
    fastest = epoch_lookup(results.get("epochs", []), best=True)
    for name, num, den, limit in (TARGETS if results.get("epochs") else []):
        a, b = lookup.get(num), lookup.get(den)
        value = a / b if a is not None and b else None
        a, b = fastest.get(num), fastest.get(den)
        value_best = a / b if a is not None and b else None
        rows.append(dict(target=name, value=value, value_best=value_best, limit=limit,
                         status="n/a" if value is None else ("PASS" if value <= limit else "FAIL")))
    backends = results.get("backends") or {}
    by_backend = epoch_lookup(backends.get("workloads", []))
    for w in backends.get("workloads", []):
        for engine in ("fused", "forward_backward"):
            own = by_backend.get((w["workload"], f"onnxfit-{engine}-1t"))
            ort = by_backend.get((w["workload"], f"onnxfit-{engine}-1t-ort"))
            value = own / ort if own and ort else None
            name = f"{w['workload']} {engine}: onnxfit backend / onnxruntime-training backend"
            judged = engine == "fused"
            rows.append(dict(target=name if judged else "(info) " + name, value=value, limit=1.0,
                             status="n/a" if value is None else (
                                 ("PASS" if value <= 1.0 else "FAIL") if judged else "info")))
    defaults = epoch_lookup(results.get("defaults", []))
    for w in results.get("defaults", []):
        key = w["workload"]
        ours = defaults.get((key, "onnxfit-fused-default"))
        theirs = defaults.get((key, "torch-default"))
        if ours and theirs:
            rows.append(dict(target=f"(info) {key} out of the box: onnxfit fused / PyTorch",
                             value=ours / theirs, limit=None, status="info"))
    for w in results.get("epochs", []):
        fused = lookup.get((w["workload"], "onnxfit-fused-1t"))
        if w["workload"] == "W2" and fused and w.get("ceiling_1t_s"):
            value = fused / w["ceiling_1t_s"]
            rows.append(dict(target="(info) W2 fused / 1-thread GEMM ceiling", value=value,
                             limit=1.5, status="info"))
    q = results.get("quality")
    if q:
        by = {r["name"]: r for r in q["rows"]}
        sgd = by.get("SGDRegressor()")
        for label, key in (("default", "OnnxSGDRegressor()"), ("tuned", q["tuned"])):
            r = by.get(key)
            ok = r is not None and sgd is not None and r["reached"] and sgd["reached"]
            value = r["time_s"] / sgd["time_s"] if ok else None
            rows.append(dict(target=f"W1 time to quality, onnxfit {label} [{key}] / SGDRegressor()",
                             value=value, limit=1.0,
                             status="n/a" if value is None
                             else ("PASS" if value <= 1.0 else "FAIL")))
    for m in results.get("memory", []):
        if m["id"].startswith("onnxfit-"):
            value = m.get("ratio")
            rows.append(dict(target=f"{m['workload']} peak memory of a fit, {m['id']}",
                             value=value, limit=2.0,
                             status="n/a" if value is None
                             else ("PASS" if value <= 2.0 else "FAIL")))
    return rows


def format_epochs(w):
    """The per-epoch table of one workload as text."""
    recs = w["records"]
    peers = [r for r in recs if r["is_peer"] and r["s_per_epoch"] is not None]
    head = (f"{w['workload']}: {w['title']} -- N={w['n_samples']}, batch {w['batch_size']}, "
            f"{w['n_params'] if w['n_params'] is not None else '?'} params, median of {w['reps']} "
            f"interleaved reps "
            f"(+{w['warmup']} warm-up)")
    short = {"sklearn-SGDRegressor": "SGDReg", "torch-1t": "torch1", "torch-2t": "torch2",
             "sklearn-MLPRegressor-1t": "MLPReg1", "sklearn-MLPRegressor-2t": "MLPReg2",
             "sklearn-MLPClassifier-1t": "MLPClf1", "sklearn-MLPClassifier-2t": "MLPClf2"}
    cols = [(short.get(p["id"], p["id"]), p["s_per_epoch"]) for p in peers]
    if w.get("ceiling_s"):
        cols.append(("ceiling", w["ceiling_s"]))
    lines = [head]
    hdr = f"  {'contestant':34s} {'s/epoch':>8s} {'min':>8s} {'max':>8s} {'build s':>8s} {'score':>7s}"
    hdr += "".join(f" {'x' + c:>9s}" for c, _ in cols)
    lines.append(hdr)
    for r in recs:
        if r["s_per_epoch"] is None:
            lines.append(f"  {r['label']:34s} {r['status']}: {r['note']}")
            continue
        line = (f"  {r['label']:34s} {r['s_per_epoch']:8.4f} {min(r['times']):8.4f} "
                f"{max(r['times']):8.4f} {_fmt(r['build_s'], '8.3f', '       -')} "
                f"{_fmt(r['score'], '7.4f', '      -')}")
        for _, den in cols:
            line += f" {r['s_per_epoch'] / den:9.2f}"
        if r.get("note"):
            line += f"  ({r['note']})"
        lines.append(line)
    if w.get("ceiling_s"):
        lines.append(
            f"  {'ceiling: 6*N*' + w.get('flop_basis', 'params') + ' at GEMM speed':34s} "
            f"{_sec(w['ceiling_s'])}   "
            f"(fastest of {len(w.get('gemm_times', [])) or '?'} numpy float32 "
            f"{w['gemm_size']}^2 matmuls, {w['gemm_threads']} BLAS threads: "
            f"{w['gemm_gflops']:.0f} GFLOP/s; 1 thread: {w['gemm_gflops_1t']:.0f} GFLOP/s "
            f"-> {_sec(w['ceiling_1t_s'], 0)} s)")
    threads = w.get("gemm_threads") or 1
    if w.get("ceiling_s") and threads > 1 and w["gemm_gflops"] < 1.3 * w["gemm_gflops_1t"]:
        lines.append(f"  WARNING: the {threads}-thread GEMM never ran much faster than the 1-thread "
                     "one: its threads did not get idle cores (other processes?), so this "
                     "ceiling is too slow and ratios to it are flattering.")
    lines.append("  score: R2 (regression) or accuracy (classification) on the training data "
                 "after all timed epochs; xPEER: s/epoch divided by that peer's")
    return "\n".join(lines)


def format_backends(backends):
    """The gradient backends table: each engine with both backends."""
    lines = ["Gradient backends, interleaved on one runtime"
             + (f" ({backends['runtime']}, Python {backends.get('python')})"
                if backends.get("runtime") else "")]
    if not backends.get("workloads"):
        lines.append("  " + backends.get("note", "n/a"))
        return "\n".join(lines)
    lookup = epoch_lookup(backends["workloads"])
    for w in backends["workloads"]:
        lines.append(f"  {w['workload']}: {w['title']} -- median of {w['reps']} reps")
        for r in w["records"]:
            if r["s_per_epoch"] is None:
                lines.append(f"    {r['label']:58s} {r['status']}: {r['note']}")
                continue
            line = f"    {r['label']:58s} {r['s_per_epoch']:8.4f} s/epoch  build {_fmt(r['build_s'], '.3f')} s"
            if r["id"].endswith("-ort"):
                own = lookup.get((w["workload"], r["id"][:-4]))
                if own:
                    line += f"  (onnxfit backend / this: {own / r['s_per_epoch']:.2f})"
            lines.append(line)
    return "\n".join(lines)


def format_defaults(workloads):
    """Each library at its own thread settings, onnxfit on 1 and 2 threads."""
    lines = ["Out of the box: each library at its default thread settings "
             "(onnxfit n_threads default, PyTorch's default threads, BLAS default)"]
    for w in workloads:
        lines.append(f"  {w['workload']}: {w['title']} -- median of {w['reps']} reps")
        recs = {r["id"]: r for r in w["records"]}
        torch_default = (recs.get("torch-default") or {}).get("s_per_epoch")
        for r in w["records"]:
            if r["s_per_epoch"] is None:
                lines.append(f"    {r['label']:40s} {r['status']}: {r['note']}")
                continue
            ratio = f"  x PyTorch default {r['s_per_epoch'] / torch_default:5.2f}" \
                if torch_default else ""
            lines.append(f"    {r['label']:40s} {r['s_per_epoch']:8.4f} s/epoch{ratio}")
    return "\n".join(lines)


def format_memory(rows):
    lines = ["Peak memory of a one-epoch fit (fresh subprocess per contestant; "
             "ratio = (data + fit's extra peak RSS) / (data + model), target <= 2)",
             f"  {'workload/contestant':34s} {'data MB':>8s} {'model KB':>8s} {'+1st MB':>8s} "
             f"{'+2nd MB':>8s} {'traced MB':>9s} {'ratio':>6s}"]
    for m in rows:
        name = f"{m['workload']} {m['id']}"
        if m.get("status") != "ok":
            lines.append(f"  {name:34s} {m.get('status')}: {m.get('note', '')}")
            continue
        lines.append(
            f"  {name:34s} {_mb(m['data_bytes']):>8s} {m['model_bytes'] / 1024:8.1f} "
            f"{_mb(m['rss_extra_first']):>8s} {_mb(m['rss_extra_second']):>8s} "
            f"{_mb(m['traced_peak']):>9s} {m['ratio']:6.2f}"
            + ("" if m.get("peak_reset") else "  (lifetime peak: an upper bound)"))
    lines.append("  +1st/+2nd: peak RSS above the pre-fit RSS for the first / second fit in the "
                 "process; traced: tracemalloc peak (Python and numpy allocations)")
    return "\n".join(lines)


def format_quality(q):
    lines = [f"Time to quality on W1 (held-out R2 >= lstsq optimum {q['r2_opt']:.6f} - 0.01 = "
             f"{q['threshold']:.6f}; {q['n_train']} train / {q['n_test']} held-out rows; "
             f"median of {q['reps']})",
             f"  {'contestant':34s} {'time s':>8s} {'epochs':>6s} {'R2':>9s} {'1st call s':>10s}"
             f" {'build s':>8s}"]
    for r in q["rows"]:
        mark = "" if r["reached"] else "  (not reached)"
        tuned = "  <- tuned" if r["name"] == q["tuned"] else ""
        lines.append(f"  {r['name']:34s} {r['time_s']:8.4f} {r['epochs']:6g} {r['r2']:9.6f} "
                     f"{r['first_call_s']:10.4f} {_fmt(r.get('build_s'), '8.4f', '       -')}"
                     f"{mark}{tuned}")
    lines.append("  build s: a first partial_fit on 64 rows of a fresh estimator (graph building; "
                 "part of the time to quality)")
    lines.append("  out of the box (fit with default tol stopping):")
    for r in q["out_of_box"]:
        lines.append(f"  {r['name']:34s} {r['time_s']:8.4f} {r['n_iter']:6g} {r['r2']:9.6f}")
    return "\n".join(lines)


def format_sweep(s):
    lines = ["Scaling sweep (fused engine, 1 thread, partial_fit per epoch)"]
    lines.append(f"  {'sweep':10s} {'N':>9s} {'batch':>6s} {'steps':>6s} {'s/epoch':>8s} "
                 f"{'us/step':>8s} {'ns/sample':>9s} {'overhead':>8s}")
    for key in ("n_sweep", "W2_batch_sweep", "W1_batch_sweep"):
        for r in s.get(key, []):
            share = r.get("overhead_share")
            lines.append(
                f"  {r['sweep']:10s} {r['n_samples']:9d} {r['batch_size']:6d} {r['steps']:6d} "
                f"{_fmt(r['s_per_epoch'], '8.4f')} {_fmt(r['us_per_step'], '8.1f')} "
                f"{_fmt(r['ns_per_sample'], '9.1f')} "
                f"{'-' if share is None else f'{100 * share:7.0f}%'}")
    for key in ("W2", "W1"):
        fit = s.get(f"{key}_overhead_fit")
        if fit:
            cross = fit["crossover_batch"]
            lines.append(
                f"  {key}: us/step ~= {fit['a_us']:.1f} + {fit['b_us_per_sample']:.3f} * batch; "
                "fixed per-step cost equals per-sample work at batch "
                + ("-" if cross is None else f"~{cross:.0f}"))
    lines.append("  overhead: share of a step that is the fitted fixed cost a")
    return "\n".join(lines)


def format_targets(rows):
    lines = ["Targets (ratios from this run; judged on medians, the ratio of the "
             "fastest reps in [] for information)"]
    for r in rows:
        best = r.get("value_best")
        lines.append(f"  {r['status']:4s}  {r['target']:72s} {_fmt(r['value'], '6.2f')} "
                     + (f"[{best:5.2f}] " if best is not None else "")
                     + (f"(target <= {r['limit']:g})" if r.get("limit") is not None else ""))
    return "\n".join(lines)


# -------------------------------------------------------------------- files
def _clean(obj):
    """Make numpy scalars JSON-serialisable."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj


def _write_csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_files(results, out_dir, plot=True, log=print):
    os.makedirs(out_dir, exist_ok=True)
    results = _clean(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    rows = []
    for w in results.get("epochs", []):
        for r in w["records"]:
            rows.append(dict(r, workload=w["workload"], n_samples=w["n_samples"],
                             batch_size=w["batch_size"], n_params=w["n_params"],
                             reps=len(r["times"]),
                             min_s=min(r["times"]) if r["times"] else None,
                             max_s=max(r["times"]) if r["times"] else None))
        if w.get("ceiling_s") is not None:
            rows.append(dict(workload=w["workload"], id="ceiling",
                             label="6*N*params at numpy GEMM speed", library="numpy",
                             threads=w["gemm_threads"], status="ok",
                             s_per_epoch=w["ceiling_s"], n_samples=w["n_samples"],
                             batch_size=w["batch_size"], n_params=w["n_params"]))
    _write_csv(os.path.join(out_dir, "epochs.csv"), rows,
               ["workload", "id", "label", "library", "threads", "status", "s_per_epoch",
                "min_s", "max_s", "reps", "build_s", "score", "n_samples", "batch_size",
                "n_params", "note"])
    _write_csv(os.path.join(out_dir, "targets.csv"), results.get("targets", []),
               ["target", "value", "value_best", "limit", "status"])
    if results.get("memory"):
        _write_csv(os.path.join(out_dir, "memory.csv"), results["memory"],
                   ["workload", "id", "status", "data_bytes", "model_bytes", "rss_extra_first",
                    "rss_extra_second", "traced_peak", "peak_bytes", "ratio", "peak_reset",
                    "note"])
    if results.get("quality"):
        _write_csv(os.path.join(out_dir, "quality.csv"), results["quality"]["rows"],
                   ["name", "batch_size", "reached", "time_s", "epochs", "r2", "first_call_s",
                    "build_s"])
    if results.get("sweep"):
        s = results["sweep"]
        _write_csv(os.path.join(out_dir, "sweep.csv"),
                   s.get("n_sweep", []) + s.get("W2_batch_sweep", []) + s.get("W1_batch_sweep", []),
                   ["sweep", "workload", "n_samples", "batch_size", "steps", "status",
                    "s_per_epoch", "us_per_step", "ns_per_sample", "overhead_share", "note"])
    if plot:
        try:
            _plot(results, out_dir)
        except ImportError:
            log("matplotlib is not installed: no chart (pip install '.[plot]')")


def _plot(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = results.get("epochs", [])
    sweep = results.get("sweep")
    if not epochs and not sweep:
        return
    n_rows = (1 if epochs else 0) + (1 if sweep else 0)
    n_cols = max(3, len(epochs))
    fig, grid = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 4.2 * n_rows), squeeze=False)
    colours = {"onnxfit": "tab:blue", "scikit-learn": "tab:orange", "pytorch": "tab:red",
               "numpy": "tab:gray"}
    if epochs:
        for ax in grid[0][len(epochs):]:
            ax.axis("off")
        for ax, w in zip(grid[0], epochs):
            recs = [r for r in w["records"] if r["s_per_epoch"] is not None]
            labels = [r["label"] for r in recs]
            values = [r["s_per_epoch"] for r in recs]
            cols = [colours.get(r["library"], "k") for r in recs]
            if w.get("ceiling_s"):
                labels.append("GEMM ceiling")
                values.append(w["ceiling_s"])
                cols.append(colours["numpy"])
            ax.barh(range(len(values)), values, color=cols)
            ax.set_yticks(range(len(values)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("seconds per epoch (median)")
            ax.set_title(f"{w['workload']}: {w['title']}", fontsize=9)
    if sweep:
        row = grid[n_rows - 1]
        for key, label in (("W2_batch_sweep", "W2"), ("W1_batch_sweep", "W1")):
            pts = [r for r in sweep.get(key, []) if r["us_per_step"]]
            batches = [r["batch_size"] for r in pts]
            row[0].loglog(batches, [r["us_per_step"] for r in pts], "o-", label=label)
            row[1].semilogx(batches, [r["s_per_epoch"] for r in pts], "o-", label=label)
        row[0].set_xlabel("batch size")
        row[0].set_ylabel("us per step")
        row[0].set_title("fused engine: time of a step", fontsize=9)
        row[0].legend(fontsize=8)
        row[1].set_xlabel("batch size")
        row[1].set_ylabel("seconds per epoch")
        row[1].set_title("fused engine: epoch time vs batch size (N fixed)", fontsize=9)
        row[1].legend(fontsize=8)
        pts = [r for r in sweep.get("n_sweep", []) if r["s_per_epoch"]]
        row[2].loglog([r["n_samples"] for r in pts], [r["s_per_epoch"] for r in pts], "o-")
        row[2].set_xlabel("rows (W1, batch 256)")
        row[2].set_ylabel("seconds per epoch")
        row[2].set_title("fused engine: epoch time vs N", fontsize=9)
        for ax in row[3:]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "benchmarks.png"), dpi=110)
    plt.close(fig)
