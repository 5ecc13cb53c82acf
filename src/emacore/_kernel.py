"""The reference update, written once against the array API standard.

``shadow ← shadow − (shadow − value) · c`` with ``c = 1 − decay``: TensorFlow's
``assign_moving_average`` in this exact order of operations, so the portable kernel and every
backend's fused override give TF's numbers, rounding included. Backends that fuse (numpy's
cache-blocked loop, torch's ``_foreach``) must compute these three operations in this order;
the conformance suite checks them against this function bit for bit.
"""

from __future__ import annotations

from typing import Any

__all__ = ["reference_update"]


def reference_update(shadow: Any, value: Any, c: Any) -> Any:
    """Return the updated shadow as a new array; neither input is modified.

    Parameters
    ----------
    shadow : array
        The current shadow (a floating array).
    value : array
        The new value of the tracked parameter, same shape, dtype and device.
    c : float or 0-d array
        ``1 - decay``; a Python float is cast to ``shadow``'s dtype by the standard's
        scalar rules.

    Returns
    -------
    array
        ``shadow - (shadow - value) * c``.

    Examples
    --------
    >>> import numpy as np
    >>> reference_update(np.float32([0.0]), np.float32([5.0]), 0.9)
    array([4.5], dtype=float32)
    """
    return shadow - (shadow - value) * c
