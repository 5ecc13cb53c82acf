"""A toy third-party emacore backend: ``ToyArray`` and the ``toy`` backend that handles it.

Nothing heavy is imported here: emacore imports ``emacore_toy_plugin.plugin`` (and so this
package) whenever it builds its registry, and ``ToyArray`` needs numpy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ToyArray"]


def __getattr__(name: str) -> Any:
    if name == "ToyArray":
        from emacore_toy_plugin.array import ToyArray

        return ToyArray
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
