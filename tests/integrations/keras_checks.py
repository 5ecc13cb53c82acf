"""The Keras callback's checks, run in a fresh process per Keras backend by test_keras.py.

``python keras_checks.py BACKEND`` sets ``KERAS_BACKEND`` before importing Keras, runs every
check and prints one JSON line: ``{check name: "ok" or the traceback}``. The numpy backend
cannot train, so its checks call the callback's hooks with weights assigned by hand.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

BACKEND = sys.argv[1] if __name__ == "__main__" else os.environ.get("KERAS_BACKEND", "")
os.environ["KERAS_BACKEND"] = BACKEND

import keras  # noqa: E402 (KERAS_BACKEND must be set first)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from emacore.errors import EMAError  # noqa: E402
from emacore.integrations.keras import EMACallback  # noqa: E402

DECAY = 0.6
Snapshot = dict[str, np.ndarray]
CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def to_numpy(x: Any) -> np.ndarray:
    """A float64 copy (Keras's convert_to_numpy warns on torch tensors under numpy 2)."""
    x = keras.ops.convert_to_tensor(x)
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float64)


def snapshot(model: Any) -> Snapshot:
    return {v.path: to_numpy(v.value) for v in model.trainable_variables}


def as_numpy(tree: dict[str, Any]) -> Snapshot:
    return {k: to_numpy(v) for k, v in tree.items()}


def reference(stepped: list[Snapshot], decay: float = DECAY) -> list[Snapshot]:
    """The float64 EMA after each step: the first step's weights, then d*s + (1-d)*w."""
    out: list[Snapshot] = []
    for weights in stepped:
        prev = out[-1] if out else weights
        out.append({k: decay * prev[k] + (1 - decay) * w for k, w in weights.items()})
    return out


def assert_close(actual: Snapshot, expected: Snapshot) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((8, 3)).astype("float32"),
        rng.standard_normal((8, 1)).astype("float32"),
    )


def tiny_model(accumulate: int | None = None) -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.3, gradient_accumulation_steps=accumulate), loss="mse"
    )
    return model


class Recorder(keras.callbacks.Callback):
    """The weights after each optimizer step, at each batch start, and seen by evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.stepped: list[Snapshot] = []
        self.batch_start: list[tuple[int, Snapshot]] = []
        self.evaluated: list[tuple[int, Snapshot]] = []
        self.initial: Snapshot | None = None
        self.last = 0

    def iterations(self) -> int:
        return int(keras.ops.convert_to_tensor(self.model.optimizer.iterations))

    def on_train_begin(self, logs: Any = None) -> None:
        self.initial = snapshot(self.model)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.batch_start.append((self.iterations(), snapshot(self.model)))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.iterations() > self.last:
            self.last = self.iterations()
            self.stepped.append(snapshot(self.model))

    def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
        if batch == 0:
            self.evaluated.append((len(self.stepped), snapshot(self.model)))


def fit(model: Any, callbacks: list[Any], epochs: int = 2, **kwargs: Any) -> None:
    x, y = data()
    model.fit(
        x, y, batch_size=2, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kwargs
    )


# -- training backends (jax, torch) ---------------------------------------------------------


@check
def fit_matches_float64_reference() -> None:
    model, recorder, callback = tiny_model(), Recorder(), EMACallback(DECAY)
    fit(model, [recorder, callback])
    assert len(recorder.stepped) == 8, len(recorder.stepped)
    counts = {leaf["count"] for leaf in callback.ema.state_dict()["leaves"].values()}
    assert counts == {8}, counts
    assert_close(as_numpy(callback.averages()), reference(recorder.stepped)[-1])
    assert_close(snapshot(model), recorder.stepped[-1])  # the live weights stay in the model


@check
def gradient_accumulation_updates_per_optimizer_step() -> None:
    model, recorder, callback = tiny_model(accumulate=2), Recorder(), EMACallback(DECAY)
    fit(model, [recorder, callback])
    assert len(recorder.stepped) == 4, len(recorder.stepped)  # 8 batches, 2 per step
    counts = {leaf["count"] for leaf in callback.ema.state_dict()["leaves"].values()}
    assert counts == {4}, counts
    assert_close(as_numpy(callback.averages()), reference(recorder.stepped)[-1])


@check
def validation_inside_fit_sees_the_averages() -> None:
    model, recorder, callback = tiny_model(), Recorder(), EMACallback(DECAY)
    x, y = data()
    fit(model, [recorder, callback], validation_data=(x, y))
    expected = reference(recorder.stepped)
    assert [steps for steps, _ in recorder.evaluated] == [4, 8]
    for steps, seen in recorder.evaluated:
        assert_close(seen, expected[steps - 1])
        kernel = next(iter(seen))
        assert not np.allclose(seen[kernel], recorder.stepped[steps - 1][kernel])
    # every batch, the one after validation too, starts from the live weights
    assert len(recorder.batch_start) == 8
    for steps, weights in recorder.batch_start:
        assert_close(weights, recorder.stepped[steps - 1] if steps else recorder.initial)
    assert_close(snapshot(model), recorder.stepped[-1])


@check
def evaluate_and_predict_after_fit_use_the_averages() -> None:
    model, recorder, callback = tiny_model(), Recorder(), EMACallback(DECAY)
    fit(model, [recorder, callback])
    x, y = data()
    averaged = reference(recorder.stepped)[-1]
    model.evaluate(x, y, verbose=0, callbacks=[callback, recorder])
    assert_close(recorder.evaluated[-1][1], averaged)
    assert_close(snapshot(model), recorder.stepped[-1])
    with_averages = to_numpy(model.predict(x, verbose=0, callbacks=[callback]))
    live = to_numpy(model.predict(x, verbose=0))
    callback.copy_to_model()
    np.testing.assert_allclose(with_averages, to_numpy(model(x)), rtol=1e-5)
    assert not np.allclose(with_averages, live)


@check
def swap_for_none_evaluates_the_live_weights() -> None:
    model, recorder, callback = tiny_model(), Recorder(), EMACallback(DECAY, swap_for=())
    x, y = data()
    fit(model, [recorder, callback], epochs=1, validation_data=(x, y))
    assert_close(recorder.evaluated[-1][1], recorder.stepped[-1])


@check
def copy_at_end_leaves_the_averages_in_the_model() -> None:
    model, recorder, callback = tiny_model(), Recorder(), EMACallback(DECAY, copy_at_end=True)
    fit(model, [recorder, callback])
    assert_close(snapshot(model), reference(recorder.stepped)[-1])


@check
def zero_debias_and_update_every() -> None:
    model, recorder = tiny_model(), Recorder()
    callback = EMACallback(DECAY, zero_debias=True, update_every=2)
    fit(model, [recorder, callback])
    # updates at steps 1, 3, 5, 7 with decay DECAY**2, from zero, debiased by 1 - prod(d)
    shadow = {k: np.zeros_like(v) for k, v in recorder.stepped[0].items()}
    product = 1.0
    for weights in recorder.stepped[::2]:
        shadow = {k: DECAY**2 * shadow[k] + (1 - DECAY**2) * weights[k] for k in shadow}
        product *= DECAY**2
    expected = {k: v / (1 - product) for k, v in shadow.items()}
    assert_close(as_numpy(callback.averages()), expected)


# -- every backend ----------------------------------------------------------------------------


@check
def clear_errors() -> None:
    callback = EMACallback(0.9)
    with pytest.raises(EMAError, match="no averages yet"):
        callback.copy_to_model()
    with pytest.raises(EMAError, match="no averages yet"):
        callback.averages()
    with pytest.raises(EMAError, match="has no model"):
        EMACallback(0.9).on_train_begin()
    frozen = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, trainable=False)])
    callback.set_model(frozen)
    with pytest.raises(ValueError, match="no trainable variables"):
        callback.on_train_begin()
    with pytest.raises(ValueError, match="unknown stages"):
        EMACallback(0.9, swap_for="validate")
    assert isinstance(callback, keras.callbacks.Callback)


@check
def hooks_called_directly_with_weights_set_by_hand() -> None:
    """What fit would do, without training: the numpy backend's test, run on all three."""
    model = tiny_model()
    x, y = data()
    callback, recorder = EMACallback(DECAY), Recorder()
    callback.set_model(model)
    callback.on_train_begin()
    rng = np.random.default_rng(1)
    stepped: list[Snapshot] = []
    for step in range(1, 6):
        for v in model.trainable_variables:
            v.assign(rng.standard_normal(v.shape).astype("float32"))
        model.optimizer.iterations.assign(step)  # as an optimizer step would
        stepped.append(snapshot(model))
        callback.on_train_batch_end(step)
        callback.on_train_batch_end(step)  # no optimizer step in between: no update
    counts = {leaf["count"] for leaf in callback.ema.state_dict()["leaves"].values()}
    assert counts == {5}, counts
    averaged = reference(stepped)[-1]
    assert_close(as_numpy(callback.averages()), averaged)

    callback.on_test_begin()
    assert_close(snapshot(model), averaged)
    callback.on_test_end()
    assert_close(snapshot(model), stepped[-1])

    model.evaluate(x, y, verbose=0, callbacks=[callback, recorder])  # inference runs anywhere
    assert_close(recorder.evaluated[-1][1], averaged)
    assert_close(snapshot(model), stepped[-1])

    # an evaluation that raised leaves the averages in until restore() or the next stage
    callback.on_test_begin()
    callback.restore()
    assert_close(snapshot(model), stepped[-1])
    callback.on_predict_begin()
    callback.on_test_begin()  # restores first: the live weights are not lost
    callback.on_test_end()
    assert_close(snapshot(model), stepped[-1])

    callback.copy_to_model()
    assert_close(snapshot(model), averaged)


EVERY_BACKEND = ("clear_errors", "hooks_called_directly_with_weights_set_by_hand")


def main() -> None:
    training = BACKEND in ("jax", "torch")
    names = [n for n in CHECKS if training or n in EVERY_BACKEND]
    results: dict[str, str] = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    print(json.dumps({"backend": keras.backend.backend(), "results": results}))


if __name__ == "__main__":
    main()
