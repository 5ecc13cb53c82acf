"""The plugin manager: built-in backends, entry-point plugins, conflicts, resolution cache.

Order of registration: the generic array-API backend, then numpy/torch/jax (declared by
``emacore_backends``, loaded only when first used), then third-party plugins from the
``emacore`` entry-point group unless ``EMACORE_DISABLE_PLUGIN_AUTOLOAD`` is set. A plugin that
fails to import or whose hook raises is skipped with a `emacore.errors.PluginWarning`;
two backends with the same name raise `emacore.errors.BackendConflictError` naming
both providers. A backend that implements the `emacore.backend.Backend` protocol without
subclassing `emacore.ArrayAPIBackend` is completed with the portable defaults of the members
it lacks when it is loaded (`emacore._generic.complete`): the core calls every member
without asking whether a backend has it.

Resolution never imports a framework to ask what an array is: it reads the top-level module of
``type(x)``, loads only a backend that claims that module, confirms with ``owns`` and caches
the answer per type. An array no backend claims goes to the portable ``array_api`` backend
when array-api-compat knows it (``__array_namespace__``, or a dask, cupy or sparse array,
which array-api-compat recognises through ``sys.modules`` without importing them).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
import warnings
from collections.abc import Iterable
from typing import Any

import pluggy

from emacore import hookspecs
from emacore._generic import ArrayAPIBackend, complete
from emacore.backend import Backend, BackendSpec
from emacore.errors import BackendConflictError, PluginWarning, UnknownBackendError

__all__ = [
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "Registry",
    "backends",
    "get_backend",
    "get_registry",
    "reset_registry",
    "resolve",
]

ENTRY_POINT_GROUP = "emacore"
DISABLE_AUTOLOAD_ENV = "EMACORE_DISABLE_PLUGIN_AUTOLOAD"
_GENERIC_NAME = "array_api"


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


class Registry:
    """Registered backends, by name, with a per-type resolution cache.

    Parameters
    ----------
    autoload : bool, optional
        Load plugins from the ``emacore`` entry-point group. Default: True unless the
        environment variable ``EMACORE_DISABLE_PLUGIN_AUTOLOAD`` is set to a true value.
    plugins : iterable, optional
        Extra plugin objects (modules or instances with hookimpls) to register explicitly.

    Examples
    --------
    >>> registry = Registry(autoload=False)
    >>> "numpy" in registry.names()
    True
    """

    def __init__(self, *, autoload: bool | None = None, plugins: Iterable[Any] = ()) -> None:
        from emacore import _generic
        from emacore_backends import _builtin

        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._pm.register(_generic, name="emacore.generic")
        self._pm.register(_builtin, name="emacore_backends")
        for plugin in plugins:
            name = getattr(plugin, "__name__", None)
            if not isinstance(name, str):
                name = f"{type(plugin).__qualname__}@{id(plugin):#x}"
            self._pm.register(plugin, name=name)
        # explicitly given plugins must be valid; installed ones are skipped if not (below)
        self._pm.check_pending()
        if autoload if autoload is not None else not _autoload_disabled():
            self._load_entry_points()
        self._pm.check_pending()
        self._specs: dict[str, tuple[BackendSpec, str]] = {}
        self._collect()
        self._loaded: dict[str, Backend] = {}
        self._by_type: dict[type, Backend] = {}
        self._containers: dict[type, Backend | None] = {}
        self._given: dict[int, tuple[Any, Backend]] = {}
        self._lock = threading.Lock()

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self._pm.get_plugin(ep.name) is not None or self._pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                if self._pm.is_registered(plugin):  # also passed explicitly via plugins=
                    continue
                self._pm.register(plugin, name=ep.name)
                try:
                    self._pm.check_pending()
                except pluggy.PluginValidationError:
                    self._pm.unregister(name=ep.name)
                    raise
            except Exception as exc:
                warnings.warn(
                    f"emacore plugin {ep.name!r} ({ep.value}) failed to load and was skipped: "
                    f"{type(exc).__name__}: {exc}",
                    PluginWarning,
                    stacklevel=2,
                )

    def _collect(self) -> None:
        for impl in self._pm.hook.emacore_backends.get_hookimpls():
            provider = impl.plugin_name
            try:
                result: Any = impl.function()
                declared: list[Any] = list(result or ())
            except Exception as exc:
                warnings.warn(
                    f"emacore plugin {provider!r}: emacore_backends() raised "
                    f"{type(exc).__name__}: {exc}; its backends were skipped",
                    PluginWarning,
                    stacklevel=3,
                )
                continue
            for spec in declared:
                if not isinstance(spec, BackendSpec) or not spec.name:
                    warnings.warn(
                        f"emacore plugin {provider!r} declared {spec!r}, which is not a "
                        "BackendSpec with a name; skipped",
                        PluginWarning,
                        stacklevel=3,
                    )
                    continue
                if spec.name in self._specs:
                    other = self._specs[spec.name][1]
                    raise BackendConflictError(
                        f"two plugins register a backend named {spec.name!r}: {other!r} and "
                        f"{provider!r}; uninstall one, or block it with "
                        f"{DISABLE_AUTOLOAD_ENV}=1 and register the other explicitly"
                    )
                self._specs[spec.name] = (spec, provider)

    def names(self) -> list[str]:
        """Return the registered backend names, in registration order."""
        return list(self._specs)

    def provider(self, name: str) -> str:
        """Return the name of the plugin that registered backend ``name``."""
        return self._spec(name)[1]

    def _spec(self, name: str) -> tuple[BackendSpec, str]:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownBackendError(
                f"unknown emacore backend {name!r}; registered backends: {self.names()}"
            ) from None

    def get(self, name: str) -> Backend:
        """Return the backend registered as ``name``, loading it on first use."""
        backend = self._loaded.get(name)
        if backend is not None:
            return backend
        spec, provider = self._spec(name)
        with self._lock:
            backend = self._loaded.get(name)
            if backend is None:
                try:
                    loaded = spec.load()
                except ImportError as exc:
                    raise UnknownBackendError(
                        f"emacore backend {name!r} (from {provider!r}) cannot be used: "
                        f"{exc}. Install its array library (e.g. pip install 'emacore[{name}]')."
                    ) from exc
                backend = complete(loaded)
                if backend is not loaded:  # the same completion when it is passed as an object
                    self._given[id(loaded)] = (loaded, backend)
                self._loaded[name] = backend
        return backend

    def completed(self, backend: Backend) -> Backend:
        """Return a backend passed as an object (``backend=``) with every protocol member.

        A subclass of `emacore.ArrayAPIBackend` is returned as it is; another object is
        completed once (as `get` completes a registered one, whose completion this returns
        too) and the same completed backend is returned for it every time, so that its
        shadows and parameters belong to one backend.
        """
        if isinstance(backend, ArrayAPIBackend):
            return backend
        with self._lock:
            given = self._given.get(id(backend))
            if given is None or given[0] is not backend:
                given = self._given[id(backend)] = (backend, complete(backend))
        return given[1]

    def resolve(self, x: Any) -> Backend:
        """Return the backend that handles array ``x`` (cached per ``type(x)``)."""
        t = type(x)
        backend = self._by_type.get(t)
        if backend is not None:
            return backend
        root = t.__module__.partition(".")[0]
        for name, (spec, _) in self._specs.items():
            if root in spec.array_modules:
                candidate = self.get(name)
                if candidate.owns(x):
                    backend = candidate
                    break
        if backend is None:
            generic = self.get(_GENERIC_NAME)
            if not generic.owns(x):
                raise UnknownBackendError(
                    f"no emacore backend handles {t.__module__}.{t.__qualname__} objects "
                    f"(registered backends: {self.names()}); expected an array that "
                    "array-api-compat knows (one with __array_namespace__, or a dask, cupy or "
                    "sparse array) or one a plugin declares"
                )
            backend = generic
        self._by_type[t] = backend
        return backend

    def container_backend(self, obj: Any) -> Backend | None:
        """Return the backend that knows the framework container ``obj`` (an ``nn.Module``).

        Only backends whose library is already imported are asked (an object cannot be a
        torch module unless torch is loaded); the answer is cached per type.
        """
        t = type(obj)
        if t in self._containers:
            return self._containers[t]
        found: Backend | None = None
        for name, (spec, _) in self._specs.items():
            if not any(m in sys.modules for m in spec.array_modules):
                continue
            backend = self.get(name)
            if backend.named_leaves(obj) is not None:
                found = backend
                break
        self._containers[t] = found
        return found

    def flatten_node(self, obj: Any) -> tuple[tuple[str, ...], list[Any], Any] | None:
        """Split a framework's own container (a JAX pytree node) into named children.

        Asks the backends whose library is imported; None when ``obj`` is a leaf to them all.
        """
        for name, (spec, _) in self._specs.items():
            if not any(m in sys.modules for m in spec.array_modules):
                continue
            node = self.get(name).flatten_node(obj)
            if node is not None:
                return node
        return None


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """Return the process-wide registry, building it on first use."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = Registry()
    return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Replace the process-wide registry (``None``: rebuild on next use). For tests and tools."""
    global _registry
    with _registry_lock:
        _registry = registry


def backends() -> list[str]:
    """Return the names of the registered backends.

    Examples
    --------
    >>> import emacore
    >>> {"array_api", "numpy", "torch", "jax"} <= set(emacore.backends())
    True
    """
    return get_registry().names()


def get_backend(name: str) -> Backend:
    """Return the backend registered as ``name`` (loading it on first use).

    Raises
    ------
    UnknownBackendError
        No backend has that name, or its array library is not installed.
    """
    return get_registry().get(name)


def resolve(x: Any) -> Backend:
    """Return the backend that handles the array ``x``."""
    return get_registry().resolve(x)
