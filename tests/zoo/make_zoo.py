"""Write the gradient zoo: small real graphs with saved gradient references.

Run from the repository root::

    python -m tests.zoo.make_zoo                  # /work/venv: torch, skl2onnx
    python -m tests.zoo.make_zoo --ort-training   # a venv with onnxruntime-training 1.19.2

The first mode writes, for every graph of :data:`ZOO`, ``<name>.onnx`` and
``<name>.npz`` into this folder.  The npz holds

* ``X``: a small float32 input batch (fixed seed), 2-D ``(N, features)``
  (the user models below: of any rank, or ``input.<name>`` per input);
* ``dY``: a random cotangent of the differentiated output's shape;
* ``output``: the name of the differentiated output (a 0-d string array);
* for PyTorch models, ``torch.<initializer name>``: the gradient of
  ``sum(Y * dY)`` with respect to that parameter, computed by
  ``torch.autograd`` on the module converted to float64, ``torch.X``: the
  gradient with respect to the input, and ``torch.Y``: the float64 output.

It also writes ``cnn_digits_train_step.npz``: one training-mode SGD step
of the cnn_digits model in torch (see :func:`cnn_digits_train_step`).

The second mode computes, for every zoo graph, the same gradients with the
gradient builder of onnxruntime-training 1.19.2
(``OnnxFunction(..., gradient_backend="onnxruntime-training")``) and writes
``<name>.ort1192.npz`` (one key per weight name, plus ``X`` for the input
gradient, or ``input.<name>`` per float input of a graph with several) where
it can; each graph runs in a child process, since some
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
#: Seed of the first user model (cnn_digits, also its training step).
USER_SEED = 300


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


# -- PyTorch models a user brings, both exporters ---------------------------------------------
#
# ``torch_<model>`` comes from the TorchScript exporter (``dynamo=False``,
# opset 17), ``torch_<model>_dynamo`` from the torch.export-based one
# (``dynamo=True``, opset 18, its default optimisations on).  Both run with
# their defaults otherwise: eval mode, so Dropout is left out and an eval-mode
# BatchNorm after a convolution is folded into it (by both exporters), and the
# references are those of the graph as written.  ``torch_cnn_digits_train``
# (TorchScript only) is exported with ``training=TrainingMode.TRAINING``:
# BatchNormalization with ``training_mode=1`` (batch statistics, two extra
# running-statistics outputs that are not graph outputs) and a Dropout node in
# training mode (ratio 0.25, its mask output unused).  Its references are of
# the training-mode graph with the Dropout ratio set to 0 (npz key
# ``dropout_ratio``; the test sets it), since no reference can share
# onnxruntime's random mask.
#
# The npz of these graphs holds, besides ``dY``, ``output``, ``torch.Y`` and
# ``torch.<initializer>``:
#
# * one input: ``X`` (any rank) and ``torch.X`` as before;
# * several inputs: ``input.<graph input name>`` for each, and
#   ``torch.input.<name>`` for the gradient of each floating-point one
#   (integer inputs, as Embedding indices, have none);
# * ``weights``: the initializers holding the torch parameters, the ones to
#   train (``weights_to_train``).  Float initializers that are constants of the
#   exporter (the dynamo exporter writes LSTM/GRU's zero initial state and the
#   attention's scale 8**-0.25 as initializers) are not among them.
#
# Parameters are matched to initializers by value, not by name: the
# exporters rename, transpose (MatMul weights), reorder and concatenate
# (LSTM/GRU gates) or fold (BatchNorm into Conv) them.  An initializer is a
# parameter of the reference module (the module itself, or for folded graphs
# the module with BatchNorm folded into the convolution) when it is allclose
# to a parameter of its shape, or when each of its elements is exactly one
# element of the parameters (all parameter values are made distinct first);
# every parameter element must be used exactly once.

#: Names of the user models (without the ``torch_`` prefix and exporter suffix).
USER_MODELS = ("cnn_digits", "embedding_mlp", "lstm_classifier", "gru_classifier",
               "transformer_encoder")


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target


def _jittered(X, rng):
    """Digit images plus a little noise: the flat background of the digits
    makes ties in every MaxPool window there, where the gradient is not
    defined (finite differences disagree with any choice of the maximum,
    and two implementations may choose differently)."""
    return X + np.float32(0.05) * rng.standard_normal(X.shape).astype(np.float32)


def _user_modules():
    """name -> (builder of the float32 module, inputs maker rng -> {name: array})."""
    import torch
    from torch import nn

    class CnnDigits(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
            self.flatten = nn.Flatten()
            self.dropout = nn.Dropout(0.25)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.dropout(self.flatten(self.features(x))))

        def folded(self):
            """A copy with the (eval-mode) BatchNorm folded into the first Conv."""
            import copy

            from torch.nn.utils.fusion import fuse_conv_bn_eval

            other = copy.deepcopy(self).eval()
            other.features[0] = fuse_conv_bn_eval(other.features[0], other.features[1])
            other.features[1] = nn.Identity()
            return other

    class EmbeddingMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(7, 3)
            self.mlp = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, num, cat):
            return self.mlp(torch.cat([num, self.embedding(cat).flatten(1)], dim=1))

    class RnnClassifier(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn(8, 16, batch_first=True)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    class TransformerEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoderLayer(
                d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.encoder(x).mean(dim=1))

    def digit_images(rng):
        X, _ = _digits()
        return {"input": _jittered(X[rng.choice(len(X), N_ROWS, replace=False)], rng)
                .reshape(-1, 1, 8, 8)}

    def digit_rows(rng):
        X, _ = _digits()
        return {"input": X[rng.choice(len(X), N_ROWS, replace=False)].reshape(-1, 8, 8)}

    def num_and_cat(rng):
        return {"num": rng.standard_normal((N_ROWS, 4)).astype(np.float32),
                "cat": rng.integers(0, 7, (N_ROWS, 2)).astype(np.int64)}

    def sequence(rng):
        return {"input": rng.standard_normal((N_ROWS, 6, 16)).astype(np.float32)}

    return {
        "cnn_digits": (CnnDigits, digit_images),
        "embedding_mlp": (EmbeddingMlp, num_and_cat),
        "lstm_classifier": (lambda: RnnClassifier(nn.LSTM), digit_rows),
        "gru_classifier": (lambda: RnnClassifier(nn.GRU), digit_rows),
        "transformer_encoder": (TransformerEncoder, sequence),
    }


def _build_user_module(name, seed):
    """The float32 module, every parameter element distinct; normalisation
    layers get non-trivial scales, shifts and running statistics (identical
    ones of several layers would be merged into one initializer)."""
    import torch
    from torch import nn

    build, make_inputs = _user_modules()[name]
    torch.manual_seed(seed)
    module = build()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.BatchNorm2d, nn.LayerNorm)):
                n = layer.weight.numel()
                layer.weight.copy_(1 + 0.3 * torch.randn(n, generator=gen))
                layer.bias.copy_(0.2 * torch.randn(n, generator=gen))
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                layer.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        seen = set()
        for param in module.parameters():
            flat = param.view(-1)
            for k in range(flat.numel()):
                value = np.float32(flat[k].item())
                while float(value) in seen:
                    value = np.nextafter(value, np.float32(np.inf))
                seen.add(float(value))
                flat[k] = float(value)
    return module, make_inputs


def _export_user_module(module, inputs, dynamo, training=False):
    """Export ``module`` (example inputs: dict name -> array) with a dynamic
    batch; return the ModelProto."""
    import torch

    names = list(inputs)
    args = tuple(torch.from_numpy(v[:2]) for v in inputs.values())
    # The eval-mode "fast path" of TransformerEncoderLayer (one fused
    # torch._transformer_encoder_layer_fwd, no ONNX export) is off: the
    # exporters then see the plain attention, layer-norm and feed-forward
    # operations.  (Parameters requiring gradients, the default, keep it off
    # too; this says so whatever the grad mode.)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return _export(module, args, names, dynamo, training)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export(module, args, names, dynamo, training):
    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        if dynamo:
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=18, input_names=names,
                output_names=["output"], dynamic_shapes=tuple({0: batch} for _ in names),
                verbose=False)
            return program.model_proto
        buffer = io.BytesIO()
        options = {"training": torch.onnx.TrainingMode.TRAINING,
                   "do_constant_folding": False} if training else {}
        torch.onnx.export(
            module, args, buffer, dynamo=False, opset_version=17, input_names=names,
            output_names=["output"],
            dynamic_axes={**{n: {0: "batch"} for n in names}, "output": {0: "batch"}},
            **options)
        return onnx.load_from_string(buffer.getvalue())


def _match_initializers(model, module):
    """{initializer: how to read its value from ``module``'s parameters}, or
    None when the parameters are not exactly the graph's trained values.

    A value is ``("param", name)`` (allclose, same shape) or ``("elements",
    flat indices into the concatenated parameters)``.  Initializers matching
    no parameter (buffers, the exporter's constants) are left out.
    """
    from onnx import TensorProto, numpy_helper

    params = dict(module.named_parameters())
    offsets, start = {}, 0
    for pname, param in params.items():
        offsets[pname] = start
        start += param.numel()
    flat = np.concatenate([p.detach().numpy().astype(np.float32).ravel()
                           for p in params.values()])
    position = {float(v): k for k, v in enumerate(flat)}
    assert len(position) == flat.size, "parameter values must be distinct"
    used = np.zeros(flat.size, dtype=int)
    matches = {}
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(init)
        same = [p for p, t in params.items() if tuple(t.shape) == value.shape
                and np.allclose(t.detach().numpy(), value, rtol=1e-5, atol=1e-6)]
        if len(same) == 1:
            matches[init.name] = ("param", same[0])
            used[offsets[same[0]]:offsets[same[0]] + value.size] += 1
            continue
        found = [position.get(float(v)) for v in value.ravel()]
        if value.size and all(k is not None for k in found):
            matches[init.name] = ("elements", np.array(found))
            used[np.array(found)] += 1
    return matches if np.all(used == 1) else None


def _user_reference(name, model, module, inputs, rng, train=False):
    """npz content of the graph ``model`` exported from ``module``."""
    import copy

    import torch
    from onnx import numpy_helper

    candidates = [module]
    if hasattr(module, "folded") and not train:
        candidates.append(module.folded())
    for reference in candidates:
        matches = _match_initializers(model, reference)
        if matches is not None:
            break
    else:
        raise RuntimeError(f"{name}: the graph's initializers are not the module's parameters "
                           f"{[i.name for i in model.graph.initializer]}")
    double = copy.deepcopy(reference).double()
    if train:
        double.train()
        double.dropout.p = 0.0  # the test sets the graph's Dropout ratio to 0 too
    else:
        double.eval()
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    params = dict(double.named_parameters())
    with torch.no_grad():  # the graph's exact values for parameters matched by closeness
        for init_name, (kind, what) in matches.items():
            if kind == "param":
                params[what].copy_(torch.from_numpy(inits[init_name].astype(np.float64)))
    torch_inputs = {}
    for input_name, value in inputs.items():
        if value.dtype.kind == "f":
            torch_inputs[input_name] = torch.from_numpy(
                value.astype(np.float64)).requires_grad_(True)
        else:
            torch_inputs[input_name] = torch.from_numpy(value)
    Y = double(*torch_inputs.values())
    dY = rng.standard_normal(tuple(Y.shape))
    (Y * torch.from_numpy(dY)).sum().backward()
    flat_grad = np.concatenate([p.grad.numpy().ravel() for p in params.values()])
    content = {"dY": dY.astype(np.float32), "output": np.array("output"),
               "torch.Y": Y.detach().numpy(), "weights": np.array(list(matches))}
    if list(inputs) == ["input"]:
        content["X"] = inputs["input"]
        content["torch.X"] = torch_inputs["input"].grad.numpy()
    else:
        for input_name, value in inputs.items():
            content[f"input.{input_name}"] = value
            if value.dtype.kind == "f":
                content[f"torch.input.{input_name}"] = torch_inputs[input_name].grad.numpy()
    for init_name, (kind, what) in matches.items():
        if kind == "param":
            content[f"torch.{init_name}"] = params[what].grad.numpy()
        else:
            content[f"torch.{init_name}"] = flat_grad[what].reshape(inits[init_name].shape)
    if train:
        content["dropout_ratio"] = np.array(0.0, dtype=np.float32)
    return content


def _reset_buffers(model, module):
    """The training-mode trace ran one forward pass in training mode, which
    moved BatchNorm's running statistics before they were written: the
    graph gets the module's (those of the eval-mode exports and of
    ``cnn_digits_train_step.npz``)."""
    from onnx import numpy_helper

    buffers = {k: v.numpy() for k, v in module.named_buffers() if v.dtype.is_floating_point}
    for init in model.graph.initializer:
        if init.name in buffers:
            init.CopyFrom(numpy_helper.from_array(buffers[init.name].astype(np.float32),
                                                  init.name))


def _user_graphs(seed):
    """Yield (name, model, npz content) for every user model and exporter."""
    import copy

    for k, base in enumerate(USER_MODELS):
        module, make_inputs = _build_user_module(base, seed + k)
        rng = np.random.default_rng(seed + k)
        inputs = make_inputs(rng)
        variants = [(f"torch_{base}", False, False), (f"torch_{base}_dynamo", True, False)]
        if base == "cnn_digits":
            variants.append((f"torch_{base}_train", False, True))
        for name, dynamo, train in variants:
            exported = copy.deepcopy(module).train(train)  # a training trace moves BN's stats
            try:
                model = _export_user_module(exported, inputs, dynamo, training=train)
            except Exception as exc:
                print(f"{name:28s} NOT EXPORTED  {type(exc).__name__}: {str(exc)[:300]}")
                continue
            if train:
                _reset_buffers(model, module)
            model.graph.name = name
            content = _user_reference(name, model, module, inputs,
                                      np.random.default_rng(rng.integers(1 << 31)), train)
            yield name, model, content


def cnn_digits_train_step(seed):
    """One SGD step of cnn_digits in training mode with a known Dropout mask
    (``cnn_digits_train_step.npz``), keyed by the initializer names of
    ``torch_cnn_digits_train.onnx`` (the TorchScript exporter keeps the
    parameter and buffer names there).

    Keys: ``X`` (16, 1, 8, 8) float32 (digits, jittered), ``y`` int64 labels, ``mask`` (16, 64)
    0/1 float32 (Dropout's input is the flattened (16, 64) features; kept
    elements are scaled by 1 / (1 - p), p = ``dropout_p``), ``lr``,
    ``initial.<name>`` and ``stepped.<name>`` for every parameter and the
    BatchNorm running statistics, ``loss`` (before the step), and
    ``eval_output``: the eval-mode logits on X after the step.
    """
    import torch
    from torch import nn

    module, _ = _build_user_module("cnn_digits", seed)
    X_all, y_all = _digits()
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(X_all), 16, replace=False)
    X = _jittered(X_all[picked], rng).reshape(16, 1, 8, 8)
    y = y_all[picked].astype(np.int64)
    p = module.dropout.p
    mask = (rng.random((16, 64)) >= p).astype(np.float32)
    content = {"X": X, "y": y, "mask": mask, "dropout_p": np.array(p, dtype=np.float32),
               "lr": np.array(0.1, dtype=np.float32)}
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()
             if "num_batches_tracked" not in k}
    content.update({f"initial.{k}": v for k, v in state.items()})

    def masked(layer, args, out):
        return args[0] * torch.from_numpy(mask) / (1 - p)

    hook = module.dropout.register_forward_hook(masked)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0)
    optimizer.zero_grad()
    loss = nn.CrossEntropyLoss()(module(torch.from_numpy(X)), torch.from_numpy(y))
    loss.backward()
    optimizer.step()
    hook.remove()
    content["loss"] = np.array(loss.item(), dtype=np.float32)
    content.update({f"stepped.{k}": v.detach().numpy().copy()
                    for k, v in module.state_dict().items() if "num_batches_tracked" not in k})
    module.eval()
    with torch.no_grad():
        content["eval_output"] = module(torch.from_numpy(X)).numpy()
    return content


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
    print(f"{name:34s} {size:6d} B  {' '.join(ops)}")


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
    for name, model, content in _user_graphs(USER_SEED):
        _save(name, model, content)
    np.savez(os.path.join(ZOO_DIR, "cnn_digits_train_step.npz"), **cnn_digits_train_step(USER_SEED))
    os.makedirs(WITH_LOSS_DIR, exist_ok=True)
    for name, model in loss_graphs().items():
        with open(os.path.join(WITH_LOSS_DIR, f"{name}.onnx"), "wb") as f:
            f.write(model.SerializeToString())


# -- graphs that carry their own loss -----------------------------------------------------------
WITH_LOSS_DIR = os.path.join(ZOO_DIR, "with_loss")


def loss_graphs(seed=USER_SEED):
    """A PyTorch module returning its prediction and its cross-entropy loss
    (the graph onnxfit trains with ``loss_output=``), from both exporters:
    ``{name: ModelProto}`` with inputs ``X`` (N, 4) and ``target`` (N,)
    int64, outputs ``pred`` (N, 3) and ``loss`` (a scalar)."""
    import onnx
    import torch

    torch.manual_seed(seed)

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                           torch.nn.Linear(8, 3))
            self.loss = torch.nn.CrossEntropyLoss()

        def forward(self, x, target):
            pred = self.net(x)
            return pred, self.loss(pred, target)

    module = WithLoss()
    args = (torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))
    names = ["X", "target"]
    graphs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=17,
                          input_names=names, output_names=["pred", "loss"],
                          dynamic_axes={"X": {0: "batch"}, "target": {0: "batch"},
                                        "pred": {0: "batch"}})
        graphs["torch_mlp_cross_entropy"] = onnx.load_from_string(buffer.getvalue())
        batch = torch.export.Dim("batch")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=18, input_names=names,
            output_names=["pred", "loss"], dynamic_shapes=({0: batch}, {0: batch}),
            verbose=False)
        graphs["torch_mlp_cross_entropy_dynamo"] = program.model_proto
    return graphs


# -- references from onnxruntime-training 1.19.2 ------------------------------------------------
def set_dropout_ratio(model, ratio):
    """Every Dropout of ``model`` (changed in place) gets ratio ``ratio``, a
    Constant node's value (not an initializer: that would be trained)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    name = "zoo.dropout_ratio"
    for node in graph.node:
        if node.op_type == "Dropout":
            del node.input[1:2]
            node.input.insert(1, name)
    graph.node.insert(0, helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(ratio, np.float32))))
    return model


def _gradient_case(name, zoo_dir=ZOO_DIR):
    """(model, data, weights_to_train, feed) of a zoo graph as the tests
    differentiate it: the training-mode export gets its references' Dropout
    ratio, ``weights`` (where saved) names the weights, and ``feed`` is X
    for one input, else the dict graph input name -> array."""
    import onnx

    data = dict(np.load(os.path.join(zoo_dir, f"{name}.npz")))
    model = onnx.load(os.path.join(zoo_dir, f"{name}.onnx"))
    if "dropout_ratio" in data:
        model = set_dropout_ratio(model, float(data["dropout_ratio"]))
    weights = [str(w) for w in data["weights"]] if "weights" in data else None
    if "X" in data:
        feed = data["X"]
    else:
        feed = {k[len("input."):]: v for k, v in data.items() if k.startswith("input.")}
    return model, data, weights, feed


def _input_gradient_keys(feed):
    """npz keys of the input gradients: ``X``, or ``input.<name>`` per float input."""
    if not isinstance(feed, dict):
        return {"X": None}
    return {f"input.{k}": k for k, v in feed.items() if v.dtype.kind == "f"}


def ort_training_gradients(name, zoo_dir=ZOO_DIR):
    """Gradients of sum(Y * dY) with the 1.19.2 backend through
    :class:`onnxfit.OnnxFunction`, as the npz content (weights, then ``X`` or
    ``input.<name>`` per float input).

    TODO: graphs with several inputs need OnnxFunction to take a dict of
    inputs and return a dict of input gradients (being built)."""
    from onnxfit import OnnxFunction

    model, data, weights, feed = _gradient_case(name, zoo_dir)
    f = OnnxFunction(model, weights_to_train=weights, output_name=str(data["output"]),
                     gradient_backend="onnxruntime-training", input_gradient=True)
    f.forward(feed, f.initial_weights())
    grads, grad_inputs = f.backward(data["dY"], return_input_gradient=True)
    content = {w: np.asarray(grads[w]) for w in f.weight_names}
    for key, input_name in _input_gradient_keys(feed).items():
        content[key] = np.asarray(grad_inputs if input_name is None else grad_inputs[input_name])
    return content


def ort_training_whole_graph_gradients(name, zoo_dir=ZOO_DIR):
    """The same gradients from the unsplit 1.19.2 gradient graph (one session).

    The fallback when the forward/backward split that OnnxFunction runs
    does not load: the gradient is still 1.19.2's.
    """
    from onnxfit.gradient import build_vjp
    from onnxfit.model import OnnxModel, normalise_model
    from onnxfit.sessions import make_session

    graph, data, weights, feed = _gradient_case(name, zoo_dir)
    model = OnnxModel(normalise_model(graph), weights, output_name=str(data["output"]))
    inputs = {model.input_name: feed} if not isinstance(feed, dict) else feed
    keys = _input_gradient_keys(feed)
    differentiated = [model.input_name if n is None else n for n in keys.values()]
    cotangent = "zoo.cotangent"
    gradient = build_vjp(model.forward_model(), {model.output_name: cotangent},
                         model.weight_names + differentiated, backend="onnxruntime-training")
    session = make_session(gradient.model)
    feeds = {**inputs, cotangent: data["dY"], **model.initial_weights()}
    names = [gradient.gradient_names[w] for w in model.weight_names + differentiated]
    values = session.run(names, feeds)
    content = dict(zip(model.weight_names + list(keys), values))
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
