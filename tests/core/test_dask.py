"""dask arrays through the portable ``array_api`` backend, against numpy float64/float32 math.

dask arrays have no ``__array_namespace__``: array-api-compat knows them, and so the portable
backend owns them. Every number is checked against the update written here in numpy, in the
same dtype and the same order of operations (``s - (s - p) * (1 - d)``), so the two agree
bit for bit. The subprocess test needs no dask; the others are skipped without it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emacore
from emacore import functional as F
from emacore._plugins import resolve

CHUNKS = 2  # (3, 4) leaves in 2x2 chunks: 4 chunks each, so the graph has work to do
STEPS = 6


@pytest.fixture
def da() -> Any:
    return pytest.importorskip(
        "dask.array", reason="dask is not installed (pip install 'dask[array]')"
    )


def _values(dtype: str, steps: int = STEPS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 4)).astype(dtype) for _ in range(steps)]


def _ema(values: list[np.ndarray], decay: float, *, zero_debias: bool = False) -> np.ndarray:
    """The stateful convention in numpy: the shadow starts at the first value (or zero) and
    every value, the first included, is one update."""
    s = np.zeros_like(values[0]) if zero_debias else values[0].copy()
    for v in values:
        s = s - (s - v) * (1.0 - decay)
    if zero_debias:  # the exact correction, computed in float64 and cast last
        return s / np.asarray(1.0 - decay ** len(values), dtype=s.dtype)
    return s


def _read(da: Any, x: Any, dtype: str) -> np.ndarray:
    """A dask array of ``dtype`` and shape (3, 4), computed."""
    assert isinstance(x, da.Array), type(x)
    assert x.dtype == np.dtype(dtype) and x.shape == (3, 4)
    out = x.compute()
    assert isinstance(out, np.ndarray)
    return out


def test_resolving_numpy_or_refusing_an_object_imports_no_framework() -> None:
    # the fallback asks array-api-compat, which looks in sys.modules: nothing is imported
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import emacore
        from emacore._plugins import get_registry

        registry = get_registry()
        assert registry.resolve(np.zeros(2)).name == "numpy"
        assert registry.get("array_api").owns(np.zeros(2))
        try:
            registry.resolve(object())
        except emacore.UnknownBackendError as exc:
            assert "array-api-compat" in str(exc), exc
        else:
            raise AssertionError("object() was resolved")
        loaded = sorted(m for m in ("dask", "cupy", "sparse", "ndonnx", "torch", "jax")
                        if m in sys.modules)
        print(loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_dask_arrays_belong_to_the_portable_backend(da: Any) -> None:
    x = da.from_array(np.zeros((3, 4)), chunks=CHUNKS)
    assert resolve(x) is emacore.get_backend("array_api")
    assert emacore.get_backend("array_api").owns(x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stateful_several_decays_match_numpy(da: Any, dtype: str) -> None:
    values = _values(dtype)
    ema = emacore.ExponentialMovingAverage([0.9, 0.5])
    for v in values:  # rebinding, as dask code does: a dict tracks the leaf by name
        params = {"w": da.from_array(v, chunks=CHUNKS)}
        ema.apply(params)
    np.testing.assert_array_equal(_read(da, ema.average(params)["w"], dtype), _ema(values, 0.9))
    got = ema.profile("0.5").average(params)["w"]
    np.testing.assert_array_equal(_read(da, got, dtype), _ema(values, 0.5))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stateful_plain_list_tracks_an_array_written_in_place(da: Any, dtype: str) -> None:
    values = _values(dtype)
    w = da.from_array(values[0], chunks=CHUNKS)
    ema = emacore.ExponentialMovingAverage(0.8)
    for v in values:
        w[...] = da.from_array(v, chunks=CHUNKS)  # dask's setitem: same object, new graph
        ema.apply([w])
    np.testing.assert_array_equal(_read(da, ema.average(w), dtype), _ema(values, 0.8))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_zero_debias_matches_numpy(da: Any, dtype: str) -> None:
    values = _values(dtype)
    ema = emacore.ExponentialMovingAverage(0.9, zero_debias=True)
    state = F.init({"w": da.zeros((3, 4), dtype=dtype, chunks=CHUNKS)}, zero_debias=True)
    for v in values:
        params = {"w": da.from_array(v, chunks=CHUNKS)}
        ema.apply(params)
        state = F.update(state, params, 0.9)
    want = _ema(values, 0.9, zero_debias=True)
    rtol = 1e-14 if dtype == "float64" else 1e-6  # the correction divides once, in float64
    np.testing.assert_allclose(_read(da, ema.average(params)["w"], dtype), want, rtol=rtol)
    np.testing.assert_allclose(_read(da, F.average(state)["w"], dtype), want, rtol=rtol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_functional_matches_numpy(da: Any, dtype: str) -> None:
    values = _values(dtype)
    state = F.init({"w": da.from_array(values[0], chunks=CHUNKS)})
    want = values[0].copy()
    for v in values[1:]:  # functional: init makes the shadow, each update is one step
        state = F.update(state, {"w": da.from_array(v, chunks=CHUNKS)}, 0.7)
        want = want - (want - v) * (1.0 - 0.7)
    np.testing.assert_array_equal(_read(da, F.average(state)["w"], dtype), want)


def test_a_shadow_is_the_value_its_parameter_had_when_it_was_made(da: Any) -> None:
    # a lazy parameter reads its source when computed: the shadow must not read it later
    import dask

    source = _values("float64", 3)
    buffer = source[0].copy()
    lazy = da.from_delayed(dask.delayed(buffer.copy)(), shape=(3, 4), dtype="float64")
    state = F.init({"w": lazy})
    ema = emacore.ExponentialMovingAverage(0.9)
    ema.apply({"w": lazy})  # shadow made from the buffer as it is now, then updated with it
    buffer[...] = source[1]  # the next step's parameter, written where the old one was
    params = {"w": da.from_array(source[2], chunks=CHUNKS)}
    state = F.update(state, params, 0.9)
    ema.apply(params)
    want = source[0] - (source[0] - source[2]) * (1.0 - 0.9)
    np.testing.assert_array_equal(_read(da, F.average(state)["w"], "float64"), want)
    np.testing.assert_array_equal(_read(da, ema.average(params)["w"], "float64"), want)


def test_nonfinite_skip_keeps_the_shadow(da: Any) -> None:
    values = _values("float64", 2)
    bad = values[1].copy()
    bad[0, 0] = np.nan
    state = F.init({"w": da.from_array(values[0], chunks=CHUNKS)})
    state = F.update(state, {"w": da.from_array(bad, chunks=CHUNKS)}, 0.9, nonfinite="skip")
    np.testing.assert_array_equal(_read(da, F.average(state)["w"], "float64"), values[0])


def test_shadow_graphs_do_not_grow_with_updates(da: Any) -> None:
    # an unpersisted shadow stacks 4 tasks per chunk per update: 1,604 keys after 100 here
    values = _values("float64", 100)
    ema = emacore.ExponentialMovingAverage(0.99)
    state = F.init({"w": da.from_array(values[0], chunks=CHUNKS)})
    for v in values:
        params = {"w": da.from_array(v, chunks=CHUNKS)}
        ema.apply(params)
        state = F.update(state, params, 0.99)
    chunks = 4
    assert len(ema.average(params)["w"].__dask_graph__()) == chunks
    assert len(F.average(state)["w"].__dask_graph__()) == chunks
    got = _read(da, ema.average(params)["w"], "float64")
    np.testing.assert_array_equal(got, _ema(values, 0.99))


def test_copy_to_and_swapped_write_into_dask_arrays(da: Any) -> None:
    values = _values("float64")
    w = da.from_array(values[0], chunks=CHUNKS)
    ema = emacore.ExponentialMovingAverage(0.9)
    for v in values:
        w[...] = da.from_array(v, chunks=CHUNKS)
        ema.apply([w])
    want = _ema(values, 0.9)
    with ema.swapped([w]):
        np.testing.assert_array_equal(_read(da, w, "float64"), want)
    np.testing.assert_array_equal(_read(da, w, "float64"), values[-1])
    ema.copy_to([w])
    np.testing.assert_array_equal(_read(da, w, "float64"), want)


def test_checkpoints_compute_dask_arrays_and_load_into_them(da: Any, tmp_path: Path) -> None:
    values = _values("float32")
    backend = emacore.get_backend("array_api")
    host = backend.to_host(da.from_array(values[0], chunks=CHUNKS))
    assert type(host) is np.ndarray  # computed, not a lazy array handed on
    np.testing.assert_array_equal(host, values[0])

    state = F.init({"w": da.from_array(values[0], chunks=CHUNKS)})
    ema = emacore.ExponentialMovingAverage(0.6)
    for v in values[1:]:
        state = F.update(state, {"w": da.from_array(v, chunks=CHUNKS)}, 0.6)
    for v in values:
        ema.apply({"w": da.from_array(v, chunks=CHUNKS)})
    emacore.save(state, tmp_path / "state.safetensors")
    emacore.save(ema, tmp_path / "ema.safetensors")

    like = {"w": da.zeros((3, 4), dtype="float32", chunks=CHUNKS)}
    loaded = emacore.load_state(tmp_path / "state.safetensors", like=like)
    want = values[0].copy()
    for v in values[1:]:
        want = want - (want - v) * (1.0 - 0.6)
    np.testing.assert_array_equal(_read(da, F.average(loaded)["w"], "float32"), want)

    fresh = emacore.ExponentialMovingAverage(0.6)
    fresh.apply(like)
    emacore.load_into(fresh, tmp_path / "ema.safetensors")
    got = _read(da, fresh.average(like)["w"], "float32")
    np.testing.assert_array_equal(got, _ema(values, 0.6))
