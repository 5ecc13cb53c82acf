"""The EMA state dict: its format, and the checks that loading one passes before anything changes.

A state dict is plain dicts, lists, numbers and strings plus the shadow arrays; nothing in it
needs pickle. Parsing is pure: it raises `emacore.errors.StateDictError` naming what is wrong,
and the EMA installs the result only once everything has been checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from emacore.errors import StateDictError

__all__ = ["STATE_FORMAT", "STATE_VERSION", "LoadResult", "parse_copies", "parse_leaves"]

STATE_FORMAT = "emacore.ExponentialMovingAverage"
STATE_VERSION = 1
# how a leaf is recognised at the next apply (DESIGN.md section 5)
_IDENTITY, _POSITION, _NAME = "identity", "position", "name"


class LoadResult(NamedTuple):
    """What ``load_state_dict(strict=False)`` did not match (as torch reports it)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def parse_leaves(
    state: Mapping[str, Any], zero_debias: bool, compat: str, profiles: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Check a state dict's header and leaves; return each leaf's record, typed.

    ``profiles`` names the EMA's decay profiles (``()`` for a single decay): the state dict
    must have the same, and each leaf record then holds every profile after the first under
    ``"profiles"`` (its shadow and decay counters).
    """
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise StateDictError(
            f"not an emacore EMA state dict (expected format {STATE_FORMAT!r}, got "
            f"{state.get('format') if isinstance(state, Mapping) else type(state)!r})"
        )
    if state.get("version") != STATE_VERSION:
        raise StateDictError(
            f"state dict version {state.get('version')!r} is not supported (expected "
            f"{STATE_VERSION})"
        )
    for key, mine in (("zero_debias", zero_debias), ("compat", compat)):
        if state.get(key) != mine:
            raise StateDictError(
                f"state dict was saved with {key}={state.get(key)!r}, this EMA has {key}={mine!r}"
            )
    saved = state.get("profiles", [])
    if not isinstance(saved, (list, tuple)) or list(saved) != list(profiles):
        raise StateDictError(
            f"state dict has decay profiles {saved!r}, this EMA has {list(profiles)}"
        )
    leaves = state.get("leaves")
    if not isinstance(leaves, Mapping):
        raise StateDictError("state dict has no 'leaves' mapping")
    out: dict[str, dict[str, Any]] = {}
    for nm, rec in leaves.items():
        if not isinstance(nm, str) or not isinstance(rec, Mapping):
            raise StateDictError(f"malformed leaf entry {nm!r}")
        try:
            parsed = {
                "shadow": rec["shadow"],
                "count": int(rec["count"]),
                "decay_product": float(rec["decay_product"]),
                "last_decay": float(rec["last_decay"]),
                "keyed_by": str(rec["keyed_by"]),
                "position": None if rec.get("position") is None else int(rec["position"]),
                "order": int(rec.get("order", len(out))),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise StateDictError(f"leaf {nm!r}: malformed entry ({exc})") from None
        if parsed["keyed_by"] not in (_IDENTITY, _POSITION, _NAME):
            raise StateDictError(f"leaf {nm!r}: unknown keyed_by {parsed['keyed_by']!r}")
        if parsed["count"] < 0 or not math.isfinite(parsed["decay_product"]):
            raise StateDictError(f"leaf {nm!r}: invalid counters {dict(rec)!r}")
        if not hasattr(parsed["shadow"], "shape"):
            raise StateDictError(f"leaf {nm!r}: shadow is not an array")
        parsed["profiles"] = _parse_profiles(nm, rec.get("profiles", {}), profiles[1:])
        out[nm] = parsed
    return out


def _parse_profiles(nm: str, recs: Any, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """A leaf's records of the profiles after the first, in ``names`` order."""
    if not isinstance(recs, Mapping) or set(recs) != set(names):
        got = sorted(recs) if isinstance(recs, Mapping) else recs
        raise StateDictError(f"leaf {nm!r}: profiles {got!r}, expected {list(names)}")
    out = []
    for name in names:
        rec = recs[name]
        try:
            parsed = {
                "shadow": rec["shadow"],
                "decay_product": float(rec["decay_product"]),
                "last_decay": float(rec["last_decay"]),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise StateDictError(f"leaf {nm!r}, profile {name!r}: malformed ({exc})") from None
        if not hasattr(parsed["shadow"], "shape") or not math.isfinite(parsed["decay_product"]):
            raise StateDictError(f"leaf {nm!r}, profile {name!r}: malformed entry")
        out.append(parsed)
    return out


def parse_copies(state: Mapping[str, Any]) -> dict[str, Any]:
    """The copied leaves (integer buffers, frozen parameters) of a state dict, by name."""
    copies = state.get("copies", {})
    if not isinstance(copies, Mapping) or not all(
        isinstance(k, str) and hasattr(v, "shape") for k, v in copies.items()
    ):
        raise StateDictError("state dict 'copies' must map leaf names to arrays")
    return dict(copies)
