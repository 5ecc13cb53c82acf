"""Every ```py-jax block in docs/ runs (blocks of one page share a namespace, in order).

```python blocks are numpy-only and run in every session (tests/core/test_docs.py); jax
examples are tagged py-jax and run here, where ``EMACORE_TEST_BACKENDS`` names jax.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

if "jax" not in os.environ.get("EMACORE_TEST_BACKENDS", ""):
    pytest.skip(
        "jax is not among EMACORE_TEST_BACKENDS (the jax nox session runs these)",
        allow_module_level=True,
    )

import jax

import emacore

DOCS = Path(__file__).parents[2] / "docs"
BLOCK = re.compile(r"```py-jax[^\n]*\n(.*?)```", flags=re.S)
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```py-jax" in p.read_text())


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_page_jax_blocks_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"__docs_jax_{page.stem}__"}
    try:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            # pad with blank lines so tracebacks give the block's line numbers in the page
            first = text.count("\n", 0, match.start(1))
            exec(compile("\n" * first + match.group(1), str(page), "exec"), namespace)
    finally:
        emacore.reset_registry()
        jax.clear_caches()  # compiled examples leave no caches behind


def test_docs_have_jax_pages() -> None:
    assert any(p.name == "jax.md" for p in PAGES)
