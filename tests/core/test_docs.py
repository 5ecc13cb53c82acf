"""Every ```python block in docs/ runs (blocks of one page share a namespace, in order)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import emacore

DOCS = Path(__file__).parents[2] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_page_blocks_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"__docs_{page.stem}__"}
    try:
        for code in re.findall(r"```python[^\n]*\n(.*?)```", page.read_text(), flags=re.S):
            exec(compile(code, str(page), "exec"), namespace)
    finally:
        emacore.reset_registry()


def test_docs_have_runnable_pages() -> None:
    assert len(PAGES) >= 3
