"""Evaluating with the averages: copy_to, store/restore, swapped, and include/exclude, on
every backend whose arrays are mutable; a clear error where they are not."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import emacore


def _trained(lib: Any) -> tuple[emacore.EMA, dict[str, Any]]:
    params = {"w": lib.make(np.zeros(3)), "b": lib.make(np.zeros(2))}
    ema = emacore.EMA(0.5)
    ema.apply(params)
    params["w"] = lib.set_value(params["w"], np.full(3, 4.0))
    params["b"] = lib.set_value(params["b"], np.full(2, 2.0))
    ema.apply(params)  # averages: w = 2, b = 1; live: w = 4, b = 2
    return ema, params


def _refused_for_immutable(lib: Any, ema: emacore.EMA, params: Any) -> bool:
    """Immutable arrays (JAX) cannot take averages in place: a clear error, not a write."""
    if lib.mutable:
        return False
    with pytest.raises(emacore.ImmutableArrayError, match=f"backend '{lib.backend}'"):
        ema.copy_to(params)
    with pytest.raises(emacore.ImmutableArrayError):
        ema.store(params)
    return True


def test_copy_to_writes_averages_in_place(lib: Any) -> None:
    ema, params = _trained(lib)
    if _refused_for_immutable(lib, ema, params):
        return
    w = params["w"]
    ema.copy_to(params)
    assert params["w"] is w
    np.testing.assert_array_equal(lib.read(params["w"]), np.full(3, 2.0))
    np.testing.assert_array_equal(lib.read(params["b"]), np.full(2, 1.0))
    assert lib.device_of(params["w"]) == lib.device


def test_swapped_restores_even_when_the_body_raises(lib: Any) -> None:
    ema, params = _trained(lib)
    if _refused_for_immutable(lib, ema, params):
        return
    with ema.swapped(params):
        np.testing.assert_array_equal(lib.read(params["w"]), np.full(3, 2.0))
    np.testing.assert_array_equal(lib.read(params["w"]), np.full(3, 4.0))

    def evaluate_and_fail() -> None:
        with ema.swapped(params):
            np.testing.assert_array_equal(lib.read(params["b"]), np.full(2, 1.0))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        evaluate_and_fail()
    np.testing.assert_array_equal(lib.read(params["b"]), np.full(2, 2.0))
    # the shadows were not disturbed by swapping
    np.testing.assert_array_equal(lib.read(ema.average(params)["w"]), np.full(3, 2.0))


def test_store_restore(lib: Any) -> None:
    ema, params = _trained(lib)
    if _refused_for_immutable(lib, ema, params):
        return
    ema.store(params)
    ema.copy_to(params)
    np.testing.assert_array_equal(lib.read(params["w"]), np.full(3, 2.0))
    ema.restore()
    np.testing.assert_array_equal(lib.read(params["w"]), np.full(3, 4.0))
    with pytest.raises(emacore.EMAError, match="without a matching store"):
        ema.restore()


def _write(ema: emacore.EMA, how: str, live: Any) -> None:
    if how == "copy_to":
        ema.copy_to(live)
    elif how == "store":
        ema.store(live)
    else:
        with ema.swapped(live):
            pass


@pytest.mark.parametrize("wrong", ["w", "b"])
@pytest.mark.parametrize("how", ["copy_to", "swapped", "store"])
def test_a_leaf_of_another_shape_is_refused_before_anything_is_written(
    lib: Any, wrong: str, how: str
) -> None:
    """Whichever leaf is written first, a later one that cannot take its average (another
    shape; a copy would fail halfway, or broadcast) is refused first, naming it."""
    ema, params = _trained(lib)
    if _refused_for_immutable(lib, ema, params):
        return
    live = dict(params)
    live[wrong] = lib.make(np.full(4, 7.0))
    with pytest.raises(emacore.LeafMismatchError, match=f"leaf '{wrong}': the array has shape"):
        _write(ema, how, live)
    np.testing.assert_array_equal(lib.read(live["w"]), np.full(3, 4.0) if wrong == "b" else 7.0)
    np.testing.assert_array_equal(lib.read(live["b"]), np.full(2, 2.0) if wrong == "w" else 7.0)
    with pytest.raises(emacore.EMAError, match="without a matching store"):
        ema.restore()  # a refused store saved nothing


def test_copy_to_untracked_container_changes_nothing(lib: Any) -> None:
    ema, params = _trained(lib)
    other = {"w": params["w"], "new": lib.make(np.zeros(1))}
    with pytest.raises(KeyError, match="'new'"):
        ema.copy_to(other)
    np.testing.assert_array_equal(lib.read(params["w"]), np.full(3, 4.0))


@pytest.mark.parametrize(
    ("include", "exclude", "tracked"),
    [
        (None, "enc/*", {"dec/w"}),
        ("enc/*", None, {"enc/w", "enc/b"}),
        (["enc/w", "dec/*"], None, {"enc/w", "dec/w"}),
        (None, lambda name: name.endswith("/b"), {"enc/w", "dec/w"}),
    ],
)
def test_include_exclude(lib: Any, include: Any, exclude: Any, tracked: set[str]) -> None:
    params = {
        "enc": {"w": lib.make(np.ones(2)), "b": lib.make(np.ones(1))},
        "dec": {"w": lib.make(np.ones(3))},
    }
    ema = emacore.EMA(0.9, include=include, exclude=exclude)
    ema.apply(params)
    ema.apply(params)
    assert set(ema.state_dict()["leaves"]) == tracked


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="buffers must be one of"):
        emacore.EMA(0.9, buffers="mean")
    with pytest.raises(ValueError, match="frozen must be one of"):
        emacore.EMA(0.9, frozen=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="include must be a glob pattern"):
        emacore.EMA(0.9, include=[1, 2])  # type: ignore[list-item]


class _ImmutableStrict(emacore.ArrayAPIBackend):
    """array-api-strict arrays, declared immutable (as JAX's are)."""

    def __init__(self) -> None:
        super().__init__("immutable", emacore.Capabilities(mutable_arrays=False))


class _Plugin:
    @emacore.hookimpl
    def emacore_backends(self) -> list[emacore.BackendSpec]:
        backend = _ImmutableStrict()
        return [emacore.BackendSpec("immutable", (), load=lambda: backend)]


def test_immutable_arrays_refuse_in_place_evaluation() -> None:
    import array_api_strict as xp

    emacore.reset_registry(emacore.Registry(autoload=False, plugins=[_Plugin()]))
    try:
        ema = emacore.EMA(0.5, backend="immutable")
        params = {"w": xp.asarray([0.0, 0.0])}
        ema.apply(params)
        with pytest.raises(emacore.ImmutableArrayError, match="immutable"):
            ema.copy_to(params)
        with pytest.raises(emacore.ImmutableArrayError), ema.swapped(params):
            pass
        with pytest.raises(emacore.ImmutableArrayError, match="backend 'immutable'"):
            _ImmutableStrict().assign(params["w"], params["w"])
    finally:
        emacore.reset_registry()


def test_excluded_leaves_pass_through_average_and_swapped(lib: Any) -> None:
    params = {"w": lib.make(np.zeros(2)), "frozen": lib.make(np.full(2, 7.0))}
    ema = emacore.EMA(0.5, exclude="frozen")
    ema.apply(params)
    params["w"] = lib.set_value(params["w"], np.full(2, 4.0))
    ema.apply(params)
    avg = ema.average(params)
    assert avg["frozen"] is params["frozen"]  # not tracked: returned as it is
    np.testing.assert_array_equal(lib.read(avg["w"]), np.full(2, 2.0))
    if _refused_for_immutable(lib, ema, params):
        return
    with ema.swapped(params):
        np.testing.assert_array_equal(lib.read(params["w"]), np.full(2, 2.0))
        np.testing.assert_array_equal(lib.read(params["frozen"]), np.full(2, 7.0))
    np.testing.assert_array_equal(lib.read(params["w"]), np.full(2, 4.0))


def test_offloaded_shadows_live_on_the_chosen_device() -> None:
    """device=: shadows elsewhere than their parameters (array-api-strict has several
    devices); updates bring the parameters over, swapped() writes back across devices."""
    import array_api_strict as xp

    here, there = xp.Device("device1"), xp.Device("device2")
    params = {"w": xp.asarray([0.0, 0.0], dtype=xp.float64, device=here)}
    ema = emacore.EMA(0.5, device=there)
    ema.apply(params)
    params["w"][...] = xp.asarray([4.0, 4.0], dtype=xp.float64, device=here)
    ema.apply(params)
    avg = ema.average(params)["w"]
    assert avg.device == there
    assert params["w"].device == here
    np.testing.assert_array_equal(np.asarray(avg.to_device(xp.Device("CPU_DEVICE"))), [2.0, 2.0])
    with ema.swapped(params):
        assert params["w"].device == here
        np.testing.assert_array_equal(
            np.asarray(params["w"].to_device(xp.Device("CPU_DEVICE"))), [2.0, 2.0]
        )
    state = emacore.functional.init(params, device=there)
    state = emacore.functional.update(state, params, 0.5)
    assert state.shadow["w"].device == there


def test_offload_to_a_device_the_backend_lacks_names_it() -> None:
    with pytest.raises(ValueError, match="numpy backend: arrays live on 'cpu' only"):
        emacore.EMA(0.5, device="cuda").apply([np.zeros(2)])
    ema = emacore.EMA(0.5, device="cpu")
    w = np.ones(2)
    ema.apply([w])
    np.testing.assert_array_equal(ema.average(w), [1.0, 1.0])
