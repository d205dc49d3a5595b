"""What a bug report needs: versions, the onnxruntime build and what it runs.

:func:`show_versions` (also ``onnxfit --version``) prints, in the style of
``sklearn.show_versions()``, the system, onnxfit's version, the version of
each of its dependencies and of the optional packages it works with, which
onnxruntime build is installed with its execution providers, and which
gradient backends and devices onnxfit can use with it.

Versions are read from the installed distributions' metadata (nothing is
imported for them), so a broken package still shows its version.
"""

import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, requires, version

__all__ = ["show_versions"]

#: onnxfit's install_requires, used when its own metadata cannot be read
#: (running from a source tree that was never installed).
_REQUIRED = ("numpy", "scipy", "scikit-learn", "onnx", "skl2onnx", "tqdm", "joblib")
#: The onnxruntime builds; each installs the same ``onnxruntime`` package
#: folder, so the distribution's name tells which build is in use.
_RUNTIME_BUILDS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-training-cpu",
    "onnxruntime-directml", "onnxruntime-openvino",
)
#: Packages onnxfit uses when they are installed: data files (pandas,
#: pyarrow), the benchmarks and the model zoo (torch, onnxscript),
#: thread pools (threadpoolctl).
_OPTIONAL = ("pandas", "pyarrow", "torch", "onnxscript", "threadpoolctl", "pip", "setuptools")


def _version(distribution):
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _required():
    """Names of onnxfit's required distributions, from its metadata."""
    try:
        listed = requires("onnxfit") or []
    except PackageNotFoundError:
        return list(_REQUIRED)
    names = []
    for requirement in listed:
        if "extra ==" in requirement:
            continue
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
        if name not in names:
            names.append(name)
    return names or list(_REQUIRED)


def _get_sys_info():
    """System and Python information.

    Returns
    -------
    dict of str -> str
    """
    return {
        "python": sys.version.replace("\n", " "),
        "executable": sys.executable,
        "machine": platform.platform(),
    }


def _get_deps_info():
    """Versions of onnxfit, its dependencies and the optional packages.

    Returns
    -------
    dependencies : dict of str -> str or None
        onnxfit first, then its required distributions (None: not
        installed).
    runtimes : dict of str -> str
        The onnxruntime builds installed (normally one).
    optional : dict of str -> str or None
    """
    from . import __version__

    dependencies = {"onnxfit": __version__}
    dependencies.update({name: _version(name) for name in _required()})
    runtimes = {name: _version(name) for name in _RUNTIME_BUILDS}
    runtimes = {name: v for name, v in runtimes.items() if v is not None}
    optional = {name: _version(name) for name in _OPTIONAL if name not in dependencies}
    return dependencies, runtimes, optional


def _first_sentence(exc):
    """The first sentence of an error message, on one line."""
    text = " ".join(str(exc).split())
    return re.split(r"(?<=[.:])\s", text, maxsplit=1)[0] if text else type(exc).__name__


def _get_runtime_info():
    """What the installed onnxruntime offers, as onnxfit sees it.

    Returns
    -------
    runtime : dict of str -> str
        onnxruntime's version and device, its execution providers, whether
        it is a training build and the devices onnxfit trains on.
    backends : dict of str -> str
        Each gradient backend: ``usable`` or why not.
    """
    try:
        import onnxruntime

        from .sessions import check_onnxruntime, has_training_build

        check_onnxruntime()
    except ImportError as exc:
        return {"onnxruntime": f"not usable: {_first_sentence(exc)}"}, {}
    providers = onnxruntime.get_available_providers()
    runtime = {
        "version": f"{onnxruntime.__version__} (device {onnxruntime.get_device()})",
        "providers": ", ".join(providers),
        "training build": "yes" if has_training_build() else "no",
        "devices": "'cpu'" + (", 'cuda', 'cuda:N'" if "CUDAExecutionProvider" in providers
                              else " (no CUDAExecutionProvider: no 'cuda')"),
    }
    from .gradient import BACKENDS, DEFAULT_BACKEND, check_backend

    backends = {}
    for name in BACKENDS:
        try:
            check_backend(name)
            status = "usable"
        except ImportError as exc:
            status = f"not usable: {_first_sentence(exc)}"
        backends[name] = status + (" (default)" if name == DEFAULT_BACKEND else "")
    return runtime, backends


def show_versions(file=None):
    """Print what a bug report needs: versions, the onnxruntime build, the
    usable gradient backends and execution providers.

    The same report as ``onnxfit --version``.  Modelled on
    :func:`sklearn.show_versions`.

    Parameters
    ----------
    file : file-like, default=None
        Where to write; None writes to ``sys.stdout``.

    Examples
    --------
    >>> import onnxfit
    >>> onnxfit.show_versions()  # doctest: +SKIP
    """
    out = sys.stdout if file is None else file

    def write(line=""):
        print(line, file=out)

    dependencies, runtimes, optional = _get_deps_info()
    write(f"onnxfit {dependencies['onnxfit']}")
    write()
    write("System:")
    for key, value in _get_sys_info().items():
        write(f"{key:>12}: {value}")
    write()
    write("Python dependencies:")
    width = max(len(k) for k in [*dependencies, *runtimes, *optional])
    for key, value in dependencies.items():
        write(f"{key:>{width}}: {value or 'not installed'}")
    if runtimes:
        for key, value in runtimes.items():
            write(f"{key:>{width}}: {value}")
    else:
        write(f"{'onnxruntime':>{width}}: not installed (pip install 'onnxfit[cpu]')")
    write()
    write("Optional packages:")
    for key, value in optional.items():
        write(f"{key:>{width}}: {value or 'not installed'}")
    runtime, backends = _get_runtime_info()
    for title, info in (("onnxruntime:", runtime), ("Gradient backends:", backends)):
        if not info:
            continue
        write()
        write(title)
        width = max(len(k) for k in info)
        for key, value in info.items():
            write(f"{key:>{width}}: {value}")
