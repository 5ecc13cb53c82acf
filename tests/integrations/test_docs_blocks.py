"""The ``py-lightning`` and ``py-keras`` blocks of the docs run, in order, one process per
(tag, Keras backend): Keras reads ``KERAS_BACKEND`` at import, and Lightning writes its
checkpoints to the working directory (here a temporary one). They print what their comments
say they print: the process runs them with the checker of tests/core/test_docs.py, whose
module docstring states the rule."""

from __future__ import annotations

import importlib.util
import os
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


# (tag, page) -> how many printed outputs its blocks compare; at least these many must be found
EXPECTED_OUTPUTS = {("py-lightning", "integrations.md"): 3, ("py-keras", "integrations.md"): 2}
CHECKER = Path(__file__).parents[1] / "core"


def script(page: Path, tag: str) -> str:
    """A script that runs the page's blocks of ``tag`` with the docs' checker."""
    return (
        "import sys\n"
        f"sys.path.insert(0, {str(CHECKER)!r})\n"
        "from pathlib import Path\n"
        "from test_docs import blocks, run_blocks\n"
        f"page = Path({str(page)!r})\n"
        f"blocks = blocks(page.read_text(), {tag!r})\n"
        "compared = run_blocks(blocks, str(page), {'__name__': '__main__'})\n"
        "print('compared', compared)\n"
    )


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
    compared = int(proc.stdout.split()[-1])
    assert compared >= EXPECTED_OUTPUTS[tag, page.name], proc.stdout


def test_every_tag_has_blocks() -> None:
    assert {tag for tag, _, _ in CASES} == set(TAGS)
    assert {(tag, page.name) for tag, page, _ in CASES} == set(EXPECTED_OUTPUTS)
