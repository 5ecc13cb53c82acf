"""Exceptions and warnings raised by emacore.

Every error says which leaf (by name) went wrong, what was received and what was expected,
so a user can fix the call without reading emacore's source.
"""

from __future__ import annotations

__all__ = [
    "BackendConflictError",
    "DecayError",
    "EMAError",
    "EMAWarning",
    "ImmutableArrayError",
    "LeafDTypeError",
    "LeafMismatchError",
    "PluginWarning",
    "ReadOnlyError",
    "StateDictError",
    "NonFiniteError",
    "StructureError",
    "UnknownBackendError",
]


class EMAError(Exception):
    """Base class of every error emacore raises on purpose."""


class DecayError(EMAError, ValueError):
    """A decay (or a schedule's value) is NaN or outside [0, 1]."""


class LeafMismatchError(EMAError, ValueError):
    """A leaf's shape, dtype, device or backend differs from its shadow's."""


class LeafDTypeError(EMAError, TypeError):
    """A leaf cannot be averaged: it is not a floating-point array."""


class StructureError(EMAError, ValueError):
    """The container given does not have the structure the state was built from."""


class ReadOnlyError(EMAError, ValueError):
    """An array emacore must write to in place is read-only."""


class ImmutableArrayError(EMAError, TypeError):
    """An operation needs to write into arrays in place, and the backend's arrays are immutable."""


class StateDictError(EMAError, ValueError):
    """A state dict is malformed or does not match this EMA."""


class NonFiniteError(EMAError, ValueError):
    """A parameter holds NaN or infinity and the EMA was asked to refuse it (``nonfinite``)."""


class UnknownBackendError(EMAError, LookupError):
    """No registered backend has the requested name or handles the array given."""


class BackendConflictError(EMAError):
    """Two plugins registered backends under the same name."""


class EMAWarning(UserWarning):
    """A call that works but probably does not do what the caller meant."""


class PluginWarning(EMAWarning):
    """A third-party plugin failed to load or declared something invalid; it was skipped."""
