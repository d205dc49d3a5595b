"""Sphinx configuration.

Build (warnings are errors)::

    pip install ".[cpu,docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

``ONNXFIT_DOCS_QUICK=1`` skips the gallery scripts whose name starts with
``slow_`` (their pages still appear, without their output): the CI builds
this way.
"""

import os
import re
import warnings

import sys
from pathlib import Path

import onnxfit

# docs_helpers (graph drawings, the recorded benchmark figures) for the
# tutorial and gallery scripts.
sys.path.insert(0, str(Path(__file__).resolve().parent))

project = "onnxfit"
author = "onnxfit developers"
copyright = "2026, onnxfit developers"
release = version = onnxfit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
autosummary_generate = True
numpydoc_show_class_members = False
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "gallery", "tutorial_src"]
myst_heading_anchors = 3
# Intersphinx needs the network; the build stays offline and warning-free.
intersphinx_mapping = {}

html_theme = "pydata_sphinx_theme"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_title = f"onnxfit {release}"

QUICK = os.environ.get("ONNXFIT_DOCS_QUICK", "") not in ("", "0")

sphinx_gallery_conf = {
    "examples_dirs": ["tutorial_src", "gallery"],
    "gallery_dirs": ["tutorial", "auto_examples"],
    # Every script runs during the build, except the slow ones in quick mode.
    "filename_pattern": r"/(?!slow_)[^/]+\.py$" if QUICK else r"/.+\.py$",
    "ignore_pattern": r"__init__\.py",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "matplotlib_animations": False,
    "show_memory": False,
    "plot_gallery": "True",
}

# Gallery scripts run on the docs machine's cores: keep onnxruntime and
# torch to what the build can have.
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", category=UserWarning, message="Matplotlib is currently using agg")


# The estimators' ``score`` methods inherit scikit-learn's docstrings, which
# point at labels of scikit-learn's user guide (``:ref:`accuracy
# <accuracy_score>```, ``r2_score``) that this project does not have: link
# them to scikit-learn's pages instead.
SKLEARN_GUIDE = "https://scikit-learn.org/stable/modules/model_evaluation.html#{}"
_SKLEARN_REF = re.compile(r":ref:`([^`<]+?)\s*<(accuracy_score|r2_score)>`")


def _sklearn_refs(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        lines[i] = _SKLEARN_REF.sub(
            lambda m: f"`{m.group(1)} <{SKLEARN_GUIDE.format(m.group(2).replace('_', '-'))}>`__",
            line)


def setup(app):
    app.connect("autodoc-process-docstring", _sklearn_refs)
