"""Hypothesis state machine: random sequences of apply() on subsets of arrays, rebinding
names, state_dict round trips and swaps, checked against a float64 model of TF semantics
(each leaf has its own shadow, update count and decay product)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import emacore

DECAYS = st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0])


class _Reference:
    def __init__(self, zero_debias: bool) -> None:
        self.zero_debias = zero_debias
        self.shadow: dict[str, np.ndarray] = {}
        self.product: dict[str, float] = {}

    def apply(self, values: dict[str, np.ndarray], decay: float) -> None:
        for k, v in values.items():
            if k not in self.shadow:
                self.shadow[k] = np.zeros_like(v) if self.zero_debias else v.copy()
                self.product[k] = 1.0
            self.shadow[k] = decay * self.shadow[k] + (1 - decay) * v
            self.product[k] *= decay

    def average(self, k: str) -> np.ndarray:
        if self.zero_debias and self.product[k] != 1.0:
            return self.shadow[k] / (1 - self.product[k])
        return self.shadow[k]


def make_machine(lib: Any) -> type[RuleBasedStateMachine]:
    class EMAMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.decay = [0.5]
            self.rng = np.random.default_rng(0)
            self.arrays = {k: lib.make(np.zeros(n)) for k, n in zip("abcd", (1, 2, 3, 4))}
            self.values = {k: np.zeros(n) for k, n in zip("abcd", (1, 2, 3, 4))}

        @initialize(zero_debias=st.booleans())
        def start(self, zero_debias: bool) -> None:
            self.zero_debias = zero_debias
            self.ema = emacore.EMA(lambda step: self.decay[0], zero_debias=zero_debias)
            self.ref = _Reference(zero_debias)

        @rule(
            keys=st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True),
            decay=DECAYS,
            as_dict=st.booleans(),
        )
        def apply(self, keys: list[str], decay: float, as_dict: bool) -> None:
            for k in keys:
                v = self.rng.standard_normal(self.values[k].shape)
                self.values[k] = v
                self.arrays[k] = lib.set_value(self.arrays[k], v)
            self.decay[0] = decay
            # immutable arrays (JAX) in a plain list are tracked by position, which subsets
            # of a list reshuffle: name them
            if as_dict or not lib.mutable:  # named leaves live in their own key space ("d/a", ...)
                self.ema.apply({"d": {k: self.arrays[k] for k in keys}})
                self.ref.apply({f"d/{k}": self.values[k] for k in keys}, decay)
            else:  # identity-tracked, TF style
                self.ema.apply([self.arrays[k] for k in keys])
                self.ref.apply({k: self.values[k] for k in keys}, decay)

        @precondition(lambda self: bool(self.ref.shadow))
        @rule()
        def round_trip(self) -> None:
            restored = emacore.EMA(lambda step: self.decay[0], zero_debias=self.zero_debias)
            restored.load_state_dict(self.ema.state_dict())
            self.ema = restored
            # identity-tracked leaves bind to the next plain list in first-seen order; a
            # decay of 1 makes that apply a no-op update
            order = [k for k in self.ref.shadow if len(k) == 1]
            if order:
                self.decay[0] = 1.0
                self.ema.apply([self.arrays[k] for k in order])
                self.ref.apply({k: self.values[k] for k in order}, 1.0)

        @precondition(lambda self: lib.mutable and any(len(k) == 1 for k in self.ref.shadow))
        @rule()
        def swap(self) -> None:
            tracked = [k for k in "abcd" if k in self.ref.shadow]
            live = [lib.read(self.arrays[k]) for k in tracked]
            with self.ema.swapped([self.arrays[k] for k in tracked]):
                for k in tracked:
                    np.testing.assert_allclose(
                        lib.read(self.arrays[k]), self.ref.average(k), rtol=1e-9, atol=1e-9
                    )
            for k, v in zip(tracked, live):
                np.testing.assert_array_equal(lib.read(self.arrays[k]), v)

        @invariant()
        def averages_match(self) -> None:
            for key in self.ref.shadow:
                if key.startswith("d/"):
                    got = self.ema.average({"d": {key[2:]: self.arrays[key[2:]]}})["d"][key[2:]]
                else:
                    got = self.ema.average(self.arrays[key])
                want = self.ref.average(key)
                product = self.ref.product[key]
                scale = 1 / (1 - product) if self.zero_debias and product != 1.0 else 1.0
                np.testing.assert_allclose(lib.read(got), want, rtol=1e-9, atol=1e-9 * scale)

    return EMAMachine


def test_stateful_machine(lib: Any) -> None:
    machine = make_machine(lib)
    machine.TestCase.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
    machine.TestCase().runTest()
