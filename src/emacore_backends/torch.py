"""The torch backend: ``torch.Tensor`` and ``nn.Parameter`` on any device, updated in place.

Design invariants:

* Updates run under ``torch.no_grad()``, in place, so shadows never join the autograd graph
  and no memory is allocated per step in the default mode.
* Shadows are grouped by (device, dtype). In a group, the shadows of small tensors live in one
  flat buffer: their parameters are gathered with one ``torch.cat`` (1-d ones as they are,
  the others through 1-d views cached while they keep their storage, shape and contiguity)
  and updated with one ``lerp_``, so thousands of small tensors cost one kernel, not
  thousands. Large tensors get one fused
  ``torch._foreach_lerp_`` per group.
* Parameters that are pieces of one storage (`flatten_parameters`, Megatron-style buffers,
  FSDP1's ``use_orig_params``) get shadows laid out as they are, in one flat buffer: the update
  is a single ``lerp_`` between the two buffers, at the memory-bandwidth floor, with nothing
  gathered.
* ``exact=True`` (``compat="tensorflow"`` or ``exact=True``) runs the reference kernel's three
  operations in its order instead of ``lerp``, so the numbers are numpy's and TF's bit for bit
  (with temporaries, as has a float32 shadow of a bfloat16 parameter).
* Every check happens before the first write (``Capabilities.self_checking``).
* Under ``torch.compile`` the plain ``_foreach`` path runs: it has nothing to cache.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from typing import Any, cast

import array_api_compat.torch as _xp
import torch

from emacore import ArrayAPIBackend
from emacore.backend import Capabilities, ShadowList
from emacore.errors import ReadOnlyError

__all__ = ["BACKEND", "TorchBackend"]

# Tensors with fewer elements than this share their group's flat buffer.
SMALL = 65_536
LAYOUTS = ("auto", "flat", "separate")
# Pieces of one storage are updated as one span when what lies between them is alignment
# padding (at most this many bytes each) or, in all, at most 1/8 of the span. The shadows'
# buffer mirrors the padding.
PADDING = 256


class _Group:
    """Shadows of one (device, dtype): a flat buffer for the small ones, the rest apart."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        small: list[int],
        large: list[int],
        offsets: list[int] | None = None,
        size: int = 0,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.size = size  # elements of `flat`: the small shadows (tiled: with padding)
        self.small, self.large = small, large
        self.members = small + large
        self.flat: torch.Tensor | None = None  # the small shadows, contiguous
        self.scratch: torch.Tensor | None = None  # gathered parameters, made on first use
        # 1-d views of the small parameters (None for a 1-d one: it is gathered as it is, and
        # not held here, so that it may die); for a tiled group, the one span they tile
        self.views: list[torch.Tensor | None] | None = None
        # what the small parameters were when `views` were made (see `key`)
        self.param_key: tuple[list[Any], ...] = ()
        # positions (among the small) of the parameters read through a view made earlier,
        # whose shapes and contiguity `key` compares; None: all of them
        self.watch: list[int] | None = None
        self.small_is_all = small == list(range(len(small)))
        # a tiled group: where each small parameter starts in the span of storage they share
        # (their shadows sit at the same places in `flat`)
        self.offsets = offsets
        self.missed = False  # the last update found other parameters, or moved storage

    def signature(self) -> tuple[Any, ...]:
        return (self.device, self.dtype, self.small, self.large, self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) must not keep views of the parameters it was updated from:
        # their copies would pass for the live parameters (same ids and pointers) and freeze
        state = dict(self.__dict__)
        state.update(views=None, param_key=(), watch=None, scratch=None, missed=False)
        return state

    def small_params(self, params: Sequence[Any]) -> Sequence[Any]:
        if self.small_is_all and len(params) == len(self.small):
            return params
        return [params[i] for i in self.small]

    def key(self, small: Sequence[Any]) -> tuple[list[Any], ...]:
        """What must be unchanged for the cached views to read the small parameters right.

        The ids and pointers of all of them, and the shapes and contiguity of those read
        through a view made earlier (`watch`): a view reads its piece of storage in the
        order of the parameter's shape and strides when it was made, and the same tensor on
        the same storage may have been given others since (``p.data = p.data.t()``,
        ``.view(...)``, ``.expand(...)``). Contiguous, with the same shape, it is read right.
        A 1-d parameter of a gathered group is read as it is by ``torch.cat``, which sees its
        strides afresh (a change of its length shows in the gathered size, `source`). A
        device changes only with the storage; a dtype of another size, only with the shape.
        """
        watched = small if self.watch is None else [small[k] for k in self.watch]
        return (
            list(map(id, small)),
            list(map(torch.Tensor.data_ptr, small)),
            list(map(torch.Tensor.size, watched)),
            list(map(torch.Tensor.is_contiguous, watched)),
        )

    def cached_views(self, params: Sequence[Any]) -> list[torch.Tensor] | None:
        """What to gather (the cached views), if the small parameters are as they were then.

        None if they changed, or nothing was cached. Notes whether they changed since the last
        update (`missed`): only then may the layout need a look.
        """
        small = self.small_params(params)
        key = self.key(small)
        self.missed = key != self.param_key
        if self.missed:
            self.param_key = key
            self.views = None
        return None if self.views is None else self._inputs(self.views, small)

    def _inputs(self, views: list[torch.Tensor | None], small: Sequence[Any]) -> list[torch.Tensor]:
        """The views, with each 1-d parameter in its place."""
        if self.watch is None or len(self.watch) == len(views):
            return cast("list[torch.Tensor]", views)  # no None among them
        if not self.watch:
            return small if isinstance(small, list) else list(small)
        return [p if v is None else v for v, p in zip(views, small)]

    def forget(self) -> None:
        """Drop the cached views (and the scratch a failed gather may have resized)."""
        self.views, self.param_key, self.watch, self.scratch = None, (), None, None

    def gather_views(
        self, shadows: Sequence[Any], params: Sequence[Any]
    ) -> list[torch.Tensor] | None:
        """Check the small parameters and return (and cache) their 1-d views.

        A tiled group returns the span its parameters tile, or None when they no longer tile
        it as its shadows do (then they are updated one by one).
        """
        small = self.small_params(params)
        for i, p in zip(self.small, small):
            _check_pair(i, shadows[i], p, self)
        made: list[torch.Tensor | None]
        if self.offsets is not None:
            assert self.flat is not None
            span = _span(small, self.offsets, self.flat.numel())
            self.watch = None
            if span is None:
                self.param_key, self.views = self.key(small), None
                return None
            made, cacheable = [span], True
        else:
            # 1-d parameters are gathered as they are; the others through 1-d views
            made = [None if p.dim() == 1 and _plain(p) else p.detach().reshape(-1) for p in small]
            # a non-contiguous parameter gives a copy, not a view: gather it afresh every step
            cacheable = all(v is None or v.data_ptr() == p.data_ptr() for v, p in zip(made, small))
            self.watch = [k for k, v in enumerate(made) if v is not None]
        self.param_key = self.key(small)
        self.views = made if cacheable else None
        return self._inputs(made, small)

    def source(self, views: list[torch.Tensor], checked: bool) -> torch.Tensor:
        """The small parameters as one flat tensor: the span they tile, or gathered.

        Unless the views were ``checked`` against the shadows just now, a gather that fails
        raises `_StaleViewsError`: a 1-d parameter got another length (torch then resizes
        the scratch, and warns) or another number of dimensions in place.
        """
        if self.offsets is not None:
            return views[0]
        assert self.flat is not None
        if self.scratch is None:
            self.scratch = torch.empty_like(self.flat)
        if checked:
            return torch.cat(views, out=self.scratch)
        try:
            out = torch.cat(views, out=self.scratch)
        except (RuntimeError, UserWarning):  # UserWarning: the resize, where it is an error
            out = None
        if out is None or out.shape != self.flat.shape:
            self.forget()
            raise _StaleViewsError
        return out

    def update_flat(self, source: torch.Tensor, c: Any, exact: bool) -> None:
        """Move the flat buffer of shadows toward ``source`` (which may be the scratch)."""
        assert self.flat is not None
        if not exact:
            self.flat.lerp_(source, c)
            return
        if self.scratch is None:
            self.scratch = torch.empty_like(self.flat)
        torch.sub(self.flat, source, out=self.scratch)
        self.flat.sub_(self.scratch.mul_(c))


# what `_prepare` returns for a group: the views to gather (None: nothing to gather), the
# positions, shadows and parameters for the `_foreach` call, and whether their dtypes mix
_Plan = tuple[list[torch.Tensor] | None, list[int], list[Any], list[Any], bool]


class _StaleViewsError(Exception):
    """A group's cached views no longer fit its parameters: check them again (`_gather`)."""


class _Layout:
    """How a ShadowList's tensors are laid out: the backend's notes, kept on the list.

    With a side stream (``side``), ``event`` marks the end of the last update queued on it;
    whoever reads the shadows, or writes the parameters, waits for it first (`wait`).
    """

    def __init__(
        self, groups: list[_Group], size: int, limit: float = 0, tile: bool = False
    ) -> None:
        self.groups = groups
        self.size = size
        # how `create_shadows` laid them out (its ``layout``), to lay them out again
        self.limit, self.tile = limit, tile
        # the parameters (ids, storage) the arrangement was last checked against (`_settle`)
        self.seen: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.side: Any = None
        self.event: Any = None
        # for DTensor parameters: the shadows are DTensors over these local shards, which
        # the groups update (shard-local: no communication)
        self.local: Sequence[Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy has no update in flight, and is checked against its parameters afresh
        state = dict(self.__dict__)
        state.update(side=None, event=None, seen=None)
        return state

    def wait(self) -> None:
        """Make the current stream wait for the update queued on the side stream."""
        event, self.event = self.event, None
        if event is not None:
            STREAMS.current(self.groups[0].device).wait_event(event)
        _PENDING.discard(self)

    @staticmethod
    def loose(shadows: Sequence[Any]) -> _Layout:
        keys: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, s in enumerate(shadows):
            keys.setdefault((s.device, s.dtype), []).append(i)
        groups = [_Group(dev, dt, [], idx) for (dev, dt), idx in keys.items()]
        layout = _Layout(groups, len(shadows))
        layout.seen = ((), ())  # not laid out by us: never laid out again
        return layout


_DTENSOR: Any = None  # torch.distributed.tensor.DTensor, once something could be one


def _dtensor_type() -> Any:
    global _DTENSOR
    if _DTENSOR is None:
        if not torch.distributed.is_available():
            _DTENSOR = ()
        else:
            from torch.distributed.tensor import DTensor

            _DTENSOR = DTensor
    return _DTENSOR


def _is_dtensor(x: Any) -> bool:
    return isinstance(x, _dtensor_type())


def _local(x: Any) -> Any:
    """A DTensor's shard on this process (no communication); other tensors as they are."""
    return x._local_tensor if _is_dtensor(x) else x


class _CudaStreams:
    """The stream operations the side-stream update needs (tests may swap in a recorder)."""

    def current(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def new(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def using(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def keep(self, tensor: torch.Tensor, stream: Any) -> None:
        # the caching allocator must not hand the memory out again before the side stream
        # has read it, should the tensor be freed meanwhile
        tensor.record_stream(stream)


STREAMS: Any = _CudaStreams()
# layouts whose last update may still be running on their side stream
_PENDING: weakref.WeakSet[_Layout] = weakref.WeakSet()
_HOOKED = False


def _wait_before_optimizer_step(*_: Any) -> None:
    """An optimizer step writes the parameters the side stream may still be reading."""
    for layout in list(_PENDING):
        layout.wait()


def _check_pair(i: int, shadow: torch.Tensor, p: Any, group: _Group) -> None:
    if p.shape != shadow.shape:
        raise ValueError(
            f"parameter #{i} has shape {tuple(p.shape)}, its shadow {tuple(shadow.shape)}"
        )
    if p.device != group.device:
        raise ValueError(f"parameter #{i} is on {p.device}, its shadow on {group.device}")
    if p.dtype != group.dtype and not _widens(p.dtype, group.dtype):
        raise TypeError(f"parameter #{i} is {p.dtype}, too wide for its {group.dtype} shadow")


def _widens(param: torch.dtype, shadow: torch.dtype) -> bool:
    if not (param.is_floating_point and shadow.is_floating_point):
        return False
    p, s = torch.finfo(param), torch.finfo(shadow)
    return bool(p.bits <= s.bits and p.eps >= s.eps and p.max <= s.max)


def _plain(x: Any) -> bool:
    """A tensor whose storage we may read: not a wrapper subclass (float8, NF4 weights)."""
    return type(x) in (torch.Tensor, torch.nn.Parameter) and x.layout == torch.strided


def _tilings(params: Sequence[Any], idx: list[int]) -> list[tuple[list[int], list[int], int]]:
    """The sets of tensors among ``idx`` that tile one storage.

    Each set comes with where its tensors start in the span of storage they cover, and the
    span's length: two or more contiguous, non-overlapping pieces of one storage, with
    alignment padding between them (`PADDING`) or covering 7/8 of the span.
    """
    by_storage: dict[int, list[int]] = {}
    for i in idx:
        p = params[i]
        if _plain(p) and p.numel() and p.is_contiguous() and p.data_ptr():
            by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(i)
    tiles = []
    for members in by_storage.values():
        starts = [params[i].storage_offset() for i in members]
        order = sorted(range(len(members)), key=starts.__getitem__)
        end, fits, padded = starts[order[0]], len(members) > 1, True
        pad = PADDING // params[members[0]].element_size()
        for k in order:
            fits = fits and starts[k] >= end
            padded = padded and starts[k] - end <= pad
            end = starts[k] + params[members[k]].numel()
        base = starts[order[0]]
        used = sum(params[i].numel() for i in members)
        if fits and (padded or 8 * used >= 7 * (end - base)):
            tiles.append((members, [st - base for st in starts], end - base))
    return tiles


def _span(params: Sequence[Any], offsets: list[int], size: int) -> torch.Tensor | None:
    """The 1-d span of storage ``params`` tile at ``offsets``, or None if they do not."""
    first = params[0]
    if not _plain(first):
        return None
    storage = first.untyped_storage().data_ptr()
    base = first.storage_offset() - offsets[0]
    for p, offset in zip(params, offsets):
        if (
            not _plain(p)
            or not p.is_contiguous()
            or p.storage_offset() - base != offset
            or p.untyped_storage().data_ptr() != storage
        ):
            return None
    if base < 0 or (base + size) * first.element_size() > first.untyped_storage().nbytes():
        return None
    return torch.as_strided(first.detach(), (size,), (1,), base)


def _arrange(like: Sequence[Any], params: Sequence[Any], limit: float, tile: bool) -> list[_Group]:
    """Groups for shadows of the (device, dtype)s of ``like``, laid out for ``params``.

    Per (device, dtype): the parameters that tile one storage (of that dtype and device)
    form a group each; the rest share a flat buffer below ``limit`` elements.
    """
    keys: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, x in enumerate(like):
        keys.setdefault((x.device, x.dtype), []).append(i)
    groups = []
    for (device, dtype), idx in keys.items():
        tiles: list[tuple[list[int], list[int], int]] = []
        if tile:
            same = [i for i in idx if params[i].dtype == dtype and params[i].device == device]
            tiles = _tilings(params, same)
            tiled = {i for members, _, _ in tiles for i in members}
            idx = [i for i in idx if i not in tiled]
        for members, offsets, size in tiles:
            groups.append(_Group(device, dtype, members, [], offsets, size))
        if idx:
            small = [i for i in idx if params[i].numel() < limit]
            large = [i for i in idx if params[i].numel() >= limit]
            size = sum(params[i].numel() for i in small)
            groups.append(_Group(device, dtype, small, large, size=size))
    return groups


def _allocate(
    groups: list[_Group], values: Sequence[Any], zeros: bool, keep: bool = False
) -> list[Any]:
    """The shadows of ``groups``: aliases of their flat buffers, or tensors of their own.

    Makes the flat buffers; fills the shadows with ``values`` (or zeros). ``keep``: a large
    one that already is a tensor of its own (``values`` being the shadows) is returned as it
    is.
    """
    out: list[Any] = [None] * len(values)
    with torch.no_grad():
        for group in groups:
            if group.small:
                # a tiled group's padding between the pieces is never read, but defined
                make = torch.zeros if group.offsets is not None else torch.empty
                group.flat = make(group.size, device=group.device, dtype=group.dtype)
                if group.offsets is not None:
                    offsets = group.offsets
                else:
                    offsets = list(
                        itertools.accumulate((values[i].numel() for i in group.small), initial=0)
                    )[:-1]
                storage = group.flat.untyped_storage()
                for i, offset in zip(group.small, offsets):
                    v = values[i]
                    # an alias of the buffer, not an autograd view of it (whose ``_base``
                    # would keep the buffer alive after `_settle` moves the shadow elsewhere)
                    alias = group.flat.new_empty(0).set_(storage, offset, v.shape)
                    alias.zero_() if zeros else alias.copy_(v)
                    out[i] = alias
            for i in group.large:
                v = values[i]
                if keep and _owns_storage(v):
                    out[i] = v
                elif zeros:
                    out[i] = torch.zeros_like(v, memory_format=torch.contiguous_format)
                else:
                    out[i] = v.detach().clone(memory_format=torch.contiguous_format)
    return out


def _owns_storage(x: torch.Tensor) -> bool:
    """Whether ``x`` is a contiguous tensor alone in its storage (not a view into a buffer).

    A wrapper subclass counts as alone: nothing of it lies in our buffers.
    """
    return not _plain(x) or bool(
        x.is_contiguous()
        and x.storage_offset() == 0
        and x.untyped_storage().nbytes() == x.numel() * x.element_size()
    )


class TorchBackend(ArrayAPIBackend):
    """Backend for ``torch.Tensor`` (and ``nn.Parameter``) on any device.

    Examples
    --------
    >>> import torch
    >>> backend = TorchBackend()
    >>> shadows = backend.create_shadows([torch.zeros(2)], zeros=False)
    >>> backend.update(shadows, [torch.full((2,), 5.0)], 0.9, inplace=True)
    [tensor([4.5000, 4.5000])]
    """

    def __init__(self) -> None:
        super().__init__(
            "torch",
            Capabilities(
                mutable_arrays=True, inplace_update=True, fused_update=True, self_checking=True
            ),
        )

    def owns(self, x: Any) -> bool:
        """Return True for ``torch.Tensor`` (parameters included)."""
        return isinstance(x, torch.Tensor)

    def namespace(self, x: Any) -> Any:
        """Return array-api-compat's torch namespace."""
        return _xp

    def device(self, x: Any) -> Any:
        """Return the tensor's ``torch.device``."""
        return x.device

    def is_floating(self, x: Any) -> bool:
        """Return True for floating tensors (bfloat16 and float16 included)."""
        return bool(x.is_floating_point())

    def create_shadows(
        self, params: Sequence[Any], *, zeros: bool, layout: str = "auto"
    ) -> list[Any]:
        """Return detached copies (or zeros) on each parameter's device.

        ``layout``: ``"auto"`` packs tensors under 65,536 elements into one flat buffer per
        (device, dtype); ``"flat"`` packs every tensor; ``"separate"`` none.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"torch backend: layout must be one of {LAYOUTS}, got {layout!r}")
        if params and _is_dtensor(params[0]):
            return self._create_distributed(params, zeros, layout)
        return self._create(params, zeros, layout, tile=layout != "separate")

    def _create(self, params: Sequence[Any], zeros: bool, layout: str, *, tile: bool) -> ShadowList:
        """`create_shadows`; ``tile``: lay out parameters that tile a storage as they are."""
        limit = {"auto": SMALL, "flat": float("inf"), "separate": 0}[layout]
        groups = _arrange(params, params, limit, tile)
        out = ShadowList(_allocate(groups, params, zeros))
        out.backend_data = _Layout(groups, len(params), limit, tile)
        return out

    def _settle(self, layout: _Layout, shadows: Sequence[Any], params: Sequence[Any]) -> bool:
        """Lay the shadows out for these parameters, if they now call for another layout.

        The shadows were laid out for the arrays they were made from, which need not be the
        parameters (a loaded state dict) or may since have moved (``flatten_parameters``).
        Checked at the first update and whenever a parameter's storage changed; the shadow
        tensors stay the same objects (``set_``), so nothing that holds them sees a change
        but speed. Returns whether the layout changed.
        """
        seen = (tuple(map(id, params)), tuple(p.data_ptr() for p in params))
        if seen == layout.seen or layout.local is not None:
            return False
        if not layout.tile:
            layout.seen = seen
            return False
        if not any(g.offsets is not None for g in layout.groups):
            storages = [p.untyped_storage().data_ptr() for p in params if _plain(p)]
            if len(set(storages)) == len(storages):
                layout.seen = seen  # nothing tiled, and nothing to tile
                return False
        groups = _arrange(shadows, params, layout.limit, layout.tile)
        if [g.signature() for g in groups] == [g.signature() for g in layout.groups]:
            layout.seen = seen
            return False
        layout.wait()  # an update still running on the side stream reads the old buffers
        moved = _allocate(groups, shadows, zeros=False, keep=True)
        for shadow, new in zip(shadows, moved):
            if new is not shadow:
                shadow.set_(new)
                if layout.side is not None:
                    STREAMS.keep(shadow, layout.side)
        layout.groups = groups
        layout.seen = seen
        return True

    def _create_distributed(self, params: Sequence[Any], zeros: bool, layout: str) -> ShadowList:
        """DTensor shadows with each parameter's mesh and placements.

        They wrap local shards laid out as any tensors (packed and all), which the update
        touches alone.
        """
        self.check_new(params, [f"#{i}" for i in range(len(params))])
        local = self.create_shadows([_local(p) for p in params], zeros=zeros, layout=layout)
        dtensor = _dtensor_type()
        out = ShadowList(
            dtensor.from_local(
                s,
                p.device_mesh,
                p.placements,
                run_check=False,
                shape=p.shape,
                stride=p.stride(),
            )
            for s, p in zip(local, params)
        )
        notes: _Layout = getattr(local, "backend_data")  # noqa: B009 (a ShadowList's notes)
        notes.local = local
        out.backend_data = notes
        return out

    def placed_like(self, x: Any, like: Any) -> Any:
        """``x`` (a loaded shadow) laid out as ``like``, the shadow it replaces.

        A whole tensor (from a portable checkpoint) replacing a DTensor is sharded the same
        way: each process keeps its own shard. A plain tensor moves to ``like``'s device.
        """
        if _is_dtensor(like) and _is_dtensor(x):
            if x.device_mesh != like.device_mesh or x.placements != like.placements:
                raise ValueError(
                    f"it is sharded as {x.placements} on {x.device_mesh}, the model's shadow "
                    f"as {like.placements} on {like.device_mesh}: load it through "
                    "torch.distributed.checkpoint into ema.state_dict(), which reshards"
                )
            return x
        if not isinstance(x, torch.Tensor):
            return x  # another library's array: refused by the caller, naming both
        if not _is_dtensor(like):
            # on the device of the shadow it replaces, as nn.Module.load_state_dict does (a
            # state dict loaded with map_location="cpu" into an EMA on the GPU)
            return x if x.device == like.device else x.detach().to(like.device)
        from torch.distributed.tensor import distribute_tensor

        local = like.to_local()
        whole = x.detach().to(device=local.device, dtype=local.dtype)
        return distribute_tensor(whole, like.device_mesh, like.placements)

    def check_new(self, params: Sequence[Any], names: Sequence[str]) -> None:
        """Refuse a mix of sharded (DTensor) and plain tensors among new leaves."""
        flags = [_is_dtensor(p) for p in params]
        if any(flags) and not all(flags):
            sharded = names[flags.index(True)]
            plain = names[flags.index(False)]
            raise ValueError(
                f"torch backend: leaf {sharded!r} is a DTensor (sharded) but leaf {plain!r} is "
                "a plain tensor: shard the whole model (fully_shard the root module too), or "
                "keep one EMA for each"
            )

    def _update_distributed(
        self, shadows: Sequence[Any], params: Sequence[Any], c: Any, inplace: bool, exact: bool
    ) -> list[Any]:
        """The update of DTensor shadows on their local shards: no communication."""
        for i, (s, p) in enumerate(zip(shadows, params)):
            if not _is_dtensor(p) or not _is_dtensor(s):
                raise ValueError(f"parameter #{i}: a DTensor shadow needs a DTensor parameter")
            if p.placements != s.placements or p.device_mesh != s.device_mesh:
                raise ValueError(
                    f"parameter #{i} has placements {p.placements} on {p.device_mesh}, its "
                    f"shadow {s.placements} on {s.device_mesh}"
                )
        notes = getattr(shadows, "backend_data", None)
        local: Sequence[Any] | None = None
        if isinstance(notes, _Layout) and notes.size == len(shadows):
            local = notes.local
        if local is None:
            local = [_local(s) for s in shadows]
        new = self.update(local, [_local(p) for p in params], c, inplace=inplace, exact=exact)
        if inplace:
            return list(shadows)  # the DTensors share their shards' storage
        dtensor = _dtensor_type()
        return [
            dtensor.from_local(
                n, s.device_mesh, s.placements, run_check=False, shape=s.shape, stride=s.stride()
            )
            for n, s in zip(new, shadows)
        ]

    def update(
        self,
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: Any,
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[Any]:
        """Update every shadow toward its parameter; every check before the first write.

        DTensor parameters (FSDP2, tensor parallelism) update their local shards only.
        """
        if shadows and (_is_dtensor(shadows[0]) or _is_dtensor(params[0])):
            return self._update_distributed(shadows, params, c, inplace, exact)
        with torch.no_grad():
            if torch.compiler.is_compiling():
                # plain clones: a copied layout re-points tensors (set_), which dynamo refuses
                if not inplace:
                    shadows = [s.clone() for s in shadows]
                layout = getattr(shadows, "backend_data", None)
                if not isinstance(layout, _Layout) or layout.size != len(shadows):
                    layout = _Layout.loose(shadows)
                self._traced(layout, shadows, params, c, exact)
                return shadows if isinstance(shadows, list) else list(shadows)
            if not inplace:
                shadows = self._copy(shadows)
            layout = getattr(shadows, "backend_data", None)
            if not isinstance(layout, _Layout) or layout.size != len(shadows):
                layout = _Layout.loose(shadows)
            plans = [self._prepare(g, shadows, params) for g in layout.groups]
            if (layout.seen is None or any(g.missed for g in layout.groups)) and self._settle(
                layout, shadows, params
            ):
                plans = [self._prepare(g, shadows, params) for g in layout.groups]
            if layout.side is not None:
                # the previous update must be done with the scratch buffers before we refill
                # them (an optimizer step has usually waited for it already: then this is free)
                layout.wait()
            # every gather before the first write: a gather may find its views stale
            plans, sources = self._gather(layout.groups, plans, shadows, params)
            if layout.side is not None:
                self._run_on_side_stream(layout, plans, sources, c, exact)
                return shadows if isinstance(shadows, list) else list(shadows)
            for group, source, (_, _, s_list, p_list, mixed) in zip(layout.groups, sources, plans):
                if source is not None:
                    group.update_flat(source, c, exact)
                _foreach_update(s_list, p_list, c, exact, mixed)
        return shadows if isinstance(shadows, list) else list(shadows)

    def _gather(
        self,
        groups: list[_Group],
        plans: list[_Plan],
        shadows: Sequence[Any],
        params: Sequence[Any],
    ) -> tuple[list[_Plan], list[torch.Tensor | None]]:
        """Each group's small parameters as one flat tensor (None where it has none to gather).

        A gather that finds a 1-d parameter changed in place (`_StaleViewsError`) has dropped
        its views: the groups are checked again, which names the parameter.
        """
        try:
            return plans, [
                None if plan[0] is None else group.source(plan[0], checked=False)
                for group, plan in zip(groups, plans)
            ]
        except _StaleViewsError:
            plans = [self._prepare(g, shadows, params) for g in groups]
            return plans, [
                None if plan[0] is None else group.source(plan[0], checked=True)
                for group, plan in zip(groups, plans)
            ]

    def update_lanes(
        self,
        shadow_lists: Sequence[Sequence[Any]],
        params: Sequence[Any],
        cs: Sequence[Any],
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[list[Any]]:
        """Update several profiles' shadows of the same parameters, gathering them once.

        The small parameters are gathered into one flat buffer once for every profile; each
        profile then costs one ``lerp_`` over its flat buffer and one ``_foreach_lerp_`` over
        its large tensors. Every check happens before the first write.
        """
        layouts = [getattr(sl, "backend_data", None) for sl in shadow_lists]
        first = layouts[0]
        if (
            not inplace
            or torch.compiler.is_compiling()
            or (shadow_lists[0] and _is_dtensor(shadow_lists[0][0]))
            or not isinstance(first, _Layout)
            or not all(
                isinstance(lay, _Layout)
                and lay.seen is not None  # laid out for the parameters (`_settle`) already
                and lay.size == len(sl) == first.size
                and [g.members for g in lay.groups] == [g.members for g in first.groups]
                for lay, sl in zip(layouts, shadow_lists)
            )
        ):
            return [
                self.update(sl, params, c, inplace=inplace, exact=exact)
                for sl, c in zip(shadow_lists, cs)
            ]
        with torch.no_grad():
            plans = [self._prepare(g, shadow_lists[0], params) for g in first.groups]
            if any(g.missed for g in first.groups) and any(
                self._settle(lay, sl, params)  # type: ignore[arg-type]
                for lay, sl in zip(layouts, shadow_lists)
            ):  # checked; now laid out anew: once more, lane by lane
                return [
                    self.update(sl, params, c, inplace=inplace, exact=exact)
                    for sl, c in zip(shadow_lists, cs)
                ]
            plans, sources = self._gather(first.groups, plans, shadow_lists[0], params)
            for gi, (plan, gathered) in enumerate(zip(plans, sources)):
                _, members, _, p_list, mixed = plan
                lanes = [lay.groups[gi] for lay in layouts]  # type: ignore[union-attr]
                if gathered is not None:
                    # the first profile last: in exact mode its scratch (the gathered
                    # parameters, unless tiled) is its temporary
                    for lane, c in list(zip(lanes, cs))[::-1]:
                        lane.update_flat(gathered, c, exact)
                for sl, c in zip(shadow_lists, cs):
                    _foreach_update([sl[i] for i in members], p_list, c, exact, mixed)
        return [sl if isinstance(sl, list) else list(sl) for sl in shadow_lists]

    def _copy(self, shadows: Sequence[Any]) -> list[Any]:
        """New shadows with the same values and layout (for a functional update)."""
        layout = getattr(shadows, "backend_data", None)
        if not isinstance(layout, _Layout) or layout.size != len(shadows):
            return self._create(list(shadows), False, "separate", tile=False)
        groups = [
            _Group(g.device, g.dtype, g.small, g.large, g.offsets, g.size) for g in layout.groups
        ]
        out = ShadowList(_allocate(groups, shadows, zeros=False))
        out.backend_data = copied = _Layout(groups, len(out), layout.limit, layout.tile)
        copied.seen = layout.seen  # laid out for the same parameters
        return out

    def _prepare(self, group: _Group, shadows: Sequence[Any], params: Sequence[Any]) -> _Plan:
        """Check a group's parameters (raising before any write); return what to run.

        Returns the 1-d views of the small parameters to gather (None: nothing to gather),
        the positions, shadows and parameters for the ``_foreach`` call, and whether dtypes
        mix.
        """
        members = group.large
        views = group.cached_views(params) if group.small else None
        if group.small and views is None:
            if {params[i].dtype for i in group.small} == {group.dtype}:
                views = group.gather_views(shadows, params)
            if views is None:  # bf16 parameters into float32 shadows, or no longer tiled
                members = group.large + group.small
        s_list = [shadows[i] for i in members]
        p_list = [params[i] for i in members]
        for i, p in zip(members, p_list):
            _check_pair(i, shadows[i], p, group)
        return views, members, s_list, p_list, any(p.dtype != group.dtype for p in p_list)

    def _run_on_side_stream(
        self,
        layout: _Layout,
        plans: list[_Plan],
        sources: list[torch.Tensor | None],
        c: Any,
        exact: bool,
    ) -> None:
        """Queue the update on the layout's side stream, after the work queued so far.

        The small parameters were gathered on the current stream (a copy of little memory,
        after `_Layout.wait`), so only the large ones are read from the side stream, and kept
        alive for it; a tiled group's span is read on the side stream, as large tensors are.
        """
        current = STREAMS.current(layout.groups[0].device)
        if exact:  # the temporaries, before the side stream runs
            for group, source in zip(layout.groups, sources):
                if source is not None and group.scratch is None:
                    assert group.flat is not None
                    group.scratch = torch.empty_like(group.flat)
        layout.side.wait_stream(current)
        with STREAMS.using(layout.side):
            for group, source, (_, _, s_list, p_list, mixed) in zip(layout.groups, sources, plans):
                if source is not None:
                    group.update_flat(source, c, exact)
                _foreach_update(s_list, p_list, c, exact, mixed)
        for group, source, (_, _, _, p_list, _) in zip(layout.groups, sources, plans):
            if source is not None and group.offsets is not None:
                STREAMS.keep(source, layout.side)
            for p in p_list:
                STREAMS.keep(p, layout.side)
        layout.event = layout.side.record_event()
        _PENDING.add(layout)

    def check_side_stream(self, params: Sequence[Any]) -> None:
        """Raise ValueError unless every tensor is on one CUDA device (streams are CUDA's)."""
        devices = {p.device for p in params}
        if len(devices) > 1 or any(d.type != "cuda" for d in devices):
            raise ValueError(
                "torch backend: side_stream=True needs every parameter on one CUDA device, got "
                f"{sorted(map(str, devices))}"
            )

    def use_side_stream(self, shadows: Sequence[Any]) -> Sequence[Any]:
        """Return ``shadows`` set to update on a side stream of their own (idempotent)."""
        global _HOOKED
        layout = getattr(shadows, "backend_data", None)
        if not isinstance(layout, _Layout) or layout.size != len(shadows):
            shadows = ShadowList(shadows)  # a regrouped plain list: give it a layout to keep
            layout = shadows.backend_data = _Layout.loose(shadows)
        if layout.side is not None or not layout.groups:
            return shadows
        self.check_side_stream(shadows)
        device = layout.groups[0].device
        layout.side = STREAMS.new(device)
        for group in layout.groups:
            if group.flat is not None:
                STREAMS.keep(group.flat, layout.side)
            for i in group.large:
                STREAMS.keep(shadows[i], layout.side)
        if not _HOOKED:
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            register_optimizer_step_pre_hook(_wait_before_optimizer_step)
            _HOOKED = True
        return shadows

    def wait(self, shadows: Sequence[Any]) -> None:
        """Make the current stream wait for an update of these shadows still running."""
        layout = getattr(shadows, "backend_data", None)
        if isinstance(layout, _Layout) and layout.event is not None:
            layout.wait()

    def _traced(
        self, layout: _Layout, shadows: Sequence[Any], params: Sequence[Any], c: Any, exact: bool
    ) -> None:
        for group in layout.groups:
            s_list = [shadows[i] for i in group.members]
            p_list = [params[i] for i in group.members]
            mixed = any(p.dtype != group.dtype for p in p_list)
            # mixed dtypes: the reference order, whose multiply takes a traced ``c`` (the fused
            # form passes it as ``alpha``, a Python number: a guard on data under dynamo)
            _foreach_update(s_list, p_list, c, exact or mixed, mixed)

    def all_finite(self, params: Sequence[Any]) -> list[bool]:
        """Whether each tensor is finite: one fused max-norm per device, one transfer.

        The infinity norm is NaN or infinite exactly when a value is (a sum could overflow).
        """
        out = [True] * len(params)
        by_device: dict[Any, list[int]] = {}
        for i, p in enumerate(params):
            if p.numel():
                by_device.setdefault(p.device, []).append(i)
        with torch.no_grad():
            for idx in by_device.values():
                norms = torch._foreach_norm([params[i].detach() for i in idx], math.inf)
                finite = torch.stack([n.to(torch.float32) for n in norms]).isfinite().tolist()
                for i, ok in zip(idx, finite):
                    out[i] = bool(ok)
        return out

    def is_traced(self, x: Any) -> bool:
        """True while ``torch.compile`` traces: tensors then hold no values to branch on."""
        return bool(torch.compiler.is_compiling())

    def check_writable(self, shadows: Sequence[Any], names: Sequence[str]) -> None:
        """Shadows are ours and plain tensors: always writable."""

    def check_assignable(self, tensors: Sequence[Any], names: Sequence[str]) -> None:
        """Raise ReadOnlyError naming the first tensor the averages cannot be written into.

        That is one whose elements alias each other (an ``expand``-ed view), or an inference
        tensor outside inference mode.
        """
        for name, t in zip(names, tensors):
            local = _local(t)
            if local.is_inference() and not torch.is_inference_mode_enabled():
                raise ReadOnlyError(
                    f"leaf {name!r}: an inference tensor (made under torch.inference_mode) "
                    "cannot be written outside inference mode; nothing was written"
                )
            # 1: some elements share memory (0: none, 2: too costly to tell; torch's copy_
            # refuses the first only)
            if _plain(local) and torch._debug_has_internal_overlap(local) == 1:
                raise ReadOnlyError(
                    f"leaf {name!r}: elements of the tensor share memory (an expanded view, "
                    f"strides {tuple(local.stride())}), so the averages cannot be written "
                    "into it; nothing was written"
                )

    def to_host(self, x: Any) -> Any:
        """Return a detached CPU tensor numpy can read.

        A DTensor is gathered whole first: a collective, so every process must call it.
        """
        if _is_dtensor(x):
            x = x.full_tensor()
        return x.detach().cpu()

    def from_host(self, host: Any, like: Any, dtype: str | None = None) -> Any:
        """Return ``host`` as a tensor of ``like``'s dtype (or ``dtype``) on ``like``'s device.

        A new tensor (``host`` may be read-only). Loaded for a DTensor, every process makes
        the whole tensor and keeps its own shard of it, as ``like`` is sharded.
        """
        target = like.dtype if dtype is None else getattr(torch, dtype, None)
        if not isinstance(target, torch.dtype):
            raise ValueError(f"torch backend: {dtype!r} is not a torch dtype")
        if not _is_dtensor(like):
            return torch.asarray(host, dtype=target, device=like.device, copy=True)
        from torch.distributed.tensor import distribute_tensor

        local = like.to_local()
        whole = torch.asarray(host, dtype=target, device=local.device, copy=True)
        return distribute_tensor(whole, like.device_mesh, like.placements)

    def to_device(self, x: Any, device: Any) -> Any:
        """Return ``x`` detached on ``device``; host copies of CUDA tensors are pinned.

        Raises ``ValueError`` naming the device where torch has no such device.
        """
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"torch backend: device={device!r} is not a torch device") from exc
        if x.device == target:
            return x
        with torch.no_grad():
            if target.type == "cpu" and x.device.type == "cuda":
                out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
                return out.copy_(x.detach())
            try:
                return x.detach().to(target)
            except torch.OutOfMemoryError:
                raise
            except (AssertionError, RuntimeError) as exc:  # torch built without that device
                raise ValueError(
                    f"torch backend: device={device!r} is not available here ({exc})"
                ) from exc

    def assign(self, dst: Any, src: Any) -> None:
        """Copy ``src`` into ``dst`` in place (outside autograd), across devices if needed."""
        with torch.no_grad():
            dst.copy_(src)

    def snapshot(self, obj: Any) -> tuple[Any, list[Any]]:
        """A cheap key of a module's tensors, and the tensors (in `named_leaves`' walk).

        Equal keys mean the same modules holding the same tensor objects (ids) and the same
        persistent buffers: `named_leaves` would list the same tensors under the same names.
        Their ``requires_grad`` (what makes a parameter "frozen") is the caller's to check.
        Costs a walk over modules, not a Python step per tensor.
        """
        tensors: list[Any] = []
        shape: list[tuple[int, int, int]] = []
        for m in obj.modules():
            ps, bs = m._parameters, m._buffers
            tensors.extend(ps.values())
            tensors.extend(bs.values())
            shape.append((len(ps), len(bs), len(m._non_persistent_buffers_set)))
        return (tuple(map(id, tensors)), tuple(shape)), tensors

    def named_leaves(self, obj: Any) -> list[tuple[str, Any, str]] | None:
        """Parameters and buffers of an ``nn.Module`` by qualified name, in module order."""
        if not isinstance(obj, torch.nn.Module):
            return None
        # the order of module.state_dict(): each module's parameters, then its buffers;
        # a tensor shared by two modules (tied weights) is tracked under its first name and
        # listed again as "tied" under the others, so average(model) has every state_dict key
        out: list[tuple[str, Any, str]] = []
        for prefix, module in obj.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            if module._parameters:
                out.extend(
                    [
                        (dot + name, p, "param" if p.requires_grad else "frozen")
                        for name, p in module._parameters.items()
                        if p is not None
                    ]
                )
            if module._buffers:
                skip = module._non_persistent_buffers_set
                out.extend(
                    [
                        (dot + name, b, "buffer")
                        for name, b in module._buffers.items()
                        if b is not None and name not in skip
                    ]
                )
        ids = [id(x) for _, x, _ in out]
        if len(set(ids)) != len(ids):
            seen: set[int] = set()
            for i, oid in enumerate(ids):
                if oid in seen:
                    out[i] = (out[i][0], out[i][1], "tied")
                seen.add(oid)
        return out


def _foreach_update(s_list: list[Any], p_list: list[Any], c: Any, exact: bool, mixed: bool) -> None:
    if not s_list:
        return
    if exact:
        delta = torch._foreach_sub(s_list, p_list)
        torch._foreach_mul_(delta, c)
        torch._foreach_sub_(s_list, delta)
    elif mixed:
        # _foreach_lerp_ wants one dtype; s - c * (s - p) promotes p exactly
        torch._foreach_sub_(s_list, torch._foreach_sub(s_list, p_list), alpha=c)
    else:
        torch._foreach_lerp_(s_list, p_list, c)


BACKEND = TorchBackend()
