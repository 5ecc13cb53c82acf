"""A requested GPU run fails where its gpu-marked tests would skip (tests/conftest.py, "gpu").

Each case runs pytest in a subprocess over a scratch folder whose conftest.py is the text of
tests/conftest.py, so the hooks under test are the real ones, with this repository's pytest
settings (strict markers, -ra).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONFTEST = Path(__file__).parents[1] / "conftest.py"
INI = """\
[pytest]
addopts = -ra --strict-markers -p no:cacheprovider
filterwarnings = error
markers =
    gpu: needs a CUDA device
"""
TESTS = """\
import pytest


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="no CUDA device on this machine")
def test_marked_skipif():
    pass


@pytest.mark.gpu
def test_marked_skip_in_body():
    pytest.skip("jax sees no gpu device")


@pytest.mark.skip(reason="not a gpu test")
def test_unmarked_skip():
    pass
"""
PASSING = """\
import pytest


@pytest.mark.gpu
def test_marked_passes():
    pass


@pytest.mark.skip(reason="not a gpu test")
def test_unmarked_skip():
    pass
"""


def _pytest(tmp_path: Path, tests: str, require: str | None, *args: str) -> tuple[int, str]:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_scratch.py").write_text(textwrap.dedent(tests))
    env = {k: v for k, v in os.environ.items() if k != "EMACORE_REQUIRE_GPU"}
    if require is not None:
        env["EMACORE_REQUIRE_GPU"] = require
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.returncode, out.stdout + out.stderr


@pytest.mark.parametrize("require", [None, "0"])
def test_unrequested_gpu_tests_skip_with_their_reason(tmp_path: Path, require: str | None) -> None:
    rc, out = _pytest(tmp_path, TESTS, require)
    assert rc == 0, out
    assert "3 skipped" in out, out
    assert "SKIPPED [1] test_scratch.py:4: no CUDA device on this machine" in out, out
    assert "jax sees no gpu device" in out, out


def test_a_requested_gpu_run_fails_where_a_gpu_test_would_skip(tmp_path: Path) -> None:
    rc, out = _pytest(tmp_path, TESTS, "1")
    assert rc == 1, out
    # FAILED (in the call phase), not ERROR; the test that is not gpu-marked still skips
    assert "2 failed, 1 skipped" in out, out
    assert "FAILED test_scratch.py::test_marked_skipif" in out, out
    assert "FAILED test_scratch.py::test_marked_skip_in_body" in out, out
    assert (
        "EMACORE_REQUIRE_GPU=1 (a GPU run was requested), but this gpu-marked test would skip: "
        "no CUDA device on this machine" in out
    ), out
    assert "would skip: jax sees no gpu device" in out, out


def test_a_requested_gpu_run_passes_when_its_gpu_tests_pass(tmp_path: Path) -> None:
    rc, out = _pytest(tmp_path, PASSING, "1")
    assert rc == 0, out
    assert "1 passed, 1 skipped" in out, out


@pytest.mark.parametrize("select", [["-m", "not gpu"], ["-m", "gpu", "-k", "nothing"]])
def test_a_requested_gpu_run_that_passes_no_gpu_test_fails(
    tmp_path: Path, select: list[str]
) -> None:
    rc, out = _pytest(tmp_path, PASSING, "1", *select)
    assert rc == 1, out
    assert "EMACORE_REQUIRE_GPU=1 (a GPU run was requested), but no gpu-marked test passed" in out
