"""emacore: exponential moving averages of model parameters, for every array library.

The core is written against the Python array API standard and imports no array framework;
backends (numpy, torch, jax, any plugin) are found through pluggy and loaded on first use.
"""

# The errors are always loaded (small, stdlib only, caught by name); every other public name
# is imported on first use through the module __getattr__ below (PEP 562), so `import emacore`
# loads neither importlib.metadata (the plugin registry) nor the façade, schedules or
# checkpoint modules (issue 13 item 9; tests/core/test_import_surface.py names what stays out).
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

# typing.TYPE_CHECKING without importing typing (8 ms); type checkers take any name so spelled
TYPE_CHECKING = False

if TYPE_CHECKING:  # what type checkers and the docs see; _LAZY below is the same at run time
    from emacore import checkpoint, functional, importers, schedules
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
    from emacore.checkpoint import CheckpointError, load, load_into, load_state, save
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
__all__ += [
    "checkpoint",
    "save",
    "load",
    "load_into",
    "load_state",
    "CheckpointError",
    "importers",
]

# name -> the module that defines it (a submodule maps to itself)
_LAZY: dict[str, str] = {
    "functional": "emacore.functional",
    "schedules": "emacore.schedules",
    "checkpoint": "emacore.checkpoint",
    "importers": "emacore.importers",
    **dict.fromkeys(("EMA", "EMAProfile", "ExponentialMovingAverage"), "emacore._ema"),
    "ArrayAPIBackend": "emacore._generic",
    **dict.fromkeys(
        (
            "DISABLE_AUTOLOAD_ENV",
            "ENTRY_POINT_GROUP",
            "Registry",
            "backends",
            "get_backend",
            "reset_registry",
        ),
        "emacore._plugins",
    ),
    "ShadowTree": "emacore._pytree",
    "EMAState": "emacore._state",
    "LoadResult": "emacore._state_dict",
    **dict.fromkeys(("Backend", "BackendSpec", "Capabilities"), "emacore.backend"),
    **dict.fromkeys(
        ("CheckpointError", "load", "load_into", "load_state", "save"), "emacore.checkpoint"
    ),
    **dict.fromkeys(("hookimpl", "hookspec"), "emacore.hookspecs"),
}
# The submodules an eager `import emacore` used to load: `emacore.backend` and the like stay
# reachable as attributes after a bare `import emacore`, as they were.
_SUBMODULES = frozenset(
    (
        "backend",
        "hookspecs",
        "_debias",
        "_ema",
        "_engine",
        "_generic",
        "_kernel",
        "_plugins",
        "_precision",
        "_pytree",
        "_state",
        "_state_dict",
    )
)

if not TYPE_CHECKING:  # a module __getattr__ would make every misspelt name Any to mypy

    def __getattr__(name: str) -> object:
        """Import a public name (or a submodule) on first use and keep it (PEP 562)."""
        import importlib

        if name in _LAZY:
            module = importlib.import_module(_LAZY[name])
            value = module if _LAZY[name] == f"{__name__}.{name}" else vars(module)[name]
        elif name in _SUBMODULES:
            value = importlib.import_module(f"{__name__}.{name}")
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
