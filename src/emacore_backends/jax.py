"""The jax backend: immutable arrays, one compiled update for every leaf, shadows donated.

Design invariants:

* ``jax.Array`` is immutable, so bare arrays in a plain list are tracked by position and every
  update returns new shadows. The stateful API donates the old shadows to the compiled update
  (``donate_argnums``), so no second copy of the model is allocated.
* One ``jax.jit`` function updates all leaves on one set of devices; jit caches it per
  (structure, dtypes, shardings), so a training loop compiles once. The coefficient
  ``1 - d`` is passed as a traced scalar: a schedule never triggers a recompilation.
* Small concrete leaves (under `SMALL` elements, one device) share one flat shadow buffer
  per (device, dtype): XLA's CPU code runs one kernel per leaf otherwise, and every leaf's
  output is a buffer of its own to allocate. The parameters' concatenation fuses into the
  update's loop. Per-leaf shadows are sliced from the buffer only when read (`_Packed`).
* Parameters are checked against the shadows' shapes and dtypes when jit traces, which
  happens for every new signature and only then: a mismatch raises before anything runs or
  is donated, and a step with the usual signature pays nothing for the check.
* Inside the user's ``jit``/``scan`` (tracers), the update is plain jnp code inlined into the
  caller's computation, and ``EMAState`` is a registered pytree, so the functional API works
  there (with ``traceable=True`` or not).
* Shadows keep their parameters' sharding; nothing here gathers or reshards.
* XLA contracts ``s - (s - x) * c`` into a fused multiply-add, which rounds once where the
  reference rounds twice: jax's default numbers may differ from the other backends' in the
  last place. ``exact=True`` (and ``compat="tensorflow"``) runs the three operations as three
  compiled calls, which keeps the reference's (and TF's) rounding; inside the caller's own
  ``jit`` the update is inlined and fused, so there it may differ by that ulp.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from emacore._generic import ArrayAPIBackend
from emacore._pytree import ShadowList
from emacore._state import EMAState
from emacore.backend import Capabilities

__all__ = ["BACKEND", "JaxBackend"]

# EMAState crosses jit boundaries (and lives in optax/Flax states): its arrays are children,
# its options static.
jax.tree_util.register_dataclass(
    EMAState,
    data_fields=["shadow", "count", "decay_product", "last_decay"],
    meta_fields=["zero_debias", "compat", "device"],
)

# Incremented each time the compiled update is traced (that is, compiled): tests count it.
TRACES = 0

# Concrete parameters with fewer elements than this share one flat shadow buffer per
# (device, dtype): their update is one fused loop over the buffer instead of one kernel (and
# one output buffer) each. Larger ones keep their own shadow: XLA splits a large loop over
# threads, which a concatenation feeding it prevents.
SMALL = 65536


def _update(shadows: list[Any], params: list[Any], c: Any) -> list[Any]:
    global TRACES
    TRACES += 1
    return [s - (s - p) * jnp.asarray(c, dtype=s.dtype) for s, p in zip(shadows, params)]


_update_donating = jax.jit(_update, donate_argnums=0)
_update_keeping = jax.jit(_update)

# The reference order as three separate computations: inside one computation XLA's CPU and
# GPU code generators contract the product and the subtraction into a fused multiply-add
# (an optimization barrier does not stop it), which rounds once where TF rounds twice.
_differences = jax.jit(lambda shadows, params: [s - p for s, p in zip(shadows, params)])
_scaled = jax.jit(
    lambda deltas, c: [d * jnp.asarray(c, dtype=d.dtype) for d in deltas], donate_argnums=0
)
_subtract_donating = jax.jit(
    lambda shadows, deltas: [s - d for s, d in zip(shadows, deltas)], donate_argnums=0
)
_subtract_keeping = jax.jit(
    lambda shadows, deltas: [s - d for s, d in zip(shadows, deltas)], donate_argnums=1
)


def _check_specs(specs: Sequence[tuple[Any, Any]], params: Sequence[Any]) -> None:
    """Raise ValueError unless every parameter fits its shadow (the core then names it)."""
    if len(params) != len(specs):
        raise ValueError(f"got {len(params)} parameters for {len(specs)} shadows")
    for i, ((shape, dtype), p) in enumerate(zip(specs, params)):
        fits = p.dtype == dtype or (
            jnp.issubdtype(p.dtype, jnp.floating) and jnp.promote_types(p.dtype, dtype) == dtype
        )
        if tuple(p.shape) != tuple(shape) or not fits:
            raise ValueError(
                f"parameter #{i} ({p.dtype}{list(p.shape)}) does not fit its shadow "
                f"({dtype}{list(shape)})"
            )


@functools.partial(jax.jit, static_argnums=2)
def _take(flat: Any, start: Any, shape: tuple[int, ...]) -> Any:
    """One leaf's shadow, copied out of its pack (``start`` traced: one compile per shape)."""
    return jax.lax.dynamic_slice(flat, (start,), (math.prod(shape),)).reshape(shape)


class _Part:
    """Shadows on one set of devices: one compiled update (XLA's unit) covers them.

    Positions are local to the part. ``packs`` holds, per flat buffer, the positions of its
    leaves, their shapes and sizes; ``large`` the positions of the leaves that keep their own
    array; ``specs`` every shadow's (shape, dtype). The jitted updates are kept here, so
    every state that shares the layout shares their compilations.
    """

    def __init__(
        self,
        leaves: list[int],
        specs: list[tuple[tuple[int, ...], Any]],
        packs: list[list[int]],
        large: list[int],
        devices: frozenset[Any],
    ) -> None:
        self.leaves = tuple(leaves)  # positions in the whole list
        self.specs = specs
        self.devices = devices
        self.packs = [
            (
                tuple(pos),
                tuple(specs[i][0] for i in pos),
                tuple(math.prod(specs[i][0]) for i in pos),
            )
            for pos in packs
        ]
        self.starts = [
            tuple(itertools.accumulate(sizes, initial=0))[:-1] for _, _, sizes in self.packs
        ]
        self.large = tuple(large)
        self.width = len(self.packs) + len(self.large)  # arrays held
        self.jitted = {
            True: jax.jit(self.update, donate_argnums=0),
            False: jax.jit(self.update),
        }
        self.differences = jax.jit(
            lambda arrays, params: [a - b for a, b in zip(arrays, self.gather(params))]
        )

    def gather(self, params: Sequence[Any]) -> list[Any]:
        """The parameters laid out like the shadows: one flat array per pack, then the large.

        Runs when jit traces, that is for every new signature of the parameters (and only
        then): that is where their shapes and dtypes are checked against the shadows'.
        """
        _check_specs(self.specs, params)
        flats = [
            jnp.concatenate([jnp.ravel(params[i]).astype(self.specs[i][1]) for i in pos])
            for pos, _, _ in self.packs
        ]
        return flats + [params[i] for i in self.large]

    def update(self, arrays: list[Any], params: Sequence[Any], c: Any) -> list[Any]:
        """The update of every shadow: concatenation and arithmetic fuse into one loop."""
        return _update(arrays, self.gather(params), c)

    def slices(self, flats: list[Any]) -> list[list[Any]]:
        """Each pack's buffer cut back into its leaves' shapes."""
        out = []
        for (_, shapes, sizes), flat in zip(self.packs, flats):
            cuts, start = [], 0
            for shape, size in zip(shapes, sizes):
                cuts.append(flat[start : start + size].reshape(shape))
                start += size
            out.append(cuts)
        return out

    def check(self, params: Sequence[Any]) -> None:
        """Raise ValueError unless every parameter fits its shadow and is on its devices."""
        _check_specs(self.specs, params)
        for i, p in enumerate(params):
            if frozenset(p.devices()) != self.devices:
                raise ValueError(f"parameter #{self.leaves[i]} is not on its shadow's devices")

    def run(
        self, arrays: list[Any], params: list[Any], c: Any, inplace: bool, exact: bool
    ) -> list[Any]:
        """The update, concrete: jitted, so a mismatch raises before anything is donated."""
        if exact:
            deltas = _scaled(self.differences(arrays, params), c)
            subtract = _subtract_donating if inplace else _subtract_keeping
            return list(subtract(arrays, deltas))
        return list(self.jitted[inplace](arrays, params, c))


class _Plan:
    """The parts of one shadow list (hashable by identity: it is pytree aux data)."""

    def __init__(self, n: int, parts: list[_Part]) -> None:
        self.n = n
        self.parts = parts

    def split(self, seq: Sequence[Any]) -> list[Sequence[Any]]:
        """``seq`` (arrays, in the parts' order) cut into one list per part."""
        if len(self.parts) == 1:
            return [seq]
        out, start = [], 0
        for part in self.parts:
            out.append(seq[start : start + part.width])
            start += part.width
        return out


class _Packed(ShadowList):
    """Shadows of one update, small ones packed in flat buffers (see `SMALL`).

    ``arrays`` are what the compiled updates read and donate: each part's flat buffers, then
    its large shadows. The per-leaf arrays the core reads (averages, state dicts) are sliced
    from the buffers on first access and kept until the next update replaces this list.
    """

    def __init__(self, plan: _Plan, arrays: list[Any]):
        super().__init__([None] * plan.n)
        self.plan = plan
        self.arrays = arrays
        self.fresh = False
        self.backend_data = plan

    def _fill(self) -> None:
        if self.fresh:
            return
        for part, arrays in zip(self.plan.parts, self.plan.split(self.arrays)):
            flats = list(arrays[: len(part.packs)])
            if flats and any(_is_tracer(f) for f in flats):
                cuts = part.slices(flats)  # inlined into the caller's computation
            else:
                # one compiled slice per distinct shape, called per leaf: compiling one
                # function with a slice per leaf costs XLA ~10 ms of code generation each
                cuts = [
                    [_take(flat, start, shape) for shape, start in zip(shapes, part_starts)]
                    for (_, shapes, _), part_starts, flat in zip(part.packs, part.starts, flats)
                ]
            for (pos, _, _), pieces in zip(part.packs, cuts):
                for i, piece in zip(pos, pieces):
                    list.__setitem__(self, part.leaves[i], piece)
            for i, a in zip(part.large, arrays[len(part.packs) :]):
                list.__setitem__(self, part.leaves[i], a)
        self.fresh = True

    def __getitem__(self, i: Any) -> Any:
        self._fill()
        return list.__getitem__(self, i)

    def __iter__(self) -> Any:
        self._fill()
        return list.__iter__(self)

    def __repr__(self) -> str:
        self._fill()
        return list.__repr__(self)


jax.tree_util.register_pytree_node(
    _Packed,
    lambda packed: (packed.arrays, packed.plan),
    lambda plan, arrays: _Packed(plan, list(arrays)),
)


def _layout(params: Sequence[Any], layout: str, zeros: bool) -> _Packed:
    """New shadows for ``params`` (concrete), laid out per device set, `SMALL` and ``layout``.

    Every buffer starts at zero; copies are then made by the update itself with ``c = 1``
    (``0 - (0 - p)·1`` is ``p`` exactly), so creating the shadows compiles nothing the
    training loop's first step would not compile anyway.
    """
    by_devices: dict[frozenset[Any], list[int]] = {}
    for i, x in enumerate(params):
        by_devices.setdefault(frozenset(x.devices()), []).append(i)
    parts, arrays = [], []
    for devices, leaves in by_devices.items():
        local = [params[i] for i in leaves]
        packs: dict[tuple[Any, Any], list[int]] = {}
        large = []
        for j, x in enumerate(local):
            if (
                layout == "separate"
                or (layout == "auto" and x.size >= SMALL)
                or not isinstance(x.sharding, jax.sharding.SingleDeviceSharding)
            ):
                large.append(j)
            else:
                packs.setdefault((x.sharding, x.dtype), []).append(j)
        specs = [(tuple(x.shape), x.dtype) for x in local]
        part = _Part(leaves, specs, list(packs.values()), large, devices)
        made = [
            jnp.zeros(sum(sizes), dtype, device=sharding)
            for ((sharding, dtype), (_, _, sizes)) in zip(packs, part.packs)
        ]
        made += [jnp.zeros(local[j].shape, local[j].dtype, device=local[j].sharding) for j in large]
        if not zeros:
            made = part.run(made, local, 1.0, inplace=True, exact=False)
        parts.append(part)
        arrays += made
    return _Packed(_Plan(len(params), parts), arrays)


def _exact(shadows: list[Any], params: list[Any], c: Any, inplace: bool) -> list[Any]:
    deltas = _scaled(_differences(shadows, params), c)
    subtract = _subtract_donating if inplace else _subtract_keeping
    return list(subtract(shadows, deltas))


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey/FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


class JaxBackend(ArrayAPIBackend):
    """Backend for ``jax.Array`` (concrete arrays and tracers).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> backend = JaxBackend()
    >>> shadows = backend.create_shadows([jnp.zeros(2)], zeros=False)
    >>> backend.update(shadows, [jnp.full(2, 5.0)], 0.9, inplace=True)
    [Array([4.5, 4.5], dtype=float32)]
    """

    def __init__(self) -> None:
        super().__init__(
            "jax",
            Capabilities(
                mutable_arrays=False,
                inplace_update=False,
                fused_update=True,
                self_checking=True,
                checks_signature=True,
            ),
        )

    def owns(self, x: Any) -> bool:
        """Return True for ``jax.Array`` (tracers included)."""
        return isinstance(x, jax.Array)

    def namespace(self, x: Any) -> Any:
        """Return ``jax.numpy`` (an array API namespace)."""
        return jnp

    def device(self, x: Any) -> Any:
        """Return the array's sharding (None for a tracer, whose placement is the caller's)."""
        return None if _is_tracer(x) else x.sharding

    def is_floating(self, x: Any) -> bool:
        """Return True for floating dtypes (bfloat16 and float16 included)."""
        return bool(jnp.issubdtype(x.dtype, jnp.floating))

    def create_shadows(
        self, params: Sequence[Any], *, zeros: bool, layout: str = "auto"
    ) -> list[Any]:
        """Return copies (or zeros) with each parameter's sharding, laid out per ``layout``.

        ``"auto"``: parameters under `SMALL` elements on one device share a flat buffer per
        (device, dtype); ``"flat"``: every single-device parameter does; ``"separate"``: each
        keeps its own array. Sharded parameters always keep their own (and their sharding).
        Inside a trace the shadows are plain copies.
        """
        if layout not in ("auto", "flat", "separate"):
            raise ValueError(
                f"jax backend has no {layout!r} layout (use 'auto', 'flat' or 'separate')"
            )
        if any(_is_tracer(p) for p in params):
            return [jnp.zeros_like(p) if zeros else jnp.copy(p) for p in params]
        return _layout(params, layout, zeros)

    def update(
        self,
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: Any,
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[Any]:
        """New shadows from one compiled call; with ``inplace`` the old ones are donated.

        The parameters' shapes and dtypes are checked when the update is traced (for each new
        signature), and jit refuses parameters committed to other devices; a mismatch raises
        ``ValueError`` or ``TypeError`` with nothing donated (`Capabilities.self_checking`).
        """
        params = list(params)
        if isinstance(shadows, _Packed):
            return self._update_packed(shadows, params, c, inplace=inplace, exact=exact)
        shadows = list(shadows)
        # a trace makes every argument of the traced function a tracer: the first of each
        # list tells (a concrete array mixed in merely gets a nested, non-donating jit)
        traced = (shadows and _is_tracer(shadows[0])) or (params and _is_tracer(params[0]))
        if traced or _is_tracer(c):
            # inside the caller's trace: inlined, and fused by XLA (see the module notes)
            return _update(shadows, params, c)
        _check_specs([(s.shape, s.dtype) for s in shadows], params)
        if exact:
            return _exact(shadows, params, c, inplace)
        fn = _update_donating if inplace else _update_keeping
        return list(fn(shadows, params, c))

    def _update_packed(
        self, shadows: _Packed, params: list[Any], c: Any, *, inplace: bool, exact: bool
    ) -> _Packed:
        plan = shadows.plan
        if len(params) != plan.n:
            raise ValueError(f"got {len(params)} parameters for {plan.n} shadows")
        chunks = plan.split(shadows.arrays)
        if len(plan.parts) == 1:
            local = [params]
        else:
            local = [[params[i] for i in part.leaves] for part in plan.parts]
        traced = (params and _is_tracer(params[0])) or _is_tracer(shadows.arrays[0])
        if traced or _is_tracer(c):
            out = []
            for part, arr, p in zip(plan.parts, chunks, local):
                out += part.update(list(arr), p, c)
            return _Packed(plan, out)
        if len(plan.parts) > 1:  # every part is checked before the first one runs
            for part, p in zip(plan.parts, local):
                part.check(p)
        out = []
        for part, arr, p in zip(plan.parts, chunks, local):
            out += part.run(list(arr), p, c, inplace, exact)
        return _Packed(plan, out)

    def flatten_node(self, obj: Any) -> tuple[tuple[str, ...], list[Any], Any] | None:
        """Split one level of a registered pytree node (a flax struct, an optax state...).

        Returns the children's names, the children and the treedef that rebuilds the node;
        None for a leaf.
        """
        if isinstance(obj, jax.Array) or obj is None or type(obj) in (dict, list, tuple):
            return None
        flat, treedef = jax.tree_util.tree_flatten_with_path(obj, is_leaf=lambda x: x is not obj)
        if len(flat) == 1 and not flat[0][0] and flat[0][1] is obj:
            return None  # not a registered node: a leaf
        keys = tuple(_key_name(path[0]) for path, _ in flat)
        return keys, [child for _, child in flat], treedef

    def is_traced(self, x: Any) -> bool:
        """Return True for a tracer (inside ``jit``, ``grad``, ``scan``...)."""
        return _is_tracer(x)

    def to_device(self, x: Any, device: Any) -> Any:
        """Return ``x`` placed on ``device`` (a device or a sharding)."""
        return jax.device_put(x, device)

    def to_host(self, x: Any) -> Any:
        """Return the array fetched to the host."""
        return jax.device_get(x)


BACKEND = JaxBackend()
