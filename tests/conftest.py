"""Backends under test: the conformance suite runs once per backend named in
``EMACORE_TEST_BACKENDS`` (comma-separated; default: every backend importable here is *not*
guessed: numpy and array_api_strict). A requested backend that cannot import is an error, never
a skip, so a broken install cannot pass CI silently. The ``lib`` fixture and the factories of
each backend's `Lib` are emacore_testing's (the conformance kit, `emacore_testing.plugin`).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

# The `lib` fixture, one `Lib` per backend of EMACORE_TEST_BACKENDS, comes from the conformance
# kit's plugin: the suite of tests/conformance lives in emacore_testing.conformance, and runs
# here exactly as a third-party backend runs it from its own repository.
pytest_plugins = ["emacore_testing.plugin"]


# --- gpu ---
# A requested GPU run (EMACORE_REQUIRE_GPU=1: set by `nox -s gpu` and benchmarks/gpu_check.sh)
# must run its gpu-marked tests. A gpu-marked test that would skip (no CUDA device, a CPU build
# of torch, jax without its CUDA plugin: whatever skipif or pytest.skip says) FAILS instead,
# quoting the skip's reason; and a run in which no gpu-marked test passed fails (deselected
# tests or a skipped module are no GPU check). Without the variable, a gpu-marked test skips as
# written and -ra prints the reason. tests/core/test_gpu_marking.py runs both cases.

REQUIRE_GPU_ENV = "EMACORE_REQUIRE_GPU"
_GPU_SKIP = pytest.StashKey[str]()
_GPU_PASSED = pytest.StashKey[int]()


def _gpu_required(item: pytest.Item) -> bool:
    required = os.environ.get(REQUIRE_GPU_ENV, "") not in ("", "0")
    return required and item.get_closest_marker("gpu") is not None


def _gpu_failure(reason: str) -> str:
    return (
        f"{REQUIRE_GPU_ENV}=1 (a GPU run was requested), but this gpu-marked test would skip: "
        f"{reason}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    try:
        return (yield)
    except pytest.skip.Exception as exc:  # a skip or skipif mark, evaluated at setup
        if not _gpu_required(item):
            raise
        item.stash[_GPU_SKIP] = exc.msg  # failed in the call phase: FAILED, not ERROR
        return None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    if _GPU_SKIP in item.stash:
        pytest.fail(_gpu_failure(item.stash[_GPU_SKIP]), pytrace=False)
    try:
        return (yield)
    except pytest.skip.Exception as exc:  # pytest.skip() or importorskip in the test's body
        if not _gpu_required(item):
            raise
        pytest.fail(_gpu_failure(exc.msg), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if _gpu_required(item) and report.when == "call" and report.passed:
        item.config.stash[_GPU_PASSED] = item.config.stash.get(_GPU_PASSED, 0) + 1
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    required = os.environ.get(REQUIRE_GPU_ENV, "") not in ("", "0")
    if required and session.config.stash.get(_GPU_PASSED, 0) == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"{REQUIRE_GPU_ENV}=1 (a GPU run was requested), but no gpu-marked test passed",
                red=True,
            )
        if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- end gpu ---


# --- hypothesis profiles ---
# HYPOTHESIS_PROFILE picks one; "ci", the default everywhere, is derandomized (a failure in CI
# reproduces on any machine) and has no deadline (CI machines are slow and shared). "fuzz-long"
# explores: random, and the checkpoint fuzzers draw max_examples from it (the nox session
# "fuzz_long"). Tests that pin max_examples keep their own counts under every profile.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, database=None)
_hypothesis_settings.register_profile("dev", deadline=None)  # random, for local exploration
_hypothesis_settings.register_profile(
    "fuzz-long", deadline=None, max_examples=5_000, database=None, print_blob=True
)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# --- end hypothesis profiles ---
