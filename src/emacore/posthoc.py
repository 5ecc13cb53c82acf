"""Post-hoc EMA: the average of any power-function EMA width, synthesised after training.

Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, Section 3 and Appendix C) observe that the average kept by a power-function EMA
(`emacore.schedules.PowerFunction`) is a weighted integral of the parameters over training,

.. code-block:: text

    θ̂(t) = ∫ p(τ; γ, t) θ(τ) dτ,    p(τ; γ, t) = (γ + 1) / t · (τ / t)^γ   for 0 ≤ τ ≤ t
                                                 0                          otherwise

and that the profiles ``p`` of a few snapshots (two widths, saved every few thousand steps)
span, to good accuracy, the profile of any other width ``σ_rel`` at any snapshot time. Find
the weights ``x`` whose combination ``Σ x_i p_i`` is closest (in L2) to the profile wanted,
and ``Σ x_i θ̂_i`` of the snapshots' averages is the average that EMA would have given. The
width no longer has to be chosen before training.

The workflow:

1. During training, keep a power-function EMA with two profiles (EDM2 uses ``σ_rel`` 0.05
   and 0.10: ``decay=(PowerFunction(sigma_rel=0.05), PowerFunction(sigma_rel=0.10))``) and,
   every N steps, save it with `save_snapshot` (which records the snapshot's time ``t`` and
   each profile's ``γ`` next to the averages, in the format of `emacore.checkpoint`).
2. After training, ``reconstruct(files, sigma_rel=0.15)`` returns the averages of a
   ``σ_rel = 0.15`` EMA at the last snapshot's time (``t_eval=`` for an earlier one).

The pieces are public too: the closed forms `response` and `correlation`, the solver
`solve_weights`, the quality of a fit `profile_error`, and `synthesize`, the weighted sum of
averages held in memory (pytrees of any array-API arrays, or emacore state dicts).

Design invariants:

* The math (closed forms, Gram matrix, least squares) is float64 numpy, imported on first use
  (``import emacore.posthoc`` imports no array library). The weighted sums run in the
  snapshots' own array library and device, through array-api-compat.
* The core (`solve_weights`, `synthesize`) knows nothing of files; `save_snapshot`,
  `read_snapshots` and `reconstruct` are a thin layer over `emacore.checkpoint`.
* Time ``t`` is in any unit proportional to the training step (steps, images): the weights
  depend on ratios of times only.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emacore import _pytree
from emacore._state_dict import STATE_FORMAT
from emacore.errors import LeafDTypeError, LeafMismatchError, StructureError
from emacore.schedules import PowerFunction

# numpy is imported on first use (see the module docstring), so its array types are Any here:
# ArrayLike is anything numpy.asarray takes, Float64Array a float64 numpy array
ArrayLike = Any
Float64Array = Any

__all__ = [
    # the closed forms
    "response",
    "correlation",
    # solving for the weights
    "solve_weights",
    "profile_error",
    # applying them
    "synthesize",
    # snapshot files
    "METADATA_KEY",
    "save_snapshot",
    "read_snapshots",
    "reconstruct",
]

Profile = PowerFunction | float
"""A snapshot's EMA profile: a `PowerFunction`, or a bare number, read as its ``sigma_rel``."""

METADATA_KEY = "emacore.posthoc"
"""The key of the safetensors metadata entry in which `save_snapshot` records the snapshot.

Its value is a JSON object ``{"t": <time>, "gamma": <exponent>, "sigma_rel": <width>}``.
"""


def _np() -> Any:
    return importlib.import_module("numpy")  # on first use: `import emacore` imports none


# -- the closed forms ------------------------------------------------------------------------------


def _check_nonnegative(x: Any, name: str) -> None:
    np = _np()
    bad = ~(np.isfinite(x) & (x >= 0.0))
    if np.any(bad):
        raise ValueError(f"{name} must be finite and >= 0, got {x[bad].ravel()[:5].tolist()}")


def _check_positive(x: Any, name: str) -> None:
    np = _np()
    bad = ~(np.isfinite(x) & (x > 0.0))
    if np.any(bad):
        raise ValueError(f"{name} must be finite and > 0, got {x[bad].ravel()[:5].tolist()}")


def response(tau: ArrayLike, gamma: ArrayLike, t: ArrayLike) -> Float64Array:
    """The profile of a power-function EMA: the weight its average at ``t`` gives time ``τ``.

    .. code-block:: text

        p(τ; γ, t) = (γ + 1) / t · (τ / t)^γ    for 0 ≤ τ ≤ t,   0 otherwise

    normalised as in EDM2 so that ``∫ p dτ = 1`` (an average of a constant is the constant).
    Karras et al. 2024, Eqs. 108 and 121; EDM2's ``power_function_response`` samples it on
    integer times and renormalises the samples; this is the continuous function itself. The
    discrete EMA ``β_n = (1 − 1/n)^(γ + 1)`` gives the value of step ``i`` the weight
    ``(1 − β_i)(i/n)^(γ + 1) ≈ p(i; γ, n)``.

    Parameters
    ----------
    tau : array_like
        Times at which to evaluate the profile (any real numbers).
    gamma : array_like
        The exponent ``γ >= 0`` (see `emacore.schedules.sigma_rel_to_gamma`).
    t : array_like
        The time ``t > 0`` at which the average is read.

    Returns
    -------
    numpy.ndarray
        float64, the broadcast shape of the arguments.

    Raises
    ------
    ValueError
        ``γ < 0``, ``t <= 0``, or a NaN or infinite argument.

    Examples
    --------
    >>> from emacore import posthoc
    >>> posthoc.response([0.0, 50.0, 100.0, 150.0], gamma=1.0, t=100.0).tolist()
    [0.0, 0.01, 0.02, 0.0]
    """
    np = _np()
    tau_, gamma_, t_ = np.broadcast_arrays(
        np.asarray(tau, np.float64), np.asarray(gamma, np.float64), np.asarray(t, np.float64)
    )
    _check_nonnegative(gamma_, "gamma")
    _check_positive(t_, "t")
    if not np.all(np.isfinite(tau_)):
        raise ValueError(f"tau must be finite, got {tau_[~np.isfinite(tau_)].tolist()[:5]}")
    # the ratio is clipped so that no branch raises a negative number to a fractional power
    ratio = np.clip(tau_ / t_, 0.0, 1.0)
    inside = (tau_ >= 0.0) & (tau_ <= t_)
    out: Float64Array = np.where(inside, (gamma_ + 1.0) / t_ * ratio**gamma_, 0.0)
    return out


def correlation(
    gamma_a: ArrayLike, t_a: ArrayLike, gamma_b: ArrayLike, t_b: ArrayLike
) -> Float64Array:
    """The inner product ``⟨p_a, p_b⟩ = ∫ p(τ; γ_a, t_a) p(τ; γ_b, t_b) dτ`` of two profiles.

    With ``m = min(t_a, t_b)``:

    .. code-block:: text

        ⟨p_a, p_b⟩ = (γ_a + 1)(γ_b + 1) / (γ_a + γ_b + 1) · m^(γ_a + γ_b + 1)
                     / (t_a^(γ_a + 1) · t_b^(γ_b + 1))

                   = (γ_a + 1)(γ_b + 1) / ((γ_a + γ_b + 1) · m)
                     · (m/t_a)^(γ_a + 1) · (m/t_b)^(γ_b + 1)

    (Karras et al. 2024, Eq. 151 and Algorithm 3; EDM2's ``power_function_correlation``).
    The second form, computed here, raises only ratios ``<= 1`` to powers, so it neither
    overflows nor underflows for large times. ``⟨p, p⟩ = (γ + 1)² / ((2γ + 1) t)``.

    Parameters
    ----------
    gamma_a, t_a : array_like
        The first profile's exponent ``γ >= 0`` and time ``t > 0``.
    gamma_b, t_b : array_like
        The second profile's.

    Returns
    -------
    numpy.ndarray
        float64, the broadcast shape of the arguments (``gamma_a[:, None]`` against
        ``gamma_b[None, :]`` gives a Gram matrix).

    Raises
    ------
    ValueError
        ``γ < 0``, ``t <= 0``, or a NaN or infinite argument.

    Examples
    --------
    >>> from emacore import posthoc
    >>> float(posthoc.correlation(0.0, 1.0, 0.0, 1.0))  # the running mean over [0, 1]
    1.0
    >>> float(posthoc.correlation(1.0, 1.0, 0.0, 2.0))  # ∫₀¹ 2τ · 1/2 dτ
    0.5
    """
    np = _np()
    ga, ta, gb, tb = np.broadcast_arrays(
        *(np.asarray(v, np.float64) for v in (gamma_a, t_a, gamma_b, t_b))
    )
    _check_nonnegative(ga, "gamma_a")
    _check_nonnegative(gb, "gamma_b")
    _check_positive(ta, "t_a")
    _check_positive(tb, "t_b")
    m = np.minimum(ta, tb)
    out: Float64Array = (
        (ga + 1.0)
        * (gb + 1.0)
        / ((ga + gb + 1.0) * m)
        * (m / ta) ** (ga + 1.0)
        * (m / tb) ** (gb + 1.0)
    )
    return out


# -- solving for the weights -----------------------------------------------------------------------


def _gamma_of(profile: Any, what: str) -> float:
    """``γ`` of a `PowerFunction` or of a bare ``σ_rel``."""
    if isinstance(profile, PowerFunction):
        assert profile.gamma is not None  # set by PowerFunction.__post_init__
        return profile.gamma
    if isinstance(profile, (bool, str, bytes)) or not isinstance(profile, (int, float)):
        try:
            profile = float(profile)  # numpy scalars, 0-d arrays
        except (TypeError, ValueError):
            raise TypeError(
                f"{what}: a profile is a PowerFunction or a number (its sigma_rel), got {profile!r}"
            ) from None
    try:
        gamma = PowerFunction(sigma_rel=float(profile)).gamma
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    assert gamma is not None
    return gamma


def _target_gamma(sigma_rel: float | None, gamma: float | None) -> float:
    if (sigma_rel is None) == (gamma is None):
        raise ValueError(
            "give the target profile as sigma_rel or as gamma (exactly one of them), got "
            f"sigma_rel={sigma_rel!r}, gamma={gamma!r}"
        )
    try:
        g = PowerFunction(sigma_rel=sigma_rel, gamma=gamma).gamma
    except ValueError as exc:
        raise ValueError(f"target profile: {exc}") from None
    assert g is not None
    return g


def _time(t: Any, what: str) -> float:
    if isinstance(t, (bool, str, bytes)):
        raise TypeError(f"{what} must be a real number > 0, got {t!r}")
    try:
        value = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a real number > 0, got {t!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{what} must be finite and > 0 (a time after the start), got {t!r}")
    return value


def _snapshot_arrays(snapshots: Iterable[tuple[Profile, float]]) -> tuple[Any, Any]:
    """``(γ_i, t_i)`` as two float64 arrays, every pair checked."""
    np = _np()
    if isinstance(snapshots, Mapping) or not isinstance(snapshots, Iterable):
        raise TypeError(
            f"snapshots must be a sequence of (profile, t) pairs, got {type(snapshots).__name__}"
        )
    gammas, times = [], []
    cache: dict[Any, float] = {}  # sigma_rel to gamma solves a cubic: once per width
    for i, pair in enumerate(snapshots):
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise TypeError(f"snapshot #{i} must be a (profile, t) pair, got {pair!r}")
        profile, t = pair
        key = (type(profile), profile) if not isinstance(profile, PowerFunction) else None
        if key is not None and key in cache:
            gammas.append(cache[key])
        else:
            g = _gamma_of(profile, f"snapshot #{i}")
            gammas.append(g)
            if key is not None:
                cache[key] = g
        times.append(_time(t, f"snapshot #{i}'s time t"))
    if not gammas:
        raise ValueError("no snapshots: post-hoc EMA needs at least one (profile, t) pair")
    return np.asarray(gammas, np.float64), np.asarray(times, np.float64)


def solve_weights(
    snapshots: Sequence[tuple[Profile, float]],
    sigma_rel: float | None = None,
    *,
    gamma: float | None = None,
    t_eval: float | None = None,
    normalize: bool = True,
    rcond: float | None = None,
) -> Float64Array:
    """The weights of the snapshots whose combination best matches a target EMA profile.

    Minimises the L2 distance between profiles (Karras et al. 2024, Appendix C.3,
    Algorithm 3):

    .. code-block:: text

        x = argmin ‖ Σ_i x_i p(·; γ_i, t_i) − p(·; γ*, t_eval) ‖²
          ⇔ A x = b,   A_ij = ⟨p_i, p_j⟩,   b_i = ⟨p_i, p*⟩          (`correlation`)

    then, as EDM2's ``solve_posthoc_coefficients``, rescales ``x`` to sum to 1, so that the
    synthesised profile integrates to 1 too (a parameter that never changed is reproduced
    exactly). Snapshots taken after ``t_eval`` saw values the target must not, and get
    weight 0 (EDM2's ``reconstruct_phema`` drops them).

    How it is solved: EDM2 calls ``numpy.linalg.solve(A, b)``. Here ``A`` is first scaled to a
    unit diagonal (``D A D`` with ``D = diag(A)^(−1/2)``, Jacobi scaling: the diagonal spans
    ``1/t``, so widely spaced times would otherwise dominate the conditioning) and solved with
    ``numpy.linalg.lstsq`` (SVD), which gives ``solve``'s answer wherever ``A`` is
    invertible and, where it is (numerically) singular (the same profile and time twice,
    snapshots too close together to tell apart), the minimum-norm least-squares weights
    instead of an error or exploding weights: singular values below ``rcond`` times the
    largest are dropped. Two widths with 100 snapshots each give ``cond(D A D)`` about 1e6,
    400 each about 1e8: far from float64's limit, so no regularisation is needed.

    Parameters
    ----------
    snapshots : sequence of (profile, t) pairs
        Each snapshot's EMA profile (a `emacore.schedules.PowerFunction`, or a number read as
        its ``σ_rel``, as EDM2 takes ``std``) and the time ``t > 0`` it was taken at (the
        training step, or images seen: any unit proportional to the step; only ratios of
        times matter).
    sigma_rel : float, optional
        The target profile's width ``σ_rel`` in ``(0, sqrt(1/12)]``.
    gamma : float, optional
        Or its exponent ``γ >= 0``: give ``sigma_rel`` or ``gamma``.
    t_eval : float, optional
        When to read the target average. Default: the latest snapshot's time. The fit is good
        where a snapshot was taken at ``t_eval`` (see `profile_error`).
    normalize : bool
        Rescale the weights to sum to 1 (EDM2's normalisation). The raw least-squares
        weights sum to ``1 ± profile error``.
    rcond : float, optional
        Relative cut-off for small singular values of the scaled Gram matrix, as
        ``numpy.linalg.lstsq``'s (default: machine precision times the number of snapshots).

    Returns
    -------
    numpy.ndarray
        float64 weights, one per snapshot, in order (0 for snapshots after ``t_eval``).

    Raises
    ------
    ValueError
        No snapshots, a ``t <= 0``, a ``σ_rel`` outside ``(0, sqrt(1/12)]`` or a ``γ < 0``,
        both or neither of ``sigma_rel`` and ``gamma``, no snapshot at or before ``t_eval``,
        or least-squares weights that do not sum to a positive number (the target cannot be
        made from these snapshots).
    TypeError
        A snapshot is not a (profile, t) pair.

    Examples
    --------
    Snapshots of EDM2's two widths every 1,000 steps, the average of ``σ_rel = 0.075`` at the
    end:

    >>> from emacore import posthoc
    >>> snaps = [(s, t) for t in range(1_000, 10_001, 1_000) for s in (0.05, 0.10)]
    >>> x = posthoc.solve_weights(snaps, sigma_rel=0.075)
    >>> round(float(x.sum()), 12), x.shape
    (1.0, (20,))
    >>> posthoc.profile_error(snaps, x, sigma_rel=0.075) < 0.01  # relative L2 distance
    True

    A target that is one of the snapshots gets all the weight:

    >>> [round(float(w), 6) + 0.0 for w in posthoc.solve_weights(snaps, 0.10)][-2:]
    [0.0, 1.0]
    """
    np = _np()
    gammas, times = _snapshot_arrays(snapshots)
    g_star = _target_gamma(sigma_rel, gamma)
    t_star = float(times.max()) if t_eval is None else _time(t_eval, "t_eval")
    used = times <= t_star
    if not np.any(used):
        raise ValueError(
            f"no snapshot was taken at or before t_eval={t_eval!r} (the earliest is at "
            f"t={float(times.min())!r})"
        )
    g, t = gammas[used], times[used]
    gram = correlation(g[:, None], t[:, None], g[None, :], t[None, :])
    rhs = correlation(g, t, g_star, t_star)
    scale = 1.0 / np.sqrt(np.diag(gram))
    scaled = gram * scale[:, None] * scale[None, :]
    y = np.linalg.lstsq(scaled, rhs * scale, rcond=rcond)[0]
    x = y * scale
    if normalize:
        total = float(x.sum())
        if not (math.isfinite(total) and total > 0.0):
            raise ValueError(
                f"the least-squares weights sum to {total!r}: the target profile (gamma="
                f"{g_star!r}, t_eval={t_star!r}) cannot be made from these snapshots"
            )
        x = x / total
    out: Float64Array = np.zeros(times.shape, np.float64)
    out[used] = x
    return out


def profile_error(
    snapshots: Sequence[tuple[Profile, float]],
    weights: ArrayLike,
    sigma_rel: float | None = None,
    *,
    gamma: float | None = None,
    t_eval: float | None = None,
) -> float:
    """How far the weighted snapshots' profile is from the target's, relative to the target.

    .. code-block:: text

        e = ‖ Σ_i x_i p_i − p* ‖ / ‖ p* ‖
          = sqrt((xᵀ A x − 2 xᵀ b + ⟨p*, p*⟩) / ⟨p*, p*⟩)

    with ``A`` and ``b`` as in `solve_weights`. The error of the synthesised average is
    ``∫ (Σ x_i p_i − p*)(τ) θ(τ) dτ``: by Cauchy–Schwarz at most ``e · ‖p*‖ · ‖θ − c‖`` for
    any constant ``c`` when the weights sum to 1, so a small ``e`` means an accurate
    average whatever the parameters did. Computed from the closed forms, in float64, so
    errors below about 1e-7 (the square root of float64's precision) read as about 1e-7.

    Parameters
    ----------
    snapshots : sequence of (profile, t) pairs
        As for `solve_weights`.
    weights : array_like
        One weight per snapshot.
    sigma_rel, gamma, t_eval
        The target, as for `solve_weights`.

    Returns
    -------
    float
        ``e >= 0``.

    Raises
    ------
    ValueError
        As `solve_weights`, or ``weights`` has not one entry per snapshot.

    Examples
    --------
    >>> from emacore import posthoc
    >>> posthoc.profile_error([(0.10, 100.0)], [1.0], sigma_rel=0.10)
    0.0
    >>> round(posthoc.profile_error([(0.10, 100.0)], [1.0], sigma_rel=0.05), 3)
    0.468
    """
    np = _np()
    gammas, times = _snapshot_arrays(snapshots)
    x = np.asarray(weights, np.float64)
    if x.shape != gammas.shape:
        raise ValueError(
            f"weights must have one entry per snapshot ({gammas.shape[0]}), got shape {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"weights must be finite, got {x[~np.isfinite(x)].tolist()[:5]}")
    g_star = _target_gamma(sigma_rel, gamma)
    t_star = float(times.max()) if t_eval is None else _time(t_eval, "t_eval")
    gram = correlation(gammas[:, None], times[:, None], gammas[None, :], times[None, :])
    rhs = correlation(gammas, times, g_star, t_star)
    norm2 = float(correlation(g_star, t_star, g_star, t_star))
    err2 = float(x @ gram @ x - 2.0 * (x @ rhs) + norm2) / norm2
    return math.sqrt(max(err2, 0.0))


# -- applying the weights --------------------------------------------------------------------------


@dataclass
class _Snapshot:
    """One snapshot's leaves: names, arrays and roles (average, or a copy taken as is)."""

    names: tuple[str, ...]
    leaves: list[Any]
    copies: tuple[bool, ...]
    treedef: Any  # None for a state dict: the result is a dict of name to array


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == STATE_FORMAT and "leaves" in obj


def _state_profiles(state: Mapping[str, Any]) -> list[str]:
    """The decay profiles of a state dict (``[]`` for a single-profile EMA)."""
    names = state.get("profiles") or []
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else []


def _from_state_dict(state: Mapping[str, Any], label: str, profile: str | None = None) -> _Snapshot:
    """The averages (and copies) of an `ExponentialMovingAverage.state_dict`.

    Those of decay profile ``profile`` where the EMA keeps several: the first profile's are
    each leaf's ``shadow``, the others' under the leaf's ``profiles``.
    """
    leaves, copies = state.get("leaves"), state.get("copies", {})
    if not isinstance(leaves, Mapping) or not isinstance(copies, Mapping):
        raise StructureError(f"{label}: a state dict needs 'leaves' and 'copies' mappings")
    profiles = _state_profiles(state)
    if profile is None and len(profiles) > 1:
        raise ValueError(
            f"{label} holds the averages of {len(profiles)} decay profiles {profiles}: pass one "
            "profile's averages (ema.profile(name).average(params)), or save snapshots with "
            "save_snapshot and use reconstruct, which reads every profile"
        )
    if profile is not None and profile not in profiles:
        raise ValueError(f"{label} has no decay profile {profile!r}; it has {profiles}")
    first = profile is None or profile == profiles[0]
    names: list[str] = []
    arrays: list[Any] = []
    for name, leaf in leaves.items():
        rec = leaf
        if not first and isinstance(leaf, Mapping):
            rec = (leaf.get("profiles") or {}).get(profile)
        if not isinstance(rec, Mapping) or "shadow" not in rec:
            which = "" if first else f" for profile {profile!r}"
            raise StructureError(f"{label}: leaf {name!r} has no 'shadow'{which}")
        if state.get("zero_debias") and rec.get("decay_product") != 0.0:
            # a power-function EMA copies at its first update (decay 0), so its bias
            # correction 1 - prod(decays) is exactly 1; otherwise the shadow is not the average
            raise ValueError(
                f"{label}: leaf {name!r} is zero-debiased with decay product "
                f"{rec.get('decay_product')!r}, so its shadow is not its average; pass the "
                "averages (ema.average(params)) instead of the state dict"
            )
        names.append(str(name))
        arrays.append(rec["shadow"])
    averaged = len(names)
    for name, arr in copies.items():
        names.append(str(name))
        arrays.append(arr)
    flags = (False,) * averaged + (True,) * (len(names) - averaged)
    return _Snapshot(tuple(names), arrays, flags, None)


def _is_real_floating(x: Any) -> bool:
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    return bool(xp.isdtype(x.dtype, "real floating"))


def _from_tree(tree: Any, label: str) -> _Snapshot:
    leaves, treedef = _pytree.flatten(tree)
    names = _pytree.leaf_names(treedef)
    flags = []
    for name, x in zip(names, leaves):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise LeafDTypeError(
                f"{label}: leaf {name!r} is a {type(x).__qualname__}, not an array"
            )
        flags.append(not _is_real_floating(x))
    return _Snapshot(tuple(names), list(leaves), tuple(flags), treedef)


def _as_snapshot(obj: Any, label: str) -> _Snapshot:
    return _from_state_dict(obj, label) if _is_state_dict(obj) else _from_tree(obj, label)


def _check_same(first: _Snapshot, snap: _Snapshot, label: str, ref: str) -> None:
    """Raise naming every difference between ``snap`` and the first snapshot, ``ref``."""
    if snap.names != first.names or snap.treedef != first.treedef:
        missing = sorted(set(first.names) - set(snap.names))
        extra = sorted(set(snap.names) - set(first.names))
        if missing or extra:
            detail = f"missing leaves {missing[:10]}, unexpected leaves {extra[:10]}"
        else:
            detail = "the same leaf names in different containers or order"
        raise StructureError(f"{label} has not the structure of {ref}: {detail}")
    for name, a, b, copy_a, copy_b in zip(
        first.names, first.leaves, snap.leaves, first.copies, snap.copies
    ):
        if copy_a != copy_b:
            raise LeafMismatchError(
                f"leaf {name!r} is {'copied' if copy_b else 'averaged'} in {label} but "
                f"{'copied' if copy_a else 'averaged'} in {ref}"
            )
        if tuple(a.shape) != tuple(b.shape):
            raise LeafMismatchError(
                f"leaf {name!r} has shape {tuple(b.shape)} in {label}, {tuple(a.shape)} in {ref}"
            )
        if a.dtype != b.dtype:
            raise LeafMismatchError(f"leaf {name!r} is {b.dtype} in {label}, {a.dtype} in {ref}")


class _WeightedSum:
    """``Σ w_k · leaves_k`` leaf by leaf, one snapshot at a time (so files can be streamed)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype
        self.first: _Snapshot | None = None
        self.first_label = ""
        self.sums: list[Any] = []
        self.kept: list[Any] = []  # the copied leaves, from the snapshot chosen to provide them

    def _dtypes(self, xp: Any, x: Any) -> tuple[Any, Any]:
        """(accumulation dtype, output dtype) of one leaf."""
        out = x.dtype if self.dtype is None else self.dtype
        if isinstance(out, str):
            out = getattr(xp, out)
        # 16-bit floats accumulate in float32: their own precision would lose the small terms
        acc = out if xp.finfo(out).bits >= 32 else xp.float32
        return acc, out

    def add(self, snap: _Snapshot, weight: float, label: str, *, keep: bool) -> None:
        import array_api_compat

        if self.first is None:
            self.first, self.first_label = snap, label
            self.sums = [None] * len(snap.leaves)
            self.kept = [None] * len(snap.leaves)
        else:
            _check_same(self.first, snap, label, self.first_label)
        for i, (name, x, copy) in enumerate(zip(snap.names, snap.leaves, snap.copies)):
            if copy:
                if keep:
                    self.kept[i] = x
                continue
            if weight == 0.0:
                continue
            try:
                xp = array_api_compat.array_namespace(x)
                if self.sums[i] is not None:
                    array_api_compat.array_namespace(self.sums[i], x)  # one library per leaf
            except TypeError as exc:
                raise LeafMismatchError(f"leaf {name!r} in {label}: {exc}") from None
            acc, _ = self._dtypes(xp, x)
            term = xp.astype(x, acc, copy=False) * weight
            self.sums[i] = term if self.sums[i] is None else self.sums[i] + term

    def result(self) -> list[Any]:
        import array_api_compat

        assert self.first is not None
        out = []
        for s, kept, x in zip(self.sums, self.kept, self.first.leaves):
            if s is None and kept is None:  # an averaged leaf whose every weight was 0
                raise ValueError("every weight is 0: there is nothing to synthesise")
            if s is None:
                out.append(kept)
                continue
            xp = array_api_compat.array_namespace(s)
            _, dtype = self._dtypes(xp, x)
            out.append(s if s.dtype == dtype else xp.astype(s, dtype))
        return out


def _weights(weights: Any, n: int) -> list[float]:
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, (bool, str, bytes)):
            raise TypeError(f"weight #{i} must be a real number, got {w!r}")
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise TypeError(f"weight #{i} must be a real number, got {w!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"weight #{i} must be finite, got {w!r}")
        out.append(value)
    if len(out) != n:
        raise ValueError(f"got {len(out)} weights for {n} snapshots: give one weight per snapshot")
    if not any(out):
        raise ValueError("every weight is 0: there is nothing to synthesise")
    return out


def synthesize(snapshot_averages: Sequence[Any], weights: Any, *, dtype: Any = None) -> Any:
    """The weighted sum of the snapshots' averages: ``Σ_i x_i θ̂_i``, leaf by leaf.

    With the weights of `solve_weights`, this is the average the target EMA would have given
    (EDM2's ``reconstruct_phema``). Arrays of any array-API library (numpy, torch, jax,
    cupy...) through array-api-compat; each result stays in its leaves' library and on their
    device.

    Parameters
    ----------
    snapshot_averages : sequence
        One entry per snapshot, all with the same structure, leaf names, shapes and dtypes:
        pytrees of arrays (dicts, lists, tuples, as ``ema.average(params)`` returns), or
        state dicts of single-profile EMAs (`ExponentialMovingAverage.state_dict`,
        `emacore.checkpoint.load`; for an EMA with several profiles, pass each profile's
        averages, ``ema.profile(name).average(params)``, or use `reconstruct`).
        Floating-point leaves are averaged; other leaves (integer counters) and a state dict's
        copied leaves (buffers) are taken from the last snapshot as they are, never averaged.
    weights : sequence of float
        One weight per snapshot (a zero weight skips that snapshot's arithmetic).
    dtype : dtype or str, optional
        The dtype of the results (a dtype of the leaves' library, or its name:
        ``"float64"``). Default: each leaf's own. The sum is accumulated in this dtype, or in
        float32 where it is a 16-bit float.

    Returns
    -------
    pytree or dict
        The structure of the snapshots, with the synthesised averages; for state dicts, a dict
        of name to array (averaged leaves, then copied ones) that a module's
        ``load_state_dict`` takes.

    Raises
    ------
    ValueError
        No snapshots, not one weight per snapshot, a weight that is not finite, every weight 0.
    emacore.errors.StructureError
        A snapshot's structure or leaf names differ from the first one's (both lists shown).
    emacore.errors.LeafMismatchError
        A leaf's shape, dtype or library differs between snapshots (the leaf is named).
    emacore.errors.LeafDTypeError
        A leaf is not an array.

    Examples
    --------
    >>> import numpy as np
    >>> from emacore import posthoc
    >>> a = {"w": np.array([1.0, 2.0]), "step": np.array(10)}
    >>> b = {"w": np.array([3.0, 6.0]), "step": np.array(20)}
    >>> posthoc.synthesize([a, b], [0.25, 0.75])
    {'step': array(20), 'w': array([2.5, 5. ])}
    """
    if isinstance(snapshot_averages, Mapping) or not isinstance(snapshot_averages, Sequence):
        raise TypeError(
            "snapshot_averages must be a sequence with one entry per snapshot, got "
            f"{type(snapshot_averages).__name__}"
        )
    if len(snapshot_averages) == 0:
        raise ValueError("no snapshots: synthesize needs at least one snapshot's averages")
    w = _weights(weights, len(snapshot_averages))
    total = _WeightedSum(dtype)
    last = len(snapshot_averages) - 1
    first: _Snapshot | None = None
    for i, obj in enumerate(snapshot_averages):
        snap = _as_snapshot(obj, f"snapshot #{i}")
        if first is None:
            first = snap
        total.add(snap, w[i], f"snapshot #{i}", keep=i == last)
    assert first is not None
    values = total.result()
    if first.treedef is None:
        return dict(zip(first.names, values))
    return _pytree.unflatten(first.treedef, values)


# -- snapshot files --------------------------------------------------------------------------------


def save_snapshot(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    t: float,
    profile: Profile | Mapping[str, Profile] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a power-function EMA's state with its time and profiles, for `reconstruct`.

    A file of `emacore.checkpoint` (safetensors, written atomically) whose metadata entry
    `METADATA_KEY` records the time and the profile: ``{"t": t, "gamma": γ, "sigma_rel":
    σ_rel}`` for a single-profile EMA, ``{"t": t, "profiles": {name: {"gamma": γ,
    "sigma_rel": σ_rel}, ...}}`` for one that keeps several (``decay=(PowerFunction(...),
    PowerFunction(...))``), whose file holds every profile's averages. Save every N steps,
    to a new file each time.

    Parameters
    ----------
    obj : ExponentialMovingAverage, EMAState or state dict
        What `emacore.checkpoint.save` takes. An `ExponentialMovingAverage` should be applied
        once where the model is built and after every optimizer step, so that the k-th
        step's update sees step k, as `emacore.schedules.PowerFunction` expects.
    path : str or path-like
        The file to write.
    t : float
        The time of the snapshot, ``> 0``: the training step of the last update (or the
        images seen, any unit proportional to the step). Post-hoc EMA compares these times.
    profile : PowerFunction, float or mapping, optional
        The EMA's profile (a number is its ``σ_rel``); for several profiles, a mapping of
        each profile's name to its profile. Default: the EMA's own `PowerFunction` decays
        (every profile's), or a state dict's schedule spec (single-profile).
    metadata : mapping of str to str, optional
        More text for the file's metadata, as `emacore.checkpoint.save` takes.

    Raises
    ------
    ValueError
        ``t <= 0``; no profile given and a profile's decay is not a `PowerFunction` (or
        ``obj`` has no schedule); ``profile`` does not name the EMA's profiles; ``metadata``
        uses the key `METADATA_KEY`.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import emacore
    >>> from emacore import posthoc
    >>> from emacore.schedules import PowerFunction
    >>> ema = emacore.ExponentialMovingAverage(
    ...     (PowerFunction(sigma_rel=0.05), PowerFunction(sigma_rel=0.10))
    ... )
    >>> params = {"w": np.zeros(3)}
    >>> ema.apply(params)  # once where the model is built
    >>> params["w"] += 1.0; ema.apply(params)  # after the first optimizer step
    >>> path = os.path.join(tempfile.mkdtemp(), "ema-0000001.safetensors")
    >>> posthoc.save_snapshot(ema, path, t=1)
    >>> [(round(p.sigma_rel, 2), t) for p, t in posthoc.read_snapshots([path])]
    [(0.05, 1.0), (0.1, 1.0)]
    """
    from emacore import checkpoint

    time = _time(t, "t")
    widths = _profiles_of(obj, profile)
    extra = dict(metadata or {})
    if METADATA_KEY in extra:
        raise ValueError(f"metadata key {METADATA_KEY!r} is reserved for save_snapshot")
    record: dict[str, Any] = {"t": t if isinstance(t, int) else time}
    if None in widths:  # a single-profile EMA
        record.update(gamma=widths[None].gamma, sigma_rel=widths[None].sigma_rel)
    else:
        record["profiles"] = {
            name: {"gamma": pf.gamma, "sigma_rel": pf.sigma_rel} for name, pf in widths.items()
        }
    extra[METADATA_KEY] = json.dumps(record, allow_nan=False)
    checkpoint.save(obj, path, metadata=extra)


def _profiles_of(  # noqa: PLR0912 - three sources (EMA, state dict, EMAState), then profile=; each refusal with its message
    obj: Any, given: Profile | Mapping[str, Profile] | None
) -> dict[str | None, PowerFunction]:
    """Each decay profile's PowerFunction, by profile name (None: a single-profile EMA)."""
    from emacore._ema import ExponentialMovingAverage

    names: list[str]
    own: list[Any]
    if isinstance(obj, ExponentialMovingAverage):
        names = [str(n) for n in obj.profiles]
        decay: Any = obj.decay
        if not names:
            own = [decay]
        else:
            own = list(decay.values()) if isinstance(decay, Mapping) else list(decay)
    elif isinstance(obj, Mapping):  # a state dict: its schedule is its first profile's
        names = _state_profiles(obj)
        spec = obj.get("schedule")
        first = None
        if isinstance(spec, Mapping) and spec.get("kind") == "power_function":
            first = PowerFunction(gamma=spec.get("gamma"), sigma_rel=spec.get("sigma_rel"))
        own = [first] + [None] * (len(names) - 1)
    else:  # an EMAState: no schedule
        names, own = [], [None]
    keys: list[str | None] = list(names) if names else [None]
    if given is not None:
        if isinstance(given, Mapping):
            if set(given) != set(names):
                raise ValueError(
                    f"profile= names the profiles {sorted(given)}, the EMA has {names}"
                    + ("" if names else ": give a single profile, not a mapping")
                )
            own = [given[n] for n in names]
        elif len(keys) > 1:
            raise ValueError(
                f"this EMA keeps {len(names)} decay profiles {names}: give profile= a mapping "
                "of each profile's name to its PowerFunction (or sigma_rel)"
            )
        else:
            own = [given]
    out: dict[str | None, PowerFunction] = {}
    for key, value in zip(keys, own):
        label = "this EMA" if key is None else f"its profile {key!r}"
        if value is None:
            raise ValueError(
                f"cannot tell the power-function profile of {label} (a "
                f"{type(obj).__name__} saved without one): give profile=PowerFunction(...) "
                "or its sigma_rel"
                + (", as a mapping of profile name to profile" if key is not None else "")
            )
        if isinstance(value, PowerFunction) or given is not None:
            out[key] = PowerFunction(gamma=_gamma_of(value, label))
            continue
        raise ValueError(
            f"the decay of {label} is {value!r}, not a PowerFunction: post-hoc EMA needs "
            "power-function profiles (give profile= if the schedule is one in disguise)"
        )
    return out


def _profile_record(source: Any, what: str) -> PowerFunction:
    if not isinstance(source, Mapping):
        raise ValueError(f"{what}: expected a JSON object with 'gamma', got {source!r}")
    try:
        return PowerFunction(gamma=source.get("gamma"), sigma_rel=source.get("sigma_rel"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: bad profile ({exc})") from None


def _file_entries(
    info: Mapping[str, Any], path: str, t: float | None
) -> list[tuple[str | None, PowerFunction, float]]:
    """``(profile name, profile, t)`` of each decay profile in a snapshot file.

    From the file's `emacore.checkpoint.describe` output; the name is None for a
    single-profile EMA.
    """
    raw = info["metadata"].get(METADATA_KEY)
    record: Any = {}
    if raw is not None:
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: metadata {METADATA_KEY!r} is not a JSON object: {raw!r}")
    names = [str(n) for n in (info.get("profiles") or [])]
    sources: list[tuple[str | None, Any]]
    if names and ("profiles" in record or len(names) > 1):
        given = record.get("profiles")
        if not (isinstance(given, Mapping) and set(given) == set(names)):
            raise ValueError(
                f"{path} holds the averages of {len(names)} decay profiles {names}, but no "
                f"record of their widths under {METADATA_KEY!r} (a checkpoint keeps the first "
                "profile's schedule only): save it with posthoc.save_snapshot"
            )
        sources = [(n, given[n]) for n in names]
    elif "gamma" in record:
        sources = [(names[0] if names else None, record)]
    else:  # not written by save_snapshot: the EMA's own schedule
        spec = info.get("schedule")
        if not (isinstance(spec, Mapping) and spec.get("kind") == "power_function"):
            raise ValueError(
                f"{path} was not saved from a power-function EMA (its schedule is {spec!r}) "
                f"and records no profile under {METADATA_KEY!r}: save it with "
                "posthoc.save_snapshot(..., profile=...)"
            )
        sources = [(names[0] if names else None, spec)]
    if t is None:
        if "t" not in record:
            raise ValueError(
                f"{path} records no snapshot time: save it with posthoc.save_snapshot(..., "
                "t=step), or pass times= (one per file)"
            )
        t = record["t"]
    time = _time(t, f"{path}: snapshot time t")
    return [(n, _profile_record(src, f"{path}, profile {n!r}"), time) for n, src in sources]


def _describe_all(
    files: Sequence[str | os.PathLike[str]], times: Sequence[float] | None
) -> tuple[list[str], list[dict[str, Any]], list[tuple[int, str | None, PowerFunction, float]]]:
    from emacore import checkpoint

    if isinstance(files, (str, bytes, os.PathLike)) or not isinstance(files, Iterable):
        raise TypeError(f"files must be a sequence of paths, got {files!r}")
    paths = [os.fspath(f) for f in files]
    if not paths:
        raise ValueError("no snapshot files given")
    if times is not None and len(times) != len(paths):
        raise ValueError(f"got {len(times)} times for {len(paths)} files: give one per file")
    infos = [checkpoint.describe(p) for p in paths]
    entries = []
    for i, (p, info) in enumerate(zip(paths, infos)):
        for name, pf, t in _file_entries(info, p, None if times is None else times[i]):
            entries.append((i, name, pf, t))
    return paths, infos, entries


def read_snapshots(
    files: Sequence[str | os.PathLike[str]], times: Sequence[float] | None = None
) -> list[tuple[Profile, float]]:
    """The ``(profile, t)`` of each snapshot in the files, for `solve_weights`.

    One pair per file, or one per decay profile for files of an EMA that keeps several:
    files in the order given, each file's profiles in the EMA's order. Reads the files'
    headers only (`emacore.checkpoint.describe`), not their arrays.

    Parameters
    ----------
    files : sequence of paths
        Files written by `save_snapshot` (or by `emacore.checkpoint.save` from a
        single-profile EMA whose decay is a `PowerFunction`, with ``times=``).
    times : sequence of float, optional
        Each file's time, overriding what the file records.

    Returns
    -------
    list of (PowerFunction, float)

    Raises
    ------
    ValueError
        A file has no power-function profile, or no time and ``times`` is not given.
    emacore.checkpoint.CheckpointError
        A file is not a well-formed checkpoint.
    """
    return [(pf, t) for _, _, pf, t in _describe_all(files, times)[2]]


def _structure(info: Mapping[str, Any]) -> list[tuple[str, str, str, tuple[int, ...]]]:
    return [(r["name"], r["role"], r["dtype"], tuple(r["shape"])) for r in info["leaves"]]


def reconstruct(
    files: Sequence[str | os.PathLike[str]],
    sigma_rel: float | None = None,
    *,
    gamma: float | None = None,
    t_eval: float | None = None,
    times: Sequence[float] | None = None,
    like: Any = None,
    xp: Any = None,
    device: Any = None,
    dtype: Any = None,
) -> Any:
    """The averages a power-function EMA of width ``σ_rel`` would hold, from snapshot files.

    `read_snapshots` → `solve_weights` → `synthesize`, reading one file at a time (memory:
    one file plus the result). Files whose snapshots all have weight 0 (those after
    ``t_eval``) are not read. Copied leaves (a module's buffers) are taken from the latest
    snapshot used.

    File format: checkpoints of `emacore.checkpoint` (safetensors plus JSON), one per
    snapshot time, each holding one EMA's averages: of one power-function profile, or of
    several (``decay=(PowerFunction(...), ...)``; the first profile's averages are the leaves'
    tensors, the others' the leaves' profile tensors). The profiles' ``γ`` and the time ``t``
    are read from the metadata entry `METADATA_KEY` that `save_snapshot` writes; files written
    by `emacore.checkpoint.save` from a single-profile EMA also work, with ``γ`` from its saved
    `PowerFunction` schedule and ``t`` from ``times=``. The averaged leaves must be the
    averages: a zero-debiased EMA qualifies only where its bias correction is exactly 1, as a
    power-function EMA's is.

    Parameters
    ----------
    files : sequence of paths
        The snapshot files, in any order; all with the same leaves.
    sigma_rel : float, optional
        The width ``σ_rel`` in ``(0, sqrt(1/12)]`` to synthesise.
    gamma : float, optional
        Or its exponent ``γ >= 0``.
    t_eval : float, optional
        The time of the average; default the latest snapshot's.
    times : sequence of float, optional
        Each file's time, overriding what the file records.
    like : pytree, optional
        The parameters (or any tree with their structure and leaf names): the result takes
        that structure. Default: a dict of leaf name to array.
    xp, device : optional
        The array library (``numpy`` by default, ``torch``, ``jax.numpy``...) and device to
        load the snapshots with and compute on, as `emacore.checkpoint.load` takes them.
    dtype : optional
        As for `synthesize`.

    Returns
    -------
    dict or pytree
        Leaf name to synthesised average (and copied leaves), or ``like``'s structure.

    Raises
    ------
    ValueError
        As `read_snapshots` and `solve_weights`.
    emacore.errors.StructureError
        The files' leaves differ (names, roles, shapes or dtypes), or ``like``'s leaf names
        are not the files'.

    Examples
    --------
    See the user guide page *Post-hoc EMA* for a complete training loop.
    """
    from emacore import checkpoint

    paths, infos, entries = _describe_all(files, times)
    reference = _structure(infos[0])
    for p, info in zip(paths[1:], infos[1:]):
        if _structure(info) != reference:
            ours, theirs = set(reference), set(_structure(info))
            raise StructureError(
                f"{p} does not hold the leaves of {paths[0]}: only in {paths[0]} "
                f"{sorted(ours - theirs)[:5]}, only in {p} {sorted(theirs - ours)[:5]}"
            )
    snaps = [(pf, t) for _, _, pf, t in entries]
    w = solve_weights(snaps, sigma_rel, gamma=gamma, t_eval=t_eval)
    t_star = max(t for _, t in snaps) if t_eval is None else _time(t_eval, "t_eval")
    used = [k for k, (_, t) in enumerate(snaps) if t <= t_star]
    keep_file = entries[max(used, key=lambda k: snaps[k][1])][0]  # provides the copies
    total = _WeightedSum(dtype)
    first: _Snapshot | None = None
    for f, path in enumerate(paths):
        mine = [(k, entries[k][1]) for k in range(len(entries)) if entries[k][0] == f]
        active = [(k, name) for k, name in mine if w[k] != 0.0]
        if not active and f != keep_file:
            continue
        state = checkpoint.load(path, xp=xp, device=device)
        for j, (k, name) in enumerate(active or mine[:1]):  # weight 0: for the copies only
            label = path if name is None else f"{path} (profile {name!r})"
            snap = _from_state_dict(state, label, name)
            if first is None:
                first = snap
            total.add(snap, float(w[k]), label, keep=f == keep_file and j == 0)
    assert first is not None
    values = dict(zip(first.names, total.result()))
    if like is None:
        return values
    _, treedef = _pytree.flatten(like)
    names = _pytree.leaf_names(treedef)
    missing = sorted(set(names) - set(values))
    extra = sorted(set(values) - set(names))
    if missing or extra:
        raise StructureError(
            f"like= does not name the snapshots' leaves: not in the files {missing[:10]}, "
            f"not in like= {extra[:10]}"
        )
    return _pytree.unflatten(treedef, [values[n] for n in names])
