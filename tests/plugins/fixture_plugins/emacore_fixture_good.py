"""A well-behaved plugin module: declares ``fixture_good``, a renamed generic backend."""

from __future__ import annotations

import emacore


@emacore.hookimpl
def emacore_backends() -> list[emacore.BackendSpec]:
    return [
        emacore.BackendSpec(
            "fixture_good",
            ("emacore_fixture_good",),
            load=lambda: emacore.ArrayAPIBackend("fixture_good"),
            description="test fixture",
        )
    ]
