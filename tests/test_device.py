"""The ``device`` parameter: parsing and refusal on the CPU, the GPU code
path (tensors in OrtValue memory, bound by address) run on the CPU, and
training on a GPU where onnxruntime's CUDA provider is there."""

import os

import numpy as np
import onnxruntime
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.datasets import load_digits

import onnxfit
from onnxfit.engines import make_engine
from onnxfit.engines.buffers import DeviceArray, EngineMemory
from onnxfit.sessions import CPU, Device, check_device, parse_device

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo")
CNN_TRAIN = os.path.join(ZOO, "torch_cnn_digits_train.onnx")  # BatchNorm and Dropout
HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.parametrize("text, expected", [
    ("cpu", Device("cpu", 0)), ("cuda", Device("cuda", 0)), ("cuda:1", Device("cuda", 1)),
    (" CUDA:0 ", Device("cuda", 0)),
])
def test_device_names(text, expected):
    assert parse_device(text) == expected
    assert parse_device(expected) is expected


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cpu:1", "", "cuda:-1"])
def test_other_device_names_are_refused(text):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        parse_device(text)


def _digits(n=240):
    X, y = load_digits(return_X_y=True)
    return (X[:n] / 16).astype(np.float32).reshape(-1, 1, 8, 8), y[:n]


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal where onnxruntime has no CUDA provider")
def test_cuda_without_the_cuda_build_is_refused_before_training():
    X, y = _digits(60)
    fitted = onnxfit.OnnxSGDClassifier(CNN_TRAIN, max_iter=1, tol=None, random_state=0).fit(X, y)
    before = {k: v.copy() for k, v in fitted.weights_.items()}
    fitted.set_params(device="cuda:0")
    with pytest.raises(ValueError, match="device='cuda:0' needs onnxruntime's CUDA build.*"
                                         r"onnxfit\[gpu\]"):
        fitted.partial_fit(X, y)
    for name, value in before.items():
        assert_array_equal(fitted.weights_[name], value)
    with pytest.raises(ValueError, match="device must be"):
        onnxfit.OnnxSGDClassifier(CNN_TRAIN, device="tpu").fit(X, y)


def test_device_is_a_parameter_that_clones_and_pickles():
    import pickle

    clf = onnxfit.OnnxSGDRegressor(device="cuda:1")
    assert clone(clf).device == "cuda:1"
    assert pickle.loads(pickle.dumps(clf)).get_params()["device"] == "cuda:1"


def test_engine_memory_views_bind_by_address():
    memory = EngineMemory(CPU, ortvalues=True)
    flat = memory.zeros((10,), np.float32)
    assert isinstance(flat, DeviceArray)
    memory.write(flat, np.arange(10, dtype=np.float32))
    view = memory.view(flat, 4, 10, (2, 3))
    assert_array_equal(memory.read(view), np.arange(4, 10, dtype=np.float32).reshape(2, 3))
    assert view.address == flat.address + 4 * 4


@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_the_gpu_code_path_gives_the_cpu_results(engine):
    """Engines keeping every tensor in OrtValues bound by address (as on a
    GPU) train exactly as with numpy buffers: weights, update state (a
    momentum), running statistics, masks and a penalty included."""
    X, y = _digits()
    clf = onnxfit.OnnxSGDClassifier(CNN_TRAIN, max_iter=1, tol=None, random_state=0,
                                    batch_size=32, engine=engine)
    clf.fit(X, y)
    problem = clf._build_problem()
    results = []
    for ortvalues in (False, True):
        engine_object = make_engine(engine, problem, EngineMemory(CPU, ortvalues=ortvalues))
        engine_object.set_state(clf.weights_, clf._update_state, clf.running_statistics_)
        inputs = {"input": X}
        labels = clf._encode_labels(clf._class_index(y))
        rng = np.random.RandomState(0)
        order = rng.permutation(len(X))
        losses = [engine_object.run_epoch(inputs, labels, None, order, 32,
                                          np.full(8, 0.05), rng=rng) for _ in range(2)]
        results.append((losses, engine_object.get_state()))
    (losses_np, state_np), (losses_ort, state_ort) = results
    assert_allclose(losses_ort, losses_np, rtol=1e-6)
    for part_np, part_ort in zip(state_np, state_ort):
        for name in part_np:
            if isinstance(part_np[name], dict):
                for key in part_np[name]:
                    assert_allclose(part_ort[name][key], part_np[name][key], rtol=1e-5, atol=1e-7)
            else:
                assert_allclose(part_ort[name], part_np[name], rtol=1e-5, atol=1e-7)
    assert not np.allclose(state_np[2]["features.1.running_mean"],
                           clf.running_statistics_["features.1.running_mean"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and onnxruntime-gpu (CUDAExecutionProvider)")
@pytest.mark.parametrize("engine", ["fused", "forward_backward"])
def test_training_on_the_gpu_gives_the_cpu_weights(engine):
    X, y = _digits()
    params = dict(max_iter=3, tol=None, random_state=0, batch_size=32, engine=engine)
    cpu = onnxfit.OnnxSGDClassifier(CNN_TRAIN, **params).fit(X, y)
    gpu = onnxfit.OnnxSGDClassifier(CNN_TRAIN, device="cuda", **params).fit(X, y)
    check_device("cuda")
    for name in cpu.weights_:
        assert_allclose(gpu.weights_[name], cpu.weights_[name], rtol=1e-3, atol=1e-5)
    assert_array_equal(gpu.predict(X), cpu.predict(X))
