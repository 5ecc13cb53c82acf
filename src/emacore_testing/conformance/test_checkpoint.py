"""Portable checkpoints on every backend: saved from this session's backend and loaded back into
it, into numpy, and from numpy into it; the averages then continue as if never saved, checked
against float64 math. Also what a load checks (structure, shapes, dtypes) and how it says it."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emacore
from emacore import functional as F

DECAY = 0.9


def ref_ema(values: list[np.ndarray], zero_debias: bool) -> np.ndarray:
    """Float64 reference with a constant decay: the shadow starts at values[0] (or 0)."""
    s = np.zeros_like(values[0], np.float64) if zero_debias else values[0].astype(np.float64)
    prod = 1.0
    for v in values:
        s = DECAY * s + (1 - DECAY) * v.astype(np.float64)
        prod *= DECAY
    return s / (1 - prod) if zero_debias else s


SHAPES = {"dense/w": ((3, 4), "float32"), "dense/b": ((4,), "float64"), "out/0": ((2,), "float32")}


def _steps(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {nm: rng.standard_normal(shape).astype(dtype) for nm, (shape, dtype) in SHAPES.items()}
        for _ in range(n)
    ]


def _tree(lib: Any, flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """The nested parameters (fresh arrays each step, as JAX code makes them)."""
    return {
        "dense": {"w": lib.make(flat["dense/w"]), "b": lib.make(flat["dense/b"])},
        "out": [lib.make(flat["out/0"])],
    }


def _flat_averages(ema: Any, params: dict[str, Any]) -> dict[str, Any]:
    avg = ema.average(params)
    return {"dense/w": avg["dense"]["w"], "dense/b": avg["dense"]["b"], "out/0": avg["out"][0]}


def _check_arrays(lib: Any, arrays: dict[str, Any]) -> None:
    """Namespace (the backend owns it), dtype, shape and device of every average."""
    backend = emacore.get_backend(lib.backend)
    for nm, x in arrays.items():
        shape, dtype = SHAPES[nm]
        assert backend.owns(x), (nm, type(x))
        assert x.dtype == lib.dtype(dtype), nm
        assert tuple(x.shape) == shape, nm
        assert lib.device_of(x) == lib.device, nm


def _check_reference(
    read: Any, arrays: dict[str, Any], steps: list[Any], zero_debias: bool
) -> None:
    for nm, x in arrays.items():
        tol = 1e-5 if SHAPES[nm][1] == "float32" else 1e-12
        want = ref_ema([s[nm] for s in steps], zero_debias)
        np.testing.assert_allclose(read(x), want, rtol=tol, atol=tol, err_msg=nm)


@pytest.mark.parametrize("zero_debias", [False, True])
def test_round_trip_continues_as_if_never_saved(
    lib: Any, zero_debias: bool, tmp_path: Path
) -> None:
    steps = _steps(0, 10)
    ema = emacore.EMA(DECAY, zero_debias=zero_debias)
    for flat in steps[:5]:
        ema.apply(_tree(lib, flat))
    path = tmp_path / "ema.safetensors"
    emacore.save(ema, path)
    restored = emacore.EMA(DECAY, zero_debias=zero_debias)
    result = emacore.load_into(restored, path, xp=lib.xp, device=lib.device)
    assert result == emacore.LoadResult([], [])
    params = _tree(lib, steps[4])
    _check_arrays(lib, _flat_averages(restored, params))
    for nm, x in _flat_averages(restored, params).items():
        np.testing.assert_array_equal(lib.read(x), lib.read(_flat_averages(ema, params)[nm]))
    for flat in steps[5:]:
        params = _tree(lib, flat)
        ema.apply(params)
        restored.apply(params)
    got = _flat_averages(restored, params)
    _check_arrays(lib, got)
    for nm, x in got.items():  # the same operations on the same numbers: the same bits
        np.testing.assert_array_equal(lib.read(x), lib.read(_flat_averages(ema, params)[nm]))
    _check_reference(lib.read, got, steps, zero_debias)
    assert restored.state_dict()["leaves"]["dense/w"]["count"] == 10


def test_saved_here_loaded_by_numpy(lib: Any, tmp_path: Path) -> None:
    steps = _steps(1, 6)
    ema = emacore.EMA(DECAY)
    for flat in steps[:3]:
        ema.apply(_tree(lib, flat))
    emacore.save(ema, tmp_path / "ema.safetensors")
    on_numpy = emacore.EMA(DECAY)
    emacore.load_into(on_numpy, tmp_path / "ema.safetensors")
    params = {nm: np.asarray(v) for nm, v in steps[2].items()}
    for nm, x in on_numpy.average(params).items():
        assert isinstance(x, np.ndarray) and x.dtype == np.dtype(SHAPES[nm][1])
        np.testing.assert_array_equal(x, lib.read(_flat_averages(ema, _tree(lib, steps[2]))[nm]))
    for flat in steps[3:]:  # numpy continues the run from where this backend left it
        on_numpy.apply(flat)
    _check_reference(np.asarray, on_numpy.average(steps[-1]), steps, zero_debias=False)


def test_saved_by_numpy_loaded_here(lib: Any, tmp_path: Path) -> None:
    steps = _steps(2, 6)
    on_numpy = emacore.EMA(DECAY)
    for flat in steps[:3]:
        on_numpy.apply(_tree(_numpy_lib(), flat))
    emacore.save(on_numpy, tmp_path / "ema.safetensors")
    # an EMA that tracks the leaves already: each shadow keeps its library and device
    here = emacore.EMA(DECAY)
    here.apply(_tree(lib, _steps(3, 1)[0]))
    assert emacore.load_into(here, tmp_path / "ema.safetensors") == emacore.LoadResult([], [])
    params = _tree(lib, steps[2])
    _check_arrays(lib, _flat_averages(here, params))
    for flat in steps[3:]:
        params = _tree(lib, flat)
        here.apply(params)
    _check_arrays(lib, _flat_averages(here, params))
    _check_reference(lib.read, _flat_averages(here, params), steps, zero_debias=False)


def _numpy_lib() -> Any:
    class NumpyLib:
        make = staticmethod(lambda a: np.array(a, copy=True))

    return NumpyLib()


def test_functional_state_round_trip(lib: Any, tmp_path: Path) -> None:
    steps = _steps(4, 8)
    state = F.init(_tree(lib, steps[0]), zero_debias=True)
    for flat in steps[:4]:
        state = F.update(state, _tree(lib, flat), DECAY)
    path = tmp_path / "state.safetensors"
    emacore.save(state, path)
    params = _tree(lib, steps[3])
    loaded = emacore.load_state(path, like=params)
    assert (loaded.count, loaded.decay_product, loaded.last_decay) == (
        state.count,
        state.decay_product,
        state.last_decay,
    )
    assert loaded.zero_debias and loaded.compat == "default"
    # the structure is saved too: without like= it comes back as nested dicts and lists
    bare = emacore.load_state(path)
    assert set(bare.shadow) == {"dense", "out"} and isinstance(bare.shadow["out"], list)
    for nm, x in _flat(loaded.shadow).items():
        np.testing.assert_array_equal(lib.read(x), lib.read(_flat(state.shadow)[nm]))
        np.testing.assert_array_equal(_flat(bare.shadow)[nm], lib.read(x))
    for flat in steps[4:]:
        state = F.update(state, _tree(lib, flat), DECAY)
        loaded = F.update(loaded, _tree(lib, flat), DECAY)
    got = _flat(F.average(loaded))
    _check_arrays(lib, got)
    for nm, x in got.items():
        np.testing.assert_array_equal(lib.read(x), lib.read(_flat(F.average(state))[nm]))
    _check_reference(lib.read, got, steps, zero_debias=True)


def _shadow(ema: emacore.EMA, name: str) -> Any:
    return ema.state_dict()["leaves"][name]["shadow"]


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    return {"dense/w": tree["dense"]["w"], "dense/b": tree["dense"]["b"], "out/0": tree["out"][0]}


def test_stateful_checkpoint_as_functional_state(lib: Any, tmp_path: Path) -> None:
    steps = _steps(5, 3)
    ema = emacore.EMA(DECAY)
    for flat in steps:
        ema.apply(_tree(lib, flat))
    emacore.save(ema, tmp_path / "ema.safetensors")
    with pytest.raises(emacore.CheckpointError, match="like="):
        emacore.load_state(tmp_path / "ema.safetensors")
    params = _tree(lib, steps[-1])
    state = emacore.load_state(tmp_path / "ema.safetensors", like=params)
    assert state.count == 3
    _check_arrays(lib, _flat(F.average(state)))
    _check_reference(lib.read, _flat(F.average(state)), steps, zero_debias=False)


def test_strict_load_names_every_difference(lib: Any, tmp_path: Path) -> None:
    ema = emacore.EMA(0.5)
    ema.apply({"a": lib.make(np.ones(2)), "b": lib.make(np.ones(3))})
    path = tmp_path / "ema.safetensors"
    emacore.save(ema, path)

    other = emacore.EMA(0.5)
    other.apply({"a": lib.make(np.zeros(2)), "c": lib.make(np.zeros(3))})
    with pytest.raises(emacore.StateDictError, match=r"missing .*\['c'\].*unexpected .*\['b'\]"):
        emacore.load_into(other, path)
    np.testing.assert_array_equal(lib.read(_shadow(other, "a")), [0.0, 0.0])
    result = emacore.load_into(other, path, strict=False)
    assert result == emacore.LoadResult(["c"], ["b"])
    np.testing.assert_array_equal(lib.read(_shadow(other, "a")), [1.0, 1.0])

    reshaped = emacore.EMA(0.5)
    reshaped.apply({"a": lib.make(np.zeros(5)), "b": lib.make(np.zeros(3, np.float32))})
    for strict in (True, False):
        with pytest.raises(emacore.StateDictError) as info:
            emacore.load_into(reshaped, path, strict=strict)
        message = str(info.value)
        assert "leaf 'a' has shape (2,) in the file, (5,) here" in message
        assert "leaf 'b' is float64 in the file" in message and "float32" in message
    np.testing.assert_array_equal(lib.read(_shadow(reshaped, "a")), np.zeros(5))

    with pytest.raises(emacore.StateDictError, match="zero_debias"):
        emacore.load_into(emacore.EMA(0.5, zero_debias=True), path)


def test_integer_copies_round_trip(lib: Any, tmp_path: Path) -> None:
    ema = emacore.EMA(DECAY)
    ema.apply({"w": lib.make(np.arange(3.0))})
    state = ema.state_dict()
    counter = np.array([7, -2, 2**40], np.int64)
    state = {**state, "copies": {"steps": lib.make(counter)}}
    path = tmp_path / "ema.safetensors"
    emacore.save(state, path)
    roles = {
        r["name"]: (r["role"], r["dtype"]) for r in emacore.checkpoint.describe(path)["leaves"]
    }
    assert roles == {"w": ("average", "float64"), "steps": ("copy", "int64")}
    loaded = emacore.load(path, xp=lib.xp, device=lib.device)
    assert lib.device_of(loaded["copies"]["steps"]) == lib.device
    np.testing.assert_array_equal(lib.read(loaded["copies"]["steps"]), counter)
    fresh = emacore.EMA(DECAY)
    emacore.load_into(fresh, path, xp=lib.xp, device=lib.device)
    copy = fresh.state_dict()["copies"]["steps"]
    assert copy.dtype == lib.dtype("int64") and lib.device_of(copy) == lib.device
    np.testing.assert_array_equal(lib.read(copy), counter)


def test_bfloat16_round_trip(lib: Any, tmp_path: Path) -> None:
    if not hasattr(lib.xp, "bfloat16"):
        pytest.skip(f"{lib.name} has no bfloat16")
    backend = emacore.get_backend(lib.backend)
    rng = np.random.default_rng(6)
    values = [rng.standard_normal(5).astype(np.float32) for _ in range(3)]

    def bf16(v: np.ndarray) -> Any:
        x = lib.make(v)
        ns = backend.namespace(x)
        return ns.astype(x, lib.xp.bfloat16)

    def as_f32(x: Any) -> np.ndarray:
        ns = backend.namespace(x)
        return np.asarray(lib.read(ns.astype(x, ns.float32)))

    ema = emacore.EMA(DECAY, shadow_dtype="same")
    for v in values:
        ema.apply({"w": bf16(v)})
    shadow = _shadow(ema, "w")
    assert shadow.dtype == lib.xp.bfloat16
    path = tmp_path / "ema.safetensors"
    emacore.save(ema, path)
    assert emacore.checkpoint.describe(path)["leaves"][0]["dtype"] == "bfloat16"
    from safetensors.numpy import load_file

    stored = load_file(path)["w"]  # what other readers see: the exact values, in float32
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, as_f32(shadow))
    # numpy has no bfloat16: the same exact values as float32
    np.testing.assert_array_equal(emacore.load(path)["leaves"]["w"]["shadow"], as_f32(shadow))
    fresh = emacore.EMA(DECAY, shadow_dtype="same")
    emacore.load_into(fresh, path, xp=lib.xp, device=lib.device)
    loaded = _shadow(fresh, "w")
    assert loaded.dtype == lib.xp.bfloat16 and lib.device_of(loaded) == lib.device
    np.testing.assert_array_equal(as_f32(loaded), as_f32(shadow))


def test_file_is_plain_safetensors(lib: Any, tmp_path: Path) -> None:
    steps = _steps(7, 2)
    ema = emacore.EMA(DECAY)
    for flat in steps:
        ema.apply(_tree(lib, flat))
    emacore.save(ema, tmp_path / "ema.safetensors", metadata={"epoch": "3"})
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "ema.safetensors")
    averages = _flat_averages(ema, _tree(lib, steps[-1]))
    assert set(tensors) == set(averages)
    for nm, x in averages.items():
        np.testing.assert_array_equal(tensors[nm], lib.read(x))
    assert emacore.checkpoint.describe(tmp_path / "ema.safetensors")["metadata"] == {"epoch": "3"}


def test_several_profiles_and_update_every_round_trip(lib: Any, tmp_path: Path) -> None:
    """Everything in the state dict travels: each profile's shadows and counters, the count
    of apply calls that update_every skips by."""
    steps = _steps(8, 9)
    decays = {"fast": 0.5, "slow": 0.9}

    def make() -> emacore.EMA:
        return emacore.EMA(decays, update_every=2)

    ema = make()
    for flat in steps[:5]:
        ema.apply(_tree(lib, flat))
    path = tmp_path / "ema.safetensors"
    emacore.save(ema, path)
    info = emacore.checkpoint.describe(path)
    assert info["profiles"] == ["fast", "slow"]
    restored = make()
    assert emacore.load_into(restored, path, xp=lib.xp, device=lib.device) == (
        emacore.LoadResult([], [])
    )
    with pytest.raises(emacore.StateDictError, match="profiles"):
        emacore.load_into(emacore.EMA(0.5), path, xp=lib.xp, device=lib.device)
    with pytest.raises(emacore.CheckpointError, match="profiles"):
        emacore.load_state(path, like=_tree(lib, steps[0]))
    for flat in steps[5:]:
        params = _tree(lib, flat)
        ema.apply(params)
        restored.apply(params)
    for name in decays:
        got = _flat_averages(restored.profile(name), params)
        want = _flat_averages(ema.profile(name), params)
        _check_arrays(lib, got)
        for nm, x in got.items():
            np.testing.assert_array_equal(lib.read(x), lib.read(want[nm]))
    # and against float64 math: updates on apply 1, 3, 5, 7, 9 with decay d**2
    for name, d in decays.items():
        got = _flat_averages(restored.profile(name), params)
        for nm, x in got.items():
            values = [s[nm].astype(np.float64) for s in steps[::2]]
            s = values[0]
            for v in values[1:]:
                s = d**2 * s + (1 - d**2) * v
            tol = 1e-5 if SHAPES[nm][1] == "float32" else 1e-12
            np.testing.assert_allclose(lib.read(x), s, rtol=tol, atol=tol, err_msg=nm)


def test_state_of_a_namedtuple_needs_like(lib: Any, tmp_path: Path) -> None:
    Pair = collections.namedtuple("Pair", "w b")
    params = Pair(lib.make(np.arange(3.0)), lib.make(np.ones(2, np.float32)))
    state = F.update(F.init(params), params, DECAY)
    path = tmp_path / "state.safetensors"
    emacore.save(state, path)
    assert not emacore.checkpoint.describe(path)["has_tree"]  # JSON cannot name a namedtuple
    with pytest.raises(emacore.CheckpointError, match="pass like="):
        emacore.load_state(path)
    loaded = emacore.load_state(path, like=params)
    assert isinstance(loaded.shadow, Pair) and loaded.count == 1
    assert lib.device_of(loaded.shadow.b) == lib.device and loaded.shadow.b.dtype == lib.dtype(
        "float32"
    )
    np.testing.assert_array_equal(lib.read(loaded.shadow.w), np.arange(3.0))
    with pytest.raises(emacore.StateDictError, match=r"leaves \['x'\] of like= are not in"):
        emacore.load_state(path, like={"w": params.w, "b": params.b, "x": params.b})
