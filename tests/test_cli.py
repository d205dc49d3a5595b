"""The ``onnxfit`` command line, run as users run it: ``python -m onnxfit ...``
in a subprocess (exit status, stdout, stderr).

Subprocesses cost an interpreter start and onnxfit's imports each; the
independent ones of a test run concurrently (:func:`run_many`).
"""

import io
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfit.cli import MAX_CLASSES_INFERRED, infer_task
from onnxfit.show_versions import show_versions
from tests.graphs import convert, mlp_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120


def _command(args):
    return [sys.executable, "-m", "onnxfit", *map(str, args)]


def _environment():
    env = dict(os.environ)
    # The onnxfit of this checkout, whatever the current directory.
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_many(*commands, cwd=None):
    """Run ``python -m onnxfit ARGS`` for each ARGS concurrently; the
    CompletedProcess of each, in order."""
    env = _environment()
    started = [
        (args, subprocess.Popen(_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=cwd, env=env))
        for args in commands
    ]
    results = []
    for args, process in started:
        out, err = process.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return results


def run(*args, cwd=None):
    return run_many(args, cwd=cwd)[0]


def assert_one_line_error(result, *expected):
    """A non-zero exit with ``onnxfit: error: ...`` on one line, no traceback."""
    shown = f"args {result.args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxfit: error: "), shown
    for text in expected:
        assert text in lines[0], shown


# -- files ------------------------------------------------------------------------------
def _shrink_graph():
    """An MLP whose hidden activation, Shrink, has no gradient rule: W0 and
    B0 lie behind it, W1 and B1 do not."""
    model = mlp_graph(3, [4], 1)
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Shrink"
    return model


def _weightless_graph():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["H"]),
         helper.make_node("ReduceSum", ["H"], ["Y"], keepdims=1)],
        "no_weights",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Models and tables in a temporary folder: name -> path."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 3)).astype(np.float32)
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=120)
    label = np.where(y > 0, "pos", "neg")
    table = pd.DataFrame(X, columns=["a", "b", "c"])
    paths = {name: folder / name for name in (
        "reg.csv", "clf.csv", "mlp.onnx", "skl_mlp.onnx", "skl_clf.onnx", "shrink.onnx",
        "no_weights.onnx", "notes.txt", "data.parquet")}
    table.assign(y=y).to_csv(paths["reg.csv"], index=False)
    table.assign(label=label).to_csv(paths["clf.csv"], index=False)
    onnx.save(mlp_graph(3, [8], 1), paths["mlp.onnx"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        regressor = MLPRegressor(hidden_layer_sizes=(8,), max_iter=5, random_state=0).fit(X, y)
        classifier = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0)
        classifier.fit(X, label)
    onnx.save(convert(regressor, X), paths["skl_mlp.onnx"])
    onnx.save(convert(classifier, X), paths["skl_clf.onnx"])
    onnx.save(_shrink_graph(), paths["shrink.onnx"])
    onnx.save(_weightless_graph(), paths["no_weights.onnx"])
    paths["notes.txt"].write_text("not a model\n")
    paths["data.parquet"].write_bytes(b"PAR1 not really parquet")
    paths["folder"] = folder
    paths["X"], paths["y"], paths["label"] = X, y, label
    return paths


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _initializers(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


# -- --version, show_versions -----------------------------------------------------------
def test_version_names_the_dependencies_and_backends():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("onnxfit", "onnxruntime", "numpy", "scikit-learn", "onnx", "skl2onnx",
                 "Python dependencies", "providers", "CPUExecutionProvider",
                 "Gradient backends"):
        assert name in out, out
    assert re.search(r"^\s+onnxfit: usable \(default\)$", out, re.MULTILINE), out
    assert "onnxruntime-training:" in out


def test_show_versions_writes_the_same_report():
    buffer = io.StringIO()
    show_versions(file=buffer)
    report = buffer.getvalue()
    import onnxfit

    assert report.startswith(f"onnxfit {onnxfit.__version__}\n")
    assert f"onnxruntime: {onnxruntime.__version__}" in report
    assert f"version: {onnxruntime.__version__}" in report


# -- info -------------------------------------------------------------------------------
def test_info_describes_a_converted_mlp_and_ops_without_a_rule(files):
    mlp, shrink, clf = run_many(
        ("info", files["skl_mlp.onnx"]), ("info", files["shrink.onnx"]),
        ("info", files["skl_clf.onnx"]))
    assert mlp.returncode == 0, mlp.stderr
    out = mlp.stdout
    assert "produced by skl2onnx" in out
    assert re.search(r"^Opsets: ai\.onnx \d+", out, re.MULTILINE), out
    assert re.search(r"^  X\s+float\s+\(\?, 3\)$", out, re.MULTILINE), out
    assert re.search(r"^  variable\s+float\s+\(\?, 1\)$", out, re.MULTILINE), out
    assert "'X' (n, 3)  float32: 3 columns of a table" in out
    assert "Trainable weights (4, 41 values):" in out
    assert re.search(r"^  coefficient\s+float32\s+\(3, 8\)$", out, re.MULTILINE), out
    assert re.search(r"^  intercepts1\s+float32\s+\(1, 1\)$", out, re.MULTILINE), out
    assert "has a rule" in out

    assert shrink.returncode == 0, shrink.stderr
    out = shrink.stdout
    assert "Operators on the gradient path without a rule (1):" in out
    assert "  Shrink (node 'H0'), reached from ['W0', 'B0']\n" in out
    assert "--freeze W0 B0" in out

    # A converted classifier: its label and ZipMap outputs, the scores trained.
    assert clf.returncode == 0, clf.stderr
    assert re.search(r"^  output_label\s+string\s+\(\?,\)$", clf.stdout, re.MULTILINE)
    assert "sequence(map(string, float))" in clf.stdout
    assert "Trained output (OnnxSGDClassifier)" in clf.stdout


def test_info_of_an_old_opset_and_of_a_graph_without_weights(files, capsys):
    old = files["folder"] / "opset13.onnx"
    model = mlp_graph(3, [4], 1)
    model.opset_import[0].version = 13  # MatMul, Add and Relu are the same there
    onnx.save(model, old)
    result = run_in_process(capsys, "info", old)
    assert result.returncode == 0, result.stderr
    assert "Opsets: ai.onnx 13 (onnxfit trains it converted to ai.onnx 17)" in result.stdout
    result = run_in_process(capsys, "info", files["no_weights.onnx"])
    assert result.returncode == 0, result.stderr
    assert "Trainable weights: none: The graph has no floating-point initializer" in \
        result.stdout


# -- train ------------------------------------------------------------------------------
def _printed_score(out, metric):
    found = re.search(rf"^{metric} on the training data \(120 samples\): (-?\d\.\d{{4}})$",
                      out, re.MULTILINE)
    assert found, out
    return float(found.group(1))


def test_train_regression_classification_and_freeze(files):
    folder = files["folder"]
    reg_out, clf_out, frozen_out = (folder / n for n in (
        "reg_trained.onnx", "clf_trained.onnx", "frozen.onnx"))
    reg, clf, frozen = run_many(
        ("train", files["skl_mlp.onnx"], files["reg.csv"], "--target", "y", "--output",
         reg_out, "--epochs", 15, "--random-state", 0),
        ("train", files["skl_clf.onnx"], files["clf.csv"], "--target", "label", "-o",
         clf_out, "--epochs", 10, "--learning-rate", "adam", "--eta0", 0.01,
         "--random-state", 0),
        ("train", files["mlp.onnx"], files["reg.csv"], "--target", "y", "--output",
         frozen_out, "--epochs", 3, "--freeze", "W0", "B1", "--task", "regression",
         "--batch-size", 16, "--loss", "huber"),
    )
    X, y, label = files["X"], files["y"], files["label"]

    assert reg.returncode == 0, reg.stderr
    out = reg.stdout
    assert "as a regression (inferred: the target holds non-integer numbers" in out
    epochs = re.findall(r"^epoch\s+(\d+)/15  loss (\S+)$", out, re.MULTILINE)
    assert [int(e) for e, _ in epochs] == list(range(1, 16)), out
    assert float(epochs[-1][1]) < float(epochs[0][1])
    # The written graph runs in onnxruntime and scores what was printed.
    predicted = _session(reg_out).run(None, {"X": X})[0].ravel()
    from sklearn.metrics import accuracy_score, r2_score

    assert abs(r2_score(y, predicted) - _printed_score(out, "R²")) < 2e-4
    assert f"wrote {reg_out}" in out
    # The ConvergenceWarning of the 15 epochs, as one line.
    assert "onnxfit: warning: ConvergenceWarning:" in reg.stderr
    assert "--epochs" in reg.stderr and "Traceback" not in reg.stderr

    assert clf.returncode == 0, clf.stderr
    out = clf.stdout
    assert "as a classification (inferred: the target holds non-numeric values" in out
    labels = _session(clf_out).run(["output_label"], {"X": X})[0]
    assert abs(accuracy_score(label, labels) - _printed_score(out, "accuracy")) < 1e-4

    assert frozen.returncode == 0, frozen.stderr
    assert "trains 2 weights: B0, W1 (frozen: W0, B1)" in frozen.stdout
    before, after = _initializers(files["mlp.onnx"]), _initializers(frozen_out)
    for name in ("W0", "B1"):
        assert after[name].tobytes() == before[name].tobytes()
    for name in ("B0", "W1"):
        assert not np.array_equal(after[name], before[name])


def test_train_with_a_validation_fraction_reports_its_score(files):
    out_path = files["folder"] / "validated.onnx"
    result = run("train", files["mlp.onnx"], files["clf.csv"], "--target", "label",
                 "--output", out_path, "--validation-fraction", 0.25, "--epochs", 8,
                 "--random-state", 0)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = re.findall(r"^epoch\s+\d+/8  loss \S+  validation accuracy (\d\.\d{4})$", out,
                       re.MULTILINE)
    assert lines, out
    found = re.search(r"^accuracy on the validation fraction \(30 of 120 samples, held out "
                      r"from training\), best epoch (\d+) \(its weights are written\): "
                      r"(\d\.\d{4})$", out, re.MULTILINE)
    assert found, out
    assert float(found.group(2)) == max(float(s) for s in lines)
    assert lines[int(found.group(1)) - 1] == found.group(2)


def test_train_reads_parquet(files):
    pytest.importorskip("pyarrow")
    parquet = files["folder"] / "reg.parquet"
    pd.read_csv(files["reg.csv"]).to_parquet(parquet)
    result = run("train", files["mlp.onnx"], parquet, "--target", "y", "--output",
                 files["folder"] / "from_parquet.onnx", "--epochs", 2)
    assert result.returncode == 0, result.stderr
    assert "120 samples, 3 feature columns, target 'y'" in result.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_train_shows_a_progress_bar_on_a_terminal(files):
    """stderr on a terminal: the estimator's tqdm bar there; the loss per
    epoch on stdout all the same."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, where tqdm draws nothing.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        _command(["train", files["mlp.onnx"], files["reg.csv"], "--target", "y", "-o",
                  files["folder"] / "tty.onnx", "--epochs", 4]),
        stdout=subprocess.PIPE, stderr=slave, text=True, env=_environment())
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    out, _ = process.communicate(timeout=TIMEOUT)
    reader.join(TIMEOUT)
    os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, err
    assert re.search(r"OnnxSGDRegressor: 100%.*4/4.*loss=", err), err
    # The warning comes after the bar, not inside it.
    assert err.index("ConvergenceWarning") > err.rindex("4/4"), err
    assert len(re.findall(r"^epoch \d/4  loss \S+$", out, re.MULTILINE)) == 4, out


# -- errors -----------------------------------------------------------------------------
def run_in_process(capsys, *args):
    """``onnxfit.cli.main(ARGS)`` in this process (no interpreter to start),
    as a CompletedProcess."""
    from onnxfit.cli import main

    capsys.readouterr()
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        status = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, captured.out, captured.err)


def test_errors_are_one_line_and_a_non_zero_exit(files):
    """Bad paths, a bad column, a graph without weights: in subprocesses."""
    folder = files["folder"]
    out = folder / "unused.onnx"
    cases = [
        (("info", folder / "missing.onnx"), ["model file", "does not exist"]),
        (("info", folder), ["is a directory"]),
        (("train", files["notes.txt"], files["reg.csv"], "--target", "y", "-o", out),
         ["is not an ONNX model"]),
        (("train", files["mlp.onnx"], files["reg.csv"], "--target", "nope", "-o", out),
         ["has no column 'nope'", "a, b, c, y"]),
        (("train", files["no_weights.onnx"], files["reg.csv"], "--target", "y", "-o", out),
         ["no floating-point initializer"]),
    ]
    results = run_many(*(args for args, _ in cases))
    for (_, expected), result in zip(cases, results):
        assert_one_line_error(result, *expected)
    assert not out.exists()


def test_more_errors_are_one_line(files, capsys):
    """The same handling, run in this process for speed."""
    folder = files["folder"]
    out = folder / "unused.onnx"
    cases = [
        (("check-gradients", files["notes.txt"]), ["is not an ONNX model"]),
        (("check-gradients", files["no_weights.onnx"]), ["no floating-point initializer"]),
        (("info", files["reg.csv"]), ["is not an ONNX model"]),
        (("train", files["mlp.onnx"], folder / "missing.csv", "--target", "y", "-o", out),
         ["data file", "does not exist"]),
        (("train", files["mlp.onnx"], files["mlp.onnx"], "--target", "y", "-o", out),
         ["is not a readable CSV file"]),
        (("train", files["mlp.onnx"], files["reg.csv"], "--target", "y", "-o", out,
          "--freeze", "W9"), ["--freeze names ['W9']", "W0, B0, W1, B1"]),
        (("train", files["mlp.onnx"], files["reg.csv"], "--target", "y", "-o", out,
          "--freeze", "W0", "B0", "W1", "B1"), ["nothing is left to train"]),
        (("train", files["shrink.onnx"], files["reg.csv"], "--target", "y", "-o", out),
         ["no gradient rule for Shrink", "On the command line: add --freeze W0 B0."]),
        (("train", files["mlp.onnx"], files["reg.csv"], "--target", "y",
          "-o", folder / "no_such_dir" / "out.onnx"), ["does not exist"]),
        (("train", files["mlp.onnx"], files["reg.csv"], "--target", "y", "-o", out,
          "--task", "regression", "--loss", "hinge"), ["'loss' parameter"]),
    ]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        cases.append((("train", files["mlp.onnx"], files["data.parquet"], "--target", "y",
                       "-o", out), ["pip install pyarrow"]))
    for args, expected in cases:
        assert_one_line_error(run_in_process(capsys, *args), *expected)
    assert not out.exists()


def test_usage_errors_are_argparse_s(capsys):
    result = run_in_process(capsys, "train", "model.onnx")
    assert result.returncode == 2
    assert "the following arguments are required" in result.stderr
    result = run_in_process(capsys, "train", "m.onnx", "d.csv", "--target", "y", "-o", "o",
                            "--validation-fraction", "1.5")
    assert result.returncode == 2
    assert "must lie strictly between 0 and 1" in result.stderr


# -- check-gradients --------------------------------------------------------------------
def test_check_gradients_passes_on_an_mlp(files):
    result = run("check-gradients", files["mlp.onnx"], "--positions", 5)
    assert result.returncode == 0, result.stderr
    assert "Gradient check of 'Y': PASSED" in result.stdout
    for name in ("W0", "B0", "W1", "B1"):
        assert re.search(rf"^  {name}\s", result.stdout, re.MULTILINE), result.stdout


def test_check_gradients_leaves_frozen_weights_out(files, capsys):
    result = run_in_process(capsys, "check-gradients", files["shrink.onnx"], "--freeze", "W0",
                            "B0", "--positions", 3)
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout
    assert re.search(r"^  W1\s", result.stdout, re.MULTILINE), result.stdout
    assert not re.search(r"^  (W0|B0)\s", result.stdout, re.MULTILINE), result.stdout


# -- the task rule ----------------------------------------------------------------------
@pytest.mark.parametrize("values, task", [
    (["a", "b", "a"], "classification"),
    ([True, False, True], "classification"),
    ([0.5, 1.0, 2.0], "regression"),
    ([0.0, 1.0, 1.0], "classification"),
    ([0, 1, 2, 1], "classification"),
    (list(range(MAX_CLASSES_INFERRED + 1)), "regression"),
])
def test_infer_task(values, task):
    assert infer_task(pd.Series(values), mlp_graph(3, [2], 1))[0] == task


def test_infer_task_of_a_converted_classifier_with_many_classes(files):
    model = onnx.load(str(files["skl_clf.onnx"]))
    many = pd.Series(np.arange(3 * MAX_CLASSES_INFERRED))
    assert infer_task(many, model)[0] == "classification"
