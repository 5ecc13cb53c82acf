"""The pytest plugin of the conformance kit: a ``lib`` fixture for the built-in backends.

Load it with ``pytest -p emacore_testing.plugin`` or ``pytest_plugins =
["emacore_testing.plugin"]`` in a top-level ``conftest.py``. Its ``lib`` fixture is
parametrised by ``EMACORE_TEST_BACKENDS`` (comma-separated names of `BUILTIN_LIBS`; default:
``numpy,array_api_strict``), so every test that takes ``lib`` runs once per backend named. A
requested backend that cannot import is an error, never a skip, so a broken install cannot pass
CI silently. A third party's own ``lib`` fixture (in its ``conftest.py``) overrides this one.
"""

from __future__ import annotations

import os

import pytest

from emacore_testing._lib import BUILTIN_LIBS, Lib

BACKENDS_ENV = "EMACORE_TEST_BACKENDS"
DEFAULT_BACKENDS = "numpy,array_api_strict"


def requested_backends() -> list[str]:
    """The built-in backends ``EMACORE_TEST_BACKENDS`` names, in its order.

    Raises
    ------
    pytest.UsageError
        If it names a backend that has no factory in `BUILTIN_LIBS`, quoting the names.

    Examples
    --------
    >>> from emacore_testing import BUILTIN_LIBS
    >>> from emacore_testing.plugin import requested_backends
    >>> set(requested_backends()) <= set(BUILTIN_LIBS)
    True
    """
    raw = os.environ.get(BACKENDS_ENV, DEFAULT_BACKENDS)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILTIN_LIBS]
    if unknown:
        raise pytest.UsageError(
            f"{BACKENDS_ENV} names unknown backends {unknown}; known: {sorted(BUILTIN_LIBS)}"
        )
    return names


@pytest.fixture(params=requested_backends(), scope="session")
def lib(request: pytest.FixtureRequest) -> Lib:
    """The `Lib` of one requested built-in backend (the test runs once per backend)."""
    name: str = request.param
    return BUILTIN_LIBS[name]()
