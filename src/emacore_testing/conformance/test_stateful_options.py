"""Every public option of the stateful `ExponentialMovingAverage`, checked by number on every
backend against a float64 reference computed here, so that each test fails if its option is
ignored; where a backend has no use for an option, the clear error naming the backend.

What other files already check by number is not repeated here: ``exact`` and ``layout``
(test_api), ``compat="tensorflow"`` (test_tf_parity), ``nonfinite`` (test_nonfinite),
``update_every`` and ``dt`` alone (test_intervals), profiles alone (test_profiles), ``buffers``
and the default ``frozen`` (tests/torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import emacore
from emacore.schedules import TFRamp

# ------------------------------------------------------------------------------------------
# the float64 references (no emacore code)


def _tf_ramp(decay: float, n: float) -> float:
    """TF's ``num_updates`` rule: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + n) / (10.0 + n))


def _reference(
    values: Sequence[np.ndarray], decays: Sequence[float], *, zero_debias: bool = False
) -> list[np.ndarray]:
    """The reported average after each apply, in float64.

    The first apply creates the shadow (the value, or zeros with ``zero_debias``) and then
    updates it with ``decays[0]``; every apply ``k`` runs
    ``shadow ← shadow − (1 − d_k)(shadow − value_k)``; with ``zero_debias`` the average is the
    shadow divided by ``1 − Π d``.
    """
    s = np.zeros(values[0].shape) if zero_debias else values[0].astype(np.float64)
    product, out = 1.0, []
    for v, d in zip(values, decays, strict=True):
        s = s - (1.0 - d) * (s - v.astype(np.float64))
        product *= d
        out.append(s / (1.0 - product) if zero_debias and product != 1.0 else s.copy())
    return out


def _values(
    n: int, shape: tuple[int, ...] = (3, 2), dtype: str = "float64", seed: int = 0
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]


def _tol(dtype: str) -> dict[str, Any]:
    # float32 math over a handful of steps against float64: a few ulps of float32
    return {"rtol": 2e-6, "atol": 1e-7} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-15}


def _backend_named(lib: Any) -> str:
    """The ways errors name a backend: ``backend 'numpy'`` or ``numpy backend``."""
    return rf"(backend '{lib.backend}'|{lib.backend} backend)"


def _check_array(lib: Any, got: Any, want: np.ndarray, dtype: str, **tol: Any) -> None:
    """Namespace-independent checks first (dtype, shape, device), then the numbers."""
    assert got.dtype == lib.dtype(dtype), f"dtype {got.dtype}, expected {dtype}"
    assert tuple(got.shape) == want.shape
    assert lib.device_of(got) == lib.device
    np.testing.assert_allclose(lib.read(got), want, **(tol or _tol(dtype)))


# ------------------------------------------------------------------------------------------
# num_updates: read at every apply, in each of its forms, also feeding schedules and profiles

_STEPS = [0, 3, 3, 50, 7, 10_000, 2]  # not monotone: the value *at that apply* counts


def _counter(lib: Any, kind: str) -> tuple[Any, Callable[[int], Any]]:
    """``num_updates`` of the given kind, and a function setting its value."""
    if kind == "int":
        return 4, lambda n: None  # a constant
    if kind == "callable":
        box = {"n": 0}
        return (lambda: box["n"]), lambda n: box.__setitem__("n", n)
    if lib.mutable:  # a 0-d array of the backend's own, mutated in place (torch: fill_)
        holder = {"a": lib.make(np.zeros((), np.int64))}

        def set_array(n: int) -> None:
            holder["a"] = lib.set_value(holder["a"], np.array(n, np.int64))

        return holder["a"], set_array
    counter = np.zeros((), np.int64)  # jax arrays are immutable: a numpy counter
    return counter, lambda n: counter.__setitem__((), n)


@pytest.mark.parametrize("zero_debias", [False, True])
@pytest.mark.parametrize("kind", ["int", "array", "callable"])
def test_num_updates_is_read_at_every_apply(lib: Any, kind: str, zero_debias: bool) -> None:
    values = _values(len(_STEPS), seed=1)
    num_updates, set_n = _counter(lib, kind)
    ema = emacore.EMA(0.99, num_updates=num_updates, zero_debias=zero_debias)
    steps = [4] * len(_STEPS) if kind == "int" else _STEPS
    want = _reference(values, [_tf_ramp(0.99, n) for n in steps], zero_debias=zero_debias)
    w = lib.make(values[0])
    for v, n, ref in zip(values, steps, want):
        set_n(n)
        w = lib.set_value(w, v)
        ema.apply([w])
        _check_array(lib, ema.average(w), ref, "float64")


def test_a_schedule_and_every_profile_see_num_updates(lib: Any) -> None:
    """With ``num_updates``, a schedule is evaluated at it (not at the update count), and
    each decay of several profiles becomes TF's ramp of it."""
    values = _values(len(_STEPS), seed=2)
    box = {"n": 0}

    def schedule(step: Any) -> float:
        return 1.0 - 1.0 / (float(step) + 2.0)

    custom = emacore.EMA(schedule, num_updates=lambda: box["n"], zero_debias=True)
    profiles = emacore.EMA({"fast": 0.5, "slow": 0.95}, num_updates=lambda: box["n"])
    want_custom = _reference(values, [schedule(n) for n in _STEPS], zero_debias=True)
    want = {
        name: _reference(values, [_tf_ramp(d, n) for n in _STEPS])
        for name, d in (("fast", 0.5), ("slow", 0.95))
    }
    w = lib.make(values[0])
    for k, (v, n) in enumerate(zip(values, _STEPS)):
        box["n"] = n
        w = lib.set_value(w, v)
        custom.apply({"w": w})
        profiles.apply({"w": w})
        _check_array(lib, custom.average({"w": w})["w"], want_custom[k], "float64")
        for name in ("fast", "slow"):
            got = profiles.profile(name).average({"w": w})["w"]
            _check_array(lib, got, want[name][k], "float64")


# ------------------------------------------------------------------------------------------
# zero_debias under a changing decay: the exact 1 - Π d by default, TF's formula for parity


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("compat", ["default", "tensorflow"])
def test_zero_debias_under_a_changing_decay(lib: Any, compat: str, dtype: str) -> None:
    """``num_updates`` moves the decay from 0.9 to 0.5, where TF's ``1 − (1 − c_t)^t`` (the
    latest decay only) and the exact ``1 − Π d_i`` differ by up to 50%: each mode must use
    its own correction."""
    steps = [100, 100, 100, 8, 8, 8, 100]
    decays = [_tf_ramp(0.9, n) for n in steps]  # 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.9
    values = _values(len(steps), dtype=dtype, seed=3)
    counter = np.zeros((), np.int64)
    ema = emacore.EMA(0.9, num_updates=counter, zero_debias=True, compat=compat)
    exact = _reference(values, decays, zero_debias=True)
    w = lib.make(values[0])
    s = np.zeros(values[0].shape)
    for t, (v, n, d) in enumerate(zip(values, steps, decays), start=1):
        counter[...] = n
        w = lib.set_value(w, v)
        ema.apply([w])
        if compat == "default":
            want, tol = exact[t - 1], _tol(dtype)
        else:  # TF: d and 1 - d in float32, the correction from the latest decay only
            c = float(np.float32(1.0 - np.float32(d)))
            s = s - c * (s - v.astype(np.float64))
            want = s / (1.0 - (1.0 - c) ** t)
            # TF's float32 correction even for float64 variables: ~1e-7 relative
            tol = {"rtol": 2e-6, "atol": 1e-7}
        _check_array(lib, ema.average(w), want, dtype, **tol)
    # the two corrections are far apart here, so neither can pass for the other
    tf_at_4 = 1.0 - (1.0 - (1.0 - decays[3])) ** 4
    assert abs(tf_at_4 - (1.0 - np.prod(decays[:4]))) > 0.2


# ------------------------------------------------------------------------------------------
# apply(dt=...) with zero_debias, a schedule and several profiles; dt with update_every


def test_dt_raises_each_profiles_scheduled_decay_and_enters_the_debias(lib: Any) -> None:
    values = _values(6, seed=4)
    dts = [2.0, 0.5, 0.0, 3.0, 1.0, 1.5]  # dt = 0: decay 1, nothing moves (the step counts)
    ema = emacore.EMA({"const": 0.8, "ramp": TFRamp(0.95)}, zero_debias=True)
    base = {
        "const": [0.8] * len(values),
        "ramp": [_tf_ramp(0.95, k) for k in range(len(values))],  # at the update count
    }
    want = {
        name: _reference(values, [d**dt for d, dt in zip(ds, dts)], zero_debias=True)
        for name, ds in base.items()
    }
    w = lib.make(values[0])
    for k, (v, dt) in enumerate(zip(values, dts)):
        w = lib.set_value(w, v)
        ema.apply({"w": w}, dt=dt)
        for name in base:
            got = ema.profile(name).average({"w": w})["w"]
            _check_array(lib, got, want[name][k], "float64")


def test_update_every_raises_the_num_updates_ramp_and_an_explicit_dt_wins(lib: Any) -> None:
    """``update_every=3``: calls 1, 4, 7, ... update, with TF's ramp of ``num_updates`` (its
    value at that call) raised to 3; a ``dt`` given to an updating call replaces the 3."""
    values = _values(10, seed=5)
    steps = [0, 1, 2, 30, 31, 32, 5, 6, 7, 900]
    dts: list[float | None] = [None, None, None, None, None, None, 0.5, None, None, None]
    box = {"n": 0}
    ema = emacore.EMA(0.99, num_updates=lambda: box["n"], update_every=3, zero_debias=True)
    s, product = np.zeros(values[0].shape), 1.0
    w = lib.make(values[0])
    for call, (v, n, dt) in enumerate(zip(values, steps, dts)):
        box["n"] = n
        w = lib.set_value(w, v)
        ema.apply([w], dt=dt)
        if call % 3 == 0:
            d = _tf_ramp(0.99, n) ** (3 if dt is None else dt)
            s = s - (1 - d) * (s - v)
            product *= d
        _check_array(lib, ema.average([w])[0], s / (1 - product), "float64")


# ------------------------------------------------------------------------------------------
# shadow_dtype: the dtype of the shadows, seen in their dtype and in their numbers

_HALF_POLICIES = ["default", "same", "float32", "float64", "float64 dtype", "tensorflow"]


@pytest.mark.parametrize("policy", _HALF_POLICIES)
def test_shadow_dtype_of_float16_parameters(lib: Any, policy: str) -> None:
    """Decay 0.9999 from 1 towards 2: each step adds 1e-4, under half of float16's spacing at
    1 (4.9e-4), so a float16 shadow never moves; a float32 one follows to float32 precision,
    a float64 one to float64 precision. (``"float32"`` is what the default picks: that case
    checks the name is accepted, the others fail if ``shadow_dtype`` is ignored.)"""
    if lib.name == "array_api_strict":
        pytest.skip("array-api-strict has no float16 (the float32 policies are tested below)")
    options: dict[str, Any] = {
        "default": {},
        "same": {"shadow_dtype": "same"},
        "float32": {"shadow_dtype": "float32"},
        "float64": {"shadow_dtype": "float64"},
        "float64 dtype": {"shadow_dtype": lib.dtype("float64")},
        "tensorflow": {"compat": "tensorflow"},  # TF keeps the variable's dtype
    }[policy]
    ema = emacore.EMA(0.9999, **options)
    w = lib.make(np.ones(4, np.float16))
    ema.apply({"w": w})
    w = lib.set_value(w, np.full(4, 2.0, np.float16))
    for _ in range(20):
        ema.apply({"w": w})
    avg = ema.average({"w": w})["w"]
    moved = np.full(4, 2.0 - 0.9999**20)  # float64 closed form of the same recursion
    if policy in ("same", "tensorflow"):
        _check_array(lib, avg, np.ones(4), "float16", rtol=0, atol=0)  # stuck at 1
    elif policy.startswith("float64"):
        _check_array(lib, avg, moved, "float64", rtol=1e-13, atol=0)
    else:
        # 20 float32 roundings of about 6e-8 each
        _check_array(lib, avg, moved, "float32", rtol=2e-6, atol=0)


@pytest.mark.parametrize("policy", ["default", "same", "float64", "float64 dtype"])
def test_shadow_dtype_of_float32_parameters(lib: Any, policy: str) -> None:
    """A float64 shadow of float32 parameters (by name or as the backend's dtype object) is
    float64 to 1e-13 of the float64 reference, which a float32 shadow misses by ~1e-7;
    ``"same"`` and the default keep float32. Debiased averages keep the shadow's dtype."""
    options: dict[str, Any] = {
        "default": {},
        "same": {"shadow_dtype": "same"},
        "float64": {"shadow_dtype": "float64"},
        "float64 dtype": {"shadow_dtype": lib.dtype("float64")},
    }[policy]
    values = _values(6, shape=(40,), dtype="float32", seed=6)
    ema = emacore.EMA(0.7, zero_debias=True, **options)
    want = _reference(values, [0.7] * len(values), zero_debias=True)
    w = lib.make(values[0])
    for v, ref in zip(values, want):
        w = lib.set_value(w, v)
        ema.apply([w])
        if policy.startswith("float64"):
            _check_array(lib, ema.average(w), ref, "float64", rtol=1e-13, atol=1e-15)
        else:
            _check_array(lib, ema.average(w), ref, "float32", rtol=2e-6, atol=1e-6)
    if policy.startswith("float64"):  # not within 1e-13 by chance: a float32 shadow is not
        assert not np.allclose(want[-1].astype(np.float32), want[-1], rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------------
# copy_to / swapped / store: they write the reported (debiased) average, at the live dtype


def test_evaluation_writes_the_debiased_average_of_a_wider_shadow(lib: Any) -> None:
    """copy_to, swapped and store/restore write what `average` reports: the debiased
    average, cast to the live array's dtype (a float64 shadow into a float32 parameter)."""
    values = _values(4, shape=(5,), dtype="float32", seed=7)
    ema = emacore.EMA(0.6, zero_debias=True, shadow_dtype=lib.dtype("float64"))
    params = {"w": lib.make(values[0])}
    for v in values:
        params["w"] = lib.set_value(params["w"], v)
        ema.apply(params)
    want = _reference(values, [0.6] * len(values), zero_debias=True)[-1].astype(np.float32)
    live = values[-1]
    if not lib.mutable:
        with pytest.raises(emacore.ImmutableArrayError, match=_backend_named(lib)):
            ema.copy_to(params)
        return
    with ema.swapped(params):
        _check_array(lib, params["w"], want, "float32", rtol=0, atol=0)
    _check_array(lib, params["w"], live, "float32", rtol=0, atol=0)
    ema.store(params)
    ema.copy_to(params)
    _check_array(lib, params["w"], want, "float32", rtol=0, atol=0)
    ema.restore()
    _check_array(lib, params["w"], live, "float32", rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# include, name, variables_to_restore, backend


def test_include_tracks_only_the_matching_leaves(lib: Any) -> None:
    values = _values(4, shape=(2,), seed=8)
    ema = emacore.EMA(0.5, include=["enc/*"], name="avg")
    params = {"enc": {"w": lib.make(values[0])}, "dec": {"w": lib.make(values[0])}}
    for v in values:
        params = {
            "enc": {"w": lib.set_value(params["enc"]["w"], v)},
            "dec": {"w": lib.set_value(params["dec"]["w"], v * 2)},
        }
        ema.apply(params)
    avg = ema.average(params)
    _check_array(lib, avg["enc"]["w"], _reference(values, [0.5] * 4)[-1], "float64")
    assert avg["dec"]["w"] is params["dec"]["w"]  # not tracked: handed back as it is
    restore = ema.variables_to_restore()
    assert list(restore) == ["enc/w/avg"]
    assert restore["enc/w/avg"] is params["enc"]["w"]  # the live object, not a copy


def test_a_forced_backend_computes_and_refuses_foreign_arrays(lib: Any) -> None:
    values = _values(3, seed=9)
    ema = emacore.EMA(0.75, backend=lib.backend)
    w = lib.make(values[0])
    for v in values:
        w = lib.set_value(w, v)
        ema.apply({"w": w})
    _check_array(lib, ema.average({"w": w})["w"], _reference(values, [0.75] * 3)[-1], "float64")
    other = "array_api" if lib.backend == "numpy" else "numpy"
    forced = emacore.EMA(0.75, backend=other)
    if other == "numpy":
        with pytest.raises(emacore.LeafMismatchError, match="backend 'numpy' does not handle"):
            forced.apply({"w": lib.make(values[0])})
        assert forced.state_dict()["leaves"] == {}
    else:  # numpy arrays are standard arrays: the portable backend computes the same numbers
        forced.apply({"w": values[0].copy()})
        forced.apply({"w": values[1].copy()})
        got = forced.average({"w": values[1]})["w"]
        np.testing.assert_allclose(got, _reference(values[:2], [0.75] * 2)[-1], rtol=1e-12)


# ------------------------------------------------------------------------------------------
# load_state_dict(strict=False): the loaded leaves continue from the loaded numbers


def test_a_loose_load_continues_the_loaded_leaves_and_keeps_the_others(lib: Any) -> None:
    values = _values(5, shape=(3,), seed=10)
    saved = emacore.EMA(0.8, zero_debias=True)
    saved.apply({"a": lib.make(values[0]), "b": lib.make(values[0])})
    saved.apply({"a": lib.make(values[1]), "b": lib.make(values[1])})
    state = saved.state_dict()
    here = emacore.EMA(0.8, zero_debias=True)
    here.apply({"a": lib.make(values[4]), "c": lib.make(values[4])})
    with pytest.raises(emacore.StateDictError, match="differ"):
        here.load_state_dict(state)  # strict by default
    assert here.load_state_dict(state, strict=False) == emacore.LoadResult(["c"], ["b"])
    here.apply({"a": lib.make(values[2]), "c": lib.make(values[2])})
    avg = here.average({"a": lib.make(values[2]), "c": lib.make(values[2])})
    # "a": two saved updates, then one here (the debias divides by 1 - 0.8³);
    # "c": its own update with values[4], then values[2] (1 - 0.8²); "b" was not loaded
    _check_array(lib, avg["a"], _reference(values[:3], [0.8] * 3, zero_debias=True)[-1], "float64")
    want_c = _reference([values[4], values[2]], [0.8] * 2, zero_debias=True)[-1]
    _check_array(lib, avg["c"], want_c, "float64")
    assert set(here.state_dict()["leaves"]) == {"a", "c"}


# ------------------------------------------------------------------------------------------
# options a backend has no use for: refused, naming the backend and the option


def test_side_stream_without_cuda_streams_is_refused_naming_the_backend(lib: Any) -> None:
    ema = emacore.EMA(0.9, side_stream=True)
    named = _backend_named(lib)
    with pytest.raises(ValueError, match=rf"{named}.*side_stream|side_stream.*{named}"):
        ema.apply({"w": lib.make(np.zeros(2, np.float32))})
    assert ema.state_dict()["leaves"] == {}


def test_an_offload_device_the_backend_lacks_is_refused_naming_it(lib: Any) -> None:
    ema = emacore.EMA(0.9, device="nowhere")
    with pytest.raises(ValueError, match=rf"{_backend_named(lib)}.*'nowhere'"):
        ema.apply({"w": lib.make(np.zeros(2, np.float32))})
    assert ema.state_dict()["leaves"] == {}


# ------------------------------------------------------------------------------------------
# frozen="average" (torch modules: the only framework container with frozen parameters)


def test_frozen_parameters_averaged_like_the_others(lib: Any) -> None:
    if lib.backend != "torch":
        pytest.skip(f"{lib.name} has no module containers with frozen parameters")
    torch = lib.xp  # torch's Lib: its namespace is the torch module

    values = _values(4, shape=(2, 3), seed=11)
    model = torch.nn.Linear(3, 2)
    model.weight.requires_grad_(False)
    averaged, copied = emacore.EMA(0.5, frozen="average"), emacore.EMA(0.5)
    for v in values:
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(v).float())
        averaged.apply(model)
        copied.apply(model)
    want = _reference([v.astype(np.float32) for v in values], [0.5] * 4)[-1]
    got = averaged.average(model)["weight"]
    _check_array(lib, got, want, "float32")
    assert "weight" in averaged.state_dict()["leaves"]
    # the default copies it: the current value, exactly
    _check_array(
        lib,
        copied.average(model)["weight"],
        values[-1].astype(np.float32),
        "float32",
        rtol=0,
        atol=0,
    )
