"""The packaging rules, proven from the metadata (nothing is installed).

Every onnxruntime build -- onnxruntime, onnxruntime-gpu, -directml,
-openvino and the last training build, onnxruntime-training-cpu 1.19.2 --
installs the same ``onnxruntime/`` package folder.  So onnxfit's default
requirements name none of them (installing onnxfit next to a build leaves
that build as it was), and extras pick one, like ``optimum[onnxruntime]``:

* ``onnxfit[cpu]`` -> ``onnxruntime>=1.20`` (no upper pin),
* ``onnxfit[gpu]`` -> ``onnxruntime-gpu>=1.20``,
* ``onnxfit[ort-training]`` -> ``onnxruntime-training-cpu==1.19.2`` on
  Python < 3.13 only (it has no newer wheel).

The rules are checked on setup.cfg (read with configparser) and, when
onnxfit is installed as a distribution, on its installed metadata.
"""

import ast
import configparser
import importlib.metadata
import os
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Python versions the rules are evaluated on (markers, Requires-Python).
SUPPORTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
#: Pythons the training build has wheels for.
TRAINING_PYTHONS = ("3.10", "3.11", "3.12")
#: Later Pythons: the training extra is empty there.
NO_TRAINING_PYTHONS = ("3.13", "3.14", "3.20")

#: extra -> the one onnxruntime distribution it installs, and its specifier.
RUNTIME_EXTRAS = {
    "cpu": ("onnxruntime", ">=1.20"),
    "gpu": ("onnxruntime-gpu", ">=1.20"),
    "ort-training": ("onnxruntime-training-cpu", "==1.19.2"),
}

#: Import names whose distribution has another name.
IMPORT_TO_DISTRIBUTION = {"sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow"}
#: onnxruntime is provided by whichever build the user picked.
RUNTIME_IMPORTS = {"onnxruntime"}
LOCAL_IMPORTS = {"onnxfit", "tests", "benchmarks"}


# ---------------------------------------------------------------- reading --


class Packaging:
    """The packaging facts the rules look at, from setup.cfg or from the
    installed metadata."""

    def __init__(self, default, extras, python_requires, classifiers, source):
        self.default = default  # list of Requirement
        self.extras = extras  # canonical extra name -> list of Requirement
        self.python_requires = python_requires  # str
        self.classifiers = classifiers  # list of str
        self.source = source  # where it was read, for messages


def _env(python, extra=""):
    return {"python_version": python, "python_full_version": python + ".0", "extra": extra}


def _lines(value):
    return [line.strip() for line in value.splitlines() if line.strip()]


def packaging_from_setup_cfg(text, source="setup.cfg"):
    """Read setup.cfg's text the way setuptools does (configparser, full-line
    comments dropped, no interpolation)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(text)
    default = [Requirement(r) for r in _lines(parser.get("options", "install_requires"))]
    extras = {}
    if parser.has_section("options.extras_require"):
        for name, value in parser.items("options.extras_require"):
            extras[canonicalize_name(name)] = [Requirement(r) for r in _lines(value)]
    return Packaging(
        default,
        extras,
        parser.get("options", "python_requires", fallback=""),
        _lines(parser.get("metadata", "classifiers", fallback="")),
        source,
    )


def packaging_from_metadata(dist):
    """Read an installed distribution's metadata (Requires-Dist with
    ``extra == ...`` markers, Provides-Extra, Requires-Python)."""
    requirements = [Requirement(r) for r in dist.requires or []]
    names = [canonicalize_name(e) for e in dist.metadata.get_all("Provides-Extra") or []]

    def applies(req, extra):
        return req.marker is None or any(
            req.marker.evaluate(_env(p, extra)) for p in SUPPORTED_PYTHONS + NO_TRAINING_PYTHONS
        )

    default = [r for r in requirements if applies(r, "")]
    extras = {
        name: [r for r in requirements if r not in default and applies(r, name)] for name in names
    }
    return Packaging(
        default,
        extras,
        dist.metadata["Requires-Python"] or "",
        dist.metadata.get_all("Classifier") or [],
        f"installed metadata at {dist.locate_file('')}",
    )


def installed_distribution():
    """onnxfit's installed distribution, or None.  An ``onnxfit.egg-info``
    left in the source tree by a build is not an installation (and may be
    stale): it is ignored."""
    for dist in importlib.metadata.distributions(name="onnxfit"):
        location = str(dist.locate_file(""))
        if os.path.isdir(location) and os.path.samefile(location, ROOT):
            continue
        return dist
    return None


def _is_runtime(req):
    return canonicalize_name(req.name).startswith("onnxruntime")


# ------------------------------------------------------------------ rules --
# Each rule raises AssertionError when broken.


def check_no_runtime_by_default(pkg):
    runtimes = [str(r) for r in pkg.default if _is_runtime(r)]
    assert not runtimes, (
        f"{pkg.source}: the default requirements name onnxruntime builds {runtimes}; "
        "every build owns the same 'onnxruntime' folder, so none may be a default "
        "requirement (extras pick one)"
    )


def check_python_requires_has_no_upper_bound(pkg):
    spec = SpecifierSet(pkg.python_requires)
    upper = [str(s) for s in spec if s.operator in ("<", "<=", "==", "===", "~=")]
    assert not upper, f"{pkg.source}: python_requires {pkg.python_requires!r} caps Python: {upper}"
    for python in SUPPORTED_PYTHONS + ("3.14", "3.20", "4.0"):
        assert spec.contains(python), (
            f"{pkg.source}: python_requires {pkg.python_requires!r} excludes Python {python}"
        )
    assert not spec.contains("3.9"), (
        f"{pkg.source}: python_requires {pkg.python_requires!r} should start at 3.10"
    )


def check_classifiers(pkg):
    for python in SUPPORTED_PYTHONS:
        classifier = f"Programming Language :: Python :: {python}"
        assert classifier in pkg.classifiers, f"{pkg.source}: classifier {classifier!r} missing"


def check_runtime_extras(pkg):
    for extra, (distribution, specifier) in RUNTIME_EXTRAS.items():
        assert extra in pkg.extras, f"{pkg.source}: the extra [{extra}] is missing"
        runtimes = [r for r in pkg.extras[extra] if _is_runtime(r)]
        names = [canonicalize_name(r.name) for r in runtimes]
        assert names == [distribution], (
            f"{pkg.source}: [{extra}] must install exactly {distribution} "
            f"(one onnxruntime build), it installs {[str(r) for r in runtimes]}"
        )
        (req,) = runtimes
        assert str(req.specifier) == specifier, (
            f"{pkg.source}: [{extra}] wants {distribution}{req.specifier}, expected "
            f"{distribution}{specifier}"
        )
        assert not req.extras, f"{pkg.source}: [{extra}]: {req} asks for extras of {distribution}"


def check_training_marker(pkg):
    training = [
        r for r in pkg.extras.get("ort-training", [])
        if canonicalize_name(r.name) == "onnxruntime-training-cpu"
    ]
    assert len(training) == 1, (
        f"{pkg.source}: [ort-training] must name onnxruntime-training-cpu once, it has "
        f"{[str(r) for r in training]}"
    )
    (req,) = training
    assert req.marker is not None, (
        f"{pkg.source}: {req} needs the marker python_version < \"3.13\" (no newer wheel)"
    )
    for python in TRAINING_PYTHONS:
        assert req.marker.evaluate(_env(python, "ort-training")), (
            f"{pkg.source}: {req} is not installed on Python {python}"
        )
    for python in NO_TRAINING_PYTHONS:
        assert not req.marker.evaluate(_env(python, "ort-training")), (
            f"{pkg.source}: {req} would be installed on Python {python}, which it has no wheel for"
        )


def check_runtime_only_in_runtime_extras(pkg):
    for extra, requirements in pkg.extras.items():
        if extra in RUNTIME_EXTRAS:
            continue
        runtimes = [str(r) for r in requirements if _is_runtime(r)]
        assert not runtimes, (
            f"{pkg.source}: the extra [{extra}] installs onnxruntime builds {runtimes}; "
            "only [cpu], [gpu] and [ort-training] may"
        )


def check_torch(pkg):
    assert "bench" in pkg.extras, f"{pkg.source}: the extra [bench] is missing"
    torch = [r for r in pkg.extras["bench"] if canonicalize_name(r.name) == "torch"]
    assert [str(r.specifier) for r in torch] == ["==2.13.0"], (
        f"{pkg.source}: [bench] must pin torch==2.13.0 exactly, it has {[str(r) for r in torch]}"
    )
    assert not any(canonicalize_name(r.name) == "torch" for r in pkg.default), (
        f"{pkg.source}: torch is a default requirement"
    )
    for extra in ("test",) + tuple(RUNTIME_EXTRAS):
        assert not any(canonicalize_name(r.name) == "torch" for r in pkg.extras.get(extra, [])), (
            f"{pkg.source}: the extra [{extra}] pulls torch"
        )


def check_test_extra(pkg):
    assert "test" in pkg.extras, f"{pkg.source}: the extra [test] is missing"
    names = {canonicalize_name(r.name) for r in pkg.extras["test"]}
    for wanted in ("pytest", "pytest-xdist", "pandas"):
        assert wanted in names, f"{pkg.source}: [test] lacks {wanted}"


RULES = [
    check_no_runtime_by_default,
    check_python_requires_has_no_upper_bound,
    check_classifiers,
    check_runtime_extras,
    check_training_marker,
    check_runtime_only_in_runtime_extras,
    check_torch,
    check_test_extra,
]


# ------------------------------------------------------------------ tests --


@pytest.fixture(scope="module")
def setup_cfg_text():
    with open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_setup_cfg(setup_cfg_text, rule):
    rule(packaging_from_setup_cfg(setup_cfg_text))


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_installed_metadata(rule):
    dist = installed_distribution()
    if dist is None:
        pytest.skip("onnxfit is not installed as a distribution (pip install .): no metadata")
    rule(packaging_from_metadata(dist))


def test_installed_metadata_matches_setup_cfg(setup_cfg_text):
    dist = installed_distribution()
    if dist is None:
        pytest.skip("onnxfit is not installed as a distribution (pip install .): no metadata")
    source = packaging_from_setup_cfg(setup_cfg_text)
    installed = packaging_from_metadata(dist)

    def runtime_view(pkg):
        return {
            "default": sorted(str(r) for r in pkg.default),
            "extras": {e: sorted(canonicalize_name(r.name) for r in reqs) for e, reqs in pkg.extras.items()},
            "python_requires": SpecifierSet(pkg.python_requires),
        }

    assert runtime_view(installed) == runtime_view(source), (
        f"the {installed.source} differs from setup.cfg: reinstall onnxfit (pip install .)"
    )


def test_build_system():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build = tomllib.load(f)["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    requires = {canonicalize_name(Requirement(r).name): Requirement(r) for r in build["requires"]}
    assert "setuptools" in requires and requires["setuptools"].specifier.contains("61")
    assert not requires["setuptools"].specifier.contains("60.10")
    assert "wheel" in requires


def _test_imports(path):
    """Top-level modules a test file imports outside ``try`` blocks (an
    import in a ``try`` is optional)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for inner in node.body:
                optional.update(id(n) for n in ast.walk(inner))
    modules = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_test_extra_covers_what_the_tests_import(setup_cfg_text):
    pkg = packaging_from_setup_cfg(setup_cfg_text)
    provided = {canonicalize_name(r.name) for r in pkg.default + pkg.extras["test"]}
    stdlib = set(sys.stdlib_module_names)
    tests_dir = os.path.join(ROOT, "tests")
    missing = {}
    for name in sorted(os.listdir(tests_dir)):
        if not name.endswith(".py"):
            continue
        for module in _test_imports(os.path.join(tests_dir, name)):
            if module in stdlib or module in LOCAL_IMPORTS or module in RUNTIME_IMPORTS:
                continue
            distribution = canonicalize_name(IMPORT_TO_DISTRIBUTION.get(module, module))
            if distribution not in provided:
                missing.setdefault(distribution, []).append(name)
    assert not missing, (
        f"tests import distributions that neither the default requirements nor the "
        f"[test] extra install: {missing} (add them to [test] in setup.cfg, or "
        "pytest.importorskip them)"
    )


def test_the_runtime_floor_is_the_one_onnxfit_checks():
    """onnxfit.sessions refuses what the cpu/gpu extras would not install."""
    from onnxfit.sessions import MIN_ONNXRUNTIME

    floor = ".".join(map(str, MIN_ONNXRUNTIME))
    for extra in ("cpu", "gpu"):
        assert RUNTIME_EXTRAS[extra][1] == f">={floor}"
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        packaging = packaging_from_setup_cfg(f.read())
    for extra in ("cpu", "gpu"):
        (requirement,) = packaging.extras[extra]
        assert str(requirement.specifier) == f">={floor}", (extra, str(requirement))


def _readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = text.split("```bash\n")[1:3]
    return [block.split("\n```")[0].strip() for block in blocks]


def test_readme_opens_with_the_demo_and_the_test_commands_ci_runs():
    demo, tests = _readme_commands()
    assert demo == 'pip install ".[cpu]" && python -m onnxfit demo'
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert tests.startswith('pip install ".[cpu,test]"')
    assert ci.count(tests) >= 2, "the default and Python 3.13 lanes run the README's command"


def test_a_half_removed_runtime_is_explained(monkeypatch):
    """Uninstalling one of two builds sharing the folder leaves an
    onnxruntime module without InferenceSession."""
    import types

    from onnxfit import sessions

    monkeypatch.setattr(sessions, "onnxruntime", types.ModuleType("onnxruntime"))
    with pytest.raises(ImportError, match="pip install --force-reinstall --no-deps onnxruntime"):
        sessions.check_onnxruntime()


def test_runtimes_older_than_the_floor_are_refused_but_the_training_build(monkeypatch):
    from onnxfit import sessions

    monkeypatch.setattr(sessions, "onnxruntime_version", lambda: (1, 19, 2))
    monkeypatch.setattr(sessions, "has_training_build", lambda: False)
    with pytest.raises(ImportError, match="onnxfit needs onnxruntime >= 1.20"):
        sessions.check_onnxruntime()
    monkeypatch.setattr(sessions, "has_training_build", lambda: True)
    sessions.check_onnxruntime()  # onnxruntime-training-cpu 1.19.2, the last training build
