"""Scalar arithmetic in IEEE binary16/32/64, done with the standard library only.

TensorFlow computes the decay and ``1 - decay`` as float32 tensors. To reproduce its numbers bit
for bit without importing a framework, we round Python floats through `struct`. A float32
``+ - * /`` computed in float64 and rounded once is correctly rounded (53 >= 2*24 + 2 bits), so
emulating each float32 operation this way gives exactly TensorFlow's result.
"""

from __future__ import annotations

import struct
from typing import Any

_FORMATS = {"float16": "e", "float32": "f", "float64": "d"}


def round_to(value: float, dtype_name: str) -> float:
    """Round ``value`` to the nearest number representable in ``dtype_name``.

    Parameters
    ----------
    value : float
        A Python float.
    dtype_name : str
        ``"float16"``, ``"float32"`` or ``"float64"``.

    Returns
    -------
    float
        The rounded value, as a Python float (exact).

    Examples
    --------
    >>> round_to(0.99, "float32")
    0.9900000095367432
    """
    fmt = _FORMATS.get(dtype_name)
    if fmt is None:
        # bfloat16 and friends: keep float64; the array library does the final cast.
        return float(value)
    try:
        return float(struct.unpack(fmt, struct.pack(fmt, value))[0])
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def f32(value: float) -> float:
    """Round ``value`` to float32 (see `round_to`)."""
    return round_to(value, "float32")


def dtype_name(xp: Any, dtype: Any) -> str:
    """Return ``"float16"``, ``"float32"``, ``"float64"`` or ``"other"`` for a floating dtype.

    Decided from ``xp.finfo`` rather than the dtype's repr, which differs between libraries.
    """
    info = xp.finfo(dtype)
    bits, eps = int(info.bits), float(info.eps)
    if bits == 64:
        return "float64"
    if bits == 32:
        return "float32"
    if bits == 16 and eps == 2.0**-10:
        return "float16"
    return "other"


def dtype_label(dtype: Any) -> str:
    """``"float32"`` for numpy's, torch's (``torch.float32``), JAX's and the standard's dtypes.

    The name a dtype goes by in every library, to compare dtypes across them (``bfloat16``
    and integer dtypes included, which `dtype_name` does not tell apart).
    """
    return str(dtype).rsplit(".", 1)[-1]
