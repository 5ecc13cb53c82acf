"""Decay schedules: the decay as a pure function of the step.

A schedule is any callable ``schedule(step) -> decay``. ``step`` is a Python number or a 0-d
array (a traced step counter under ``jax.jit``); the built-in schedules accept both and never
branch on the step's value in Python, so they trace.

Each built-in schedule also knows how TensorFlow computes it (``tf_value``), in float32, for
``compat="tensorflow"``. The default path computes in Python float64 and casts last.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from emacore._precision import f32
from emacore.errors import DecayError

__all__ = ["Constant", "Schedule", "TFRamp", "as_schedule", "check_decay"]


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
