"""Fuzzing the checkpoint loaders: every malformed file is an emacore error, nothing else.

hypothesis mutates valid checkpoints at three levels: raw bytes (flip, overwrite, insert,
delete, truncate), the 8-byte header length (huge, off by a little), and the parsed JSON of the
safetensors header and of emacore's metadata inside it (values replaced by any JSON, NaN and
Infinity included, keys deleted, list items duplicated, keys written twice). Each mutated file
goes through every loader; a loader may succeed (a flipped bit in an array is still a valid
file) or raise `emacore.errors.EMAError`; any other exception, a crash or a hang fails.
Deterministic cases cover what random mutation rarely reaches: pickles (never unpickled, so a
malicious one runs nothing), the header size cap, deep nesting, giant integers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emacore
from emacore import checkpoint
from emacore import functional as F
from emacore.errors import EMAError

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


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


def _state_file(path: Path) -> None:
    """A functional state with a nested tree (its structure is saved)."""
    params = {"a": [np.ones(2, np.float32), None], "b": {"c": np.zeros((1, 2))}}
    state = F.update(F.init(params), params, 0.5)
    emacore.save(state, path)


@functools.cache
def _valid(kind: str) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "x.safetensors")
        (_ema_file if kind == "ema" else _state_file)(path)
        return path.read_bytes()


def _tracking() -> emacore.EMA:
    """An EMA that tracks the leaves of the EMA file already (its shadows get compared)."""
    ema = emacore.EMA(0.9, zero_debias=True)
    ema.apply({"w": np.zeros((2, 3), np.float32), "b": np.zeros(())})
    return ema


def _run_loaders(path: Path) -> None:
    """Every loader on ``path``: each returns or raises an EMAError, nothing else."""
    calls = [
        lambda: emacore.load_into(_tracking(), path),
        lambda: emacore.load_into(_tracking(), path, strict=False),
        lambda: checkpoint.describe(path),
        lambda: emacore.load(path),
        lambda: emacore.load_state(path),
        lambda: emacore.load_state(path, like={"w": np.zeros((2, 3), np.float32)}),
        lambda: emacore.load_into(emacore.EMA(0.9, zero_debias=True), path),
        lambda: emacore.load_into(emacore.EMA(0.9), path, strict=False),
    ]
    for call in calls:
        with contextlib.suppress(EMAError):  # anything else fails the test
            call()


def _check(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(data)
    _run_loaders(path)


# -- raw bytes ------------------------------------------------------------------------------

_EDITS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**32), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**32), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**32), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**32), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 2**32)),
)


def _edit(data: bytes, edit: tuple[Any, ...]) -> bytes:
    if not data:
        return data
    kind, where = edit[0], edit[1] % len(data)
    if kind == "flip":
        return data[:where] + bytes([data[where] ^ (1 << edit[2])]) + data[where + 1 :]
    if kind == "set":
        return data[:where] + bytes([edit[2]]) + data[where + 1 :]
    if kind == "insert":
        return data[:where] + edit[2] + data[where:]
    if kind == "delete":
        return data[:where] + data[where + edit[2] :]
    return data[:where]


@SETTINGS
@given(st.sampled_from(["ema", "state"]), st.lists(_EDITS, min_size=1, max_size=4))
def test_byte_mutations(tmp_path: Path, kind: str, edits: list[tuple[Any, ...]]) -> None:
    data = _valid(kind)
    for edit in edits:
        data = _edit(data, edit)
    _check(tmp_path, data)


@SETTINGS
@given(
    st.sampled_from(["ema", "state"]),
    st.one_of(
        st.integers(0, 2**64 - 1),
        st.integers(-64, 64),  # a few bytes off the true length
        st.sampled_from([2**64 - 1, 2**63, checkpoint.MAX_HEADER_BYTES + 1]),
    ),
)
def test_declared_header_lengths(tmp_path: Path, kind: str, length: int) -> None:
    data = _valid(kind)
    if -64 <= length <= 64:
        (true_length,) = struct.unpack("<Q", data[:8])
        length = max(0, true_length + length)
    _check(tmp_path, struct.pack("<Q", length) + data[8:])


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
def _json_mutation(draw: st.DrawFn) -> bytes:
    header, doc, payload = _split(_valid(draw(st.sampled_from(["ema", "state"]))))
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
    return struct.pack("<Q", len(raw)) + raw + payload


@SETTINGS
@given(_json_mutation())
def test_json_mutations(tmp_path: Path, data: bytes) -> None:
    _check(tmp_path, data)


_FIELDS = ["dtype", "shape", "__tensor__", "shadow", "count", "decay_product", "last_decay"]
_FIELDS += ["keyed_by", "position", "order", "rename"]


@SETTINGS
@given(st.sampled_from(["ema", "state"]), st.sampled_from(_FIELDS), _JSON_VALUES, st.integers(0, 9))
def test_leaf_metadata_mutations(
    tmp_path: Path, kind: str, field: str, value: Any, index: int
) -> None:
    """Targeted: one field of one leaf (or copy): its array's dtype, shape or tensor name, its
    counters, its name."""
    header, doc, payload = _split(_valid(kind))
    state = doc["state"]
    entries = [("leaves", nm) for nm in state["leaves"]] + [
        ("copies", nm) for nm in state["copies"]
    ]
    group, name = entries[index % len(entries)]
    record = state[group][name]
    ref = record["shadow"] if group == "leaves" else record
    if field == "rename":
        state[group] = {(str(value) if k == name else k): v for k, v in state[group].items()}
    elif field in ("dtype", "shape", "__tensor__"):
        ref[field] = value
    elif group == "leaves":
        record[field] = value
    else:
        state["copies"][name] = value
    header["__metadata__"]["emacore"] = json.dumps(doc)
    raw = json.dumps(header).encode()
    _check(tmp_path, struct.pack("<Q", len(raw)) + raw + payload)


# -- deterministic cases ------------------------------------------------------------------------


def _write_header(path: Path, header: Any, payload: bytes = b"") -> None:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def _raises(path: Path, match: str) -> None:
    for call in (checkpoint.describe, emacore.load, emacore.load_state):
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
