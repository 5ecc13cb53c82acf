"""Decay-to-coefficient and bias-correction arithmetic, in Python float64, cast last.

Two modes, named by ``compat``:

``"default"``
    The decay is a Python float64; the coefficient ``c = 1 - d`` too, cast to each leaf's dtype
    by the update itself. The zero-debias correction is the exact ``1 - Π d_i`` over the decays
    actually used (kept as a float64 running product), right for any schedule.
``"tensorflow"``
    Bit-for-bit TensorFlow 2: ``d`` and ``1 - d`` are float32, ``c`` is then cast to the leaf's
    dtype, and the correction is TF's ``1 - (1 - c)^t`` computed in the leaf's dtype with ``t``
    the leaf's update count. TF's correction uses the *latest* decay only, so it is exact only
    for a constant decay; we reproduce it for parity, never by default.
"""

from __future__ import annotations

from typing import Any, Literal

from emacore._precision import f32, round_to
from emacore.schedules import Schedule, check_decay

__all__ = ["COMPAT_MODES", "Compat", "coefficient", "decay_at", "tf_correction"]

Compat = Literal["default", "tensorflow"]
COMPAT_MODES: tuple[str, ...] = ("default", "tensorflow")


def decay_at(schedule: Schedule, step: Any, compat: str) -> Any:
    """Evaluate ``schedule`` at ``step`` and check the result lies in [0, 1].

    Parameters
    ----------
    schedule : Schedule
        The decay schedule.
    step : int or float
        ``num_updates`` (TF) or the number of updates made so far.
    compat : {"default", "tensorflow"}
        ``"tensorflow"`` computes the decay in float32 as TF does.

    Returns
    -------
    float or 0-d array
        The decay: a Python float, checked to lie in [0, 1]; or, for an array step (a traced
        counter), the schedule's 0-d array, unchecked.

    Examples
    --------
    >>> from emacore.schedules import TFRamp
    >>> decay_at(TFRamp(0.99), 0, "default")
    0.1
    """
    if compat == "tensorflow":
        tf_value = getattr(schedule, "tf_value", None)
        value = tf_value(step) if tf_value is not None else f32(float(schedule(step)))
    else:
        value = schedule(step)
    if hasattr(value, "shape"):
        # an array decay, from a traced step counter (traceable state under jit/compile):
        # its value is not known here, so it cannot be range-checked
        return value
    return check_decay(value, lambda: f"decay from {schedule!r} at step {step!r}")


def coefficient(decay: Any, compat: str) -> Any:
    """Return ``c = 1 - decay``, the weight of the new value in the update.

    In ``"tensorflow"`` mode ``1 - d`` is a float32 operation; the caller's array library then
    casts ``c`` to each leaf's dtype, exactly as TF's ``math_ops.cast(1.0 - decay, var.dtype)``.

    Examples
    --------
    >>> coefficient(0.75, "default")
    0.25
    """
    return f32(1.0 - decay) if compat == "tensorflow" else 1.0 - decay


def tf_correction(c: float, count: int, dtype_name: str) -> float:
    """TensorFlow's zero-debias factor ``1 - (1 - c)^t``, every step rounded to the leaf dtype.

    TF computes ``1 - pow(1 - c, t)`` on tensors of the leaf's dtype (``t`` is its float
    ``local_step``). Its CPU ``pow`` agrees with C's ``pow`` in double precision rounded to the
    dtype, while numpy's SIMD ``power`` differs by an ulp on ~5% of inputs, so this is scalar
    Python on purpose.

    Parameters
    ----------
    c : float
        The latest coefficient ``1 - d`` (float32-rounded in tensorflow mode).
    count : int
        The leaf's number of updates (TF's ``local_step``).
    dtype_name : str
        ``"float16"``, ``"float32"`` or ``"float64"``: the leaf's dtype.

    Returns
    -------
    float
        The factor, exactly representable in ``dtype_name``.

    Examples
    --------
    >>> tf_correction(0.5, 1, "float32")
    0.5
    """
    c_leaf = round_to(c, dtype_name)
    base = round_to(1.0 - c_leaf, dtype_name)
    power = round_to(base ** float(count), dtype_name)
    return round_to(1.0 - power, dtype_name)


def exact_correction(decay_product: float) -> float:
    """The exact zero-debias factor ``1 - Π d_i`` (Python float64).

    Examples
    --------
    >>> exact_correction(0.9 * 0.9)
    0.18999999999999995
    """
    return 1.0 - decay_product


__all__ += ["exact_correction"]
