"""Declarations of the built-in backends; importing this never imports a framework."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from emacore.backend import Backend, BackendSpec
from emacore.hookspecs import hookimpl


def _loader(module: str) -> Callable[[], Backend]:
    def load() -> Backend:
        backend: Backend = importlib.import_module(f"emacore_backends.{module}").BACKEND
        return backend

    return load


@hookimpl
def emacore_backends() -> list[BackendSpec]:
    """Declare numpy, torch and jax; each loads on first use."""
    return [
        BackendSpec("numpy", ("numpy",), load=_loader("numpy"), description="numpy, fused"),
        BackendSpec("torch", ("torch",), load=_loader("torch"), description="PyTorch tensors"),
        BackendSpec("jax", ("jax", "jaxlib"), load=_loader("jax"), description="JAX arrays"),
    ]
