"""Scaling sweep of the fused engine: where per-step overhead stops dominating.

* W1 as N grows (10k, 100k, 1M rows), batch 256: time per epoch should grow
  linearly in N; the time per sample shows the fixed costs of an epoch
  (``partial_fit``'s validation, the permutation) fading.
* W2 (and W1) as the batch size grows (32 to 4096), N fixed: the time of
  one step is split as ``t_step = a + b * batch`` (see :func:`overhead_fit`);
  ``a`` is the fixed per-step cost (Python, onnxruntime's call, one launch
  per graph node), ``b`` the cost per sample, and ``a / b`` the batch size
  at which both are equal -- beyond it the arithmetic dominates.

Each point is an ``OnnxSGDRegressor`` used through ``partial_fit`` as in
the main table; the points of one sweep are timed round-robin, like the
main table's contestants.
"""

import numpy as np

from .contestants import OnnxfitContestant
from .timing import run_round_robin
from .workloads import make_workload


def _point(workload, tag):
    c = OnnxfitContestant(workload, "fused")
    c.id = f"{c.id}-{tag}"
    c.label = f"{c.label} {tag}"
    return c


def n_sweep(sizes, reps, warmup, log=print):
    contestants = []
    for n in sizes:
        contestants.append(_point(make_workload("W1", n_samples=n), f"N={n}"))
    res = run_round_robin(contestants, [], reps=reps, warmup=warmup, log=log)
    rows = []
    for n, c, rec in zip(sizes, contestants, res["records"]):
        s = rec["s_per_epoch"]
        steps = -(-n // c.workload.batch_size)
        rows.append(dict(sweep="W1-N", workload="W1", n_samples=n,
                         batch_size=c.workload.batch_size, steps=steps,
                         status=rec["status"], note=rec["note"],
                         s_per_epoch=s, us_per_step=None if s is None else 1e6 * s / steps,
                         ns_per_sample=None if s is None else 1e9 * s / n))
        log(f"  sweep W1 N={n}: {_fmt(s)} s/epoch")
    return rows


def batch_sweep(key, n_samples, batch_sizes, reps, warmup, log=print):
    base = make_workload(key, n_samples=n_samples)
    contestants = []
    for b in batch_sizes:
        wl = make_workload(key, data=(base.X, base.y))
        wl.batch_size = b
        contestants.append(_point(wl, f"batch={b}"))
    res = run_round_robin(contestants, [], reps=reps, warmup=warmup, log=log)
    rows = []
    for b, rec in zip(batch_sizes, res["records"]):
        s = rec["s_per_epoch"]
        steps = -(-n_samples // b)
        rows.append(dict(sweep=f"{key}-batch", workload=key, n_samples=n_samples,
                         batch_size=b, steps=steps, status=rec["status"], note=rec["note"],
                         s_per_epoch=s, us_per_step=None if s is None else 1e6 * s / steps,
                         ns_per_sample=None if s is None else 1e9 * s / n_samples))
        log(f"  sweep {key} batch={b}: {_fmt(s)} s/epoch")
    fit = overhead_fit(rows)
    for r in rows:
        if fit and r["us_per_step"]:
            r["overhead_share"] = min(1.0, fit["a_us"] / r["us_per_step"])
    return rows, fit


def overhead_fit(rows):
    """Split a step's time into a fixed cost and a per-sample cost.

    ``b`` (us per sample) is the median of ``us_per_step / batch`` over the
    largest batches (>= 1024, or the two largest), where the fixed cost no
    longer matters; ``a`` (us per step) is the median of ``us_per_step -
    b * batch`` over the smallest batches (<= 128, or the two smallest).
    A straight-line least-squares fit over all points would be driven by the
    large batches and understate ``a``.
    """
    pts = sorted((r["batch_size"], r["us_per_step"]) for r in rows if r["us_per_step"])
    if len(pts) < 2:
        return None
    large = [p for p in pts if p[0] >= 1024] or pts[-2:]
    small = [p for p in pts if p[0] <= 128] or pts[:2]
    b = float(np.median([t / batch for batch, t in large]))
    a = float(np.median([t - b * batch for batch, t in small]))
    return dict(a_us=a, b_us_per_sample=b, crossover_batch=a / b if b > 0 else None)


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def run(quick=False, reps=3, warmup=1, log=print):
    if quick:
        sizes, n_batch, batches = (2_000, 8_000), 4_000, (32, 256, 1024)
    else:
        sizes, n_batch = (10_000, 100_000, 1_000_000), 100_000
        batches = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    out = {"n_sweep": n_sweep(sizes, reps, warmup, log)}
    for key in ("W2", "W1"):
        rows, fit = batch_sweep(key, n_batch, batches, reps, warmup, log)
        out[f"{key}_batch_sweep"] = rows
        out[f"{key}_overhead_fit"] = fit
    return out
