"""The torch backend (portable for now; the fused one is the torch issue's work).

Tensors go through the generic array-API path via array-api-compat: correct, not fused.
Parameters are read detached, so shadows never join the autograd graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emacore._generic import ArrayAPIBackend
from emacore._kernel import reference_update
from emacore.backend import Capabilities

__all__ = ["BACKEND", "TorchBackend"]


class TorchBackend(ArrayAPIBackend):
    """Backend for ``torch.Tensor`` (and ``nn.Parameter``) on any device."""

    def __init__(self) -> None:
        super().__init__("torch", Capabilities(mutable_arrays=True))

    def owns(self, x: Any) -> bool:
        """Return True for ``torch.Tensor``."""
        return isinstance(x, torch.Tensor)

    def is_floating(self, x: Any) -> bool:
        """Return True for floating tensors."""
        return bool(x.is_floating_point())

    def create_shadows(self, params: Sequence[Any], *, zeros: bool) -> list[Any]:
        """Return detached copies (or zeros) on each parameter's device."""
        with torch.no_grad():
            return [torch.zeros_like(p) if zeros else p.detach().clone() for p in params]

    def update(
        self, shadows: Sequence[Any], params: Sequence[Any], c: float, *, inplace: bool
    ) -> list[Any]:
        """Return the reference update of every pair, outside autograd."""
        with torch.no_grad():
            return [reference_update(s, p.detach(), c) for s, p in zip(shadows, params)]

    def to_host(self, x: Any) -> Any:
        """Return a CPU tensor numpy can read."""
        return x.detach().cpu()


BACKEND = TorchBackend()
