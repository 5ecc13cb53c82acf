"""The Keras callback's options, checked on one Keras backend (run by test_callback_options.py).

Run as ``python callback_option_checks.py <backend>``: Keras reads ``KERAS_BACKEND`` at import,
so each backend needs a process of its own. Each check drives the callback's hooks with weights
assigned by hand (what ``fit`` does, without training: the numpy backend cannot train, and the
values are ours to choose), sets one option, and compares the averages, and the weights
``evaluate``/``predict`` run with, against a float64 EMA computed here. It prints one JSON line:
``{"backend": ..., "results": {check: "ok" or the traceback}}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

BACKEND = sys.argv[1] if __name__ == "__main__" else os.environ.get("KERAS_BACKEND", "")
os.environ["KERAS_BACKEND"] = BACKEND

import keras  # noqa: E402 (KERAS_BACKEND must be set first)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ema_reference import Snapshot, ema_reference  # noqa: E402 (beside this script)

from emacore.errors import EMAWarning, NonFiniteError  # noqa: E402
from emacore.integrations.keras import EMACallback  # noqa: E402

DECAY = 0.6
STEPS = 6
CHECKS: dict[str, Callable[[], None]] = {}
# checks that need a dtype the backend lacks (jax without x64 has no float64)
BACKENDS_OF = {"shadow_dtype_float64": ("torch", "numpy")}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def to_numpy(x: Any) -> np.ndarray:
    """A float64 copy (Keras's convert_to_numpy warns on torch tensors under numpy 2)."""
    if not isinstance(x, np.ndarray):  # numpy's convert_to_tensor casts float64 to floatx
        x = keras.ops.convert_to_tensor(x)
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float64)


def dtype_name(x: Any) -> str:
    """The array's own dtype (convert_to_tensor would cast numpy's float64 to floatx)."""
    return str(x.dtype).removeprefix("torch.")


def snapshot(model: Any) -> Snapshot:
    return {v.path: to_numpy(v.value) for v in model.trainable_variables}


def as_numpy(tree: dict[str, Any]) -> Snapshot:
    return {k: to_numpy(v) for k, v in tree.items()}


def assert_close(actual: Snapshot, expected: Snapshot, rtol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=rtol / 10, err_msg=k)


def assert_differs(a: Snapshot, b: Snapshot) -> None:
    """The option's averages are not what the test would see without it."""
    assert any(not np.allclose(a[k], b[k], rtol=1e-4) for k in a), "the check cannot fail"


def tiny_model(dtype: str | None = None) -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", name="hidden", dtype=dtype),
            keras.layers.Dense(1, name="out", dtype=dtype),
        ],
        name="net",
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def drive(
    callback: Any, model: Any, steps: int = STEPS, values: Callable[[int, Any], Any] | None = None
) -> list[Snapshot]:
    """What ``fit`` does for the callback, with the weights assigned by hand at each step:
    ``values(step, variable)`` or random ones. The weights after each optimizer step."""
    callback.set_model(model)
    callback.on_train_begin()
    rng = np.random.default_rng(1)
    stepped: list[Snapshot] = []
    for step in range(1, steps + 1):
        for v in model.trainable_variables:
            value = values(step, v) if values is not None else rng.standard_normal(v.shape)
            v.assign(np.asarray(value).astype(v.dtype))
        model.optimizer.iterations.assign(step)  # as an optimizer step would
        stepped.append(snapshot(model))
        callback.on_train_batch_end(step)
    return stepped


class Recorder(keras.callbacks.Callback):
    """The weights ``evaluate`` and ``predict`` run with (at their first batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.evaluated: list[Snapshot] = []
        self.predicted: list[Snapshot] = []

    def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
        if batch == 0:
            self.evaluated.append(snapshot(self.model))

    def on_predict_batch_begin(self, batch: int, logs: Any = None) -> None:
        if batch == 0:
            self.predicted.append(snapshot(self.model))


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((8, 3)).astype("float32"),
        rng.standard_normal((8, 1)).astype("float32"),
    )


def running_mean(step: Any) -> float:
    """d = n / (n + 1) at update n = 0, 1, ...: the average is the mean of every update."""
    return float(step) / (float(step) + 1)


@check
def schedule_decay() -> None:
    model, callback = tiny_model(), EMACallback(running_mean)
    stepped = drive(callback, model)
    mean = {k: np.mean([w[k] for w in stepped], axis=0) for k in stepped[0]}  # numpy's mean
    assert_close(as_numpy(callback.averages()), mean)
    decays = [running_mean(n) for n in range(STEPS)]
    assert_close(as_numpy(callback.averages()), ema_reference(stepped, decays))
    assert_differs(mean, ema_reference(stepped, [0.9] * STEPS))
    callback.on_test_begin()
    assert_close(snapshot(model), mean)
    callback.on_test_end()
    assert_close(snapshot(model), stepped[-1])


@check
def decay_profiles() -> None:
    model, callback = tiny_model(), EMACallback({"fast": DECAY, "slow": 0.9})
    stepped = drive(callback, model)
    fast = ema_reference(stepped, [DECAY] * STEPS)
    slow = ema_reference(stepped, [0.9] * STEPS)
    assert_differs(fast, slow)
    assert_close(as_numpy(callback.averages()), fast)  # the first profile is the one read
    live = {v.path: v.value for v in model.trainable_variables}
    assert_close(as_numpy(callback.ema.profile("slow").average(live)), slow)
    callback.on_test_begin()
    assert_close(snapshot(model), fast)
    callback.on_test_end()


@check
def zero_debias() -> None:
    model, callback = tiny_model(), EMACallback(0.9, zero_debias=True)
    stepped = drive(callback, model)
    expected = ema_reference(stepped, [0.9] * STEPS, zero_debias=True)
    assert_differs(expected, ema_reference(stepped, [0.9] * STEPS))
    assert_close(as_numpy(callback.averages()), expected)


@check
def update_every() -> None:
    """update_every=3 over 7 steps: updates at steps 1, 4 and 7 with the decay cubed."""
    model, callback = tiny_model(), EMACallback(DECAY, update_every=3)
    stepped = drive(callback, model, steps=7)
    expected = ema_reference([stepped[0], stepped[3], stepped[6]], [DECAY**3] * 3)
    assert_differs(expected, ema_reference(stepped, [DECAY] * 7))
    assert_close(as_numpy(callback.averages()), expected)


@check
def num_updates() -> None:
    """TF's num_updates (here the optimizer's step): decay min(0.99, (1 + n) / (10 + n))."""
    model = tiny_model()
    callback = EMACallback(
        0.99, num_updates=lambda: int(keras.ops.convert_to_tensor(model.optimizer.iterations))
    )
    stepped = drive(callback, model)
    decays = [min(0.99, (1 + n) / (10 + n)) for n in range(1, STEPS + 1)]
    expected = ema_reference(stepped, decays)
    assert_differs(expected, ema_reference(stepped, [0.99] * STEPS))
    assert_close(as_numpy(callback.averages()), expected)


# float16 weights that move by one float16 ulp (2**-10 at 1.0) and stay there: with decay 0.99
# each update moves a float16 shadow by 1e-5, under half its ulp, so it never leaves 1.0; a
# float32 shadow (the default for 16-bit weights) moves toward 1 + 2**-10.
ULP16 = 2.0**-10


def _half_precision_run(**options: Any) -> Snapshot:
    model, callback = tiny_model("float16"), EMACallback(0.99, **options)
    assert {dtype_name(v.value) for v in model.trainable_variables} == {"float16"}
    drive(callback, model, steps=30, values=lambda step, v: np.ones(v.shape) + (step > 1) * ULP16)
    averages = callback.averages()
    want = "float32" if not options else "float16"
    assert {dtype_name(a) for a in averages.values()} == {want}, averages
    return as_numpy(averages)


@check
def shadow_dtype_same() -> None:
    shadow, weight = np.float16(1.0), np.float16(1 + ULP16)
    for _ in range(29):  # the same recurrence in numpy float16: it stays at 1.0
        shadow = np.float16(shadow - np.float16(0.01) * (shadow - weight))
    assert shadow == np.float16(1.0)
    for k, v in _half_precision_run(shadow_dtype="same").items():
        np.testing.assert_array_equal(v, np.full(v.shape, 1.0), err_msg=k)
    moved = 1 + ULP16 * (1 - 0.99**29)  # float64: the default float32 shadows move
    for k, v in _half_precision_run().items():
        np.testing.assert_allclose(v, np.full(v.shape, moved), rtol=0, atol=1e-6, err_msg=k)


@check
def shadow_dtype_float64() -> None:
    """float64 shadows of float32 weights: the float64 reference to float64 rounding (float32
    shadows are ~1e-8 off), assigned into the float32 variables for evaluation."""
    model, callback = tiny_model(), EMACallback(DECAY, shadow_dtype="float64")
    stepped = drive(callback, model, steps=12)
    averages = callback.averages()
    assert {dtype_name(a) for a in averages.values()} == {"float64"}, averages
    expected = ema_reference(stepped, [DECAY] * 12)
    assert_close(as_numpy(averages), expected, rtol=1e-13)
    callback.on_test_begin()
    assert {dtype_name(v.value) for v in model.trainable_variables} == {"float32"}
    assert_close(snapshot(model), expected, rtol=1e-6)
    callback.on_test_end()


def _poisoned(step: int) -> Callable[[int, Any], Any]:
    rng = np.random.default_rng(2)

    def values(at: int, v: Any) -> Any:
        value = rng.standard_normal(v.shape)
        if at == step and "hidden/kernel" in v.path:
            value.flat[0] = np.nan
        return value

    return values


@check
def nonfinite_skip() -> None:
    """Step 3's weights hold NaN: that update is skipped (with one EMAWarning)."""
    model, callback = tiny_model(), EMACallback(DECAY, nonfinite="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stepped = drive(callback, model, values=_poisoned(3))
    assert [w.category for w in caught] == [EMAWarning], [str(w.message) for w in caught]
    assert callback.ema.skipped_updates == 1
    kept = stepped[:2] + stepped[3:]
    assert_close(as_numpy(callback.averages()), ema_reference(kept, [DECAY] * (STEPS - 1)))


@check
def nonfinite_raise() -> None:
    model, callback = tiny_model(), EMACallback(DECAY, nonfinite="raise")
    with pytest.raises(NonFiniteError, match="hidden/kernel"):
        drive(callback, model, values=_poisoned(3))


@check
def include_exclude() -> None:
    """Only the selected variables are averaged; the others are read (and evaluated) live."""
    for option in ({"exclude": "*/hidden/*"}, {"include": ["*/out/*"]}):
        model, callback = tiny_model(), EMACallback(DECAY, **option)
        stepped = drive(callback, model)
        selected = [k for k in stepped[0] if "/out/" in k]
        assert len(selected) == 2, sorted(stepped[0])
        expected = ema_reference(stepped, [DECAY] * STEPS, selected)
        assert_differs(expected, ema_reference(stepped, [DECAY] * STEPS))
        assert_close(as_numpy(callback.averages()), expected)
        callback.on_test_begin()
        assert_close(snapshot(model), expected)
        callback.on_test_end()


def _swap_run(swap_for: str) -> tuple[Recorder, Snapshot, Snapshot, Any]:
    model, callback, recorder = tiny_model(), EMACallback(DECAY, swap_for=swap_for), Recorder()
    stepped = drive(callback, model)
    x, y = data()
    model.evaluate(x, y, batch_size=4, verbose=0, callbacks=[callback, recorder])
    model.predict(x, batch_size=4, verbose=0, callbacks=[callback, recorder])
    expected = ema_reference(stepped, [DECAY] * STEPS)
    assert_differs(expected, stepped[-1])
    assert_close(snapshot(model), stepped[-1])  # the live weights back after both
    return recorder, expected, stepped[-1], model


@check
def swap_for_evaluate_only() -> None:
    recorder, averaged, live, _ = _swap_run("evaluate")
    assert_close(recorder.evaluated[-1], averaged)
    assert_close(recorder.predicted[-1], live)


@check
def swap_for_predict_only() -> None:
    recorder, averaged, live, _ = _swap_run("predict")
    assert_close(recorder.evaluated[-1], live)
    assert_close(recorder.predicted[-1], averaged)


@check
def copy_at_end() -> None:
    for copy in (True, False):
        model, callback = tiny_model(), EMACallback(DECAY, copy_at_end=copy)
        stepped = drive(callback, model)
        callback.on_train_end()
        assert_close(
            snapshot(model), ema_reference(stepped, [DECAY] * STEPS) if copy else stepped[-1]
        )


def main() -> None:
    results: dict[str, str] = {}
    for name, fn in CHECKS.items():
        if BACKEND not in BACKENDS_OF.get(name, (BACKEND,)):
            continue  # not applicable here: test_callback_options.py expects no result
        try:
            fn()
            results[name] = "ok"
        except (Exception, pytest.fail.Exception):  # pytest.raises fails with a BaseException
            results[name] = traceback.format_exc()
    print(json.dumps({"backend": keras.backend.backend(), "results": results}))


if __name__ == "__main__":
    main()
