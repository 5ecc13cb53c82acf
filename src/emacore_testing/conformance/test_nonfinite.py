"""The NaN/Inf guard (issue 5, item 6) on every backend: skip, raise or ignore, decided for
the whole update, with nothing half-updated and every skip reported."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import emacore
from emacore import functional as F


def _params(lib: Any, b_value: float = 1.0) -> dict[str, Any]:
    return {
        "a": lib.make(np.full(3, 2.0, np.float32)),
        "b": lib.make(np.full(2, b_value, np.float32)),
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_skip_leaves_every_shadow_and_counter_as_it_was(lib: Any, bad: float) -> None:
    ema = emacore.EMA(0.5, nonfinite="skip", zero_debias=True)
    ema.apply(_params(lib))
    before = {k: lib.read(v) for k, v in ema.average(_params(lib)).items()}
    poisoned = {
        "a": lib.make(np.full(3, 4.0, np.float32)),
        "b": lib.make(np.array([1.0, bad], np.float32)),
    }
    with pytest.warns(emacore.EMAWarning, match=r"skipped an EMA update.*\['b'\]"):
        ema.apply(poisoned)
    ema.apply(poisoned)  # counted again, without a second warning
    assert ema.skipped_updates == 2 and ema.last_nonfinite == ["b"]
    after = ema.average(_params(lib))
    for k in before:  # the finite leaf "a" was not updated either: all or nothing
        np.testing.assert_array_equal(lib.read(after[k]), before[k])
    assert {rec["count"] for rec in ema.state_dict()["leaves"].values()} == {1}
    ema.apply(
        {"a": lib.make(np.full(3, 4.0, np.float32)), "b": lib.make(np.full(2, 3.0, np.float32))}
    )
    # debiased after two real updates with decay 0.5: (0.5·0.5·2 + 0.5·4) / 0.75 for "a"
    np.testing.assert_allclose(
        lib.read(ema.average(_params(lib))["a"]), np.full(3, 10 / 3), rtol=1e-6
    )


def test_raise_names_the_leaves_and_changes_nothing(lib: Any) -> None:
    ema = emacore.EMA(0.5, nonfinite="raise")
    ema.apply(_params(lib))
    with pytest.raises(emacore.NonFiniteError, match=r"\['b'\].*no shadow was updated"):
        ema.apply(_params(lib, float("nan")))
    assert ema.last_nonfinite == ["b"] and ema.skipped_updates == 0
    np.testing.assert_array_equal(lib.read(ema.average(_params(lib))["a"]), np.full(3, 2.0))
    fresh = emacore.EMA(0.5, nonfinite="raise")
    with pytest.raises(emacore.NonFiniteError, match="new array #0 of the list"):
        fresh.apply([lib.make(np.array([np.inf], np.float32))])
    assert fresh.state_dict()["leaves"] == {}  # nothing was created either


def test_ignore_does_not_look(lib: Any) -> None:
    ema = emacore.EMA(0.5)
    ema.apply(_params(lib))
    ema.apply(_params(lib, float("nan")))
    assert np.isnan(lib.read(ema.average(_params(lib))["b"])).all()
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        emacore.EMA(0.5, nonfinite="drop")


def test_functional_skip_and_raise(lib: Any) -> None:
    state = F.init(_params(lib))
    same = F.update(state, _params(lib, float("nan")), 0.5, nonfinite="skip")
    assert same is state
    with pytest.raises(emacore.NonFiniteError, match=r"\['b'\]"):
        F.update(state, _params(lib, float("inf")), 0.5, nonfinite="raise")
    new = F.update(state, _params(lib, 5.0), 0.5, nonfinite="raise")
    assert new.count == 1
    np.testing.assert_array_equal(lib.read(F.average(new)["b"]), np.full(2, 3.0))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        F.update(state, _params(lib), 0.5, nonfinite="maybe")
