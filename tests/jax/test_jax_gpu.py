"""jax on a GPU: the update runs where the parameters are, shardings and offload kept, and the
numbers are numpy's float64 reference rounded to float32.

Marked ``gpu``: they skip, with the reason printed, where jax has no GPU backend (the CPU build
of jax from PyPI), and fail instead under ``EMACORE_REQUIRE_GPU=1`` (tests/conftest.py).
``EMACORE_TEST_GPU_PLATFORM=cpu`` runs them on jax's CPU device, to check the tests themselves
on a machine without a GPU (benchmarks/gpu_check.sh --device cpu); it is refused together with
EMACORE_REQUIRE_GPU, so a requested GPU run cannot pass on the CPU.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

if "jax" not in os.environ.get("EMACORE_TEST_BACKENDS", ""):
    pytest.skip(
        "jax is not among EMACORE_TEST_BACKENDS (benchmarks/gpu_check.sh names it)",
        allow_module_level=True,
    )

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

import emacore
from emacore import functional as F

PLATFORM = os.environ.get("EMACORE_TEST_GPU_PLATFORM", "gpu")
DECAY = 0.9
RTOL, ATOL = 2e-6, 1e-6  # float32 arithmetic against the float64 reference, 6 steps


def _device() -> Any:
    if PLATFORM != "gpu" and os.environ.get("EMACORE_REQUIRE_GPU", "") not in ("", "0"):
        pytest.fail(
            f"EMACORE_TEST_GPU_PLATFORM={PLATFORM!r} with EMACORE_REQUIRE_GPU=1: a requested GPU "
            "run must run on the GPU"
        )
    try:
        return jax.devices(PLATFORM)[0]
    except RuntimeError as exc:  # no backend of that platform: the CPU build of jax
        pytest.skip(f"jax has no {PLATFORM} device ({jax.default_backend()} only): {exc}")


@pytest.fixture
def device() -> Any:
    return _device()


def _steps(seed: int, n: int = 6) -> list[dict[str, np.ndarray]]:
    """Parameter values (float32) at each step: a large leaf, a matrix and a small bias."""
    rng = np.random.default_rng(seed)
    shapes = {"big": (300, 301), "w": (17, 5), "b": (5,)}
    return [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)
    ]


def _reference(steps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The EMA in float64 with numpy: s0 = p0, s = d s + (1 - d) p."""
    ref = {k: v.astype(np.float64) for k, v in steps[0].items()}
    for step in steps[1:]:
        ref = {k: DECAY * ref[k] + (1 - DECAY) * step[k].astype(np.float64) for k in ref}
    return ref


def _on(tree: dict[str, np.ndarray], where: Any) -> dict[str, jax.Array]:
    return {k: jax.device_put(v, where) for k, v in tree.items()}


@pytest.mark.gpu
def test_stateful_update_on_the_device_gives_the_float64_reference(device: Any) -> None:
    steps = _steps(0)
    ema = emacore.EMA(DECAY)
    for step in steps:
        params = _on(step, device)
        ema.apply(params)
    avg = ema.average(params)
    numpy_ema = emacore.EMA(DECAY)  # emacore's numpy backend, same float32 inputs
    for step in steps:
        numpy_ema.apply(step)
    numpy_avg = numpy_ema.average(steps[-1])
    for k, want in _reference(steps).items():
        assert isinstance(avg[k], jax.Array) and avg[k].dtype == jnp.float32
        assert avg[k].devices() == {device}, (k, avg[k].devices())
        np.testing.assert_allclose(np.asarray(avg[k]), want, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(avg[k]), numpy_avg[k], rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
def test_shardings_are_kept_on_the_device(device: Any) -> None:
    mesh = Mesh(np.array([device]), ("data",))
    named = NamedSharding(mesh, PartitionSpec("data"))
    single = SingleDeviceSharding(device)
    steps = _steps(1)
    where = {"big": named, "w": named, "b": single}
    ema = emacore.EMA(DECAY)
    for step in steps:
        params = {k: jax.device_put(v, where[k]) for k, v in step.items()}
        ema.apply(params)
    avg = ema.average(params)
    for k, want in _reference(steps).items():
        assert avg[k].sharding.is_equivalent_to(where[k], avg[k].ndim), (k, avg[k].sharding)
        np.testing.assert_allclose(np.asarray(avg[k]), want, rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
def test_functional_update_in_jit_donates_on_the_device(device: Any) -> None:
    steps = _steps(2)
    state = F.init(_on(steps[0], device), traceable=True)
    update = jax.jit(lambda s, p: F.update(s, p, DECAY), donate_argnums=0)
    for step in steps[1:]:
        held = max(jax.tree_util.tree_leaves(state), key=lambda x: x.size)
        state = update(state, _on(step, device))
        assert held.is_deleted()  # donated: the old shadows' memory became the new ones'
    avg = F.average(state)
    for k, want in _reference(steps).items():
        assert avg[k].devices() == {device}, (k, avg[k].devices())
        np.testing.assert_allclose(np.asarray(avg[k]), want, rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
def test_shadows_offloaded_to_pinned_host_memory(device: Any) -> None:
    steps = _steps(3)
    ema = emacore.EMA(DECAY, device="pinned_host")
    for step in steps:
        params = _on(step, device)
        ema.apply(params)
    (group,) = ema._groups.values()
    assert {a.sharding.memory_kind for a in group.state.shadow.arrays} == {"pinned_host"}
    avg = ema.average(params)
    for k, want in _reference(steps).items():
        assert avg[k].devices() == {device}
        np.testing.assert_allclose(np.asarray(avg[k]), want, rtol=RTOL, atol=ATOL)
