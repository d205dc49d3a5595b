"""Untrusted models (issue 13): external data outside the model's folder,
declared sizes the data cannot back, and paths or bytes that are not ONNX
models are refused by onnxfit.loading.load_onnx -- before any external file
is opened, before anything is allocated, before onnxruntime -- with a
ValueError that names the problem and says what to do; the estimator,
OnnxFunction, check_gradients and the command line all load through it."""

import builtins
import os

import numpy as np
import onnx
import onnx.external_data_helper
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from onnxfit import OnnxFunction, OnnxSGDRegressor
from onnxfit.cli import main
from onnxfit.gradient_check import check_gradients
from onnxfit.loading import load_onnx
from tests.graphs import mlp_graph

OUTSIDE = "outside the model's folder"


def _data(n=32, n_in=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in)).astype(np.float32)
    return X, (X @ rng.normal(size=n_in)).astype(np.float32)


def _small():
    return mlp_graph(3, (4,), 1)


@pytest.fixture
def folders(tmp_path):
    """The model's folder, and a secret file beside it (outside it) whose
    bytes would make a valid W0 if they were read."""
    inside = tmp_path / "model"
    inside.mkdir()
    secret = tmp_path / "secret.bin"
    w0 = numpy_helper.to_array(_small().graph.initializer[0])
    secret.write_bytes(w0.tobytes())
    return inside, secret


@pytest.fixture
def opened(monkeypatch):
    """The paths opened (builtins.open, os.open) while the test runs; onnx's
    own external-data readers fail the test if called."""
    paths = []

    def record(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                paths.append(os.path.realpath(os.fsdecode(file)))
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", record(builtins.open))
    monkeypatch.setattr(os, "open", record(os.open))

    def forbidden(*args, **kwargs):
        raise AssertionError("onnx's external-data reader was called")

    for name in ("load_external_data_for_model", "load_external_data_for_tensor",
                 "_read_external_data_bytes"):
        if hasattr(onnx.external_data_helper, name):
            monkeypatch.setattr(onnx.external_data_helper, name, forbidden)
    return paths


def _with_external_w0(folder, location, offset=None, length=None, dims=None, name="m.onnx"):
    """The small MLP at folder/name with W0's data said to be at
    ``location`` (nothing else written)."""
    model = _small()
    w0 = model.graph.initializer[0]
    if dims is not None:
        del w0.dims[:]
        w0.dims.extend(dims)
    w0.ClearField("raw_data")
    w0.ClearField("float_data")
    w0.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = w0.external_data.add()
            entry.key, entry.value = key, str(value)
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _refused(path, *fragments):
    with pytest.raises(ValueError) as info:
        load_onnx(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- external data inside the folder loads and trains ------------------------

def test_external_data_in_its_folder_loads_and_trains(tmp_path):
    model = _small()
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    on_disk = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in on_disk.graph.initializer)

    loaded = load_onnx(path)
    assert not any(t.external_data for t in loaded.graph.initializer)
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected[tensor.name])

    X, y = _data()
    estimator = OnnxSGDRegressor(str(path), random_state=0, max_iter=2, tol=None,
                                 batch_size=16).fit(X, y)
    assert estimator.predict(X).shape == (len(X),)


def test_a_link_inside_the_folder_and_dotdot_back_in_are_fine(folders):
    inside, _ = folders
    (inside / "sub").mkdir()
    w0 = numpy_helper.to_array(_small().graph.initializer[0])
    (inside / "sub" / "w0.bin").write_bytes(w0.tobytes())
    os.symlink(inside / "sub" / "w0.bin", inside / "link.bin")
    for location in ("sub/../sub/w0.bin", "link.bin"):
        loaded = load_onnx(_with_external_w0(inside, location))
        np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), w0)


# -- outside the folder: refused before the file is opened -------------------

@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused_unread(folders, opened, kind):
    inside, secret = folders
    if kind == "traversal":
        location, reason = "../secret.bin", "'..' leads out of the folder"
    elif kind == "absolute":
        location, reason = str(secret), "an absolute path"
    else:
        os.symlink(secret, inside / "innocent.bin")
        location, reason = "innocent.bin", "a symbolic link that resolves to"
    path = _with_external_w0(inside, location)
    _refused(path, OUTSIDE, reason, "initializer 'W0'", repr(location),
             "must sit in the model's folder", "refused it before reading anything")
    assert str(path) in opened  # the model file itself is read ...
    assert os.path.realpath(secret) not in opened  # ... the secret is not


def test_no_external_data_for_a_model_proto_or_bytes(folders, opened):
    inside, secret = folders
    proto = onnx.load(str(_with_external_w0(inside, "../secret.bin")),
                      load_external_data=False)
    before = proto.SerializeToString()
    for passed in (proto, before):
        with pytest.raises(ValueError, match="Pass the path of the .onnx file instead"):
            load_onnx(passed)
    assert proto.SerializeToString() == before
    assert os.path.realpath(secret) not in opened


def test_external_tensors_in_attributes_subgraphs_and_functions_are_checked(folders, opened):
    inside, secret = folders

    def external(name):
        tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[12],
                                  data_location=TensorProto.EXTERNAL)
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", "../secret.bin"
        return tensor

    def constant(name):
        return onnx.helper.make_node("Constant", [], [name], value=external(name))

    body = onnx.helper.make_graph(
        [constant("c")], "branch", [],
        [onnx.helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    function = onnx.helper.make_function("local", "F", [], ["f"], [constant("f")],
                                         [onnx.helper.make_opsetid("", 17)])
    cases = {
        "top.onnx": ([constant("top")], [], "tensor 'top', attribute 'value'"),
        "nested.onnx": ([onnx.helper.make_node("If", ["cond"], ["u"], then_branch=body,
                                                else_branch=body)], [], "subgraph"),
        "function.onnx": ([], [function], "function 'F'"),
    }
    for name, (nodes, functions, where) in cases.items():
        model = _small()
        model.graph.node.extend(nodes)
        model.functions.extend(functions)
        _refused(_write(inside / name, model), where, OUTSIDE, "'../secret.bin'")
    sparse = _small()
    values = external("sv")
    indices = numpy_helper.from_array(np.arange(12, dtype=np.int64), "si")
    sparse.graph.sparse_initializer.append(
        onnx.helper.make_sparse_tensor(values, indices, [100]))
    _refused(_write(inside / "sparse.onnx", sparse), "sparse initializer 'sv'", OUTSIDE)
    assert os.path.realpath(secret) not in opened


# -- declared sizes the data cannot back ------------------------------------

def _huge_w0(model, raw_data=b""):
    w0 = model.graph.initializer[0]
    w0.ClearField("raw_data")
    w0.ClearField("float_data")
    del w0.dims[:]
    w0.dims.extend([10**6, 10**6])  # 10**12 floats, 4 TB
    w0.raw_data = raw_data
    return model


def test_huge_declared_dims_without_data_are_refused(tmp_path, monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("numpy_helper.to_array was called")

    monkeypatch.setattr(numpy_helper, "to_array", no_allocation)
    proto = _huge_w0(_small())
    before = proto.SerializeToString()
    path = tmp_path / "huge.onnx"
    path.write_bytes(before)
    for passed in (proto, before, path):
        with pytest.raises(ValueError) as info:
            load_onnx(passed)
        message = str(info.value)
        for fragment in ("'W0'", "[1000000, 1000000]", "1000000000000 elements, 4 TB",
                         "holds data for 0 element(s)", "before allocating"):
            assert fragment in message, message
    assert proto.SerializeToString() == before
    # Some data, still far less than declared; typed fields count too.
    _refused(_write(tmp_path / "some.onnx", _huge_w0(_small(), b"\0" * 64)),
             "holds data for 16 element(s)")
    typed = _huge_w0(_small())
    typed.graph.initializer[0].float_data.extend([1.0] * 5)
    _refused(_write(tmp_path / "typed.onnx", typed), "holds data for 5 element(s)")
    negative = _small()
    negative.graph.initializer[0].dims[0] = -3
    _refused(_write(tmp_path / "negative.onnx", negative), "negative dimension")


def test_huge_constant_in_a_subgraph_is_found(tmp_path):
    model = _small()
    huge = onnx.TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[10**12])
    const = onnx.helper.make_node("Constant", [], ["c"], value=huge)
    body = onnx.helper.make_graph(
        [const], "branch", [], [onnx.helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    model.graph.node.append(onnx.helper.make_node(
        "If", ["cond"], ["unused"], then_branch=body, else_branch=body))
    _refused(_write(tmp_path / "nested.onnx", model), "tensor 'big'", "subgraph",
             "1000000000000 elements", "before allocating")


def _write(path, model):
    path.write_bytes(model.SerializeToString())
    return path


def test_huge_declared_external_dims_are_refused(folders, opened):
    inside, _ = folders
    (inside / "w.bin").write_bytes(b"\0" * 48)
    path = _with_external_w0(inside, "w.bin", dims=[10**6, 10**6])
    _refused(path, "'W0'", "1000000000000 elements, 4 TB", "holds 48 bytes",
             "before allocating")
    assert os.path.realpath(inside / "w.bin") not in opened


def test_external_length_beyond_the_file_is_refused(folders, opened):
    inside, _ = folders
    (inside / "w.bin").write_bytes(b"\0" * 48)
    for offset, length in ((0, 10**15), (40, 48), (100, None)):
        path = _with_external_w0(inside, "w.bin", offset=offset, length=length)
        _refused(path, "'W0'", "which has only 48 bytes", "refuses it before reading")
    path = _with_external_w0(inside, "w.bin", offset="-1")
    _refused(path, "offset", "not a non-negative integer")
    # A window smaller than W0 (3 x 4 floats, 48 bytes).
    _refused(_with_external_w0(inside, "w.bin", offset=8), "holds 40 bytes")
    assert os.path.realpath(inside / "w.bin") not in opened


def test_external_file_missing_or_not_a_file(folders):
    inside, _ = folders
    _refused(_with_external_w0(inside, "absent.bin"), "'absent.bin'", "cannot be found")
    (inside / "adir").mkdir()
    _refused(_with_external_w0(inside, "adir"), "is not a regular file")
    os.mkfifo(inside / "fifo")  # opening it to read would block
    _refused(_with_external_w0(inside, "fifo"), "is not a regular file")


# -- paths and bytes that are not ONNX models --------------------------------

def test_bad_paths_and_bytes(tmp_path):
    valid = _small()
    for _ in range(5):  # a longer graph, so that its first half cuts into it
        valid.graph.initializer.extend([numpy_helper.from_array(
            np.ones(50, np.float32), f"pad{len(valid.graph.initializer)}")])
    data = valid.SerializeToString()
    files = {
        "truncated.onnx": data[: len(data) // 2],
        "random.onnx": np.random.default_rng(0).bytes(1000),
        "empty.onnx": b"",
        "tensor.onnx": numpy_helper.from_array(np.ones(7, np.float32), "t").SerializeToString(),
        "notes.txt": b"these are notes, not a model\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    os.mkfifo(tmp_path / "pipe.onnx")
    cases = [
        (tmp_path / "missing.onnx", ["does not exist", "pass the path of an .onnx file"]),
        (tmp_path, ["is a directory", "pass the path of the .onnx file itself"]),
        (tmp_path / "pipe.onnx", ["is not a regular file"]),
        (tmp_path / "empty.onnx", ["is empty (0 bytes)", "not an ONNX model"]),
    ]
    cases += [(tmp_path / name, ["is not an ONNX model", "Re-export the model"])
              for name in ("truncated.onnx", "random.onnx", "tensor.onnx", "notes.txt")]
    for path, fragments in cases:
        message = _refused(path, repr(str(path)), *fragments)
        assert "\n" not in message
    for content in (data[: len(data) // 2], files["random.onnx"], files["tensor.onnx"], b""):
        with pytest.raises(ValueError, match="onnx_model bytes are.* not an ONNX model"):
            load_onnx(content)
    with pytest.raises(TypeError, match="not int"):
        load_onnx(3)


_VALID = _small().SerializeToString()


@settings(database=None, derandomize=True, deadline=None, max_examples=300)
@given(cut=st.integers(0, len(_VALID) - 1),
       flips=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)),
                      max_size=4))
def test_cut_or_corrupted_bytes_load_or_raise_value_error(cut, flips):
    """Any prefix of a valid model, with a few bytes changed: a ModelProto
    whose tensors' data backs their shapes, or a ValueError -- never a
    protobuf DecodeError, a MemoryError or anything else."""
    data = bytearray(_VALID[: max(cut, 1)] if flips else _VALID[:cut])
    for position, delta in flips:
        if position < len(data):
            data[position] = (data[position] + delta) % 256
    try:
        model = load_onnx(bytes(data))
    except ValueError as exc:
        assert "ONNX model" in str(exc) or "Re-export" in str(exc) or "Pass" in str(exc)
        return
    for tensor in model.graph.initializer:
        assert tensor.data_location != TensorProto.EXTERNAL


def test_a_model_proto_is_copied_and_left_unchanged():
    proto = _small()
    before = proto.SerializeToString()
    loaded = load_onnx(proto)
    assert loaded is not proto
    loaded.graph.initializer[0].raw_data = b""
    assert proto.SerializeToString() == before


# -- every entry point loads through the same loader -------------------------

def test_estimator_function_check_gradients_and_cli_refuse(folders, opened, capsys):
    inside, secret = folders
    path = _with_external_w0(inside, "../secret.bin")
    X, y = _data()
    with pytest.raises(ValueError, match=OUTSIDE):
        OnnxSGDRegressor(str(path), max_iter=1).fit(X, y)
    with pytest.raises(ValueError, match=OUTSIDE):
        OnnxFunction(path)
    with pytest.raises(ValueError, match=OUTSIDE):
        check_gradients(str(path), X)
    assert os.path.realpath(secret) not in opened

    # The command line (what `python -m onnxfit info PATH` runs, in this
    # process for speed): a one-line error, exit status 2.
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert OUTSIDE in err and "Traceback" not in err and err.count("\n") == 1
    assert os.path.realpath(secret) not in opened
