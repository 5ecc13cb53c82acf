"""The EMA state dict: its format, and the checks that loading one passes before anything changes.

A state dict is plain dicts, lists, numbers and strings plus the shadow arrays; nothing in it
needs pickle. Parsing is pure: it raises `emacore.errors.StateDictError` naming what is wrong,
and the EMA installs the result only once everything has been checked.

One validation serves every way in: `check_state` checks each field that is not an array
(the header, every leaf's counters, keys and profiles) and is what a file's metadata passes
(`emacore.checkpoint`, before any array is read) as well as an in-memory state dict
(`parse_leaves`, for `ExponentialMovingAverage.load_state_dict`, which orbax's ``load_into``
ends in). Arrays are checked by each path: an in-memory state holds arrays, a file's
metadata references to them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

from emacore._debias import COMPAT_MODES
from emacore._precision import dtype_label
from emacore.errors import StateDictError

__all__ = [
    "MAX_INT",
    "STATE_FORMAT",
    "STATE_VERSION",
    "LoadResult",
    "check_options",
    "check_record",
    "check_state",
    "parse_copies",
    "parse_leaves",
]

STATE_FORMAT = "emacore.ExponentialMovingAverage"
STATE_VERSION = 1
# how a leaf is recognised at the next apply (DESIGN.md section 5)
_IDENTITY, _POSITION, _NAME = "identity", "position", "name"
_KEYED_BY = (_IDENTITY, _POSITION, _NAME)
# Counters are int64 wherever an array library keeps them (a traceable state, torch's and
# JAX's own EMA states); a larger one is no count of updates, and would overflow the float
# arithmetic of the debias later (``float(10**400)`` raises OverflowError).
MAX_INT = 2**63 - 1
# the fields of a leaf record, and of one of its further decay profiles
_REQUIRED = ("shadow", "count", "decay_product", "last_decay", "keyed_by")
_LEAF_FIELDS = (*_REQUIRED, "position", "order", "profiles")
_PROFILE_FIELDS = ("shadow", "decay_product", "last_decay")


class LoadResult(NamedTuple):
    """What ``load_state_dict(strict=False)`` did not match (as torch reports it)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _shown(value: Any) -> str:
    """``repr(value)``, short: a huge int's repr is long, and past 4300 digits it raises."""
    try:
        text = repr(value)
    except ValueError:  # int too large to convert to str
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 100 else f"{text[:100]}..."


def _integer(value: Any, what: str, *, nullable: bool = False) -> int | None:
    """``value`` as an int in [0, MAX_INT] (None too, if ``nullable``), or StateDictError.

    Python and numpy integers count; a bool, a float (even 3.0), a string or an array does
    not: those are a malformed state, never something to convert.
    """
    if value is None and nullable:
        return None
    if not isinstance(value, bool) and isinstance(value, numbers.Integral):
        number = int(value)
        if 0 <= number <= MAX_INT:
            return number
    expected = "null or an integer" if nullable else "an integer"  # (null: None, as in JSON)
    raise StateDictError(f"{what} must be {expected} >= 0 (at most 2**63 - 1), got {_shown(value)}")


def _fraction(value: Any, what: str) -> float:
    """``value`` as a Python float in [0, 1], or StateDictError (NaN, inf, bool, str...)."""
    if not isinstance(value, bool) and isinstance(value, numbers.Real):
        try:
            number = float(value)
        except (OverflowError, TypeError, ValueError):
            number = math.nan
        if 0.0 <= number <= 1.0:  # False for NaN
            return number
    raise StateDictError(f"{what} must be a number in [0, 1], got {_shown(value)}")


def _fields(rec: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k) for k in rec if k not in allowed)
    if unknown:
        raise StateDictError(f"{where}: unknown fields {unknown[:10]} (a record has {allowed})")


def check_record(nm: str, rec: Any) -> dict[str, Any]:
    """Check one leaf record's fields except its arrays; return it typed.

    The counters come back as Python numbers (``count`` an int, the decay product and the
    latest decay floats), ``position`` defaults to None, and each further profile's record
    is checked the same way. The arrays (``shadow``, each profile's ``shadow``) are returned
    as they are: an in-memory state holds arrays there, a file's metadata references.

    Raises
    ------
    StateDictError
        Naming the leaf and the field: a field missing or unknown, ``count`` not an integer
        in [0, 2**63 - 1], a decay product or latest decay not a number in [0, 1] (NaN,
        infinite, a bool or a string included), ``keyed_by`` not one of
        ``("identity", "position", "name")``, ``position`` or ``order`` not None or such an
        integer, ``profiles`` not a mapping of profile names to records.
    """
    where = f"leaf {nm!r}"
    if not isinstance(nm, str) or not isinstance(rec, Mapping):
        raise StateDictError(
            f"malformed leaf entry {_shown(nm)}: leaves map names (str) to records (mappings), "
            f"got a {type(rec).__qualname__}"
        )
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        raise StateDictError(f"{where}: the record has no {missing} (it needs {_REQUIRED})")
    out = dict(rec)
    out["count"] = _integer(rec["count"], f"{where}: count")
    for key in ("decay_product", "last_decay"):
        out[key] = _fraction(rec[key], f"{where}: {key}")
    if not isinstance(rec["keyed_by"], str) or rec["keyed_by"] not in _KEYED_BY:
        raise StateDictError(
            f"{where}: keyed_by must be one of {_KEYED_BY}, got {_shown(rec['keyed_by'])}"
        )
    out["position"] = _integer(rec.get("position"), f"{where}: position", nullable=True)
    if "order" in rec:
        out["order"] = _integer(rec["order"], f"{where}: order", nullable=True)
    if "profiles" in rec:
        profiles = rec["profiles"]
        if not isinstance(profiles, Mapping) or not all(isinstance(k, str) for k in profiles):
            raise StateDictError(
                f"{where}: profiles must be an object, got {_shown(profiles)} (a mapping of "
                "profile names to records)"
            )
        out["profiles"] = {
            name: _check_profile(f"{where}: profile {name!r}", prof)
            for name, prof in profiles.items()
        }
    _fields(rec, _LEAF_FIELDS, where)  # last: a known field's own error names it first
    return out


def _check_profile(where: str, rec: Any) -> dict[str, Any]:
    if not isinstance(rec, Mapping):
        raise StateDictError(f"{where}: a profile's record is a mapping, got {_shown(rec)}")
    missing = [k for k in _PROFILE_FIELDS if k not in rec]
    if missing:
        raise StateDictError(f"{where}: the record has no {missing} (it needs {_PROFILE_FIELDS})")
    out = dict(rec)
    for key in ("decay_product", "last_decay"):
        out[key] = _fraction(rec[key], f"{where}: {key}")
    _fields(rec, _PROFILE_FIELDS, where)
    return out


def check_state(state: Any) -> dict[str, dict[str, Any]]:
    """Check every field of a state dict that is not an array; return its leaves' records.

    The one validation of a state's header and counters, whatever it came from: a file's
    metadata (`emacore.checkpoint`, arrays as references) or memory (`parse_leaves`).

    Returns
    -------
    dict
        Each leaf's record, checked and typed by `check_record`, in the state's order.

    Raises
    ------
    StateDictError
        Naming the field: ``format`` not emacore's; ``version`` not the int 1 (absent: 1);
        ``zero_debias`` not a bool; ``compat`` not one of ``("default", "tensorflow")``;
        ``profiles`` not a list of distinct names; ``calls`` not an integer in
        [0, 2**63 - 1]; ``leaves`` or ``copies`` not mappings keyed by name; a name both
        averaged and copied; a leaf record as `check_record` refuses it, or whose further
        profiles are not those the state names after its first.
    """
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        got = state.get("format") if isinstance(state, Mapping) else type(state)
        raise StateDictError(
            f"not an emacore EMA state dict (expected format {STATE_FORMAT!r}, got {_shown(got)})"
        )
    # absent from hand-made state dicts (that `emacore.save` writes): the first version
    version = state.get("version", STATE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version != STATE_VERSION:
        raise StateDictError(
            f"the state dict's version {_shown(version)} is not supported (this emacore reads "
            f"version {STATE_VERSION})"
        )
    if not isinstance(state.get("zero_debias"), bool):
        raise StateDictError(
            f"'zero_debias' must be True or False, got {_shown(state.get('zero_debias'))}"
        )
    compat = state.get("compat")
    if not isinstance(compat, str) or compat not in COMPAT_MODES:
        raise StateDictError(f"'compat' must be one of {COMPAT_MODES}, got {_shown(compat)}")
    profiles = state.get("profiles", [])
    if (
        not isinstance(profiles, (list, tuple))
        or not all(isinstance(p, str) for p in profiles)
        or len(set(profiles)) != len(profiles)
    ):
        raise StateDictError(
            f"'profiles' must be a list of distinct profile names, got {_shown(profiles)}"
        )
    _integer(state.get("calls", 0), "'calls' (apply calls so far)")
    leaves, copies = state.get("leaves"), state.get("copies", {})
    if not isinstance(leaves, Mapping):
        raise StateDictError(f"state dict has no 'leaves' mapping (got {_shown(leaves)})")
    if not isinstance(copies, Mapping) or not all(isinstance(k, str) for k in copies):
        raise StateDictError("state dict 'copies' must map leaf names to arrays")
    both = sorted(str(k) for k in set(leaves) & set(copies))
    if both:
        raise StateDictError(f"leaves {both[:10]} are both averaged and copied")
    others = set(profiles[1:])
    out: dict[str, dict[str, Any]] = {}
    for nm, rec in leaves.items():
        parsed = check_record(nm, rec)
        got = parsed.get("profiles", {})
        if set(got) != others:
            raise StateDictError(
                f"leaf {nm!r}: profiles {sorted(got)}, expected {sorted(others)} (the state's "
                f"profiles {list(profiles)} after the first)"
            )
        out[nm] = parsed
    return out


def check_options(
    state: Mapping[str, Any], zero_debias: bool, compat: str, profiles: tuple[str, ...] = ()
) -> None:
    """Raise StateDictError unless a state (checked by `check_state`) fits an EMA's options.

    ``zero_debias``, ``compat`` and ``profiles`` (the EMA's decay profiles, ``()`` for a
    single decay) must be the state's: the shadows and counters mean something else under
    other ones.
    """
    for key, mine in (("zero_debias", zero_debias), ("compat", compat)):
        if state[key] != mine:
            raise StateDictError(
                f"state dict was saved with {key}={state[key]!r}, this EMA has {key}={mine!r}"
            )
    saved = state.get("profiles", [])
    if list(saved) != list(profiles):
        raise StateDictError(
            f"state dict has decay profiles {list(saved)!r}, this EMA has {list(profiles)}"
        )


def _array(x: Any, where: str) -> tuple[tuple[int, ...], str]:
    """The shape and dtype name of a floating array, or StateDictError."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise StateDictError(f"{where} is not an array (got a {type(x).__qualname__})")
    dtype = dtype_label(x.dtype)
    if "float" not in dtype:  # float16/32/64, bfloat16 (not complex, integer or bool)
        raise StateDictError(f"{where} has dtype {dtype}; a shadow is a real floating-point array")
    return tuple(x.shape), dtype


def parse_leaves(
    state: Mapping[str, Any], zero_debias: bool, compat: str, profiles: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Check an in-memory state dict against an EMA; return each leaf's record, typed.

    `check_state`, then what depends on the EMA and the arrays: ``zero_debias``, ``compat``
    and ``profiles`` (the EMA's decay profiles, ``()`` for a single decay) must be the EMA's,
    every shadow a floating array, and each further profile's shadow of the first one's
    shape and dtype. Each record then holds the profiles after the first as a list, in
    ``profiles`` order, under ``"profiles"`` (their shadows and decay counters), and its
    ``order`` (the state's order where it has none).
    """
    leaves = check_state(state)
    check_options(state, zero_debias, compat, profiles)
    out: dict[str, dict[str, Any]] = {}
    for i, (nm, rec) in enumerate(leaves.items()):
        shape, dtype = _array(rec["shadow"], f"leaf {nm!r}: shadow")
        more = []
        for name in profiles[1:]:
            prof = rec["profiles"][name]
            where = f"leaf {nm!r}: profile {name!r}: shadow"
            got = _array(prof["shadow"], where)
            if got != (shape, dtype):
                raise StateDictError(
                    f"{where} is {got[1]}{list(got[0])}, the leaf's shadow {dtype}{list(shape)}"
                )
            more.append(prof)
        order = rec.get("order")
        out[nm] = {**rec, "order": i if order is None else order, "profiles": more}
    return out


def parse_copies(state: Mapping[str, Any]) -> dict[str, Any]:
    """The copied leaves (integer buffers, frozen parameters) of a state dict, by name.

    Call it after `parse_leaves` (which checked that ``copies`` is a mapping by name).
    """
    copies = state.get("copies", {})
    for nm, x in copies.items():
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise StateDictError(
                f"copied leaf {nm!r} is not an array (got a {type(x).__qualname__}): state "
                "dict 'copies' must map leaf names to arrays"
            )
    return dict(copies)
