"""Keras 3 adapter: a callback that keeps an EMA of a model's trainable variables.

`EMACallback` updates an `emacore.ExponentialMovingAverage` of ``model.trainable_variables``
after every optimizer step of ``model.fit``, evaluates (``evaluate()``, and the validation
inside ``fit``) and predicts with the averages assigned into the variables, and can leave them
in the model when training ends. It works on the ``jax``, ``torch`` and ``numpy`` Keras
backends: the averages are arrays of the backend's own type (the variables' ``.value``).

Keras is imported when an `EMACallback` is created, not when this module is.

Examples
--------
```python
import keras
from emacore.integrations.keras import EMACallback

ema_callback = EMACallback(0.999)
model.fit(x, y, validation_data=(x_val, y_val), callbacks=[ema_callback])
ema_callback.copy_to_model()  # keep the averaged weights, e.g. before model.save()
```
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from emacore._ema import ExponentialMovingAverage
from emacore.errors import EMAError
from emacore.integrations import _callbacks
from emacore.schedules import Schedule

__all__ = ["EMACallback", "STAGES"]

STAGES = ("evaluate", "predict")
"""The stages `EMACallback` can run with the averages assigned into the model."""

_IMPLEMENTATIONS: dict[tuple[type, type], type] = {}


def _keras() -> Any:
    try:
        return importlib.import_module("keras")
    except ImportError as error:
        raise ImportError(f"EMACallback needs Keras 3: pip install keras ({error})") from error


class EMACallback:
    """A Keras callback that keeps an exponential moving average of the trainable variables.

    The average is an `emacore.ExponentialMovingAverage` (`ema`) of a dict that maps each
    trainable variable's path (``variable.path``, e.g. ``"dense/kernel"``) to its value, so
    leaves are tracked by name on every backend, including JAX, whose arrays are replaced at
    every step. It is updated in ``on_train_batch_end`` whenever the optimizer stepped (its
    ``iterations`` advanced: with ``gradient_accumulation_steps=k``, once every ``k``
    batches; every batch for a model without an optimizer). The first update makes the
    averages equal to the weights after the first step, as
    ``tf.train.ExponentialMovingAverage`` does. Non-trainable variables (BatchNorm's moving
    statistics) are not averaged: the model evaluates with their current values.

    For the stages in ``swap_for``, the averages are assigned into the variables when the
    stage begins (``on_test_begin``, ``on_predict_begin``) and the trained values are assigned
    back when it ends. Keras calls no callback when ``evaluate`` raises: then the averages
    stay in the model until `restore` is called, or the next stage or training begins.
    Before the first update there are no averages and the model runs as it is.

    Parameters
    ----------
    decay : float, Schedule, tuple or dict
        As for `emacore.ExponentialMovingAverage`: the decay, a schedule of the update
        count, or several decay profiles (the first one is assigned into the model).
    swap_for : str or iterable of str
        The stages that run with the averages: ``"evaluate"`` (``model.evaluate`` and the
        validation inside ``fit``) and ``"predict"``; ``()`` for none.
    copy_at_end : bool
        Assign the averages into the model when ``fit`` finishes (`copy_to_model`).
    **ema_options
        Passed to `emacore.ExponentialMovingAverage` (``zero_debias``, ``update_every``,
        ``nonfinite``, ``shadow_dtype``, ``include``/``exclude`` on variable paths...).

    Raises
    ------
    ImportError
        Keras is not installed.
    ValueError
        ``swap_for`` names an unknown stage, or an option is invalid (as
        `emacore.ExponentialMovingAverage` checks them).

    Notes
    -----
    An instance is an instance of ``keras.callbacks.Callback`` (a subclass made when the first
    callback is created). On the JAX backend Keras keeps the weights outside the variables
    during an epoch; reading them each step makes Keras write them back (``jax_state_sync``),
    as any callback reading ``self.model`` between batches does.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> EMACallback:
        """Make the instance a ``keras.callbacks.Callback`` too (Keras imported here)."""
        base = _keras().callbacks.Callback
        impl = _IMPLEMENTATIONS.get((cls, base))
        if impl is None:
            impl = type(cls.__name__, (cls, base), {"__qualname__": cls.__qualname__})
            impl.__module__ = cls.__module__
            _IMPLEMENTATIONS[(cls, base)] = impl
        instance: EMACallback = object.__new__(impl)
        return instance

    def __init__(
        self,
        decay: float | Schedule | tuple[Any, ...] | dict[str, Any],
        *,
        swap_for: str | Iterable[str] = STAGES,
        copy_at_end: bool = False,
        **ema_options: Any,
    ) -> None:
        super().__init__()
        swap = _callbacks.stages(swap_for, STAGES)
        copy_at_end = _callbacks.flag("copy_at_end", copy_at_end)
        self._ema = ExponentialMovingAverage(decay, **ema_options)
        self._swap_for = swap
        self._copy_at_end = copy_at_end
        self._variables: list[Any] | None = None
        self._last_iterations: int | None = None
        self._has_averages = False
        self._saved: list[tuple[Any, Any]] | None = None

    @property
    def ema(self) -> ExponentialMovingAverage:
        """The `emacore.ExponentialMovingAverage` of the variables, keyed by variable path."""
        return self._ema

    # -- public ----------------------------------------------------------------------------

    def averages(self) -> dict[str, Any]:
        """The averaged value of each trainable variable, by variable path.

        Raises
        ------
        EMAError
            Nothing was averaged yet (``fit`` has made no optimizer step with this callback).
        """
        variables = self._require_averages("averages()")
        result: dict[str, Any] = self._ema.average(_values(variables))
        return result

    def copy_to_model(self) -> None:
        """Assign the averages into the model's trainable variables (e.g. before saving it).

        Raises
        ------
        EMAError
            Nothing was averaged yet (``fit`` has made no optimizer step with this callback).
        """
        variables = self._require_averages("copy_to_model()")
        self.restore()
        self._assign(variables, self._ema.average(_values(variables)))

    def restore(self) -> None:
        """Assign the trained values back if the averages are in the model for a stage.

        Needed only after ``evaluate`` or ``predict`` raised; otherwise the callback does it.
        """
        saved, self._saved = self._saved, None
        if saved is not None:
            for variable, value in saved:
                variable.assign(value)

    # -- Keras's hooks ---------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Find the trainable variables and the optimizer step training starts from."""
        self.restore()
        self._variables = self._find_variables()
        self._last_iterations = self._iterations()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """Update the averages if the optimizer stepped since the last update."""
        variables = self._variables
        if variables is None:  # fit() calls on_train_begin first; a direct call may not
            variables = self._variables = self._find_variables()
        iterations = self._iterations()
        if iterations is not None and iterations == self._last_iterations:
            return  # a batch that only accumulated gradients
        self._last_iterations = iterations
        self._ema.apply(_values(variables))
        self._has_averages = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        """With ``copy_at_end``, assign the averages into the model."""
        if self._copy_at_end and self._has_averages:
            self.copy_to_model()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Assign the averages in (``"evaluate"`` in ``swap_for``)."""
        self.restore()
        if "evaluate" in self._swap_for:
            self._swap_in()

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        """Assign the trained values back."""
        self.restore()

    def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
        """Assign the averages in (``"predict"`` in ``swap_for``)."""
        self.restore()
        if "predict" in self._swap_for:
            self._swap_in()

    def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
        """Assign the trained values back."""
        self.restore()

    # -- internals -------------------------------------------------------------------------

    def _get_model(self) -> Any:
        model = getattr(self, "model", None)  # on JAX, reading it syncs the weights back
        if model is None:
            raise EMAError(
                "EMACallback has no model: pass it to model.fit(..., callbacks=[...]) "
                "(or call set_model(model) first)"
            )
        return model

    def _find_variables(self) -> list[Any]:
        model = self._get_model()
        variables = list(model.trainable_variables)
        if not variables:
            raise ValueError(
                f"EMACallback: model {getattr(model, 'name', model)!r} has no trainable "
                "variables to average (build it, or unfreeze some layers, before fit)"
            )
        paths = [v.path for v in variables]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ValueError(
                f"EMACallback: trainable variables share the paths {repeated[:5]}, which key "
                "their averages; give the layers distinct names"
            )
        return variables

    def _iterations(self) -> int | None:
        """The optimizer's step count (accumulation-aware), or None without an optimizer."""
        optimizer = getattr(self._get_model(), "optimizer", None)
        if optimizer is None:
            return None
        # a Variable without accumulation, a 0-d tensor with it; int() reads either without
        # numpy (Keras's convert_to_numpy warns on torch tensors under numpy 2)
        return int(_keras().ops.convert_to_tensor(optimizer.iterations))

    def _require_averages(self, what: str) -> list[Any]:
        if not self._has_averages or self._variables is None:
            raise EMAError(
                f"EMACallback.{what}: no averages yet; model.fit(..., callbacks=[callback]) "
                "makes one per optimizer step"
            )
        self._get_model()  # on JAX, brings the variables up to date
        return self._variables

    def _swap_in(self) -> None:
        if not self._has_averages or self._variables is None:
            return  # nothing averaged yet: run with the weights as they are
        variables = self._variables
        self._get_model()  # on JAX, brings the variables up to date
        ops = _keras().ops
        live = [(v, ops.copy(v.value)) for v in variables]
        self._assign(variables, self._ema.average(_values(variables)))
        self._saved = live

    @staticmethod
    def _assign(variables: list[Any], values: dict[str, Any]) -> None:
        keras = _keras()
        # Keras on JAX keeps the array it is given and donates it to its next compiled step,
        # which would delete a shadow the EMA still holds: assign a copy there. The torch and
        # numpy backends copy into the variable themselves.
        copy = keras.ops.copy if keras.backend.backend() == "jax" else None
        for v in variables:
            value = values[v.path]
            v.assign(copy(value) if copy is not None else value)

    def __repr__(self) -> str:
        return f"EMACallback({self._ema!r}, swap_for={sorted(self._swap_for)})"


def _values(variables: list[Any]) -> dict[str, Any]:
    return {v.path: v.value for v in variables}
