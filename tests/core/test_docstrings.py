"""The ``>>>`` examples in the package's docstrings run as written.

Each example runs in the session of the framework it imports (``torch`` in the torch session;
``jax``, ``optax`` and ``orbax`` in the jax session); examples that need no framework but numpy
run in the numpy session. A module of ``emacore_backends`` is imported only in its own session.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re

import pytest

import emacore
import emacore_backends
import emacore_testing

BACKENDS = set(os.environ.get("EMACORE_TEST_BACKENDS", "numpy").split(","))
# which session runs an example that imports one of these
FRAMEWORKS = {"torch": "torch", "jax": "jax", "optax": "jax", "orbax": "jax"}
IMPORTS = re.compile(r"^\s*(?:import|from)\s+([\w.]+(?:\s*,\s*[\w.]+)*)", re.M)


def _modules() -> list[str]:
    names = [emacore.__name__]
    names += [m.name for m in pkgutil.walk_packages(emacore.__path__, "emacore.")]
    names += [m.name for m in pkgutil.walk_packages(emacore_backends.__path__, "emacore_backends.")]
    names += [emacore_testing.__name__]  # the kit's API; its conformance modules are tests
    names += [m.name for m in pkgutil.iter_modules(emacore_testing.__path__, "emacore_testing.")]
    return sorted(names)


def _session(test: doctest.DocTest) -> str:
    """The session an example belongs to: the framework it imports, else numpy."""
    source = "\n".join(example.source for example in test.examples)
    for group in IMPORTS.findall(source):
        for name in re.split(r"\s*,\s*", group):
            session = FRAMEWORKS.get(name.split(".")[0])
            if session is not None:
                return session
    return "numpy"


def _doctests() -> list[tuple[str, str]]:
    """(module, test name) of every docstring example, imported only where it may be."""
    out = []
    for name in _modules():
        backend = name.removeprefix("emacore_backends.")
        framework = name.startswith("emacore_backends.") and backend in FRAMEWORKS.values()
        if framework and backend not in BACKENDS:
            continue  # importing it imports its framework
        module = importlib.import_module(name)
        for test in doctest.DocTestFinder().find(module):
            if test.examples:
                out.append((name, test.name))
    return out


CASES = _doctests()


def test_examples_were_found() -> None:
    assert len(CASES) > 40, CASES


@pytest.mark.parametrize(("module", "name"), CASES, ids=[name for _, name in CASES])
def test_docstring_example(module: str, name: str) -> None:
    (test,) = [
        t for t in doctest.DocTestFinder().find(importlib.import_module(module)) if t.name == name
    ]
    session = _session(test)
    if session not in BACKENDS:
        pytest.skip(f"imports {session}: runs in the {session} session")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda text: print(text, end=""))
    assert runner.failures == 0, f"{name}: {runner.failures} example(s) failed (output above)"
