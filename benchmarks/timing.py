"""Seconds per epoch, measured fairly: one process, interleaved contestants.

Every contestant is set up first; then ``warmup`` untimed rounds; then
``reps`` rounds in which each contestant runs one timed epoch (round-robin),
so that slow drifts of a noisy machine hit everyone alike.  The figure kept is the median.  The
float32 GEMM probe (a 2048 x 2048 numpy matmul) takes part in the rounds
like a contestant, so the ceiling comes from the same conditions.

Before every timed epoch the runner evicts the CPU caches (it rewrites a
buffer twice the size of a large L3), untimed: otherwise whoever runs right
after another contestant on the same array finds the data warm (W3's X
fits in a 32 MB L3) and whoever runs after the GEMM probe finds it cold.
The order of each round is a fresh (seeded) permutation, so that no
contestant always follows the same neighbour.

Multi-threaded entrants (numpy's default-thread GEMM, 2-thread rows) leave
worker threads spinning for a while after they return (OpenBLAS, OpenMP,
onnxruntime's pool); on a 2-core machine that steals a core from whoever
runs next.  The runner therefore pauses ``settle`` seconds, untimed, after
each of them.
"""

import gc
import statistics
import time
import traceback

import numpy as np

GEMM_SIZE = 2048


class BlasThreadLimit:
    """Limits BLAS to ``self.threads`` threads (None: no limit) during each
    timed epoch of a contestant."""

    threads = None
    _limit = None

    def before_epoch(self):
        if self.threads is not None:
            from threadpoolctl import threadpool_limits

            self._limit = threadpool_limits(limits=self.threads, user_api="blas")

    def after_epoch(self):
        if self._limit is not None:
            self._limit.restore_original_limits()
            self._limit = None


class GemmProbe(BlasThreadLimit):
    """Times one ``GEMM_SIZE``-square float32 matmul (numpy's BLAS)."""

    def __init__(self, threads=None):
        self.threads = threads  # None: numpy's default
        self.id = "gemm-default" if threads is None else f"gemm-{threads}t"
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
        self.b = rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
        self.c = np.empty_like(self.a)

    @staticmethod
    def default_threads():
        try:
            from threadpoolctl import threadpool_info

            return max((i["num_threads"] for i in threadpool_info()
                        if i.get("user_api") == "blas"), default=None)
        except Exception:  # pragma: no cover
            return None

    def epoch(self):
        np.matmul(self.a, self.b, out=self.c)

    @staticmethod
    def flop():
        return 2.0 * GEMM_SIZE ** 3


_FLUSH = None


def evict_caches(size=64 * 2**20):
    """Rewrite ``size`` bytes so that the last-level cache holds none of the
    data of the previous entrant."""
    global _FLUSH
    if _FLUSH is None or _FLUSH.nbytes != size:
        _FLUSH = np.zeros(size // 8, dtype=np.float64)
    _FLUSH += 1.0


def _multi_threaded(entrant):
    return getattr(entrant, "threads", 1) != 1


def _timed(contestant, settle=0.0):
    gc.collect()
    evict_caches()
    contestant.before_epoch()
    try:
        start = time.perf_counter()
        measured = contestant.epoch()
        elapsed = time.perf_counter() - start
        # A contestant may measure its epoch itself (a difference of fits).
        return elapsed if measured is None else measured
    finally:
        contestant.after_epoch()
        if settle and _multi_threaded(contestant):
            time.sleep(settle)


def run_round_robin(contestants, probes, reps, warmup, log=print, settle=0.2):
    """Time ``contestants`` (and ``probes``) interleaved.

    Returns
    -------
    dict
        ``records``: one dict per contestant (id, label, library, threads,
        is_peer, status, build_s, times, s_per_epoch, score);
        ``probes``: probe id -> list of times.
    """
    records, active = [], []
    for c in contestants:
        rec = dict(id=c.id, label=c.label, library=c.library, threads=c.threads,
                   is_peer=c.is_peer, status="ok", build_s=None, times=[],
                   s_per_epoch=None, score=None, note="")
        records.append(rec)
        reason = c.unavailable()
        if reason:
            rec["status"] = "n/a"
            rec["note"] = reason
            continue
        try:
            rec["build_s"] = c.setup()
        except Exception as exc:
            rec["status"] = "error"
            rec["note"] = f"setup failed: {type(exc).__name__}: {exc}"
            log(f"  {c.label}: setup failed\n{traceback.format_exc()}")
            continue
        active.append((c, rec))

    def one(c, rec):
        try:
            return _timed(c, settle)
        except Exception as exc:
            rec["status"] = "error"
            rec["note"] = f"epoch failed: {type(exc).__name__}: {exc}"
            log(f"  {c.label}: epoch failed\n{traceback.format_exc()}")
            return None

    for _ in range(warmup):
        for c, rec in active:
            if rec["status"] == "ok":
                one(c, rec)
        for p in probes:
            _timed(p, settle)
    probe_times = {p.id: [] for p in probes}
    entrants = [("c", c, rec) for c, rec in active] + [("p", p, None) for p in probes]
    rng = np.random.default_rng(0)
    for r in range(reps):
        for i in rng.permutation(len(entrants)):
            kind, c, rec = entrants[i]
            if kind == "p":
                probe_times[c.id].append(_timed(c, settle))
            elif rec["status"] == "ok":
                t = one(c, rec)
                if t is not None:
                    rec["times"].append(t)
    for c, rec in active:
        if rec["status"] == "ok" and rec["times"]:
            rec["s_per_epoch"] = statistics.median(rec["times"])
            try:
                c.before_epoch()
                rec["score"] = c.score()
            except Exception as exc:  # a failing score must not hide the timing
                rec["note"] = f"score failed: {type(exc).__name__}: {exc}"
            finally:
                c.after_epoch()
    return {"records": records, "probes": probe_times}
