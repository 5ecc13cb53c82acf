"""The README's python blocks run as written, each on its own, and print what their comments
say they print (the rule of tests/core/test_docs.py, whose checker this module uses)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the shared checker
from test_docs import blocks, run_blocks

README = Path(__file__).parents[2] / "README.md"
BLOCKS = blocks(README.read_text(), "python")
# how many printed outputs each block compares; at least these many must be found
EXPECTED_OUTPUTS = [1, 1, 1]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(block: tuple[int, str]) -> None:
    compared = run_blocks([block], str(README), {"__name__": "__readme__"})
    assert compared >= EXPECTED_OUTPUTS[BLOCKS.index(block)], compared


def test_readme_has_blocks() -> None:
    assert len(BLOCKS) == len(EXPECTED_OUTPUTS)
