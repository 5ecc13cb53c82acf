"""Bad input: a clear error naming the leaf and what was expected, and never a half-updated
state (an update happens for every tracked leaf or for none)."""

from __future__ import annotations

import collections
import math
from typing import Any

import array_api_strict
import numpy as np
import pytest

import emacore
from emacore import functional as F


def _snapshot(lib: Any, ema: emacore.EMA, tree: Any) -> dict[str, Any]:
    sd = ema.state_dict()
    return {
        k: (lib.read(v["shadow"]), v["count"], v["decay_product"]) for k, v in sd["leaves"].items()
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0])
        assert a[k][1:] == b[k][1:]


@pytest.mark.parametrize("decay", [-0.1, 1.5, math.nan, "0.9", None])
def test_decay_out_of_range(decay: Any) -> None:
    with pytest.raises((emacore.DecayError, TypeError), match="decay"):
        emacore.EMA(decay)


def test_schedule_out_of_range_changes_nothing(lib: Any) -> None:
    values = {"n": 0}
    ema = emacore.EMA(lambda step: 0.5 if values["n"] == 0 else 2.0)
    params = {"a": lib.make(np.zeros(2)), "b": lib.make(np.ones(3))}
    ema.apply(params)
    before = _snapshot(lib, ema, params)
    values["n"] = 1
    with pytest.raises(emacore.DecayError, match=r"lie in \[0, 1\], got 2.0"):
        ema.apply(params)
    _assert_same(before, _snapshot(lib, ema, params))


def test_shape_mismatch_names_leaf_and_changes_nothing(lib: Any) -> None:
    ema = emacore.EMA(0.9)
    params = {"a": lib.make(np.zeros(2)), "b": lib.make(np.zeros(3))}
    ema.apply(params)
    before = _snapshot(lib, ema, params)
    bad = {"a": lib.make(np.ones(2)), "b": lib.make(np.ones(4))}
    with pytest.raises(
        emacore.LeafMismatchError,
        match=r"leaf 'b': shape \(4,\) does not match its shadow's shape \(3,\)",
    ):
        ema.apply(bad)
    _assert_same(before, _snapshot(lib, ema, params))


def test_dtype_mismatch(lib: Any) -> None:
    ema = emacore.EMA(0.9)
    ema.apply({"w": lib.make(np.zeros(2, np.float32))})
    with pytest.raises(
        emacore.LeafMismatchError,
        match="leaf 'w': dtype .*float64.* does not match its shadow's dtype .*float32",
    ):
        ema.apply({"w": lib.make(np.zeros(2, np.float64))})


def test_non_floating_leaf(lib: Any) -> None:
    ema = emacore.EMA(0.9)
    with pytest.raises(emacore.LeafDTypeError, match="leaf 'steps' has dtype .*int64"):
        ema.apply({"w": lib.make(np.zeros(2)), "steps": lib.make(np.zeros((), np.int64))})
    assert ema.state_dict()["leaves"] == {}  # the float leaf was not created either
    with pytest.raises(emacore.LeafDTypeError):
        F.init([lib.make(np.zeros(2, np.int32))])


def test_structure_changed_functional(lib: Any) -> None:
    state = F.init({"a": lib.make(np.zeros(1)), "b": lib.make(np.zeros(1))})
    with pytest.raises(
        emacore.StructureError, match=r"missing leaves: \['b'\]; unexpected leaves: \['c'\]"
    ):
        F.update(state, {"a": lib.make(np.zeros(1)), "c": lib.make(np.zeros(1))}, 0.9)
    Pair = collections.namedtuple("Pair", "a b")
    with pytest.raises(emacore.StructureError, match="different container types"):
        F.update(state, Pair(lib.make(np.zeros(1)), lib.make(np.zeros(1))), 0.9)


def test_same_array_twice(lib: Any) -> None:
    w = lib.make(np.zeros(1))
    with pytest.raises(emacore.StructureError, match="appears twice"):
        emacore.EMA(0.9).apply([w, w])


def test_unknown_backend_and_unknown_leaf_type() -> None:
    with pytest.raises(emacore.UnknownBackendError, match=r"'nope'.*registered backends"):
        emacore.EMA(0.9, backend="nope")
    with pytest.raises(emacore.UnknownBackendError, match="builtins.str"):
        emacore.EMA(0.9).apply({"w": "not an array"})


# The next three need two array libraries or two devices, so they use array-api-strict (a
# test dependency, always installed) beside numpy rather than the parametrised ``lib``.


def test_forced_backend_rejects_foreign_arrays() -> None:
    xp = array_api_strict
    ema = emacore.EMA(0.9, backend="numpy")
    with pytest.raises(emacore.LeafMismatchError, match="backend 'numpy' does not handle"):
        ema.apply([xp.asarray([0.0])])


def test_mixed_backends_are_each_checked() -> None:
    xp = array_api_strict
    ema = emacore.EMA(0.9)
    ema.apply({"w": xp.asarray([0.0, 1.0]), "v": np.zeros(2)})
    with pytest.raises(emacore.LeafMismatchError, match="leaf 'v': got an array of backend"):
        ema.apply({"w": xp.asarray([0.0, 1.0]), "v": xp.asarray([0.0, 1.0])})


def test_device_mismatch() -> None:
    xp = array_api_strict
    ema = emacore.EMA(0.9)
    ema.apply({"w": xp.asarray([0.0, 0.0], dtype=xp.float32, device=xp.Device("device1"))})
    elsewhere = xp.asarray([1.0, 2.0], dtype=xp.float32, device=xp.Device("device2"))
    with pytest.raises(
        emacore.LeafMismatchError,
        match="leaf 'w': parameter is on device .*device2.* shadow is on .*device1",
    ):
        ema.apply({"w": elsewhere})


def test_bad_num_updates() -> None:
    with pytest.raises(TypeError, match="num_updates"):
        emacore.EMA(0.9, num_updates="10")
    ema = emacore.EMA(0.9, num_updates=np.zeros(3))
    with pytest.raises(ValueError, match="num_updates must be a scalar"):
        ema.apply([np.zeros(1)])
    with pytest.raises(ValueError, match="compat"):
        emacore.EMA(0.9, compat="tf")


@pytest.mark.parametrize("tracked_by", ["name", "identity"])
def test_a_shadow_that_cannot_be_made_records_nothing(lib: Any, tracked_by: str) -> None:
    """A float32 shadow of a float64 leaf is refused when the shadows are made: the EMA must
    be left as it was (no name recorded without a shadow), and work on with valid leaves."""
    ema = emacore.EMA(0.5, shadow_dtype="float32")
    w = lib.make(np.ones(3, np.float64))
    params: Any = {"w": w} if tracked_by == "name" else [w]
    with pytest.raises(emacore.LeafDTypeError):
        ema.apply(params)
    assert ema.state_dict()["leaves"] == {}
    with pytest.raises(emacore.LeafDTypeError):  # the same error again, not a stale record
        ema.apply(params)
    assert ema.state_dict()["leaves"] == {}
    h = lib.make(np.ones(3, np.float32))
    ema.apply({"h": h})
    np.testing.assert_array_equal(lib.read(ema.average({"h": h})["h"]), np.ones(3, np.float32))


def test_a_refused_apply_does_not_use_up_an_update_every_call(lib: Any) -> None:
    ema = emacore.EMA(0.5, update_every=2)
    ema.apply({"w": lib.make(np.zeros(2))})  # call 1: updates (creates the shadow)
    ema.apply({"w": lib.make(np.ones(2))})  # call 2: skipped
    with pytest.raises(emacore.LeafMismatchError):
        ema.apply({"w": lib.make(np.ones(3))})  # call 3 would update: refused
    ema.apply({"w": lib.make(np.full(2, 4.0))})  # so this is call 3, and updates (dt = 2)
    got = lib.read(ema.average({"w": lib.make(np.zeros(2))})["w"])
    np.testing.assert_allclose(got, np.full(2, 4.0 * (1 - 0.5**2)), rtol=1e-6)


def test_a_state_dict_shadow_of_another_dtype_is_refused_and_changes_nothing(lib: Any) -> None:
    """Loaded, a float64 shadow of a tracked float32 leaf would make every later apply fail:
    refused naming the leaf, with the EMA as it was."""
    ema = emacore.EMA(0.5)
    params = {"w": lib.make(np.ones(3, np.float32))}
    ema.apply(params)
    state = ema.state_dict()
    bad = {**state, "leaves": {"w": {**state["leaves"]["w"]}}}
    bad["leaves"]["w"]["shadow"] = lib.make(np.zeros(3, np.float64))
    with pytest.raises(emacore.StateDictError, match="leaf 'w': state dict shadow dtype float64"):
        ema.load_state_dict(bad)
    ema.apply({"w": lib.make(np.full(3, 3.0, np.float32))})
    np.testing.assert_array_equal(lib.read(ema.average(params)["w"]), np.full(3, 2.0))
