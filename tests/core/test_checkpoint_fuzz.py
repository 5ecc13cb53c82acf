"""Fuzzing the checkpoint loaders: a file loads exactly as it is written, or is refused.

hypothesis mutates valid checkpoints at three levels: raw bytes (flip, overwrite, insert,
delete, truncate, and flips aimed at the array data), the 8-byte header length (huge, off by a
little), and the parsed JSON of the safetensors header and of emacore's metadata inside it
(values replaced by any JSON, NaN and Infinity included, keys deleted, list items duplicated,
keys written twice). Each mutated file goes through every loader, and each loader either
raises the error its docstring documents (`emacore.CheckpointError`, or
`emacore.errors.StateDictError` where the file does not fit the EMA or ``like=``), or returns
what the file holds: the oracle, `_expected`, decodes the file without emacore (the
safetensors layout: an 8-byte little-endian header length, the JSON header, each tensor's
bytes at its ``data_offsets``) and every value a loader hands back is compared with it, arrays
bit for bit with their dtype and shape. What a mutated but valid file "holds" is its own
content: a flipped bit in the data is a new value, a count edited from 3 to 7 is 7. Each
fuzzer counts the examples that reached a value comparison and fails when too few did.

The run is derandomized by default (the "ci" hypothesis profile, tests/conftest.py) and takes
its number of examples from the profile: ``HYPOTHESIS_PROFILE=fuzz-long`` explores at random.
Deterministic cases cover what random mutation rarely reaches: pickles (never unpickled, so a
malicious one runs nothing), the header size cap, deep nesting, giant integers, JSON ``true``
where a number belongs (``True == 1`` in Python), and the oracle's own power to see a wrong
value, dtype or shape and a dropped leaf.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emacore
from emacore import checkpoint
from emacore import functional as F
from emacore.errors import StateDictError

# The hypothesis profile (tests/conftest.py) decides how hard to fuzz: "ci", the default, a
# cheap derandomized pass; "fuzz-long" thousands of random examples. Deadline and database too.
SETTINGS = settings(
    max_examples=max(settings().max_examples, 150),  # settings(): the loaded profile's
    suppress_health_check=[HealthCheck.too_slow],
)
# Of the examples of each fuzzer, at least this share must reach a value comparison, and at
# least this many (the derandomized run and random ones reach twice the share or more): an oracle
# that never runs catches nothing. A header length is valid only when it is the true one, and
# hypothesis tries each distinct value once: of the lengths, the true one of each kind.
MIN_COMPARED = {
    "bytes": (0.3, 1),
    "header length": (0.0, 2),
    "json": (0.08, 1),
    "leaf field": (0.1, 1),
}

_KINDS = ("ema", "state")
_ZERO_DEBIAS = {"ema": True, "state": False}  # F.init's default is False


def _ema_file(path: Path) -> None:
    """An EMA with a 2-d, a 0-d and a float32 leaf, plus integer and bool copies."""
    ema = emacore.EMA(0.9, zero_debias=True)
    for k in range(3):
        ema.apply({"w": np.full((2, 3), k, np.float32), "b": np.float64(k) + np.zeros(())})
    state = ema.state_dict()
    state = {
        **state,
        "copies": {"steps": np.arange(3, dtype=np.int64), "mask": np.array([True, False])},
    }
    emacore.save(state, path, metadata={"note": "fuzz"})


_PARAMS = {"a": [np.ones(2, np.float32), None], "b": {"c": np.zeros((1, 2))}}


def _state_file(path: Path) -> None:
    """A functional state with a nested tree (its structure is saved)."""
    state = F.update(F.init(_PARAMS), _PARAMS, 0.5)
    emacore.save(state, path)


# what load_state(like=...) gets: the averaged leaves of each file, by name
_LIKE = {"ema": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(())}, "state": _PARAMS}


@functools.cache
def _valid(kind: str) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "x.safetensors")
        (_ema_file if kind == "ema" else _state_file)(path)
        return path.read_bytes()


def _data_size(kind: str) -> int:
    """The bytes of array data at the end of the valid file of ``kind``."""
    data = _valid(kind)
    (n,) = struct.unpack("<Q", data[:8])
    return len(data) - 8 - int(n)


# -- the oracle: the file decoded without emacore ---------------------------------------------

# safetensors dtype codes (its format spec), as numpy dtypes; bool is one byte
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "u1",
}


@dataclasses.dataclass(frozen=True)
class _Decoded:
    """A checkpoint as its bytes say: emacore's metadata (arrays as references), the user's
    metadata, and the state dict with each reference replaced by the array it names."""

    doc: dict[str, Any]
    user: dict[str, str]
    state: dict[str, Any]


def _decode(data: bytes) -> _Decoded:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    user = header.pop("__metadata__")
    doc = json.loads(user.pop("emacore"))
    payload = data[8 + n :]
    arrays = {}
    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        raw = np.frombuffer(payload[begin:end], dtype=np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]]))
        if spec["dtype"] == "BOOL":
            raw = raw != 0  # the documented reading of a bool byte: nonzero is True
        arrays[name] = raw.astype(raw.dtype.newbyteorder("=")).reshape(spec["shape"])

    def resolve(value: Any) -> Any:
        if isinstance(value, dict) and "__tensor__" in value:
            return arrays[value["__tensor__"]]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    state = resolve(doc["state"])
    # what loading fills in (a state dict's documented defaults) and the counters as floats
    state.setdefault("copies", {})
    for rec in state["leaves"].values():
        rec.setdefault("position", None)
        for lane in (rec, *rec.get("profiles", {}).values()):
            lane["decay_product"] = float(lane["decay_product"])
            lane["last_decay"] = float(lane["last_decay"])
    return _Decoded(doc, user, state)


def _assert_same(got: Any, want: Any, where: str) -> None:
    """``got`` is ``want``: same types, arrays of the same dtype and shape, bit for bit."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: a {type(got).__name__}, not an array"
        assert (got.dtype, got.shape) == (want.dtype, want.shape), (
            f"{where}: {got.dtype}{list(got.shape)}, the file holds {want.dtype}{list(want.shape)}"
        )
        # bytes, not values: a flipped bit may make a NaN, and NaN != NaN
        assert got.tobytes() == want.tobytes(), f"{where}: {got!r}, the file holds {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: a {type(got).__name__}, not a dict"
        assert sorted(got) == sorted(want), f"{where}: keys {sorted(got)}, expected {sorted(want)}"
        for key in want:
            _assert_same(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want), f"{where}: a {type(got).__name__}, not a {type(want)}"
        assert len(got) == len(want), f"{where}: {len(got)} items, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}/{i}")
    else:  # JSON scalars: True is not 1, 1 is not 1.0
        assert type(got) is type(want) and got == want, f"{where}: {got!r}, expected {want!r}"


def _tree(node: Any, prefix: str, leaves: dict[str, Any]) -> Any:
    """The pytree the metadata's ``tree`` describes, each leaf its shadow (by key path)."""

    def join(key: Any) -> str:
        return f"{prefix}/{key}" if prefix else str(key)

    if node == "*":
        return leaves[prefix]["shadow"]
    kind = node[0]
    if kind == "none":
        return None
    if kind == "dict":
        return {k: _tree(child, join(k), leaves) for k, child in node[1]}
    items = [_tree(child, join(i), leaves) for i, child in enumerate(node[1])]
    return items if kind == "list" else tuple(items)


def _like_tree(like: Any, prefix: str, leaves: dict[str, Any]) -> Any:
    """``like``'s structure, each leaf the file's shadow of the same key path."""

    def join(key: Any) -> str:
        return f"{prefix}/{key}" if prefix else str(key)

    if isinstance(like, dict):
        return {k: _like_tree(v, join(k), leaves) for k, v in like.items()}
    if isinstance(like, list):
        return [_like_tree(v, join(i), leaves) for i, v in enumerate(like)]
    return None if like is None else leaves[prefix]["shadow"]


def _assert_ema_holds(ema: emacore.EMA, want: dict[str, Any], names: set[str], where: str) -> None:
    """The EMA's state dict holds ``want``'s records (shadows and counters) for ``names``."""
    got = ema.state_dict()
    for group in ("leaves", "copies"):
        lost = sorted((names & set(want[group])) - set(got[group]))
        assert not lost, f"{where}: {group} {lost} are not in the EMA's {group}"
    for nm in sorted(names & set(want["leaves"])):
        for field in ("shadow", "count", "decay_product", "last_decay"):
            _assert_same(got["leaves"][nm][field], want["leaves"][nm][field], f"{where}/{nm}")
    for nm in sorted(names & set(want["copies"])):
        _assert_same(got["copies"][nm], want["copies"][nm], f"{where}/copies/{nm}")


def _tracking(kind: str) -> emacore.EMA:
    """An EMA that tracks the leaves of the valid file of ``kind``, with its values."""
    ema = emacore.EMA(0.9, zero_debias=_ZERO_DEBIAS[kind])
    ema.load_state_dict(_decode(_valid(kind)).state)
    return ema


# (what, the call, the error it may raise, how to check what it returned, how to check that
# raising it changed nothing)
_Loader = tuple[str, Callable[[], Any], type[Exception], Callable[[Any], None], Callable[[], None]]


def _loaders(path: Path, kind: str, data: bytes) -> Iterator[_Loader]:
    """Every loader on ``path`` (holding ``data``), with the check of what it returns."""

    @functools.cache
    def want() -> _Decoded:  # only decodable when a loader accepted the file
        return _decode(data)

    def file_names() -> set[str]:
        return set(want().state["leaves"]) | set(want().state["copies"])

    def check_load(got: dict[str, Any]) -> None:
        _assert_same(got, want().state, "load")

    def check_describe(info: dict[str, Any]) -> None:
        state = want().doc["state"]
        shown = {
            **{nm: ("average", rec["shadow"]) for nm, rec in state["leaves"].items()},
            **{nm: ("copy", ref) for nm, ref in state.get("copies", {}).items()},
        }
        expected = {nm: (role, ref["dtype"], ref["shape"]) for nm, (role, ref) in shown.items()}
        got = {e["name"]: (e["role"], e["dtype"], e["shape"]) for e in info["leaves"]}
        assert got == expected, f"describe: {got}, the file holds {expected}"
        assert len(info["leaves"]) == len(expected), f"describe repeats a leaf: {info['leaves']}"
        for entry in info["leaves"]:
            if entry["role"] == "average":
                rec = want().state["leaves"][entry["name"]]
                for key in ("count", "decay_product", "last_decay"):
                    _assert_same(entry[key], rec[key], f"describe/{entry['name']}/{key}")
        assert info["metadata"] == want().user, (info["metadata"], want().user)
        assert (info["zero_debias"], info["compat"]) == (state["zero_debias"], state["compat"])

    def check_state(got: emacore.EMAState, shadow: Any) -> None:
        leaves = want().state["leaves"]
        _assert_same(got.shadow, shadow, "load_state")
        counters = {(r["count"], r["decay_product"], r["last_decay"]) for r in leaves.values()}
        assert len(counters) <= 1, f"load_state merged different counters {counters}"
        count, product, last = counters.pop() if counters else (0, 1.0, 1.0)
        _assert_same(got.count, count, "load_state/count")
        _assert_same(got.decay_product, product, "load_state/decay_product")
        _assert_same(got.last_decay, last, "load_state/last_decay")
        state = want().state
        assert (got.zero_debias, got.compat) == (state["zero_debias"], state["compat"])

    def check_tree(got: emacore.EMAState) -> None:
        check_state(got, _tree(want().doc["tree"], "", want().state["leaves"]))

    def check_like(got: emacore.EMAState) -> None:
        check_state(got, _like_tree(_LIKE[kind], "", want().state["leaves"]))

    def into(ema: emacore.EMA, **kwargs: Any) -> Callable[[], tuple[emacore.EMA, Any]]:
        return lambda: (ema, emacore.load_into(ema, path, **kwargs))

    def check_into(strict: bool, before: set[str]) -> Callable[[Any], None]:
        """``before``: the leaves the EMA tracked (it then keeps the others' values)."""

        def check(out: tuple[emacore.EMA, Any]) -> None:
            ema, result = out
            names = (file_names() & before) if before else file_names()
            _assert_ema_holds(ema, want().state, names, "load_into")
            if before:  # what the file lacks keeps the valid file's values
                _assert_ema_holds(ema, _decode(_valid(kind)).state, before - names, "kept")
            missing = sorted(before - file_names()) if before else []
            unexpected = sorted(file_names() - before) if before else []
            assert not strict or not (missing or unexpected), "a strict load did not match"
            assert (result.missing_keys, result.unexpected_keys) == (missing, unexpected)
            _assert_same(ema.state_dict()["calls"], want().state.get("calls", 0), "calls")

        return check

    def unchanged(ema: emacore.EMA, before: set[str]) -> Callable[[], None]:
        """A refused load_into changes nothing (its docstring's promise)."""

        def check() -> None:
            state = ema.state_dict()
            assert {*state["leaves"], *state["copies"]} == before, "a refused load changed leaves"
            _assert_ema_holds(ema, _decode(_valid(kind)).state, before, "refused")

        return check

    def nothing() -> None:
        pass

    tracked, loose = _tracking(kind), _tracking(kind)
    names = {*tracked.state_dict()["leaves"], *tracked.state_dict()["copies"]}
    fresh, fresh_loose = emacore.EMA(0.9, zero_debias=True), emacore.EMA(0.9)
    like = _LIKE[kind]
    err = emacore.CheckpointError
    yield ("describe", lambda: checkpoint.describe(path), err, check_describe, nothing)
    yield ("load", lambda: emacore.load(path), err, check_load, nothing)
    yield ("load_state", lambda: emacore.load_state(path), err, check_tree, nothing)
    yield (
        "load_state(like)",
        lambda: emacore.load_state(path, like),
        StateDictError,
        check_like,
        nothing,
    )
    for what, ema, strict, before in (
        ("load_into(tracking)", tracked, True, names),
        ("load_into(tracking, loose)", loose, False, names),
        ("load_into(fresh)", fresh, True, set()),
        ("load_into(fresh, loose)", fresh_loose, False, set()),
    ):
        call = into(ema, strict=strict)
        yield (what, call, StateDictError, check_into(strict, before), unchanged(ema, before))


def _check(tmp_path: Path, data: bytes, kind: str) -> set[str]:
    """Run every loader on ``data``: each raises its documented error or returns what the
    file holds. Return the loaders whose values were compared."""
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(data)
    compared = set()
    for what, call, error, check, unchanged in _loaders(path, kind, data):
        try:
            got = call()
        except error:  # any other exception fails the test
            unchanged()
            continue
        check(got)
        compared.add(what)
    return compared


class _Tally:
    """How many examples of a fuzzer ran, and how many reached a value comparison."""

    def __init__(self) -> None:
        self.examples = 0
        self.compared: collections.Counter[str] = collections.Counter()

    def add(self, compared: set[str]) -> None:
        self.examples += 1
        self.compared["any"] += bool(compared)
        self.compared.update(compared)

    def require(self, fuzzer: str) -> None:
        share, count = MIN_COMPARED[fuzzer]
        assert self.compared["any"] >= max(share * self.examples, count), (
            f"only {self.compared['any']} of {self.examples} {fuzzer} examples reached a value "
            f"comparison: the oracle barely ran ({dict(self.compared)})"
        )


# -- raw bytes ------------------------------------------------------------------------------

_EDITS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**32), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**32), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**32), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**32), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 2**32)),
)
# the array data is a few dozen bytes after a header of hundreds: flips aimed there keep the
# file valid, and the loaders must return the new values
_DATA_FLIPS = st.tuples(st.just("flip data"), st.integers(0, 2**32), st.integers(0, 7))


def _edit(data: bytes, edit: tuple[Any, ...], data_size: int) -> bytes:
    if not data:
        return data
    kind, where = edit[0], edit[1] % len(data)
    if kind == "flip data":  # counted from the end, where the data is
        kind, where = "flip", len(data) - 1 - edit[1] % min(data_size, len(data))
    if kind == "flip":
        return data[:where] + bytes([data[where] ^ (1 << edit[2])]) + data[where + 1 :]
    if kind == "set":
        return data[:where] + bytes([edit[2]]) + data[where + 1 :]
    if kind == "insert":
        return data[:where] + edit[2] + data[where:]
    if kind == "delete":
        return data[:where] + data[where + edit[2] :]
    return data[:where]


def test_byte_mutations(tmp_path: Path) -> None:
    tally = _Tally()

    @SETTINGS
    @given(
        st.sampled_from(_KINDS),
        st.lists(_EDITS | _DATA_FLIPS, min_size=1, max_size=4)
        | st.lists(_DATA_FLIPS, min_size=1, max_size=4),
    )
    def example(kind: str, edits: list[tuple[Any, ...]]) -> None:
        data = _valid(kind)
        for edit in edits:
            data = _edit(data, edit, _data_size(kind))
        tally.add(_check(tmp_path, data, kind))

    example()
    tally.require("bytes")


def test_declared_header_lengths(tmp_path: Path) -> None:
    tally = _Tally()

    @SETTINGS
    @given(
        st.sampled_from(_KINDS),
        st.one_of(
            st.integers(0, 2**64 - 1),
            st.integers(-64, 64),  # a few bytes off the true length
            st.sampled_from([2**64 - 1, 2**63, checkpoint.MAX_HEADER_BYTES + 1]),
        ),
    )
    def example(kind: str, length: int) -> None:
        data = _valid(kind)
        if -64 <= length <= 64:
            (true_length,) = struct.unpack("<Q", data[:8])
            length = max(0, true_length + length)
        tally.add(_check(tmp_path, struct.pack("<Q", length) + data[8:], kind))

    example()
    tally.require("header length")


# -- the JSON inside --------------------------------------------------------------------------

_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**63, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "F64", "I64", "BOOL", "bfloat16", "float32", "*", "none"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
# values a field may validly hold, and the bools and floats that compare equal to them
_PLAUSIBLE = st.one_of(
    st.integers(0, 4),
    st.booleans(),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, None, "name", "position", "identity"]),
)


def _split(data: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """The header (with emacore's metadata parsed too) and the data bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["emacore"])
    return header, doc, data[8 + n :]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _dumps(obj: Any, twice: tuple[Any, ...] | None, here: tuple[Any, ...] = ()) -> str:
    """JSON text (NaN allowed) where the object at path ``twice`` writes its first key twice."""
    if isinstance(obj, dict):
        items = [f"{json.dumps(k)}:{_dumps(v, twice, (*here, k))}" for k, v in obj.items()]
        if twice == here and items:
            items.append(items[0])
        return "{" + ",".join(items) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(_dumps(v, twice, (*here, i)) for i, v in enumerate(obj)) + "]"
    return json.dumps(obj)


@st.composite
def _json_mutation(draw: st.DrawFn) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(_KINDS))
    header, doc, payload = _split(_valid(kind))
    target = draw(st.sampled_from(["header", "doc"]))
    root = header if target == "header" else doc
    twice = None
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(root)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "delete", "duplicate", "twice"]))
        if op == "twice":
            twice = path
            continue
        if not path:
            if op == "replace":
                root = draw(_JSON_VALUES)
            continue
        parent = root
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "replace":
            parent[key] = draw(_JSON_VALUES)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key])))
    if target == "header":
        header_text = _dumps(root, twice)
    else:
        header["__metadata__"]["emacore"] = _dumps(root, twice)
        header_text = json.dumps(header)
    raw = header_text.encode()
    raw += b" " * draw(st.integers(0, 8))  # safetensors pads to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + payload, kind


def test_json_mutations(tmp_path: Path) -> None:
    tally = _Tally()

    @SETTINGS
    @given(_json_mutation())
    def example(mutated: tuple[bytes, str]) -> None:
        tally.add(_check(tmp_path, *mutated))

    example()
    tally.require("json")


_FIELDS = ["dtype", "shape", "__tensor__", "shadow", "count", "decay_product", "last_decay"]
_FIELDS += ["keyed_by", "position", "order", "rename", "size", "header size", "header offset"]


RETYPE = "<the same value, another type>"  # a sentinel the leaf-field fuzzer draws


def _retyped(value: Any) -> Any:
    """A value that Python's ``==`` (or ``float()``) equates with ``value``, of another type:
    what a check by comparison or by conversion lets through."""
    if type(value) is int:
        return bool(value) if value in (0, 1) else float(value)
    if type(value) is float and value.is_integer():
        return int(value)
    return str(value)  # "0.9": float() takes it


def _put(container: Any, key: Any, value: Any) -> None:
    container[key] = _retyped(container[key]) if value == RETYPE else value


def _leaf_field_mutation(kind: str, field: str, value: Any, index: int) -> bytes:
    """One field of one leaf (or copy): its array's dtype, shape or tensor name, one of its
    sizes, its counters, its name; or one size or data offset of its tensor in the safetensors
    header. ``value`` may be `RETYPE`: the field's own value, retyped."""
    header, doc, payload = _split(_valid(kind))
    state = doc["state"]
    entries = [("leaves", nm) for nm in state["leaves"]] + [
        ("copies", nm) for nm in state["copies"]
    ]
    group, name = entries[index % len(entries)]
    record = state[group][name]
    ref = record["shadow"] if group == "leaves" else record
    items = {
        "size": ref["shape"],
        "header size": header[ref["__tensor__"]]["shape"],
        "header offset": header[ref["__tensor__"]]["data_offsets"],
    }
    if field == "rename":
        state[group] = {(str(value) if k == name else k): v for k, v in state[group].items()}
    elif field in ("dtype", "shape", "__tensor__"):
        _put(ref, field, value)
    elif field in items:
        if items[field]:
            _put(items[field], index % len(items[field]), value)
    elif group == "leaves":
        _put(record, field, value)
    else:
        state["copies"][name] = value
    header["__metadata__"]["emacore"] = json.dumps(doc)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def test_leaf_metadata_mutations(tmp_path: Path) -> None:
    tally = _Tally()

    @SETTINGS
    @given(
        st.sampled_from(_KINDS),
        st.sampled_from(_FIELDS),
        st.one_of(st.just(RETYPE), _PLAUSIBLE, _JSON_VALUES),
        st.integers(0, 9),
    )
    def example(kind: str, field: str, value: Any, index: int) -> None:
        tally.add(_check(tmp_path, _leaf_field_mutation(kind, field, value, index), kind))

    example()
    tally.require("leaf field")


# -- deterministic cases ------------------------------------------------------------------------


def _write_header(path: Path, header: Any, payload: bytes = b"") -> None:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def _raises(path: Path, match: str) -> None:
    def into(p: Path) -> Any:
        return emacore.load_into(emacore.EMA(0.9), p)

    for call in (checkpoint.describe, emacore.load, emacore.load_state, into):
        with pytest.raises(emacore.CheckpointError, match=match):
            call(path)


class _Exploit:
    """Unpickling this would create a file: the loaders must never unpickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_pickles_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "ema.pt"
    path.write_bytes(pickle.dumps({"state": _Exploit(str(marker))}))
    with pytest.raises(emacore.CheckpointError):
        emacore.load(path)
    with pytest.raises(emacore.CheckpointError):
        emacore.load_into(emacore.EMA(0.9), path)
    assert not marker.exists()


def test_too_short_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "x"
    for data in (b"", b"\x01", b"1234567"):
        path.write_bytes(data)
        _raises(path, "too short")


def test_header_size_is_capped_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(struct.pack("<Q", checkpoint.MAX_HEADER_BYTES + 1) + b"{}")
    _raises(path, "more than the 100000000 accepted")
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    _raises(path, "more than")
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    _raises(path, "truncated")


def test_nesting_and_giant_numbers(tmp_path: Path) -> None:
    path = tmp_path / "x"
    _write_header(path, "[" * 100_000 + "]" * 100_000)
    _raises(path, "not valid JSON")
    _write_header(path, '{"a": ' + "9" * 100_000 + "}")
    _raises(path, "not valid JSON")
    _write_header(path, '{"__metadata__": {"emacore": "' + "[" * 50_000 + '"}}')
    _raises(path, "not valid JSON")
    deep = json.dumps({"format": "emacore.checkpoint", "version": 1, "state": {}, "x": "@"})
    deep = deep.replace('"@"', "[" * 500 + "]" * 500)
    _write_header(path, {"__metadata__": {"emacore": deep}})
    _raises(path, "nested more than 100 levels deep")


def test_not_an_emacore_file(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": np.ones(2, np.float32)}, path)
    _raises(path, "not an emacore checkpoint")


def test_duplicate_keys_nan_and_versions(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    _ema_file(good)
    header, doc, payload = _split(good.read_bytes())
    path = tmp_path / "bad.safetensors"

    twice = json.dumps(header).replace('{"__metadata__"', '{"w": {}, "__metadata__"', 1)
    _write_header(path, twice, payload)
    _raises(path, "key 'w' twice")

    nan_doc = json.dumps(doc).replace('"decay_product":', '"decay_product": NaN, "x":', 1)
    _write_header(path, {**header, "__metadata__": {"emacore": nan_doc}}, payload)
    _raises(path, "NaN, which is not JSON")

    for version, match in ((2, "newer emacore"), ("1", "version '1'"), (True, "version True")):
        changed = json.dumps({**doc, "version": version})
        _write_header(path, {**header, "__metadata__": {"emacore": changed}}, payload)
        _raises(path, match)

    leaf_twice = json.dumps(doc).replace('"leaves": {', '"leaves": {"w": {}, ', 1)
    _write_header(path, {**header, "__metadata__": {"emacore": leaf_twice}}, payload)
    _raises(path, "key 'w' twice")

    doc["state"]["copies"]["steps"]["__tensor__"] = "w"
    _write_header(path, {**header, "__metadata__": {"emacore": json.dumps(doc)}}, payload)
    _raises(path, "two arrays are stored as 'w'")


def _shape_of_bc(where: str, size: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    """Make the first size of tensor b/c (its shape is [1, 2]) ``size``, in the header or in
    emacore's metadata."""

    def edit(header: dict[str, Any], doc: dict[str, Any]) -> None:
        spec = header["b/c"] if where == "header" else doc["state"]["leaves"]["b/c"]["shadow"]
        spec["shape"][0] = size

    return edit


@pytest.mark.parametrize("size", [True, 1.0], ids=["true", "float"])
@pytest.mark.parametrize(
    ("where", "match"),
    [
        (
            "header",
            r"tensor 'b/c': shape must be a list of at most 64 integers >= 0, got \[{}, 2\]",
        ),
        ("metadata", r"array 'b/c': shape must be at most 64 sizes >= 0, got \[{}, 2\]"),
    ],
    ids=["header", "metadata"],
)
def test_a_size_must_be_an_integer_not_true(
    tmp_path: Path, size: Any, where: str, match: str
) -> None:
    """``[true, 2] == [1, 2]`` in Python: a header shape checked only against the metadata's
    passed, and reshaping the array then raised TypeError (found by the fuzzer, once in ~44
    runs). Every loader refuses it as a malformed file, naming the tensor and the value."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_rewrite(_valid("state"), _shape_of_bc(where, size)))
    _raises(path, match.format(size))
    with pytest.raises(emacore.CheckpointError, match=match.format(size)):
        emacore.load_state(path, _LIKE["state"])


def _profiles_file(path: Path) -> None:
    """An EMA with two decay profiles: each leaf's record holds the second under profiles."""
    ema = emacore.EMA({"fast": 0.5, "slow": 0.9})
    ema.apply({"w": np.ones(2)})
    emacore.save(ema, path)


def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    """Set ``doc[keys...] = value`` in emacore's metadata."""

    def edit(header: dict[str, Any], doc: dict[str, Any]) -> None:
        where = doc
        for key in keys[:-1]:
            where = where[key]
        where[keys[-1]] = value

    return edit


_LEAF_W = ("state", "leaves", "w")
_SLOW = (*_LEAF_W, "profiles", "slow")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("state", "version", value=True), "the state dict's version True is not supported"),
        (_set("state", "version", value=2), "the state dict's version 2 is not supported"),
        (_set("state", "calls", value=True), r"'calls' \(apply calls so far\) .* got True"),
        (_set(*_SLOW, "decay_product", value=True), r"'slow': decay_product .* got True"),
        (_set(*_SLOW, "last_decay", value="0.5"), r"'slow': last_decay .* got '0.5'"),
        (_set(*_SLOW, "shadow", value=None), "leaf 'w': profile 'slow' has no 'shadow' array"),
        (_set(*_LEAF_W, "profiles", value=[]), "leaf 'w': profiles must be an object, got"),
        # already refused before, kept so: every other number of the metadata
        (_set(*_LEAF_W, "count", value=True), "leaf 'w': count must be an integer >= 0"),
        (_set(*_LEAF_W, "order", value=True), "leaf 'w': order must be null or an integer"),
        (_set(*_LEAF_W, "position", value=False), "leaf 'w': position must be null or an"),
        (_set(*_LEAF_W, "decay_product", value=True), "leaf 'w': decay_product must be a number"),
    ],
    ids=[
        "version-true",
        "version-2",
        "calls-true",
        "profile-decay_product-true",
        "profile-last_decay-string",
        "profile-without-shadow",
        "profiles-not-an-object",
        "count-true",
        "order-true",
        "position-false",
        "decay_product-true",
    ],
)
def test_true_is_not_a_number_in_the_metadata(
    tmp_path: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None], match: str
) -> None:
    """JSON ``true`` where emacore's metadata holds a number: `load_state_dict` compares the
    version with ``==`` and converts counters with ``float()``, so a state dict version or a
    profile's decay product of ``true`` loaded as 1 (and ``"0.5"`` as 0.5). The file is
    malformed: every loader says which field holds what."""
    good = tmp_path / "good.safetensors"
    _profiles_file(good)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_rewrite(good.read_bytes(), edit))
    _raises(path, match)
    with pytest.raises(emacore.CheckpointError, match=match):
        emacore.load_into(emacore.EMA({"fast": 0.5, "slow": 0.9}), path)


def test_an_offset_must_be_an_integer_not_false(tmp_path: Path) -> None:
    """``[false, 8] == [0, 8]``: data offsets are checked as ints, not only by comparison."""
    header, _, _ = _split(_valid("state"))
    first = next(nm for nm, spec in header.items() if spec.get("data_offsets", [1])[0] == 0)

    def edit(header: dict[str, Any], doc: dict[str, Any]) -> None:
        header[first]["data_offsets"][0] = False

    path = tmp_path / "bad.safetensors"
    path.write_bytes(_rewrite(_valid("state"), edit))
    _raises(path, rf"tensor '{first}': data_offsets \[False, \d+\] are not within")


def test_metadata_must_agree_with_the_tensors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    _ema_file(good)
    header, doc, payload = _split(good.read_bytes())
    path = tmp_path / "bad.safetensors"
    cases = [
        ({"dtype": "float64"}, "stored as F32 but the metadata says float64"),
        ({"shape": [3, 2]}, r"has shape \[2, 3\] but the metadata says \[3, 2\]"),
        ({"dtype": "complex64"}, "dtype must be one of"),
        ({"count": -1}, "count must be an integer >= 0"),
        ({"last_decay": 1.5}, r"last_decay must be a number in \[0, 1\]"),
        ({"decay_product": 2.5}, r"decay_product must be a number in \[0, 1\]"),
    ]
    for change, match in cases:
        changed = json.loads(json.dumps(doc))
        record = changed["state"]["leaves"]["w"]
        for key, value in change.items():
            (record["shadow"] if key in ("dtype", "shape") else record)[key] = value
        meta = json.dumps(changed)
        _write_header(path, {**header, "__metadata__": {"emacore": meta}}, payload)
        _raises(path, match)
    overflow = json.dumps(doc).replace('"decay_product": ', '"decay_product": 1e999, "x": ', 1)
    _write_header(path, {**header, "__metadata__": {"emacore": overflow}}, payload)
    _raises(path, r"decay_product must be a number in \[0, 1\], got inf")
    spec = header["w"]
    for offsets, match in (
        ([0, 10**30], "not within"),
        ([spec["data_offsets"][0], spec["data_offsets"][1] - 4], "data_offsets span"),
        ([-8, spec["data_offsets"][1]], "not within"),
    ):
        changed = {**header, "w": {**spec, "data_offsets": offsets}}
        _write_header(path, changed, payload)
        _raises(path, match)
    _write_header(path, header, payload + b"\0" * 8)  # a hole: bytes no tensor owns
    _raises(path, "cover")


def test_an_averaged_leaf_with_an_integer_shadow_is_a_checkpoint_error(tmp_path: Path) -> None:
    """Consistent header and metadata (int32 both), but an average of integers is no EMA
    state: every loader refuses it as a malformed file, load_into included."""
    good = tmp_path / "good.safetensors"
    _ema_file(good)
    header, doc, payload = _split(good.read_bytes())
    assert header["w"]["dtype"] == "F32"  # int32 has the same size: the bytes still fit
    doc["state"]["leaves"]["w"]["shadow"]["dtype"] = "int32"
    path = tmp_path / "int.safetensors"
    changed = {**header, "w": {**header["w"], "dtype": "I32"}}
    _write_header(path, {**changed, "__metadata__": {"emacore": json.dumps(doc)}}, payload)
    match = r"leaf 'w': its shadow 'w' is 'int32'"
    _raises(path, match)
    with pytest.raises(emacore.CheckpointError, match=match):
        emacore.load_into(emacore.EMA(0.5), path)


def test_dtype_a_library_cannot_keep_is_an_error(tmp_path: Path) -> None:
    """A target that silently narrows (JAX without x64 makes float64 float32) is refused."""
    path = tmp_path / "ema.safetensors"
    ema = emacore.EMA(0.9)
    ema.apply({"w": np.zeros(2, np.float64)})
    emacore.save(ema, path)

    class Narrowing:
        __name__ = "narrowing"

        @staticmethod
        def asarray(a: Any, device: Any = None) -> Any:
            return np.asarray(a, dtype=np.float32)

    with pytest.raises(emacore.CheckpointError, match="array 'w' was saved as float64.*float32"):
        emacore.load(path, xp=Narrowing())


def test_save_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    ema = emacore.EMA(0.9)
    ema.apply({"w": np.zeros(2)})
    state = ema.state_dict()
    with pytest.raises(emacore.CheckpointError, match="'c' has dtype complex128"):
        emacore.save({**state, "copies": {"c": np.zeros(2, np.complex128)}}, path)
    with pytest.raises(emacore.CheckpointError, match="__metadata__"):
        emacore.save({**state, "copies": {"__metadata__": np.zeros(2)}}, path)
    with pytest.raises(ValueError, match="reserved"):
        emacore.save(ema, path, metadata={"emacore": "x"})
    clash = F.init({"a/b": np.zeros(1), "a": {"b": np.zeros(1)}})
    with pytest.raises(emacore.CheckpointError, match=r"several leaves are named \['a/b'\]"):
        emacore.save(clash, path)
    assert not path.exists() and os.listdir(tmp_path) == []  # nothing left behind


# -- the oracle, deterministically ---------------------------------------------------------------

# the loaders that accept each valid file (an EMA's file holds no tree, and the zero_debias of
# each file fits only one of the fresh EMAs)
_ACCEPTING = {
    "ema": {
        "describe",
        "load",
        "load_state(like)",
        "load_into(tracking)",
        "load_into(tracking, loose)",
        "load_into(fresh)",
    },
    "state": {
        "describe",
        "load",
        "load_state",
        "load_state(like)",
        "load_into(tracking)",
        "load_into(tracking, loose)",
        "load_into(fresh, loose)",
    },
}


def _rewrite(data: bytes, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> bytes:
    """``data`` with its header and emacore's metadata edited by ``edit(header, doc)``."""
    header, doc, payload = _split(data)
    edit(header, doc)
    header["__metadata__"]["emacore"] = json.dumps(doc)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _swap_offsets(header: dict[str, Any], doc: dict[str, Any]) -> None:
    """w (float32, 24 bytes) reads the bytes of steps (int64, 24 bytes), and the other way."""
    w, steps = header["w"]["data_offsets"], header["steps"]["data_offsets"]
    header["w"]["data_offsets"], header["steps"]["data_offsets"] = steps, w


def _set_counters(header: dict[str, Any], doc: dict[str, Any]) -> None:
    for rec in doc["state"]["leaves"].values():
        rec.update(count=7, decay_product=0.25, last_decay=1)  # an int is a valid number here
    doc["state"]["calls"] = 11
    doc["state"]["schedule"] = {"any": ["JSON", None]}


def _set_user_metadata(header: dict[str, Any], doc: dict[str, Any]) -> None:
    header["__metadata__"]["note"] = "edited"


@pytest.mark.parametrize("kind", _KINDS)
def test_valid_edits_load_as_the_file_says(tmp_path: Path, kind: str) -> None:
    """Edits that keep a file valid: every accepting loader returns the new content, not the
    content saved (a flipped bit of each data byte; tensors reading each other's bytes;
    counters, apply count, schedule and user metadata edited)."""
    valid = _valid(kind)
    assert _check(tmp_path, valid, kind) == _ACCEPTING[kind]
    edited = [_rewrite(valid, _set_counters), _rewrite(valid, _set_user_metadata)]
    if kind == "ema":
        edited.append(_rewrite(valid, _swap_offsets))
    edited += [
        _edit(valid, ("flip data", i, i % 8), _data_size(kind)) for i in range(_data_size(kind))
    ]
    for data in edited:
        assert data != valid
        assert _check(tmp_path, data, kind) == _ACCEPTING[kind]


def _rename_mask(header: dict[str, Any], doc: dict[str, Any]) -> None:
    copies = doc["state"]["copies"]
    copies["mask2"] = copies.pop("mask")  # the leaf's name; its tensor keeps its own


def test_a_refused_load_changes_nothing(tmp_path: Path) -> None:
    """A file with new values for the tracked leaves and a leaf the EMA does not track: a
    strict load_into refuses it and must leave every shadow as it was."""
    data = _rewrite(_valid("ema"), _rename_mask)
    header, _, _ = _split(data)
    where = len(data) - _data_size("ema") + header["w"]["data_offsets"][0]
    data = _edit(data, ("flip", where, 0), _data_size("ema"))  # w's first number
    compared = _check(tmp_path, data, "ema")  # the refusals are checked in there
    assert "load_into(tracking)" not in compared
    assert "load_into(tracking, loose)" in compared  # the flipped value did load there


_READERS = {"load", "load_state", "load_state(like)", "load_into(fresh, loose)"}
# the loaders whose returned value each planted bug makes wrong; the others return what the
# file holds (describe reads no array) or refuse the wrong array (load_into into an EMA that
# tracks the leaf checks its dtype and shape, and an EMA takes the count as an int)
_CAUGHT = {
    "wrong value": _READERS | {"load_into(tracking)", "load_into(tracking, loose)"},
    "stale value": _READERS | {"load_into(tracking)", "load_into(tracking, loose)"},
    "wrong dtype": _READERS,
    "wrong shape": _READERS,
    "dropped leaf": {"describe", "load", "load_into(fresh)", "load_into(tracking, loose)"},
    "count true": {"describe", "load", "load_state", "load_state(like)"},
}


@pytest.mark.parametrize(
    ("plant", "kind"),
    [
        ("wrong value", "state"),
        ("stale value", "state"),
        ("wrong dtype", "state"),
        ("wrong shape", "state"),
        ("dropped leaf", "ema"),
        ("count true", "state"),
    ],
)
def test_the_oracle_sees_a_loader_return_what_the_file_does_not_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str, kind: str
) -> None:
    """Plant each way a loader can be wrong into emacore's reading, and watch the oracle fail
    (with nothing planted the loaders agree with the file: the test above)."""
    convert, read, read_arrays = checkpoint._convert, checkpoint._read, checkpoint._read_arrays
    data = _valid(kind)
    valid_path = tmp_path / "valid.safetensors"
    valid_path.write_bytes(data)
    if plant == "stale value":  # the file has a flipped bit: "what was saved" is not enough
        data = _edit(data, ("flip data", 0, 0), _data_size(kind))

    def planted_convert(arr: Any, saved: str, name: str, xp: Any, device: Any) -> Any:
        arr = convert(arr, saved, name, xp, device).copy()
        if plant == "wrong value" and arr.size:
            arr.reshape(-1).view(np.uint8)[0] ^= 1  # the lowest bit of its first byte
        if plant == "wrong dtype" and arr.dtype == np.float32:
            arr = arr.astype(np.float64)  # the same values
        if plant == "wrong shape":
            arr = arr.reshape(-1)  # the same values, flat
        return arr

    def planted_read(path: Any) -> Any:
        ckpt = read(path)
        if plant == "dropped leaf":
            del ckpt.state["copies"]["mask"]
        for rec in ckpt.state["leaves"].values():
            if plant == "count true" and rec["count"] == 1:
                rec["count"] = True  # the right value, the wrong type
        return ckpt

    def stale_read_arrays(ckpt: Any, names: Any) -> Any:  # the bytes of the file saved
        return read_arrays(dataclasses.replace(ckpt, path=str(valid_path)), names)

    monkeypatch.setattr(checkpoint, "_convert", planted_convert)
    monkeypatch.setattr(checkpoint, "_read", planted_read)
    if plant == "stale value":
        monkeypatch.setattr(checkpoint, "_read_arrays", stale_read_arrays)
    path = tmp_path / "planted.safetensors"
    path.write_bytes(data)
    caught = set()
    for what, call, error, check, _ in _loaders(path, kind, data):
        try:
            got = call()
        except error:  # refused: the planted bug made no wrong value
            continue
        try:
            check(got)
        except AssertionError:
            caught.add(what)
    assert caught == _CAUGHT[plant]
