"""The pure functional API: ``init`` / ``update`` / ``average`` over pytrees.

State is explicit (`EMAState`); ``update`` returns a new state and, unless asked to work
in place, leaves its inputs untouched. The stateful `emacore.ExponentialMovingAverage` is
a thin façade over the helpers here, so both share one implementation of validation, decay,
debias and dispatch to the backends.

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
from collections.abc import Sequence
from typing import Any

from emacore import _plugins, _pytree
from emacore._debias import COMPAT_MODES, coefficient, decay_at, exact_correction, tf_correction
from emacore._precision import dtype_name
from emacore._state import EMAState
from emacore.backend import Backend
from emacore.errors import LeafDTypeError, LeafMismatchError, StructureError, UnknownBackendError
from emacore.schedules import Schedule, as_schedule

__all__ = ["EMAState", "average", "init", "update"]


def _check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")


def resolve_backends(
    leaves: Sequence[Any], names: Sequence[str], backend: str | Backend | None = None
) -> list[Backend]:
    """Return the backend of every leaf (one lookup per distinct type).

    With ``backend`` given (a name or a backend), every leaf must belong to it.
    """
    registry = _plugins.get_registry()
    if backend is not None:
        forced = registry.get(backend) if isinstance(backend, str) else backend
        for name, leaf in zip(names, leaves):
            if not forced.owns(leaf):
                raise LeafMismatchError(
                    f"leaf {name!r} is a {type(leaf).__module__}.{type(leaf).__qualname__}, "
                    f"which backend {forced.name!r} does not handle"
                )
        return [forced] * len(leaves)
    types = set(map(type, leaves))
    if len(types) == 1:
        return [registry.resolve(leaves[0])] * len(leaves)
    by_type = {t: registry.resolve(x) for t, x in {type(x): x for x in leaves}.items()}
    return [by_type[type(x)] for x in leaves]


def check_floating(
    leaves: Sequence[Any], names: Sequence[str], backends: Sequence[Backend]
) -> None:
    """Raise `LeafDTypeError` naming the first leaf that is not a floating array."""
    for name, leaf, backend in zip(names, leaves, backends):
        if not backend.is_floating(leaf):
            raise LeafDTypeError(
                f"leaf {name!r} has dtype {leaf.dtype}; only real floating-point leaves can be "
                "averaged (integer buffers such as step counters are not)"
            )


def check_pairs(
    names: Sequence[str],
    shadows: Sequence[Any],
    params: Sequence[Any],
    shadow_backends: Sequence[Backend],
    param_backends: Sequence[Backend],
    *,
    shadow_specs: list[tuple[Any, Any]] | None = None,
    check_devices: bool = True,
) -> None:
    """Raise `LeafMismatchError` if a parameter does not match its shadow.

    Checks backend, shape, dtype and device, in that order. The common case (everything
    matches) costs one list comparison at C speed, not a Python loop per leaf; callers that
    keep the shadows' ``(shape, dtype)`` pairs pass them in as ``shadow_specs``.
    """
    if shadow_backends != param_backends:
        for name, sb, pb in zip(names, shadow_backends, param_backends):
            if sb is not pb:
                raise LeafMismatchError(
                    f"leaf {name!r}: got an array of backend {pb.name!r}, but its shadow "
                    f"belongs to backend {sb.name!r}"
                )
    spec = operator.attrgetter("shape", "dtype")
    got = list(map(spec, params))
    want = shadow_specs if shadow_specs is not None else list(map(spec, shadows))
    if got != want:
        for name, g, w, backend, shadow in zip(names, got, want, shadow_backends, shadows):
            if g[0] != w[0]:
                raise LeafMismatchError(
                    f"leaf {name!r}: shape {_show(g[0])} does not match its shadow's "
                    f"shape {_show(w[0])}"
                )
            if g[1] != w[1] and not widens(backend.namespace(shadow), g[1], w[1]):
                raise LeafMismatchError(
                    f"leaf {name!r}: dtype {g[1]} does not match its shadow's dtype {w[1]} "
                    "(a parameter may only be narrower than its shadow, e.g. bfloat16 "
                    "into a float32 shadow)"
                )
    for backend in dict.fromkeys(shadow_backends) if check_devices else ():
        if backend.capabilities.one_device:
            continue
        for i, b in enumerate(shadow_backends):
            if b is not backend:
                continue
            pd, sd = backend.device(params[i]), backend.device(shadows[i])
            if pd != sd:
                raise LeafMismatchError(
                    f"leaf {names[i]!r}: parameter is on device {pd!r} but its shadow is on "
                    f"{sd!r}; move the parameter back, or load the state onto {pd!r}"
                )


def widens(xp: Any, param_dtype: Any, shadow_dtype: Any) -> bool:
    """True if a ``param_dtype`` parameter converts exactly into a ``shadow_dtype`` shadow."""
    # from finfo, not can_cast: torch's can_cast allows float64 -> float32 (same kind)
    try:
        if not (
            xp.isdtype(param_dtype, "real floating") and xp.isdtype(shadow_dtype, "real floating")
        ):
            return False
        p, w = xp.finfo(param_dtype), xp.finfo(shadow_dtype)
    except (TypeError, ValueError):
        return False
    return bool(
        p.bits <= w.bits
        and p.eps >= w.eps
        and p.max <= w.max
        and p.smallest_normal >= w.smallest_normal
    )


def shadow_dtypes(
    leaves: Sequence[Any], backends: Sequence[Backend], policy: Any, compat: str
) -> list[Any]:
    """The dtype of each new shadow (``None``: the parameter's own).

    ``policy`` None: float32 for 16-bit floating parameters (a bfloat16 shadow with decay
    0.999 never moves: ``1 - d`` is below half its epsilon), the parameter's dtype otherwise;
    with ``compat="tensorflow"`` always the parameter's, as TF does. ``"same"``: the
    parameter's. Otherwise a dtype (or its name, e.g. ``"float32"``) for every leaf.
    """
    out: list[Any] = []
    for x, backend in zip(leaves, backends):
        xp = backend.namespace(x)
        if policy == "same" or (policy is None and compat == "tensorflow"):
            out.append(None)
        elif policy is None:
            out.append(xp.float32 if int(xp.finfo(x.dtype).bits) < 32 else None)
        else:
            target = getattr(xp, policy) if isinstance(policy, str) else policy
            if not xp.isdtype(target, "real floating"):
                raise LeafDTypeError(f"shadow_dtype must be a floating dtype, got {policy!r}")
            if target != x.dtype and not widens(xp, x.dtype, target):
                raise LeafDTypeError(
                    f"shadow_dtype {policy!r} cannot hold a {x.dtype} parameter exactly; "
                    "choose a dtype at least as wide"
                )
            out.append(None if target == x.dtype else target)
    return out


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, tuple) else str(value)


def create_shadows(
    params: Sequence[Any],
    backends: Sequence[Backend],
    *,
    zeros: bool,
    dtypes: Sequence[Any] | None = None,
    layout: str = "auto",
    device: Any = None,
) -> list[Any]:
    """Create shadows for ``params``, one backend call per backend (so it can pack them).

    ``dtypes`` (from `shadow_dtypes`) converts a parameter before its shadow is made. With a
    single backend its list is returned as is: it may carry the backend's notes on how it
    laid the shadows out (see `emacore._pytree.ShadowList`).
    """
    if device is not None:
        params = [b.to_device(p, device) for p, b in zip(params, backends)]
    if dtypes is not None and any(dt is not None for dt in dtypes):
        params = [
            p if dt is None else b.namespace(p).astype(p, dt)
            for p, dt, b in zip(params, dtypes, backends)
        ]
    if backends and backends.count(backends[0]) == len(backends):
        made: list[Any] = _create(backends[0], list(params), zeros, layout)
        return made
    out: list[Any] = [None] * len(params)
    for backend in dict.fromkeys(backends):
        idx = [i for i, b in enumerate(backends) if b is backend]
        made = _create(backend, [params[i] for i in idx], zeros, layout)
        for i, s in zip(idx, made):
            out[i] = s
    return out


def on_device(params: Sequence[Any], backends: Sequence[Backend], device: Any) -> list[Any]:
    """The parameters moved to the (offloaded) shadows' device; as they are for None."""
    if device is None:
        return list(params)
    return [b.to_device(p, device) for p, b in zip(params, backends)]


def _create(backend: Backend, params: list[Any], zeros: bool, layout: str) -> list[Any]:
    if layout == "auto":  # plugins written before layouts existed keep working
        made: list[Any] = backend.create_shadows(params, zeros=zeros)
        return made
    try:
        made = backend.create_shadows(params, zeros=zeros, layout=layout)
    except TypeError as exc:
        raise ValueError(
            f"backend {backend.name!r} does not support layout={layout!r} ({exc})"
        ) from None
    return made


def check_writable(
    shadows: Sequence[Any], names: Sequence[str], backends: Sequence[Backend]
) -> None:
    """Ask each backend whether it can write its own shadows in place."""
    if backends and backends.count(backends[0]) == len(backends):
        backends[0].check_writable(shadows, names)  # as given: it may carry backend notes
        return
    for backend in dict.fromkeys(backends):
        idx = [i for i, b in enumerate(backends) if b is backend]
        backend.check_writable([shadows[i] for i in idx], [names[i] for i in idx])


def step_decay(decay: Any, step: Any, compat: str) -> Any:
    """The decay for an update at ``step``: a number is constant; a schedule is evaluated."""
    return decay_at(as_schedule(decay), step, compat)


def apply_update(
    shadows: Sequence[Any],
    params: Sequence[Any],
    backends: Sequence[Backend],
    c: float,
    *,
    inplace: bool,
    exact: bool = True,
) -> list[Any]:
    """Run the (validated) update: one backend call per backend, order preserved."""
    if backends and backends.count(backends[0]) == len(backends):
        return backends[0].update(shadows, params, c, inplace=inplace, exact=exact)
    out: list[Any] = [None] * len(shadows)
    for backend in dict.fromkeys(backends):
        idx = [i for i, b in enumerate(backends) if b is backend]
        new = backend.update(
            [shadows[i] for i in idx], [params[i] for i in idx], c, inplace=inplace, exact=exact
        )
        for i, s in zip(idx, new):
            out[i] = s
    return out


def advance(state: EMAState, decay: Any) -> dict[str, Any]:
    """The scalar part of the new state after one update with ``decay``."""
    last = state.last_decay
    return {
        "count": state.count + 1,
        "decay_product": state.decay_product * decay,
        # traceable state keeps its counters arrays, so a traced step sees no new constants
        "last_decay": last * 0 + decay if hasattr(last, "shape") else decay,
    }


def averages(state: EMAState, shadows: Sequence[Any], backends: Sequence[Backend]) -> list[Any]:
    """Return the reported average of each shadow (debiased where the state says so)."""
    if not state.zero_debias:
        return list(shadows)
    if hasattr(state.decay_product, "shape"):  # traceable state: no Python branches on values
        out = []
        for s, b in zip(shadows, backends):
            xp = b.namespace(s)
            correction = xp.astype(1.0 - state.decay_product, s.dtype)
            # where every decay so far was 1 (or before any update) report the shadow as is
            correction = correction + xp.astype(correction == 0, s.dtype)
            out.append(s / correction)
        return out
    if state.count == 0:
        return list(shadows)
    if state.compat == "tensorflow":
        c = coefficient(state.last_decay, state.compat)
        # The factor is exact in each leaf's dtype, so the division is TF's.
        return [
            s / tf_correction(c, state.count, dtype_name(b.namespace(s), s.dtype))
            for s, b in zip(shadows, backends)
        ]
    correction = exact_correction(state.decay_product)
    if correction == 0.0:
        # every decay so far was 1: no value has entered the average; report the zeros
        # rather than 0/0 (TF's compat mode above keeps TF's NaN)
        return list(shadows)
    # Python float64 until here; dividing casts it to each shadow's dtype, last.
    return [s / correction for s in shadows]


def init(
    params: Any,
    *,
    zero_debias: bool = False,
    compat: str = "default",
    backend: str | Backend | None = None,
    shadow_dtype: Any = None,
    traceable: bool = False,
    layout: str = "auto",
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
    layout : {"auto", "flat", "separate"}
        How the backend lays the shadows out: ``"flat"`` packs them in one buffer per
        dtype and device (many small tensors then cost one kernel per step), ``"separate"``
        allocates each; ``"auto"`` lets the backend choose (numpy and torch pack small
        tensors). A backend that cannot honour a layout raises ``ValueError``.
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
        leaves, backends, zeros=zero_debias, dtypes=dtypes, layout=layout, device=device
    )
    counters: dict[str, Any] = {}
    if traceable:
        if compat == "tensorflow":
            raise ValueError(
                "traceable=True cannot reproduce TensorFlow: compat='tensorflow' computes the "
                "decay in float32 in Python; use compat='default'"
            )
        if not leaves:
            raise ValueError("traceable=True needs at least one leaf to place its counters")
        xp, where = backends[0].namespace(shadows[0]), backends[0].device(shadows[0])
        wide = xp.float64 if _has_float64(xp) else xp.float32
        counters = {
            "count": xp.asarray(0, dtype=xp.int64, device=where),
            "decay_product": xp.asarray(1.0, dtype=wide, device=where),
            "last_decay": xp.asarray(1.0, dtype=wide, device=where),
        }
        # resolve the shadows' type now, so a traced update finds the registry's cache as
        # it will stay (a cache that grows under torch.compile is a recompile)
        resolve_backends(shadows, names, backend)
    return EMAState(
        _pytree.unflatten(treedef, shadows),
        zero_debias=bool(zero_debias),
        compat=compat,
        device=device,
        **counters,
    )


def update(
    state: EMAState,
    params: Any,
    decay: float | Schedule,
    *,
    step: Any = None,
    inplace: bool = False,
    backend: str | Backend | None = None,
    exact: bool | None = None,
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
    inplace : bool
        Write into the shadow arrays where the backend can (numpy, torch); the returned state
        then shares them. Default False: inputs are not modified.
    backend : str or Backend, optional
        Force a backend instead of resolving it from the arrays' type.
    exact : bool, optional
        Use the reference operation order ``s - (s - x) * (1 - d)`` on every backend (same
        bits everywhere). Default: only with ``compat="tensorflow"``; otherwise a backend may
        use a one-pass form (torch's ``lerp``) that rounds differently in the last place.

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
    names = _pytree.leaf_names(s_def)
    d = step_decay(decay, state.count if step is None else step, state.compat)
    s_backends = resolve_backends(s_leaves, names, backend)
    p_backends = resolve_backends(p_leaves, names, backend)
    check_pairs(
        names, s_leaves, p_leaves, s_backends, p_backends, check_devices=state.device is None
    )
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
    return state.replace(shadow=_pytree.unflatten(s_def, new), **advance(state, d))


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


def _has_float64(xp: Any) -> bool:
    try:
        return "float64" in xp.__array_namespace_info__().dtypes()
    except Exception:  # a namespace without the inspection API: the standard's float64
        return True


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
