"""onnxruntime sessions and tensors: the one module that creates them.

Everything that runs a graph -- the estimators' predictions, the training
engines, :class:`onnxfit.OnnxFunction`, the gradient backends -- creates its
sessions here, so that one place decides the session options, checks that a
usable onnxruntime build is installed, and knows the limits of that build
(the highest IR version and opset it loads).

onnxfit runs on any onnxruntime build that installs the ``onnxruntime``
Python package: the plain CPU build, onnxruntime-gpu, onnxruntime-directml,
onnxruntime-openvino, or the last training build (onnxruntime-training-cpu
1.19.2).  They all own the same ``onnxruntime/`` folder, so onnxfit depends
on none of them by default (see the installation notes in the README).
"""

import functools
import os
import re
from dataclasses import dataclass

import numpy as np
import onnx

try:
    import onnxruntime
except ImportError as exc:  # pragma: no cover - CI's no-runtime lane runs it in a subprocess
    raise ImportError(
        "onnxfit needs onnxruntime, and none is installed. Install the build that "
        "fits your machine: pip install 'onnxfit[cpu]' (plain onnxruntime), "
        "'onnxfit[gpu]' (onnxruntime-gpu), or one of onnxruntime-directml / "
        "onnxruntime-openvino yourself."
    ) from exc

#: Oldest onnxruntime release onnxfit supports, and tests in CI: the first
#: with wheels for Python 3.13 (older plain releases compute ReduceL2 at
#: opset 18 wrongly).  The training build 1.19.2, the last there is, is
#: accepted too, for the gradient backend it serves (whose ReduceL2 has the
#: same flaw).
MIN_ONNXRUNTIME = (1, 20)
TRAINING_BUILD = (1, 19, 2)

def _onnxruntime_errors():
    """onnxruntime's own exception classes (Fail, InvalidArgument, ...),
    which derive from Exception only."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "NotImplemented",
             "EPFail", "ModelLoadCanceled", "NoSuchFile")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


#: The exceptions onnxruntime raises itself; onnxfit turns them into
#: ValueErrors that keep onnxruntime's message.
ONNXRUNTIME_ERRORS = _onnxruntime_errors()

#: Optimizers disabled for float64 graphs: onnxruntime-training 1.19.2 fuses
#: transposed MatMuls into FusedMatMul, whose CPU kernel is float32 only.
_FLOAT64_DISABLED_OPTIMIZERS = ["MatmulTransposeFusion"]


def onnxruntime_version():
    """The installed onnxruntime version as a tuple of ints, e.g. ``(1, 32, 0)``."""
    parts = re.findall(r"\d+", onnxruntime.__version__)[:3]
    return tuple(int(p) for p in parts)


def check_onnxruntime():
    """Raise ImportError when the installed onnxruntime is broken or too old."""
    if not hasattr(onnxruntime, "InferenceSession") or not hasattr(onnxruntime, "__version__"):
        raise ImportError(
            "The installed onnxruntime is broken: its package folder lacks "
            "InferenceSession, which happens when one of two builds sharing the "
            "'onnxruntime' folder (onnxruntime, onnxruntime-gpu, onnxruntime-training-cpu, "
            "...) was uninstalled after the other was installed. Reinstall the build you "
            "use, for example: pip install --force-reinstall --no-deps onnxruntime"
        )
    if onnxruntime_version()[:2] < MIN_ONNXRUNTIME and not (
            onnxruntime_version() == TRAINING_BUILD and has_training_build()):
        wanted = ".".join(map(str, MIN_ONNXRUNTIME))
        raise ImportError(
            f"onnxfit needs onnxruntime >= {wanted}, but {onnxruntime.__version__} "
            "is installed: upgrade the build you use (pip install -U onnxruntime, "
            "or onnxruntime-gpu, ...)."
        )


def has_training_build():
    """Whether the installed onnxruntime is a training build (it exposes the
    gradient builder of onnxruntime-training)."""
    from onnxruntime.capi import _pybind_state

    return hasattr(_pybind_state, "GradientGraphBuilder")


def _probe_model(ir_version, opset):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def _probe_limit(ir_version, opset, pattern):
    """Load a probe model beyond the runtime's limits and read the limit it
    states in its error message; None when it loads or says nothing."""
    try:
        onnxruntime.InferenceSession(
            _probe_model(ir_version, opset), session_options(log_severity_level=4),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # the runtime's own message states its limit
        found = re.search(pattern, str(exc))
        return int(found.group(1)) if found else None
    return None


#: IR version and opset every supported onnxruntime loads (those of 1.19.2):
#: graphs within them need no probe of the installed runtime.
SUPPORTED_EVERYWHERE = (10, 21)


@functools.lru_cache(maxsize=None)
def runtime_limits():
    """Highest IR version and default-domain opset the installed onnxruntime
    loads, read from the runtime itself.

    Returns
    -------
    (int, int)
        ``(max_ir_version, max_opset)``.  onnxruntime states both in the
        message it gives for a model beyond them; when a build says nothing,
        the limits of onnx itself are used.
    """
    max_ir = _probe_limit(10_000, 7, r"max supported IR version:\s*(\d+)")
    max_opset = _probe_limit(7, 10_000, r"ai\.onnx is till opset\s*(\d+)")
    return (
        max_ir if max_ir is not None else onnx.IR_VERSION,
        max_opset if max_opset is not None else onnx.defs.onnx_opset_version(),
    )


def default_threads():
    """The intra-op threads ``n_threads=None`` means: ``OMP_NUM_THREADS`` when
    set (joblib sets it in its workers, so that parallel fits share the
    cores), else None, onnxruntime's own default (one thread per core)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def session_options(n_threads=1, log_severity_level=3):
    """SessionOptions used for every onnxfit session.

    Parameters
    ----------
    n_threads : int or None, default=1
        Intra-op threads; None: :func:`default_threads`.
    log_severity_level : int, default=3
        Errors only: onnxruntime's warnings about unused initializers and
        the like mean nothing to a user of onnxfit.
    """
    options = onnxruntime.SessionOptions()
    options.log_severity_level = log_severity_level
    if n_threads is None:
        n_threads = default_threads()
    if n_threads is not None:
        options.intra_op_num_threads = int(n_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return options


@dataclass(frozen=True)
class Device:
    """Where sessions run and engines keep their tensors.

    Attributes
    ----------
    type : {'cpu', 'cuda'}
    id : int
        The GPU's index (0 on the CPU).
    """

    type: str = "cpu"
    id: int = 0

    @property
    def providers(self):
        """onnxruntime execution providers, the device's first."""
        if self.type == "cuda":
            return [("CUDAExecutionProvider", {"device_id": self.id}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def __str__(self):
        return self.type if self.type == "cpu" else f"{self.type}:{self.id}"


CPU = Device()


def parse_device(device):
    """The :class:`Device` that ``device`` names: ``'cpu'``, ``'cuda'``
    (GPU 0) or ``'cuda:N'``.

    Raises
    ------
    ValueError
        For any other value.
    """
    if isinstance(device, Device):
        return device
    if isinstance(device, str):
        match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device.strip().lower())
        if match and not (match.group(1) == "cpu" and match.group(2) not in (None, "0")):
            return Device(match.group(1), int(match.group(2) or 0))
    raise ValueError(
        f"device must be 'cpu', 'cuda' or 'cuda:N' (N the index of a GPU), not {device!r}."
    )


def check_device(device):
    """``device`` parsed (see :func:`parse_device`), once the installed
    onnxruntime is known to run on it.

    Raises
    ------
    ValueError
        For a GPU without onnxruntime's CUDA execution provider.
    """
    device = parse_device(device)
    if device.type == "cuda":
        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ValueError(
                f"device={str(device)!r} needs onnxruntime's CUDA build, but the installed "
                f"onnxruntime {onnxruntime.__version__} offers {available}. Install it in "
                "place of onnxruntime (pip uninstall onnxruntime; pip install "
                "'onnxfit[gpu]'), on a machine with an NVIDIA GPU and its driver, or "
                "train with device='cpu'."
            )
    return device


def make_session(model, n_threads=1, dtype=np.float32, device=None):
    """An ``InferenceSession`` on ``model`` (ModelProto or bytes).

    Parameters
    ----------
    model : onnx.ModelProto or bytes
    n_threads : int or None, default=1
        See :func:`session_options`.
    dtype : numpy dtype, default=float32
        Element type of the graph's float tensors.
    device : Device or None, default=None
        Where it runs (None: the CPU).
    """
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    kwargs = {}
    if np.dtype(dtype) == np.float64:
        kwargs["disabled_optimizers"] = _FLOAT64_DISABLED_OPTIMIZERS
    providers = (device or CPU).providers
    try:
        return onnxruntime.InferenceSession(
            model, session_options(n_threads), providers=providers, **kwargs
        )
    except ONNXRUNTIME_ERRORS as exc:
        raise ValueError(
            f"onnxruntime could not load the graph: {' '.join(str(exc).split())} "
            "(an operator or type this onnxruntime build does not run: check the graph "
            "with `onnxfit info`, or use the float32 version of the model)."
        ) from exc


def binding_runner(session):
    """A function that runs ``session`` on an IO binding, as cheaply as it can.

    ``InferenceSession.run_with_iobinding`` checks WebGPU graph capture in
    Python on every call, a few microseconds that are a tenth of a small
    model's training step; onnxfit captures no graph on the CPU, so the
    returned function calls the binding's native run directly when the
    installed onnxruntime exposes it (and the public method otherwise).
    """
    native = getattr(getattr(session, "_sess", None), "run_with_iobinding", None)
    if native is None or not hasattr(session.io_binding(), "_iobinding"):
        return session.run_with_iobinding

    def run(binding):
        native(binding._iobinding, None)

    return run


def bind_output_array(binding, name, array):
    """Bind the output ``name`` of an IO binding to ``array``'s memory."""
    binding.bind_output(
        name,
        device_type="cpu",
        device_id=0,
        element_type=array.dtype,
        shape=array.shape,
        buffer_ptr=array.ctypes.data,
    )


# -- OrtValues ---------------------------------------------------------------------
_ORT_TENSOR_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
}


def as_ortvalue(value):
    """``value`` as an ``onnxruntime.OrtValue``.

    Parameters
    ----------
    value : ndarray or onnxruntime.OrtValue
        A C-contiguous array is shared, not copied, and not referenced by
        the result: keep it alive as long as the result is used.
    """
    if isinstance(value, onnxruntime.OrtValue):
        return value
    if not (isinstance(value, np.ndarray) and value.flags.c_contiguous):
        raise TypeError(
            f"Expected a C-contiguous numpy array or an OrtValue, got {type(value).__name__}."
        )
    return onnxruntime.OrtValue.ortvalue_from_numpy(value)


def zeros_ortvalue(shape, dtype):
    """An ``onnxruntime.OrtValue`` of zeros on the CPU that owns its memory
    (one made from a numpy array points at that array's, freed with it)."""
    value = onnxruntime.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype))
    value.update_inplace(np.zeros(shape, dtype=dtype))
    return value


def is_ortvalue(value):
    """Whether ``value`` is an ``onnxruntime.OrtValue``."""
    return isinstance(value, onnxruntime.OrtValue)


def ortvalue_dtype(value):
    """Numpy dtype of a float, double or integer tensor OrtValue, else None."""
    return _ORT_TENSOR_TYPES.get(value.data_type())


check_onnxruntime()
