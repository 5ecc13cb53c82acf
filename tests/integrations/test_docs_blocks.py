"""The ``py-lightning`` and ``py-keras`` blocks of the docs run, in order, one process per
(tag, Keras backend): Keras reads ``KERAS_BACKEND`` at import, and Lightning writes its
checkpoints to the working directory (here a temporary one)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[2] / "docs"
REQUIRED = os.environ.get("EMACORE_TEST_INTEGRATIONS", "")
# tag -> (the frameworks its blocks import, the Keras backends to run them on)
TAGS = {
    "py-lightning": (("lightning", "torch"), [None]),
    "py-keras": (("keras",), ["jax", "torch"]),
}
CASES = [
    (tag, page, backend)
    for tag, (_, backends) in TAGS.items()
    for page in sorted(DOCS.rglob("*.md"))
    if f"```{tag}\n" in page.read_text()
    for backend in backends
]


def script(page: Path, tag: str) -> str:
    """The page's blocks of ``tag``, each on its own lines of the page (for tracebacks)."""
    text = page.read_text()
    code = ""
    for match in re.finditer(rf"```{tag}[^\n]*\n(.*?)```", text, flags=re.S):
        line = text.count("\n", 0, match.start(1))
        code += "\n" * (line - code.count("\n")) + match.group(1)
    return code


@pytest.mark.parametrize(
    ("tag", "page", "backend"),
    CASES,
    ids=[f"{tag}:{page.relative_to(DOCS)}:{backend or ''}" for tag, page, backend in CASES],
)
def test_docs_blocks_run(tag: str, page: Path, backend: str | None, tmp_path: Path) -> None:
    frameworks, _ = TAGS[tag]
    missing = [m for m in (*frameworks, backend) if m and importlib.util.find_spec(m) is None]
    if missing:
        if frameworks[0] in REQUIRED:
            raise AssertionError(f"{missing} not installed, but the {tag} blocks are required")
        pytest.skip(f"{missing} not installed; `nox -s integrations` runs the {tag} blocks")
    path = tmp_path / page.name.replace(".md", ".py")
    path.write_text(script(page, tag))
    env = {**os.environ, **({"KERAS_BACKEND": backend} if backend else {})}
    proc = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"{page}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_every_tag_has_blocks() -> None:
    assert {tag for tag, _, _ in CASES} == set(TAGS)
