"""The conformance tests, written against a ``lib`` fixture (an `emacore_testing.Lib`).

Each ``test_*`` module checks one area (the public API, bad input, checkpoints, TensorFlow
parity...). ``from emacore_testing.conformance import *`` in a test module of yours brings the
tests of every module (their names are distinct across modules, and only the ``test_*``
functions are exported), to run against the ``lib`` fixture of your ``conftest.py``; import one
module's tests instead with, e.g., ``from emacore_testing.conformance.test_checkpoint import *``.
"""

import importlib
import pkgutil

MODULES = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("test_"))
)
"""The conformance modules, by name (``"test_api"``, ...)."""

for _name in MODULES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    globals().update({k: v for k, v in vars(_module).items() if k.startswith("test_")})

__all__ = sorted(k for k in globals() if k.startswith("test_") and k not in MODULES)
