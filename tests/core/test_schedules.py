"""Schedules against their peers' own numbers, and exact debias against pandas.

Three kinds of reference, none of them emacore:

* decays recorded from the real peer libraries (tests/fixtures/schedule_fixtures.json, written
  by tests/parity/generate_schedule_fixtures.py under ``nox -s schedule_fixtures``; the file
  names the peers' versions): torch_ema, diffusers, timm, ema-pytorch;
* EDM2's ``phema.py`` (not on PyPI) and pandas' parametrisations, reimplemented here in numpy
  float64 from their source, operation for operation;
* pandas itself, ``Series.ewm(...).mean()``, where it is importable (``nox -s
  schedule_fixtures`` installs it); otherwise those comparisons skip, saying why, and the
  float64 numpy references still run.

Exactness: a schedule called with a Python number computes in Python float64 in its peer's
order of operations, so its decays must equal the peer's bit for bit; the one exception is
ema-pytorch, which computes its decay on a float32 tensor (see `test_peer_decays`). Called with
an array step, a schedule computes with the array library's ``pow``, which may be a vectorised
implementation accurate to 1 ulp rather than libm's: there the bound is 1 float64 ulp.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emacore
from emacore import functional as F
from emacore import schedules
from emacore.schedules import (
    CenterOfMass,
    Constant,
    DiffusersRamp,
    HalfLife,
    PowerFunction,
    PowerWarmup,
    Span,
    TFRamp,
    from_spec,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
)

FIXTURES = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "schedule_fixtures.json").read_text()
)
CASES = FIXTURES["cases"]

SCHEDULE_CLASSES = [
    Constant,
    TFRamp,
    DiffusersRamp,
    PowerWarmup,
    HalfLife,
    Span,
    CenterOfMass,
    PowerFunction,
]
# schedules whose decay depends on the step, with settings that exercise every branch
STEP_SCHEDULES: list[Any] = [
    TFRamp(0.99),
    DiffusersRamp(0.6, min_decay=0.3, update_after_step=3),
    PowerWarmup(0.9, min_decay=0.6, update_after_step=3, inv_gamma=0.5, power=0.75),
    PowerWarmup(),
    PowerFunction(gamma=6.94),
    PowerFunction(sigma_rel=0.2),
]
STEPS = [*range(40), 100, 1000, 12345, 10**6]


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        return None
    return pandas


PANDAS = _pandas()
NO_PANDAS = "pandas is not installed: the comparisons with pandas itself are skipped (nox -s "
NO_PANDAS += "schedule_fixtures installs it); the float64 numpy references still run"


def _skip_without_pandas() -> Any:
    if PANDAS is None:
        print(NO_PANDAS)
        pytest.skip(NO_PANDAS)
    return PANDAS


def _ulps(got: float, want: float) -> float:
    """``|got - want|`` in float64 ulps of ``want`` (0 when equal, zeros included)."""
    if got == want:
        return 0.0
    return abs(got - want) / math.ulp(want)


# -- the peers' own numbers ------------------------------------------------------------------


def _renamed(options: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(k, k): v for k, v in options.items()}


def _for_case(case: dict[str, Any]) -> tuple[Any, Callable[[int], int]]:
    """The emacore schedule equivalent to a fixture case, and the step it is called with for
    the peer's step ``n``. The peers' defaults are not repeated here: emacore's defaults
    must be theirs (ema-pytorch's update_after_step=100 aside, which every case states)."""
    options, peer = dict(case["options"]), case["peer"]
    if peer == "torch_ema":
        # update() increments num_updates and then uses it: the k-th update has n = k
        return TFRamp(**options), lambda n: n
    if peer == "diffusers":
        # step() increments optimization_step before get_decay(optimization_step)
        warmup = options.pop("use_ema_warmup", False)
        return (PowerWarmup if warmup else DiffusersRamp)(**options), lambda n: n
    if peer == "timm":
        # update(model, step=n) calls get_decay(n)
        assert options.pop("use_warmup") is True
        names = {"warmup_gamma": "inv_gamma", "warmup_power": "power"}
        return PowerWarmup(**_renamed(options, names)), lambda n: n
    if peer == "ema_pytorch":
        # update() increments self.step before get_current_decay() reads it
        names = {"beta": "decay", "min_value": "min_decay"}
        return PowerWarmup(**_renamed(options, names)), lambda n: n
    if peer == "ema_pytorch_karras":
        # beta uses self.step + 1 (self.step already incremented): EDM2's t is one ahead
        return PowerFunction(**options), lambda n: n + 1
    raise AssertionError(f"unknown peer {peer!r}")


def _recorded(case: dict[str, Any], decay: float) -> float:
    return 1.0 - decay if case["records"] == "one_minus_decay" else decay


def test_fixture_names_its_peers() -> None:
    versions = FIXTURES["versions"]
    assert {"torch", "torch_ema", "diffusers", "timm", "ema_pytorch"} <= set(versions)
    assert {c["peer"] for c in CASES} == {
        "torch_ema",
        "diffusers",
        "timm",
        "ema_pytorch",
        "ema_pytorch_karras",
    }


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_peer_decays(case: dict[str, Any]) -> None:
    schedule, to_emacore = _for_case(case)
    want = [float.fromhex(h) for h in case["values"]]
    got = [_recorded(case, schedule(to_emacore(n))) for n in case["steps"]]
    assert all(type(g) is float for g in got)
    if case["peer"] == "ema_pytorch":
        # ema-pytorch computes 1 - (1 + e / inv_gamma) ** -power on a float32 tensor with
        # torch's float32 pow and clamps it there: its decays are float32 numbers, its cap is
        # float32(beta). emacore computes in float64 by design; rounded to float32 it must be
        # ema-pytorch's number to within one float32 ulp (the last bit of torch's powf).
        g32, w32 = np.float32(got), np.float32(want)
        assert np.array_equal(w32.astype(np.float64), np.asarray(want)), "float32 numbers"
        assert np.all(np.abs(g32 - w32) <= np.spacing(w32)), case["id"]
        assert np.mean(g32 == w32) > 0.9  # most are equal: a wrong step offset is not
    else:
        # the peer's arithmetic, operation for operation, in Python float64: bit for bit
        assert [g.hex() for g in got] == case["values"], case["id"]
    if "gamma" in case:
        assert schedule.gamma.hex() == case["gamma"]  # sigma_rel -> gamma as ema-pytorch


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_array_steps_agree_with_number_steps(case: dict[str, Any]) -> None:
    schedule, to_emacore = _for_case(case)
    for n in case["steps"]:
        want = schedule(to_emacore(n))
        got = schedule(np.asarray(to_emacore(n)))
        assert isinstance(got, (np.ndarray, np.floating)) and got.dtype == np.float64
        assert got.shape == ()
        assert _ulps(float(got), want) <= 1, (case["id"], n)


def test_peer_offsets_differ_as_documented() -> None:
    # torch_ema's k-th update uses the TF ramp at n = k, diffusers' at k - 1 after a copy
    for k in range(2, 30):
        assert DiffusersRamp(0.999)(k) == TFRamp(0.999)(k - 1)
    assert DiffusersRamp(0.999)(1) == 0.0 and TFRamp(0.999)(1) > 0.0
    # ema-pytorch's KarrasEMA at its step n is EDM2's power function at n + 1
    assert PowerFunction(gamma=6.94)(1) == 0.0  # EDM2's first update copies


# -- EDM2's phema.py, reimplemented from its source (NVlabs/edm2, training/phema.py) ---------


def _edm2_std_to_exp(std: Any) -> Any:
    std = np.float64(std)
    tmp = std.flatten() ** -2
    exp = [np.roots([1, 7, 16 - t, 12 - t]).real.max() for t in tmp]
    return np.float64(exp).reshape(std.shape)


def _edm2_exp_to_std(exp: Any) -> Any:
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))


def _edm2_power_function_beta(std: Any, t_next: Any, t_delta: Any) -> Any:
    return (1 - t_delta / t_next) ** (_edm2_std_to_exp(std) + 1)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.15, 0.2, 0.28])
def test_power_function_matches_edm2(sigma_rel: float) -> None:
    schedule = PowerFunction(sigma_rel=sigma_rel)
    assert schedule.gamma == float(_edm2_std_to_exp(sigma_rel))
    assert gamma_to_sigma_rel(schedule.gamma) == pytest.approx(sigma_rel, rel=1e-13)
    assert gamma_to_sigma_rel(6.94) == float(_edm2_exp_to_std(6.94))
    for batch in (1, 64):
        # PowerFunctionEMA.update(cur_nimg, batch_size) runs after cur_nimg += batch_size:
        # the k-th update has t_next = k * batch, t_delta = batch, i.e. emacore's step k
        for k in [*range(1, 50), 1000, 123_457, 10**7]:
            want = float(_edm2_power_function_beta(sigma_rel, k * batch, batch))
            assert schedule(k) == want, (sigma_rel, batch, k)


def test_sigma_rel_to_gamma_solves_the_cubic() -> None:
    for sigma_rel in np.linspace(0.005, math.sqrt(1 / 12), 40):
        gamma = sigma_rel_to_gamma(float(sigma_rel))
        assert gamma >= 0.0
        t = sigma_rel**-2
        residual = gamma**3 + 7 * gamma**2 + (16 - t) * gamma + (12 - t)
        scale = gamma**3 + 7 * gamma**2 + (16 + t) * gamma + (12 + t)
        assert abs(residual) <= 1e-12 * scale
        assert gamma_to_sigma_rel(gamma) == pytest.approx(float(sigma_rel), rel=1e-12)
    assert sigma_rel_to_gamma(math.sqrt(1 / 12)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97])
def test_power_function_average_has_the_power_profile(gamma: float) -> None:
    # Karras et al.: with beta_t = (1 - 1/t)^(gamma + 1), the average after n updates weighs
    # the value of update i by (i/n)^(gamma+1) - ((i-1)/n)^(gamma+1), about proportional to
    # i^gamma (gamma = 0: the plain running mean), whatever the first value
    rng = np.random.default_rng(5)
    values = rng.normal(size=(60, 3))
    schedule = PowerFunction(gamma=gamma)
    state = F.init(np.zeros(3))
    for i, x in enumerate(values, start=1):
        state = F.update(state, x, schedule, step=i)
        ratio = np.arange(i + 1, dtype=np.float64) / i
        weights = np.diff(ratio ** (gamma + 1))
        np.testing.assert_allclose(state.shadow, weights @ values[:i], rtol=1e-12, atol=1e-14)


# -- pandas' parametrisations ------------------------------------------------------------------


def _pandas_com(com: Any = None, span: Any = None, halflife: Any = None) -> float:
    """pandas' ``get_center_of_mass`` (pandas/core/window/ewm.py), branch for branch."""
    if com is not None:
        return float(com)
    if span is not None:
        return float((span - 1) / 2)
    decay = 1 - np.exp(np.log(0.5) / halflife)
    return float(1 / decay - 1)


def _pandas_beta(**parametrisation: Any) -> float:
    """The kernel's ``old_wt_factor = 1. - alpha`` with ``alpha = 1. / (1. + com)``."""
    alpha = 1.0 / (1.0 + _pandas_com(**parametrisation))
    return 1.0 - alpha


@pytest.mark.parametrize("span", [1, 1.5, 2, 3, 10, 19, 99.5, 1000, 12345.75])
def test_span_is_pandas_bit_for_bit(span: float) -> None:
    assert Span(span)(0) == Span(span)(10**6) == _pandas_beta(span=span)
    assert Span(span).decay == pytest.approx(1 - 2 / (span + 1), rel=1e-15, abs=1e-16)


@pytest.mark.parametrize("com", [0, 0.5, 1, 9, 99, 1234.5])
def test_center_of_mass_is_pandas_bit_for_bit(com: float) -> None:
    assert CenterOfMass(com)(0) == _pandas_beta(com=com)


def test_half_life_halves_and_is_pandas_to_rounding() -> None:
    for h in np.geomspace(0.01, 1e6, 300):
        beta = HalfLife(float(h))(0)
        assert _ulps(beta, float(np.exp2(-1 / h))) <= 1
        assert beta ** float(h) == pytest.approx(0.5, rel=1e-15 * max(1.0, h))  # ulp(β)·h
        # pandas reaches beta through com = 1/(1 - exp(log(0.5)/h)) - 1 and 1 - 1/(1 + com):
        # three more roundings, at the scale of 1 (so a tiny beta, h < 1/2, loses its low
        # bits there: h = 0.01 gives pandas 0, not 2^-100). Within 2^-52 absolute, which is
        # at most 2 ulps of beta for h >= 1/2.
        assert abs(beta - _pandas_beta(halflife=float(h))) <= 2**-52


# -- exact debias, against pandas and float64 references ---------------------------------


def _run(
    values: np.ndarray, schedule: Any, *, zero_debias: bool, steps: Sequence[int] | None = None
) -> tuple[list[np.ndarray], Any]:
    """emacore's functional API over ``values``: zero-started (debiased) from the first, or
    started at ``values[0]`` and updated from the second on. Returns each average."""
    first = 0 if zero_debias else 1
    state = F.init(values[0], zero_debias=zero_debias)
    out = [] if zero_debias else [F.average(state).copy()]
    for i in range(first, len(values)):
        step = None if steps is None else steps[i]
        state = F.update(state, values[i], schedule, step=step)
        out.append(F.average(state).copy())
    return out, state


def _debiased_reference(values: np.ndarray, betas: Sequence[float]) -> list[np.ndarray]:
    """The zero-started EMA divided by ``1 - Π β``, as its explicit weighted mean: the value
    of update i weighs (1 - β_i) Π_{j>i} β_j, and the weights sum to 1 - Π β."""
    out = []
    for n in range(1, len(values) + 1):
        b = np.asarray(betas[:n], dtype=np.float64)
        later = np.append(np.cumprod(b[::-1])[::-1][1:], 1.0)  # Π_{j>i} β_j
        weights = (1.0 - b) * later
        out.append(weights @ values[:n] / weights.sum())
    return out


def _recursive_reference(values: np.ndarray, betas: Sequence[float]) -> list[np.ndarray]:
    """Started at the first value, ``y ← β y + (1 − β) x`` from the second on (adjust=False)."""
    y = values[0].copy()
    out = [y.copy()]
    for x, b in zip(values[1:], betas[1:]):
        y = b * y + (1.0 - b) * x
        out.append(y.copy())
    return out


def _series(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # a trend, noise and a level shift: every weight matters
    t = np.arange(n, dtype=np.float64)
    return 3.0 + 0.01 * t + rng.normal(size=n) + np.where(t > n // 2, 5.0, 0.0)


PANDAS_PARAMETRISATIONS: list[tuple[dict[str, float], Any]] = [
    ({"halflife": 7.5}, HalfLife(7.5)),
    ({"span": 20.0}, Span(20)),
    ({"com": 4.0}, CenterOfMass(4)),
    ({"alpha": 0.3}, Constant(0.7)),
]
PANDAS_IDS = [next(iter(p)) for p, _ in PANDAS_PARAMETRISATIONS]

# Both sides are float64 but round differently: emacore updates s - (s - x)(1 - beta) and
# divides by 1 - prod(beta) at the end, pandas normalises its weighted mean at every step
# (adjust=True) or forms beta y + alpha x (adjust=False). On these series (values ~3 to ~16,
# never near 0) every comparison below was seen to agree to 1.1e-15 relative or better; 1e-14
# leaves room for other platforms' rounding and is far below any modelling error (one step
# late is ~1e-2).
RTOL = 1e-14


@pytest.mark.parametrize(("parametrisation", "schedule"), PANDAS_PARAMETRISATIONS, ids=PANDAS_IDS)
def test_zero_debias_is_pandas_adjust_true(
    parametrisation: dict[str, float], schedule: Any
) -> None:
    values = _series(300, seed=1)
    got, state = _run(values, schedule, zero_debias=True)
    betas = [schedule(i) for i in range(len(values))]
    assert state.decay_product == math.prod(betas)  # kept in float64, in update order
    np.testing.assert_allclose(got, _debiased_reference(values, betas), rtol=RTOL)
    pd = _skip_without_pandas()
    want = pd.Series(values).ewm(adjust=True, **parametrisation).mean().to_numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize(("parametrisation", "schedule"), PANDAS_PARAMETRISATIONS, ids=PANDAS_IDS)
def test_started_at_first_value_is_pandas_adjust_false(
    parametrisation: dict[str, float], schedule: Any
) -> None:
    values = _series(300, seed=2)
    got, _ = _run(values, schedule, zero_debias=False)
    betas = [schedule(i) for i in range(len(values))]
    np.testing.assert_allclose(got, _recursive_reference(values, betas), rtol=RTOL)
    pd = _skip_without_pandas()
    want = pd.Series(values).ewm(adjust=False, **parametrisation).mean().to_numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("schedule", STEP_SCHEDULES, ids=repr)
def test_exact_debias_for_changing_decays(schedule: Any) -> None:
    # pandas has no changing decay to compare with (its times= weights are not an EMA's), so
    # the reference is the weighted mean above, in float64
    values = np.stack([_series(120, seed=3), _series(120, seed=4)], axis=1)
    steps = list(range(1, len(values) + 1))  # a peer's k-th update is step k
    got, state = _run(values, schedule, zero_debias=True, steps=steps)
    betas = [schedule(k) for k in steps]
    assert state.decay_product == math.prod(betas)
    assert state.count == len(values)
    np.testing.assert_allclose(got, _debiased_reference(values, betas), rtol=RTOL)
    # a constant parameter averages to itself, whatever the decays (TF's 1 - β_t^t does not)
    constant = np.full((len(values), 1), 2.5)
    got_constant, _ = _run(constant, schedule, zero_debias=True, steps=steps)
    np.testing.assert_allclose(got_constant, constant, rtol=1e-15)


def test_exact_debias_before_any_value_entered() -> None:
    # decay 1 at every step: no value has entered, 1 - Π β = 0; the zeros are reported
    state = F.init(np.zeros(2), zero_debias=True)
    state = F.update(state, np.ones(2), Constant(1.0))
    assert state.decay_product == 1.0
    np.testing.assert_array_equal(F.average(state), np.zeros(2))


# -- traced and framework steps ------------------------------------------------------------


def _framework(name: str) -> Any:
    """The framework, in the session that tests its backend; a skip, saying why, elsewhere.

    Requested (``EMACORE_TEST_BACKENDS`` names it), it must import: a broken install fails.
    Elsewhere it is not imported even where installed, since importing it changes what the
    other framework's tests see (with jax imported, emacore's pytrees consult jax's, which
    ``torch.compile`` in the torch session's docs cannot trace).
    """
    requested = os.environ.get("EMACORE_TEST_BACKENDS", "numpy,array_api_strict").split(",")
    if name not in [n.strip() for n in requested]:
        pytest.skip(f"runs in the {name} session (EMACORE_TEST_BACKENDS={name})")
    return importlib.import_module(name)


@pytest.mark.parametrize("schedule", STEP_SCHEDULES, ids=repr)
def test_schedule_traces_under_jax_jit(schedule: Any) -> None:
    jax = _framework("jax")
    jnp = importlib.import_module("jax.numpy")
    traces = []

    def decay(n: Any) -> Any:
        traces.append(n)  # runs once per trace, not per call
        return schedule(n)

    traced = jax.jit(decay)
    for k in STEPS:
        got = traced(jnp.asarray(k))
        want = schedule(k)
        assert got.shape == ()
        if got.dtype == jnp.float64:
            assert _ulps(float(got), want) <= 1, k
        else:
            # jax without x64 has no float64: float32 arithmetic. The step is exact in it, but
            # 1 - 1/t or 1 + k/gamma rounds (3e-8 relative) and the power amplifies that by its
            # exponent (gamma + 1 = 7.94 here): a few 1e-7 relative, and 0 stays exactly 0
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(float(got), want, rtol=2e-6, atol=0, err_msg=str(k))
    assert len(traces) == 1  # one trace for every step value: no branch on the value


@pytest.mark.parametrize("schedule", STEP_SCHEDULES, ids=repr)
def test_schedule_of_a_torch_tensor_step(schedule: Any) -> None:
    torch = _framework("torch")
    for k in STEPS:
        got = schedule(torch.tensor(k))
        assert isinstance(got, torch.Tensor) and got.shape == ()
        assert got.dtype == torch.float64
        assert _ulps(float(got), schedule(k)) <= 1, k


def test_traceable_state_feeds_the_step_as_an_array() -> None:
    # functional.update with traceable counters calls the schedule with a 0-d array
    schedule = PowerWarmup(0.9, update_after_step=2, power=0.75)
    traced = F.init(np.zeros(2), zero_debias=True, traceable=True)
    eager = F.init(np.zeros(2), zero_debias=True)
    values = _series(30, seed=6)
    for x in values:
        traced = F.update(traced, np.full(2, x), schedule)
        eager = F.update(eager, np.full(2, x), schedule)
    assert float(traced.decay_product) == eager.decay_product
    np.testing.assert_array_equal(F.average(traced), F.average(eager))


# -- specs, validation -----------------------------------------------------------------------


ALL_SCHEDULES: list[Any] = [
    Constant(0.999),
    HalfLife(12.5),
    Span(10),
    CenterOfMass(3.5),
    PowerFunction(gamma=0.0),
    *STEP_SCHEDULES,
]


def test_every_schedule_is_exported_and_frozen() -> None:
    for cls in SCHEDULE_CLASSES:
        assert cls.__name__ in schedules.__all__
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for name in ("from_spec", "sigma_rel_to_gamma", "gamma_to_sigma_rel"):
        assert name in schedules.__all__
    assert {type(s) for s in ALL_SCHEDULES} == set(SCHEDULE_CLASSES)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=repr)
def test_spec_round_trips_through_json(schedule: Any) -> None:
    spec = schedule.spec()
    assert isinstance(spec["kind"], str)
    restored = from_spec(json.loads(json.dumps(spec, allow_nan=False)))
    assert restored == schedule
    assert [restored(k) for k in STEPS] == [schedule(k) for k in STEPS]
    assert isinstance(schedule, emacore.schedules.Schedule)


def test_from_spec_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="unknown schedule kind 'cosine'"):
        from_spec({"kind": "cosine"})
    with pytest.raises(ValueError, match="'kind' key"):
        from_spec({"decay": 0.9})
    with pytest.raises(ValueError, match=r"missing keys \['halflife'\]"):
        from_spec({"kind": "half_life"})
    with pytest.raises(ValueError, match=r"unknown keys \['warmup'\]"):
        from_spec({"kind": "power_warmup", "warmup": 1})
    with pytest.raises(emacore.DecayError, match="decay"):
        from_spec({"kind": "diffusers_ramp", "decay": 1.5})


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: HalfLife(0), ValueError, "halflife must be > 0, got 0"),
        (lambda: HalfLife(-3.0), ValueError, "halflife must be > 0, got -3.0"),
        (lambda: HalfLife(float("inf")), ValueError, "halflife must be finite"),
        (lambda: HalfLife(float("nan")), ValueError, "halflife must be finite"),
        (lambda: HalfLife("10"), TypeError, "halflife must be a real number, got '10'"),
        (lambda: Span(0.5), ValueError, "span must be >= 1, got 0.5"),
        (lambda: CenterOfMass(-1), ValueError, "com must be >= 0, got -1"),
        (lambda: PowerWarmup(inv_gamma=0.0), ValueError, "inv_gamma must be > 0"),
        (lambda: PowerWarmup(power=-0.5), ValueError, "power must be > 0, got -0.5"),
        (lambda: PowerWarmup(decay=1.5), emacore.DecayError, "decay must lie in"),
        (lambda: PowerWarmup(0.9, min_decay=0.95), emacore.DecayError, "min_decay must not"),
        (lambda: DiffusersRamp(min_decay=-0.1), emacore.DecayError, "min_decay must lie"),
        (lambda: DiffusersRamp(update_after_step=-1), ValueError, "update_after_step must be"),
        (lambda: DiffusersRamp(update_after_step=2.5), TypeError, "update_after_step must be"),
        (lambda: PowerWarmup(update_after_step=True), TypeError, "update_after_step must be"),
        (lambda: PowerFunction(), ValueError, "needs gamma or sigma_rel"),
        (lambda: PowerFunction(gamma=-0.5), ValueError, "gamma must be >= 0, got -0.5"),
        (lambda: PowerFunction(sigma_rel=0.3), ValueError, r"sigma_rel must be in \(0, "),
        (lambda: PowerFunction(sigma_rel=0.0), ValueError, r"sigma_rel must be in \(0, "),
        (lambda: PowerFunction(gamma=7.0, sigma_rel=0.2), ValueError, "disagree"),
    ],
)
def test_bad_parameters_are_named(make: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_schedules_run_in_the_stateful_api() -> None:
    # EDM2's convention through the façade: apply where the model is built (step 0, a copy),
    # then after every optimizer step k: gamma = 0 is the running mean of the trained values
    params = {"w": np.zeros(2)}
    ema = emacore.EMA(PowerFunction(gamma=0.0))
    ema.apply(params)
    for k in range(1, 6):
        params["w"] = np.full(2, float(k))
        ema.apply(params)
    np.testing.assert_allclose(ema.average(params)["w"], np.full(2, 3.0), rtol=1e-15)
