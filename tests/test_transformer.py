"""Gradients of PyTorch transformer encoder layers exported to ONNX.

Small ``nn.TransformerEncoderLayer`` models (d_model 16, 2 heads,
feed-forward width 32, batch first) are exported with both of PyTorch's
exporters, the TorchScript one (``dynamo=False``) and the ``torch.export``
one (``dynamo=True``, which needs onnxscript); onnxfit's gradients of every
weight are compared with torch.autograd's, in float32.

The layers are exported in training mode with ``dropout=0.0``, which
computes the same function as eval mode: in eval mode under
``torch.no_grad()`` PyTorch takes its fused "fast path"
(``aten::_transformer_encoder_layer_fwd``), which the TorchScript exporter
cannot export, and which is not what a trained model is made of.  A
hand-written attention block adds what the layers do not export: Einsum,
Split, Range, Trilu, a tanh-approximated Gelu.

The exporters fold a transposed or reshaped weight into a new initializer
(``onnx::MatMul_165`` holding ``in_proj_weight.T``) and merge initializers
holding equal values (a fresh layer's LayerNorm biases and out_proj bias,
all zeros), so every parameter is first given distinct random values, and
each initializer is matched to the parameter whose values it holds,
transposed or reshaped.
"""

import io
import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch exports the transformer layers these tests differentiate")

import onnx  # noqa: E402

from onnxfit.function import OnnxFunction  # noqa: E402
from onnxfit.gradient import build_vjp  # noqa: E402
from onnxfit.sessions import make_session  # noqa: E402

D_MODEL, HEADS, FEEDFORWARD, BATCH, LENGTH, VOCABULARY = 16, 2, 32, 3, 5, 11


class Encoder(torch.nn.Module):
    """One encoder layer, with an optional mask and token embedding.

    Parameters
    ----------
    norm_first : bool
    activation : {'relu', 'gelu'}
    mask : {None, 'padding', 'causal'}
        'padding' takes a boolean key-padding mask as a second input;
        'causal' builds the triangular mask from the input's length inside
        the graph.
    embedding : bool
        Tokens (int64) go through an ``nn.Embedding`` first (an ONNX
        Gather, whose gradient adds up the rows of repeated tokens).
    """

    def __init__(self, norm_first, activation, mask=None, embedding=False):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(
            D_MODEL, HEADS, FEEDFORWARD, dropout=0.0, activation=activation, batch_first=True,
            norm_first=norm_first)
        self.embedding = torch.nn.Embedding(VOCABULARY, D_MODEL) if embedding else None
        self.mask = mask
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        self.train()  # no fast path (see the module docstring)

    def forward(self, x, padding=None):
        if self.embedding is not None:
            x = self.embedding(x)
        if self.mask == "padding":
            return self.layer(x, src_key_padding_mask=padding)
        if self.mask == "causal":
            length = x.shape[1]
            causal = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
            return self.layer(x, src_mask=causal, is_causal=True)
        return self.layer(x)


class EinsumAttention(torch.nn.Module):
    """A hand-written causal self-attention block: token and position
    embeddings (Gather, Range), q, k, v by ``chunk`` (Split or Slice),
    scores and mixing by ``torch.einsum`` (Einsum), a mask from
    ``torch.tril`` (Trilu, Not, Where), tanh-approximated GELU."""

    mask = "causal"

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCABULARY, D_MODEL)
        self.position = torch.nn.Embedding(8, D_MODEL)
        self.norm = torch.nn.LayerNorm(D_MODEL)
        self.qkv = torch.nn.Linear(D_MODEL, 3 * D_MODEL)
        self.head_scale = torch.nn.Parameter(torch.ones(HEADS))
        self.out = torch.nn.Linear(D_MODEL, D_MODEL)
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))

    def forward(self, tokens):
        batch, length = tokens.shape
        x = self.embedding(tokens) + self.position(torch.arange(length))
        q, k, v = (t.reshape(batch, length, HEADS, D_MODEL // HEADS)
                   for t in self.qkv(self.norm(x)).chunk(3, dim=-1))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.head_scale[None, :, None, None]
        keep = torch.tril(torch.ones(length, length, dtype=torch.bool))
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        mixed = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, D_MODEL)
        return x + torch.nn.functional.gelu(self.out(mixed), approximate="tanh")


def inputs_of(model):
    """The example inputs of ``model``: (tensors, names)."""
    generator = torch.Generator().manual_seed(3)
    if model.embedding is not None:
        # Repeated tokens: their embedding rows receive summed gradients.
        x = torch.tensor([[1, 4, 4, 0, 10], [4, 1, 1, 1, 3], [7, 7, 2, 9, 4]])
    else:
        x = torch.randn(BATCH, LENGTH, D_MODEL, generator=generator)
    if model.mask != "padding":
        return (x,), ["X"]
    padding = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    padding[1, 3:] = True
    padding[2, 4] = True
    return (x, padding), ["X", "padding"]


def export(model, args, names, dynamo, dynamic):
    """``model`` exported by the TorchScript (``dynamo=False``) or the
    torch.export (``dynamo=True``) exporter, batch and length symbolic when
    ``dynamic``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = None
            if dynamic:
                batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
                shapes = tuple({0: batch, 1: length} for _ in args)
            logging.disable(logging.WARNING)  # "torchvision is not installed", ...
            try:
                program = torch.onnx.export(model, args, dynamo=True, input_names=names,
                                            output_names=["Y"], dynamic_shapes=shapes,
                                            verbose=False)
            finally:
                logging.disable(logging.NOTSET)
            return program.model_proto
        buffer = io.BytesIO()
        axes = {n: {0: "batch", 1: "length"} for n in names} if dynamic else None
        torch.onnx.export(model, args, buffer, dynamo=False, input_names=names,
                          output_names=["Y"], opset_version=17, dynamic_axes=axes)
        return onnx.load_from_string(buffer.getvalue())


def match_parameters(model, onnx_model):
    """Initializer name -> (parameter name, layout) for every parameter;
    layout is how the initializer holds it: 'same', 'transposed', or
    'reshaped' (a constant-folded Unsqueeze or Reshape).

    Raises
    ------
    AssertionError
        When a parameter is held by no initializer.
    """
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in onnx_model.graph.initializer
                    if i.data_type == onnx.TensorProto.FLOAT and i.dims}
    matches = {}
    for name, parameter in model.named_parameters():
        value = parameter.detach().numpy()
        for init, array in initializers.items():
            if array.shape == value.shape and np.array_equal(array, value):
                matches[init] = (name, "same")
                break
            if value.ndim == 2 and array.shape == value.T.shape and np.array_equal(array, value.T):
                matches[init] = (name, "transposed")
                break
            if array.size == value.size and np.array_equal(array.ravel(), value.ravel()):
                matches[init] = (name, "reshaped")
                break
        else:
            raise AssertionError(f"no initializer of the exported graph holds {name}")
    return matches


def torch_gradients(model, args, cotangent):
    model.zero_grad()
    output = model(*args)
    (output * torch.from_numpy(cotangent)).sum().backward()
    return output.detach().numpy(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def assert_gradients_match(got, expected, matches, what):
    assert set(got) == set(matches)
    for init, (name, layout) in matches.items():
        target = expected[name].T if layout == "transposed" else expected[name]
        target = target.reshape(got[init].shape)
        error = float(np.abs(got[init] - target).max()) / float(np.abs(target).max())
        assert error <= 1e-4, f"{what}: gradient of {name} ({init}) off by {error:.2e} (relative)"


#: Each value of norm_first, activation, mask and embedding, static and
#: symbolic shapes, in few models: the torch.export exporter takes seconds
#: per model.
VARIANTS = {
    # name: (model, batch and length symbolic)
    "post-norm-relu-padding": (lambda: Encoder(False, "relu", "padding"), False),
    "pre-norm-gelu-causal-dynamic": (lambda: Encoder(True, "gelu", "causal"), True),
    "post-norm-gelu-embedding-padding-dynamic": (
        lambda: Encoder(False, "gelu", "padding", embedding=True), True),
    "pre-norm-relu": (lambda: Encoder(True, "relu"), False),
    # Symbolic lengths: a static one folds the position embedding's lookup away.
    "einsum-attention-dynamic": (EinsumAttention, True),
}


def exporter(dynamo):
    if dynamo:
        pytest.importorskip(
            "onnxscript", reason="torch.onnx.export(dynamo=True) needs the onnxscript package")
    return dynamo


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_layer_gradients_match_torch(variant, dynamo):
    make, dynamic = VARIANTS[variant]
    model = make()
    args, names = inputs_of(model)
    onnx_model = export(model, args, names, exporter(dynamo), dynamic)
    if isinstance(model, EinsumAttention):  # what the block is there for
        assert {"Einsum", "Trilu", "Range"} <= {n.op_type for n in onnx_model.graph.node}
    matches = match_parameters(model, onnx_model)
    cotangent = np.random.default_rng(5).standard_normal((BATCH, LENGTH, D_MODEL)).astype(
        np.float32)
    expected_output, expected = torch_gradients(model, args, cotangent)

    gradient = build_vjp(onnx_model, {"Y": "dY"}, list(matches))
    session = make_session(gradient.model)
    feeds = {name: arg.numpy() for name, arg in zip(names, args)}
    wanted = ["Y"] + [gradient.gradient_names[w] for w in matches]
    output, *grads = session.run(wanted, {**feeds, "dY": cotangent})
    np.testing.assert_allclose(output, expected_output, rtol=1e-4, atol=1e-5)
    assert_gradients_match(dict(zip(matches, grads)), expected, matches, variant)

    if len(names) == 1 and feeds["X"].dtype == np.float32:
        # The same through OnnxFunction: forward, then backward in a second
        # session, the graph first normalised as the estimators do.  (Token
        # inputs are left out: OnnxFunction takes X as float.)
        function = OnnxFunction(onnx_model, weights_to_train=list(matches), n_threads=1)
        function.forward(feeds["X"], function.initial_weights())
        assert_gradients_match(function.backward(cotangent), expected, matches,
                               f"{variant} through OnnxFunction")
