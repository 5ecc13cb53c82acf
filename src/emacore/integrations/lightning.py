"""PyTorch Lightning adapter: a callback that keeps an EMA of a LightningModule's weights.

`EMACallback` updates an `emacore.ExponentialMovingAverage` of the module after every
optimizer step (so with ``accumulate_grad_batches=k``, once every ``k`` batches), evaluates
with the averages swapped in, and saves the EMA's state in the Trainer's checkpoints, from
which ``trainer.fit(..., ckpt_path=...)`` resumes it.

Lightning is imported when an `EMACallback` is created, not when this module is: the callback
becomes an instance of Lightning's own ``Callback`` class then (``lightning.pytorch``'s, or
``pytorch_lightning``'s where that is the package in use).

Examples
--------
```python
import lightning as L
from emacore.integrations.lightning import EMACallback

ema_callback = EMACallback(0.999)
trainer = L.Trainer(max_epochs=10, callbacks=[ema_callback])
trainer.fit(model, train_loader, val_loader)  # validation runs with the averages
averaged = ema_callback.ema.average(model)  # a state dict of the averaged weights
```
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from emacore._ema import ExponentialMovingAverage
from emacore.errors import StateDictError
from emacore.integrations import _callbacks
from emacore.schedules import Schedule

__all__ = ["EMACallback", "STAGES"]

STAGES = ("validate", "test", "predict")
"""The evaluation stages `EMACallback` can run with the averages swapped in."""

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_IMPLEMENTATIONS: dict[tuple[type, tuple[type, ...]], type] = {}


def _callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` classes to derive from.

    Those of the Lightning packages already imported (a Trainer takes instances of its own
    package's class only), or else that of the first one that imports.
    """
    imported = [getattr(sys.modules.get(name), "Callback", None) for name in _PACKAGES]
    loaded = tuple(base for base in imported if base is not None)
    if loaded:
        return loaded
    for name in _PACKAGES:
        with contextlib.suppress(ImportError):
            return (importlib.import_module(name).Callback,)
    raise ImportError(
        "EMACallback needs PyTorch Lightning: pip install lightning (or pytorch-lightning)"
    )


class EMACallback:
    """A Lightning callback that keeps an exponential moving average of the module's weights.

    The average is an `emacore.ExponentialMovingAverage` (`ema`) of the whole
    ``LightningModule``: its parameters by qualified name, with buffers and frozen parameters
    handled as its ``buffers`` and ``frozen`` options say. It is updated in
    ``on_train_batch_end`` after each optimizer step, i.e. whenever ``trainer.global_step``
    has advanced (once every ``accumulate_grad_batches`` batches). The first update makes the
    averages equal to the weights after the first step, as ``tf.train.ExponentialMovingAverage``
    and ``torch.optim.swa_utils.AveragedModel`` do; the decay schedule sees the number of
    updates, i.e. of optimizer steps.

    For the stages named in ``swap_for``, the averages are written into the module's own
    parameters when the stage starts and the trained values are written back when it ends,
    or when the Trainer stops on an exception. Before the first update there are no averages
    and the stage runs with the weights as they are.

    The EMA's state (`ExponentialMovingAverage.state_dict`: tensors and plain Python values,
    no pickled objects) is saved with every checkpoint, under this callback's ``state_key``,
    and loaded back by ``trainer.fit/validate/test/predict(..., ckpt_path=...)``: resumed
    training continues the same average. Checkpoints always hold the live weights under
    ``"state_dict"``, even when written while the averages are swapped in.

    Parameters
    ----------
    decay : float, Schedule, tuple or dict
        As for `emacore.ExponentialMovingAverage`: the decay, a schedule of the update
        count, or several decay profiles (the first one is swapped in).
    swap_for : str or iterable of str
        The stages that run with the averages: any of ``"validate"`` (validation inside
        ``fit`` and ``trainer.validate``), ``"test"`` and ``"predict"``; ``()`` for none.
    copy_at_end : bool
        Leave the averaged weights in the module when ``fit`` finishes (for export). A
        checkpoint written after that holds them as the module's weights.
    **ema_options
        Passed to `emacore.ExponentialMovingAverage` (``zero_debias``, ``name``,
        ``update_every``, ``nonfinite``, ``shadow_dtype``, ``device``, ``buffers``,
        ``include``/``exclude``...). ``name`` also keys the state in checkpoints: several
        `EMACallback` of one Trainer need distinct names (the Trainer refuses them otherwise).

    Raises
    ------
    ImportError
        Neither ``lightning`` nor ``pytorch_lightning`` is installed.
    ValueError
        ``swap_for`` names an unknown stage, or an option is invalid (as
        `emacore.ExponentialMovingAverage` checks them).

    Notes
    -----
    An instance is an instance of Lightning's ``Callback`` (a subclass made when the first
    callback is created), so the Trainer calls its hooks. It is tested in single-process runs;
    under a multi-process strategy each process would keep the average of its own replica,
    and sharded strategies (FSDP, DeepSpeed) are untested.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> EMACallback:
        """Make the instance one of Lightning's ``Callback`` too (Lightning imported here)."""
        bases = _callback_bases()
        impl = _IMPLEMENTATIONS.get((cls, bases))
        if impl is None:
            impl = type(cls.__name__, (cls, *bases), {"__qualname__": cls.__qualname__})
            impl.__module__ = cls.__module__
            _IMPLEMENTATIONS[(cls, bases)] = impl
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
        self._offload = ema_options.get("device") is not None
        self._swap_for = swap
        self._copy_at_end = copy_at_end
        self._last_step: int | None = None
        self._pending: Mapping[str, Any] | None = None
        self._has_averages = False
        self._swap: contextlib.ExitStack | None = None

    @property
    def ema(self) -> ExponentialMovingAverage:
        """The `emacore.ExponentialMovingAverage` of the module: read averages from it.

        ``callback.ema.average(model)`` is a state dict of the averaged weights;
        ``callback.ema.copy_to(model)`` writes them into the model.
        """
        self._load_pending(None)
        return self._ema

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: the class and the EMA's name."""
        return f"{type(self).__qualname__}[{self._ema.name}]"

    # -- the Trainer's hooks ---------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Load a state restored from a checkpoint onto the module's device."""
        self._load_pending(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Remember the optimizer step training starts from (restored when resuming)."""
        self._load_pending(pl_module)
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the averages if the optimizer stepped since the last update."""
        step = trainer.global_step  # counts optimizer steps, not batches
        if self._last_step is None:
            self._last_step = step
        if step > self._last_step:
            self._last_step = step
            self._ema.apply(pl_module)
            self._has_averages = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """With ``copy_at_end``, write the averages into the module."""
        if self._copy_at_end and self._has_averages:
            self._ema.copy_to(pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Swap the averages in (``"validate"`` in ``swap_for``)."""
        if "validate" in self._swap_for:
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Swap the trained weights back in."""
        self._swap_out()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Swap the averages in (``"test"`` in ``swap_for``)."""
        if "test" in self._swap_for:
            self._swap_in(pl_module)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Swap the trained weights back in."""
        self._swap_out()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """Swap the averages in (``"predict"`` in ``swap_for``)."""
        if "predict" in self._swap_for:
            self._swap_in(pl_module)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Swap the trained weights back in."""
        self._swap_out()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Put the trained weights back if the Trainer stops while the averages are in."""
        self._swap_out()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Put the trained weights back, whatever ended the stage."""
        self._swap_out()

    def state_dict(self) -> dict[str, Any]:
        """The callback's state for checkpoints: ``{"ema": ema.state_dict()}``."""
        state = self._pending if self._pending is not None else self._ema.state_dict()
        return {"ema": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the EMA state from a checkpoint, to load at the start of the next stage.

        It is loaded then, onto the module's device (or when `ema` is read, as it is).
        """
        state = state_dict.get("ema") if isinstance(state_dict, Mapping) else None
        if not isinstance(state, Mapping):
            raise StateDictError(
                "EMACallback state must be a dict with an 'ema' entry (the EMA's state dict), "
                f"got {type(state_dict).__qualname__} with keys {list(state_dict)[:5]}"
                if isinstance(state_dict, Mapping)
                else f"EMACallback state must be a dict, got {type(state_dict).__qualname__}"
            )
        self._pending = state

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Keep the live weights in the checkpoint when it is written with the averages in."""
        if self._swap is None:
            return
        self._swap_out()
        live = trainer.strategy.lightning_module_state_dict()
        # the tensors may share storage with the parameters, which get the averages back
        checkpoint["state_dict"] = {
            k: v.detach().clone() if hasattr(v, "detach") else v for k, v in live.items()
        }
        self._swap_in(pl_module)

    # -- internals -------------------------------------------------------------------------

    def _load_pending(self, pl_module: Any) -> None:
        if self._pending is None:
            return
        state = self._pending
        if pl_module is not None and not self._offload:
            # load_state_dict creates the shadows where the arrays it gets are: the next
            # apply() compares them with the module's parameters, wherever those were moved
            state = _to_device(state, pl_module.device)
        self._ema.load_state_dict(state)
        self._pending = None
        self._has_averages = bool(state.get("leaves") or state.get("copies"))

    def _swap_in(self, pl_module: Any) -> None:
        self._load_pending(pl_module)
        if self._swap is not None or not self._has_averages:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self._ema.swapped(pl_module))
        self._swap = stack

    def _swap_out(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.close()  # writes the trained values back

    def __repr__(self) -> str:
        return f"EMACallback({self._ema!r}, swap_for={sorted(self._swap_for)})"


def _to_device(tree: Any, device: Any) -> Any:
    """``tree`` with every tensor moved to ``device`` (dicts and lists rebuilt)."""
    if isinstance(tree, Mapping):
        return {k: _to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_device(v, device) for v in tree]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tree, torch.Tensor):
        return tree.to(device)
    return tree
