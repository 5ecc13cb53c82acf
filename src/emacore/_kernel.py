"""The reference update, written once against the array API standard.

``shadow ← shadow − (shadow − value) · c`` with ``c = 1 − decay``: TensorFlow's
``assign_moving_average`` in this exact order of operations. A backend's fast path asked for
``exact=True`` (``compat="tensorflow"``) computes these three operations in this order (numpy's
cache-blocked loop always does; torch's ``_foreach`` calls do in that mode), so it gives TF's
numbers bit for bit; with ``exact=False`` a backend may use a one-pass form (torch's
``lerp``) that rounds differently in the last place.
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
