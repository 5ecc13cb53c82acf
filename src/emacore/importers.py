"""Migrate from another EMA library: its state dict, as an emacore state dict.

Each importer maps a peer's saved state onto the format of
`emacore.ExponentialMovingAverage.state_dict`, so a training run can switch to emacore and
keep its averages::

    ema = emacore.ExponentialMovingAverage(emacore.schedules.TFRamp(0.999), buffers="skip")
    ema.load_state_dict(emacore.importers.from_torch_ema(torch_ema.state_dict(), model))
    ema.apply(model)  # continues where torch_ema stopped

or be written as a portable checkpoint with `emacore.save`. Nothing here imports torch: the
peers' tensors are taken as they are (not copied; loading copies them).

The imported state dict records the matching schedule's ``spec()`` (``"schedule"``), so a
checkpoint written from it says how to continue (`emacore.schedules.from_spec`).

The counters follow emacore's step convention: emacore's first ``apply`` is where the peer
was built (it copies the parameters, as every peer does), and the peer's k-th update is
emacore's update at step ``k``. After ``n`` peer updates the imported leaves therefore have
``count = n + 1``, ``last_decay`` the peer's latest decay and ``decay_product`` the product of
the decays emacore would have used over those ``n + 1`` applies. Those are exactly the
counters of an emacore EMA that followed the same run with the matching schedule, so a
schedule continues at the right step. The matching schedules:

* torch_ema with ``use_num_updates=True``: ``emacore.schedules.TFRamp(decay)``; without, the
  constant ``decay``;
* diffusers ``EMAModel``: `emacore.schedules.DiffusersRamp`, or `emacore.schedules.PowerWarmup`
  with ``use_ema_warmup`` (`diffusers_schedule` builds it from the state dict);
* timm ``ModelEmaV3``: ``PowerWarmup`` with ``use_warmup`` where its ``update`` was given the
  step; the constant ``decay`` where not.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from emacore._state_dict import _NAME, STATE_FORMAT, STATE_VERSION
from emacore.errors import DecayError, StateDictError
from emacore.schedules import (
    Constant,
    DiffusersRamp,
    PowerWarmup,
    Schedule,
    TFRamp,
    as_schedule,
    check_decay,
)

__all__ = ["diffusers_schedule", "from_diffusers", "from_timm", "from_torch_ema"]


def _state_dict(
    averaged: Mapping[str, Any],
    copies: Mapping[str, Any],
    updates: int,
    schedule: Schedule,
) -> dict[str, Any]:
    """An emacore state dict whose averaged leaves have the counters of ``updates`` updates."""
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
        raise StateDictError(f"the number of updates must be an integer >= 0, got {updates!r}")
    product, last = 1.0, 1.0
    for step in range(updates + 1):  # emacore's first apply (step 0), then the peer's updates
        last = check_decay(schedule(step), f"the decay at step {step}")
        product *= last  # one multiplication per step, in emacore's order: the same bits
    spec = getattr(schedule, "spec", None)
    leaves = {
        nm: {
            "shadow": x,
            "count": updates + 1,
            "decay_product": product,
            "last_decay": last,
            "keyed_by": _NAME,
            "position": None,
            "order": i,
        }
        for i, (nm, x) in enumerate(averaged.items())
    }
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "name": "ExponentialMovingAverage",
        "zero_debias": False,
        "compat": "default",
        "schedule": spec() if callable(spec) else repr(schedule),
        "leaves": leaves,
        "copies": dict(copies),
    }


def _names(model_or_names: Any, count: int, peer: str) -> tuple[list[str], set[str]]:
    """Parameter names (and those that do not require grad) for a peer's list of shadows."""
    frozen: set[str] = set()
    named = getattr(model_or_names, "named_parameters", None)
    if callable(named):
        names = []
        for nm, p in named():
            names.append(nm)
            if not getattr(p, "requires_grad", True):
                frozen.add(nm)
    elif isinstance(model_or_names, Sequence) and not isinstance(model_or_names, str):
        names = list(model_or_names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"names must be strings, got {names[:10]!r}")
    else:
        raise TypeError(
            "pass the model (anything with named_parameters()) or the list of parameter names, "
            f"got {type(model_or_names).__qualname__}"
        )
    if len(names) != count:
        raise StateDictError(
            f"the {peer} state holds {count} shadows but {len(names)} parameter names were "
            "given: pass the parameters the peer was built with, in the same order"
        )
    if len(set(names)) != len(names):
        raise StateDictError(f"parameter names repeat: {sorted(names)[:10]}")
    return names, frozen


def _require(state: Mapping[str, Any], keys: Sequence[str], peer: str) -> None:
    if not isinstance(state, Mapping):
        raise StateDictError(f"expected the {peer} state dict (a mapping), got {type(state)!r}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise StateDictError(f"not a {peer} state dict: it has no {missing}")
    shadows = state.get("shadow_params", [])
    if not isinstance(shadows, (list, tuple)) or not all(hasattr(s, "shape") for s in shadows):
        raise StateDictError(f"{peer} shadow_params must be a list of tensors")


def _is_floating(x: Any) -> bool:
    flag = getattr(x, "is_floating_point", None)
    if callable(flag):
        return bool(flag())
    return str(getattr(x, "dtype", "")).rsplit(".", 1)[-1].startswith(("float", "bfloat"))


def from_torch_ema(
    state: Mapping[str, Any], names: Any, *, updates: int | None = None
) -> dict[str, Any]:
    """Convert ``torch_ema.ExponentialMovingAverage.state_dict()`` to an emacore state dict.

    Parameters
    ----------
    state : dict
        ``{"decay", "num_updates", "shadow_params", "collected_params"}``.
        ``collected_params`` (the live values kept by ``store``) are not EMA state and are
        ignored.
    names : torch.nn.Module or sequence of str
        The model whose ``parameters()`` the peer was built with (its names are then those of
        ``named_parameters()``), or the names of the parameters given, in order.
    updates : int, optional
        The number of updates made, needed only when the peer did not count them
        (``use_num_updates=False``); default 0.

    Returns
    -------
    dict
        A state dict for ``ExponentialMovingAverage(TFRamp(decay), buffers="skip")`` (or the
        constant ``decay`` without ``num_updates``), which tracks parameters only, as
        torch_ema does. torch_ema averages every parameter it was given, frozen or not:
        create the EMA with ``frozen="average"`` to do the same.

    Raises
    ------
    StateDictError
        ``state`` is not torch_ema's, or ``names`` does not match its shadows.
    """
    _require(state, ("decay", "num_updates", "shadow_params"), "torch_ema")
    decay = check_decay(state["decay"], "torch_ema decay")
    shadows = list(state["shadow_params"])
    param_names, _ = _names(names, len(shadows), "torch_ema")
    n = state["num_updates"]
    by_name = dict(zip(param_names, shadows))
    if n is None:
        return _state_dict(by_name, {}, updates or 0, Constant(decay))
    # torch_ema's k-th update uses min(decay, (1 + k) / (10 + k)): TFRamp at emacore's step k
    return _state_dict(by_name, {}, n, TFRamp(decay))


def diffusers_schedule(state: Mapping[str, Any]) -> Schedule:
    """The schedule of diffusers' ``EMAModel.get_decay``, from its state dict.

    `emacore.schedules.PowerWarmup` with ``use_ema_warmup``, else
    `emacore.schedules.DiffusersRamp`, with the state's ``decay``, ``min_decay``,
    ``update_after_step`` (and ``inv_gamma``, ``power``). Called with emacore's step it gives
    ``get_decay``'s numbers bit for bit: the schedule that continues a run imported by
    `from_diffusers`.

    Raises
    ------
    StateDictError
        ``state`` is not diffusers', or its parameters are out of range.

    Examples
    --------
    >>> diffusers_schedule({"decay": 0.999, "min_decay": 0.0, "update_after_step": 0,
    ...                     "use_ema_warmup": False, "inv_gamma": 1.0, "power": 2 / 3})
    DiffusersRamp(decay=0.999, min_decay=0.0, update_after_step=0)
    """
    _require(
        state,
        ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power"),
        "diffusers EMAModel",
    )
    common = {k: state[k] for k in ("decay", "min_decay", "update_after_step")}
    try:
        if state["use_ema_warmup"]:
            return PowerWarmup(**common, inv_gamma=state["inv_gamma"], power=state["power"])
        return DiffusersRamp(**common)
    except (DecayError, ValueError, TypeError) as exc:
        raise StateDictError(f"diffusers EMAModel state has invalid parameters: {exc}") from None


def from_diffusers(state: Mapping[str, Any], names: Any) -> dict[str, Any]:
    """Convert diffusers' ``EMAModel.state_dict()`` to an emacore state dict.

    Parameters
    ----------
    state : dict
        ``{"decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup",
        "inv_gamma", "power", "shadow_params"}``.
    names : torch.nn.Module or sequence of str
        The model whose ``parameters()`` the peer was built with, or the parameters' names in
        order. With a model, parameters that do not require grad become copies (diffusers
        copies them at every step, as emacore's default ``frozen="copy"`` does); with names,
        every shadow is an average.

    Returns
    -------
    dict
        A state dict for ``ExponentialMovingAverage(diffusers_schedule(state),
        buffers="skip")``.

    Raises
    ------
    StateDictError
        ``state`` is not diffusers', or ``names`` does not match its shadows.
    """
    _require(state, ("optimization_step", "shadow_params"), "diffusers EMAModel")
    schedule = diffusers_schedule(state)
    shadows = list(state["shadow_params"])
    param_names, frozen = _names(names, len(shadows), "diffusers EMAModel")
    by_name = dict(zip(param_names, shadows))
    averaged = {nm: x for nm, x in by_name.items() if nm not in frozen}
    copies = {nm: x for nm, x in by_name.items() if nm in frozen}
    return _state_dict(averaged, copies, int(state["optimization_step"]), schedule)


def from_timm(
    state: Mapping[str, Any],
    *,
    decay: float | Schedule,
    updates: int = 0,
    copies: Collection[str] = (),
) -> dict[str, Any]:
    """Convert the state dict of timm's ``ModelEmaV3`` (its averaged module) to emacore's.

    Parameters
    ----------
    state : dict
        ``model_ema.module.state_dict()`` (what timm's checkpoint saver writes), or
        ``model_ema.state_dict()``, whose keys start with ``"module."`` (stripped).
    decay : float or Schedule
        timm stores no decay: the one the run used, a constant or a schedule of emacore's
        step (with timm's ``use_warmup``, `emacore.schedules.PowerWarmup` with its
        ``decay``, ``min_decay``, ``update_after_step``, ``inv_gamma=warmup_gamma`` and
        ``power=warmup_power``). It sets the counters.
    updates : int
        The number of ``update`` calls made (timm does not count them); default 0.
    copies : collection of str
        Floating entries timm copied rather than averaged: its buffers when built with
        ``exclude_buffers=True`` (``[n for n, _ in model.named_buffers()]``). Integer entries
        (``num_batches_tracked``) are always copies.

    Returns
    -------
    dict
        A state dict for ``ExponentialMovingAverage(decay, buffers="average")``, or
        ``buffers="copy"`` with ``exclude_buffers``.

    Raises
    ------
    StateDictError
        ``state`` is not a mapping of names to tensors, or ``copies`` names unknown entries.
    """
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and hasattr(v, "shape") for k, v in state.items()
    ):
        raise StateDictError("expected timm's EMA module state_dict: a mapping of names to tensors")
    entries = dict(state)
    if entries and all(k.startswith("module.") for k in entries):
        entries = {k[len("module.") :]: v for k, v in entries.items()}
    unknown = sorted(set(copies) - set(entries))
    if unknown:
        raise StateDictError(f"copies names entries the state dict does not have: {unknown[:10]}")
    averaged = {k: v for k, v in entries.items() if _is_floating(v) and k not in copies}
    copied = {k: v for k, v in entries.items() if k not in averaged}
    return _state_dict(averaged, copied, updates, as_schedule(decay))
