"""Hypothesis: any sequence of values and decays, any shapes, against float64 math."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import emacore
from emacore import functional as F

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
decays = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(shapes, min_size=1, max_size=4),
    steps=st.lists(decays, min_size=1, max_size=8),
    zero_debias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_functional_matches_float64(
    lib: Any, shapes: list[tuple[int, ...]], steps: list[float], zero_debias: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s) for s in shapes]
    state = F.init([lib.make(v) for v in init], zero_debias=zero_debias)
    ref = [np.zeros(s) if zero_debias else v.copy() for s, v in zip(shapes, init)]
    prod = 1.0
    for d in steps:
        values = [rng.standard_normal(s) * 10 for s in shapes]
        state = F.update(state, [lib.make(v) for v in values], d)
        ref = [d * r + (1 - d) * v for r, v in zip(ref, values)]
        prod *= d
    # The debiased average r / (1 - Π d) is ill-conditioned when Π d is near 1 (an ulp of the
    # product is then a large relative change of 1 - Π d): a tolerance on it must either scale
    # with 1 / (1 - Π d), and then cannot fail, or fail on rounding. So each well-conditioned
    # part is checked tightly instead: the shadows, the decay product, and the average as the
    # shadow over one minus the state's own product.
    np.testing.assert_allclose(state.decay_product, prod, rtol=1e-12, atol=0)
    correction = 1.0 - state.decay_product if zero_debias and state.decay_product != 1.0 else 1.0
    for g, shadow, r, s in zip(F.average(state), state.shadow, ref, shapes):
        assert tuple(g.shape) == s
        assert lib.device_of(g) == lib.device
        np.testing.assert_allclose(lib.read(shadow), r, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lib.read(g), lib.read(shadow) / correction, rtol=1e-14, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(st.tuples(decays, st.booleans()), min_size=1, max_size=10),
    seed=st.integers(0, 2**32 - 1),
)
def test_stateful_subsets_keep_per_leaf_counters(
    lib: Any, steps: list[tuple[float, bool]], seed: int
) -> None:
    """Applying sometimes [a, b] and sometimes [a] gives each leaf its own count and debias."""
    rng = np.random.default_rng(seed)
    a, b = lib.make(np.zeros(3)), lib.make(np.zeros(2))
    schedule = [0.5]
    ema = emacore.EMA(lambda step: schedule[0], zero_debias=True)
    ref: dict[str, list[Any]] = {"a": [np.zeros(3), 1.0], "b": [np.zeros(2), 1.0]}
    for k, (d, both_drawn) in enumerate(steps):
        both = both_drawn or k == 0  # the first apply tracks both
        schedule[0] = d
        va, vb = rng.standard_normal(3), rng.standard_normal(2)
        a = lib.set_value(a, va)
        b = lib.set_value(b, vb)
        ema.apply([a, b] if both else [a])
        for key, v, used in (("a", va, True), ("b", vb, both)):
            if used:
                ref[key][0] = d * ref[key][0] + (1 - d) * v
                ref[key][1] *= d
    # mutable arrays: by object; immutable (JAX): by position in the list they were given in
    final = dict(zip("ab", ema.average([a, b]))) if not lib.mutable else {"a": None, "b": None}
    leaves = ema.state_dict()["leaves"]
    for key, arr, name in (("a", a, "Variable"), ("b", b, "Variable_1")):  # TF's names
        s, prod = ref[key]
        avg = ema.average(arr) if lib.mutable else final[key]
        assert avg is not None
        # as in test_functional_matches_float64: the well-conditioned parts, tightly (the
        # debiased average is ill-conditioned when the product is near 1)
        saved = leaves[name]
        np.testing.assert_allclose(saved["decay_product"], prod, rtol=1e-12, atol=0)
        shadow = lib.read(saved["shadow"])
        np.testing.assert_allclose(shadow, s, rtol=1e-12, atol=1e-12)
        correction = 1.0 - saved["decay_product"] if saved["decay_product"] != 1.0 else 1.0
        np.testing.assert_allclose(lib.read(avg), shadow / correction, rtol=1e-14, atol=0)
