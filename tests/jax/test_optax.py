"""The optax adapter, and emacore against optax's own averages (differential tests)."""

from __future__ import annotations

import os
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
from emacore import functional as F
from emacore.integrations.optax import averages, ema_params


def _values(n: int, seed: int = 0) -> list[dict[str, jax.Array]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(2), jnp.float32),
        }
        for _ in range(n)
    ]


def test_matches_optax_incremental_update() -> None:
    values = _values(12)
    polyak = values[0]
    state = F.init(values[0])
    for v in values[1:]:
        polyak = optax.incremental_update(v, polyak, step_size=0.1)
        state = F.update(state, v, 0.9)
    for k in polyak:
        np.testing.assert_allclose(
            np.asarray(F.average(state)[k]), np.asarray(polyak[k]), rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("debias", [True, False])
def test_matches_optax_ema(debias: bool) -> None:
    """optax.ema averages a stream from zero, debiased by 1 - decay^t: emacore's zero_debias
    (exact 1 - prod d, the same for a constant decay); its biased state is emacore's shadow."""
    values = _values(15, seed=1)
    tx = optax.ema(0.8, debias=debias)
    opt_state = tx.init(values[0])
    state = F.init(values[0], zero_debias=True)
    for v in values:
        out, opt_state = tx.update(v, opt_state)
        state = F.update(state, v, 0.8)
        ours = F.average(state) if debias else state.shadow
        for k in v:
            np.testing.assert_allclose(
                np.asarray(ours[k]), np.asarray(out[k]), rtol=2e-6, atol=2e-6
            )


def test_ema_params_in_a_jitted_chain() -> None:
    params = {"w": jnp.zeros(3)}
    tx = optax.chain(optax.sgd(0.5), ema_params(emacore.schedules.TFRamp(0.9)))
    opt_state = tx.init(params)
    target = jnp.asarray([1.0, 2.0, 3.0])

    @jax.jit
    def step(params: dict[str, jax.Array], opt_state: optax.OptState) -> tuple[Any, Any]:
        grads = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    history = [np.zeros(3)]
    for _ in range(8):
        params, opt_state = step(params, opt_state)
        history.append(np.asarray(params["w"], np.float64))
    ref = history[0]
    for n, p in enumerate(history[1:]):
        d = min(0.9, (1 + n) / (10 + n))
        ref = d * ref + (1 - d) * p
    np.testing.assert_allclose(np.asarray(averages(opt_state)["w"]), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the parameters"):
        ema_params(0.9).update({"w": jnp.zeros(3)}, ema_params(0.9).init(params))
    with pytest.raises(ValueError, match="found 0"):
        averages(optax.sgd(0.1).init(params))


@pytest.mark.parametrize("debias", [True, False])
def test_a_packed_state_in_a_donated_jitted_chain_matches_optax_ema(debias: bool) -> None:
    """ema_params(layout="auto"): the shadows of a dict of parameters in packed buffers (a
    ShadowTree) through a jitted, donating optax step, against optax.ema on the same stream."""
    rng = np.random.default_rng(2)
    params = {
        "conv": jnp.asarray(rng.standard_normal((128, 64, 3, 3)), jnp.float32),
        **{f"b{i}": jnp.asarray(rng.standard_normal(8), jnp.float32) for i in range(5)},
    }
    tx = optax.chain(optax.sgd(0.1), ema_params(0.8, zero_debias=True, layout="auto"))
    ref_tx = optax.ema(0.8, debias=debias)
    opt_state, ref_state = tx.init(params), ref_tx.init(params)
    shadow = opt_state[1].ema.shadow
    assert isinstance(shadow, emacore.ShadowTree)
    held = list(shadow.shadows.arrays)
    assert len(held) == 2  # the five small leaves in one buffer, the conv kernel raveled

    @jax.jit
    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(step, donate_argnums=1)
    for _ in range(6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        params, opt_state = step(params, opt_state, grads)
        reference, ref_state = ref_tx.update(params, ref_state)
    assert all(a.is_deleted() for a in held)  # donated through the chain
    # optax.ema averages from zero: with debias its debiased average is emacore's zero-debiased
    # one; without, its biased average is emacore's zero-started shadow
    ours = averages(opt_state) if debias else opt_state[1].ema.shadow.tree()
    for k in params:
        np.testing.assert_allclose(
            np.asarray(ours[k]), np.asarray(reference[k]), rtol=2e-5, atol=1e-6
        )
