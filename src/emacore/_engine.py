"""The shared machinery of the functional API and the stateful façade.

Backend resolution, the checks that make an update all-or-nothing (backend, shape, dtype,
device, writability), the dtype policy for new shadows, their creation and placement, the
dispatch of one update to the backends, and the scalar bookkeeping (count, decay product,
bias correction). `emacore.functional` and `emacore.ExponentialMovingAverage` both call these
and nothing else does the math.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

from emacore import _plugins
from emacore._debias import coefficient, decay_at, exact_correction, tf_correction
from emacore._precision import dtype_name
from emacore._state import EMAState
from emacore.backend import Backend
from emacore.errors import LeafDTypeError, LeafMismatchError
from emacore.schedules import as_schedule

__all__ = [
    "NONFINITE_POLICIES",
    "nonfinite_leaves",
    "traced_all_finite",
    "advance",
    "apply_update",
    "apply_update_lanes",
    "averages",
    "check_floating",
    "check_new",
    "check_pairs",
    "check_writable",
    "create_shadows",
    "on_device",
    "resolve_backends",
    "shadow_dtypes",
    "step_decay",
    "widens",
]


def resolve_backends(
    leaves: Sequence[Any], names: Sequence[str], backend: str | Backend | None = None
) -> list[Backend]:
    """Return the backend of every leaf (one lookup per distinct type).

    With ``backend`` given (a name or a backend), every leaf must belong to it.
    """
    registry = _plugins.get_registry()
    if backend is not None:
        forced = registry.get(backend) if isinstance(backend, str) else registry.completed(backend)
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


def check_new(leaves: Sequence[Any], names: Sequence[str], backends: Sequence[Backend]) -> None:
    """Let each backend refuse new leaves it cannot track together (`Backend.check_new`).

    Torch refuses sharded DTensors mixed with plain tensors; the portable default accepts all.
    """
    for backend in dict.fromkeys(backends):
        idx = [i for i, b in enumerate(backends) if b is backend]
        backend.check_new([leaves[i] for i in idx], [names[i] for i in idx])


def check_pairs(  # noqa: C901 - runs every update: one C-speed compare per property, loops only to name the bad leaf
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
            # None: not known (a tracer's placement is the traced function's caller's)
            if pd != sd and pd is not None and sd is not None:
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
            _check_available(xp, target, policy, backend)
            if target != x.dtype and not widens(xp, x.dtype, target):
                raise LeafDTypeError(
                    f"shadow_dtype {policy!r} cannot hold a {x.dtype} parameter exactly; "
                    "choose a dtype at least as wide"
                )
            out.append(None if target == x.dtype else target)
    return out


def _check_available(xp: Any, target: Any, policy: Any, backend: Backend) -> None:
    """Refuse a shadow dtype the namespace does not offer now (a cast would narrow silently)."""
    info = getattr(xp, "__array_namespace_info__", None)  # the standard's 2023.12 inspection
    if info is None:
        return
    offered = list(info().dtypes(kind="real floating").values())
    if target not in offered:
        raise LeafDTypeError(
            f"shadow_dtype {policy!r}: backend {backend.name!r} offers no {target} arrays here "
            f"(its floating dtypes: {[str(d) for d in offered]}); jax has float64 only with "
            "jax_enable_x64 on"
        )


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
    placing = device is not None and all(b.capabilities.places_params for b in backends)
    if not placing:
        params = on_device(params, backends, device)
    if dtypes is not None and any(dt is not None for dt in dtypes):
        params = [
            p if dt is None else b.namespace(p).astype(p, dt)
            for p, dt, b in zip(params, dtypes, backends)
        ]
    where = device if placing else None
    if backends and backends.count(backends[0]) == len(backends):
        made: list[Any] = _create(backends[0], list(params), zeros, layout, where)
        return made
    out: list[Any] = [None] * len(params)
    for backend in dict.fromkeys(backends):
        idx = [i for i, b in enumerate(backends) if b is backend]
        made = _create(backend, [params[i] for i in idx], zeros, layout, where)
        for i, s in zip(idx, made):
            out[i] = s
    return out


def on_device(params: Sequence[Any], backends: Sequence[Backend], device: Any) -> list[Any]:
    """The parameters moved to the (offloaded) shadows' device; as they are for None.

    A backend that places parameters itself (`Capabilities.places_params`) gets them as they
    are: its update brings them over.
    """
    if device is None:
        return list(params)
    return [
        p if b.capabilities.places_params else b.to_device(p, device)
        for p, b in zip(params, backends)
    ]


def _create(
    backend: Backend, params: list[Any], zeros: bool, layout: str, device: Any = None
) -> list[Any]:
    if device is not None:  # a backend that places its shadows itself
        made: list[Any] = backend.create_shadows(  # type: ignore[call-arg]
            params, zeros=zeros, layout=layout, device=device
        )
        return made
    if layout == "auto":  # plugins written before layouts existed keep working
        made = backend.create_shadows(params, zeros=zeros)
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


def first_traced(params: Sequence[Any], backends: Sequence[Backend]) -> int | None:
    """The position of a traced parameter (a JAX tracer; the first of its type), or None.

    Every leaf is asked, not only the first: a function traced over some of the parameters
    (``jit(lambda w: ema.apply({"b": b, "w": w}))``) passes concrete ones beside tracers.
    Whether an array is traced follows from its type (a tracer is one of the framework's
    tracer classes), so one leaf of each type is asked; backends whose arrays are always
    concrete (`Backend.traces` false) are not asked at all.
    """
    if not any(b.traces for b in dict.fromkeys(backends)):
        return None
    types = list(map(type, params))
    for kind in dict.fromkeys(types):
        i = types.index(kind)
        if backends[i].is_traced(params[i]):
            return i
    return None


NONFINITE_POLICIES = ("ignore", "skip", "raise")


def nonfinite_leaves(
    params: Sequence[Any], backends: Sequence[Backend], names: Sequence[str]
) -> list[str]:
    """The names of the parameters that hold NaN or infinity (one backend call each)."""
    bad: list[str] = []
    for backend in dict.fromkeys(backends):
        idx = [i for i, b in enumerate(backends) if b is backend]
        mine = params if len(idx) == len(params) else [params[i] for i in idx]
        bad += [names[i] for i, ok in zip(idx, backend.all_finite(mine)) if not ok]
    order = {nm: i for i, nm in enumerate(names)}
    return sorted(bad, key=order.__getitem__)


def traced_all_finite(params: Sequence[Any], backends: Sequence[Backend]) -> Any:
    """A 0-d boolean array: every parameter is finite (no Python branch: it traces)."""
    ok = None
    for p, b in zip(params, backends):
        xp = b.namespace(p)
        leaf = xp.all(xp.isfinite(p))
        ok = leaf if ok is None else xp.logical_and(ok, leaf)
    return ok


def step_decay(decay: Any, step: Any, compat: str, dt: Any = None) -> Any:
    """The decay for an update at ``step``: a number is constant; a schedule is evaluated.

    ``dt`` (time since the last update, in steps; None: 1) raises it to ``decay ** dt``, so
    an update every k steps, or at irregular times, decays as k (or ``dt``) steps would
    (pandas' ``ewm(times=...)``).
    """
    d = decay_at(as_schedule(decay), step, compat)
    if dt is None:
        return d
    if compat == "tensorflow":
        raise ValueError(
            "dt and update_every have no TensorFlow equivalent: use compat='default' with them"
        )
    if hasattr(dt, "shape"):  # a traced time step: no Python checks on its value
        return d**dt
    if isinstance(dt, (bool, str, bytes)):
        raise TypeError(f"dt must be a real number, got {dt!r}")
    if not isinstance(dt, (int, float)):
        try:
            dt = float(dt)
        except (TypeError, ValueError):
            raise TypeError(f"dt must be a real number, got {dt!r}") from None
    if not math.isfinite(dt) or dt < 0:
        raise ValueError(
            f"dt must be a finite number >= 0 (steps since the last update), got {dt!r}"
        )
    return d if dt == 1 else d**dt


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


def apply_update_lanes(
    shadow_lists: Sequence[Sequence[Any]],
    params: Sequence[Any],
    backends: Sequence[Backend],
    cs: Sequence[Any],
    *,
    exact: bool = True,
) -> list[list[Any]]:
    """Update several profiles' shadows of the same parameters (in place where possible).

    A single backend runs them in one `Backend.update_lanes` call (numpy, torch and jax read
    the parameters once for every profile); with several, each profile is one `apply_update`.
    """
    if backends and backends.count(backends[0]) == len(backends):
        return backends[0].update_lanes(shadow_lists, params, cs, inplace=True, exact=exact)
    return [
        apply_update(shadows, params, backends, c, inplace=True, exact=exact)
        for shadows, c in zip(shadow_lists, cs)
    ]


def advance(state: EMAState, decay: Any) -> dict[str, Any]:
    """The scalar part of the new state after one update with ``decay``."""
    last = state.last_decay
    out = {
        "count": state.count + 1,
        "decay_product": state.decay_product * decay,
        # traceable state keeps its counters arrays, so a traced step sees no new constants
        "last_decay": last * 0 + decay if hasattr(last, "shape") else decay,
    }
    if state.debias is not None:  # 1 - Π d, moved as a shadow of ones is: b + c (1 - b)
        out["debias"] = state.debias + (1.0 - decay) * (1.0 - state.debias)
    return out


def averages(state: EMAState, shadows: Sequence[Any], backends: Sequence[Backend]) -> list[Any]:
    """Return the reported average of each shadow (debiased where the state says so)."""
    if not state.zero_debias:
        return list(shadows)
    if hasattr(state.decay_product, "shape"):  # traceable state: no Python branches on values
        out = []
        exact = state.debias if state.debias is not None else 1.0 - state.decay_product
        for s, b in zip(shadows, backends):
            xp = b.namespace(s)
            correction = xp.astype(exact, s.dtype)
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
            _divide(b, s, tf_correction(c, state.count, dtype_name(b.namespace(s), s.dtype)))
            for s, b in zip(shadows, backends)
        ]
    correction = exact_correction(state.decay_product)
    if correction == 0.0:
        # every decay so far was 1: no value has entered the average; report the zeros
        # rather than 0/0 (TF's compat mode above keeps TF's NaN)
        return list(shadows)
    # Python float64 until here; cast to each shadow's dtype, last.
    return [_divide(b, s, correction) for s, b in zip(shadows, backends)]


def _divide(backend: Backend, s: Any, divisor: float) -> Any:
    """``s / divisor`` with the divisor as a 0-d array of ``s``'s dtype, not a constant.

    The same numbers as dividing by the Python float (which is cast to ``s``'s dtype too),
    but XLA rewrites a division by a constant into a multiplication by its reciprocal, which
    is off by an ulp; a 0-d array operand stays a true division.
    """
    return s / backend.scalar_like(divisor, s)
