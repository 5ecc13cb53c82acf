"""jax specifics: one compiled update per structure, donated shadows, the functional API
inside jit/scan with donation, tracers refused by the stateful API, shardings kept.

Runs where ``EMACORE_TEST_BACKENDS`` names jax (``nox -s "tests(backend='jax')"``); there an
import failure is an error, not a skip.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
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

import emacore
from emacore import functional as F
from emacore_backends import jax as jax_backend


def _params(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        "dense": {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
        "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
    }


def test_one_compilation_per_structure_and_donated_shadows() -> None:
    # shapes no other test uses, so the compilation cache starts cold for them
    rng = np.random.default_rng(1)
    start = {"w": rng.standard_normal((13, 11)), "b": rng.standard_normal(17)}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in start.items()}
    ema = emacore.EMA(0.9)
    before = jax_backend.TRACES
    ema.apply(params)
    assert before + 1 == jax_backend.TRACES
    (group,) = ema._groups.values()
    held = list(group.state.shadow.arrays)  # the two small leaves share one flat buffer
    assert len(held) == 1 and held[0].shape == (13 * 11 + 17,)
    old = ema.average(params)["b"]
    for k in range(1, 6):
        params = {n: jnp.asarray(v + k, jnp.float32) for n, v in start.items()}
        ema.apply(params)
    assert before + 1 == jax_backend.TRACES  # no recompilation for five more updates
    assert held[0].is_deleted()  # donated: no second copy of the model was kept
    # an average handed out is a slice of the buffer: donation does not invalidate it
    np.testing.assert_allclose(np.asarray(old), start["b"], rtol=1e-6)
    params["extra"] = jnp.zeros(19)
    ema.apply(params)  # a new leaf: its own group, compiled for its structure
    assert before + 2 == jax_backend.TRACES
    ref = start["b"].copy()
    for k in (1, 2, 3, 4, 5, 5):  # the apply that added "extra" updated "b" again
        ref = 0.9 * ref + 0.1 * (start["b"] + k)
    np.testing.assert_allclose(np.asarray(ema.average(params)["b"]), ref, rtol=1e-5)


def test_functional_inside_jit_with_donation_and_scan() -> None:
    params = _params()
    ramp = emacore.schedules.TFRamp(0.99)
    state = F.init(params, zero_debias=True, traceable=True)
    eager = F.init(params, zero_debias=True)

    @jax.jit
    def step(state: emacore.EMAState, params: dict[str, jax.Array]) -> emacore.EMAState:
        return F.update(state, params, ramp)

    donating = jax.jit(step, donate_argnums=0)
    for k in range(6):
        params = jax.tree_util.tree_map(lambda x: x * 0.5 + 1.0, params)
        state = (donating if k % 2 else step)(state, params)
        eager = F.update(eager, params, ramp)
    assert int(state.count) == 6
    got, want = F.average(state), F.average(eager)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-6, atol=1e-6)

    def body(state: emacore.EMAState, p: dict[str, jax.Array]) -> tuple[emacore.EMAState, None]:
        return F.update(state, p, 0.5), None

    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x + 2.0]), params)
    scanned, _ = jax.lax.scan(body, F.init(params), stacked)
    # from x: update with x (no change), then with x + 2 at decay 0.5
    np.testing.assert_allclose(
        np.asarray(F.average(scanned)["b"]), np.asarray(params["b"] + 1.0), rtol=1e-6
    )


def test_tracers_are_refused_by_the_stateful_api() -> None:
    ema = emacore.EMA(0.9)

    @jax.jit
    def bad(params: dict[str, jax.Array]) -> jax.Array:
        ema.apply(params)
        return params["b"]

    with pytest.raises(TypeError, match="use emacore.functional"):
        bad(_params())


def test_a_tracer_beside_concrete_leaves_is_refused_and_changes_nothing() -> None:
    """A function traced over some leaves passes concrete ones beside tracers: the tracer is
    refused wherever it sits, not only in first place, and the EMA works on afterwards."""
    ema = emacore.EMA(0.5)
    b = jnp.zeros(2)
    ema.apply({"b": b, "w": jnp.ones(3)})
    with pytest.raises(TypeError, match=r"traced array .*use emacore.functional"):
        jax.jit(lambda w: ema.apply({"b": b, "w": w}))(jnp.full(3, 3.0))
    ema.apply({"b": b + 2.0, "w": jnp.full(3, 5.0)})
    avg = ema.average({"b": b, "w": jnp.ones(3)})
    np.testing.assert_array_equal(np.asarray(avg["b"]), np.full(2, 1.0, np.float32))
    np.testing.assert_array_equal(np.asarray(avg["w"]), np.full(3, 3.0, np.float32))
    # the functional guard asks every leaf too: a concrete first leaf does not hide a tracer
    state = F.init({"b": b, "w": jnp.ones(3)})
    with pytest.raises(ValueError, match="nonfinite='raise' needs concrete values"):
        jax.jit(lambda w: F.update(state, {"b": b, "w": w}, 0.5, nonfinite="raise"))(jnp.ones(3))
    # a concrete state closed over, traced parameters: a tracer's device is not known, and
    # not compared with the shadow's
    new = jax.jit(lambda w: F.update(state, {"b": b + 2.0, "w": w}, 0.5))(jnp.full(3, 5.0))
    np.testing.assert_array_equal(np.asarray(F.average(new)["b"]), np.full(2, 1.0, np.float32))
    np.testing.assert_array_equal(np.asarray(F.average(new)["w"]), np.full(3, 3.0, np.float32))


@pytest.mark.parametrize("layout", ["auto", "separate", "flat"])
def test_averages_and_state_dicts_read_before_an_update_outlive_its_donation(
    layout: str,
) -> None:
    """The update donates the shadows it replaces: what a read handed out (averages, a state
    dict) must not be those buffers, whatever the leaf's layout (packed, raveled, 1-d large,
    separate)."""
    start = {"big": np.arange(70_000.0), "mat": np.ones((300, 300)), "small": np.ones(3)}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in start.items()}
    ema = emacore.EMA(0.5, layout=layout)
    ema.apply(params)
    (group,) = ema._groups.values()
    held = list(group.state.shadow.arrays)
    averages, saved = ema.average(params), ema.state_dict()
    ema.apply({k: v + 2.0 for k, v in params.items()})
    assert all(a.is_deleted() for a in held)  # donated: the update kept no second copy
    for name, want in start.items():
        np.testing.assert_array_equal(np.asarray(averages[name]), want.astype(np.float32))
        got = saved["leaves"][name]["shadow"]
        np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(ema.average(params)["big"]), start["big"] + 1.0)


def _run_without_x64(code: str) -> None:
    """Run ``code`` in a process with jax_enable_x64 off (this session turns it on); it prints
    "ok" when its checks pass."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_a_float32_traceable_state_debiases_with_the_coefficient_it_applied() -> None:
    """Without jax_enable_x64 (a subprocess: this session turns it on) a traceable state's
    counters are float32; the debias must still be exact to float32 rounding, not carry the
    rounding of a product near 1 (0.14% at decay 0.99999, as optax.ema's does)."""
    code = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp, optax
        from emacore import functional as F
        from emacore.integrations.optax import averages, ema_params
        assert not jax.config.jax_enable_x64
        params = {"w": jnp.full(3, 2.0)}
        tx = optax.chain(optax.sgd(0.0), ema_params(0.99999, zero_debias=True))
        opt = tx.init(params)
        _, opt = jax.jit(tx.update)({"w": jnp.zeros(3)}, opt, params)
        np.testing.assert_allclose(np.asarray(averages(opt)["w"]), 2.0, rtol=5e-7)
        xs = np.random.default_rng(0).standard_normal((3000, 3)).astype(np.float32) + 1.0
        state = F.init({"w": jnp.zeros(3)}, traceable=True, zero_debias=True)
        assert state.decay_product.dtype == jnp.float32 and state.debias is not None
        body = lambda st, x: (F.update(st, {"w": x}, 0.9999), F.average(st)["w"])
        state, seen = jax.lax.scan(body, state, jnp.asarray(xs))
        ref, prod, want = np.zeros(3), 1.0, []
        for x in xs.astype(np.float64):
            want.append(ref / (1 - prod) if prod < 1 else ref)
            ref, prod = 0.9999 * ref + 0.0001 * x, prod * 0.9999
        np.testing.assert_allclose(np.asarray(F.average(state)["w"]), ref / (1 - prod), rtol=2e-6)
        np.testing.assert_allclose(np.asarray(seen)[1:], np.array(want)[1:], rtol=2e-6)
        print("ok")
        """
    )
    _run_without_x64(code)


def test_a_skipped_traced_step_keeps_a_float32_states_debias() -> None:
    """Without x64 a traceable zero_debias state carries ``debias``; a step skipped on device
    (nonfinite='skip' under jit) keeps it, as every other counter, unchanged."""
    code = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp
        from emacore import functional as F
        assert not jax.config.jax_enable_x64
        state = F.init({"w": jnp.zeros(2)}, traceable=True, zero_debias=True)
        step = jax.jit(lambda st, x: F.update(st, {"w": x}, 0.9, nonfinite="skip"))
        state = step(state, jnp.asarray([1.0, 2.0]))
        before = {k: np.asarray(getattr(state, k)) for k in ("count", "decay_product", "debias")}
        shadow = np.asarray(state.shadow["w"])
        state = step(state, jnp.asarray([np.nan, 2.0]))
        for k, v in before.items():
            np.testing.assert_array_equal(np.asarray(getattr(state, k)), v, err_msg=k)
        np.testing.assert_array_equal(np.asarray(state.shadow["w"]), shadow)
        np.testing.assert_allclose(np.asarray(F.average(state)["w"]), [1.0, 2.0], rtol=1e-6)
        print("ok")
        """
    )
    _run_without_x64(code)


@pytest.mark.parametrize(
    ("traceable", "inplace"), [(False, False), (True, True)], ids=["concrete-counters", "inplace"]
)
def test_a_traced_skip_needs_a_traceable_state_updated_out_of_place(
    traceable: bool, inplace: bool
) -> None:
    state = F.init({"w": jnp.zeros(2)}, traceable=traceable)
    # closed over, not an argument: jit would trace Python counters into arrays otherwise
    step = jax.jit(lambda x: F.update(state, {"w": x}, 0.9, nonfinite="skip", inplace=inplace))
    with pytest.raises(ValueError, match="needs a traceable state"):
        step(jnp.ones(2))


def test_bfloat16_parameters_get_float32_shadows() -> None:
    params = {"w": jnp.ones(8, jnp.bfloat16)}
    ema = emacore.EMA(0.999)
    ema.apply(params)
    params = {"w": jnp.full(8, 1.25, jnp.bfloat16)}
    for _ in range(200):
        ema.apply(params)
    avg = ema.average(params)["w"]
    assert avg.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(avg), 1.25 - 0.25 * 0.999**200, rtol=1e-5)


def test_shardings_are_kept_and_the_update_has_no_collective() -> None:
    """8 host devices (a subprocess: the device count is fixed when jax starts)."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import emacore
        from emacore_backends import jax as jb
        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
        sharding = NamedSharding(mesh, P("data", "model"))
        w = jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)
        ema = emacore.EMA(0.5)
        ema.apply({"w": w})
        ema.apply({"w": w + 2.0})
        avg = ema.average({"w": w})["w"]
        assert avg.sharding == sharding, avg.sharding
        np.testing.assert_allclose(np.asarray(avg), np.asarray(w) + 1.0)
        hlo = jb._update_keeping.lower([avg], [w], 0.5).compile().as_text()
        assert not any(op in hlo for op in ("all-gather", "all-reduce", "collective-permute")), hlo
        (group,) = ema._groups.values()
        part = group.state.shadow.plan.parts[0]
        hlo = part.jitted[True].lower(group.state.shadow.arrays, [w], 0.5).compile().as_text()
        assert not any(op in hlo for op in ("all-gather", "all-reduce", "collective-permute")), hlo
        # offloaded to pinned host memory: still sharded the same way
        off = emacore.EMA(0.5, device="pinned_host")
        off.apply({"w": w})
        off.apply({"w": w + 2.0})
        (group,) = off._groups.values()
        (shadow,) = group.state.shadow.arrays
        assert shadow.sharding == sharding.with_memory_kind("pinned_host"), shadow.sharding
        np.testing.assert_allclose(np.asarray(off.average({"w": w})["w"]), np.asarray(w) + 1.0)
        # a traceable functional state (what ema_params keeps in an optax chain) over sharded
        # leaves: its 0-d counters are replicated over the mesh, the shadows keep the sharding
        import optax
        from emacore import functional as F
        from emacore.integrations.optax import averages, ema_params
        state = F.init({"w": w}, traceable=True, zero_debias=True)
        assert state.count.sharding == NamedSharding(mesh, P()), state.count.sharding
        tx = optax.chain(optax.sgd(0.0), ema_params(0.5))
        opt = tx.init({"w": w})
        _, opt = jax.jit(tx.update)({"w": jnp.zeros((8, 8))}, opt, {"w": w + 2.0})
        avg = averages(opt)["w"]
        assert avg.sharding == sharding, avg.sharding
        np.testing.assert_allclose(np.asarray(avg), np.asarray(w) + 1.0)
        print("ok", len(jax.devices()))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok 8"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Block:
    """A registered pytree node, as flax structs are."""

    kernel: jax.Array
    bias: jax.Array


def test_registered_pytree_nodes_are_containers_with_named_leaves() -> None:
    params = {"block": _Block(jnp.zeros((2, 2)), jnp.zeros(2)), "scale": jnp.ones(1)}
    ema = emacore.EMA(0.5)
    ema.apply(params)
    params = jax.tree_util.tree_map(lambda x: x + 2.0, params)
    ema.apply(params)
    assert set(ema.state_dict()["leaves"]) == {"block/kernel", "block/bias", "scale"}
    avg = ema.average(params)
    assert isinstance(avg["block"], _Block)  # the same structure back
    np.testing.assert_allclose(np.asarray(avg["block"].kernel), np.ones((2, 2)))
    np.testing.assert_allclose(np.asarray(avg["scale"]), [2.0])
    state = F.init(params)
    state = F.update(state, jax.tree_util.tree_map(lambda x: x * 0, params), 0.5)
    assert isinstance(F.average(state)["block"], _Block)
    assert ema.average_name(params["block"].bias) == "block/bias/ExponentialMovingAverage"


def test_small_leaves_share_a_buffer_and_large_ones_keep_their_own() -> None:
    rng = np.random.default_rng(3)
    start = {
        "big": rng.standard_normal(jax_backend.SMALL).astype(np.float32),
        "w": rng.standard_normal((5, 7)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
        "h": rng.standard_normal((4, 2)).astype(np.float16),
    }
    new = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in start.items()}
    params = {k: jnp.asarray(v) for k, v in start.items()}
    ema = emacore.EMA(0.9)
    ema.apply(params)
    (group,) = ema._groups.values()
    shapes = sorted(a.shape for a in group.state.shadow.arrays)
    # one float32 buffer (w, b and the float16 leaf's float32 shadow), and the large leaf
    assert shapes == [(5 * 7 + 7 + 8,), (jax_backend.SMALL,)]
    ema.apply({k: jnp.asarray(v) for k, v in new.items()})
    avg = ema.average(params)
    for k, v in start.items():
        s0 = v.astype(np.float64)
        ref = s0 + 0.1 * (new[k].astype(np.float64) - s0)
        assert avg[k].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(avg[k]), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compat", ["default", "tensorflow"])
def test_large_shadows_with_several_dimensions_are_held_raveled_on_cpu(compat: str) -> None:
    """XLA's CPU loop is faster over 1-d arrays: large n-d shadows are held raveled and read
    back in their shape, with the numbers of the per-leaf update."""
    rng = np.random.default_rng(5)
    start = {
        "conv": rng.standard_normal((128, 64, 3, 3)).astype(np.float32),
        "vec": rng.standard_normal(jax_backend.SMALL).astype(np.float32),
        "half": rng.standard_normal((300, 300)).astype(np.float16),
        "small": rng.standard_normal((3, 3)).astype(np.float32),
    }
    steps = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in start.items()}]
    steps.append({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in start.items()})
    ema = emacore.EMA(0.75, compat=compat)
    ema.apply({k: jnp.asarray(v) for k, v in start.items()})
    (group,) = ema._groups.values()
    (part,) = group.state.shadow.plan.parts
    shapes = sorted(a.shape for a in group.state.shadow.arrays)
    assert shapes == sorted([(9,), (90_000,), (jax_backend.SMALL,), (128 * 64 * 9,)])
    assert sum(part.raveled) == 2  # conv and half; vec is 1-d already
    first = ema.average({k: jnp.asarray(v) for k, v in start.items()})
    # reshaped (and sliced) averages are copies: the next apply's donation leaves them valid
    kept = {k: first[k] for k in ("conv", "half", "small")}
    for values in steps:
        ema.apply({k: jnp.asarray(v) for k, v in values.items()})
    avg = ema.average({k: jnp.asarray(v) for k, v in start.items()})
    for k, v in start.items():
        # TF's policy keeps a float16 shadow for a float16 variable; emacore's widens it
        dtype = v.dtype.type if compat == "tensorflow" else np.float32
        assert avg[k].shape == v.shape and avg[k].dtype == dtype
        if k in kept:
            np.testing.assert_array_equal(np.asarray(kept[k]), v.astype(dtype))
        s = v.astype(dtype)
        for values in steps:  # the reference order, in the shadow's dtype
            s = s - (s - values[k].astype(dtype)) * dtype(0.25)
        if compat == "tensorflow" and dtype == np.float16:
            np.testing.assert_allclose(np.asarray(avg[k]), s, rtol=2e-3, atol=2e-3)
        elif compat == "tensorflow":
            np.testing.assert_array_equal(np.asarray(avg[k]), s)
        else:  # XLA may contract to a fused multiply-add: one rounding fewer
            np.testing.assert_allclose(np.asarray(avg[k]), s, rtol=1e-6, atol=1e-6)


def test_raveled_shadows_in_profiles_state_dicts_and_a_functional_state() -> None:
    rng = np.random.default_rng(6)
    start = {"w": rng.standard_normal((256, 300)), "b": rng.standard_normal(7)}
    new = {k: rng.standard_normal(v.shape) for k, v in start.items()}

    def tree(values: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}

    multi = emacore.EMA({"fast": 0.5, "slow": 0.9})
    single = emacore.EMA(0.9)
    for ema in (multi, single):
        ema.apply(tree(start))
        ema.apply(tree(new))
    got, want = multi.profile("slow").average(tree(start)), single.average(tree(start))
    for k in start:
        assert got[k].shape == start[k].shape
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    restored = emacore.EMA(0.9)
    restored.apply(tree(start))
    restored.load_state_dict(single.state_dict())
    restored.apply(tree(start))
    single.apply(tree(start))
    got, want = restored.average(tree(start)), single.average(tree(start))
    for k in start:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))

    params = [jnp.asarray(start["w"], jnp.float32), jnp.asarray(start["b"], jnp.float32)]
    state = F.init(params, layout="separate")
    assert isinstance(state.shadow, jax_backend._Packed)
    assert state.shadow.plan.parts[0].raveled == (True, False)
    step = jax.jit(lambda st, p: F.update(st, p, 0.75), donate_argnums=0)
    state = step(state, [jnp.asarray(new["w"], jnp.float32), jnp.asarray(new["b"], jnp.float32)])
    for got_leaf, k in zip(F.average(state), ("w", "b")):
        assert got_leaf.shape == start[k].shape
        ref = start[k] + 0.25 * (new[k] - start[k])
        np.testing.assert_allclose(np.asarray(got_leaf), ref, rtol=1e-6, atol=1e-6)


def test_a_mismatch_in_a_packed_group_names_the_leaf_and_changes_nothing() -> None:
    params = {"a": jnp.ones(3), "b": jnp.ones(4)}
    ema = emacore.EMA(0.5)
    ema.apply(params)
    (group,) = ema._groups.values()
    held = group.state.shadow.arrays[0]
    # the same total size, so only a per-leaf check can tell
    with pytest.raises(emacore.LeafMismatchError, match="leaf 'a': shape"):
        ema.apply({"a": jnp.zeros(4), "b": jnp.zeros(3)})
    with pytest.raises(emacore.LeafMismatchError, match="leaf 'b': dtype"):
        ema.apply({"a": jnp.zeros(3), "b": jnp.zeros(4, jnp.complex64)})
    with pytest.raises(emacore.LeafMismatchError, match="leaf 'b': dtype int32"):
        ema.apply({"a": jnp.zeros(3), "b": jnp.zeros(4, jnp.int32)})
    with pytest.raises(emacore.LeafMismatchError, match="leaf 'a': got an array of backend"):
        ema.apply({"a": np.zeros(3), "b": jnp.zeros(4)})
    assert not held.is_deleted() and ema._groups[group.names].state.count == 1
    np.testing.assert_array_equal(np.asarray(ema.average(params)["b"]), np.ones(4))
    # a weak-typed parameter is not the compiled signature, but fits: it is averaged
    ema.apply({"a": jnp.zeros(3), "b": jnp.asarray(3.0) * jnp.ones(4)})
    np.testing.assert_array_equal(np.asarray(ema.average(params)["b"]), np.full(4, 2.0))


def test_a_functional_state_with_packed_shadows_crosses_jit_with_donation() -> None:
    rng = np.random.default_rng(4)
    start = [rng.standard_normal(s).astype(np.float32) for s in [(3,), (2, 2), (5,)]]
    state = F.init([jnp.asarray(v) for v in start], layout="flat")
    assert isinstance(state.shadow, jax_backend._Packed)
    step = jax.jit(lambda st, p: F.update(st, p, 0.75), donate_argnums=0)
    buffer = state.shadow.arrays[0]
    new = [rng.standard_normal(v.shape).astype(np.float32) for v in start]
    state = step(state, [jnp.asarray(v) for v in new])
    assert buffer.is_deleted() and isinstance(state.shadow, jax_backend._Packed)
    for got, s0, v in zip(F.average(state), start, new):
        np.testing.assert_array_equal(np.asarray(got), s0 - (s0 - v) * np.float32(0.25))


def test_packs_are_per_device_and_a_moved_parameter_is_refused() -> None:
    """Two host devices (a subprocess: the device count is fixed when jax starts)."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        import emacore
        d0, d1 = jax.devices()[:2]
        params = {"x": jax.device_put(jnp.ones(3), d0), "y": jax.device_put(jnp.ones(2), d1),
                  "z": jax.device_put(jnp.ones(2), d0)}
        ema = emacore.EMA(0.5)
        ema.apply(params)
        (group,) = ema._groups.values()
        assert sorted(a.shape for a in group.state.shadow.arrays) == [(2,), (5,)]
        ema.apply({k: v * 3 for k, v in params.items()})
        avg = ema.average(params)
        assert avg["y"].devices() == {d1} and avg["x"].devices() == {d0}
        np.testing.assert_array_equal(np.asarray(avg["y"]), [2.0, 2.0])
        try:
            ema.apply({**params, "x": jax.device_put(params["x"], d1)})
        except emacore.LeafMismatchError as exc:
            assert "leaf 'x': parameter is on device" in str(exc), exc
        else:
            raise AssertionError("a parameter moved to another device was accepted")
        assert group.state.count == 2
        np.testing.assert_array_equal(np.asarray(ema.average(params)["x"]), [2.0] * 3)
        print("ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("exact", [False, True])
def test_pinned_host_offload_keeps_shadows_in_host_memory(exact: bool) -> None:
    rng = np.random.default_rng(5)
    start = {
        "w": rng.standard_normal((6, 4)).astype(np.float32),
        "big": rng.standard_normal(jax_backend.SMALL + 1).astype(np.float32),
        "conv": rng.standard_normal((128, 64, 3, 3)).astype(np.float32),  # held raveled
    }
    steps = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}]
    steps.append({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()})
    ema = emacore.EMA(0.75, device="pinned_host", exact=exact, zero_debias=True)
    ema.apply({k: jnp.asarray(v) for k, v in start.items()})
    (group,) = ema._groups.values()
    assert group.state.shadow.plan.parts[0].raveled.count(True) == 1
    for step in steps:
        held = list(group.state.shadow.arrays)
        assert {a.sharding.memory_kind for a in held} == {"pinned_host"}
        ema.apply({k: jnp.asarray(v) for k, v in step.items()})  # params in device memory
        assert all(a.is_deleted() for a in held)  # donated: no second copy in host memory
    avg = ema.average({k: jnp.asarray(v) for k, v in start.items()})
    for k, v in start.items():
        ref = np.zeros_like(v, dtype=np.float64)  # zero-debiased: starts at zero
        for x in (v, *(s[k] for s in steps)):
            ref = ref - (ref - x.astype(np.float64)) * 0.25
        ref /= 1 - 0.75**3
        assert avg[k].sharding.memory_kind == "device"  # read back where it is used
        np.testing.assert_allclose(np.asarray(avg[k]), ref, rtol=1e-5, atol=1e-6)


def test_offload_options_that_do_not_exist_are_refused() -> None:
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"jax backend: device='hbm' is neither a memory kind"):
        emacore.EMA(0.5, device="hbm").apply(params)
    with pytest.raises(ValueError, match=r"jax backend: device=3 must be a jax Device"):
        emacore.EMA(0.5, device=3).apply(params)


def test_functional_state_offloaded_to_pinned_host() -> None:
    params = [jnp.full(5, 2.0), jnp.ones((2, 3))]
    state = F.init(params, device="pinned_host")
    assert {a.sharding.memory_kind for a in state.shadow.arrays} == {"pinned_host"}
    state = F.update(state, [p + 4.0 for p in params], 0.5)
    got = F.average(state)
    np.testing.assert_array_equal(np.asarray(got[0]), np.full(5, 4.0))
    np.testing.assert_array_equal(np.asarray(got[1]), np.full((2, 3), 3.0))
    # a dict: the offloaded shadows stay in host memory (a packed state), not read out of it
    tree = {"a": jnp.full(5, 2.0), "big": jnp.ones((300, 300))}
    state = F.init(tree, device="pinned_host")
    assert isinstance(state.shadow, emacore.ShadowTree)
    assert {a.sharding.memory_kind for a in state.shadow.shadows.arrays} == {"pinned_host"}
    state = F.update(state, {k: v + 4.0 for k, v in tree.items()}, 0.5)
    assert {a.sharding.memory_kind for a in state.shadow.shadows.arrays} == {"pinned_host"}
    np.testing.assert_array_equal(np.asarray(F.average(state)["a"]), np.full(5, 4.0))
    np.testing.assert_array_equal(np.asarray(F.average(state)["big"]), np.full((300, 300), 3.0))


def test_a_traced_time_step_inside_jit() -> None:
    params = {"w": jnp.zeros(3, jnp.float32)}
    state = F.init(params, traceable=True)

    @jax.jit
    def step(state: emacore.EMAState, params: dict[str, jax.Array], dt: jax.Array) -> Any:
        return F.update(state, params, 0.5, dt=dt)

    for dt, value in ((2.0, 4.0), (0.5, 1.0)):
        state = step(state, {"w": jnp.full(3, value, jnp.float32)}, jnp.float32(dt))
    ref = 0.0
    for dt, value in ((2.0, 4.0), (0.5, 1.0)):
        ref = ref + (value - ref) * (1 - 0.5**dt)
    np.testing.assert_allclose(np.asarray(F.average(state)["w"]), np.full(3, ref), rtol=1e-6)


def test_nonfinite_skip_inside_jit_keeps_the_old_state() -> None:
    params = {"w": jnp.zeros(3, jnp.float32), "b": jnp.ones(2, jnp.float32)}
    state = F.init(params, traceable=True)
    step = jax.jit(lambda st, p: F.update(st, p, 0.5, nonfinite="skip"))
    good = {"w": jnp.full(3, 2.0, jnp.float32), "b": jnp.full(2, 3.0, jnp.float32)}
    state = step(state, good)
    bad = {"w": jnp.full(3, 4.0, jnp.float32), "b": jnp.asarray([1.0, jnp.nan], jnp.float32)}
    skipped = step(state, bad)
    assert int(skipped.count) == 1 and float(skipped.decay_product) == 0.5
    for k in params:
        np.testing.assert_array_equal(np.asarray(skipped.shadow[k]), np.asarray(state.shadow[k]))
    with pytest.raises(ValueError, match="nonfinite='raise' needs concrete values"):
        jax.jit(lambda st, p: F.update(st, p, 0.5, nonfinite="raise"))(state, good)


def test_orbax_load_into_refuses_other_shapes_and_dtypes_and_skips_untracked(
    tmp_path: Any,
) -> None:
    from emacore.integrations import orbax as eo

    ema = emacore.EMA(0.5)
    ema.apply({"w": jnp.full(4, 2.0, jnp.float32), "v": jnp.ones((2, 2), jnp.float32)})
    eo.save(ema, tmp_path / "ckpt")
    for params in (
        {"w": jnp.zeros(5, jnp.float32), "v": jnp.zeros((2, 2), jnp.float32)},
        {"w": jnp.zeros(4, jnp.float16), "v": jnp.zeros((2, 2), jnp.float16)},
    ):
        other = emacore.EMA(0.5, shadow_dtype="same")  # float16 shadows for the second
        other.apply(params)
        with pytest.raises(emacore.StateDictError, match=r"'leaves/[vw]/shadow': the checkpoint"):
            eo.load_into(other, tmp_path / "ckpt")
        np.testing.assert_array_equal(np.asarray(other.average(params)["w"]), 0.0)
    part = emacore.EMA(0.5)
    part.apply({"w": jnp.zeros(4, jnp.float32)})
    with pytest.raises(emacore.StateDictError, match="does not track"):
        eo.load_into(part, tmp_path / "ckpt")
    result = eo.load_into(part, tmp_path / "ckpt", strict=False)
    assert result.unexpected_keys == ["v"]
    np.testing.assert_array_equal(np.asarray(part.average({"w": jnp.zeros(4)})["w"]), 2.0)


def test_sharded_checkpoints_through_orbax_load_onto_another_mesh(tmp_path: Any) -> None:
    """8 host devices (a subprocess): save on a 4x2 mesh, restore onto 4 devices; debiased
    averages of sharded shadows too."""
    code = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import emacore
        from emacore.integrations import orbax as eo
        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
        w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "model")))
        b = jnp.ones(3)
        ema = emacore.EMA({{"fast": 0.5, "slow": 0.75}}, zero_debias=True)
        ema.apply({{"w": w, "b": b}})
        ema.apply({{"w": w + 2.0, "b": b + 2.0}})
        eo.save(ema, {str(tmp_path / "ema")!r})
        mesh4 = Mesh(np.array(jax.devices()[:4]), ("x",))
        w4 = jax.device_put(jnp.zeros((8, 8)), NamedSharding(mesh4, P("x")))
        other = emacore.EMA({{"fast": 0.5, "slow": 0.75}}, zero_debias=True)
        other.apply({{"w": w4, "b": b}})
        eo.load_into(other, {str(tmp_path / "ema")!r})
        for name in ("fast", "slow"):
            got = other.profile(name).average({{"w": w4, "b": b}})
            want = ema.profile(name).average({{"w": w, "b": b}})
            assert got["w"].sharding == w4.sharding, got["w"].sharding
            d = 0.5 if name == "fast" else 0.75
            ref = ((1 - d) * d * np.arange(64.0) + (1 - d) * (np.arange(64.0) + 2)) / (1 - d * d)
            np.testing.assert_allclose(np.asarray(got["w"]).ravel(), ref, rtol=1e-6)
            np.testing.assert_array_equal(np.asarray(got["b"]), np.asarray(want["b"]))
        print("ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


def test_other_libraries_arrays_are_leaves_without_asking_jax(monkeypatch: Any) -> None:
    """With jax imported, the pytree walk must not hand another library's array to jax (under
    torch.compile that is a graph break or an error): it is a leaf, decided without jax."""

    class ForeignArray:  # an array of some other library, as torch.Tensor or a numpy array
        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            return np.zeros(2)

    class NamespacedArray:
        def __array_namespace__(self, api_version: Any = None) -> Any:
            return np

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("jax.tree_util was asked about another library's array")

    monkeypatch.setattr(jax.tree_util, "tree_flatten_with_path", refuse)
    backend = emacore.get_backend("jax")
    for leaf in (ForeignArray(), NamespacedArray(), np.zeros(3)):
        assert backend.flatten_node(leaf) is None


def _tree_params(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "layer": {
            "kernel": jnp.asarray(rng.standard_normal((128, 64, 3, 3)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(64), jnp.float32),
        },
        "norm": [jnp.asarray(rng.standard_normal(64), jnp.float32) for _ in range(3)],
    }


def test_a_dict_state_keeps_one_array_per_leaf_unless_a_layout_is_asked_for() -> None:
    params = _tree_params(7)
    assert isinstance(F.init(params).shadow, dict)
    packed = F.init(params, layout="auto")
    assert isinstance(packed.shadow, emacore.ShadowTree)
    (part,) = packed.shadow.shadows.plan.parts
    assert len(packed.shadow.shadows.arrays) == 2 and part.raveled == (True,)
    tree = packed.shadow.tree()
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert isinstance(F.init(params, layout="separate").shadow, emacore.ShadowTree)


def test_a_packed_dict_state_in_jit_scan_and_donation_against_float64() -> None:
    params, new = _tree_params(8), _tree_params(9)
    state = F.init(params, layout="auto", traceable=True)
    held = list(state.shadow.shadows.arrays)
    step = jax.jit(lambda st, p: F.update(st, p, 0.75), donate_argnums=0)
    state = step(state, new)
    assert all(a.is_deleted() for a in held)
    assert isinstance(state.shadow, emacore.ShadowTree)

    def body(st: Any, _: Any) -> tuple[Any, None]:
        return F.update(st, new, 0.75), None

    state, _ = jax.lax.scan(body, state, None, length=2)
    assert isinstance(state.shadow, emacore.ShadowTree)
    for got, p, q in zip(
        jax.tree.leaves(F.average(state)), jax.tree.leaves(params), jax.tree.leaves(new)
    ):
        s = np.asarray(p, np.float64)
        for _ in range(3):
            s = 0.75 * s + 0.25 * np.asarray(q, np.float64)
        assert got.shape == p.shape
        np.testing.assert_allclose(np.asarray(got), s, rtol=1e-5, atol=1e-6)


def test_a_packed_dict_state_refuses_bad_input_and_skips_nonfinite_under_jit() -> None:
    params = _tree_params(10)
    state = F.init(params, layout="auto", traceable=True)
    wrong = {"layer": params["layer"], "norm": params["norm"][:2]}
    with pytest.raises(emacore.StructureError, match="missing leaves"):
        F.update(state, wrong, 0.5)
    bad_shape = {**params, "layer": {**params["layer"], "bias": jnp.zeros(63)}}
    with pytest.raises(emacore.LeafMismatchError, match=r"leaf 'layer/bias': shape"):
        F.update(state, bad_shape, 0.5)
    poisoned = jax.tree.map(lambda x: x + 1.0, params)
    poisoned["norm"][1] = poisoned["norm"][1].at[0].set(jnp.nan)
    step = jax.jit(lambda st, p: F.update(st, p, 0.5, nonfinite="skip"))
    after = step(state, poisoned)
    assert isinstance(after.shadow, emacore.ShadowTree) and int(after.count) == 0
    for got, want in zip(jax.tree.leaves(F.average(after)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_packed_dict_state_goes_through_a_checkpoint(tmp_path: Any) -> None:
    params, new = _tree_params(11), _tree_params(12)
    state = F.update(F.init(params, layout="auto"), new, 0.5)
    emacore.save(state, tmp_path / "state.safetensors")
    loaded = emacore.load_state(tmp_path / "state.safetensors", xp=jnp)
    for got, want in zip(jax.tree.leaves(F.average(loaded)), jax.tree.leaves(F.average(state))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
