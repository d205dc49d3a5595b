"""The README's first command: ``python -m onnxfit demo``."""

import re
import subprocess
import sys


def test_demo_runs_and_trained_graphs_beat_their_starting_point():
    result = subprocess.run(
        [sys.executable, "-m", "onnxfit", "demo"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "exported graph vs predict(): max |difference| = 0" in out
    assert "exported graph's labels agree with predict(): 100%" in out
    scores = [float(v) for v in re.findall(r"^\s+\S.*?\s(-?\d\.\d{3})\b", out, re.MULTILINE)]
    # diabetes: SGDRegressor, OnnxSGDRegressor, MLP, MLP trained further;
    # digits: SGDClassifier, OnnxSGDClassifier, MLP, MLP trained further
    assert len(scores) == 8, out
    assert scores[1] >= scores[0] - 0.02
    assert scores[3] > scores[2]
    assert scores[5] >= scores[4] - 0.02
    assert scores[7] > scores[6] and scores[7] >= 0.93
