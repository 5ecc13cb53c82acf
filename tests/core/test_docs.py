"""Every code block of the docs runs (blocks of one page share a namespace, in order), and
prints what its comments say it prints.

```python blocks need numpy only and run in every session. Framework examples are tagged
```py-torch or ```py-jax and run in the session whose ``EMACORE_TEST_BACKENDS`` names that
framework; ``py-tf`` blocks (TensorFlow code shown for comparison) run where
``EMACORE_TEST_TF=1`` (``nox -s parity``, which installs TensorFlow). ``example-py`` blocks
include scripts of ``examples/`` that need several processes: ``tests/distributed`` runs them.
The README's blocks (tests/core/test_readme.py) and the ``py-lightning``/``py-keras`` blocks
(tests/integrations/test_docs_blocks.py) go through the same checker, :func:`run_blocks`.

The printed-output rule. A block runs one top-level statement at a time, its stdout captured
with the line of the statement that was running at each write. A statement's *expected output*
is the comment at the end of the lines that printed (``print(x)  # [0.9 0.9]``, also inside a
``with`` or ``try``) or, where none of them has one, the comment lines right below the
statement (an output of several lines, a loop's). Every statement that prints has one, and what
it printed must match it:

- whitespace is normalised on both sides (runs of spaces and newlines count as one space), so
  an output may be wrapped over comment lines;
- ``...`` in the comment stands for any text, as doctest's ELLIPSIS (a temporary path, a list
  of installed plugins, the digits after the shown ones: ``4.138...``); a comment that is only
  ``...`` matches nothing;
- text after ``": "`` may explain the output (``# [1. 2.]: the shadow starts as a copy``): the
  comment matches if it, or its text before some ``": "``, matches the output.

Numbers are compared as text, digit for digit: where a doc shows a rounded value, the code
prints the rounded value (``round(x, 4)``). A comment on a statement that prints nothing
explains the code and is not compared. ``EXPECTED_OUTPUTS`` holds how many outputs each page
compares, so a change to this rule cannot make the check vacuous without a test failing.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import sys
import tokenize
from collections.abc import Callable, Iterable
from pathlib import Path
from types import CodeType

import pytest

import emacore

DOCS = Path(__file__).parents[2] / "docs"
REQUESTED = os.environ.get("EMACORE_TEST_BACKENDS", "")
TAGS = ["python"] + [f"py-{lib}" for lib in ("torch", "jax") if lib in REQUESTED]
if os.environ.get("EMACORE_TEST_TF") == "1":
    TAGS = ["py-tf"]
CASES = [
    (tag, page)
    for tag in TAGS
    for page in sorted(DOCS.rglob("*.md"))
    if f"```{tag}\n" in page.read_text() or f"```{tag} " in page.read_text()
]
# (tag, page) -> how many printed outputs its blocks compare; at least these many must be found
EXPECTED_OUTPUTS = {
    ("python", "checkpoints.md"): 5,
    ("python", "concepts.md"): 32,
    ("python", "index.md"): 3,
    ("python", "plugins.md"): 4,
    ("python", "posthoc.md"): 6,
    ("python", "tensorflow.md"): 6,
    ("python", "training.md"): 7,
    ("py-torch", "checkpoints.md"): 2,
    ("py-torch", "tensorflow.md"): 4,
    ("py-torch", "torch.md"): 14,
    ("py-jax", "jax.md"): 6,
    ("py-jax", "tensorflow.md"): 4,
    ("py-tf", "tensorflow.md"): 4,
}


def blocks(text: str, tag: str) -> list[tuple[int, str]]:
    """The ``tag`` code blocks of a markdown text: (line of the block's first line - 1, code)."""
    return [
        (text.count("\n", 0, match.start(1)), match.group(1))
        for match in re.finditer(rf"```{tag}[^\n]*\n(.*?)```", text, flags=re.S)
    ]


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Line -> text of the comment on it (without ``#``), and the lines that are only a comment."""
    comments: dict[int, str] = {}
    alone: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            comments[row] = token.string[1:].strip()
            if not token.line[:col].strip():
                alone.add(row)
    return comments, alone


def expected_output(
    stmt: ast.stmt, printed_at: Iterable[int], comments: dict[int, str], alone: set[int]
) -> str | None:
    """The comment that states what ``stmt`` prints (see the module docstring), if any.

    ``printed_at`` holds the lines of ``stmt`` that printed: a ``print`` inside a ``with``
    or ``try`` carries its output at the end of its own line.
    """
    ends = sorted({_statement_end(stmt, line) for line in printed_at})
    trailing = [comments[end] for end in ends if end in comments and end not in alone]
    if trailing:
        return " ".join(trailing)
    end = stmt.end_lineno or stmt.lineno
    below = []
    while end + 1 in alone:
        end += 1
        below.append(comments[end])
    return " ".join(below) if below else None


def _statement_end(stmt: ast.stmt, line: int) -> int:
    """The last line of the innermost simple statement of ``stmt`` on ``line``."""
    spans = [
        (node.end_lineno - node.lineno, node.end_lineno)
        for node in ast.walk(stmt)
        if isinstance(node, ast.stmt)
        and not hasattr(node, "body")
        and node.end_lineno is not None
        and node.lineno <= line <= node.end_lineno
    ]
    return min(spans)[1] if spans else line


class _Stdout(io.StringIO):
    """Captures stdout and the line of ``code`` that was running at each write."""

    def __init__(self, code: CodeType) -> None:
        super().__init__()
        self.code = code
        self.lines: list[int] = []

    def write(self, text: str, /) -> int:
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code is not self.code:
            frame = frame.f_back
        if frame.f_code is self.code and frame.f_lineno is not None:
            self.lines.append(frame.f_lineno)
        return super().write(text)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def output_matches(printed: str, expected: str) -> bool:
    """Whether ``expected`` (a comment) states ``printed`` (see the module docstring)."""
    printed = _normalise(printed)
    expected = _normalise(expected)
    cuts = [m.start() for m in re.finditer(": ", expected)] + [len(expected)]
    for cut in cuts:
        stated = expected[:cut]
        if not stated.replace("...", "").strip():
            continue  # an output of only "..." would match anything
        pattern = ".*".join(re.escape(part) for part in stated.split("..."))
        if re.fullmatch(pattern, printed, flags=re.S):
            return True
    return False


def run_blocks(
    code_blocks: Iterable[tuple[int, str]],
    filename: str,
    namespace: dict[str, object],
    before_each: Callable[[], None] = lambda: None,
) -> int:
    """Run the blocks statement by statement in ``namespace``; check each printed output.

    ``code_blocks`` holds (lines before the block in ``filename``, code), so that tracebacks
    and failures give the page's line numbers. Returns how many outputs were compared; raises
    AssertionError listing every output that differs from its comment or has none.
    """
    compared = 0
    wrong: list[str] = []
    for first, code in code_blocks:
        source = "\n" * first + code
        comments, alone = _comments(source)
        for stmt in ast.parse(source, filename).body:
            before_each()
            code = compile(ast.Module([stmt], []), filename, "exec")
            out = _Stdout(code)
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
            if not out.getvalue():
                continue
            expected = expected_output(stmt, out.lines, comments, alone)
            where = f"{filename}:{stmt.end_lineno}"
            if expected is None:
                wrong.append(f"{where}: prints {out.getvalue()!r} but no comment shows it")
                continue
            compared += 1
            if not output_matches(out.getvalue(), expected):
                wrong.append(f"{where}: prints {out.getvalue()!r}, the comment says {expected!r}")
    if wrong:
        raise AssertionError("\n".join(wrong))
    return compared


def _reset_framework_caches(tag: str) -> None:
    if tag == "py-torch":
        import torch

        torch._dynamo.reset()  # compiled examples leave no caches behind
    elif tag == "py-jax":
        import jax

        jax.clear_caches()


@pytest.mark.parametrize(
    ("tag", "page"), CASES, ids=[f"{tag}:{p.relative_to(DOCS)}" for tag, p in CASES]
)
def test_docs_page_blocks_run(tag: str, page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"__docs_{page.stem}__"}
    try:
        compared = run_blocks(blocks(page.read_text(), tag), str(page), namespace)
    finally:
        emacore.reset_registry()
        _reset_framework_caches(tag)
    assert compared >= EXPECTED_OUTPUTS.get((tag, page.relative_to(DOCS).as_posix()), 0)


def test_every_page_that_prints_has_its_count() -> None:
    pages = {
        (tag, page.relative_to(DOCS).as_posix())
        for tag in ("python", "py-torch", "py-jax", "py-tf")
        for page in DOCS.rglob("*.md")
        if re.search(r"^\s*print\(", "".join(c for _, c in blocks(page.read_text(), tag)), re.M)
    }
    assert pages == set(EXPECTED_OUTPUTS)


@pytest.mark.parametrize(
    ("printed", "comment"),
    [
        ("[0.9 0.9]\n", "[0.9 0.9]"),
        ("[1. 2.]\n", "[1. 2.]: the shadow starts as a copy"),
        ("KeyError: 'w'\n", "KeyError: 'w'"),
        ("[4.1381 4.1381]\n", "[4.138... 4.138...]"),
        ("1\n2\n", "1 2"),
        ("{'a': 1,\n 'b': 2}\n", "{'a': 1, 'b': 2}: wrapped as printed"),
    ],
)
def test_an_output_matches_its_comment(printed: str, comment: str) -> None:
    assert output_matches(printed, comment)


@pytest.mark.parametrize(
    ("printed", "comment"),
    [
        ("[0.9 0.9]\n", "[0.9 0.8]"),
        ("4.555\n", "4.55"),
        ("4.5\n", "4.55: close"),
        ("12\n", "1: twelve"),
        ("KeyError: 'w'\n", "KeyError: 'b'"),
        ("[4.1391 4.1381]\n", "[4.138... 4.138...]"),
        ("anything\n", "..."),
        ("anything\n", "...: an explanation"),
        ("1\n2\n", "12"),
    ],
)
def test_an_output_differs_from_its_comment(printed: str, comment: str) -> None:
    assert not output_matches(printed, comment)


def _check(code: str) -> int:
    return run_blocks([(0, code)], "<doc>", {"__name__": "__doc__"})


def test_the_checker_reads_each_kind_of_comment() -> None:
    code = (
        "x = 4.5  # a comment on a statement that prints nothing: not compared\n"
        "print(x)  # 4.5\n"
        "for i in range(2):\n"
        "    print(i)\n"
        "# 0\n"
        "# 1\n"
        "try:\n"
        "    print(x + 1)  # 5.5: the comment on the line that printed\n"
        "finally:\n"
        "    x = 0  # the statement's last line, which printed nothing\n"
    )
    assert _check(code) == 3


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("print(4.5)  # 4.6\n", "<doc>:1: prints '4.5\\n', the comment says '4.6'"),
        ("print(1)\nprint(2)  # 2\n", "<doc>:1: prints '1\\n' but no comment shows it"),
        ("for i in range(2):\n    print(i)\n# 0 2\n", "<doc>:2: prints '0\\n1\\n'"),
        ("if True:\n    print(1)  # 1\n    print(2)\n", "<doc>:3: prints '1\\n2\\n'"),
    ],
)
def test_the_checker_reports_a_wrong_or_missing_output(code: str, message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        _check(code)


def test_every_requested_framework_has_a_page() -> None:
    for tag in TAGS:
        assert sum(1 for t, _ in CASES if t == tag) >= (3 if tag == "python" else 1), tag


def test_the_seed_example_prints_the_same_numbers_everywhere() -> None:
    """The TensorFlow page's seed example: every framework's block prints TF's numbers."""
    text = (DOCS / "tensorflow.md").read_text()
    blocks: dict[str, str] = {}
    for tag, body in re.findall(r"```(py-tf|python|py-torch|py-jax)\n(.*?)```", text, re.S):
        blocks.setdefault(tag, body)  # the first block of each: the seed example
    printed = {
        tag: re.findall(r"# ([0-9.]+)$", blocks[tag], flags=re.M)
        for tag in ("py-tf", "python", "py-torch", "py-jax")
    }
    assert printed["py-tf"] == ["0.0", "4.5", "4.555", "4.60945"]
    assert all(p == printed["py-tf"] for p in printed.values()), printed
    for tag in ("python", *[t for t in TAGS if t in ("py-torch", "py-jax")]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(blocks[tag], {"__name__": "__docs_seed__"})
        assert out.getvalue().split() == printed["py-tf"], (tag, out.getvalue())
