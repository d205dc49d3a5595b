"""Loading ONNX models, which may come from anyone.

:func:`load_onnx` turns what the user passed as ``onnx_model`` (a
``ModelProto``, serialized bytes or a path) into a private ``ModelProto``,
and refuses, with a ``ValueError`` that names the problem and says what to
do, before onnxruntime or numpy sees the model:

* a path that does not exist, is a directory or not a regular file, an
  empty file, bytes or a file that do not parse as an ONNX model (truncated,
  corrupt, another format);
* external data outside the model file's own folder: an absolute
  ``location``, ``..`` leading out of the folder, a symbolic link pointing
  out -- checked on the resolved path (``os.path.realpath``) before any
  external file is opened;
* external data for a ``ModelProto`` or bytes, which have no folder to read
  it from (pass the file's path instead);
* declared sizes that the data cannot back: a tensor whose shape asks for
  more elements than its in-model data holds (a 10**12-element initializer
  with empty ``raw_data``), or more bytes than its external file (or the
  ``offset``/``length`` window of it) holds -- compared before anything is
  allocated or read.

External data is read here (not by ``onnx.load``), file by file, from the
already-checked resolved paths, opened without following a final symbolic
link and re-checked (regular file, same file, size) on the open descriptor,
so the checks do not depend on the installed onnx's own.  The user's
``ModelProto`` is only read, never changed.
"""

import math
import os
import stat

import onnx
from onnx import TensorProto

__all__ = ["load_onnx"]

# Bits of one element of each tensor data type (names that an older onnx
# lacks are skipped).  STRING has no fixed size.
_BITS_BY_NAME = {
    "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32,
    "INT64": 64, "BOOL": 8, "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64,
    "COMPLEX64": 64, "COMPLEX128": 128, "BFLOAT16": 16, "FLOAT8E4M3FN": 8,
    "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "UINT4": 4, "INT4": 4,
    "FLOAT4E2M1": 4, "FLOAT8E8M0": 8, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6,
    "FLOAT6E3M2": 6,
}
_BITS = {getattr(TensorProto, name): bits for name, bits in _BITS_BY_NAME.items()
         if hasattr(TensorProto, name)}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data")

_WHAT_TO_DO_FOLDER = (
    "The model's external data must sit in the model's folder: move the data file "
    "next to the .onnx file (or below it) and give its location as a relative path, "
    "or re-export the model with onnx.save(model, path, save_as_external_data=True)."
)


def load_onnx(onnx_model):
    """Return a private copy of ``onnx_model`` as a ``ModelProto``, its
    external data (if any) read in.

    Parameters
    ----------
    onnx_model : onnx.ModelProto, bytes or path-like

    Raises
    ------
    ValueError
        For a path that does not exist or is not an ONNX model file, bytes
        that are not an ONNX model, external data outside the model's
        folder (or for a model that has no folder), and declared tensor
        sizes the model's data cannot back.  Nothing the user passed is
        changed.
    TypeError
        For anything else than a ``ModelProto``, bytes or a path.
    """
    if isinstance(onnx_model, onnx.ModelProto):
        _check_tensors(onnx_model, None, "onnx_model (a ModelProto)")
        model = onnx.ModelProto()
        model.CopyFrom(onnx_model)
        return model
    if isinstance(onnx_model, (bytes, bytearray)):
        source = "onnx_model bytes"
        if not onnx_model:
            raise ValueError(f"{source} are empty, so they are not an ONNX model: pass the "
                             "bytes of a serialized ModelProto (model.SerializeToString()).")
        try:
            model = onnx.load_from_string(bytes(onnx_model))
        except Exception as exc:
            raise ValueError(
                f"{source} are not an ONNX model: they do not parse as an onnx.ModelProto "
                f"({_short(exc)}); they are truncated, corrupt or another format. Pass the "
                "bytes of a serialized ModelProto (model.SerializeToString())."
            ) from exc
        _check_is_model(model, source)
        _check_tensors(model, None, source)
        return model
    if isinstance(onnx_model, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(onnx_model))
        source = f"onnx_model file {path!r}"
        model = _read_model_file(path, source)
        _check_is_model(model, source)
        base_dir = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        external = _check_tensors(model, base_dir, source)
        if external:
            _read_external_data(external, source)
        return model
    raise TypeError(
        "onnx_model must be None, an onnx.ModelProto, serialized bytes or a "
        f"path, not {type(onnx_model).__name__}."
    )


def _short(exc, limit=200):
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _read_model_file(path, source):
    """The model at ``path``, its external data not read."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{source} does not exist: pass the path of an .onnx file.") from None
    except OSError as exc:
        raise ValueError(f"{source} cannot be read ({_short(exc)}): pass the path of a "
                         "readable .onnx file.") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{source} is a directory, not an ONNX model: pass the path of "
                         "the .onnx file itself.")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{source} is not a regular file (a pipe, device or socket), "
                         "so it is not an ONNX model: pass the path of an .onnx file.")
    if info.st_size == 0:
        raise ValueError(f"{source} is empty (0 bytes), so it is not an ONNX model: "
                         "re-export the model or pass the path of another .onnx file.")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ValueError(
            f"{source} is not an ONNX model: it does not parse as an onnx.ModelProto "
            f"({_short(exc)}); the file is truncated, corrupt or another format. "
            "Re-export the model, or pass the path of another .onnx file."
        ) from exc


def _check_is_model(model, source):
    """Protobuf parses many byte strings (an empty one, other messages): an
    ONNX model has an IR version, a graph and, from IR 3, an opset."""
    missing = [what for what, absent in (
        ("no ir_version", model.ir_version <= 0),
        ("no graph", not model.HasField("graph")),
        ("no opset_import", model.ir_version >= 3 and not model.opset_import),
    ) if absent]
    if missing:
        raise ValueError(
            f"{source} is not an ONNX model: it parses as protobuf but has "
            f"{', '.join(missing)} (truncated, corrupt or another protobuf message). "
            "Re-export the model, or pass the path of another .onnx file."
        )


def _tensors(model):
    """(tensor, where) for every TensorProto of ``model``: initializers,
    sparse initializers, tensors in node attributes, in subgraphs, in
    functions and in training_info graphs."""
    stack = [(model.graph, "the graph")]
    for info in model.training_info:
        stack += [(info.initialization, "a training_info initialization graph"),
                  (info.algorithm, "a training_info algorithm graph")]
    for function in model.functions:
        stack.append((function, f"function {function.name!r}"))
    while stack:
        graph, where = stack.pop()
        if isinstance(graph, onnx.GraphProto):
            for tensor in graph.initializer:
                yield tensor, f"initializer {tensor.name!r} of {where}"
            for sparse in graph.sparse_initializer:
                name = f"sparse initializer {sparse.values.name!r} of {where}"
                yield sparse.values, name
                yield sparse.indices, f"indices of {name}"
        for node in graph.node:
            for attribute in node.attribute:
                node_name = node.name or node.op_type
                here = f"attribute {attribute.name!r} of node {node_name!r} in {where}"
                if attribute.HasField("t"):
                    yield attribute.t, f"tensor {attribute.t.name!r}, {here}"
                for tensor in attribute.tensors:
                    yield tensor, f"tensor {tensor.name!r}, {here}"
                sparses = list(attribute.sparse_tensors)
                if attribute.HasField("sparse_tensor"):
                    sparses.append(attribute.sparse_tensor)
                for sparse in sparses:
                    name = f"sparse tensor {sparse.values.name!r}, {here}"
                    yield sparse.values, name
                    yield sparse.indices, f"indices of {name}"
                if attribute.HasField("g"):
                    stack.append((attribute.g, f"the subgraph of {here}"))
                stack += [(g, f"a subgraph of {here}") for g in attribute.graphs]


def _declared(tensor, where, source):
    """(element count, bits per element or None for strings) of ``tensor``."""
    if any(d < 0 for d in tensor.dims):
        raise ValueError(
            f"{source}: {where} declares a negative dimension {list(tensor.dims)}: the "
            "model is corrupt or crafted. Re-export the model."
        )
    count = math.prod(tensor.dims)
    if tensor.data_type == TensorProto.STRING:
        return count, None
    # An unknown data type: one bit, the most any data could hold per bit.
    return count, _BITS.get(tensor.data_type, 1)


def _size_text(count, bits):
    if bits is None:
        return f"{count} strings"
    nbytes = math.ceil(count * bits / 8)
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{count} elements, {nbytes / scale:.3g} {unit}"
    return f"{count} elements, {nbytes} bytes"


def _check_tensors(model, base_dir, source):
    """Check every tensor's declared size against its data and every
    external reference against ``base_dir`` (None: the model has no
    folder); return the external reads to make, as (tensor, where,
    location, resolved path, stat, offset, length)."""
    external = []
    for tensor, where in _tensors(model):
        count, bits = _declared(tensor, where, source)
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL:
            external.append(_check_external(tensor, where, count, bits, base_dir, source))
            continue
        if count == 0:
            continue
        # Reading raw_data copies it (upb): once per tensor, never kept.
        raw_size = len(tensor.raw_data) if tensor.HasField("raw_data") else 0
        if raw_size:
            capacity = raw_size * 8 // (bits or 8)
        else:
            entries = sum(len(getattr(tensor, field)) for field in _TYPED_FIELDS)
            capacity = entries * max(1, 8 // (bits or 8))
        if count > capacity:
            raise ValueError(
                f"{source}: {where} declares shape {list(tensor.dims)} "
                f"({_size_text(count, bits)}) but the model holds data for "
                f"{capacity} element(s) of it: the model is truncated, corrupt or crafted, "
                "and onnxfit refuses it before allocating anything. Re-export the model."
            )
    return external


def _external_fields(tensor, where, source):
    fields = {entry.key: entry.value for entry in tensor.external_data}
    location = fields.get("location", "")
    numbers = {}
    for key in ("offset", "length"):
        if key in fields:
            try:
                numbers[key] = int(fields[key])
            except ValueError:
                numbers[key] = -1
            if numbers[key] < 0:
                raise ValueError(
                    f"{source}: {where} gives its external data {key} as {fields[key]!r}, "
                    "not a non-negative integer: the model is corrupt or crafted. "
                    "Re-export the model."
                )
    return location, numbers.get("offset"), numbers.get("length")


def _check_external(tensor, where, count, bits, base_dir, source):
    location, offset, length = _external_fields(tensor, where, source)
    if base_dir is None:
        raise ValueError(
            f"{source}: {where} keeps its data in an external file ({location!r}), and "
            "a ModelProto or bytes have no folder onnxfit could trust to read it from. "
            "Pass the path of the .onnx file instead (its external data must sit in its "
            "folder), or, for a model you trust, load its data first with onnx.load(path)."
        )
    if not location:
        raise ValueError(f"{source}: {where} is marked as external data but gives no "
                         "location: the model is corrupt. Re-export the model.")
    refused = None
    if "\0" in location:
        refused = "a NUL character in the path"
    elif (os.path.isabs(location) or location.startswith(("/", "\\"))
          or os.path.splitdrive(location)[0] or (len(location) > 1 and location[1] == ":")):
        refused = "an absolute path"
    if refused is None:
        resolved = os.path.realpath(os.path.join(base_dir, location))
        if os.path.commonpath([resolved, base_dir]) != base_dir:
            lexical = os.path.normpath(os.path.join(base_dir, location))
            if os.path.commonpath([lexical, base_dir]) != base_dir:
                refused = "'..' leads out of the folder"
            else:
                refused = f"a symbolic link that resolves to {resolved!r}"
    if refused is not None:
        raise ValueError(
            f"{source}: {where} reads its external data from {location!r}, which is "
            f"outside the model's folder {base_dir!r} ({refused}); onnxfit refused it "
            f"before reading anything. {_WHAT_TO_DO_FOLDER}"
        )
    try:
        info = os.stat(resolved)
    except OSError as exc:
        raise ValueError(
            f"{source}: {where} reads its external data from {location!r}, which cannot "
            f"be found in the model's folder ({_short(exc)}). Pass the path of a model "
            "whose data files sit next to it."
        ) from exc
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(
            f"{source}: {where} reads its external data from {location!r}, which is not "
            f"a regular file. {_WHAT_TO_DO_FOLDER}"
        )
    if bits is None:
        raise ValueError(f"{source}: {where} is a string tensor with external data, which "
                         "ONNX does not allow: the model is corrupt. Re-export the model.")
    start = offset or 0
    available = max(0, info.st_size - start)
    if start > info.st_size or (length is not None and length > available):
        raise ValueError(
            f"{source}: {where} declares "
            f"{'' if length is None else f'{length} bytes of '}external data at offset "
            f"{start} of {location!r}, which has only "
            f"{info.st_size} bytes: the data file is truncated or the model crafted, and "
            "onnxfit refuses it before reading. Re-export the model, or copy its data "
            "file again."
        )
    window = available if length is None else length
    needed = math.ceil(count * bits / 8)
    if needed > window:
        raise ValueError(
            f"{source}: {where} declares shape {list(tensor.dims)} "
            f"({_size_text(count, bits)}) but its external data in {location!r} holds "
            f"{window} bytes: the data file is truncated or the model crafted, and onnxfit "
            "refuses it before allocating anything. Re-export the model, or copy its data "
            "file again."
        )
    return tensor, where, location, resolved, info, start, window


def _read_external_data(external, source):
    """Read the checked external data into the tensors, from the resolved
    paths, each opened once without following a final symbolic link and
    checked again on the open descriptor."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    by_file = {}
    for item in external:
        by_file.setdefault(item[3], []).append(item)
    for resolved, items in by_file.items():
        location, checked = items[0][2], items[0][4]
        try:
            fd = os.open(resolved, flags | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise ValueError(f"{source}: external data file {location!r} cannot be opened "
                             f"({_short(exc)}). Pass the path of a model whose data files "
                             "sit next to it.") from exc
        with os.fdopen(fd, "rb") as data_file:
            info = os.fstat(data_file.fileno())
            end = max(start + window for *_, start, window in items)
            if (not stat.S_ISREG(info.st_mode)
                    or (info.st_dev, info.st_ino) != (checked.st_dev, checked.st_ino)
                    or info.st_size < end):
                raise ValueError(
                    f"{source}: external data file {location!r} changed while onnxfit "
                    "loaded the model. Pass the path again once nothing writes to the folder."
                )
            for tensor, where, _, _, _, start, window in items:
                data_file.seek(start)
                data = data_file.read(window)
                if len(data) != window:
                    raise ValueError(
                        f"{source}: {where}: external data file {location!r} ended early "
                        "while read. Pass the path again once nothing writes to the folder."
                    )
                tensor.raw_data = data
                tensor.data_location = TensorProto.DEFAULT
                del tensor.external_data[:]
