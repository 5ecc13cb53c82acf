"""The jax backend: immutable arrays, one compiled update for every leaf, shadows donated.

Design invariants:

* ``jax.Array`` is immutable, so bare arrays in a plain list are tracked by position and every
  update returns new shadows. The stateful API donates the old shadows to the compiled update
  (``donate_argnums``), so no second copy of the model is allocated.
* One ``jax.jit`` function updates all leaves; jit caches it per (structure, dtypes,
  shardings), so a training loop compiles once. The coefficient ``1 - d`` is passed as a
  traced scalar: a schedule never triggers a recompilation.
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

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from emacore._generic import ArrayAPIBackend
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
            "jax", Capabilities(mutable_arrays=False, inplace_update=False, fused_update=True)
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
        """Return copies (or zeros) with each parameter's sharding.

        XLA fuses every leaf into one compiled update already; there is no flat layout.
        """
        if layout not in ("auto", "separate"):
            raise ValueError(
                f"jax backend has no {layout!r} layout: the compiled update already covers "
                "every leaf in one call (layout='auto' or 'separate')"
            )
        out = []
        for p in params:
            if _is_tracer(p):
                out.append(jnp.zeros_like(p) if zeros else jnp.copy(p))
            elif zeros:
                out.append(jnp.zeros(p.shape, p.dtype, device=p.sharding))
            else:
                out.append(jnp.copy(p))
        return out

    def update(
        self,
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: Any,
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[Any]:
        """New shadows from one compiled call; with ``inplace`` the old ones are donated."""
        shadows, params = list(shadows), list(params)
        # a trace makes every argument of the traced function a tracer: the first of each
        # list tells (a concrete array mixed in merely gets a nested, non-donating jit)
        traced = (shadows and _is_tracer(shadows[0])) or (params and _is_tracer(params[0]))
        if traced or _is_tracer(c):
            # inside the caller's trace: inlined, and fused by XLA (see the module notes)
            return _update(shadows, params, c)
        if exact:
            deltas = _scaled(_differences(shadows, params), c)
            subtract = _subtract_donating if inplace else _subtract_keeping
            return list(subtract(shadows, deltas))
        fn = _update_donating if inplace else _update_keeping
        return list(fn(shadows, params, c))

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
