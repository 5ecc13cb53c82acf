"""A plugin module that imports fine but whose ``emacore_backends`` hook raises."""

from __future__ import annotations

import emacore


@emacore.hookimpl
def emacore_backends() -> list[emacore.BackendSpec]:
    raise RuntimeError("emacore_fixture_raising_hook cannot read its configuration")
