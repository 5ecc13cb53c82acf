"""EMAState: the shadows plus the few scalars the math needs, as an immutable record."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["EMAState"]


@dataclass(frozen=True)
class EMAState:
    """The state of an exponential moving average over one pytree of parameters.

    Attributes
    ----------
    shadow : pytree of arrays
        The shadow of every parameter, in the parameters' structure. With ``zero_debias`` this is
        the *biased* shadow (started at zero); `emacore.functional.average` corrects it.
    count : int
        Number of updates applied (TF's ``local_step``).
    decay_product : float
        ``Π d_i`` over the decays used so far, in float64: the exact debias is ``1 - Π d_i``.
    last_decay : float
        The decay used by the latest update (TF's debias uses only this one).
    zero_debias : bool
        Shadows start at zero and averages are divided by the bias correction.
    compat : {"default", "tensorflow"}
        ``"tensorflow"`` reproduces TF 2's float32 decay arithmetic and its debias formula.
    debias : optional
        ``1 - Π d_i`` itself, a 0-d array, for a traceable state whose counters cannot be
        float64 (jax without ``jax_enable_x64``): ``decay_product`` is then a float32 number
        near 1, and ``1 - decay_product`` would lose the digits the debias needs. Updated with
        the coefficient the shadows use, ``b + (1 - d)(1 - b)``. None otherwise.
    device : optional
        Where the shadows live when offloaded (``init(..., device=...)``); None: on each
        parameter's own device.
    backend_list : optional
        The backend's own list of the arrays in ``shadow`` (in flattened order), kept for the
        notes on how it laid them out (numpy and torch pack small shadows in one buffer) when
        ``shadow`` is a structure rebuilt from it. An update that finds the same arrays in
        ``shadow`` hands the backend this list, and so its packed fast path. Not compared,
        not shown, and not part of the state as a jax pytree.
    """

    shadow: Any
    count: int = 0
    decay_product: float = 1.0
    last_decay: float = 1.0
    zero_debias: bool = False
    compat: str = "default"
    device: Any = None
    debias: Any = None
    backend_list: Any = field(default=None, repr=False, compare=False)

    def replace(self, **changes: Any) -> EMAState:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)
