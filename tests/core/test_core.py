"""Core pieces against independent references: schedules, float32 emulation, pytrees, and
the promise that importing emacore imports no array framework."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import emacore
from emacore import _pytree
from emacore._debias import coefficient, decay_at, tf_correction
from emacore._precision import round_to
from emacore.schedules import Constant, TFRamp, as_schedule


@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_round_to_matches_numpy_casts(x: float) -> None:
    assert round_to(x, "float64") == x
    with np.errstate(over="ignore"):
        assert round_to(x, "float32") == float(np.float32(x))
        assert round_to(x, "float16") == float(np.float16(x))


@given(st.integers(0, 10**9), st.sampled_from([0.9, 0.99, 0.999, 0.9999]))
def test_tf_ramp_float32_matches_numpy_float32(n: int, decay: float) -> None:
    nf = np.float32(n)
    want = min(np.float32(decay), (np.float32(1.0) + nf) / (np.float32(10.0) + nf))
    assert TFRamp(decay).tf_value(n) == float(want)
    assert TFRamp(decay)(n) == min(decay, (1 + n) / (10 + n))
    assert coefficient(float(want), "tensorflow") == float(np.float32(1.0) - want)


def test_schedules_and_arrays() -> None:
    assert Constant(0.9)(5) == 0.9
    assert as_schedule(0.5) == Constant(0.5)
    ramp = TFRamp(0.99)
    assert ramp(np.asarray(5)) == pytest.approx(6 / 15)
    assert decay_at(ramp, 0, "tensorflow") == float(np.float32(0.1))
    with pytest.raises(emacore.DecayError):
        Constant(1.01)


def test_tf_correction_reference() -> None:
    c = float(np.float32(1.0) - np.float32(0.99))
    # libm pow in double, rounded to the dtype at each step, as TF's CPU kernel does
    for t in (1, 2, 10, 1000):
        base = np.float32(1.0) - np.float32(c)
        want = np.float32(1.0) - np.float32(float(base) ** t)
        assert tf_correction(c, t, "float32") == float(want)


def test_pytree_round_trip_and_names() -> None:
    P = collections.namedtuple("P", "w b")
    tree = {"z": None, "b": [1.0, (2.0, 3.0)], "a": P(4.0, {"k": 5.0})}
    leaves, treedef = _pytree.flatten(tree)
    assert leaves == [4.0, 5.0, 1.0, 2.0, 3.0]
    assert _pytree.leaf_names(treedef) == ("a/w", "a/b/k", "b/0", "b/1/0", "b/1/1")
    assert _pytree.unflatten(treedef, leaves) == tree
    flat, flat_def = _pytree.flatten((1.0, 2.0))
    assert _pytree.unflatten(flat_def, flat) == (1.0, 2.0)
    assert _pytree.flatten({"b": 1.0, "a": 2.0})[1] == _pytree.flatten({"a": 2.0, "b": 1.0})[1]


def test_import_pulls_in_no_framework() -> None:
    code = (
        "import sys, emacore, emacore.integrations.optax\n"
        "emacore.backends()\n"
        "frameworks = ('numpy', 'torch', 'jax', 'optax', 'array_api_strict', 'array_api_compat')\n"
        "bad = [m for m in frameworks if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    env = {"EMACORE_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    )
    assert out.stdout.strip() == "", f"import emacore imported {out.stdout.strip()}"
