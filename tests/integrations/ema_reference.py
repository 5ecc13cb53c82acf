"""The float64 EMA the callback option tests compare against (shared by the Lightning tests and
the Keras checks, which run in a subprocess without pytest's rootdir on their path)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Snapshot = dict[str, np.ndarray]


def ema_reference(
    stepped: Sequence[Snapshot],
    decays: Sequence[float],
    keys: Sequence[str] | None = None,
    *,
    zero_debias: bool = False,
) -> Snapshot:
    """The float64 EMA of ``keys`` (default: all) over ``stepped``, the others as last seen.

    The first update makes the average the weights (``zero_debias``: the shadow starts at zero
    and every update divides by ``1 - Π d``); then ``s ← s − (1 − d)(s − w)``, ``decays[i]``
    at the update of ``stepped[i]``.
    """
    assert len(decays) == len(stepped)
    keys = list(stepped[0]) if keys is None else keys
    shadow: Snapshot = {}
    product = 1.0
    for i, (d, weights) in enumerate(zip(decays, stepped)):
        for k in keys:
            if i == 0 and not zero_debias:
                shadow[k] = weights[k]
            else:
                previous = shadow.get(k, np.zeros_like(weights[k]))
                shadow[k] = previous - (1 - d) * (previous - weights[k])
        if i > 0 or zero_debias:
            product *= d
    out = dict(stepped[-1])
    for k in keys:
        out[k] = shadow[k] / (1 - product) if zero_debias else shadow[k]
    return out
