"""Put a torch model's parameters in one contiguous buffer, so its EMA update is one kernel.

An EMA update reads every parameter and reads and writes every shadow: on large models its time
is memory bandwidth. Parameters allocated one by one cost, beyond that, one kernel launch each
(``torch._foreach_lerp_`` loops over them on CPU), which on ResNet-50 is about 5% of the step.
When the parameters of a (device, dtype) are pieces of one buffer, emacore's torch backend lays
their shadows out the same way and updates them with a single ``lerp_`` between the two
buffers: the memory-bandwidth floor.

`flatten_parameters` moves the parameters there, in place. It is what Megatron-LM's contiguous
parameter buffers and FSDP1's ``use_orig_params`` do for their own reasons; parameters that
already live in such buffers need nothing.

Examples
--------
>>> import torch
>>> import emacore
>>> from emacore.integrations.flatten import flatten_parameters
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> buffers = flatten_parameters(model)  # before the optimizer, DDP or torch.compile see it
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> ema = emacore.ExponentialMovingAverage(0.999)
>>> ema.apply(model)  # one lerp_ per step over the buffer, nothing gathered
>>> len(buffers), buffers[0].numel() >= sum(p.numel() for p in model.parameters())
(1, True)
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterable
from typing import Any

__all__ = ["ALIGN_BYTES", "flatten_parameters"]

ALIGN_BYTES = 64
"""Where each parameter starts in its buffer: a multiple of this many bytes (a cache line)."""


def flatten_parameters(model: Any, *, align_bytes: int = ALIGN_BYTES) -> list[Any]:  # noqa: C901 - every refusal before the first storage moves
    """Move the parameters into one contiguous buffer per (device, dtype), in place.

    Each parameter keeps its object, value, shape, dtype, device and ``requires_grad``: only its
    storage changes (``p.data`` becomes a view of the buffer, as FSDP1's ``use_orig_params``
    makes them). Optimizers, hooks and an EMA that track the parameter objects keep working;
    state that holds the old storage itself (a ``state_dict()`` taken before, DDP's buckets)
    does not follow, so call this right after building the model.

    Parameters
    ----------
    model : torch.nn.Module or iterable of torch.Tensor
        A module (its ``parameters()``, each once) or the tensors to move.
    align_bytes : int
        Each parameter starts at a multiple of this many bytes into its buffer (the padding
        between them is zeros).

    Returns
    -------
    list of torch.Tensor
        The 1-d buffers, one per (device, dtype), in order of first appearance.

    Raises
    ------
    TypeError
        A leaf is not a plain strided ``torch.Tensor`` (a DTensor, a sparse tensor).
    ValueError
        A parameter is not contiguous (channels-last weights keep their own layout), two
        parameters overlap in memory (views tied to each other: flattening would untie them), or
        ``align_bytes`` is not positive.
    """
    torch = importlib.import_module("torch")
    if align_bytes <= 0:
        raise ValueError(f"flatten_parameters: align_bytes must be positive, got {align_bytes}")
    named = _named(model, torch)
    storages: dict[int, list[tuple[str, Any]]] = {}
    for name, p in named:
        if type(p) not in (torch.Tensor, torch.nn.Parameter) or p.layout != torch.strided:
            raise TypeError(
                f"flatten_parameters: {name} is a {type(p).__name__} with layout {p.layout}; "
                "only plain strided tensors can move into a buffer"
            )
        if not p.is_contiguous():
            raise ValueError(
                f"flatten_parameters: {name} (shape {tuple(p.shape)}, strides {p.stride()}) is "
                "not contiguous; flattening would change its memory format"
            )
        if p.data_ptr():  # meta tensors (no memory) all point at 0: none overlaps another
            storages.setdefault(p.untyped_storage().data_ptr(), []).append((name, p))
    for pieces in storages.values():  # pieces of one buffer may move, views that overlap not
        pieces.sort(key=lambda piece: piece[1].storage_offset())
        for (a, x), (b, y) in itertools.pairwise(pieces):
            if x.storage_offset() + x.numel() > y.storage_offset():
                raise ValueError(
                    f"flatten_parameters: {a} and {b} overlap in memory (tied through views); "
                    "flattening would untie them"
                )
    groups: dict[tuple[Any, Any], list[Any]] = {}
    for _, p in named:
        groups.setdefault((p.device, p.dtype), []).append(p)
    buffers = []
    with torch.no_grad():
        for (device, dtype), params in groups.items():
            step = max(1, align_bytes // torch.empty((), dtype=dtype).element_size())
            offsets, end = [], 0
            for p in params:
                offsets.append(end)
                end += -(-p.numel() // step) * step
            buffer = torch.zeros(end, device=device, dtype=dtype)
            for p, offset in zip(params, offsets):
                view = buffer[offset : offset + p.numel()].view(p.shape)
                view.copy_(p)
                p.data = view
            buffers.append(buffer)
    return buffers


def _named(model: Any, torch: Any) -> list[tuple[str, Any]]:
    """``(name, tensor)`` pairs: a module's parameters by name, or tensors by position."""
    if isinstance(model, torch.nn.Module):
        return list(model.named_parameters())
    if isinstance(model, torch.Tensor) or not isinstance(model, Iterable):
        raise TypeError(
            "flatten_parameters: give an nn.Module or an iterable of tensors, got "
            f"{type(model).__name__}"
        )
    seen: set[int] = set()
    out = []
    for i, p in enumerate(model):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"flatten_parameters: item #{i} is a {type(p).__name__}, not a tensor")
        if id(p) not in seen:
            seen.add(id(p))
            out.append((f"tensor #{i}", p))
    return out
