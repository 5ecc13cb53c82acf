"""Every option of the optax adapter changes the numbers it should (``ema_params``, ``averages``).

Each test runs ``ema_params`` with one option set and compares the averages with a float64 EMA
computed here from the parameters recorded after each step (or with numpy), so a test fails
when the adapter drops the option: a decay, a schedule, ``zero_debias``, ``shadow_dtype``,
``layout``, and ``averages`` reading the state from the optimizer states optax builds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

if "jax" not in os.environ.get("EMACORE_TEST_BACKENDS", ""):
    pytest.skip(
        "jax is not among EMACORE_TEST_BACKENDS (the jax nox session runs these)",
        allow_module_level=True,
    )

import jax
import jax.numpy as jnp
import optax

import emacore
from emacore.integrations.optax import EmaParamsState, averages, ema_params

Params = dict[str, jax.Array]
Snapshot = dict[str, np.ndarray]


def _params(seed: int = 0) -> Params:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(2), jnp.float32),
    }


def _snapshot(params: Params) -> Snapshot:
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _train(tx: optax.GradientTransformation, steps: int, seed: int = 0) -> tuple[Any, list[Any]]:
    """``steps`` jitted steps of ``tx`` on random gradients; the optimizer state and the
    parameters before the first step and after each one (as float64 numpy)."""
    rng = np.random.default_rng(seed + 1)
    params = _params(seed)
    opt_state = tx.init(params)

    @jax.jit
    def step(params: Params, opt_state: Any, grads: Params) -> tuple[Params, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    history = [_snapshot(params)]
    for _ in range(steps):
        grads = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in params.items()}
        params, opt_state = step(params, opt_state, grads)
        history.append(_snapshot(params))
    return opt_state, history


def _reference(
    history: Sequence[Snapshot], decays: Sequence[float], *, zero_debias: bool = False
) -> Snapshot:
    """The float64 EMA of ``history[1:]`` (the parameters after each step), started at
    ``history[0]`` (or at zero and divided by ``1 - Π d``): ``s ← s − (1 − d)(s − p)``."""
    assert len(decays) == len(history) - 1
    shadow = {k: np.zeros_like(v) if zero_debias else v for k, v in history[0].items()}
    product = 1.0
    for d, params in zip(decays, history[1:]):
        shadow = {k: s - (1 - d) * (s - params[k]) for k, s in shadow.items()}
        product *= d
    if zero_debias:
        return {k: s / (1 - product) for k, s in shadow.items()}
    return shadow


def _assert_close(actual: Any, expected: Snapshot, rtol: float = 2e-6) -> None:
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for k, v in expected.items():
        got = actual[k]
        assert isinstance(got, jax.Array), type(got)
        assert got.dtype == jnp.float32 and got.shape == v.shape, (k, got.dtype, got.shape)
        np.testing.assert_allclose(np.asarray(got, np.float64), v, rtol=rtol, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("decay", [0.3, 0.95])
def test_a_constant_decay_is_the_decay_used(decay: float) -> None:
    opt_state, history = _train(optax.chain(optax.sgd(0.1), ema_params(decay)), steps=10)
    _assert_close(averages(opt_state), _reference(history, [decay] * 10))


def _running_mean(step: Any) -> Any:
    """d = (n + 1) / (n + 2) at update n = 0, 1, ...: the average of every value so far."""
    return (step + 1) / (step + 2)


def test_a_schedule_sees_the_update_count_under_jit() -> None:
    """With the running-mean schedule the EMA, started at the initial parameters, is their
    plain mean: numpy's, and the float64 recurrence with the schedule's decays."""
    opt_state, history = _train(optax.chain(optax.sgd(0.1), ema_params(_running_mean)), steps=9)
    decays = [_running_mean(n) for n in range(9)]
    _assert_close(averages(opt_state), _reference(history, decays))
    mean = {k: np.mean([h[k] for h in history], axis=0) for k in history[0]}
    _assert_close(averages(opt_state), mean)
    assert int(opt_state[1].ema.count) == 9


def test_a_library_schedule() -> None:
    schedule = emacore.schedules.TFRamp(0.95)
    opt_state, history = _train(optax.chain(optax.sgd(0.1), ema_params(schedule)), steps=12)
    decays = [min(0.95, (1 + n) / (10 + n)) for n in range(12)]
    _assert_close(averages(opt_state), _reference(history, decays))


@pytest.mark.parametrize("zero_debias", [True, False])
@pytest.mark.parametrize(
    "decay", [0.9, _running_mean], ids=["constant", "schedule"]
)  # a varying decay: the correction is 1 - Π d, not 1 - d^t
def test_zero_debias(zero_debias: bool, decay: float | Callable[[Any], Any]) -> None:
    tx = optax.chain(optax.sgd(0.1), ema_params(decay, zero_debias=zero_debias))
    opt_state, history = _train(tx, steps=6)
    decays = [decay(n) if callable(decay) else decay for n in range(6)]
    expected = _reference(history, decays, zero_debias=zero_debias)
    _assert_close(averages(opt_state), expected, rtol=1e-5)
    # the state holds the shadow: zero-started and biased with zero_debias, else the average
    shadow = _reference(history, decays)
    if zero_debias:
        product = float(np.prod(decays))
        shadow = {k: v * (1 - product) for k, v in expected.items()}
    _assert_close(opt_state[1].ema.shadow, shadow, rtol=1e-5)


# float16 parameters that move by one float16 ulp (2**-10 at 1.0) and stay there: with decay
# 0.99 each step moves a float16 shadow by 1e-5, under half its ulp, so it never leaves 1.0;
# a float32 shadow (the default for 16-bit parameters) moves toward 1 + 2**-10.
ULP16 = 2.0**-10
STUCK_DECAY = 0.99


def _half_precision_run(shadow_dtype: Any, steps: int = 30) -> Any:
    tx = ema_params(STUCK_DECAY, shadow_dtype=shadow_dtype)
    params = {"w": jnp.ones(4, jnp.float16)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    target = {"w": jnp.full(4, 1 + ULP16, jnp.float16)}
    for _ in range(steps):
        updates = {"w": target["w"] - params["w"]}  # exact in float16
        _, state = update(updates, state, params)
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(params["w"], np.float64), 1 + ULP16)
    return averages(state)["w"]


def test_shadow_dtype_same_keeps_half_precision_shadows() -> None:
    average = _half_precision_run("same")
    assert average.dtype == jnp.float16, average.dtype
    # the same recurrence in numpy float16: it never leaves 1.0
    shadow, param = np.float16(1.0), np.float16(1 + ULP16)
    for _ in range(30):
        shadow = np.float16(shadow - np.float16(1 - STUCK_DECAY) * (shadow - param))
    assert shadow == np.float16(1.0)
    np.testing.assert_array_equal(np.asarray(average), np.full(4, shadow))


@pytest.mark.parametrize("shadow_dtype", [None, "float32", jnp.float32])
def test_shadow_dtype_float32_for_half_precision_parameters(shadow_dtype: Any) -> None:
    average = _half_precision_run(shadow_dtype)
    assert average.dtype == jnp.float32, average.dtype
    expected = 1 + ULP16 * (1 - STUCK_DECAY**30)  # float64: from 1.0 toward 1 + ulp
    np.testing.assert_allclose(np.asarray(average, np.float64), expected, rtol=0, atol=1e-6)
    assert abs(expected - 1.0) > 2e-4  # far from where a float16 shadow stays


# a leaf above the 65,536 elements under which "auto" packs leaves together, and two below
LAYOUT_SHAPES = {"big": (300, 300), "b": (3,), "c": (4,)}


@pytest.mark.parametrize(
    ("layout", "buffers"),
    [
        (None, None),
        ("auto", [(7,), (90000,)]),
        ("flat", [(90007,)]),
        ("separate", [(3,), (90000,), (4,)]),
    ],
)
def test_layout(layout: str | None, buffers: list[tuple[int, ...]] | None) -> None:
    """The layout decides the state's buffers (None: one array per leaf, in the parameters'
    structure); the averages are the same numbers in every layout."""
    rng = np.random.default_rng(4)
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in LAYOUT_SHAPES.items()}
    tx = optax.chain(optax.sgd(0.1), ema_params(0.8, layout=layout))
    opt_state = tx.init(params)
    shadow = opt_state[1].ema.shadow
    if buffers is None:
        assert isinstance(shadow, dict) and set(shadow) == set(LAYOUT_SHAPES), type(shadow)
    else:
        assert isinstance(shadow, emacore.ShadowTree), type(shadow)
        assert [tuple(a.shape) for a in shadow.shadows.arrays] == buffers

    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    history = [_snapshot(params)]
    for _ in range(5):
        grads = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in params.items()}
        updates, opt_state = step(params, opt_state, grads)
        params = optax.apply_updates(params, updates)
        history.append(_snapshot(params))
    _assert_close(averages(opt_state), _reference(history, [0.8] * 5))
    assert type(opt_state[1].ema.shadow) is type(shadow)  # the layout survives the steps


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="layout"):
        ema_params(0.9, layout="packed").init(_params())


# -- averages(): the state wherever optax keeps it ---------------------------------------------


def _wrapped(name: str, decay: float) -> optax.GradientTransformation:
    if name == "chain":
        return optax.chain(optax.sgd(0.1), ema_params(decay))
    if name == "named_chain":  # a dict state
        return optax.named_chain(("sgd", optax.sgd(0.1)), ("ema", ema_params(decay)))
    if name == "nested":  # a chain in a chain in a named chain
        inner = optax.chain(optax.sgd(0.1), optax.chain(optax.identity(), ema_params(decay)))
        return optax.named_chain(("clip", optax.clip(10.0)), ("inner", inner))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["chain", "named_chain", "nested"])
def test_averages_reads_the_state_inside_any_optax_state(name: str) -> None:
    opt_state, history = _train(_wrapped(name, 0.7), steps=7)
    _assert_close(averages(opt_state), _reference(history, [0.7] * 7))


def test_averages_under_multi_steps_follows_the_optimizer_steps() -> None:
    """optax.MultiSteps runs the chain every k-th call: the EMA updates at those only."""
    tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), ema_params(0.6)), every_k_schedule=3)
    opt_state, history = _train(tx, steps=9)
    # the parameters change at calls 3, 6 and 9; in between MultiSteps returns zero updates
    assert all(np.array_equal(history[1]["w"], h["w"]) for h in history[:3])
    stepped = [history[0], history[3], history[6], history[9]]
    _assert_close(averages(opt_state), _reference(stepped, [0.6] * 3))


def test_averages_needs_exactly_one_ema_state() -> None:
    params = _params()
    two = optax.chain(ema_params(0.5), ema_params(0.9))
    with pytest.raises(ValueError, match="found 2"):
        averages(two.init(params))
    with pytest.raises(ValueError, match="found 0"):
        averages(optax.adam(0.1).init(params))
    # the record itself is accepted, as is a state nested in a plain dict or list
    state = ema_params(0.5).init(params)
    assert isinstance(state, EmaParamsState)
    for holder in (state, {"opt": [state]}):
        _assert_close(averages(holder), _snapshot(params))
