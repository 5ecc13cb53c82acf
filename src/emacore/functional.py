"""The pure functional API: ``init`` / ``update`` / ``average`` over pytrees.

State is explicit (`EMAState`); ``update`` returns a new state and, unless asked to work
in place, leaves its inputs untouched. The stateful `emacore.ExponentialMovingAverage` is
a thin façade over the same machinery (`emacore._engine`), so both share one implementation
of validation, decay, debias and dispatch to the backends.

Examples
--------
>>> import numpy as np
>>> from emacore import functional as F
>>> params = {"w": np.zeros(3, np.float32)}
>>> state = F.init(params)
>>> state = F.update(state, {"w": np.full(3, 5.0, np.float32)}, decay=0.1)
>>> F.average(state)["w"]
array([4.5, 4.5, 4.5], dtype=float32)
"""

from __future__ import annotations

import operator
from typing import Any

from emacore import _pytree
from emacore._debias import COMPAT_MODES, coefficient
from emacore._engine import (
    NONFINITE_POLICIES,
    advance,
    apply_update,
    averages,
    check_floating,
    check_pairs,
    check_writable,
    create_shadows,
    first_traced,
    nonfinite_leaves,
    on_device,
    resolve_backends,
    shadow_dtypes,
    step_decay,
    traced_all_finite,
)
from emacore._state import EMAState
from emacore.backend import Backend
from emacore.errors import NonFiniteError, StructureError, UnknownBackendError
from emacore.schedules import Schedule

__all__ = ["EMAState", "average", "init", "update"]


def _check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")


def init(
    params: Any,
    *,
    zero_debias: bool = False,
    compat: str = "default",
    backend: str | Backend | None = None,
    shadow_dtype: Any = None,
    traceable: bool = False,
    layout: str | None = None,
    device: Any = None,
) -> EMAState:
    """Create the state of an EMA over the pytree ``params``.

    Parameters
    ----------
    params : pytree of arrays
        An array, or a dict/list/tuple/namedtuple nest of floating arrays.
    zero_debias : bool
        Start the shadows at zero and report debiased averages (as Adam's moments).
        Otherwise the shadows start as copies of ``params``.
    compat : {"default", "tensorflow"}
        ``"tensorflow"`` reproduces TF 2's arithmetic bit for bit.
    backend : str or Backend, optional
        Force a backend instead of resolving it from the arrays' type.
    shadow_dtype : None, "same", or a floating dtype (or its name)
        None (default): float32 shadows for 16-bit float parameters, the parameter's dtype
        otherwise (``compat="tensorflow"``: always the parameter's, as TF).
    device : optional
        Keep the shadows on this device (e.g. ``"cpu"`` for GPU parameters: offload) instead
        of each parameter's; every update then copies the parameters there first.
    layout : {None, "auto", "flat", "separate"}
        How the backend lays the shadows out: ``"flat"`` packs them in one buffer per
        dtype and device (many small tensors then cost one kernel per step), ``"separate"``
        allocates each; ``"auto"`` lets the backend choose (numpy, torch and jax pack small
        tensors). A backend that cannot honour a layout raises ``ValueError``. None (the
        default) is ``"auto"``, except that a nested structure on jax keeps one array per
        leaf in ``state.shadow``: reading a leaf out of a packed jax buffer copies it, so a
        packed state of a dict is a `emacore.ShadowTree` (read it with `average`), which you
        get by asking for a layout, or by offloading (``device``: the shadows stay where
        they were put, in the backend's layout).
    traceable : bool
        Keep the counters (``count``, ``decay_product``, ``last_decay``) as 0-d arrays on the
        first leaf's device instead of Python numbers, so that `update` inside
        ``torch.compile(fullgraph=True)`` sees new values, not new constants, each step (no
        recompilation). Decays computed from such a step are arrays and are not
        range-checked. Not available with ``compat="tensorflow"``, whose float32 decay
        arithmetic runs in Python.

    Returns
    -------
    EMAState
        ``count == 0``; shadows are fresh arrays on each parameter's device.

    Examples
    --------
    >>> import numpy as np
    >>> init([np.ones(2)]).shadow
    [array([1., 1.])]
    """
    _check_compat(compat)
    leaves, treedef = _pytree.flatten(params)
    names = _pytree.leaf_names(treedef)
    backends = resolve_backends(leaves, names, backend)
    check_floating(leaves, names, backends)
    dtypes = shadow_dtypes(leaves, backends, shadow_dtype, compat)
    shadows = create_shadows(
        leaves, backends, zeros=zero_debias, dtypes=dtypes, layout=layout or "auto", device=device
    )
    packed = _packed(shadows)
    flat_list = treedef == ("list", (_pytree.LEAF,) * len(leaves))
    # one array per leaf, so the state keeps the structure; not for offloaded shadows: a
    # leaf read out of a packed buffer is read into device memory, where averages are used
    if packed and layout is None and device is None and not flat_list:
        shadows = list(shadows)
    counters: dict[str, Any] = {}
    if traceable:
        if compat == "tensorflow":
            raise ValueError(
                "traceable=True cannot reproduce TensorFlow: compat='tensorflow' computes the "
                "decay in float32 in Python; use compat='default'"
            )
        if not leaves:
            raise ValueError("traceable=True needs at least one leaf to place its counters")
        first = shadows.first() if isinstance(shadows, _pytree.ShadowList) else shadows[0]
        # a backend may place 0-d counters apart from a leaf (jax: replicated over its mesh;
        # a scalar cannot take a sharded leaf's partitioning)
        xp, where = backends[0].namespace(first), backends[0].scalar_device(first)
        wide = xp.float64 if _has_float64(xp) else xp.float32
        counters = {
            "count": xp.asarray(0, dtype=_default_int(xp), device=where),
            "decay_product": xp.asarray(1.0, dtype=wide, device=where),
            "last_decay": xp.asarray(1.0, dtype=wide, device=where),
        }
        if wide != xp.float64:  # a float32 product near 1 cannot give 1 - product: keep it
            counters["debias"] = xp.asarray(0.0, dtype=wide, device=where)
        # resolve the shadows' type now, so a traced update finds the registry's cache as
        # it will stay (a cache that grows under torch.compile is a recompile)
        resolve_backends([first], names[:1], backend)
    tree = _pytree.unflatten(treedef, shadows)
    return EMAState(
        tree,
        zero_debias=bool(zero_debias),
        compat=compat,
        device=device,
        backend_list=_kept(shadows, tree),
        **counters,
    )


def update(
    state: EMAState,
    params: Any,
    decay: float | Schedule,
    *,
    step: Any = None,
    dt: Any = None,
    inplace: bool = False,
    backend: str | Backend | None = None,
    exact: bool | None = None,
    nonfinite: str = "ignore",
) -> EMAState:
    """Return the state after one update: ``shadow ← shadow − (shadow − param)·(1 − d)``.

    Parameters
    ----------
    state : EMAState
        From `init` or a previous `update`.
    params : pytree of arrays
        The current parameters, in the structure ``state`` was built from.
    decay : float or Schedule
        A constant decay in [0, 1], or a schedule called with ``step``.
    step : int, optional
        The step a schedule is evaluated at; default ``state.count``.
    dt : float or 0-d array, optional
        Steps (or time) since the last update: the decay becomes ``d ** dt`` (an update
        every k steps, or pandas' ``ewm(times=...)`` for irregular ones). Default: one.
    inplace : bool
        Write into the shadow arrays where the backend can (numpy, torch); the returned state
        then shares them. Default False: inputs are not modified.
    backend : str or Backend, optional
        Force a backend instead of resolving it from the arrays' type.
    exact : bool, optional
        Use the reference operation order ``s - (s - x) * (1 - d)`` on every backend (same
        bits everywhere). Default: only with ``compat="tensorflow"``; otherwise a backend may
        use a one-pass form (torch's ``lerp``) that rounds differently in the last place.
    nonfinite : {"ignore", "skip", "raise"}
        When a parameter holds NaN or infinity: ``"skip"`` returns ``state`` unchanged (under
        a trace, a state whose every shadow and counter is unchanged: it needs
        ``init(..., traceable=True)`` and ``inplace=False``), ``"raise"`` raises
        `emacore.errors.NonFiniteError` naming the leaves (concrete arrays only). Decided for
        the whole update. Default ``"ignore"``: not checked.

    Returns
    -------
    EMAState
        The new state. Nothing is modified if any check fails.

    Raises
    ------
    StructureError
        ``params`` does not have the structure of ``state.shadow``.
    LeafMismatchError
        A parameter's shape, dtype, device or backend differs from its shadow's.
    DecayError
        The decay is NaN or outside [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> s = init(np.zeros(1, np.float32))
    >>> update(s, np.full(1, 5.0, np.float32), 0.1).shadow
    array([4.5], dtype=float32)
    """
    p_leaves, p_def = _pytree.flatten(params)
    s_leaves, s_def = _pytree.flatten(state.shadow)
    if p_def != s_def:
        raise StructureError(_structure_diff(s_def, p_def))
    held = state.backend_list
    if held is not None and len(held) == len(s_leaves) and all(map(operator.is_, held, s_leaves)):
        s_leaves = held  # the same arrays: the backend's list, with its layout notes
    else:
        held = None
        if _replaced(s_leaves):  # a flat list state whose items were replaced since
            s_leaves = list(s_leaves)  # then the notes describe other arrays: drop them
    names = _pytree.leaf_names(s_def)
    d = step_decay(decay, state.count if step is None else step, state.compat, dt)
    packed = _packed(s_leaves)
    specs = None
    if isinstance(s_leaves, _pytree.ShadowList) and packed:
        # read nothing out of the buffers: one array for the type, the shapes known
        s_backends = resolve_backends([s_leaves.first()], names[:1], backend) * len(s_leaves)
        specs = None if s_leaves.specs is None else list(s_leaves.specs)
    else:
        s_backends = resolve_backends(s_leaves, names, backend)
        if isinstance(s_leaves, _pytree.ShadowList):  # noted when it was kept (`_kept`)
            specs = s_leaves.specs
    p_backends = resolve_backends(p_leaves, names, backend)
    self_checking = packed and s_backends[0].capabilities.self_checking
    check_pairs(
        names,
        s_leaves,
        p_leaves,
        s_backends,
        p_backends,
        shadow_specs=specs,
        check_devices=state.device is None and not self_checking,
    )
    finite = _guard(state, p_leaves, p_backends, names, nonfinite, inplace)
    if finite is False:
        return state  # "skip": nothing changes
    p_leaves = on_device(p_leaves, s_backends, state.device)
    if inplace:
        check_writable(s_leaves, names, s_backends)
    new = apply_update(
        s_leaves,
        p_leaves,
        s_backends,
        coefficient(d, state.compat),
        inplace=inplace,
        exact=state.compat == "tensorflow" if exact is None else exact,
    )
    counters = advance(state, d)
    if finite is not True:  # a traced guard: keep the old values where it is false
        if packed:  # on the packed buffers, keeping their layout
            new = s_backends[0].select(finite, new, s_leaves)
        else:
            new = [b.namespace(n).where(finite, n, s) for n, s, b in zip(new, s_leaves, s_backends)]
        old = {"count": state.count, "decay_product": state.decay_product}
        old["last_decay"] = state.last_decay
        old["debias"] = state.debias
        first = s_leaves.first() if isinstance(s_leaves, _pytree.ShadowList) else s_leaves[0]
        xp = s_backends[0].namespace(first)
        counters = {k: xp.where(finite, v, old[k]) for k, v in counters.items()}
    # updated in place in the list the state holds: its structure holds the same arrays
    tree = state.shadow if held is not None and new is held else _pytree.unflatten(s_def, new)
    return state.replace(shadow=tree, backend_list=_kept(new, tree), **counters)


def _guard(
    state: EMAState,
    params: list[Any],
    backends: list[Backend],
    names: tuple[str, ...],
    policy: str,
    inplace: bool,
) -> Any:
    """True to update; False to skip; a 0-d boolean array (traced) to decide on device."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    if policy == "ignore" or not params:
        return True
    if first_traced(params, backends) is not None:
        if policy == "raise":
            raise ValueError(
                "nonfinite='raise' needs concrete values and these parameters are traced; "
                "use nonfinite='skip' inside jit/compile"
            )
        if inplace or not hasattr(state.count, "shape"):
            raise ValueError(
                "nonfinite='skip' under a trace needs a traceable state "
                "(init(..., traceable=True)) and inplace=False"
            )
        return traced_all_finite(params, backends)
    bad = nonfinite_leaves(params, backends, names)
    if not bad:
        return True
    if policy == "raise":
        raise NonFiniteError(f"parameters hold NaN or infinity: {bad[:10]}; nothing was updated")
    return False


def average(state: EMAState) -> Any:
    """Return the averages in the parameters' structure (debiased if ``zero_debias``).

    Without ``zero_debias`` these are the shadow arrays themselves (not copies).

    Examples
    --------
    >>> import numpy as np
    >>> s = init({"w": np.zeros(1)}, zero_debias=True)
    >>> s = update(s, {"w": np.ones(1)}, 0.9)
    >>> average(s)["w"]
    array([1.])
    """
    leaves, treedef = _pytree.flatten(state.shadow)
    names = _pytree.leaf_names(treedef)
    return _pytree.unflatten(treedef, averages(state, leaves, resolve_backends(leaves, names)))


def _kept(shadows: Any, tree: Any) -> Any:
    """The backend's list to keep beside ``tree`` (`EMAState.backend_list`), or None.

    Notes its shadows' shapes and dtypes on it (they never change), for the next update's
    checks; once, so that an update under ``torch.compile`` finds the list as it will stay.
    """
    if not (isinstance(shadows, _pytree.ShadowList) and shadows.views):
        return None
    if shadows.specs is None or _replaced(shadows):
        shadows.specs = list(map(operator.attrgetter("shape", "dtype"), shadows))
        shadows.noted = tuple(shadows)  # the arrays, not ids: a freed one's id is reused
    return shadows if tree is not shadows else None  # a flat list state is the list itself


def _replaced(shadows: Any) -> bool:
    """A backend's list (not packed) whose items are no longer those the core noted."""
    if not isinstance(shadows, _pytree.ShadowList) or not shadows.views or shadows.noted is None:
        return False
    noted = shadows.noted
    return len(noted) != len(shadows) or not all(map(operator.is_, noted, shadows))


def _packed(shadows: Any) -> bool:
    """A backend's list of shadows whose items are copies when read (jax's packed buffers)."""
    return isinstance(shadows, _pytree.ShadowList) and not shadows.views


def _has_float64(xp: Any) -> bool:
    try:
        return "float64" in xp.__array_namespace_info__().dtypes()
    except Exception:  # a namespace without the inspection API: the standard's float64
        return True


def _default_int(xp: Any) -> Any:
    """int64 where the namespace has it (jax without x64 has int32 only)."""
    try:
        return xp.__array_namespace_info__().default_dtypes()["integral"]
    except Exception:  # a namespace without the inspection API: the standard's int64
        return xp.int64


def _structure_diff(expected: Any, got: Any) -> str:
    want, have = _pytree.leaf_names(expected), _pytree.leaf_names(got)
    missing = [n for n in want if n not in set(have)]
    unexpected = [n for n in have if n not in set(want)]
    parts = ["the parameters' structure differs from the state's"]
    if missing:
        parts.append(f"missing leaves: {missing[:10]}")
    if unexpected:
        parts.append(f"unexpected leaves: {unexpected[:10]}")
    if not missing and not unexpected:
        parts.append(f"same leaf names {list(want)[:10]} in different container types")
    return "; ".join(parts)


# Re-exported for plugin authors' error handling.
__all__ += ["UnknownBackendError"]
