"""Every option of `emacore.functional.init` and `update` changes what it says it changes.

Each test fails when its option is ignored: the numbers are checked against float64 math
written here (the recurrence ``s ← s − (s − x)(1 − d)``), and an option whose effect is not a
number (``backend``, ``traceable``, ``inplace``) is checked by what it must do: the forced
backend does the work, the counters are arrays, the input state is written (numpy, torch),
donated (jax) or left as it was. ``exact``, ``compat`` and ``layout`` are checked bit for bit in
``test_exact_large.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import emacore
from emacore import functional as F
from emacore.errors import LeafDTypeError, LeafMismatchError
from emacore.schedules import TFRamp

VALUES = [np.array([0.0, 1.0, -2.0, 3.25], np.float32) * (k + 1) + k for k in range(4)]


def _reference(decays: list[float], dtype: Any = np.float64) -> np.ndarray:
    """The shadow after init with VALUES[0] and one update per decay, computed in ``dtype``."""
    s = VALUES[0].astype(dtype)
    for d, x in zip(decays, VALUES[1:]):
        s = s - (s - x.astype(dtype)) * dtype(1.0 - d)
    return s


def _run(lib: Any, decays: list[Any], init: dict[str, Any], **update: Any) -> Any:
    state = F.init({"w": lib.make(VALUES[0])}, **init)
    for d, x in zip(decays, VALUES[1:]):
        state = F.update(state, {"w": lib.make(x)}, d, **update)
    return state


def test_shadow_dtype_float64_keeps_float64_precision(lib: Any) -> None:
    decays = [0.9, 0.99, 0.7]
    if not lib.float64:  # a cast would narrow to float32 silently: refused instead
        with pytest.raises(LeafDTypeError, match="shadow_dtype 'float64': backend 'jax'"):
            F.init({"w": lib.make(VALUES[0])}, shadow_dtype="float64")
        return
    state = _run(lib, decays, {"shadow_dtype": "float64"})
    got = lib.read(F.average(state)["w"])
    assert got.dtype == np.float64
    want = _reference(decays)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    # float32 shadows would be this far off: the check above tells them apart
    assert np.max(np.abs(_reference(decays, np.float32) - want)) > 1e-7


def test_shadow_dtype_default_and_same_for_16_bit_parameters(lib: Any) -> None:
    if lib.name == "array_api_strict":
        pytest.skip("array_api_strict has float32 and float64 only (no 16-bit floats)")
    half = {"w": lib.make(VALUES[0].astype(np.float16))}
    default = F.init(half)
    same = F.init(half, shadow_dtype="same")
    assert lib.read(F.average(default)["w"]).dtype == np.float32
    assert lib.read(F.average(same)["w"]).dtype == np.float16
    x = {"w": lib.make(VALUES[1].astype(np.float16))}
    d = 0.9
    s16 = VALUES[0].astype(np.float16)
    want32 = s16.astype(np.float32) - (s16 - VALUES[1].astype(np.float16)).astype(np.float32) * (
        np.float32(1 - d)
    )
    got32 = lib.read(F.average(F.update(default, x, d))["w"])
    np.testing.assert_allclose(got32, want32, rtol=1e-6)
    got16 = lib.read(F.average(F.update(same, x, d))["w"])
    assert got16.dtype == np.float16
    np.testing.assert_allclose(got16, want32.astype(np.float16), rtol=2e-3)


class _Recording(emacore.ArrayAPIBackend):
    """The portable backend, counting the calls it gets."""

    def __init__(self) -> None:
        super().__init__("recording")
        self.created = 0
        self.updated = 0

    def owns(self, x: Any) -> bool:
        return True  # as a plugin may claim: here, what the portable backend owns too

    def create_shadows(self, *args: Any, **kwargs: Any) -> Any:
        self.created += 1
        return super().create_shadows(*args, **kwargs)

    def update(self, *args: Any, **kwargs: Any) -> Any:
        self.updated += 1
        return super().update(*args, **kwargs)


def test_backend_instance_does_the_work(lib: Any) -> None:
    rec = _Recording()
    decays = [0.9, 0.5, 0.99]
    state = _run(lib, decays, {"backend": rec}, backend=rec)
    assert (rec.created, rec.updated) == (1, len(decays))
    np.testing.assert_allclose(lib.read(F.average(state)["w"]), _reference(decays), rtol=1e-6)


def test_backend_name_is_looked_up_and_used(lib: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    generic = emacore.get_backend("array_api")
    calls: list[str] = []
    original = generic.update

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append("update")
        return original(*args, **kwargs)

    monkeypatch.setattr(generic, "update", counted)
    # every backend's arrays are array-api-compat's (torch tensors through its wrapper)
    state = _run(lib, [0.9, 0.5], {"backend": "array_api"}, backend="array_api")
    assert calls == ["update", "update"]
    np.testing.assert_allclose(lib.read(F.average(state)["w"]), _reference([0.9, 0.5]), rtol=1e-6)


class _Owner(emacore.ArrayAPIBackend):
    """A backend that owns nothing."""

    def owns(self, x: Any) -> bool:
        return False


def test_a_forced_backend_that_does_not_own_a_leaf_is_refused(lib: Any) -> None:
    params = {"w": lib.make(VALUES[0])}
    with pytest.raises(LeafMismatchError, match="leaf 'w' is a .* backend 'nothing' does not"):
        F.init(params, backend=_Owner("nothing"))
    state = F.init(params)
    with pytest.raises(LeafMismatchError, match="leaf 'w' .* backend 'nothing'"):
        F.update(state, params, 0.5, backend=_Owner("nothing"))
    np.testing.assert_array_equal(lib.read(state.shadow["w"]), VALUES[0])


def test_unknown_backend_name_is_refused(lib: Any) -> None:
    with pytest.raises(emacore.UnknownBackendError, match="no_such_backend"):
        F.init({"w": lib.make(VALUES[0])}, backend="no_such_backend")


def test_step_is_the_schedule_argument(lib: Any) -> None:
    # TFRamp(0.999) at step n is min(0.999, (1 + n) / (10 + n)); the state's count is 0..2
    steps = [5, 40, 3]
    state = F.init({"w": lib.make(VALUES[0])})
    for n, x in zip(steps, VALUES[1:]):
        state = F.update(state, {"w": lib.make(x)}, TFRamp(0.999), step=n)
    want = _reference([min(0.999, (1 + n) / (10 + n)) for n in steps])
    np.testing.assert_allclose(lib.read(F.average(state)["w"]), want, rtol=1e-6)
    assert int(state.count) == len(steps)


def test_dt_raises_the_decay_to_its_power(lib: Any) -> None:
    dts = [2.5, 1.0, 0.25]
    state = F.init({"w": lib.make(VALUES[0])})
    for dt, x in zip(dts, VALUES[1:]):
        state = F.update(state, {"w": lib.make(x)}, 0.9, dt=dt)
    want = _reference([0.9**dt for dt in dts])
    np.testing.assert_allclose(lib.read(F.average(state)["w"]), want, rtol=1e-6)


def test_zero_debias_divides_by_one_minus_the_decay_product(lib: Any) -> None:
    decays = [0.9, 0.8, 0.95]
    state = _run(lib, decays, {"zero_debias": True, "shadow_dtype": lib.dtype("float64")})
    biased = np.zeros(VALUES[0].shape)
    for d, x in zip(decays, VALUES[1:]):
        biased = biased - (biased - x.astype(np.float64)) * (1 - d)
    want = biased / (1 - np.prod(decays))
    np.testing.assert_allclose(lib.read(F.average(state)["w"]), want, rtol=1e-13)


def test_traceable_keeps_counters_as_arrays_with_the_same_numbers(lib: Any) -> None:
    decays = [0.9, 0.5]
    state = _run(lib, decays, {"traceable": True, "zero_debias": True})
    for counter in (state.count, state.decay_product):
        assert hasattr(counter, "shape") and counter.shape == (), type(counter)
    assert int(lib.read(state.count)) == 2
    np.testing.assert_allclose(float(lib.read(state.decay_product)), 0.45, rtol=1e-6)
    plain = _run(lib, decays, {"zero_debias": True})
    np.testing.assert_allclose(
        lib.read(F.average(state)["w"]), lib.read(F.average(plain)["w"]), rtol=1e-6
    )


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_writes_the_shadows_it_was_given(lib: Any, inplace: bool) -> None:
    before = F.init({"w": lib.make(VALUES[0])})
    old = before.shadow["w"]
    after = F.update(before, {"w": lib.make(VALUES[1])}, 0.5, inplace=inplace)
    new = lib.read(after.shadow["w"])
    np.testing.assert_allclose(new, _reference([0.5]), rtol=1e-6)
    writes = emacore.get_backend(lib.backend).capabilities.inplace_update
    if inplace and writes:
        assert after.shadow["w"] is old
        np.testing.assert_array_equal(lib.read(old), new)
    elif inplace and lib.name == "jax":
        assert old.is_deleted()  # donated to the compiled update: no second copy
    else:  # the input state is left as it was
        np.testing.assert_array_equal(lib.read(old), VALUES[0])


def test_nonfinite_ignore_lets_nan_and_inf_through(lib: Any) -> None:
    """The default checks nothing: the update runs, and a NaN or an infinity reaches its own
    elements of the shadow (NaN or infinite: an infinity's result is the backend's arithmetic,
    torch's lerp makes it NaN), while the others move as usual."""
    bad = VALUES[1].copy()
    bad[1], bad[2] = np.nan, np.inf
    options: list[dict[str, Any]] = [{}, {"nonfinite": "ignore"}]
    for kwargs in options:
        state = F.init({"w": lib.make(VALUES[0])})
        state = F.update(state, {"w": lib.make(bad)}, 0.5, **kwargs)
        got = lib.read(F.average(state)["w"])
        assert not np.isfinite(got[1:3]).any(), got
        want = _reference([0.5])
        np.testing.assert_allclose(got[[0, 3]], want[[0, 3]], rtol=1e-6)
        assert int(state.count) == 1
