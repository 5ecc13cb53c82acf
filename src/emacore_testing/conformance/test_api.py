"""The public contract (DESIGN.md §5) on every backend: numbers against float64 math,
namespace/dtype/shape/device of every result, leaf identity rules, state dicts."""

from __future__ import annotations

import collections
import gc
from typing import Any

import numpy as np
import pytest

import emacore
from emacore import functional as F


def ref_ema(values: list[np.ndarray], decays: list[float], zero_debias: bool) -> np.ndarray:
    """Float64 reference: shadow starts at values[0] (or 0 with debias), then updates."""
    s = np.zeros_like(values[0], np.float64) if zero_debias else values[0].astype(np.float64)
    prod = 1.0
    for v, d in zip(values, decays):
        s = d * s + (1 - d) * v.astype(np.float64)
        prod *= d
    return s / (1 - prod) if zero_debias else s


def test_contract_names() -> None:
    assert emacore.EMA is emacore.ExponentialMovingAverage
    assert callable(emacore.functional.init) and callable(emacore.functional.update)
    assert callable(emacore.functional.average)
    assert {"array_api", "numpy", "torch", "jax"} <= set(emacore.backends())
    assert emacore.hookimpl.project_name == "emacore"
    assert callable(emacore.schedules.TFRamp(0.9))


@pytest.mark.parametrize("zero_debias", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stateful_matches_float64_reference(lib: Any, zero_debias: bool, dtype: str) -> None:
    rng = np.random.default_rng(1)
    values = [rng.standard_normal((3, 4)).astype(dtype) for _ in range(30)]
    decays = [0.9] * 30
    w = lib.make(values[0])
    ema = emacore.EMA(0.9, zero_debias=zero_debias)
    for v in values:
        w = lib.set_value(w, v)
        ema.apply([w])
    avg = ema.average(w)
    assert avg.dtype == lib.dtype(dtype)
    assert tuple(avg.shape) == (3, 4)
    assert lib.device_of(avg) == lib.device
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(
        lib.read(avg), ref_ema(values, decays, zero_debias), rtol=tol, atol=tol
    )


def test_dict_tree_rebinding_keeps_shadows(lib: Any) -> None:
    rng = np.random.default_rng(2)
    Pair = collections.namedtuple("Pair", "w b")
    steps: list[dict[str, Any]] = [
        {
            "dense": Pair(rng.standard_normal((2, 3)), rng.standard_normal(3)),
            "out": [rng.standard_normal(2)],
        }
        for _ in range(5)
    ]
    ema = emacore.EMA(0.8)
    for tree in steps:
        params: dict[str, Any] = {
            "dense": Pair(lib.make(tree["dense"].w), lib.make(tree["dense"].b)),
            "out": [lib.make(tree["out"][0])],
        }  # fresh arrays every step, as JAX code (or w = w - lr * g) produces
        ema.apply(params)
    avg = ema.average(params)
    assert isinstance(avg, dict) and isinstance(avg["dense"], Pair) and isinstance(avg["out"], list)
    np.testing.assert_allclose(
        lib.read(avg["dense"].w),
        ref_ema([t["dense"].w for t in steps], [0.8] * 5, False),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        lib.read(avg["out"][0]), ref_ema([t["out"][0] for t in steps], [0.8] * 5, False), rtol=1e-12
    )
    assert ema.average_name(params["dense"].w) == "dense/w/ExponentialMovingAverage"
    sub = ema.average(params["dense"])  # a sub-container: found by its arrays
    np.testing.assert_array_equal(lib.read(sub.b), lib.read(avg["dense"].b))
    assert set(ema.variables_to_restore()) == {
        "dense/w/ExponentialMovingAverage",
        "dense/b/ExponentialMovingAverage",
        "out/0/ExponentialMovingAverage",
    }


def test_plain_list_tracks_mutable_arrays_by_identity(lib: Any) -> None:
    if not lib.mutable:
        _immutable_arrays_are_tracked_by_position(lib)
        return
    a, b = lib.make(np.zeros(2)), lib.make(np.ones(2))
    ema = emacore.EMA(0.5, name="avg")
    ema.apply([a, b])
    ema.apply((b,))  # TF semantics: a subset is fine; b's counters advance alone
    a = lib.set_value(a, np.full(2, 4.0))
    ema.apply([a, b])
    np.testing.assert_allclose(lib.read(ema.average(a)), [2.0, 2.0])
    np.testing.assert_allclose(lib.read(ema.average(b)), [1.0, 1.0])
    assert ema.average_name(a) == "Variable/avg"
    assert ema.average_name(b) == "Variable_1/avg"
    sd = ema.state_dict()
    assert sd["leaves"]["Variable"]["count"] == 2
    assert sd["leaves"]["Variable_1"]["count"] == 3
    other = [lib.make(np.zeros(2))]
    assert ema.average(other[0]) is None  # TF returns None for an untracked variable
    with pytest.raises(KeyError, match="no moving average"):
        ema.average(other)


def _immutable_arrays_are_tracked_by_position(lib: Any) -> None:
    """JAX: a plain list's arrays are new objects every step; position identifies them."""
    a, b = lib.make(np.zeros(2)), lib.make(np.ones(2))
    ema = emacore.EMA(0.5, name="avg")
    ema.apply([a, b])
    a, b = lib.set_value(a, np.full(2, 4.0)), lib.set_value(b, np.full(2, 3.0))
    ema.apply([a, b])  # new objects, same positions: same shadows
    np.testing.assert_allclose(lib.read(ema.average(a)), [2.0, 2.0])
    np.testing.assert_allclose(lib.read(ema.average([a, b])[1]), [2.0, 2.0])
    assert ema.average_name(b) == "Variable_1/avg"
    assert len(ema.state_dict()["leaves"]) == 2
    assert ema.average(lib.make(np.zeros(2))) is None


def test_rebinding_a_plain_list_warns(lib: Any) -> None:
    if not lib.mutable:  # JAX: rebinding is the normal flow; position keeps the shadow
        ema = emacore.EMA(0.9)
        w = lib.make(np.zeros(3))
        ema.apply([w])
        ema.apply([lib.make(np.ones(3))])
        assert len(ema.state_dict()["leaves"]) == 1
        return
    ema = emacore.EMA(0.9)
    w = lib.make(np.zeros(3))
    ema.apply([w])
    w = lib.make(lib.read(w) + 1.0)  # a new object: the old one dies
    gc.collect()
    with pytest.warns(emacore.EMAWarning, match="rebinds arrays"):
        ema.apply([w])
    assert len(ema.state_dict()["leaves"]) == 2  # it still works, as TF would: a new shadow


def test_functional_is_pure_and_matches_reference(lib: Any) -> None:
    rng = np.random.default_rng(3)
    values = [rng.standard_normal(5) for _ in range(6)]
    params = {"w": lib.make(values[0])}
    state = F.init(params)
    before = lib.read(state.shadow["w"])
    s1 = F.update(state, {"w": lib.make(values[1])}, 0.7)
    np.testing.assert_array_equal(lib.read(state.shadow["w"]), before)  # not modified
    assert state.count == 0 and s1.count == 1
    s = s1
    for v in values[2:]:
        s = F.update(s, {"w": lib.make(v)}, 0.7)
    want = ref_ema(values, [0.7] * len(values), zero_debias=False)
    np.testing.assert_allclose(lib.read(F.average(s)["w"]), want, rtol=1e-12)
    assert lib.device_of(F.average(s)["w"]) == lib.device


def test_functional_schedule_uses_step(lib: Any) -> None:
    ramp = emacore.schedules.TFRamp(0.99)
    state = F.init([lib.make(np.zeros(1))], zero_debias=True)
    values = [np.full(1, float(k)) for k in range(1, 6)]
    for v in values:
        state = F.update(state, [lib.make(v)], ramp)
    decays = [min(0.99, (1 + n) / (10 + n)) for n in range(5)]
    np.testing.assert_allclose(
        lib.read(F.average(state)[0]), ref_ema(values, decays, True), rtol=1e-12
    )
    assert state.decay_product == pytest.approx(np.prod(decays), rel=1e-15)


@pytest.mark.parametrize("kind", ["int", "array", "callable"])
def test_num_updates_forms(lib: Any, kind: str) -> None:
    step = {"n": 0}
    counter = np.zeros((), np.int64)
    num_updates = {"int": 5, "array": counter, "callable": lambda: step["n"]}[kind]
    ema = emacore.EMA(0.99, num_updates=num_updates)
    w = lib.make(np.zeros(1))
    ema.apply([w])
    w = lib.set_value(w, np.ones(1))
    step["n"] = 5
    counter[...] = 5
    ema.apply([w])
    d = min(0.99, 6 / 15)
    np.testing.assert_allclose(lib.read(ema.average(w)), [1 - d], rtol=1e-12)


def test_state_dict_round_trip(lib: Any) -> None:
    rng = np.random.default_rng(4)
    params = {"a": lib.make(rng.standard_normal(3)), "b": lib.make(rng.standard_normal((2, 2)))}
    ema = emacore.EMA(0.9, zero_debias=True)
    ema.apply(params)
    params["a"] = lib.make(rng.standard_normal(3))
    ema.apply(params)
    sd = ema.state_dict()
    fresh = emacore.EMA(0.9, zero_debias=True)
    assert fresh.load_state_dict(sd) == emacore.LoadResult([], [])
    for k in params:
        np.testing.assert_array_equal(
            lib.read(fresh.average(params)[k]), lib.read(ema.average(params)[k])
        )
    # copies, not aliases: advancing one does not move the other
    new = {k: lib.make(rng.standard_normal(v.shape)) for k, v in params.items()}
    fresh.apply(new)
    ema.apply(new)
    np.testing.assert_array_equal(
        lib.read(fresh.average(new)["a"]), lib.read(ema.average(new)["a"])
    )
    fresh.apply(new)
    assert not np.array_equal(lib.read(fresh.average(new)["a"]), lib.read(ema.average(new)["a"]))


def test_state_dict_binds_identity_leaves_in_order(lib: Any) -> None:
    a, b = lib.make(np.zeros(2)), lib.make(np.ones(3))
    ema = emacore.EMA(0.5)
    ema.apply([a, b])
    sd = ema.state_dict()
    restored = emacore.EMA(0.5)
    restored.load_state_dict(sd)
    a2, b2 = lib.make(np.full(2, 2.0)), lib.make(np.full(3, 3.0))
    restored.apply([a2, b2])
    np.testing.assert_allclose(lib.read(restored.average(a2)), [1.0, 1.0])
    np.testing.assert_allclose(lib.read(restored.average(b2)), [2.0, 2.0, 2.0])
    assert restored.average_name(b2) == "Variable_1/ExponentialMovingAverage"


def test_load_state_dict_strict_reports_differences(lib: Any) -> None:
    ema = emacore.EMA(0.5)
    ema.apply({"a": lib.make(np.zeros(1)), "b": lib.make(np.zeros(1))})
    sd = ema.state_dict()
    other = emacore.EMA(0.5)
    other.apply({"a": lib.make(np.zeros(1)), "c": lib.make(np.zeros(1))})
    with pytest.raises(emacore.StateDictError, match=r"missing \['c'\], unexpected \['b'\]"):
        other.load_state_dict(sd)
    result = other.load_state_dict(sd, strict=False)
    assert result == emacore.LoadResult(["c"], ["b"])
    with pytest.raises(emacore.StateDictError, match="zero_debias"):
        emacore.EMA(0.5, zero_debias=True).load_state_dict(sd)
    with pytest.raises(emacore.StateDictError, match="format"):
        emacore.EMA(0.5).load_state_dict({"leaves": {}})


def test_float64_shadows_for_float32_parameters(lib: Any) -> None:
    rng = np.random.default_rng(5)
    values = [rng.standard_normal(4).astype(np.float32) for _ in range(8)]
    w = lib.make(values[0])
    ema = emacore.EMA(0.9, shadow_dtype=lib.dtype("float64"))
    for v in values:
        w = lib.set_value(w, v)
        ema.apply([w])
    avg = ema.average(w)
    assert avg.dtype == lib.dtype("float64")
    want = ref_ema([v.astype(np.float64) for v in values], [0.9] * 8, zero_debias=False)
    np.testing.assert_allclose(lib.read(avg), want, rtol=1e-13)
    with pytest.raises(emacore.LeafDTypeError, match="cannot hold a .*float64"):
        emacore.EMA(0.9, shadow_dtype="float32").apply([lib.make(np.zeros(1, np.float64))])
    with pytest.raises(ValueError, match="shadow_dtype must be"):
        emacore.EMA(0.9, shadow_dtype="float8")


@pytest.mark.parametrize("zero_debias", [False, True])
def test_traceable_counters_give_the_same_numbers(lib: Any, zero_debias: bool) -> None:
    """Counters kept as 0-d arrays (for jit/compile) compute what Python counters do."""
    rng = np.random.default_rng(6)
    values = [rng.standard_normal(3) for _ in range(7)]
    ramp = emacore.schedules.TFRamp(0.95)
    plain = F.init({"w": lib.make(values[0])}, zero_debias=zero_debias)
    traced = F.init({"w": lib.make(values[0])}, zero_debias=zero_debias, traceable=True)
    assert hasattr(traced.count, "shape")
    assert hasattr(traced.decay_product, "shape")
    for v in values:
        plain = F.update(plain, {"w": lib.make(v)}, ramp)
        traced = F.update(traced, {"w": lib.make(v)}, ramp)
    assert int(traced.count) == plain.count == 7
    assert float(traced.decay_product) == pytest.approx(plain.decay_product, rel=1e-15)
    got, want = F.average(traced)["w"], F.average(plain)["w"]
    assert got.dtype == want.dtype
    assert lib.device_of(got) == lib.device
    np.testing.assert_allclose(lib.read(got), lib.read(want), rtol=1e-14)
    with pytest.raises(ValueError, match="traceable=True cannot reproduce TensorFlow"):
        F.init({"w": lib.make(values[0])}, compat="tensorflow", traceable=True)


def test_exact_option_gives_the_reference_bits_in_default_mode(lib: Any) -> None:
    """exact=True: s - (s - x) * c with c = 1 - d in float64 cast to the leaf dtype, the
    numbers numpy computes, on every backend (torch otherwise fuses a lerp)."""
    rng = np.random.default_rng(8)
    start = rng.standard_normal(257).astype(np.float32)
    values = [rng.standard_normal(257).astype(np.float32) for _ in range(5)]
    w = lib.make(start)
    ema = emacore.EMA(emacore.schedules.TFRamp(0.6), exact=True)
    ema.apply([w])
    ref = start.copy()
    for k, v in enumerate(values, start=1):
        w = lib.set_value(w, v)
        ema.apply([w])
        c = np.float32(1.0 - min(0.6, (1 + k) / (10 + k)))
        ref = ref - (ref - v) * c
    np.testing.assert_array_equal(lib.read(ema.average(w)), ref)
    with pytest.raises(TypeError, match="exact must be"):
        emacore.EMA(0.9, exact="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("layout", ["auto", "flat", "separate"])
def test_layouts_give_the_same_numbers(lib: Any, layout: str, exact: bool) -> None:
    rng = np.random.default_rng(9)
    shapes = [(3,), (70_000,), (4, 5), ()]
    start = [rng.standard_normal(s) for s in shapes]
    new = [rng.standard_normal(s) for s in shapes]
    if lib.backend == "array_api" and layout == "flat":
        with pytest.raises(ValueError, match=f"{lib.backend}'? (backend )?has no 'flat' layout"):
            emacore.EMA(0.5, layout=layout).apply([lib.make(v) for v in start])
        return
    params = [lib.make(v) for v in start]
    ema = emacore.EMA(0.75, layout=layout, exact=exact)
    ema.apply(params)
    params = [lib.set_value(p, v) for p, v in zip(params, new)]
    ema.apply(params)
    for p, s0, v in zip(params, start, new):  # c = 1/4: exact products, fused or not
        np.testing.assert_array_equal(lib.read(ema.average(p)), s0 - (s0 - v) * 0.25)
    with pytest.raises(ValueError, match="layout must be"):
        emacore.EMA(0.5, layout="packed")
