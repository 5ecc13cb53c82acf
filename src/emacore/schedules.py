"""Decay schedules: the decay as a pure function of the step.

A schedule is any callable ``schedule(step) -> decay``. ``step`` is a Python number or a 0-d
array (a traced step counter under ``jax.jit``, a torch tensor); the built-in schedules accept
both and never branch on the step's value in Python, so they trace. A Python number gives a
Python float, computed in float64 in the same order of operations as the peer library the
schedule comes from, so the numbers are that library's bit for bit wherever it computes in float64
too; an array step gives a 0-d array of the step's namespace, float64 where it has that dtype
(float32 otherwise: jax without x64).

The built-in schedules, and the peers they reproduce:

| schedule | decay at step `n` | peer |
|---|---|---|
| `Constant` | `d` | every library |
| `TFRamp` | `min(d, (1 + n) / (10 + n))` | TensorFlow, torch_ema |
| `DiffusersRamp` | `min(d, (1 + k) / (10 + k))`, `k = n − a − 1` | diffusers `EMAModel` |
| `PowerWarmup` | `1 − (1 + k/γ)^−p`, `k = n − a − 1` | timm, diffusers, ema-pytorch |
| `HalfLife` | `2^(−1/h)` | pandas `ewm(halflife=)` |
| `Span` | `1 − 2/(span + 1)` | pandas `ewm(span=)` |
| `CenterOfMass` | `1 − 1/(1 + com)` | pandas `ewm(com=)` |
| `PowerFunction` | `(1 − 1/n)^(γ + 1)` | EDM2 `phema.py` (Karras et al.) |

(`a` is `update_after_step`; the two warm-ups are clamped to `[min_decay, decay]` and are 0
while `k <= 0`.) Each schedule's docstring says which step of its peer ``n`` is.

Every built-in schedule has a ``spec()``, a JSON-serialisable dict with a ``"kind"`` key, and
`from_spec` rebuilds the schedule from it. `Constant` and `TFRamp` also know how TensorFlow
computes them (``tf_value``), in float32, for ``compat="tensorflow"``.
"""

from __future__ import annotations

import importlib
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Protocol, runtime_checkable

from emacore._precision import f32
from emacore.errors import DecayError

__all__ = [
    "Schedule",
    # the schedules
    "Constant",
    "TFRamp",
    "DiffusersRamp",
    "PowerWarmup",
    "HalfLife",
    "Span",
    "CenterOfMass",
    "PowerFunction",
    # helpers
    "as_schedule",
    "check_decay",
    "from_spec",
    "gamma_to_sigma_rel",
    "sigma_rel_to_gamma",
]


@runtime_checkable
class Schedule(Protocol):
    """A decay schedule: ``decay = schedule(step)``, with ``0 <= decay <= 1``."""

    def __call__(self, step: Any, /) -> Any:
        """Return the decay to use for the update made at ``step``."""
        ...


def check_decay(decay: Any, what: str | Callable[[], str] = "decay") -> float:
    """Return ``decay`` as a float, or raise `emacore.errors.DecayError`.

    Parameters
    ----------
    decay : float
        The value to check.
    what : str or callable
        How to name the value in the error message (a callable is only called on error, so
        the common path formats nothing: it stays traceable by ``torch.compile``).

    Returns
    -------
    float
        ``float(decay)``, known to lie in [0, 1].

    Examples
    --------
    >>> check_decay(0.99)
    0.99
    """
    if isinstance(decay, (str, bytes, bool)):
        raise DecayError(f"{_label(what)} must be a real number in [0, 1], got {decay!r}")
    try:
        value = float(decay)
    except (TypeError, ValueError):
        raise DecayError(f"{_label(what)} must be a real number in [0, 1], got {decay!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise DecayError(f"{_label(what)} must lie in [0, 1], got {decay!r}")
    return value


def _label(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def _is_python_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _namespace(x: Any) -> Any:
    """The array namespace of ``x`` (from its emacore backend), or None for a plain scalar."""
    from emacore import _plugins  # lazily: schedules must import without the registry
    from emacore.errors import UnknownBackendError

    try:
        return _plugins.get_registry().resolve(x).namespace(x)
    except UnknownBackendError:
        return None


@dataclass(frozen=True)
class Constant:
    """The same decay at every step: ``β_t = decay``.

    Examples
    --------
    >>> Constant(0.999)(12345)
    0.999
    """

    decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", check_decay(self.decay))

    def __call__(self, step: Any) -> float:
        """Return ``decay``; ``step`` is ignored."""
        return self.decay

    def tf_value(self, step: Any) -> float:
        """The decay as TensorFlow computes it: rounded to float32."""
        return f32(self.decay)

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule."""
        return {"kind": "constant", "decay": self.decay}


@dataclass(frozen=True)
class TFRamp:
    """TensorFlow's (and torch_ema's) warm-up: ``β_n = min(decay, (1 + n) / (10 + n))``.

    ``n`` is the value of ``num_updates`` at the update (TF), or the number of updates made so
    far when used as a plain schedule. At ``n = 0`` the decay is 0.1, so early averages follow
    the parameters closely.

    Examples
    --------
    >>> TFRamp(0.99)(0)
    0.1
    >>> TFRamp(0.99)(10_000)
    0.99
    """

    decay: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", check_decay(self.decay))

    def __call__(self, step: Any) -> Any:
        """Return ``min(decay, (1 + step) / (10 + step))``."""
        xp = None if _is_python_number(step) else _namespace(step)
        if xp is None:
            n = float(step)
            return min(self.decay, (1.0 + n) / (10.0 + n))
        n = xp.astype(step, xp.float64 if _has_float64(xp) else xp.float32)
        cap = xp.asarray(self.decay, dtype=n.dtype, device=getattr(n, "device", None))
        return xp.minimum(cap, (1.0 + n) / (10.0 + n))

    def tf_value(self, step: Any) -> float:
        """The decay exactly as TensorFlow computes it: every operation in float32."""
        n = f32(float(step))
        return min(f32(self.decay), f32(f32(1.0 + n) / f32(10.0 + n)))

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule."""
        return {"kind": "tf_ramp", "decay": self.decay}


# -- helpers shared by the schedules below -------------------------------------------------


def _float_step(step: Any) -> tuple[Any, Any]:
    """``(None, step)`` for a Python number; ``(xp, step as a 0-d float array)`` for an array.

    A Python int stays an int, so ``step - update_after_step - 1`` is integer arithmetic, as in
    the peers. The array is float64 where the namespace has it.
    """
    xp = None if _is_python_number(step) else _namespace(step)
    if xp is None:
        try:
            return None, operator.index(step)
        except TypeError:
            return None, float(step)
    return xp, xp.astype(step, xp.float64 if _has_float64(xp) else xp.float32)


def _like(xp: Any, value: float, x: Any) -> Any:
    """``value`` as a 0-d array of ``x``'s dtype and device.

    The standard's binary functions (``minimum``, ``maximum``) take arrays, not Python scalars.
    """
    return xp.asarray(value, dtype=x.dtype, device=getattr(x, "device", None))


def _real(value: Any, name: str) -> float:
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _positive(value: Any, name: str) -> float:
    out = _real(value, name)
    if out <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


def _steps(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= 0, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= 0, got {value!r}") from None
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return out


def _decay_bounds(decay: Any, min_decay: Any) -> tuple[float, float]:
    d = check_decay(decay, "decay")
    lo = check_decay(min_decay, "min_decay")
    if lo > d:
        raise DecayError(f"min_decay must not exceed decay, got min_decay={lo!r} > decay={d!r}")
    return d, lo


# -- warm-ups ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusersRamp:
    """diffusers' ``EMAModel`` default decay: the TF ramp, ``update_after_step + 1`` steps late.

    ```text
    k   = n − update_after_step − 1
    β_n = 0                                               if k <= 0
          max(min((1 + k) / (10 + k), decay), min_decay)  otherwise
    ```

    ``n`` is diffusers' ``optimization_step``, which ``EMAModel.step()`` increments *before*
    computing the decay: 1 at the first ``step()``. So the first ``update_after_step + 1``
    updates copy the parameters (decay 0), and the ramp then starts at ``(1 + 1) / (10 + 1)``,
    where `TFRamp` starts at 0.1. With an `emacore.ExponentialMovingAverage` applied once where
    ``EMAModel`` is built and after every optimizer step, ``n`` is the step the schedule sees by
    default. Reproduces diffusers 0.42.1 ``EMAModel.get_decay`` with ``use_ema_warmup=False``
    bit for bit (Python float64, its order of operations). diffusers' ``use_ema_warmup=True``
    is `PowerWarmup`.

    Parameters
    ----------
    decay : float
        The largest decay (diffusers' ``decay``, default 0.9999).
    min_decay : float
        The smallest decay once ``k > 0`` (diffusers' ``min_decay``); at most ``decay``.
    update_after_step : int
        Updates that copy before the ramp starts, less one (diffusers' ``update_after_step``).

    Examples
    --------
    >>> ramp = DiffusersRamp(0.999)
    >>> [ramp(n) for n in (0, 1, 2, 3)]
    [0.0, 0.0, 0.18181818181818182, 0.25]
    >>> DiffusersRamp(0.999, update_after_step=2)(4)
    0.18181818181818182
    """

    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0

    def __post_init__(self) -> None:
        decay, min_decay = _decay_bounds(self.decay, self.min_decay)
        object.__setattr__(self, "decay", decay)
        object.__setattr__(self, "min_decay", min_decay)
        after = _steps(self.update_after_step, "update_after_step")
        object.__setattr__(self, "update_after_step", after)

    def __call__(self, step: Any, /) -> Any:
        """Return the decay for the update at ``step`` (diffusers' ``optimization_step``)."""
        xp, n = _float_step(step)
        if xp is None:
            k = n - self.update_after_step - 1
            if k <= 0:
                return 0.0
            return max(min((1 + k) / (10 + k), self.decay), self.min_decay)
        k = n - float(self.update_after_step + 1)
        k_pos = xp.maximum(k, _like(xp, 0.0, k))  # the discarded branch stays finite
        value = (1.0 + k_pos) / (10.0 + k_pos)
        value = xp.maximum(
            xp.minimum(value, _like(xp, self.decay, k)), _like(xp, self.min_decay, k)
        )
        return xp.where(k > 0.0, value, xp.zeros_like(value))

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule."""
        return {
            "kind": "diffusers_ramp",
            "decay": self.decay,
            "min_decay": self.min_decay,
            "update_after_step": self.update_after_step,
        }


@dataclass(frozen=True)
class PowerWarmup:
    """The power warm-up of timm, diffusers and ema-pytorch (@crowsonkb's EMA warm-up).

    ```text
    k   = n − update_after_step − 1
    β_n = 0                                                        if k <= 0
          max(min(1 − (1 + k / inv_gamma)^−power, decay), min_decay)  otherwise
    ```

    With ``inv_gamma = 1``, ``power = 2/3`` reaches 0.999 at about 31.6k steps and 0.9999 at
    1M; ``power = 3/4`` reaches them at 10k and 215k. ``n`` is each peer's own step, at the
    update:

    - timm 1.0.31 ``ModelEmaV3(use_warmup=True)``: the ``step`` passed to ``update(model,
      step=n)`` (``warmup_gamma`` is ``inv_gamma``, ``warmup_power`` is ``power``). Its
      training script passes the number of optimizer steps taken, 1 at the first update.
    - diffusers 0.42.1 ``EMAModel(use_ema_warmup=True)``: ``optimization_step``, which
      ``step()`` increments before computing the decay: 1 at the first ``step()``.
    - ema-pytorch 0.8.3 ``EMA``: ``self.step`` after ``update()`` increments it: 1 at the first
      ``update()`` (which only copies); ``beta`` is ``decay`` and ``min_value`` is
      ``min_decay``. ema-pytorch computes the decay on a float32 tensor and clamps it there, so
      its decays are float32 numbers (its cap is ``float32(beta)``): this schedule's float64
      value rounded to float32 is ema-pytorch's to within one float32 ulp.

    With an `emacore.ExponentialMovingAverage` applied once where the peer is built and after
    every optimizer step, ``n`` is the step the schedule sees by default. For Python-number
    steps the float64 arithmetic is timm's and diffusers' operation for operation, so their
    decays are reproduced bit for bit.

    Parameters
    ----------
    decay : float
        The largest decay.
    min_decay : float
        The smallest decay once ``k > 0``; at most ``decay``.
    update_after_step : int
        Updates that copy (decay 0) before the warm-up starts, less one.
    inv_gamma : float
        ``γ`` > 0 in ``1 − (1 + k/γ)^−p``: the warm-up's time scale, in steps.
    power : float
        ``p`` > 0: how fast the decay approaches 1.

    Examples
    --------
    >>> warmup = PowerWarmup(0.9999, power=0.75)
    >>> [round(warmup(n), 4) for n in (1, 2, 10_001, 10**9)]
    [0.0, 0.4054, 0.999, 0.9999]
    """

    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    inv_gamma: float = 1.0
    power: float = 2 / 3

    def __post_init__(self) -> None:
        decay, min_decay = _decay_bounds(self.decay, self.min_decay)
        object.__setattr__(self, "decay", decay)
        object.__setattr__(self, "min_decay", min_decay)
        after = _steps(self.update_after_step, "update_after_step")
        object.__setattr__(self, "update_after_step", after)
        object.__setattr__(self, "inv_gamma", _positive(self.inv_gamma, "inv_gamma"))
        object.__setattr__(self, "power", _positive(self.power, "power"))

    def __call__(self, step: Any, /) -> Any:
        """Return the decay for the update at ``step`` (the peer's step, see above)."""
        xp, n = _float_step(step)
        if xp is None:
            k = n - self.update_after_step - 1
            if k <= 0:
                return 0.0
            value = 1 - (1 + k / self.inv_gamma) ** -self.power
            return max(min(value, self.decay), self.min_decay)
        k = n - float(self.update_after_step + 1)
        k_pos = xp.maximum(k, _like(xp, 0.0, k))
        value = 1.0 - (1.0 + k_pos / self.inv_gamma) ** (-self.power)
        value = xp.maximum(
            xp.minimum(value, _like(xp, self.decay, k)), _like(xp, self.min_decay, k)
        )
        return xp.where(k > 0.0, value, xp.zeros_like(value))

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule."""
        return {
            "kind": "power_warmup",
            "decay": self.decay,
            "min_decay": self.min_decay,
            "update_after_step": self.update_after_step,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
        }


# -- constant decays from pandas' parametrisations -------------------------------------


class _StepFree:
    """A schedule whose decay is the same at every step (pandas' parameters)."""

    @property
    def decay(self) -> float:  # pragma: no cover - each subclass defines it
        raise NotImplementedError

    def __call__(self, step: Any, /) -> float:
        """Return `decay`; ``step`` is ignored."""
        return self.decay


@dataclass(frozen=True)
class HalfLife(_StepFree):
    """The decay with which an average forgets half its weight in ``halflife`` steps.

    ```text
    β = 2^(−1/halflife)      (α = 1 − β = 1 − exp(−ln 2 / halflife))
    ```

    pandas' ``ewm(halflife=h)`` (without ``times``) for one step per observation. pandas
    computes ``α`` through the center of mass, ``com = 1/(1 − 2^(−1/h)) − 1`` and then
    ``α = 1/(1 + com)``, which can cost ``β`` an ulp or two; this computes ``2^(−1/h)``
    directly. The same at every step.

    Parameters
    ----------
    halflife : float
        Steps (> 0, finite) after which an observation's weight has halved.

    Examples
    --------
    >>> HalfLife(1.0)(0)
    0.5
    >>> round(HalfLife(100.0)(0) ** 100, 12)  # half the weight is 100 steps old or more
    0.5
    """

    halflife: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "halflife", _positive(self.halflife, "halflife"))

    @property
    def decay(self) -> float:
        """``2^(−1/halflife)``."""
        return float(2.0 ** (-1.0 / self.halflife))  # float ** float is typed as Any

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule."""
        return {"kind": "half_life", "halflife": self.halflife}


@dataclass(frozen=True)
class Span(_StepFree):
    """pandas' ``ewm(span=...)``: the decay whose average has the "span" of an N-step mean.

    ```text
    α = 2 / (span + 1),   β = 1 − α
    ```

    computed as pandas computes it, through the center of mass ``com = (span − 1)/2`` and
    ``α = 1/(1 + com)``, so ``β`` is pandas' bit for bit. The same at every step.

    Parameters
    ----------
    span : float
        ``>= 1`` (``span = 1`` gives decay 0: the average is the latest value).

    Examples
    --------
    >>> Span(19)(0)
    0.9
    >>> Span(1)(0)
    0.0
    """

    span: float

    def __post_init__(self) -> None:
        span = _real(self.span, "span")
        if span < 1.0:
            raise ValueError(f"span must be >= 1, got {self.span!r}")
        object.__setattr__(self, "span", span)

    @property
    def decay(self) -> float:
        """``1 − 1/(1 + (span − 1)/2)`` (= ``1 − 2/(span + 1)``)."""
        return 1.0 - 1.0 / (1.0 + (self.span - 1.0) / 2.0)

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule."""
        return {"kind": "span", "span": self.span}


@dataclass(frozen=True)
class CenterOfMass(_StepFree):
    """pandas' ``ewm(com=...)``: the decay whose weights' center of mass is ``com`` steps back.

    ```text
    α = 1 / (1 + com),   β = 1 − α
    ```

    as pandas computes it, bit for bit. The same at every step.

    Parameters
    ----------
    com : float
        ``>= 0`` (``com = 0`` gives decay 0).

    Examples
    --------
    >>> CenterOfMass(9)(0)
    0.9
    """

    com: float

    def __post_init__(self) -> None:
        com = _real(self.com, "com")
        if com < 0.0:
            raise ValueError(f"com must be >= 0, got {self.com!r}")
        object.__setattr__(self, "com", com)

    @property
    def decay(self) -> float:
        """``1 − 1/(1 + com)``."""
        return 1.0 - 1.0 / (1.0 + self.com)

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule."""
        return {"kind": "center_of_mass", "com": self.com}


# -- Karras et al.'s power-function EMA -------------------------------------------------

# sigma_rel of gamma = 0 (the running mean); larger sigma_rel needs gamma < 0
_SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function EMA profile of exponent ``γ``.

    ```text
    σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3)))
    ```

    Karras et al. 2024, Eq. 123; EDM2's ``exp_to_std``.

    Parameters
    ----------
    gamma : float
        The exponent ``γ >= 0``.

    Returns
    -------
    float
        ``σ_rel``, in ``(0, sqrt(1/12)]``.

    Examples
    --------
    >>> round(gamma_to_sigma_rel(6.94), 4)
    0.1
    """
    g = _gamma(gamma)
    return math.sqrt((g + 1) / (g + 2) ** 2 / (g + 3))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``γ`` of the power-function EMA profile with relative width ``σ_rel``.

    The largest real root of ``γ³ + 7γ² + (16 − t)γ + (12 − t) = 0`` with ``t = σ_rel^−2``
    (Karras et al. 2024, Eq. 126 and Algorithm 2), found exactly as EDM2's ``std_to_exp`` (and
    ema-pytorch's ``sigma_rel_to_gamma``) find it: ``numpy.roots`` in float64. So this needs
    numpy, imported here on first use; give ``γ`` directly to do without.

    Parameters
    ----------
    sigma_rel : float
        In ``(0, sqrt(1/12)]``; ``sqrt(1/12) ≈ 0.2887`` is ``γ = 0``, the running mean.

    Returns
    -------
    float
        ``γ >= 0``.

    Raises
    ------
    ValueError
        ``sigma_rel`` is not in ``(0, sqrt(1/12)]``.
    ImportError
        numpy is not installed.

    Examples
    --------
    >>> round(sigma_rel_to_gamma(0.05), 4)
    16.9722
    """
    s = _real(sigma_rel, "sigma_rel")
    if not 0.0 < s <= _SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel must be in (0, sqrt(1/12) = {_SIGMA_REL_MAX!r}], got {sigma_rel!r} "
            "(larger values need gamma < 0)"
        )
    try:
        # only here: the core imports no array library at module level
        np = importlib.import_module("numpy")
    except ImportError:  # pragma: no cover - numpy is everywhere the tests run
        raise ImportError(
            "sigma_rel_to_gamma needs numpy (it solves EDM2's cubic with numpy.roots); "
            "install numpy or give gamma instead of sigma_rel"
        ) from None
    # EDM2's std_to_exp, operation for operation (float64 throughout)
    t = np.float64(s).flatten()[0] ** -2
    root = float(np.roots([1, 7, 16 - t, 12 - t]).real.max())
    # at sigma_rel = sqrt(1/12) the root is 0 up to the eigenvalue solver's rounding
    return max(root, 0.0)


def _gamma(value: Any) -> float:
    g = _real(value, "gamma")
    if g < 0.0:
        raise ValueError(
            f"gamma must be >= 0, got {value!r} (gamma = 0 is the running mean; a larger "
            "gamma forgets faster)"
        )
    return g


@dataclass(frozen=True)
class PowerFunction:
    """Karras et al.'s power-function EMA (EDM2's ``phema.py``), given ``γ`` or ``σ_rel``.

    From "Analyzing and Improving the Training Dynamics of Diffusion Models" (Karras et al.,
    CVPR 2024):

    ```text
    β_n = (1 − 1/n)^(γ + 1)      (n >= 1;  β_n = 0 for n <= 1)
    ```

    The average at step ``n`` then weighs the value of step ``i`` in proportion to ``i^γ``:
    its width relative to the training so far is ``σ_rel`` (`gamma_to_sigma_rel`), whatever
    ``n`` is. ``γ = 0`` is the running mean of every value so far.

    ``n`` is EDM2's ``t_next / t_delta``: ``PowerFunctionEMA.update(cur_nimg, batch_size)`` is
    called after ``cur_nimg += batch_size``, so the k-th update has ``n = k`` (``β_1 = 0``:
    the first update copies). Reproduces EDM2's ``power_function_beta(std, t_next=k·B,
    t_delta=B)`` bit for bit for a Python-number ``n`` (``B/(k·B)`` rounds to ``1/k``).
    ema-pytorch 0.8.3's ``KarrasEMA`` uses ``n = step + 1`` (``self.step`` after ``update()``
    incremented it: its first update already averages); call this with its step + 1.

    With an `emacore.ExponentialMovingAverage` applied once where the model is built and after
    every optimizer step, the k-th optimizer step's update is step ``k``, as in EDM2.

    Parameters
    ----------
    gamma : float, optional
        The exponent ``γ >= 0``.
    sigma_rel : float, optional
        The profile's relative width in ``(0, sqrt(1/12)]``, converted to ``γ`` once, here,
        by `sigma_rel_to_gamma` (which needs numpy), so that calls are plain arithmetic.
        Give ``gamma`` or ``sigma_rel``; both (as `from_spec` does) must agree to 1e-9.

    Examples
    --------
    >>> PowerFunction(gamma=0.0)(4)  # the running mean: weight 1/4 for the 4th value
    0.75
    >>> pf = PowerFunction(sigma_rel=0.1)
    >>> round(pf.gamma, 4), round(pf(1000), 6)
    (6.9372, 0.99209)
    """

    gamma: float | None = None
    sigma_rel: float | None = None

    def __post_init__(self) -> None:
        if self.gamma is None and self.sigma_rel is None:
            raise ValueError("PowerFunction needs gamma or sigma_rel, got neither")
        if self.gamma is None:
            sigma_rel = _real(self.sigma_rel, "sigma_rel")
            object.__setattr__(self, "sigma_rel", sigma_rel)
            object.__setattr__(self, "gamma", sigma_rel_to_gamma(sigma_rel))
            return
        gamma = _gamma(self.gamma)
        object.__setattr__(self, "gamma", gamma)
        implied = gamma_to_sigma_rel(gamma)
        if self.sigma_rel is None:
            object.__setattr__(self, "sigma_rel", implied)
            return
        sigma_rel = _real(self.sigma_rel, "sigma_rel")
        if not math.isclose(sigma_rel, implied, rel_tol=1e-9):
            raise ValueError(
                f"gamma={gamma!r} and sigma_rel={self.sigma_rel!r} disagree (gamma implies "
                f"sigma_rel={implied!r}); give one of them"
            )
        object.__setattr__(self, "sigma_rel", sigma_rel)

    def __call__(self, step: Any, /) -> Any:
        """Return ``(1 − 1/max(step, 1))^(γ + 1)``."""
        assert self.gamma is not None  # set by __post_init__
        xp, n = _float_step(step)
        if xp is None:
            t = max(n, 1)
            return (1 - 1 / t) ** (self.gamma + 1)
        t = xp.maximum(n, _like(xp, 1.0, n))
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this schedule.

        It holds ``γ`` and ``σ_rel`` both, so that `from_spec` restores the same ``γ`` without
        solving the cubic again.
        """
        return {"kind": "power_function", "gamma": self.gamma, "sigma_rel": self.sigma_rel}


def _has_float64(xp: Any) -> bool:
    try:
        info = xp.__array_namespace_info__()
        return "float64" in info.dtypes()
    except Exception:  # a namespace without the inspection API: assume the standard's float64
        return True


def as_schedule(decay: float | Schedule) -> Schedule:
    """Return ``decay`` as a schedule: a number becomes `Constant`.

    Examples
    --------
    >>> as_schedule(0.9)
    Constant(decay=0.9)
    """
    if isinstance(decay, bool):
        raise DecayError(f"decay must be a number or a schedule, got {decay!r}")
    if callable(decay):
        return decay
    return Constant(check_decay(decay))


_KINDS: dict[str, type[Any]] = {
    "constant": Constant,
    "tf_ramp": TFRamp,
    "diffusers_ramp": DiffusersRamp,
    "power_warmup": PowerWarmup,
    "half_life": HalfLife,
    "span": Span,
    "center_of_mass": CenterOfMass,
    "power_function": PowerFunction,
}


def from_spec(spec: Mapping[str, Any]) -> Schedule:
    """Rebuild a built-in schedule from its ``spec()``.

    Parameters
    ----------
    spec : mapping
        A ``"kind"`` key naming the schedule and its parameters, as ``spec()`` returns them
        (after a JSON round trip too).

    Returns
    -------
    Schedule
        A schedule equal to the one that gave ``spec``.

    Raises
    ------
    ValueError
        Not a mapping with a known ``"kind"``, a parameter missing or unknown, or a value out
        of range (`DecayError`, a ``ValueError``, for decays).

    Examples
    --------
    >>> from_spec({"kind": "half_life", "halflife": 10.0})
    HalfLife(halflife=10.0)
    >>> s = PowerWarmup(0.999, update_after_step=5)
    >>> from_spec(s.spec()) == s
    True
    """
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"a schedule spec is a mapping with a 'kind' key, got {spec!r}")
    kind = spec["kind"]
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown schedule kind {kind!r}; known kinds: {sorted(_KINDS)}")
    params = {k: v for k, v in spec.items() if k != "kind"}
    accepted = {f.name for f in fields(cls) if f.init}
    required = {
        f.name
        for f in fields(cls)
        if f.init and f.default is MISSING and f.default_factory is MISSING
    }
    unknown = sorted(set(params) - accepted)
    missing = sorted(required - set(params))
    if unknown or missing:
        raise ValueError(
            f"schedule spec of kind {kind!r}: unknown keys {unknown}, missing keys {missing} "
            f"(expected {sorted(accepted)})"
        )
    schedule: Schedule = cls(**params)
    return schedule
