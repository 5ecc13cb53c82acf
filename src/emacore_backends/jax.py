"""The jax backend (portable for now; the jitted, donated one is the jax issue's work).

JAX arrays are immutable: bare arrays in a plain list are tracked by position, and every
update returns new arrays.
"""

from __future__ import annotations

from typing import Any

import jax

from emacore._generic import ArrayAPIBackend
from emacore.backend import Capabilities

__all__ = ["BACKEND", "JaxBackend"]


class JaxBackend(ArrayAPIBackend):
    """Backend for ``jax.Array``."""

    def __init__(self) -> None:
        super().__init__("jax", Capabilities(mutable_arrays=False))

    def owns(self, x: Any) -> bool:
        """Return True for ``jax.Array`` (concrete arrays and tracers)."""
        return isinstance(x, jax.Array)

    def to_host(self, x: Any) -> Any:
        """Return the array fetched to the host."""
        return jax.device_get(x)


BACKEND = JaxBackend()
