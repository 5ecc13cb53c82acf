"""Every code block of the docs runs (blocks of one page share a namespace, in order).

```python blocks need numpy only and run in every session. Framework examples are tagged
```py-torch or ```py-jax and run in the session whose ``EMACORE_TEST_BACKENDS`` names that
framework; ``py-tf`` blocks (TensorFlow code shown for comparison) run where
``EMACORE_TEST_TF=1`` (``nox -s parity``, which installs TensorFlow). ``example-py`` blocks
include scripts of ``examples/`` that need several processes: ``tests/distributed`` runs them.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

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
    text = page.read_text()
    try:
        for match in re.finditer(rf"```{tag}[^\n]*\n(.*?)```", text, flags=re.S):
            # pad with blank lines so tracebacks give the block's line numbers in the page
            first = text.count("\n", 0, match.start(1))
            exec(compile("\n" * first + match.group(1), str(page), "exec"), namespace)
    finally:
        emacore.reset_registry()
        _reset_framework_caches(tag)


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
