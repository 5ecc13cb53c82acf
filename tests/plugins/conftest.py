"""Fixtures of the plugin tests: a fresh registry per test, and the installed toy plugin."""

from __future__ import annotations

import importlib.metadata
import os
import types
from collections.abc import Iterator

import pytest

import emacore

REQUIRE_ENV = "EMACORE_REQUIRE_PLUGIN"
INSTALL_HINT = "pip install tests/plugins/emacore_toy_plugin"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    """Every test starts and ends with no process-wide registry (rebuilt on next use)."""
    emacore.reset_registry()
    yield
    emacore.reset_registry()


@pytest.fixture
def toy_plugin(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The installed toy plugin module, loaded through its entry point.

    Missing: a failure when ``EMACORE_REQUIRE_PLUGIN=1`` (as in ``nox -s tests``), else a skip.
    """
    monkeypatch.delenv(emacore.DISABLE_AUTOLOAD_ENV, raising=False)
    group = emacore.ENTRY_POINT_GROUP
    eps = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == "toy"]
    if not eps:
        reason = (
            "the emacore-toy-plugin package is not installed (no 'toy' entry point in group "
            f"{group!r}); run `{INSTALL_HINT}`"
        )
        if _truthy(os.environ.get(REQUIRE_ENV)):
            pytest.fail(f"{reason}. {REQUIRE_ENV} is set, so the plugin is required.", False)
        pytest.skip(reason)
    assert eps[0].value == "emacore_toy_plugin.plugin"
    module: types.ModuleType = eps[0].load()
    return module
