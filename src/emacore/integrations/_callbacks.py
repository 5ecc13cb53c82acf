"""What the framework callbacks (Lightning, Keras) share: checking their options."""

from __future__ import annotations

from collections.abc import Iterable


def stages(swap_for: str | Iterable[str], known: tuple[str, ...]) -> frozenset[str]:
    """The stages to swap the averages in for, checked against the framework's ``known``."""
    chosen = (swap_for,) if isinstance(swap_for, str) else tuple(swap_for)
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise ValueError(f"swap_for: unknown stages {unknown}; expected some of {known}")
    return frozenset(chosen)


def flag(name: str, value: object) -> bool:
    """``value``, which must be True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
