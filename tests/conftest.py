"""Backends under test: the conformance suite runs once per backend named in
``EMACORE_TEST_BACKENDS`` (comma-separated; default: every backend importable here is *not*
guessed: numpy and array_api_strict). A requested backend that cannot import is an error, never
a skip, so a broken install cannot pass CI silently.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest


@dataclass(frozen=True)
class Lib:
    """How the tests make and read arrays of one backend, on one device."""

    name: str
    backend: str
    xp: Any
    device: Any
    mutable: bool
    make: Callable[[np.ndarray], Any]
    read: Callable[[Any], np.ndarray]
    dtype: Callable[[str], Any]
    device_of: Callable[[Any], Any]
    set_value: Callable[[Any, np.ndarray], Any]  # returns the array to use from then on
    float64: bool = True  # False: jax without jax_enable_x64

    def __repr__(self) -> str:
        return f"Lib({self.name})"


def _numpy_lib() -> Lib:
    def set_value(x: Any, v: np.ndarray) -> Any:
        x[...] = v
        return x

    return Lib(
        name="numpy",
        backend="numpy",
        xp=np,
        device="cpu",
        mutable=True,
        make=lambda a: np.array(a, copy=True),
        read=lambda x: np.array(x, copy=True),
        dtype=lambda name: np.dtype(name),
        device_of=lambda x: "cpu",
        set_value=set_value,
    )


def _strict_lib() -> Lib:
    xp = importlib.import_module("array_api_strict")
    device = xp.Device("device1")  # a non-default device: placement must be kept
    cpu = xp.__array_namespace_info__().default_device()

    def read(x: Any) -> np.ndarray:
        return np.asarray(x.to_device(cpu))

    def set_value(x: Any, v: np.ndarray) -> Any:
        x[...] = xp.asarray(v, device=x.device)
        return x

    return Lib(
        name="array_api_strict",
        backend="array_api",
        xp=xp,
        device=device,
        mutable=True,
        make=lambda a: xp.asarray(np.array(a, copy=True), device=device),
        read=read,
        dtype=lambda name: getattr(xp, name),
        device_of=lambda x: x.device,
        set_value=set_value,
    )


def _torch_lib() -> Lib:
    torch = importlib.import_module("torch")

    def set_value(x: Any, v: np.ndarray) -> Any:
        with torch.no_grad():
            x.copy_(torch.from_numpy(np.asarray(v)))
        return x

    return Lib(
        name="torch",
        backend="torch",
        xp=torch,
        device=torch.device("cpu"),
        mutable=True,
        make=lambda a: torch.tensor(np.array(a, copy=True)),
        read=lambda x: x.detach().cpu().numpy().copy(),
        dtype=lambda name: getattr(torch, name),
        device_of=lambda x: x.device,
        set_value=set_value,
    )


# jax runs its conformance twice, in separate processes (`nox -s tests(jax)` and
# `tests(jax_x32)`): with jax_enable_x64, for the float64 cases, and without it, as most users
# run. Without x64 jax has no 64-bit dtypes: a test that makes a float64 (or int64) array or
# asks for the float64 dtype skips, saying the x64 process runs it; the rest run in float32.
JAX_X64_ENV = "EMACORE_JAX_X64"
_WIDE = ("float64", "complex128", "int64", "uint64")


def _jax_x64() -> bool:
    flag = os.environ.get(JAX_X64_ENV, "1")
    if flag not in ("0", "1"):
        raise pytest.UsageError(f"{JAX_X64_ENV} must be 0 or 1, got {flag!r}")
    return flag == "1"


def _needs_x64(dtype: str) -> None:
    if dtype in _WIDE and not _jax_x64():
        pytest.skip(f"{dtype} needs jax_enable_x64: the x64 jax session runs this case")


def _jax_lib() -> Lib:
    jax = importlib.import_module("jax")
    jax.config.update("jax_enable_x64", _jax_x64())
    jnp = importlib.import_module("jax.numpy")
    device = jax.devices()[0]

    def make(a: Any) -> Any:
        host = np.array(a, copy=True)
        _needs_x64(host.dtype.name)
        return jnp.asarray(host)

    def dtype(name: str) -> Any:
        _needs_x64(np.dtype(name).name)
        return jnp.dtype(name)

    return Lib(
        name="jax",
        backend="jax",
        xp=jnp,
        device=device,
        mutable=False,
        make=make,
        read=lambda x: np.array(x, copy=True),
        dtype=dtype,
        device_of=lambda x: next(iter(x.devices())),
        set_value=lambda x, v: jnp.asarray(np.asarray(v), dtype=x.dtype),  # a new array
        float64=_jax_x64(),
    )


_LIBS: dict[str, Callable[[], Lib]] = {
    "numpy": _numpy_lib,
    "array_api_strict": _strict_lib,
    "torch": _torch_lib,
    "jax": _jax_lib,
}


def requested_backends() -> list[str]:
    raw = os.environ.get("EMACORE_TEST_BACKENDS", "numpy,array_api_strict")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in _LIBS]
    if unknown:
        raise pytest.UsageError(f"EMACORE_TEST_BACKENDS names unknown backends {unknown}")
    return names


@pytest.fixture(params=requested_backends(), scope="session")
def lib(request: pytest.FixtureRequest) -> Lib:
    return _LIBS[request.param]()


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
