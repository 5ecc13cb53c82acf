"""emacore's conformance kit: the suite every built-in backend passes, for third parties.

Shipped so that a third-party backend runs it from its own repository.
A backend is described to the suite by a `Lib` (how to make, read and place its arrays); the
tests take it from a pytest fixture named ``lib``. Two ways to provide it:

- define ``lib`` in your own ``conftest.py`` (it returns your `Lib`, or one of the factories
  here), and import the tests into a test module of yours with
  ``from emacore_testing.conformance import *``;
- or load the plugin (``pytest -p emacore_testing.plugin``), whose ``lib`` runs the suite once
  per built-in backend named in ``EMACORE_TEST_BACKENDS``.

This package imports pytest, and its conformance tests import hypothesis and array-api-strict:
install ``emacore[testing]``. ``import emacore`` never imports it.
"""

import pytest

# before any module of the kit is imported: a failed assert in a conformance test then shows
# the values compared, as in a test file of the repository that runs it
pytest.register_assert_rewrite("emacore_testing.conformance")

from emacore_testing._lib import (  # noqa: E402
    BUILTIN_LIBS,
    JAX_X64_ENV,
    Lib,
    jax_lib,
    numpy_lib,
    strict_lib,
    torch_lib,
)

__all__ = [
    "Lib",
    "numpy_lib",
    "strict_lib",
    "torch_lib",
    "jax_lib",
    "BUILTIN_LIBS",
    "JAX_X64_ENV",
]
