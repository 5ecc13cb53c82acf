"""Malformed state dicts, field by field: `load_state_dict` refuses each one the way a checkpoint
file is refused, naming the field, and changes nothing.

Every field of the state dict (header, each leaf's counters and keys, its further decay
profiles, its shadows, the copies) is made wrong in each way a checkpoint file can be wrong:
a wrong type, a bool for an int, a negative, non-integral or huge int, NaN or infinity, a
decay out of [0, 1], a missing or unknown key, a shadow of the wrong shape or dtype. Each is
loaded into a fresh EMA and into one that tracks the same leaves already; the error must be a
`StateDictError` naming the field, and the EMA's state dict must be what it was, bit for bit.
The same edits written into a checkpoint file must be refused by `emacore.load_into` alike
(one validation for both paths).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emacore

PROFILES = {"fast": 0.5, "slow": 0.9}
W, B = ((2, 3), "float32"), ((), "float64")  # the two averaged leaves: shape, dtype


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()  # a mutation's value: remove the key


@dataclass(frozen=True)
class Make:
    """A mutation's value: this numpy array, made in the backend under test."""

    value: np.ndarray

    def __repr__(self) -> str:
        return f"{self.value.dtype}{list(self.value.shape)}"


@dataclass(frozen=True)
class Case:
    """Set ``path`` (keys from the state dict's root) to ``value`` (or apply ``edit``)."""

    id: str
    path: tuple[Any, ...]
    value: Any
    match: str
    profiled: bool = False  # an EMA with the decay profiles PROFILES
    tracked_only: bool = False  # wrong only relative to shadows tracked already
    edit: Callable[[dict[str, Any]], Any] | None = None  # replaces the whole state
    # in a file, where arrays are references, the message may differ: it names the field too
    names: str | None = None
    in_file: bool = True  # False: the edit drops a stored array, which a file refuses as such

    def in_json(self) -> bool:
        """Whether the edit can be written into a checkpoint's JSON metadata."""
        if self.edit is not None or isinstance(self.value, Make) or not self.in_file:
            return False

        def plain(v: Any) -> bool:
            if v is DELETE or v is None or isinstance(v, (bool, str)):
                return True
            if type(v) is int:
                return abs(v) < 10**4000  # Python's JSON reader stops at 4300 digits
            if type(v) is float:
                return math.isfinite(v)  # NaN and infinity are no JSON
            if isinstance(v, list):
                return all(plain(x) for x in v)
            if isinstance(v, dict):
                return all(isinstance(k, str) and plain(x) for k, x in v.items())
            return False

        return plain(self.value)


def _label(value: Any) -> str:
    if type(value) is int and abs(value) > 2**64:
        return f"~2**{value.bit_length()}"  # (the repr of 10**5000 raises)
    return repr(value)[:40]


def _leaf(field: str, value: Any, match: str, **kw: Any) -> Case:
    return Case(f"w.{field}={_label(value)}", ("leaves", "w", field), value, match, **kw)


def _profile(field: str, value: Any, match: str, **kw: Any) -> Case:
    path = ("leaves", "w", "profiles", "slow", field)
    return Case(f"w.slow.{field}={_label(value)}", path, value, match, profiled=True, **kw)


def _top(field: str, value: Any, match: str, **kw: Any) -> Case:
    return Case(f"{field}={_label(value)}", (field,), value, match, **kw)


HUGE = 10**400  # an int no counter is (float(HUGE) raises OverflowError)
GIANT = 10**5000  # its repr alone raises ValueError (past Python's 4300 digits)

_COUNT = r"leaf 'w': count must be an integer >= 0"
_POS = r"leaf 'w': position must be"
_ORDER = r"leaf 'w': order must be"
_KEYED = r"leaf 'w': keyed_by must be one of"
_W, _SLOW = "leaf 'w'", "leaf 'w': profile 'slow'"
_W_SHADOW = r"leaf 'w'.*\bshadow\b"
_CALLS = r"'calls' \(apply calls so far\) must be an integer >= 0"


def _names(where: str, field: str) -> str:
    """A message naming the field, as the file reader's and load_state_dict's both do."""
    return rf"{where}.*\b{field}\b"


def _fraction_cases(make: Callable[..., Case], field: str, where: str) -> list[Case]:
    match = rf"{where}: {field} must be a number in \[0, 1\]"
    values = [5.0, -0.5, 1.0000001, math.nan, math.inf, -math.inf, True, False, "0.5", None]
    values += [[0.5], np.array(0.5)]
    return [
        *[make(field, v, match) for v in values],
        make(field, HUGE, match),
        make(
            field, DELETE, rf"{where}: the record has no \['{field}'\]", names=_names(where, field)
        ),
    ]


CASES: list[Case] = [
    # -- the header --
    Case("not-a-mapping", (), None, "not an emacore EMA state dict", edit=lambda s: [s]),
    _top("format", "emacore.Other", "not an emacore EMA state dict", names="format"),
    _top("format", DELETE, "not an emacore EMA state dict", names="format"),
    _top("version", 2, "version 2 is not supported"),
    _top("version", True, "version True is not supported"),
    _top("version", "1", "version '1' is not supported"),
    _top("version", 1.0, r"version 1\.0 is not supported"),
    _top("zero_debias", 0, "'zero_debias' must be"),
    _top("zero_debias", "False", "'zero_debias' must be"),
    _top("zero_debias", None, "'zero_debias' must be"),
    _top("zero_debias", DELETE, "'zero_debias' must be"),
    _top("zero_debias", True, "saved with zero_debias=True, this EMA has zero_debias=False"),
    _top("compat", "tf", "'compat' must be one of"),
    _top("compat", None, "'compat' must be one of"),
    _top("compat", ["default"], "'compat' must be one of"),
    _top("compat", DELETE, "'compat' must be one of"),
    _top("compat", "tensorflow", "saved with compat='tensorflow', this EMA has compat='default'"),
    _top("profiles", ["fast"], r"profiles"),
    _top("profiles", "fast", r"'profiles' must be a list"),
    _top("profiles", [1], r"'profiles' must be a list"),
    Case("profiles-twice", ("profiles",), ["slow", "slow"], "distinct", profiled=True),
    Case("profiles-reordered", ("profiles",), ["slow", "fast"], "profiles", profiled=True),
    Case("profiles-missing", ("profiles",), DELETE, "profiles", profiled=True),
    _top("calls", -1, _CALLS),
    _top("calls", True, _CALLS),
    _top("calls", 2.5, _CALLS),
    _top("calls", 3.0, _CALLS),
    _top("calls", "3", _CALLS),
    _top("calls", None, _CALLS),
    _top("calls", 2**63, _CALLS),
    _top("calls", HUGE, _CALLS),
    _top("leaves", DELETE, "no 'leaves' mapping", names="'leaves'"),
    _top("leaves", [], "no 'leaves' mapping", names="'leaves'"),
    Case(
        "leaf-name-not-str",
        ("leaves",),
        None,
        "malformed leaf entry 1",
        edit=lambda s: {**s, "leaves": {1 if k == "w" else k: v for k, v in s["leaves"].items()}},
    ),
    Case(
        "leaf-record-not-a-mapping",
        ("leaves", "w"),
        "record",
        "malformed leaf entry 'w'",
        names=r"leaf\b.*'w'",
    ),
    _top("copies", [], "'copies' must map leaf names to arrays", names="'copies'"),
    Case(
        "copy-name-not-str",
        ("copies",),
        None,
        "'copies' must map",
        edit=lambda s: {**s, "copies": {1: next(iter(s["copies"].values()))}},
    ),
    Case("copy-not-an-array", ("copies", "steps"), [0, 1, 2], "copied leaf 'steps' is not an"),
    Case(
        "averaged-and-copied",
        ("copies", "w"),
        Make(np.zeros((2, 3), np.float32)),
        r"leaves \['w'\] are both averaged and copied",
    ),
    # -- a leaf's counters and keys --
    *[_leaf("count", v, _COUNT) for v in (-1, True, False, 2.7, 3.0, "3", None, [3])],
    *[_leaf("count", v, _COUNT) for v in (2**63, HUGE, GIANT, math.nan, np.array(3))],
    _leaf("count", DELETE, r"leaf 'w': the record has no \['count'\]", names=_names(_W, "count")),
    *_fraction_cases(_leaf, "decay_product", "leaf 'w'"),
    *_fraction_cases(_leaf, "last_decay", "leaf 'w'"),
    *[_leaf("keyed_by", v, _KEYED) for v in ("bogus", None, 1, ["name"], True)],
    _leaf(
        "keyed_by",
        DELETE,
        r"leaf 'w': the record has no \['keyed_by'\]",
        names=_names(_W, "keyed_by"),
    ),
    *[_leaf("position", v, _POS) for v in (-1, True, 1.5, 2.0, "0", HUGE, 2**63)],
    *[_leaf("order", v, _ORDER) for v in (-1, False, 2.5, "0", HUGE, 2**64)],
    _leaf("counts", 3, r"leaf 'w': unknown fields \['counts'\]"),
    _leaf("profiles", {"slow": {}}, "leaf 'w': profile 'slow': the record has no", names=_SLOW),
    # -- a leaf's shadow --
    _leaf("shadow", DELETE, r"leaf 'w': the record has no \['shadow'\]", names=_W_SHADOW),
    _leaf("shadow", [[0.0] * 3] * 2, "leaf 'w': shadow is not an array", names=_W_SHADOW),
    _leaf("shadow", None, "leaf 'w': shadow is not an array", names=_W_SHADOW),
    _leaf("shadow", Make(np.zeros((2, 3), np.int32)), "leaf 'w': shadow has dtype int32"),
    _leaf("shadow", Make(np.zeros((2, 3), np.int64)), "leaf 'w': shadow has dtype int64"),
    _leaf("shadow", Make(np.zeros((2, 3), bool)), "leaf 'w': shadow has dtype bool"),
    _leaf(
        "shadow",
        Make(np.zeros((3, 2), np.float32)),
        "leaf 'w': state dict shadow shape",
        tracked_only=True,
    ),
    _leaf(
        "shadow",
        Make(np.zeros((2, 3), np.float64)),
        "leaf 'w': state dict shadow dtype",
        tracked_only=True,
    ),
    # -- a leaf's further decay profiles --
    Case(
        "w.profiles-missing",
        ("leaves", "w", "profiles"),
        DELETE,
        r"leaf 'w': profiles \[\], expected \['slow'\]",
        profiled=True,
        in_file=False,
    ),
    Case(
        "w.profiles-empty",
        ("leaves", "w", "profiles"),
        {},
        r"leaf 'w': profiles \[\], expected \['slow'\]",
        profiled=True,
        in_file=False,
    ),
    Case(
        "w.profiles-not-a-mapping",
        ("leaves", "w", "profiles"),
        "slow",
        "leaf 'w': profiles must be an object, got",
        profiled=True,
    ),
    Case(
        "w.profiles-extra",
        ("leaves", "w", "profiles", "extra"),
        {},
        "leaf 'w': profile 'extra': the record has no",
        profiled=True,
        names="leaf 'w': profile 'extra'",
    ),
    Case(
        "w.slow-not-a-mapping",
        ("leaves", "w", "profiles", "slow"),
        0.9,
        "leaf 'w': profile 'slow': a profile's record is a mapping",
        profiled=True,
        in_file=False,
    ),
    *_fraction_cases(_profile, "decay_product", "leaf 'w': profile 'slow'"),
    *_fraction_cases(_profile, "last_decay", "leaf 'w': profile 'slow'"),
    _profile("count", 3, r"leaf 'w': profile 'slow': unknown fields \['count'\]"),
    _profile(
        "shadow",
        DELETE,
        r"leaf 'w': profile 'slow': the record has no \['shadow'\]",
        in_file=False,
    ),
    _profile(
        "shadow",
        [[0.0] * 3] * 2,
        "leaf 'w': profile 'slow': shadow is not an array",
        in_file=False,
    ),
    _profile(
        "shadow",
        Make(np.zeros((2, 3), np.int32)),
        "leaf 'w': profile 'slow': shadow has dtype int32",
    ),
    _profile(
        "shadow",
        Make(np.zeros((3, 2), np.float32)),
        r"leaf 'w': profile 'slow': shadow is float32\[3, 2\], the leaf's shadow "
        r"float32\[2, 3\]",
    ),
    _profile(
        "shadow",
        Make(np.zeros((2, 3), np.float64)),
        r"leaf 'w': profile 'slow': shadow is float64\[2, 3\], the leaf's shadow "
        r"float32\[2, 3\]",
    ),
]


def _params(lib: Any, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        nm: lib.make(rng.standard_normal(shape).astype(dtype))
        for nm, (shape, dtype) in (("w", W), ("b", B))
    }


def _make(profiled: bool) -> emacore.EMA:
    return emacore.EMA(PROFILES if profiled else 0.9)


def _source(lib: Any, profiled: bool, seed: int, steps: int) -> dict[str, Any]:
    """A valid state dict: two averaged leaves after ``steps`` applies, and an int64 copy."""
    ema = _make(profiled)
    for k in range(steps):
        ema.apply(_params(lib, seed + k))
    state = ema.state_dict()
    state["copies"] = {"steps": lib.make(np.arange(3, dtype=np.int64) + seed)}
    return state


def _target(lib: Any, profiled: bool, tracked: bool) -> emacore.EMA:
    """A fresh EMA, or one tracking the source's leaves with other values and counters."""
    ema = _make(profiled)
    if tracked:
        ema.load_state_dict(_source(lib, profiled, seed=100, steps=2))
    return ema


def _copy(x: Any) -> Any:
    """The containers of a state dict copied; its arrays (never written to) shared."""
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


def _mutated(case: Case, state: dict[str, Any], make: Callable[[np.ndarray], Any]) -> Any:
    state = _copy(state)
    if case.edit is not None:
        return case.edit(state)
    parent = state
    for key in case.path[:-1]:
        parent = parent[key]
    if case.value is DELETE:
        del parent[case.path[-1]]
    else:
        parent[case.path[-1]] = (
            make(case.value.value) if isinstance(case.value, Make) else (case.value)
        )
    return state


def _frozen(lib: Any, x: Any) -> Any:
    """A state dict as plain values: each array as its dtype, shape and bytes."""
    if isinstance(x, dict):
        return {k: _frozen(lib, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_frozen(lib, v) for v in x]
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        host = lib.read(x)
        return ("array", str(x.dtype).rsplit(".", 1)[-1], tuple(host.shape), host.tobytes())
    return x


def _params_for(cases: list[Case]) -> list[Any]:
    out = []
    for case in cases:
        for tracked in (False, True):
            if case.tracked_only and not tracked:
                continue  # a fresh EMA takes any shape and dtype: nothing to be wrong against
            target = "tracked" if tracked else "fresh"
            out.append(pytest.param(case, tracked, id=f"{target}-{case.id}"))
    return out


def test_the_cases_are_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("profiled", [False, True])
@pytest.mark.parametrize("tracked", [False, True])
def test_the_unchanged_state_loads(lib: Any, profiled: bool, tracked: bool) -> None:
    """The control: the state every case edits loads, and gives the source's averages (as
    float64 math on the same values says), so each refusal below is the edit's doing."""
    state = _source(lib, profiled, seed=0, steps=4)
    ema = _target(lib, profiled, tracked)
    assert ema.load_state_dict(_copy(state)) == emacore.LoadResult([], [])
    params = _params(lib, 0)
    decays = [0.9] if not profiled else list(PROFILES.values())
    for k, decay in enumerate(decays):
        view = ema if not profiled else ema.profile(list(PROFILES)[k])
        for nm, (_, dtype) in (("w", W), ("b", B)):
            xs = [lib.read(_params(lib, s)[nm]).astype(np.float64) for s in range(4)]
            want = xs[0]
            for x in xs[1:]:
                want = decay * want + (1.0 - decay) * x
            tol = 1e-6 if dtype == "float32" else 1e-12
            got = lib.read(view.average(params)[nm])
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=nm)
    assert ema.state_dict()["leaves"]["w"]["count"] == 4
    np.testing.assert_array_equal(lib.read(ema.state_dict()["copies"]["steps"]), [0, 1, 2])


@pytest.mark.parametrize(("case", "tracked"), _params_for(CASES))
def test_a_malformed_state_dict_is_refused_and_changes_nothing(
    lib: Any, case: Case, tracked: bool
) -> None:
    state = _mutated(case, _source(lib, case.profiled, seed=0, steps=4), lib.make)
    ema = _target(lib, case.profiled, tracked)
    before = _frozen(lib, ema.state_dict())
    with pytest.raises(emacore.StateDictError, match=case.match):
        ema.load_state_dict(state)
    assert _frozen(lib, ema.state_dict()) == before
    with pytest.raises(emacore.StateDictError, match=case.match):
        ema.load_state_dict(state, strict=False)
    assert _frozen(lib, ema.state_dict()) == before


def _file_with(case: Case, lib: Any, path: Path) -> None:
    """The source state saved to ``path``, then the case's edit made to its JSON metadata."""
    emacore.save(_source(lib, case.profiled, seed=0, steps=4), path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["emacore"])
    doc["state"] = _mutated(case, doc["state"], lambda a: a)
    header["__metadata__"]["emacore"] = json.dumps(doc, allow_nan=False)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _file_params(cases: list[Case]) -> list[Any]:
    return _params_for([c for c in cases if c.in_json() and c.path])


@pytest.mark.parametrize(("case", "tracked"), _file_params(CASES))
def test_the_same_edit_in_a_checkpoint_file_is_refused_alike(
    lib: Any, case: Case, tracked: bool, tmp_path: Path
) -> None:
    """`emacore.load_into` refuses the edit in a file (before or in `load_state_dict`),
    naming the same field, and changes nothing."""
    path = tmp_path / "edited.safetensors"
    _file_with(case, lib, path)
    ema = _target(lib, case.profiled, tracked)
    before = _frozen(lib, ema.state_dict())
    with pytest.raises(emacore.StateDictError, match=case.names or case.match):
        emacore.load_into(ema, path, xp=lib.xp, device=lib.device)
    assert _frozen(lib, ema.state_dict()) == before


def test_the_state_dict_says_its_format_and_version(lib: Any) -> None:
    """The format's name and version are written as DESIGN.md gives them (save and load agree
    with each other whatever they are, so only a golden value tells a changed one)."""
    ema = emacore.EMA(0.9)
    ema.apply({"w": lib.make(np.zeros(2, np.float32))})
    state = ema.state_dict()
    assert (state["format"], state["version"]) == ("emacore.ExponentialMovingAverage", 1)
