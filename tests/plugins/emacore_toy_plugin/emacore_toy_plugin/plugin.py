"""The ``toy`` backend, advertised in the ``emacore`` entry-point group.

Importing this module imports emacore only: numpy (through ``ToyArray``) is imported when the
backend is first used, so declaring the backend stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import emacore
from emacore.backend import reference_update

__all__ = ["BACKEND", "UPDATE_CALLS", "ToyBackend", "emacore_backends"]

UPDATE_CALLS = 0
"""How many times ``ToyBackend.update`` ran in this process (tests read it)."""


def _toy_array() -> type:
    from emacore_toy_plugin.array import ToyArray

    return ToyArray


class ToyBackend(emacore.ArrayAPIBackend):
    """Backend for ``ToyArray``: the reference kernel on ``.data``, in place when asked.

    ``ToyArray`` has no ``__array_namespace__``, so the portable defaults of
    `emacore.ArrayAPIBackend` cannot read it: the backend overrides every member that touches
    an array's values (the update, the finiteness check, host transfers both ways, writes).
    """

    def __init__(self) -> None:
        super().__init__("toy", emacore.Capabilities(mutable_arrays=True, inplace_update=True))

    def owns(self, x: Any) -> bool:
        return isinstance(x, _toy_array())

    def namespace(self, x: Any) -> Any:
        import array_api_compat.numpy

        return array_api_compat.numpy

    def device(self, x: Any) -> Any:
        return "cpu"

    def is_floating(self, x: Any) -> bool:
        return bool(x.dtype.kind == "f")

    def create_shadows(self, params: Sequence[Any], *, zeros: bool) -> list[Any]:
        import numpy as np

        toy = _toy_array()
        return [toy(np.zeros_like(p.data) if zeros else p.data) for p in params]

    def update(
        self,
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: float,
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[Any]:
        global UPDATE_CALLS
        UPDATE_CALLS += 1
        toy = _toy_array()
        out = []
        for s, p in zip(shadows, params, strict=True):
            new = reference_update(s.data, p.data, c)
            if inplace:
                s.data[...] = new
                out.append(s)
            else:
                out.append(toy(new))
        return out

    def all_finite(self, params: Sequence[Any]) -> list[bool]:
        import numpy as np

        return [bool(np.isfinite(p.data).all()) for p in params]

    def to_host(self, x: Any) -> Any:
        return x.data

    def from_host(self, host: Any, like: Any, dtype: str | None = None) -> Any:
        """A new ``ToyArray`` of ``host``'s values, with ``like``'s dtype (or ``dtype``)."""
        import numpy as np

        return _toy_array()(np.asarray(host), dtype=like.dtype if dtype is None else dtype)

    def to_device(self, x: Any, device: Any) -> Any:
        if device != "cpu":
            raise ValueError(f"toy backend: arrays live on 'cpu' only, not {device!r}")
        return x

    def assign(self, dst: Any, src: Any) -> None:
        dst.data[...] = src.data


BACKEND = ToyBackend()


@emacore.hookimpl
def emacore_backends() -> list[emacore.BackendSpec]:
    """Declare the ``toy`` backend (array types from the ``emacore_toy_plugin`` package)."""
    return [
        emacore.BackendSpec(
            "toy",
            ("emacore_toy_plugin",),
            load=lambda: BACKEND,
            description="ToyArray (emacore's plugin-test package)",
        )
    ]
