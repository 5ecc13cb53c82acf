"""Portable checkpoints: EMA state in a safetensors file, with no pickle anywhere.

A checkpoint is a standard `safetensors <https://huggingface.co/docs/safetensors>`_ file: one
tensor per array of the state, named by its leaf (a module's parameter and buffer names, a
pytree's key paths; other arrays of a leaf, such as the shadows of further decay profiles,
under ``<leaf>/<key path in its record>``), so a PyTorch user can even load the averaged
weights with ``safetensors.torch.load_file`` into the model itself. Everything else is JSON
under the ``"emacore"`` key of the safetensors header's metadata: the format version and the
state dict of `emacore.ExponentialMovingAverage.state_dict` (counters, ``zero_debias`` and
``compat``, the schedule's spec, each leaf's role, ...) with every array replaced by a
reference ``{"__tensor__": name, "dtype": ..., "shape": [...]}``, and a pytree's structure
when the state is a functional `emacore.EMAState`.

Design invariants:

* **No code runs while loading.** The file is parsed as a size-capped JSON header plus raw
  little-endian numbers; every field is checked (types, ranges, offsets that tile the data
  exactly, dtypes and shapes that agree between the header and emacore's metadata) before any
  array is allocated. A malformed file raises `CheckpointError`, never another exception.
* **Atomic writes.** `save` writes a temporary file in the destination's directory, flushes and
  ``fsync``s it, renames it over the destination with ``os.replace`` and ``fsync``s the
  directory: a writer killed at any moment leaves either the previous file or the new one.
* **Any backend to any backend.** Arrays go through numpy on the host. An array loaded for an
  existing one (the shadow it replaces in `load_into`, a leaf of ``like=`` in `load_state`) is
  made by that array's backend, `emacore.Backend.from_host`, so a plugin's own array types
  load too; one loaded with ``xp=`` is made by that namespace's ``asarray``. Either way the
  loader checks that it kept the dtype (JAX without ``jax_enable_x64`` would quietly make
  float64 float32).
* **bfloat16.** numpy has no bfloat16, and safetensors' numpy writer cannot emit one: bfloat16
  arrays are stored as float32 (exact: every bfloat16 is a float32 whose low 16 bits are
  zero) with ``"dtype": "bfloat16"`` in emacore's metadata. Loading restores bfloat16 where the
  target library has it (torch, JAX); numpy gets the float32 values. Other readers see correct
  values in float32, at twice the size on disk; shadows are float32 by default anyway.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emacore import _plugins, _pytree
from emacore._debias import COMPAT_MODES
from emacore._ema import ExponentialMovingAverage
from emacore._precision import dtype_label
from emacore._state import EMAState
from emacore._state_dict import (
    _IDENTITY,
    _NAME,
    _POSITION,
    STATE_FORMAT,
    STATE_VERSION,
    LoadResult,
    check_state,
)
from emacore.backend import Backend
from emacore.errors import StateDictError

__all__ = [
    "FORMAT",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "VERSION",
    "CheckpointError",
    "describe",
    "load",
    "load_into",
    "load_state",
    "save",
]

FORMAT = "emacore.checkpoint"
VERSION = 1
METADATA_KEY = "emacore"
# safetensors' own reader refuses headers above 100 MB; a header that size describes ~300,000
# arrays, far beyond any model's count of tensors
MAX_HEADER_BYTES = 100_000_000
_MAX_NDIM = 64
_MAX_DEPTH = 100  # JSON nesting in emacore's metadata: state dicts nest a few levels, trees more
_REF = "__tensor__"  # marks an array's place in the JSON state

_KEYED_BY = (_IDENTITY, _POSITION, _NAME)
# the fields of a leaf record an EMAState has (anything else, e.g. profiles, it cannot hold)
_STATE_FIELDS = {"shadow", "count", "decay_product", "last_decay", "keyed_by", "position", "order"}
# safetensors dtype code -> (little-endian numpy dtype string, the dtype's name)
_CODES: dict[str, tuple[str, str]] = {
    "F64": ("<f8", "float64"),
    "F32": ("<f4", "float32"),
    "F16": ("<f2", "float16"),
    "I64": ("<i8", "int64"),
    "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"),
    "I8": ("|i1", "int8"),
    "U64": ("<u8", "uint64"),
    "U32": ("<u4", "uint32"),
    "U16": ("<u2", "uint16"),
    "U8": ("|u1", "uint8"),
    "BOOL": ("|b1", "bool"),
}
_CODE_OF = {name: code for code, (_, name) in _CODES.items()}
_DTYPES = (*_CODE_OF, "bfloat16")  # the dtypes an array may have (bfloat16: stored as float32)
_FLOATING = ("float16", "bfloat16", "float32", "float64")  # the dtypes a shadow may have


class CheckpointError(StateDictError):
    """A checkpoint file is malformed, truncated, not emacore's, or cannot be converted.

    Subclass of `emacore.errors.StateDictError` (and so of `emacore.errors.EMAError` and
    ``ValueError``): whatever is wrong with a file, loading raises this and nothing else
    (short of ``OSError`` when the file cannot be opened at all).
    """


# -- saving ---------------------------------------------------------------------------------


def save(
    obj: ExponentialMovingAverage | EMAState | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the state of an EMA to ``path`` as a safetensors file, atomically.

    Parameters
    ----------
    obj : ExponentialMovingAverage, EMAState or state dict
        What to save: a stateful EMA, a functional `EMAState` (its pytree structure is saved
        too, when it is made of dicts with string keys, lists, tuples and None), or a state dict
        in the format of `ExponentialMovingAverage.state_dict` (e.g. from `emacore.importers`).
        Arrays of any backend; they are copied to the host.
    path : str or path-like
        The destination. Written through a temporary file in the same directory, then renamed
        over ``path``: a process killed mid-save leaves the previous file intact (it may leave
        a ``.<name>.<random>.tmp`` file behind).
    metadata : mapping of str to str, optional
        Extra text stored in the safetensors header (not under the reserved key
        ``"emacore"``); `describe` returns it.

    Raises
    ------
    CheckpointError
        An array's dtype cannot be stored (complex, float8...), an array is traced, two arrays
        would get the same tensor name, or a leaf is named ``"__metadata__"`` (reserved by
        safetensors).
    StateDictError
        ``obj`` is a malformed state dict.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import emacore
    >>> ema = emacore.ExponentialMovingAverage(0.9)
    >>> ema.apply({"w": np.zeros(2, np.float32)})
    >>> path = os.path.join(tempfile.mkdtemp(), "ema.safetensors")
    >>> emacore.save(ema, path)
    >>> emacore.checkpoint.describe(path)["leaves"][0]["shape"]
    [2]
    """
    tree = None
    if isinstance(obj, ExponentialMovingAverage):
        state: Mapping[str, Any] = obj.state_dict()
    elif isinstance(obj, EMAState):
        state, tree = _from_functional(obj)
    elif isinstance(obj, Mapping):
        state = obj
    else:
        raise TypeError(
            "save() takes an ExponentialMovingAverage, an EMAState or a state dict, got "
            f"{type(obj).__module__}.{type(obj).__qualname__}"
        )
    _check_state_dict(state)
    skeleton, arrays = _externalize(state)
    tensors: dict[str, Any] = {}
    for name, (ref, x) in arrays.items():
        host, dtype = _host_array(x, name)
        ref["dtype"], ref["shape"] = dtype, list(host.shape)
        tensors[name] = host
    from emacore import __version__

    doc = {
        "format": FORMAT,
        "version": VERSION,
        "writer": f"emacore {__version__}",
        "state": skeleton,
        "tree": tree,
    }
    header_meta = _user_metadata(metadata)
    try:
        header_meta[METADATA_KEY] = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:  # a NaN or infinite number
        raise CheckpointError(f"cannot save: the state holds a non-finite number ({exc})") from None

    from safetensors.numpy import save_file  # lazily: `import emacore` stays light

    _atomic_write(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=header_meta))


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
        if key == METADATA_KEY:
            raise ValueError(f"metadata key {METADATA_KEY!r} is reserved for emacore")
        out[key] = value
    return out


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _check_state_dict(state: Mapping[str, Any]) -> None:
    """The shape of a state dict `save` needs; its values are checked by loading."""
    if state.get("format") != STATE_FORMAT:
        raise StateDictError(
            f"not an emacore EMA state dict (expected format {STATE_FORMAT!r}, got "
            f"{state.get('format')!r})"
        )
    if not isinstance(state.get("zero_debias"), bool) or state.get("compat") not in COMPAT_MODES:
        raise StateDictError(
            f"state dict needs zero_debias (a bool) and compat (one of {COMPAT_MODES}), got "
            f"{state.get('zero_debias')!r} and {state.get('compat')!r}"
        )
    leaves, copies = state.get("leaves"), state.get("copies", {})
    if not isinstance(leaves, Mapping) or not all(
        isinstance(nm, str) and isinstance(rec, Mapping) and _is_array(rec.get("shadow"))
        for nm, rec in leaves.items()
    ):
        raise StateDictError("state dict 'leaves' must map names to records with a 'shadow' array")
    if not isinstance(copies, Mapping) or not all(
        isinstance(nm, str) and _is_array(x) for nm, x in copies.items()
    ):
        raise StateDictError("state dict 'copies' must map names to arrays")
    both = sorted(set(leaves) & set(copies))
    if both:
        raise StateDictError(f"leaves {both[:10]} are both averaged and copied")


def _externalize(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:  # noqa: C901 - 8 of its 13 is its closures ref and walk, which share `arrays`
    """The state as JSON with array references, and each array by tensor name."""
    arrays: dict[str, tuple[dict[str, Any], Any]] = {}

    def ref(x: Any, name: str) -> dict[str, Any]:
        if name in arrays:
            raise CheckpointError(f"cannot save: two arrays would both be stored as {name!r}")
        out = {_REF: name}
        arrays[name] = (out, x)
        return out

    def walk(value: Any, name: str) -> Any:
        if _is_array(value):
            return ref(value, name)
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise CheckpointError(f"cannot save {name!r}: its keys are not all strings")
            return {k: walk(v, f"{name}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{name}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(
            f"cannot save {name!r}: a {type(value).__qualname__} is neither an array nor JSON"
        )

    skeleton: dict[str, Any] = {}
    for key, value in state.items():
        if key == "leaves":
            skeleton[key] = {}
            for nm, rec in value.items():
                skeleton[key][nm] = {
                    field: ref(v, nm)
                    if field == "shadow"
                    else walk(_scalar(v) if field in _COUNTERS else v, f"{nm}/{field}")
                    for field, v in rec.items()
                }
        elif key == "copies":
            skeleton[key] = {nm: ref(x, nm) for nm, x in value.items()}
        else:
            skeleton[key] = walk(value, f"__state__/{key}")
    return skeleton, arrays


_COUNTERS = ("count", "decay_product", "last_decay")


def _scalar(x: Any) -> Any:
    """A counter as a Python number (``traceable`` states keep them as 0-d arrays)."""
    if not _is_array(x):
        return x
    backend = _plugins.resolve(x)
    if backend.is_traced(x):
        raise CheckpointError("cannot save a traced state (inside jit): save outside of it")
    value = _to_numpy(backend.to_host(x)).item()
    return value


def _from_functional(state: EMAState) -> tuple[dict[str, Any], Any]:
    """An `EMAState` as a state dict (leaves keyed by name), and its tree as JSON."""
    leaves, treedef = _pytree.flatten(state.shadow)
    names = _pytree.leaf_names(treedef)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"cannot save: several leaves are named {dup[:10]}")
    counters = {key: _scalar(getattr(state, key)) for key in _COUNTERS}
    if state.debias is not None:  # a float32 traceable state: its exact 1 - product
        counters["decay_product"] = 1.0 - float(_scalar(state.debias))
    records = {
        nm: {"shadow": x, **counters, "keyed_by": _NAME, "position": None, "order": i}
        for i, (nm, x) in enumerate(zip(names, leaves))
    }
    state_dict = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "name": "ExponentialMovingAverage",
        "zero_debias": state.zero_debias,
        "compat": state.compat,
        "schedule": None,
        "leaves": records,
        "copies": {},
    }
    return state_dict, _encode_tree(treedef)


def _encode_tree(treedef: Any) -> Any:
    """The treedef as JSON, or None when it holds types JSON cannot name (namedtuples...)."""
    if treedef == _pytree.LEAF:
        return "*"
    kind = treedef[0]
    if kind == "none":
        return ["none"]
    if kind in ("list", "tuple"):
        children = [_encode_tree(c) for c in treedef[1]]
        return None if any(c is None for c in children) else [kind, children]
    if kind == "dict" and treedef[1] is dict and all(isinstance(k, str) for k in treedef[2]):
        children = [_encode_tree(c) for c in treedef[3]]
        if any(c is None for c in children):
            return None
        return ["dict", [[k, c] for k, c in zip(treedef[2], children)]]
    return None


def _numpy() -> Any:
    """numpy, the host format every backend converts through (imported on first use)."""
    try:
        return importlib.import_module("numpy")
    except ImportError:
        raise ImportError(
            "emacore checkpoints go through numpy on the host: pip install numpy "
            "(or emacore[numpy])"
        ) from None


def _to_numpy(host: Any) -> Any:
    return _numpy().asarray(host)  # `Backend.to_host` brought it to the host


def _host_array(x: Any, name: str) -> tuple[Any, str]:
    """Return ``(contiguous little-endian numpy array, dtype name)`` for one array."""
    if name == "__metadata__":
        raise CheckpointError("a leaf cannot be named '__metadata__' (reserved by safetensors)")
    backend = _plugins.resolve(x)
    if backend.is_traced(x):
        raise CheckpointError(f"{name!r} is traced (inside jit): save outside of it")
    dtype = dtype_label(x.dtype)
    if dtype == "bfloat16":
        xp = backend.namespace(x)
        x = xp.astype(x, xp.float32)  # exact: see the module docstring
    elif dtype not in _CODE_OF:
        raise CheckpointError(
            f"{name!r} has dtype {x.dtype}, which a checkpoint cannot store (it stores "
            f"{', '.join(_DTYPES)})"
        )
    host = _to_numpy(backend.to_host(x))
    if not host.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
        host = host.copy(order="C")
    if host.dtype.byteorder == ">":
        host = host.astype(host.dtype.newbyteorder("<"))
    want = "float32" if dtype == "bfloat16" else dtype
    if host.dtype.name != want:
        raise CheckpointError(f"{name!r}: the host copy of a {dtype} array is {host.dtype}")
    return host, dtype


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a new file beside ``path``, make it durable, rename it over.

    (safetensors 0.8 also writes through a temporary file, but without ``fsync``, and older
    versions write in place: this layer makes the guarantee ours, whatever the version.)
    """
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            # O_EXCL: never reuse another writer's file; mode 0o666 lets the umask decide
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0))
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name != "nt":  # the rename is durable once the directory is (not possible on Windows)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- reading and checking a file ------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    """One array of a checked checkpoint: its reference, its leaf and where its bytes are."""

    ref: dict[str, Any]
    owner: str | None  # the leaf (or copy) it belongs to; None: the state's own
    numpy_dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Checkpoint:
    path: str
    state: dict[str, Any]  # the state dict, arrays as references
    tree: Any  # a treedef, or None
    writer: str
    user_metadata: dict[str, str]
    tensors: dict[str, _Tensor]
    data_start: int
    size: int


def _strict_json(text: str, what: str) -> Any:
    """Parse JSON that has no duplicate keys and no NaN/Infinity, or raise CheckpointError."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise CheckpointError(f"{what} has the key {key!r} twice")
            out[key] = value
        return out

    def constant(token: str) -> Any:
        raise CheckpointError(f"{what} holds {token}, which is not JSON")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit, nesting
        raise CheckpointError(f"{what} is not valid JSON ({str(exc)[:200]})") from None


def _is_int(x: Any, minimum: int | None = None) -> bool:
    """An int (not a bool), at least ``minimum`` if given."""
    ok = isinstance(x, int) and not isinstance(x, bool)
    return ok and (minimum is None or x >= minimum)


def _is_shape(x: Any) -> bool:
    """A list of at most ``_MAX_NDIM`` ints >= 0 (JSON ``true`` is no size: ``True == 1``)."""
    return isinstance(x, list) and len(x) <= _MAX_NDIM and all(_is_int(d, 0) for d in x)


def _read(path: str | os.PathLike[str]) -> _Checkpoint:
    """Open ``path`` and check everything but the array values."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: {size} bytes is too short for a safetensors file (an 8-byte header "
                "length, then the header)"
            )
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: the header declares {n} bytes, more than the {MAX_HEADER_BYTES} "
                "accepted: not a checkpoint, or a corrupt one"
            )
        if n > size - 8:
            raise CheckpointError(
                f"{path}: the header declares {n} bytes but the file has only {size - 8} after "
                "the length: truncated or not a safetensors file"
            )
        raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: the file shrank while being read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: the header is not UTF-8 text ({exc})") from None
    header = _strict_json(text, f"{path}: the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: the header's __metadata__ must map strings to strings")
    raw_doc = meta.pop(METADATA_KEY, None)
    if raw_doc is None:
        raise CheckpointError(
            f"{path}: not an emacore checkpoint (the safetensors metadata has no "
            f"{METADATA_KEY!r} entry; keys: {sorted(meta)[:10]})"
        )
    doc = _strict_json(raw_doc, f"{path}: emacore's metadata")
    if _depth(doc) > _MAX_DEPTH:  # every later walk recurses: bound it now
        raise CheckpointError(
            f"{path}: emacore's metadata is nested more than {_MAX_DEPTH} levels deep"
        )
    return _check(path, header, doc, meta, 8 + n, size)


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _check(
    path: str, header: dict[str, Any], doc: Any, meta: dict[str, str], start: int, size: int
) -> _Checkpoint:
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise bad(f"metadata format is {got!r}, expected {FORMAT!r}")
    version = doc.get("version")
    if not _is_int(version) or version != VERSION:
        newer = _is_int(version, VERSION + 1)
        raise bad(
            f"checkpoint format version {version!r} is not supported (this emacore reads "
            f"version {VERSION}{'; the file was written by a newer emacore' if newer else ''})"
        )
    state = doc.get("state")
    if not isinstance(state, dict):
        raise bad("metadata has no 'state' object")
    refs = _check_state(state, bad)
    tensors = _check_tensors(header, refs, bad, size - start)
    tree = doc.get("tree")
    if tree is not None:
        treedef = _decode_tree(tree, bad)
        names = sorted(_pytree.leaf_names(treedef))
        if names != sorted(state["leaves"]):
            raise bad(
                f"metadata 'tree' names the leaves {names[:10]} but the state's are "
                f"{sorted(state['leaves'])[:10]}"
            )
        tree = treedef
    writer = doc.get("writer", "")
    return _Checkpoint(path, state, tree, str(writer), meta, tensors, start, size)


def _check_state(  # noqa: C901 - one refusal per malformed reference, each naming its leaf: the format's rules in one place
    state: dict[str, Any], bad: Callable[[str], CheckpointError]
) -> dict[str, tuple[dict[str, Any], str | None]]:
    """Check the state dict's fields that emacore reads; return its references by name.

    Every field but the arrays is checked by `emacore._state_dict.check_state`, the one
    validation `load_state_dict` runs too; here, that each array is a reference to one.
    """
    try:
        state["leaves"] = check_state(state)  # typed: counters as Python numbers
    except StateDictError as exc:
        raise bad(str(exc)) from None
    leaves, copies = state["leaves"], state.setdefault("copies", {})
    refs: dict[str, tuple[dict[str, Any], str | None]] = {}
    for nm, rec in leaves.items():
        if not _is_ref(rec["shadow"]):
            raise bad(f"leaf {nm!r} has no 'shadow' array")
        for name, lane in rec.get("profiles", {}).items():
            if not _is_ref(lane["shadow"]):
                raise bad(f"leaf {nm!r}: profile {name!r} has no 'shadow' array")
        for ref in _refs(rec):
            # an average of integers is no average (a dtype no array may have: `_add_ref`)
            if ref.get("dtype") in _DTYPES and ref.get("dtype") not in _FLOATING:
                raise bad(
                    f"leaf {nm!r}: its shadow {ref.get(_REF)!r} is {ref.get('dtype')!r}; an "
                    f"averaged leaf's shadows are one of {_FLOATING}"
                )
            _add_ref(refs, ref, nm, bad)
    for nm, ref in copies.items():
        if not _is_ref(ref):
            raise bad(f"copied leaf {nm!r} is not an array")
        _add_ref(refs, ref, nm, bad)
    for key, value in state.items():
        if key not in ("leaves", "copies"):
            for ref in _refs(value):
                _add_ref(refs, ref, None, bad)
    return refs


def _is_ref(x: Any) -> bool:
    return isinstance(x, dict) and _REF in x


def _refs(value: Any) -> Iterator[dict[str, Any]]:
    """Every array reference inside a JSON value."""
    if _is_ref(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


def _add_ref(
    refs: dict[str, tuple[dict[str, Any], str | None]],
    ref: dict[str, Any],
    owner: str | None,
    bad: Callable[[str], CheckpointError],
) -> None:
    name, dtype, shape = ref.get(_REF), ref.get("dtype"), ref.get("shape")
    if set(ref) != {_REF, "dtype", "shape"} or not isinstance(name, str):
        raise bad(f"malformed array reference {str(ref)[:100]}")
    if dtype not in _DTYPES:
        raise bad(f"array {name!r}: dtype must be one of {_DTYPES}, got {dtype!r}")
    if not _is_shape(shape):
        raise bad(f"array {name!r}: shape must be at most {_MAX_NDIM} sizes >= 0, got {shape!r}")
    if name in refs:
        raise bad(f"two arrays are stored as {name!r}")
    refs[name] = (ref, owner)


def _decode_tree(tree: Any, bad: Callable[[str], CheckpointError]) -> Any:
    """The inverse of `_encode_tree`, checking every node."""
    if tree == "*":
        return _pytree.LEAF
    if tree == ["none"]:
        return ("none",)
    if isinstance(tree, list) and len(tree) == 2 and isinstance(tree[1], list):
        kind, children = tree
        if kind in ("list", "tuple"):
            return (kind, tuple(_decode_tree(c, bad) for c in children))
        if kind == "dict":
            keys: list[str] = []
            subs = []
            for item in children:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                    raise bad(f"malformed dict entry in metadata 'tree': {str(item)[:100]}")
                if item[0] in keys:
                    raise bad(f"metadata 'tree' has the dict key {item[0]!r} twice")
                keys.append(item[0])
                subs.append(_decode_tree(item[1], bad))
            order = sorted(range(len(keys)), key=keys.__getitem__)  # flatten's key order
            return ("dict", dict, tuple(keys[i] for i in order), tuple(subs[i] for i in order))
    raise bad(f"malformed node in metadata 'tree': {str(tree)[:100]}")


def _check_tensors(  # noqa: C901 - safetensors' header rules by hand; goes when checkpoint reads through safetensors (issue 13 item 8)
    header: dict[str, Any],
    refs: Mapping[str, tuple[dict[str, Any], str | None]],
    bad: Callable[[str], CheckpointError],
    data_len: int,
) -> dict[str, _Tensor]:
    """Check the safetensors entries against the data size and emacore's references."""
    missing = sorted(set(refs) - set(header))
    extra = sorted(set(header) - set(refs))
    if missing or extra:
        raise bad(
            f"the tensors do not match the metadata: no tensor for {missing[:10]}, tensors "
            f"the metadata does not name {extra[:10]}"
        )
    tensors: dict[str, _Tensor] = {}
    for nm, (ref, owner) in refs.items():
        spec = header[nm]
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {nm!r}: expected dtype, shape and data_offsets, got {spec!r}")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(code, str) or code not in _CODES:
            raise bad(f"tensor {nm!r}: unsupported dtype {code!r}")
        numpy_dtype, stored = _CODES[code]
        want = "float32" if ref["dtype"] == "bfloat16" else ref["dtype"]
        if stored != want:
            raise bad(f"tensor {nm!r} is stored as {code} but the metadata says {ref['dtype']}")
        # checked on its own first: `[true, 2] == [1, 2]`, and a float size equals an int one
        if not _is_shape(shape):
            raise bad(
                f"tensor {nm!r}: shape must be a list of at most {_MAX_NDIM} integers >= 0, got "
                f"{shape!r}"
            )
        if shape != ref["shape"]:
            raise bad(f"tensor {nm!r} has shape {shape!r} but the metadata says {ref['shape']}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise bad(
                f"tensor {nm!r}: data_offsets {offsets!r} are not within the {data_len} bytes "
                "of data"
            )
        nbytes = math.prod(shape) * int(numpy_dtype[2:])
        if offsets[1] - offsets[0] != nbytes:
            raise bad(
                f"tensor {nm!r}: a {code} array of shape {shape} is {nbytes} bytes, its "
                f"data_offsets span {offsets[1] - offsets[0]}"
            )
        tensors[nm] = _Tensor(ref, owner, numpy_dtype, tuple(shape), offsets[0], offsets[1])
    # safetensors' rule: the tensors tile the data exactly, without holes or overlaps
    position = 0
    for nm, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.begin != position:
            raise bad(f"tensor {nm!r} starts at byte {t.begin}, expected {position}")
        position = t.end
    if position != data_len:
        raise bad(f"the tensors cover {position} bytes of data, the file holds {data_len}")
    return tensors


def _read_arrays(ckpt: _Checkpoint, names: Sequence[str]) -> dict[str, Any]:
    """The named tensors as fresh, writable numpy arrays (bfloat16 ones as float32)."""
    np = _numpy()
    out: dict[str, Any] = {}
    with open(ckpt.path, "rb") as f:
        if os.fstat(f.fileno()).st_size != ckpt.size:
            raise CheckpointError(f"{ckpt.path}: the file changed while being read")
        for nm in names:
            t = ckpt.tensors[nm]
            n = math.prod(t.shape)
            f.seek(ckpt.data_start + t.begin)
            if t.numpy_dtype == "|b1":  # any nonzero byte is True: never a malformed numpy bool
                arr = np.fromfile(f, dtype=np.uint8, count=n) != 0
            else:
                arr = np.fromfile(f, dtype=np.dtype(t.numpy_dtype), count=n)
                if not arr.dtype.isnative:
                    arr = arr.astype(arr.dtype.newbyteorder("="))
            if arr.size != n:
                raise CheckpointError(f"{ckpt.path}: tensor {nm!r} is truncated")
            out[nm] = arr.reshape(t.shape)
    return out


def _shown(value: Any) -> Any:
    """A JSON value with each array reference shown as its dtype and shape."""
    if _is_ref(value):
        return {"dtype": value["dtype"], "shape": list(value["shape"])}
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return value


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return what a checkpoint holds, checked, without reading its arrays.

    Parameters
    ----------
    path : str or path-like
        A file written by `save`.

    Returns
    -------
    dict
        ``format`` and ``version`` (of the file), ``writer`` (the emacore that wrote it),
        ``has_tree`` (whether `load_state` can rebuild the pytree without ``like=``),
        ``metadata`` (the extra text given to `save`), the state dict's own fields (``name``,
        ``zero_debias``, ``compat``, ``schedule`` as its ``spec()`` or repr, ...; its
        ``version`` as ``state_version``), and ``leaves``: one dict per leaf, averages in
        order then copies, with ``name``, ``role`` (``"average"`` or ``"copy"``), ``dtype``,
        ``shape`` and the leaf's other fields (``count``, ``decay_product``, ``last_decay``,
        ``keyed_by``...; arrays shown as their dtype and shape).

    Raises
    ------
    CheckpointError
        The file is not a well-formed emacore checkpoint.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import emacore
    >>> ema = emacore.ExponentialMovingAverage(0.9)
    >>> ema.apply({"w": np.zeros(3, np.float32)})
    >>> path = os.path.join(tempfile.mkdtemp(), "ema.safetensors")
    >>> emacore.save(ema, path)
    >>> info = emacore.checkpoint.describe(path)
    >>> info["leaves"][0]["name"], info["leaves"][0]["dtype"], info["leaves"][0]["count"]
    ('w', 'float32', 1)
    """
    ckpt = _read(path)
    state = ckpt.state
    out = {k: _shown(v) for k, v in state.items() if k not in ("leaves", "copies", "format")}
    out["state_version"] = out.pop("version", None)
    out.update(
        format=FORMAT,
        version=VERSION,
        writer=ckpt.writer,
        has_tree=ckpt.tree is not None,
        metadata=dict(ckpt.user_metadata),
    )
    averaged = sorted(state["leaves"].items(), key=lambda item: item[1].get("order") or 0)
    leaves = []
    for nm, rec in averaged:
        fields = {k: _shown(v) for k, v in rec.items() if k != "shadow"}
        shadow = rec["shadow"]
        leaves.append(
            {"name": nm, "role": "average", **_shown(shadow), **fields},
        )
    for nm, ref in state["copies"].items():
        leaves.append({"name": nm, "role": "copy", **_shown(ref)})
    out["leaves"] = leaves
    return out


# -- converting to the target library -------------------------------------------------------


@dataclass(frozen=True)
class _Like:
    """Load an array for ``array`` (a shadow, or a parameter of ``load_state``'s ``like=``).

    Its backend's `Backend.from_host` makes it: that backend's array type, on ``array``'s
    device or sharding, and on ``device`` after that where one is given.
    """

    backend: Backend
    array: Any
    device: Any = None


def _convert(arr: Any, saved: str, name: str, target: Any, device: Any) -> Any:
    """``arr`` (numpy, fresh) as a ``saved`` array for ``target``, dtype checked.

    ``target`` is a `_Like` (the array it is loaded for), or a namespace to make it with
    (None: numpy) on ``device``.
    """
    if isinstance(target, _Like):
        out, library = _from_host(arr, saved, name, target), target.backend.name
    else:
        np = _numpy()
        if target is None or target is np:
            if device is not None and device != "cpu":
                raise CheckpointError(f"numpy arrays live on 'cpu', not {device!r}; pass xp=")
            return arr  # bfloat16 stays float32: numpy has no bfloat16
        out, library = _by_namespace(arr, saved, name, target, device)
    got = dtype_label(out.dtype)
    if got != saved:
        raise CheckpointError(
            f"array {name!r} was saved as {saved}, but {library} made it {got} (JAX keeps 64-bit "
            "types only with jax_enable_x64)"
        )
    return out


def _from_host(arr: Any, saved: str, name: str, like: _Like) -> Any:
    """``arr`` made by ``like``'s backend: its `Backend.from_host`, then ``to_device``."""
    backend, x = like.backend, like.array
    dtype: str | None = saved
    if saved == dtype_label(x.dtype):
        dtype = None  # the dtype of the array it is loaded for
    elif saved == "bfloat16" and getattr(backend.namespace(x), "bfloat16", None) is None:
        return arr  # a library without bfloat16 keeps the exact float32 values (numpy's)
    try:
        out = backend.from_host(arr, x, dtype)
        return out if like.device is None else backend.to_device(out, like.device)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"array {name!r}: backend {backend.name!r} could not make a {saved} array of "
            f"shape {tuple(arr.shape)} like its {x.dtype} one ({exc})"
        ) from None


def _by_namespace(arr: Any, saved: str, name: str, xp: Any, device: Any) -> tuple[Any, str]:
    """``arr`` made with the namespace ``xp`` on ``device``, and the library's name."""
    library = getattr(xp, "__name__", repr(xp))
    try:
        out = xp.asarray(arr) if device is None else xp.asarray(arr, device=device)
    except Exception as exc:  # whatever the library raises for a device or dtype it lacks
        raise CheckpointError(
            f"array {name!r}: {library} could not make a {saved} array of shape {tuple(arr.shape)}"
            f"{'' if device is None else f' on {device!r}'} ({exc})"
        ) from None
    if saved == "bfloat16":
        ns = _plugins.resolve(out).namespace(out)
        bf16 = getattr(ns, "bfloat16", None)
        if bf16 is not None:  # a library without bfloat16 keeps the exact float32 values
            out = ns.astype(out, bf16)
    return out, library


def _like(x: Any, device: Any = None) -> _Like:
    """Load an array for the existing array ``x`` (then onto ``device``, if given)."""
    return _Like(_plugins.resolve(x), x, device)


def _materialize(value: Any, arrays: Mapping[str, Any]) -> Any:
    if _is_ref(value):
        return arrays[value[_REF]]
    if isinstance(value, dict):
        return {k: _materialize(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialize(v, arrays) for v in value]
    return value


def _state_dict(
    ckpt: _Checkpoint,
    targets: Callable[[str | None], tuple[Any, Any]],
    keep: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The state dict of ``ckpt`` (only the leaves in ``keep``), converted per ``targets``."""
    state = ckpt.state
    if keep is not None:
        wanted = set(keep)
        state = {
            **state,
            "leaves": {nm: r for nm, r in state["leaves"].items() if nm in wanted},
            "copies": {nm: r for nm, r in state["copies"].items() if nm in wanted},
        }
    names = [ref[_REF] for ref in _refs(state)]
    host = _read_arrays(ckpt, names)
    arrays = {}
    for nm in names:
        t = ckpt.tensors[nm]
        xp, device = targets(t.owner)
        arrays[nm] = _convert(host.pop(nm), t.ref["dtype"], nm, xp, device)
    out: dict[str, Any] = _materialize(state, arrays)
    return out


# -- loading ----------------------------------------------------------------------------------


def load(path: str | os.PathLike[str], *, xp: Any = None, device: Any = None) -> dict[str, Any]:
    """Read a checkpoint as a state dict (the format of `ExponentialMovingAverage.state_dict`).

    Parameters
    ----------
    path : str or path-like
        A file written by `save`.
    xp : array namespace, optional
        The library to make the arrays with: ``numpy`` (default), ``torch``, ``jax.numpy``,
        any array-API namespace with ``asarray``.
    device : optional
        The device to put them on (``xp.asarray(..., device=device)``).

    Returns
    -------
    dict
        Plain dicts, lists, numbers and strings plus the arrays; pass it to
        `ExponentialMovingAverage.load_state_dict` (or use `load_into`, which also checks
        shapes and dtypes against the EMA and converts to its library).

    Raises
    ------
    CheckpointError
        The file is malformed, or ``xp`` cannot hold an array's dtype.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import emacore
    >>> ema = emacore.ExponentialMovingAverage(0.5)
    >>> ema.apply({"w": np.zeros(2)}); ema.apply({"w": np.ones(2)})
    >>> path = os.path.join(tempfile.mkdtemp(), "ema.safetensors")
    >>> emacore.save(ema, path)
    >>> emacore.load(path)["leaves"]["w"]["shadow"]
    array([0.5, 0.5])
    """
    return _state_dict(_read(path), lambda _: (xp, device))


def load_into(
    ema: ExponentialMovingAverage,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    xp: Any = None,
    device: Any = None,
) -> LoadResult:
    """Load a checkpoint into ``ema``, checking it against what ``ema`` tracks first.

    Each array is made with the library and on the device of the shadow it replaces, so a
    checkpoint saved from numpy loads into a torch EMA on the GPU, and the other way round.

    Parameters
    ----------
    ema : ExponentialMovingAverage
        The EMA to restore. If it tracks leaves already (it was applied once), the checkpoint
        must match them; if it tracks nothing yet, it takes the checkpoint's leaves.
    path : str or path-like
        A file written by `save`.
    strict : bool
        Require the checkpoint's leaves to be exactly the tracked ones. Otherwise leaves
        missing from the checkpoint keep their state and unexpected ones are ignored.
    xp : array namespace, optional
        The library to make the shadows with when ``ema`` tracks nothing yet: ``numpy``
        (default), ``torch``, ``jax.numpy``... Otherwise each array takes the library of the
        shadow it replaces.
    device : optional
        With ``xp``, the device for those shadows (default: ``xp``'s default device).

    Returns
    -------
    LoadResult
        ``missing_keys`` and ``unexpected_keys``, as `ExponentialMovingAverage.load_state_dict`.

    Raises
    ------
    StateDictError
        With ``strict``, the leaves differ (every missing and unexpected name is listed); in
        any mode, a leaf's shape or dtype differs from its tracked shadow's, a leaf averaged
        here is a copy in the file (or the other way round), or the state does not fit this
        EMA (``zero_debias``, ``compat``, decay profiles). Nothing changes then.
    CheckpointError
        The file is malformed (a `StateDictError` too).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import emacore
    >>> ema = emacore.ExponentialMovingAverage(0.9)
    >>> ema.apply({"w": np.ones(2)})
    >>> path = os.path.join(tempfile.mkdtemp(), "ema.safetensors")
    >>> emacore.save(ema, path)
    >>> emacore.load_into(emacore.ExponentialMovingAverage(0.9), path)
    LoadResult(missing_keys=[], unexpected_keys=[])
    """
    ckpt = _read(path)
    current = ema.state_dict()
    tracked: dict[str, tuple[str, Any]] = {
        **{nm: ("average", rec["shadow"]) for nm, rec in current["leaves"].items()},
        **{nm: ("copy", arr) for nm, arr in current["copies"].items()},
    }
    for key in ("zero_debias", "compat"):
        if ckpt.state[key] != current[key]:
            raise StateDictError(
                f"{ckpt.path} was saved with {key}={ckpt.state[key]!r}, this EMA has "
                f"{key}={current[key]!r}"
            )
    saved: dict[str, tuple[str, dict[str, Any]]] = {
        **{nm: ("average", rec["shadow"]) for nm, rec in ckpt.state["leaves"].items()},
        **{nm: ("copy", ref) for nm, ref in ckpt.state["copies"].items()},
    }
    problems = _differences(saved, tracked, strict)
    if problems:
        raise StateDictError(f"{ckpt.path} does not match this EMA: " + "; ".join(problems))

    def targets(owner: str | None) -> tuple[Any, Any]:
        if owner in tracked:
            return _like(tracked[owner][1]), None
        return xp, device

    keep = [nm for nm in saved if not tracked or nm in tracked]
    result = ema.load_state_dict(_state_dict(ckpt, targets, keep), strict=strict)
    # leaves the EMA does not track were not read; report them as load_state_dict does
    unexpected = sorted(set(saved) - set(tracked)) if tracked else []
    return LoadResult(result.missing_keys, unexpected)


def _differences(
    saved: Mapping[str, tuple[str, dict[str, Any]]],
    tracked: Mapping[str, tuple[str, Any]],
    strict: bool,
) -> list[str]:
    """Every way the checkpoint's leaves differ from the tracked ones, as messages."""
    if not tracked:
        return []
    problems = []
    missing = sorted(set(tracked) - set(saved))
    unexpected = sorted(set(saved) - set(tracked))
    if strict and missing:
        problems.append(f"missing leaves (tracked, not in the file) {missing}")
    if strict and unexpected:
        problems.append(f"unexpected leaves (in the file, not tracked) {unexpected}")
    verb = {"average": "averaged", "copy": "copied"}
    for nm in sorted(set(saved) & set(tracked)):
        (role, ref), (here, arr) = saved[nm], tracked[nm]
        if role != here:
            problems.append(f"leaf {nm!r} is {verb[here]} here but {verb[role]} in the file")
        if tuple(ref["shape"]) != tuple(arr.shape):
            problems.append(
                f"leaf {nm!r} has shape {tuple(ref['shape'])} in the file, {tuple(arr.shape)} here"
            )
        if ref["dtype"] != dtype_label(arr.dtype):
            problems.append(f"leaf {nm!r} is {ref['dtype']} in the file, {arr.dtype} here")
    return problems


def load_state(
    path: str | os.PathLike[str],
    like: Any = None,
    *,
    xp: Any = None,
    device: Any = None,
) -> EMAState:
    """Read a checkpoint as an `EMAState` for the functional API.

    Parameters
    ----------
    path : str or path-like
        A file written by `save` (from an `EMAState` or an `ExponentialMovingAverage`).
    like : pytree of arrays, optional
        The parameters (or any tree with their structure and names): the state takes its
        structure, and each shadow its leaf's library and device. Needed when the file holds
        no structure (saved from an `ExponentialMovingAverage`, or a tree with namedtuples).
        Copied leaves in the file (buffers of a module) are left out; ``like`` naming one is
        an error, since an `EMAState` holds no copies.
    xp : array namespace, optional
        The library to make the shadows with (default: ``like``'s, else numpy).
    device : optional
        Put the shadows on this device; it becomes the state's ``device`` (offloading), as
        ``init(..., device=...)``. Default: ``like``'s leaves' devices.

    Returns
    -------
    EMAState
        Counters as Python numbers.

    Raises
    ------
    StateDictError
        ``like``'s leaves are not the file's averaged leaves (all differences listed), or a
        shape differs.
    CheckpointError
        The file is malformed, holds no structure and ``like`` is not given, holds what an
        `EMAState` cannot (several decay profiles), or its averaged leaves do not share one
        count and decay product (an `ExponentialMovingAverage` created them at different
        steps: load it with `load_into`).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from emacore import functional as F
    >>> import emacore
    >>> state = F.update(F.init({"w": np.zeros(2)}), {"w": np.ones(2)}, decay=0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
    >>> emacore.save(state, path)
    >>> emacore.load_state(path).shadow
    {'w': array([0.5, 0.5])}
    """
    ckpt = _read(path)
    leaves = ckpt.state["leaves"]
    extra = sorted(
        {k for rec in leaves.values() for k, v in rec.items() if v and k not in _STATE_FIELDS}
    )
    if extra or ckpt.state.get("profiles"):
        raise CheckpointError(
            f"{ckpt.path} holds per-leaf state an EMAState has no place for "
            f"({extra or ['profiles']}): load it into an ExponentialMovingAverage with load_into"
        )
    groups = {(r["count"], r["decay_product"], r["last_decay"]) for r in leaves.values()}
    if len(groups) > 1:
        raise CheckpointError(
            f"{ckpt.path}: its leaves have {len(groups)} different counters (count, decay "
            f"product, last decay) {sorted(groups)[:4]}; an EMAState has one. Load it into an "
            "ExponentialMovingAverage with load_into"
        )
    count, product, last = groups.pop() if groups else (0, 1.0, 1.0)
    if like is not None:
        like_leaves, treedef = _pytree.flatten(like)
        names = list(_pytree.leaf_names(treedef))
        _check_like(ckpt, names, like_leaves)
        where: dict[str, Any] = dict(zip(names, like_leaves))
    else:
        treedef = ckpt.tree
        if treedef is None:
            raise CheckpointError(
                f"{ckpt.path} holds no tree structure (saved from an ExponentialMovingAverage, "
                "or a tree with namedtuples or framework containers): pass like= the parameters"
            )
        names = list(_pytree.leaf_names(treedef))
        where = {}

    def target(owner: str | None) -> tuple[Any, Any]:
        x = where.get(owner) if owner is not None else None
        if x is not None and xp is None:  # its leaf's backend makes it, where the leaf is
            return _like(x, device), None
        return xp, (device if device is not None or x is None else _plugins.resolve(x).device(x))

    state = _state_dict(ckpt, target, names)
    shadows = [state["leaves"][nm]["shadow"] for nm in names]
    return EMAState(
        _pytree.unflatten(treedef, shadows),
        count=count,
        decay_product=product,
        last_decay=last,
        zero_debias=ckpt.state["zero_debias"],
        compat=ckpt.state["compat"],
        device=device,
    )


def _check_like(ckpt: _Checkpoint, names: Sequence[str], leaves: Sequence[Any]) -> None:
    averaged, copies = ckpt.state["leaves"], ckpt.state["copies"]
    problems = []
    copied = sorted(n for n in names if n in copies)
    missing = sorted(n for n in names if n not in averaged and n not in copies)
    unexpected = sorted(set(averaged) - set(names))
    if copied:
        problems.append(f"leaves {copied} are copies in the file, not averages")
    if missing:
        problems.append(f"leaves {missing} of like= are not in the file")
    if unexpected:
        problems.append(f"averaged leaves {unexpected} of the file are not in like=")
    for nm, x in zip(names, leaves):
        rec = averaged.get(nm)
        if rec is not None and tuple(rec["shadow"]["shape"]) != tuple(x.shape):
            problems.append(
                f"leaf {nm!r} has shape {tuple(rec['shadow']['shape'])} in the file, "
                f"{tuple(x.shape)} in like="
            )
    if problems:
        raise StateDictError(f"{ckpt.path} does not match like=: " + "; ".join(problems))
