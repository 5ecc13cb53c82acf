"""The public surface of ``emacore``: every name of ``__all__`` resolves, and a bare
``import emacore`` loads only what it needs, the rest on first use (PEP 562).

Which modules load is checked, never how long the import takes: the timing is a benchmark
(``benchmarks/bench_import.py``), not a test.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types

import pytest

import emacore

# Modules an eager `import emacore` used to load (65-100 ms in all, importlib.metadata the
# largest); a bare `import emacore` loads none of them now.
LAZY_MODULES = (
    "importlib.metadata",  # the plugin registry's entry points
    "pluggy",
    "emacore._plugins",
    "emacore._generic",
    "emacore._engine",
    "emacore._ema",
    "emacore._state_dict",
    "emacore.functional",
    "emacore.schedules",
    "emacore.checkpoint",
    "emacore.importers",
    "emacore.backend",
    "emacore.hookspecs",
)


def _fresh(code: str) -> list[str]:
    """Run ``code`` after a bare `import emacore` in a new interpreter; return the modules that
    were not loaded before the import and are after ``code``."""
    script = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import emacore\n"
        f"{code}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        # this process's sys.path: the child imports the emacore under test
        env={
            "EMACORE_DISABLE_PLUGIN_AUTOLOAD": "1",
            "PATH": "",
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        },
        timeout=120,
    )
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_import_emacore_loads_none_of_the_lazy_modules() -> None:
    loaded = _fresh("")
    assert [m for m in LAZY_MODULES if m in loaded] == []
    # the package and its errors, nothing else of emacore
    assert [m for m in loaded if m.startswith("emacore")] == ["emacore", "emacore.errors"]


def test_first_use_loads_the_module_that_defines_the_name() -> None:
    loaded = _fresh("emacore.ExponentialMovingAverage")
    assert "emacore._ema" in loaded
    assert "emacore.checkpoint" not in loaded
    loaded = _fresh("from emacore import functional")
    assert "emacore.functional" in loaded
    assert "emacore._ema" not in loaded


@pytest.mark.parametrize("name", emacore.__all__)
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(emacore, name)
    assert value is not None
    # `from emacore import name` gives the same object, from the module that defines it
    namespace: dict[str, object] = {}
    exec(f"from emacore import {name}", namespace)
    assert namespace[name] is value
    if isinstance(value, types.ModuleType):
        assert value is importlib.import_module(f"emacore.{name}")


def test_the_lazy_table_is_all_of_the_surface() -> None:
    lazy = set(emacore._LAZY)
    eager = {"__version__", *emacore.errors.__all__}
    assert lazy | eager == set(emacore.__all__)
    assert not lazy & eager
    assert len(emacore.__all__) == len(set(emacore.__all__))


def test_star_import_and_dir_list_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from emacore import *", namespace)
    assert set(emacore.__all__) <= set(namespace)
    assert set(emacore.__all__) <= set(dir(emacore))


def test_submodules_stay_attributes_and_unknown_names_raise() -> None:
    # attributes a bare `import emacore` used to provide, because it loaded their modules
    assert emacore.backend is importlib.import_module("emacore.backend")
    assert emacore.hookspecs is importlib.import_module("emacore.hookspecs")
    assert emacore.functional.update is importlib.import_module("emacore.functional").update
    with pytest.raises(AttributeError, match="has no attribute 'ExponentialMovingAverag'"):
        _ = emacore.ExponentialMovingAverag  # type: ignore[attr-defined]
