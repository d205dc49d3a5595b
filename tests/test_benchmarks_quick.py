"""The benchmark suite's quick mode runs and writes its files (so it never rots).

It must work without torch, psutil or matplotlib (CI installs only the
``test`` extra): PyTorch rows are then reported as skipped.
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--no-plot"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    return proc, out


def test_exits_zero(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Targets (ratios from this run" in proc.stdout


def test_json_has_every_part(quick_run):
    _, out = quick_run
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["mode"] == "quick"
    assert [w["workload"] for w in results["epochs"]] == ["W1", "W2", "W3", "W4", "W5"]
    assert results["memory"] and results["quality"]["rows"] and results["sweep"]["n_sweep"]
    names = {t["target"] for t in results["targets"]}
    assert "W1 fused / SGDRegressor" in names and "W2 fused / GEMM ceiling" in names
    assert "W4 fused / PyTorch" in names and "W5 fused / PyTorch" in names
    for w in results["epochs"]:
        assert w["gemm_gflops"] > 0 and w["ceiling_s"] > 0


def test_csv_rows(quick_run):
    _, out = quick_run
    with open(out / "epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["workload"], r["id"]): r for r in rows}
    # onnxfit's fused engine and the scikit-learn peers always run.
    for key in [("W1", "onnxfit-fused-1t"), ("W1", "sklearn-SGDRegressor"),
                ("W2", "onnxfit-fused-1t"), ("W2", "sklearn-MLPRegressor-1t"),
                ("W3", "sklearn-MLPClassifier-1t"),
                ("W1", "ceiling"), ("W2", "ceiling"), ("W3", "ceiling")]:
        assert key in by, key
        assert by[key]["status"] == "ok", by[key]
        assert float(by[key]["s_per_epoch"]) > 0
    # Every onnxfit engine gets a row on each workload.
    from onnxfit.engines import ENGINES

    for engine in ENGINES:
        for wl in ("W1", "W2", "W3"):
            assert (wl, f"onnxfit-{engine}-1t") in by
    # PyTorch rows exist either way: timed, or skipped with a note; so do the
    # onnxfit rows of W4 (Conv net) and W5 (LSTM), whose graphs are PyTorch exports.
    torch_rows = [r for r in rows if r["id"] == "torch-1t"]
    assert len(torch_rows) == 5
    net_rows = [by[(wl, "onnxfit-fused-1t")] for wl in ("W4", "W5")]
    if importlib.util.find_spec("torch") is None:
        assert all(r["status"] == "n/a" and "torch" in r["note"]
                   for r in torch_rows + net_rows)
    else:
        assert all(r["status"] == "ok" for r in torch_rows + net_rows)
        assert all(float(r["score"]) > 0.5 for r in net_rows)  # they learn the digits
    for name in ("targets.csv", "memory.csv", "quality.csv", "sweep.csv"):
        assert (out / name).stat().st_size > 0, name
