"""The conformance kit (emacore_testing) run as a third-party backend runs it: from a scratch
repository whose conftest.py defines its own ``lib`` fixture, in a subprocess pytest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import emacore_testing.conformance as conformance

# A third party's conftest.py: its own `lib` (here numpy's, from the kit's factory; a plugin
# returns a Lib of its arrays), and a derandomized hypothesis profile, as CI wants.
CONFTEST = """\
import pytest
from hypothesis import settings

from emacore_testing import Lib, numpy_lib

settings.register_profile("third-party-ci", derandomize=True, database=None)
settings.load_profile("third-party-ci")


@pytest.fixture(scope="session")
def lib() -> Lib:
    return {lib}
"""
TESTS = "from emacore_testing.conformance import *  # noqa: F403\n"
# numpy_lib with a `read` that drops the last element: every value check must catch it
BROKEN = (
    "__import__('dataclasses').replace(numpy_lib(), "
    "read=lambda x: __import__('numpy').array(x, copy=True).ravel()[:-1])"
)


PYTEST_ARGS = ("-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-W", "error")


def _run_kit(tmp_path: Path, lib: str, *args: str) -> tuple[int, str]:
    (tmp_path / "conftest.py").write_text(CONFTEST.format(lib=lib))
    (tmp_path / "test_emacore_conformance.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMACORE_")}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", *PYTEST_ARGS, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.returncode, out.stdout + out.stderr


def _count(kind: str, output: str) -> int:
    found = re.search(rf"(\d+) {kind}", output.splitlines()[-1])
    return int(found.group(1)) if found else 0


def test_every_conformance_module_is_exported_and_run_here() -> None:
    here = Path(__file__).parents[1] / "conformance"
    thin = tuple(sorted(p.stem for p in here.glob("test_*.py")))
    assert thin == conformance.MODULES
    assert len(conformance.__all__) > 100, conformance.__all__


@pytest.mark.slow
def test_a_third_party_runs_the_whole_suite_with_its_own_lib(tmp_path: Path) -> None:
    code, output = _run_kit(tmp_path, "numpy_lib()")
    assert code == 0, output[-4000:]
    passed, skipped = _count("passed", output), _count("skipped", output)
    # every test of tests/conformance for one backend (948 here when this was written), and
    # only the few that numpy cannot run skip (bfloat16, torch modules)
    assert passed > 900 and skipped < 10, output.splitlines()[-1]


def test_a_broken_lib_fails_the_suite(tmp_path: Path) -> None:
    code, output = _run_kit(tmp_path, BROKEN, "-x")
    assert code == 1 and _count("failed", output) == 1, output[-4000:]
