"""The numpy backend: in place, packed shadows, cache-blocked and multi-threaded.

Design invariants:

* The arithmetic is the reference kernel's, in its order (``t = s - p; t *= c; s -= t``), on
  blocks small enough that ``t`` stays in cache: memory traffic is one read of ``p``, one read
  and one write of ``s``, the 12 bytes per float32 element the update needs.
* Shadows created together live in one contiguous buffer per dtype. Runs of small tensors are
  gathered with one ``np.concatenate(..., out=)`` and updated as one block, so the per-tensor
  Python overhead disappears where it dominates (thousands of small tensors).
* numpy releases the GIL in ufunc loops, so blocks are spread over a few threads.
* After the first update of a layout, no array memory is allocated per step.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from emacore import ArrayAPIBackend
from emacore.backend import Capabilities, ShadowList
from emacore.errors import ReadOnlyError

__all__ = ["BACKEND", "NumpyBackend"]

# Elements per cache block. Each block costs ~3 us of Python (three ufunc calls), so blocks
# must be large; three float32 operands of 64 Ki elements (768 KiB) still fit a 1-2 MiB L2.
BLOCK = 65_536
# Tensors below this size are gathered with their neighbours into one update.
SMALL = 65_536
# Below this many elements in one update (4 MiB of float32, cache-resident), waking a
# second thread costs more than it saves.
THREAD_MIN = 1_048_576


def _num_threads() -> int:
    env = os.environ.get("EMACORE_NUM_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, 4))


class _Packing:
    """How a ShadowList's arrays sit in one buffer, and the work plan derived from it.

    Runs of small tensors are gathered first (phase 1, one ``np.concatenate`` per run, in the
    calling thread: concatenate holds the GIL) into a scratch covering only those runs; then
    every element is updated in cache blocks spread over threads (phase 2). Gathering first
    also means a parameter of the wrong dtype fails (``casting="no"``) before any write.
    """

    def __init__(self, base: np.ndarray, sizes: list[int]) -> None:
        self.base = base
        self.sizes = sizes
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.scratch: np.ndarray | None = None  # gather buffer, allocated on first update
        # (gathers, lanes, indices of the tensors updated directly), built on first update
        self.plan: (
            tuple[list[tuple[int, int, int, int]], list[list[tuple[Any, ...]]], list[int]] | None
        ) = None


class NumpyBackend(ArrayAPIBackend):
    """Backend for ``numpy.ndarray``: fused, in place, allocation-free after the first step.

    Examples
    --------
    >>> import numpy as np
    >>> backend = NumpyBackend()
    >>> shadows = backend.create_shadows([np.zeros(2, np.float32)], zeros=False)
    >>> backend.update(shadows, [np.full(2, 5.0, np.float32)], 0.9, inplace=True)
    [array([4.5, 4.5], dtype=float32)]
    """

    def __init__(self) -> None:
        super().__init__(
            "numpy",
            Capabilities(
                mutable_arrays=True,
                inplace_update=True,
                fused_update=True,
                one_device=True,
                self_checking=True,
            ),
        )
        self._threads = _num_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()

    def owns(self, x: Any) -> bool:
        """Return True for ``numpy.ndarray`` and numpy scalars (0-d results of arithmetic)."""
        return isinstance(x, (np.ndarray, np.generic))

    def namespace(self, x: Any) -> Any:
        """Return numpy's array-API namespace."""
        import array_api_compat.numpy

        return array_api_compat.numpy

    def device(self, x: Any) -> Any:
        """Return ``"cpu"``: numpy arrays all live on the host."""
        return "cpu"

    def is_floating(self, x: Any) -> bool:
        """Return True for real floating dtypes (float16/32/64, longdouble)."""
        return bool(x.dtype.kind == "f")

    def create_shadows(
        self, params: Sequence[Any], *, zeros: bool, layout: str = "auto"
    ) -> list[Any]:
        """Return shadows as C-contiguous views into one buffer per dtype.

        ``layout="separate"`` gives each shadow its own array instead (``"auto"`` and
        ``"flat"`` pack; the update gathers only runs of small tensors either way).
        """
        if layout not in ("auto", "flat", "separate"):
            raise ValueError(
                f"numpy backend: layout must be 'auto', 'flat' or 'separate', got {layout!r}"
            )
        if layout == "separate":
            return [
                np.zeros(np.shape(p), dtype=p.dtype) if zeros else np.array(p, copy=True)
                for p in params
            ]
        out = ShadowList([None] * len(params))
        by_dtype: dict[np.dtype[Any], list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            sizes = [int(params[i].size) for i in idx]
            base = np.zeros(sum(sizes), dtype=dtype)
            offset = 0
            for i, n in zip(idx, sizes):
                view = base[offset : offset + n].reshape(np.shape(params[i]))
                if not zeros:
                    np.copyto(view, params[i])
                out[i] = view
                offset += n
            if len(by_dtype) == 1:
                out.backend_data = _Packing(base, sizes)
        return out

    def check_writable(self, shadows: Sequence[Any], names: Sequence[str]) -> None:
        """Raise ReadOnlyError naming the first shadow numpy will not let us write."""
        packing = getattr(shadows, "backend_data", None)
        if (
            isinstance(packing, _Packing)
            and shadows
            and shadows[0].base is packing.base
            and packing.base.flags.writeable
        ):
            return  # packed shadows are written through their common buffer
        for name, s in zip(names, shadows):
            if not s.flags.writeable:
                raise ReadOnlyError(
                    f"leaf {name!r}: its shadow is a read-only numpy array (writeable=False, "
                    "e.g. memory-mapped or from np.broadcast_to); emacore updates shadows in "
                    "place. Load the state with a writable copy, or use inplace=False"
                )

    def check_assignable(self, arrays: Sequence[Any], names: Sequence[str]) -> None:
        """Raise ReadOnlyError naming the first array averages cannot be written into."""
        for name, a in zip(names, arrays):
            if not a.flags.writeable:
                raise ReadOnlyError(
                    f"leaf {name!r}: the array is read-only (writeable=False), so the "
                    "averages cannot be written into it; nothing was written"
                )

    def to_host(self, x: Any) -> Any:
        """Return ``x``: numpy arrays are already on the host."""
        return x

    def to_device(self, x: Any, device: Any) -> Any:
        """Numpy has one device, ``"cpu"``."""
        if device != "cpu":
            raise ValueError(f"numpy backend: arrays live on 'cpu' only, not {device!r}")
        return x

    def assign(self, dst: Any, src: Any) -> None:
        """Write ``src`` into ``dst`` in place."""
        if not dst.flags.writeable:
            raise ReadOnlyError(f"cannot write into a read-only numpy array of shape {dst.shape}")
        np.copyto(dst, src, casting="same_kind")

    def update(
        self,
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: float,
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[Any]:
        """Update every shadow toward its parameter; in place when ``inplace``; always exact."""
        if not inplace:
            shadows = self._copy(shadows)
        packing = getattr(shadows, "backend_data", None)
        if (
            isinstance(packing, _Packing)
            and len(packing.sizes) == len(shadows)
            and shadows[0].base is packing.base
        ):
            if packing.plan is None:
                packing.plan = self._packed_plan(packing)
            gathers, lanes, large = packing.plan
            # every check happens before the first write: see Capabilities.self_checking
            _check_same(shadows, params, large)
            self._gather(packing, params, gathers)
            self._run(lanes, shadows, params, c, packing)
        else:
            _check_same(shadows, params, range(len(shadows)))
            self._run(self._loose_lanes(shadows), shadows, params, c, None)
        return shadows if isinstance(shadows, list) else list(shadows)

    def update_lanes(
        self,
        shadow_lists: Sequence[Sequence[Any]],
        params: Sequence[Any],
        cs: Sequence[float],
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[list[Any]]:
        """Update several profiles' shadows of the same parameters in one pass over them.

        Each cache block of a parameter (or of the gathered small ones, gathered once) updates
        every profile's block before the next is read: the parameters are read once for all
        profiles. The arithmetic of each profile is `update`'s, bit for bit.
        """
        packs = [getattr(sl, "backend_data", None) for sl in shadow_lists]
        first = packs[0]
        if not (
            inplace
            and isinstance(first, _Packing)
            and all(
                isinstance(pk, _Packing)
                and pk.sizes == first.sizes
                and len(pk.sizes) == len(sl)
                and sl[0].base is pk.base
                for pk, sl in zip(packs, shadow_lists)
            )
        ):
            return [
                self.update(sl, params, c, inplace=inplace, exact=exact)
                for sl, c in zip(shadow_lists, cs)
            ]
        if first.plan is None:
            first.plan = self._packed_plan(first)
        gathers, lanes, large = first.plan
        _check_same(shadow_lists[0], params, large)
        self._gather(first, params, gathers)
        bases = [pk.base for pk in packs]  # type: ignore[union-attr]
        work = [(lane, shadow_lists, bases, first, params, cs) for lane in lanes]
        if len(work) == 1:
            _run_lanes(*work[0])
        else:
            pool = self._get_pool()
            futures = [pool.submit(_run_lanes, *w) for w in work[1:]]
            try:
                _run_lanes(*work[0])
            finally:
                for f in futures:
                    f.result()
        return [sl if isinstance(sl, list) else list(sl) for sl in shadow_lists]

    def _gather(self, packing: _Packing, params: Sequence[Any], gathers: list[Any]) -> None:
        if not gathers:
            return
        if packing.scratch is None:
            packing.scratch = np.empty(gathers[-1][3], dtype=packing.base.dtype)
        for i0, i1, lo, hi in gathers:
            # casting="safe" and the exact out size refuse a wrong dtype or size
            np.concatenate(params[i0:i1], axis=None, out=packing.scratch[lo:hi], casting="safe")

    def _copy(self, shadows: Sequence[Any]) -> list[Any]:
        packing = getattr(shadows, "backend_data", None)
        if isinstance(packing, _Packing) and shadows[0].base is packing.base:
            base = packing.base.copy()
            out = ShadowList(
                base[a:b].reshape(s.shape)
                for a, b, s in zip(packing.offsets, packing.offsets[1:], shadows)
            )
            out.backend_data = _Packing(base, packing.sizes)
            return out
        return [np.array(s, copy=True) for s in shadows]

    # Phase-2 work items, all splittable by element range except "whole":
    #   ("flat", shift, lo, hi): base[lo:hi] from scratch[lo - shift:hi - shift] (gathered);
    #   ("tensor", i, lo, hi): elements lo:hi of contiguous shadow i from params[i];
    #   ("whole", i, 0, n): non-contiguous shadow i, with the reference formula.

    def _packed_plan(
        self, packing: _Packing
    ) -> tuple[list[tuple[int, int, int, int]], list[list[tuple[Any, ...]]], list[int]]:
        gathers: list[tuple[int, int, int, int]] = []
        large: list[int] = []
        items: list[tuple[Any, ...]] = []
        sizes, offsets = packing.sizes, packing.offsets
        src = 0
        i = 0
        while i < len(sizes):
            if sizes[i] < SMALL:
                j = i
                while j < len(sizes) and sizes[j] < SMALL:
                    j += 1
                n = offsets[j] - offsets[i]
                gathers.append((i, j, src, src + n))
                items.append(("flat", offsets[i] - src, offsets[i], offsets[j]))
                src += n
                i = j
            else:
                items.append(("tensor", i, 0, sizes[i]))
                large.append(i)
                i += 1
        return gathers, self._balance(items, offsets[-1]), large

    def _loose_lanes(self, shadows: Sequence[Any]) -> list[list[tuple[Any, ...]]]:
        items = [
            ("tensor" if s.flags.c_contiguous else "whole", i, 0, int(s.size))
            for i, s in enumerate(shadows)
        ]
        return self._balance(items, sum(int(s.size) for s in shadows))

    def _balance(self, items: list[tuple[Any, ...]], total: int) -> list[list[tuple[Any, ...]]]:
        """Cut the items into lanes of about equal element counts, on block boundaries."""
        lanes_n = self._threads if total >= THREAD_MIN else 1
        if lanes_n == 1:
            return [items]
        share = -(-total // lanes_n)
        lanes: list[list[tuple[Any, ...]]] = [[] for _ in range(lanes_n)]
        lane, filled = 0, 0
        for item in items:
            kind, a, lo, hi = item[0], item[1], item[2], item[3]
            if kind == "whole":
                lanes[lane].append(item)
                filled += hi - lo
            while kind != "whole" and hi > lo:
                take = min(hi - lo, max(share - filled, BLOCK))
                if take < hi - lo:
                    take = max(BLOCK, take - take % BLOCK)
                lanes[lane].append((kind, a, lo, lo + take))
                lo += take
                filled += take
                if filled >= share and lane < lanes_n - 1:
                    lane, filled = lane + 1, 0
            if kind == "whole" and filled >= share and lane < lanes_n - 1:
                lane, filled = lane + 1, 0
        return [lane_items for lane_items in lanes if lane_items]

    def _run(
        self,
        lanes: list[list[tuple[Any, ...]]],
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: float,
        packing: _Packing | None,
    ) -> None:
        if len(lanes) == 1:
            self._run_lane(lanes[0], shadows, params, c, packing)
            return
        pool = self._get_pool()
        futures = [
            pool.submit(self._run_lane, lane, shadows, params, c, packing) for lane in lanes[1:]
        ]
        try:
            self._run_lane(lanes[0], shadows, params, c, packing)
        finally:
            for f in futures:
                f.result()

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=self._threads - 1, thread_name_prefix="emacore-numpy"
                    )
        return self._pool

    def _scratch(self, dtype: np.dtype[Any]) -> np.ndarray:
        cache: dict[np.dtype[Any], np.ndarray] | None = getattr(self._local, "scratch", None)
        if cache is None:
            cache = self._local.scratch = {}
        buf = cache.get(dtype)
        if buf is None:
            buf = cache[dtype] = np.empty(BLOCK, dtype=dtype)
        return buf

    def _run_lane(
        self,
        items: list[tuple[Any, ...]],
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: float,
        packing: _Packing | None,
    ) -> None:
        for item in items:
            kind = item[0]
            if kind == "flat":
                assert packing is not None
                assert packing.scratch is not None
                _, shift, lo, hi = item
                s_flat = packing.base[lo:hi]
                p_flat = packing.scratch[lo - shift : hi - shift]
                # the gathered copy is ours: use it as the temporary
                _blocked(s_flat, p_flat, s_flat.dtype.type(c), p_flat)
            elif kind == "tensor":
                _, i, lo, hi = item
                s = shadows[i]
                # reshape(-1) is a view for the (contiguous) shadow; a non-contiguous
                # parameter is copied here, which is correct but allocates.
                s_flat, p_flat = s.reshape(-1)[lo:hi], np.asarray(params[i]).reshape(-1)[lo:hi]
                _blocked(s_flat, p_flat, s.dtype.type(c), self._scratch(s.dtype))
            else:
                s, p = shadows[item[1]], params[item[1]]
                s[...] = s - (s - p) * s.dtype.type(c)


def _check_same(shadows: Sequence[Any], params: Sequence[Any], indices: Any) -> None:
    """Refuse, before any write, a parameter whose dtype or size differs from its shadow's."""
    for i in indices:
        s, p = shadows[i], params[i]
        if p.size != s.size or (p.dtype != s.dtype and not np.can_cast(p.dtype, s.dtype)):
            raise ValueError(
                f"parameter #{i} ({p.dtype}, {p.size} elements) does not match its shadow "
                f"({s.dtype}, {s.size} elements)"
            )


def _run_lanes(
    items: list[tuple[Any, ...]],
    shadow_lists: Sequence[Sequence[Any]],
    bases: list[np.ndarray],
    first: _Packing,
    params: Sequence[Any],
    cs: Sequence[float],
) -> None:
    """One thread's share of `NumpyBackend.update_lanes`."""
    dtype = bases[0].dtype
    coefs = [dtype.type(c) for c in cs]
    t = np.empty(BLOCK, dtype=dtype)  # per call: threads must not share it
    for item in items:
        kind = item[0]
        if kind == "flat":
            _, shift, lo, hi = item
            assert first.scratch is not None
            p_flat = first.scratch[lo - shift : hi - shift]
            _blocked_lanes([b[lo:hi] for b in bases], p_flat, coefs, t)
        else:  # "tensor": the packed plan makes no "whole" items (those are for loose shadows)
            _, i, lo, hi = item
            p_flat = np.asarray(params[i]).reshape(-1)[lo:hi]
            _blocked_lanes([sl[i].reshape(-1)[lo:hi] for sl in shadow_lists], p_flat, coefs, t)


def _blocked_lanes(ss: list[np.ndarray], p: np.ndarray, cs: list[Any], t: np.ndarray) -> None:
    """`_blocked` for several shadows of one ``p``: each block of ``p`` is read once."""
    n = p.shape[0]
    for lo in range(0, n, BLOCK):
        hi = min(lo + BLOCK, n)
        pb, tb = p[lo:hi], t[: hi - lo]
        for s, c in zip(ss, cs):
            sb = s[lo:hi]
            np.subtract(sb, pb, out=tb)
            np.multiply(tb, c, out=tb)
            np.subtract(sb, tb, out=sb)


def _blocked(s: np.ndarray, p: np.ndarray, c: Any, scratch: np.ndarray) -> None:
    """``s -= (s - p) * c`` over 1-d ``s``, ``p``, one cache block at a time.

    ``scratch`` holds the temporary ``s - p``; it may be ``p`` itself when ``p`` is ours.
    """
    n = s.shape[0]
    if n <= BLOCK:
        t = scratch[:n]
        np.subtract(s, p, out=t)
        np.multiply(t, c, out=t)
        np.subtract(s, t, out=s)
        return
    for lo in range(0, n, BLOCK):
        hi = min(lo + BLOCK, n)
        ss = s[lo:hi]
        t = scratch[lo:hi] if scratch is p else scratch[: hi - lo]
        np.subtract(ss, p[lo:hi], out=t)
        np.multiply(t, c, out=t)
        np.subtract(ss, t, out=ss)


BACKEND = NumpyBackend()
