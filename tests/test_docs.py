"""The FAQ (docs/faq.md) has an entry for every error message of onnxfit
that tells the user what to do.

Messages are read from the sources: the string (or f-string, its fixed
parts) given to each ``raise SomethingError(...)`` under ``onnxfit/``.  A
message "suggests an action" when it contains one of the verbs of
``ACTION``.  The FAQ quotes the stable part of each message on its own line
as ``> `fragment```, ``…`` standing for the variable parts; each such
message must contain one of the fragments.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "docs" / "faq.md"

ACTION = re.compile(
    r"\b(use|set|give|pass|passed|freeze|declare|export|install|upgrade|reinstall|leave|"
    r"refit|call fit|convert|train (it|the|another|an|a)|name (a|the|that)|make the graph|"
    r"take the diagonal|choose one of|pip)\b",
    re.IGNORECASE,
)


def _text(node):
    """The fixed text of a message expression; ``{}`` for what varies."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) if not isinstance(v, ast.FormattedValue) else "{}"
                       for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left) + _text(node.right)
    return "{}"


def error_messages():
    """(file:line, message) of each ``raise X(message, ...)`` in onnxfit/."""
    found = []
    for path in sorted((ROOT / "onnxfit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                    and node.exc.args):
                message = " ".join(_text(node.exc.args[0]).split())
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", message))
    return found


def faq_fragments():
    fragments = re.findall(r"^> `(.+)`\s*$", FAQ.read_text(encoding="utf-8"), re.MULTILINE)
    return [[part for part in f.split("…")] for f in fragments]


def _quotes(message, parts):
    position = 0
    for part in parts:
        found = message.find(part.strip() if len(parts) > 1 else part, position)
        if found < 0:
            return False
        position = found + len(part.strip())
    return True


ACTION_MESSAGES = [(where, m) for where, m in error_messages() if ACTION.search(m)]


def test_messages_found():
    # The parser still finds the messages (a refactoring did not hide them).
    assert len(error_messages()) > 100
    assert len(ACTION_MESSAGES) > 40


@pytest.mark.parametrize("where, message", ACTION_MESSAGES,
                         ids=[where for where, _ in ACTION_MESSAGES])
def test_faq_covers_message(where, message):
    fragments = faq_fragments()
    assert any(_quotes(message, parts) for parts in fragments), (
        f"{where}: no entry of docs/faq.md quotes this message (add one, with a line "
        f"'> `<stable part of the message>`'):\n{message}")


def test_faq_fragments_are_used():
    # Every fragment the FAQ quotes still matches some message (or the
    # divergence message, built outside a raise).
    messages = [m for _, m in error_messages()]
    messages.append((ROOT / "onnxfit" / "divergence.py").read_text(encoding="utf-8"))
    stale = ["…".join(parts) for parts in faq_fragments()
             if not any(_quotes(m, parts) for m in messages)]
    assert not stale, f"docs/faq.md quotes messages onnxfit no longer has: {stale}"
