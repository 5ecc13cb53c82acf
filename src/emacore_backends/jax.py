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
* On CPU, large shadows of parameters with several dimensions are kept raveled (1-d), and
  the parameters raveled inside the update (a free bitcast): XLA's CPU loop over an n-d array
  runs its innermost dimension (3 or 1 for a convolution kernel) as the vector loop, and is
  about 20% slower over ResNet-50's weights than over the same numbers in 1-d. Reads reshape
  them (a copy, kept until the next update).
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
from typing import Any, cast

import jax
import jax.numpy as jnp

from emacore import ArrayAPIBackend, EMAState, ShadowTree
from emacore.backend import Capabilities, ShadowList

__all__ = ["BACKEND", "JaxBackend"]

# EMAState crosses jit boundaries (and lives in optax/Flax states): its arrays are children,
# its options static.
jax.tree_util.register_dataclass(
    EMAState,
    data_fields=["shadow", "count", "decay_product", "last_decay", "debias"],
    meta_fields=["zero_debias", "compat", "device"],
    drop_fields=["backend_list"],  # numpy's and torch's layout notes; never jax arrays
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
        homes: list[Any],
        moves: bool,
        raveled: Sequence[bool] = (),
    ) -> None:
        self.leaves = tuple(leaves)  # positions in the whole list
        self.specs = specs
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
        # which large shadows are held raveled (see the module notes)
        self.raveled = tuple(raveled) or (False,) * len(self.large)
        self.width = len(self.packs) + len(self.large)  # arrays held
        # where each array (packs, then large) lives, and where its arithmetic runs: shadows
        # offloaded to host memory come over to device memory inside the compiled update
        self.homes = homes
        self.computes = [_in_device_memory(h) for h in homes]
        self.offloaded = self.computes != self.homes
        self.devices = frozenset(homes[0].device_set) if homes else frozenset()
        # with the EMA's ``device`` option, parameters are brought to their shadows' devices
        targets: list[Any] = [None] * len(specs)
        for (pos, _, _), where in zip(self.packs, self.computes):
            for i in pos:
                targets[i] = where
        for i, where in zip(self.large, self.computes[len(self.packs) :]):
            targets[i] = where
        self.targets = targets if moves else None
        self.jitted = {
            True: jax.jit(self.update, donate_argnums=0),
            False: jax.jit(self.update),
        }
        self.multi: dict[tuple[int, bool], Any] = {}
        self.differences = jax.jit(
            lambda arrays, params: [a - b for a, b in zip(self.fetch(arrays), self.gather(params))]
        )
        self.subtract = {
            inplace: jax.jit(
                lambda arrays, deltas: self.store(
                    [a - d for a, d in zip(self.fetch(arrays), deltas)]
                ),
                donate_argnums=0 if inplace else 1,
            )
            for inplace in (True, False)
        }

    def fetch(self, arrays: list[Any]) -> list[Any]:
        """The shadows in device memory (a transfer inside the computation when offloaded)."""
        if not self.offloaded:
            return arrays
        return [jax.device_put(a, where) for a, where in zip(arrays, self.computes)]

    def store(self, arrays: list[Any]) -> list[Any]:
        """New shadows back where they live."""
        if not self.offloaded:
            return arrays
        return [jax.device_put(a, home) for a, home in zip(arrays, self.homes)]

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
        return flats + [
            jnp.ravel(params[i]) if flat else params[i] for i, flat in zip(self.large, self.raveled)
        ]

    def update(self, arrays: list[Any], params: Sequence[Any], c: Any) -> list[Any]:
        """The update of every shadow: concatenation and arithmetic fuse into one loop."""
        return self.store(_update(self.fetch(arrays), self.gather(params), c))

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
        if self.targets is not None:
            return  # they will be moved
        for i, p in enumerate(params):
            if frozenset(p.devices()) != self.devices:
                raise ValueError(f"parameter #{self.leaves[i]} is not on its shadow's devices")

    def lanes_jit(self, k: int, inplace: bool) -> Any:
        """One jitted update of ``k`` profiles' arrays (cached per ``k``)."""
        key = (k, inplace)
        fn = self.multi.get(key)
        if fn is None:

            def lanes(arrays: list[list[Any]], params: list[Any], cs: list[Any]) -> list[Any]:
                return [self.update(a, params, c) for a, c in zip(arrays, cs)]

            fn = self.multi[key] = jax.jit(lanes, donate_argnums=0 if inplace else ())
        return fn

    def run(
        self, arrays: list[Any], params: list[Any], c: Any, inplace: bool, exact: bool
    ) -> list[Any]:
        """The update, concrete: jitted, so a mismatch raises before anything is donated."""
        if self.targets is not None:  # one batched transfer (arrays in place stay put)
            params = jax.device_put(params, self.targets)
        if exact:
            deltas = _scaled(self.differences(arrays, params), c)
            return list(self.subtract[inplace](arrays, deltas))
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
    from the buffers (large leaves: copied) on first access and kept until the next update
    replaces this list, so that they stay valid after it donates ``arrays``.
    """

    views = False  # a leaf is sliced (copied) out of its buffer when read

    def __init__(self, plan: _Plan, arrays: list[Any]):
        super().__init__([None] * plan.n)
        self.plan = plan
        self.arrays = arrays
        self.fresh = False
        self.backend_data = plan

    def first(self) -> Any:
        """A buffer (for the type and placement), or the first leaf if it lives off device."""
        if self.fresh or not self.arrays or self.plan.parts[0].offloaded:
            return self[0]
        return self.arrays[0]

    def _fill(self) -> None:
        if self.fresh:
            return
        for part, arrays in zip(self.plan.parts, self.plan.split(self.arrays)):
            flats = list(arrays[: len(part.packs)])
            large = list(arrays[len(part.packs) :])
            if part.offloaded and not any(_is_tracer(a) for a in arrays):
                # read into device memory, where averages are used (and eager math works)
                flats = jax.device_put(flats, part.computes[: len(flats)])
                large = jax.device_put(large, part.computes[len(flats) :])
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
            for i, flat, a in zip(part.large, part.raveled, large):
                if flat:
                    a = a.reshape(part.specs[i][0])  # a copy
                elif not part.offloaded and not _is_tracer(a):
                    # the next update donates `a`: what was read must outlive it, as the
                    # leaves sliced out of a pack and the reshaped copies do
                    a = jnp.copy(a)
                list.__setitem__(self, part.leaves[i], a)
        self.fresh = True

    @property
    def specs(self) -> list[tuple[tuple[int, ...], Any]]:
        """Every shadow's (shape, dtype), without slicing anything out of the buffers."""
        out: list[Any] = [None] * self.plan.n
        for part in self.plan.parts:
            for i, spec in zip(part.leaves, part.specs):
                out[i] = spec
        return out

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
# a packed state of a dict (`functional.init(tree, layout=...)`): its buffers are the children
jax.tree_util.register_pytree_node(
    ShadowTree,
    lambda tree: ((tree.shadows,), tree.treedef),
    lambda treedef, children: ShadowTree(children[0], treedef),
)


def _in_device_memory(sharding: Any) -> Any:
    kind = getattr(sharding, "memory_kind", None)
    if kind is None or kind == "device":
        return sharding
    return sharding.with_memory_kind("device")


def _target(p: Any, device: Any) -> Any:
    """Where the shadow of ``p`` lives, for the EMA's ``device`` option (a sharding)."""
    if device is None:
        return p.sharding
    if isinstance(device, jax.sharding.Sharding):
        return device
    if isinstance(device, jax.Device):
        return jax.sharding.SingleDeviceSharding(device)
    if isinstance(device, str):
        if device in _MEMORY_KINDS:
            # the parameter's own sharding, in another memory of the same devices
            for d in p.sharding.device_set:
                kinds = [m.kind for m in d.addressable_memories()]
                if device not in kinds:
                    raise ValueError(
                        f"jax backend: device={device!r} is a memory kind the {d.platform} "
                        f"device {d} does not have (it has {kinds})"
                    )
            return p.sharding.with_memory_kind(device)
        try:
            return jax.sharding.SingleDeviceSharding(jax.devices(device)[0])
        except RuntimeError as exc:
            raise ValueError(
                f"jax backend: device={device!r} is neither a memory kind "
                f"({', '.join(_MEMORY_KINDS)}) nor an available platform ({exc})"
            ) from None
    raise ValueError(
        f"jax backend: device={device!r} must be a jax Device, a Sharding, a platform name "
        f"('cpu') or a memory kind ({', '.join(_MEMORY_KINDS)})"
    )


_MEMORY_KINDS = ("pinned_host", "unpinned_host", "device")


def _zeros(shape: Any, dtype: Any, where: Any) -> Any:
    compute = _in_device_memory(where)
    z = jnp.zeros(shape, dtype, device=compute)
    return z if compute is where else jax.device_put(z, where)


def _same_layout(a: _Plan, b: _Plan) -> bool:
    """Two plans lay out the same leaves the same way (profiles made by one apply)."""
    return a.n == b.n and [(p.leaves, p.packs, p.large, p.homes) for p in a.parts] == [
        (p.leaves, p.packs, p.large, p.homes) for p in b.parts
    ]


def _layout(params: Sequence[Any], layout: str, zeros: bool, device: Any = None) -> _Packed:
    """New shadows for ``params`` (concrete), laid out per device set, `SMALL` and ``layout``.

    Every buffer starts at zero; copies are then made by the update itself with ``c = 1``
    (``0 - (0 - p)·1`` is ``p`` exactly), so creating the shadows compiles nothing the
    training loop's first step would not compile anyway.
    """
    homes = [_target(p, device) for p in params]
    by_devices: dict[frozenset[Any], list[int]] = {}
    for i, where in enumerate(homes):
        by_devices.setdefault(frozenset(where.device_set), []).append(i)
    parts, arrays = [], []
    for leaves in by_devices.values():
        local = [params[i] for i in leaves]
        packs: dict[tuple[Any, Any], list[int]] = {}
        large = []
        for j, i in enumerate(leaves):
            x, where = params[i], homes[i]
            if (
                layout == "separate"
                or (layout == "auto" and x.size >= SMALL)
                or not isinstance(where, jax.sharding.SingleDeviceSharding)
            ):
                large.append(j)
            else:
                packs.setdefault((where, x.dtype), []).append(j)
        specs = [(tuple(x.shape), x.dtype) for x in local]
        part_homes = [where for where, _ in packs] + [homes[leaves[j]] for j in large]
        raveled = [
            local[j].ndim > 1
            and isinstance(homes[leaves[j]], jax.sharding.SingleDeviceSharding)
            and next(iter(homes[leaves[j]].device_set)).platform == "cpu"
            for j in large
        ]
        part = _Part(
            leaves, specs, list(packs.values()), large, part_homes, device is not None, raveled
        )
        sizes = [sum(s) for _, _, s in part.packs] + [
            (local[j].size,) if flat else local[j].shape for j, flat in zip(large, raveled)
        ]
        dtypes = [dt for _, dt in packs] + [local[j].dtype for j in large]
        made = [_zeros(n, dt, where) for n, dt, where in zip(sizes, dtypes, part_homes)]
        if not zeros:
            made = part.run(made, local, 1.0, inplace=True, exact=False)
        parts.append(part)
        arrays += made
    return _Packed(_Plan(len(params), parts), arrays)


def _exact(shadows: list[Any], params: list[Any], c: Any, inplace: bool) -> list[Any]:
    deltas = _scaled(_differences(shadows, params), c)
    subtract = _subtract_donating if inplace else _subtract_keeping
    return list(subtract(shadows, deltas))


def _finite_flags_of(params: list[Any]) -> Any:
    return jnp.stack([jnp.all(jnp.isfinite(p)) for p in params])


_finite_flags = jax.jit(_finite_flags_of)


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
    >>> shadows = backend.create_shadows([jnp.zeros(2, jnp.float32)], zeros=False)
    >>> backend.update(shadows, [jnp.full(2, 5.0, jnp.float32)], 0.9, inplace=True)
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
                places_params=True,
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

    def scalar_device(self, x: Any) -> Any:
        """Where a 0-d array that goes with ``x`` lives: on the same devices, replicated."""
        sharding = self.device(x)
        if sharding is None or len(sharding.device_set) == 1:
            return sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(
                sharding.mesh, jax.sharding.PartitionSpec(), memory_kind=sharding.memory_kind
            )
        return None  # another kind of sharding: uncommitted, jit places it

    def is_floating(self, x: Any) -> bool:
        """Return True for floating dtypes (bfloat16 and float16 included)."""
        return bool(jnp.issubdtype(x.dtype, jnp.floating))

    def create_shadows(
        self, params: Sequence[Any], *, zeros: bool, layout: str = "auto", device: Any = None
    ) -> list[Any]:
        """Return copies (or zeros) with each parameter's sharding, laid out per ``layout``.

        ``device`` (the EMA's option) places them elsewhere: a memory kind such as
        ``"pinned_host"`` keeps each parameter's sharding in that memory of the same devices
        (host offload; the update brings the shadows over and back inside its computation),
        and a platform name (``"cpu"``), a ``jax.Device`` or a ``Sharding`` moves them there
        (each update then brings the parameters over).

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
        return _layout(params, layout, zeros, device)

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

    def update_lanes(
        self,
        shadow_lists: Sequence[Sequence[Any]],
        params: Sequence[Any],
        cs: Sequence[Any],
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[list[Any]]:
        """Update several profiles' shadows in one compiled call per part.

        XLA fuses the profiles' updates into one loop that reads each parameter once.
        """
        lists = list(shadow_lists)
        plans = [sl.plan if isinstance(sl, _Packed) else None for sl in lists]
        first = plans[0]
        params = list(params)
        if (
            exact
            or first is None
            or any(_is_tracer(c) for c in cs)
            or (params and _is_tracer(params[0]))
            or not all(p is not None and _same_layout(p, first) for p in plans)
        ):
            return [
                self.update(sl, params, c, inplace=inplace, exact=exact) for sl, c in zip(lists, cs)
            ]
        if len(params) != first.n:
            raise ValueError(f"got {len(params)} parameters for {first.n} shadows")
        local = (
            [params]
            if len(first.parts) == 1
            else [[params[i] for i in part.leaves] for part in first.parts]
        )
        if len(first.parts) > 1:
            for part, p in zip(first.parts, local):
                part.check(p)
        chunks = [first.split(cast(_Packed, sl).arrays) for sl in lists]
        outs: list[list[Any]] = [[] for _ in lists]
        for j, (part, p) in enumerate(zip(first.parts, local)):
            if part.targets is not None:
                p = jax.device_put(p, part.targets)
            new = part.lanes_jit(len(lists), inplace)([list(c[j]) for c in chunks], p, list(cs))
            for out, arrays in zip(outs, new):
                out += arrays
        return [_Packed(plan, out) for plan, out in zip(plans, outs)]  # type: ignore[arg-type]

    def select(self, flag: Any, new: Sequence[Any], old: Sequence[Any]) -> Any:
        """``new`` where the 0-d ``flag`` is true, else ``old``, keeping a packed layout."""
        return jax.tree.map(lambda n, o: jnp.where(flag, n, o), new, old)

    def scalar_like(self, value: float, x: Any) -> Any:
        """A 0-d array of ``x``'s dtype to combine with ``x``.

        Uncommitted, so jit places it next to ``x`` whatever its sharding (a 0-d array cannot
        take a sharding of rank 1).
        """
        return jnp.asarray(value, dtype=x.dtype)

    def all_finite(self, params: Sequence[Any]) -> list[bool]:
        """Whether each array is finite: one compiled reduction, one transfer."""
        if not params:
            return []
        try:
            flags = _finite_flags(list(params))
        except ValueError:  # arrays on several devices: one reduction each
            return super().all_finite(params)
        return [bool(ok) for ok in jax.device_get(flags)]

    def flatten_node(self, obj: Any) -> tuple[tuple[str, ...], list[Any], Any] | None:
        """Split one level of a registered pytree node (a flax struct, an optax state...).

        Returns the children's names, the children and the treedef that rebuilds the node;
        None for a leaf.
        """
        if isinstance(obj, jax.Array) or obj is None or type(obj) in (dict, list, tuple):
            return None
        if hasattr(obj, "__array_namespace__") or hasattr(obj, "__array__"):
            # another library's array (a torch tensor, perhaps inside torch.compile, which
            # cannot trace jax): a leaf, without asking jax
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
        """Return ``x`` placed per ``device`` (as the EMA's ``device`` option reads it)."""
        return jax.device_put(x, _target(x, device))

    def to_host(self, x: Any) -> Any:
        """Return the array fetched to the host."""
        return jax.device_get(x)

    def from_host(self, host: Any, like: Any, dtype: str | None = None) -> Any:
        """Return ``host`` as an array of ``like``'s dtype (or ``dtype``), sharded as ``like``.

        The cast happens on the host (numpy knows bfloat16 through ml_dtypes), then one
        ``device_put`` places it; without ``jax_enable_x64`` a float64 array becomes float32,
        which the checkpoint's dtype check reports.
        """
        import numpy as np

        target = like.dtype if dtype is None else jnp.dtype(dtype)
        return jax.device_put(np.asarray(host).astype(target, copy=False), like.sharding)


BACKEND = JaxBackend()
