"""The reference operation order on leaves of every size every backend treats differently.

``compat="tensorflow"`` and ``exact=True`` promise the reference kernel's three operations in
its order (``s - (s - x) * c``), hence numpy float32's numbers bit for bit. The TF fixtures
hold small tensors only, and a decay such as 0.75 (``c = 1/4``, exact in binary) rounds alike
in any order; so these leaves straddle every size threshold of the backends (packing under
``SMALL``, numpy's cache blocks and threads) and the decays are 0.9 and 0.999, whose ``c`` is
inexact: a fused ``lerp`` or ``addcmul`` path differs from the reference in the last place on
a sizeable share of the elements.

The reference is numpy float32 running `emacore._kernel.reference_update` step by step,
with ``c`` computed here: TF's ``1 - decay`` in float32 on the float32 decay, or, in the
default mode, ``1 - decay`` in float64 cast to the leaf's float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import emacore
from emacore import functional as F
from emacore.backend import reference_update

SMALL = 65_536  # every backend's packing threshold (numpy, torch, jax)
BLOCK = 65_536  # numpy's cache block
THREAD_MIN = 1_048_576  # numpy's threaded update
SIZES = {
    "tiny": (7,),
    "below_small": (SMALL - 1,),
    "at_small": (SMALL,),
    "blocks": (3, BLOCK + 5),  # several cache blocks, the last one partial
    "threaded": (THREAD_MIN + 17,),
}
STEPS = 3
MODES = [
    pytest.param({"compat": "tensorflow"}, id="tensorflow"),
    pytest.param({"exact": True}, id="exact"),
]


def _values(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return {k: rng.standard_normal(s).astype(np.float32) * 3 for k, s in SIZES.items()}


def _reference(decay: float, compat: str) -> dict[str, np.ndarray]:
    tf = compat == "tensorflow"
    c = np.float32(1) - np.float32(decay) if tf else np.float32(1.0 - decay)
    shadow = _values(0)
    for step in range(1, STEPS + 1):
        shadow = {k: reference_update(s, _values(step)[k], c) for k, s in shadow.items()}
    for s in shadow.values():
        assert s.dtype == np.float32
    return shadow


def _assert_bits(lib: Any, got: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    for name, w in want.items():
        g = lib.read(got[name])
        assert g.dtype == np.float32, name
        differ = np.count_nonzero(g.view(np.uint32) != w.view(np.uint32))
        assert differ == 0, f"{name}: {differ} of {w.size} elements differ from the reference"


def test_the_decays_make_orders_differ() -> None:
    """The check can fail: at these decays the fused form rounds otherwise on many elements."""
    for decay in (0.9, 0.999):
        c = np.float32(1.0 - decay)
        s, x = _values(0)["blocks"], _values(1)["blocks"]
        diff = (x - s).astype(np.float64)  # a fused multiply-add: one rounding (torch's lerp)
        fused = (s + np.float64(c) * diff).astype(np.float32)
        assert np.count_nonzero(fused != reference_update(s, x, c)) > s.size // 1000


@pytest.mark.parametrize("decay", [0.9, 0.999])
@pytest.mark.parametrize("mode", MODES)
def test_stateful_reference_order_on_large_leaves(
    lib: Any, decay: float, mode: dict[str, Any]
) -> None:
    ema = emacore.ExponentialMovingAverage(decay, **mode)
    params = {k: lib.make(v) for k, v in _values(0).items()}
    ema.apply(params)  # the shadows start as copies
    for step in range(1, STEPS + 1):
        params = {k: lib.set_value(params[k], v) for k, v in _values(step).items()}
        ema.apply(params)
    compat = mode.get("compat", "default")
    _assert_bits(lib, ema.average(params), _reference(decay, compat))


@pytest.mark.parametrize("layout", [None, "flat", "separate"])
@pytest.mark.parametrize("decay", [0.9, 0.999])
@pytest.mark.parametrize("mode", MODES)
def test_functional_reference_order_on_large_leaves(
    lib: Any, decay: float, mode: dict[str, Any], layout: str | None
) -> None:
    compat = mode.get("compat", "default")
    params = {k: lib.make(v) for k, v in _values(0).items()}
    if layout == "flat" and lib.backend == "array_api":
        with pytest.raises(ValueError, match="backend 'array_api' has no 'flat' layout"):
            F.init(params, compat=compat, layout=layout)
        return
    state = F.init(params, compat=compat, layout=layout)
    for step in range(1, STEPS + 1):
        params = {k: lib.make(v) for k, v in _values(step).items()}
        state = F.update(state, params, decay, exact=mode.get("exact"))
    _assert_bits(lib, F.average(state), _reference(decay, compat))
