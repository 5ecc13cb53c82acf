"""Several decays at once (issue 5, item 4), on every backend: K profiles updated in one call
give each profile the bits of a separate EMA with that decay, are read by name, and survive
state dicts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import emacore
from emacore.schedules import TFRamp

# small leaves (packed by the numpy, torch and jax backends) and one large (kept apart)
SHAPES = [(3,), (4, 5), (70_000,), ()]


def _steps(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(n)]


@pytest.mark.parametrize("zero_debias", [False, True])
@pytest.mark.parametrize("exact", [True, False])
def test_each_profile_gets_the_bits_of_its_own_ema(
    lib: Any, zero_debias: bool, exact: bool
) -> None:
    steps = _steps(4)
    decays: dict[str, Any] = {"fast": 0.9, "ramp": TFRamp(0.99), "slow": 0.999}
    multi = emacore.EMA(decays, zero_debias=zero_debias, exact=exact)
    singles = {k: emacore.EMA(d, zero_debias=zero_debias, exact=exact) for k, d in decays.items()}
    params = [lib.make(v) for v in steps[0]]
    for values in steps:
        params = [lib.set_value(p, v) for p, v in zip(params, values)]
        multi.apply(params)
        for ema in singles.values():
            ema.apply(params)
    assert multi.profiles == ("fast", "ramp", "slow")
    for name, single in singles.items():
        for got, want in zip(multi.profile(name).average(params), single.average(params)):
            np.testing.assert_array_equal(lib.read(got), lib.read(want))
    for got, want in zip(multi.average(params), singles["fast"].average(params)):
        np.testing.assert_array_equal(lib.read(got), lib.read(want))  # the first profile


def test_profiles_against_float64_math(lib: Any) -> None:
    steps = _steps(5, seed=1)
    ema = emacore.EMA((0.5, 0.75))
    assert ema.profiles == ("0.5", "0.75")
    params = [lib.make(v) for v in steps[0]]
    for values in steps:
        params = [lib.set_value(p, v) for p, v in zip(params, values)]
        ema.apply(params)
    for name, d in (("0.5", 0.5), ("0.75", 0.75)):
        for i in range(len(SHAPES)):
            ref = steps[0][i].astype(np.float64)
            for values in steps:
                ref = d * ref + (1 - d) * values[i]
            got = lib.read(ema.profile(name).average(params)[i])
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_profile_names_and_errors(lib: Any) -> None:
    w = lib.make(np.ones(2, np.float32))
    ema = emacore.EMA({"fast": 0.9, "slow": 0.99}, name="avg")
    ema.apply({"w": w})
    assert ema.profile("slow").average_name(w) == "w/avg/slow"
    assert ema.average_name(w) == "w/avg/fast"
    assert set(ema.profile("slow").variables_to_restore()) == {"w/avg/slow"}
    with pytest.raises(KeyError, match="no decay profile 'medium'"):
        ema.profile("medium")
    assert emacore.EMA(0.9).profiles == ()
    with pytest.raises(ValueError, match="distinct names"):
        emacore.EMA((0.9, 0.9))
    with pytest.raises(ValueError, match="at least one profile"):
        emacore.EMA(())
    with pytest.raises(ValueError, match="without '/'"):
        emacore.EMA({"a/b": 0.9})
    with pytest.raises(emacore.DecayError):
        emacore.EMA((0.9, 1.5))


def test_state_dicts_keep_every_profile(lib: Any) -> None:
    steps = _steps(3, seed=2)
    a = emacore.EMA({"fast": 0.5, "slow": 0.9}, zero_debias=True)
    params = {f"p{i}": lib.make(v) for i, v in enumerate(steps[0])}
    a.apply(params)
    a.apply({k: lib.set_value(v, steps[1][i]) for i, (k, v) in enumerate(params.items())})
    b = emacore.EMA({"fast": 0.5, "slow": 0.9}, zero_debias=True)
    b.load_state_dict(a.state_dict())
    for values in steps[2:]:
        params = {k: lib.set_value(v, values[i]) for i, (k, v) in enumerate(params.items())}
        a.apply(params)
        b.apply(params)
    for name in ("fast", "slow"):
        for k in params:
            np.testing.assert_array_equal(
                lib.read(b.profile(name).average(params)[k]),
                lib.read(a.profile(name).average(params)[k]),
            )
    with pytest.raises(emacore.StateDictError, match="decay profiles"):
        emacore.EMA(0.5, zero_debias=True).load_state_dict(a.state_dict())


def test_a_profile_can_be_swapped_in(lib: Any) -> None:
    if not lib.mutable:
        pytest.skip(f"{lib.name} arrays are immutable: nothing to swap into (jax)")
    w = lib.make(np.zeros(2, np.float32))
    ema = emacore.EMA({"fast": 0.5, "slow": 0.75})
    ema.apply([w])
    w = lib.set_value(w, np.full(2, 4.0, np.float32))
    ema.apply([w])
    with ema.profile("slow").swapped([w]):
        np.testing.assert_array_equal(lib.read(w), np.full(2, 1.0))
    np.testing.assert_array_equal(lib.read(w), np.full(2, 4.0))
    ema.profile("fast").copy_to([w])
    np.testing.assert_array_equal(lib.read(w), np.full(2, 2.0))
