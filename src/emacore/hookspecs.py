"""The pluggy hook specifications a backend plugin implements.

A plugin is a module (or object) with functions marked ``@emacore.hookimpl`` whose names match
the specs below, advertised in the ``emacore`` entry-point group:

```toml
[project.entry-points.emacore]
mybackend = "my_package.emacore_plugin"
```

Hooks *declare* records; the plugin manager validates them, rejects duplicate names (naming
both providers) and decides resolution order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from emacore.backend import BackendSpec

__all__ = ["PROJECT_NAME", "emacore_backends", "hookimpl", "hookspec"]

PROJECT_NAME = "emacore"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def emacore_backends() -> list[BackendSpec]:  # type: ignore[empty-body]
    """Declare the backends this plugin provides.

    Called once per plugin when the registry is built. Declaring must be cheap and must not
    import the array library: put the import inside ``BackendSpec.load``.

    :return: a list of `emacore.BackendSpec` records (may be empty).

    Examples
    --------
    >>> import emacore
    >>> @emacore.hookimpl
    ... def emacore_backends():
    ...     return [emacore.BackendSpec("toy", ("toy",), load=lambda: ...)]
    """
