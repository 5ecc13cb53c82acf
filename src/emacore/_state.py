"""EMAState: the shadows plus the few scalars the math needs, as an immutable record."""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    device : optional
        Where the shadows live when offloaded (``init(..., device=...)``); None: on each
        parameter's own device.
    """

    shadow: Any
    count: int = 0
    decay_product: float = 1.0
    last_decay: float = 1.0
    zero_debias: bool = False
    compat: str = "default"
    device: Any = None

    def replace(self, **changes: Any) -> EMAState:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)
