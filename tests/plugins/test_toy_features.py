"""Every feature of emacore on the toy plugin's arrays, which have no ``__array_namespace__``.

The toy plugin (``tests/plugins/emacore_toy_plugin``) is written against public names only
(``emacore``, ``emacore.backend``, ``emacore.errors``); its backend overrides the members its
array type needs (``update``, ``all_finite``, ``assign``, ``to_host``, ``from_host``...). Each
test checks that the arrays coming back are ``ToyArray``s of the right dtype and shape, then
every number against the same EMA written out here in numpy float64.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emacore
from emacore import functional
from emacore.errors import NonFiniteError

DECAYS = {"slow": 0.9, "fast": 0.5}


def _toy(values: Any, dtype: Any = np.float64) -> Any:
    from emacore_toy_plugin import ToyArray

    return ToyArray(values, dtype=dtype)


def _steps(n: int, shape: tuple[int, ...] = (2, 3)) -> list[Any]:
    """``n`` parameter values, float64."""
    rng = np.random.default_rng(7)
    return [rng.standard_normal(shape) for _ in range(n)]


def _expected(steps: list[Any], decay: float) -> Any:
    """The shadow after applying each of ``steps`` in turn: the first apply copies."""
    shadow = steps[0].astype(np.float64)
    for p in steps[1:]:
        shadow = shadow - (shadow - p) * (1.0 - decay)
    return shadow


def _assert_toy(x: Any, expected: Any, dtype: Any = np.float64) -> None:
    from emacore_toy_plugin import ToyArray

    assert isinstance(x, ToyArray), type(x)
    assert x.dtype == dtype
    assert x.shape == np.shape(expected)
    np.testing.assert_allclose(x.data, expected, rtol=1e-13, atol=1e-15)


def _trained(steps: list[Any], **options: Any) -> tuple[emacore.ExponentialMovingAverage, Any]:
    """An EMA with ``DECAYS`` that applied ``steps`` to one toy array, written in place."""
    w = _toy(steps[0])
    ema = emacore.ExponentialMovingAverage(DECAYS, **options)
    for p in steps:
        w.data[...] = p
        ema.apply({"w": w})
    return ema, w


def test_stateful_updates_with_several_decays(toy_plugin: types.ModuleType) -> None:
    steps = _steps(5)
    calls = toy_plugin.UPDATE_CALLS
    ema, w = _trained(steps)
    assert calls < toy_plugin.UPDATE_CALLS  # the plugin's own update ran
    assert ema.profiles == ("slow", "fast")
    _assert_toy(ema.average(w), _expected(steps, 0.9))
    _assert_toy(ema.profile("slow").average(w), _expected(steps, 0.9))
    _assert_toy(ema.profile("fast").average(w), _expected(steps, 0.5))


def test_functional_updates(toy_plugin: types.ModuleType) -> None:
    steps = _steps(4)
    state = functional.init({"w": _toy(steps[0])})
    calls = toy_plugin.UPDATE_CALLS
    for p in steps[1:]:
        state = functional.update(state, {"w": _toy(p)}, decay=0.8)
    assert toy_plugin.UPDATE_CALLS - calls == len(steps) - 1
    assert state.count == len(steps) - 1
    _assert_toy(state.shadow["w"], _expected(steps, 0.8))
    _assert_toy(functional.average(state)["w"], _expected(steps, 0.8))


def test_nonfinite_skip_and_raise(toy_plugin: types.ModuleType) -> None:
    steps = _steps(3)
    ema, w = _trained(steps, nonfinite="skip")
    w.data[0, 0] = np.nan
    with pytest.warns(emacore.EMAWarning):
        ema.apply({"w": w})
    assert ema.skipped_updates == 1
    _assert_toy(ema.average(w), _expected(steps, 0.9))  # the NaN step left no trace
    _assert_toy(ema.profile("fast").average(w), _expected(steps, 0.5))

    ema, w = _trained(steps, nonfinite="raise")
    w.data[1, 2] = np.inf
    with pytest.raises(NonFiniteError, match="'w'"):
        ema.apply({"w": w})
    _assert_toy(ema.average(w), _expected(steps, 0.9))

    state = functional.init({"w": _toy(steps[0])})
    bad = _toy(steps[1])
    bad.data[0, 1] = np.nan
    kept = functional.update(state, {"w": bad}, decay=0.8, nonfinite="skip")
    assert kept.count == 0
    _assert_toy(kept.shadow["w"], steps[0])
    with pytest.raises(NonFiniteError):
        functional.update(state, {"w": bad}, decay=0.8, nonfinite="raise")


def _fresh(steps: list[Any]) -> tuple[emacore.ExponentialMovingAverage, Any]:
    """An EMA tracking a toy array whose shadows hold other numbers than ``steps`` make."""
    w = _toy(np.full_like(steps[0], 100.0))
    ema = emacore.ExponentialMovingAverage(DECAYS)
    ema.apply({"w": w})
    return ema, w


def test_state_dict_round_trip(toy_plugin: types.ModuleType) -> None:
    steps = _steps(4)
    ema, _ = _trained(steps)
    state = ema.state_dict()
    _assert_toy(state["leaves"]["w"]["shadow"], _expected(steps, 0.9))
    fresh, w = _fresh(steps)
    fresh.load_state_dict(state)
    _assert_toy(fresh.average(w), _expected(steps, 0.9))
    _assert_toy(fresh.profile("fast").average(w), _expected(steps, 0.5))
    assert fresh.state_dict()["leaves"]["w"]["count"] == len(steps)


def test_save_then_load_into_an_ema_of_toy_arrays(
    toy_plugin: types.ModuleType, tmp_path: Path
) -> None:
    steps = _steps(4)
    ema, _ = _trained(steps)
    emacore.save(ema, tmp_path / "ema.safetensors")
    fresh, w = _fresh(steps)
    result = emacore.load_into(fresh, tmp_path / "ema.safetensors")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    _assert_toy(fresh.state_dict()["leaves"]["w"]["shadow"], _expected(steps, 0.9))
    _assert_toy(fresh.average(w), _expected(steps, 0.9))
    _assert_toy(fresh.profile("fast").average(w), _expected(steps, 0.5))


def test_save_then_load_state_like_toy_arrays(toy_plugin: types.ModuleType, tmp_path: Path) -> None:
    steps = _steps(3)
    state = functional.init({"w": _toy(steps[0])})
    for p in steps[1:]:
        state = functional.update(state, {"w": _toy(p)}, decay=0.8)
    emacore.save(state, tmp_path / "state.safetensors")
    loaded = emacore.load_state(tmp_path / "state.safetensors", like={"w": _toy(steps[0])})
    assert loaded.count == len(steps) - 1
    _assert_toy(loaded.shadow["w"], _expected(steps, 0.8))
    # like= gives the library and placement, not the dtype: float64 shadows stay float64
    wide = emacore.load_state(tmp_path / "state.safetensors", like={"w": _toy(steps[0], "f4")})
    _assert_toy(wide.shadow["w"], _expected(steps, 0.8))


def test_copy_to_and_swapped(toy_plugin: types.ModuleType) -> None:
    steps = _steps(4)
    ema, w = _trained(steps)
    live = steps[-1]
    with ema.swapped({"w": w}):
        _assert_toy(w, _expected(steps, 0.9))
    _assert_toy(w, live)  # the live values are back
    ema.copy_to({"w": w})
    _assert_toy(w, _expected(steps, 0.9))
