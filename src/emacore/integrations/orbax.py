"""Sharded checkpoints of a JAX EMA through orbax-checkpoint.

`emacore.save` writes whole arrays to one portable file; for shadows sharded over a mesh, and
over several processes, `save` here writes them the way orbax writes a model: each process its
own shards, in parallel, to a directory every process can reach. The counters, names and
options go beside them as JSON (orbax's ``JsonSave``): no pickle.

`load_into` restores into an EMA that already tracks the same leaves (apply it once to the
model first): each shadow is read directly into the sharding of the shadow it replaces, so a
checkpoint saved on one mesh (or number of processes) loads onto another.

orbax is imported on first use; ``pip install orbax-checkpoint``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emacore._ema import ExponentialMovingAverage
from emacore._precision import dtype_label
from emacore._state_dict import LoadResult, check_options, check_state
from emacore.errors import StateDictError

__all__ = ["load_into", "save"]

_ARRAY = "__array__"  # marks an array's place in the JSON part


def _orbax() -> Any:
    try:
        return importlib.import_module("orbax.checkpoint")
    except ImportError as exc:
        raise ImportError(
            "emacore.integrations.orbax needs orbax-checkpoint: pip install orbax-checkpoint"
        ) from exc


def _split(tree: Any, path: str, arrays: dict[str, Any]) -> Any:
    """The JSON part of a state dict; its arrays go to ``arrays`` under their key paths."""
    if isinstance(tree, Mapping):
        return {
            str(k): _split(v, f"{path}/{k}" if path else str(k), arrays) for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{path}/{i}", arrays) for i, v in enumerate(tree)]
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        arrays[path] = tree
        return {_ARRAY: path}
    return tree


def _join(tree: Any, arrays: Mapping[str, Any]) -> Any:
    if isinstance(tree, Mapping):
        if set(tree) == {_ARRAY}:
            key = tree[_ARRAY]
            if key not in arrays:
                raise StateDictError(f"checkpoint names an array {key!r} it does not hold")
            return arrays[key]
        return {k: _join(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, arrays) for v in tree]
    return tree


def _stored(ocp: Any, path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shape and dtype of every array the checkpoint holds, read from orbax's metadata."""
    try:
        tree = ocp.StandardCheckpointHandler().metadata(Path(path) / "arrays").tree
    except (OSError, ValueError) as exc:
        raise StateDictError(f"{path}: cannot read the arrays' metadata ({exc})") from exc
    return {k: (tuple(m.shape), dtype_label(m.dtype)) for k, m in tree.items()}


def _host_struct(shape: tuple[int, ...], dtype: str) -> Any:
    """Where to read an array that is loaded only to be left out: this process's device."""
    jax = importlib.import_module("jax")  # imported on first use, as orbax is
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(shape, dtype, sharding=device)


def save(ema: ExponentialMovingAverage, directory: str | os.PathLike[str]) -> None:
    """Write ``ema``'s state to ``directory`` (new), every shadow sharded as it is.

    Call it on every process (each writes its own shards); it returns once the checkpoint is
    complete on disk.

    Examples
    --------
    >>> import tempfile, jax.numpy as jnp
    >>> ema = ExponentialMovingAverage(0.9)
    >>> ema.apply({"w": jnp.ones(4)})
    >>> save(ema, tempfile.mkdtemp() + "/ema")
    """
    ocp = _orbax()
    found: dict[str, Any] = {}
    meta = _split(ema.state_dict(), "", found)
    # orbax names arrays by their dict keys: plain ones, mapped to the key paths in the JSON
    keys = {path: f"a{i}" for i, path in enumerate(sorted(found))}
    meta = {"state": meta, "arrays": keys}
    arrays = {keys[path]: x for path, x in found.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            os.path.abspath(os.fspath(directory)),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )


def load_into(
    ema: ExponentialMovingAverage, directory: str | os.PathLike[str], *, strict: bool = True
) -> LoadResult:
    """Restore ``ema`` from ``directory``, each shadow read into its current sharding.

    ``ema`` must track the checkpoint's leaves already (apply it to the model once): their
    shadows give every array's shape, dtype and sharding. Then as
    `ExponentialMovingAverage.load_state_dict`.

    With ``strict=False``, leaves the checkpoint holds and ``ema`` does not track are read
    and left out (reported as unexpected); tracked leaves it lacks keep their state.

    Raises
    ------
    StateDictError
        The checkpoint's leaves (with ``strict``), shapes, dtypes or options differ from
        ``ema``'s (nothing changes).
    """
    ocp = _orbax()
    path = os.path.abspath(os.fspath(directory))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, Mapping) or not isinstance(meta.get("arrays"), Mapping):
            raise StateDictError(f"{path} is not an emacore orbax checkpoint")
        keys: Mapping[str, str] = meta["arrays"]
        # the one validation of a state dict's fields (a file's, load_state_dict's), and the
        # EMA's options, before any array is read
        check_state(meta.get("state"))
        check_options(meta["state"], ema.zero_debias, ema.compat, ema.profiles)
        current: dict[str, Any] = {}
        _split(ema.state_dict(), "", current)
        missing = sorted(p for p in keys if p not in current)
        if missing and strict:
            raise StateDictError(
                f"the EMA does not track what the checkpoint holds: {missing[:10]} (apply it to "
                "the model first, so its shadows give the shardings to restore into)"
            )
        stored = _stored(ocp, path)
        target = {}
        for p, k in keys.items():
            if k not in stored:
                raise StateDictError(f"{path}: the array of {p!r} is missing")
            shape, dtype = stored[k]
            if p not in current:  # not tracked, and not strict: read, then left out
                target[k] = _host_struct(shape, dtype)
                continue
            want = (tuple(current[p].shape), dtype_label(current[p].dtype))
            if (shape, dtype) != want:  # orbax would fail on a shape, cast a dtype
                raise StateDictError(
                    f"{p!r}: the checkpoint holds {dtype}{list(shape)}, the EMA tracks "
                    f"{want[1]}{list(want[0])}; nothing was loaded"
                )
            target[k] = current[p]
        restored = ckptr.restore(
            path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target))
        )["arrays"]
    by_path = {p: restored[k] for p, k in keys.items()}
    return ema.load_state_dict(_join(meta["state"], by_path), strict=strict)
