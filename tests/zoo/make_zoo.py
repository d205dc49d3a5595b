"""Write the gradient zoo: small real graphs with saved gradient references.

Run from the repository root::

    python -m tests.zoo.make_zoo                  # /work/venv: torch, skl2onnx
    python -m tests.zoo.make_zoo --ort-training   # a venv with onnxruntime-training 1.19.2

The first mode writes, for every graph of :data:`ZOO`, ``<name>.onnx`` and
``<name>.npz`` into this folder.  The npz holds

* ``X``: a small float32 input batch (fixed seed), 2-D ``(N, features)``;
* ``dY``: a random cotangent of the differentiated output's shape;
* ``output``: the name of the differentiated output (a 0-d string array);
* for PyTorch models, ``torch.<initializer name>``: the gradient of
  ``sum(Y * dY)`` with respect to that parameter, computed by
  ``torch.autograd`` on the module converted to float64, ``torch.X``: the
  gradient with respect to the input, and ``torch.Y``: the float64 output.

The second mode computes, for every zoo graph, the same gradients with the
gradient builder of onnxruntime-training 1.19.2
(``OnnxFunction(..., gradient_backend="onnxruntime-training")``) and writes
``<name>.ort1192.npz`` (one key per weight name, plus ``X`` for the input
gradient) where it can; each graph runs in a child process, since some
1.19.2 gradient kernels kill the process.

Not collected by pytest (the file name does not start with ``test_``).
"""

import argparse
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np

ZOO_DIR = os.path.dirname(os.path.abspath(__file__))
N_ROWS = 5


# -- scikit-learn graphs (skl2onnx) -------------------------------------------------------------
def _skl_data(n_features, n_targets, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((40, n_features)).astype(np.float32)
    y = rng.standard_normal((40, n_targets)) if n_targets > 1 else rng.standard_normal(40)
    return X, y


def _convert(estimator, X, **options):
    from skl2onnx import to_onnx

    from onnxfit.onnx_graphs import CONVERTER_OPSETS

    return to_onnx(estimator, X[:1].astype(np.float32), target_opset=CONVERTER_OPSETS, **options)


def _fit_quietly(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few iterations on purpose
        return estimator.fit(X, y)


def skl_mlp_relu():
    from sklearn.neural_network import MLPRegressor

    X, y = _skl_data(5, 1, 0)  # skl2onnx flattens a multi-target MLPRegressor to (N * k, 1)
    est = MLPRegressor(hidden_layer_sizes=(8, 6), activation="relu", max_iter=20, random_state=0)
    est = _fit_quietly(est, X, y)
    return _convert(est, X), "variable", X[:N_ROWS]


def skl_mlp_tanh():
    from sklearn.neural_network import MLPRegressor

    X, y = _skl_data(4, 1, 1)
    est = MLPRegressor(hidden_layer_sizes=(7,), activation="tanh", max_iter=20, random_state=1)
    est = _fit_quietly(est, X, y)
    return _convert(est, X), "variable", X[:N_ROWS]


def skl_linear():
    from sklearn.linear_model import LinearRegression

    X, y = _skl_data(6, 3, 2)
    est = LinearRegression().fit(X, y)
    return _convert(est, X, black_op={"LinearRegressor"}), "variable", X[:N_ROWS]


def skl_mlp_classifier():
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 5)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    est = _fit_quietly(MLPClassifier(hidden_layer_sizes=(6,), max_iter=20, random_state=3), X, y)
    return _convert(est, X, options={"zipmap": False}), "probabilities", X[:N_ROWS]


# -- PyTorch graphs -----------------------------------------------------------------------------
def _torch_modules():
    """name -> (builder of the eval-mode module, number of input features)."""
    import torch
    from torch import nn

    class View(nn.Module):
        def __init__(self, *shape):
            super().__init__()
            self.shape = shape

        def forward(self, x):
            return x.view(-1, *self.shape)

    def gemm_mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                             nn.Linear(8, 3))

    def conv_maxpool():
        return nn.Sequential(View(1, 8, 8), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 2))

    def conv_avgpool():
        return nn.Sequential(
            View(2, 6, 6), nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
            nn.AvgPool2d(2, stride=2, padding=1, count_include_pad=True),   # 6x6 -> 4x4
            nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(),
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),  # 4x4 -> 4x4
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def conv_stride_groups():
        return nn.Sequential(
            View(2, 7, 7), nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),  # 7x7 -> 4x4
            nn.Tanh(), nn.Conv2d(4, 4, 2, stride=2, padding=1, groups=2, bias=False),  # -> 3x3
            nn.Flatten(), nn.Linear(36, 2))

    def conv1d():
        return nn.Sequential(View(2, 10), nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(),
                             nn.Conv1d(4, 3, 3, stride=2), nn.Flatten(), nn.Linear(12, 2))

    def batchnorm():
        # ReLU between Conv and BatchNorm: the exporter would otherwise fold
        # the (eval-mode) normalization into the convolution.
        model = nn.Sequential(View(2, 5, 5), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                              nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(75, 2))
        bn = model[3]
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            bn.running_mean.copy_(0.3 * torch.randn(3, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(3, generator=gen))
            bn.weight.copy_(1 + 0.3 * torch.randn(3, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(3, generator=gen))
        return model

    def layernorm():
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2))
        gen = torch.Generator().manual_seed(12)
        with torch.no_grad():
            model[1].weight.copy_(1 + 0.3 * torch.randn(8, generator=gen))
            model[1].bias.copy_(0.2 * torch.randn(8, generator=gen))
        return model

    def activations():
        return nn.Sequential(nn.Linear(5, 6), nn.Softplus(), nn.Linear(6, 6), nn.ELU(),
                             nn.Linear(6, 6), nn.LeakyReLU(0.1), nn.Linear(6, 2), nn.Sigmoid())

    return {
        "torch_gemm_mlp": (gemm_mlp, 6),
        "torch_conv_maxpool": (conv_maxpool, 64),
        "torch_conv_avgpool": (conv_avgpool, 72),
        "torch_conv_stride_groups": (conv_stride_groups, 98),
        "torch_conv1d": (conv1d, 20),
        "torch_batchnorm": (batchnorm, 50),
        "torch_layernorm": (layernorm, 6),
        "torch_activations": (activations, 5),
    }


def _export_torch(name, build, n_features, seed):
    """Export ``build()`` in eval mode; return (model, npz content)."""
    import onnx
    import torch

    torch.manual_seed(seed)
    module = build().eval()
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_ROWS, n_features)).astype(np.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        torch.onnx.export(
            module, torch.from_numpy(X[:2]), buffer, dynamo=False, opset_version=17,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_name = "pytorch"
    model.graph.name = name

    # The float64 reference.
    double = module.double()
    x = torch.from_numpy(X.astype(np.float64)).requires_grad_(True)
    Y = double(x)
    dY = rng.standard_normal(tuple(Y.shape))
    (Y * torch.from_numpy(dY)).sum().backward()
    content = {"X": X, "dY": dY.astype(np.float32), "output": np.array("output"),
               "torch.X": x.grad.numpy(), "torch.Y": Y.detach().numpy()}
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for param_name, param in double.named_parameters():
        if param_name not in initializers or initializers[param_name] != tuple(param.shape):
            raise RuntimeError(
                f"{name}: parameter {param_name} {tuple(param.shape)} is not an initializer "
                f"of the exported graph ({initializers})."
            )
        content[f"torch.{param_name}"] = param.grad.numpy()
    return model, content


# -- the zoo ------------------------------------------------------------------------------------
SKL_GRAPHS = {
    "skl_mlp_relu": skl_mlp_relu,
    "skl_mlp_tanh": skl_mlp_tanh,
    "skl_linear": skl_linear,
    "skl_mlp_classifier": skl_mlp_classifier,
}


def zoo_names():
    """Names of the graphs written in this folder, sorted."""
    return sorted(f[:-5] for f in os.listdir(ZOO_DIR) if f.endswith(".onnx"))


def _output_shape(model, output, X):
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run([output], {session.get_inputs()[0].name: X})[0].shape


def _save(name, model, content):
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(ZOO_DIR, f"{name}.onnx"))
    np.savez(os.path.join(ZOO_DIR, f"{name}.npz"), **content)
    size = os.path.getsize(os.path.join(ZOO_DIR, f"{name}.onnx"))
    ops = sorted({n.op_type for n in model.graph.node})
    print(f"{name:28s} {size:6d} B  {' '.join(ops)}")


def make_zoo():
    for seed, (name, make) in enumerate(SKL_GRAPHS.items()):
        model, output, X = make()
        model.graph.name = name
        rng = np.random.default_rng(100 + seed)
        dY = rng.standard_normal(_output_shape(model, output, X)).astype(np.float32)
        _save(name, model, {"X": X, "dY": dY, "output": np.array(output)})
    for seed, (name, (build, n_features)) in enumerate(_torch_modules().items()):
        model, content = _export_torch(name, build, n_features, 200 + seed)
        _save(name, model, content)


# -- references from onnxruntime-training 1.19.2 ------------------------------------------------
def ort_training_gradients(name, zoo_dir=ZOO_DIR):
    """Gradients of sum(Y * dY) with the 1.19.2 backend through
    :class:`onnxfit.OnnxFunction`, as the npz content (weights, then ``X``)."""
    from onnxfit import OnnxFunction

    data = np.load(os.path.join(zoo_dir, f"{name}.npz"))
    f = OnnxFunction(os.path.join(zoo_dir, f"{name}.onnx"), output_name=str(data["output"]),
                     gradient_backend="onnxruntime-training", input_gradient=True)
    f.forward(data["X"], f.initial_weights())
    grads, grad_x = f.backward(data["dY"], return_input_gradient=True)
    content = {w: np.asarray(grads[w]) for w in f.weight_names}
    content["X"] = np.asarray(grad_x)
    return content


def ort_training_whole_graph_gradients(name, zoo_dir=ZOO_DIR):
    """The same gradients from the unsplit 1.19.2 gradient graph (one session).

    The fallback when the forward/backward split that OnnxFunction runs
    does not load: the gradient is still 1.19.2's.
    """
    from onnxfit.gradient import build_vjp
    from onnxfit.model import OnnxModel, load_onnx, normalise_model
    from onnxfit.sessions import make_session

    data = np.load(os.path.join(zoo_dir, f"{name}.npz"))
    model = OnnxModel(normalise_model(load_onnx(os.path.join(zoo_dir, f"{name}.onnx"))),
                      output_name=str(data["output"]))
    cotangent = "zoo.cotangent"
    gradient = build_vjp(model.forward_model(), {model.output_name: cotangent},
                         model.weight_names + [model.input_name],
                         backend="onnxruntime-training")
    session = make_session(gradient.model)
    feeds = {model.input_name: data["X"], cotangent: data["dY"], **model.initial_weights()}
    names = [gradient.gradient_names[w] for w in model.weight_names + [model.input_name]]
    values = session.run(names, feeds)
    content = dict(zip(model.weight_names, values[:-1]))
    content["X"] = values[-1]
    return content


def _child(name, out_dir, whole_graph):
    """Child process: compute and save one graph's 1.19.2 gradients."""
    compute = ort_training_whole_graph_gradients if whole_graph else ort_training_gradients
    try:
        content = compute(name)
    except Exception as exc:  # reported by the parent
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    np.savez(os.path.join(out_dir, f"{name}.ort1192.npz"), **content)
    print(json.dumps({"saved": sorted(content)}))
    return 0


def run_ort_training_child(name, out_dir, whole_graph=False, python=None):
    """Compute one graph's 1.19.2 gradients in a child process (a crashing
    gradient kernel kills only the child).

    Returns
    -------
    report : dict
        ``{"saved": keys}`` when ``<out_dir>/<name>.ort1192.npz`` was
        written, else ``{"error": message}`` (``"crash"`` is set when the
        child died, with its exit code).
    """
    root = os.path.dirname(os.path.dirname(ZOO_DIR))
    command = [python or sys.executable, "-m", "tests.zoo.make_zoo", "--child", name,
               "--out", out_dir]
    if whole_graph:
        command.append("--whole-graph")
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    try:
        return json.loads(last[0])
    except ValueError:
        return {"error": f"the child process died with exit code {proc.returncode} "
                         f"({_signal_name(proc.returncode)}); stderr: {proc.stderr.strip()[-500:]}",
                "crash": proc.returncode}


def _signal_name(code):
    import signal

    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            pass
    return "no signal"


def make_ort_training_references():
    from onnxfit.sessions import has_training_build

    if not has_training_build():
        sys.exit("--ort-training needs onnxruntime-training-cpu 1.19.2 installed.")
    for name in zoo_names():
        target = os.path.join(ZOO_DIR, f"{name}.ort1192.npz")
        if os.path.exists(target):
            os.remove(target)
        report = run_ort_training_child(name, ZOO_DIR)
        if "saved" in report:
            print(f"{name:28s} ok       {name}.ort1192.npz")
            continue
        message = " ".join(report["error"].split())
        print(f"{name:28s} REFUSED  OnnxFunction: {message[:400]}")
        if "crash" in report:
            # The split forward/backward graphs crashed; the unsplit gradient
            # graph may still run, which gives 1.19.2's gradient all the same.
            report = run_ort_training_child(name, ZOO_DIR, whole_graph=True)
            if "saved" in report:
                print(f"{'':28s} ok       {name}.ort1192.npz from the unsplit gradient graph")
            else:
                print(f"{'':28s} REFUSED  unsplit graph: {' '.join(report['error'].split())[:400]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ort-training", action="store_true",
                        help="write the onnxruntime-training 1.19.2 references")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=ZOO_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--whole-graph", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.out, args.whole_graph)
    if args.ort_training:
        make_ort_training_references()
    else:
        make_zoo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
