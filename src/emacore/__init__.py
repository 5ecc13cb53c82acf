"""emacore: exponential moving averages of model parameters, for every array library.

The core is written against the Python array API standard and imports no array framework;
backends (numpy, torch, jax, any plugin) are found through pluggy and loaded on first use.
"""

from emacore import functional, schedules
from emacore._ema import EMA, EMAProfile, ExponentialMovingAverage
from emacore._generic import ArrayAPIBackend
from emacore._plugins import (
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    Registry,
    backends,
    get_backend,
    reset_registry,
)
from emacore._pytree import ShadowTree
from emacore._state import EMAState
from emacore._state_dict import LoadResult
from emacore.backend import Backend, BackendSpec, Capabilities
from emacore.errors import (
    BackendConflictError,
    DecayError,
    EMAError,
    EMAWarning,
    ImmutableArrayError,
    LeafDTypeError,
    LeafMismatchError,
    NonFiniteError,
    PluginWarning,
    ReadOnlyError,
    StateDictError,
    StructureError,
    UnknownBackendError,
)
from emacore.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    # the TensorFlow-compatible stateful API
    "ExponentialMovingAverage",
    "EMA",
    "EMAProfile",
    "LoadResult",
    # the functional API and its state
    "functional",
    "EMAState",
    "ShadowTree",
    "schedules",
    # backends and plugins
    "backends",
    "get_backend",
    "hookimpl",
    "hookspec",
    "Backend",
    "BackendSpec",
    "Capabilities",
    "ArrayAPIBackend",
    "Registry",
    "reset_registry",
    "ENTRY_POINT_GROUP",
    "DISABLE_AUTOLOAD_ENV",
    # errors and warnings
    "EMAError",
    "DecayError",
    "LeafMismatchError",
    "LeafDTypeError",
    "StructureError",
    "ReadOnlyError",
    "ImmutableArrayError",
    "NonFiniteError",
    "StateDictError",
    "UnknownBackendError",
    "BackendConflictError",
    "EMAWarning",
    "PluginWarning",
    "__version__",
]

# Portable checkpoints (safetensors + JSON, never pickle) and importers from peer libraries.
from emacore import checkpoint, importers
from emacore.checkpoint import CheckpointError, load, load_into, load_state, save

__all__ += [
    "checkpoint",
    "save",
    "load",
    "load_into",
    "load_state",
    "CheckpointError",
    "importers",
]
