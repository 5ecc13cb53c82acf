"""Backend plugins: entry-point discovery, autoload switch, broken plugins, conflicts, resolution.

The toy plugin (``tests/plugins/emacore_toy_plugin``) is a real package installed by
``nox -s tests``; the other plugins here are modules built in the test or the fixture modules
in ``tests/plugins/fixture_plugins``, reached through fake entry points.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import re
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import pytest

import emacore
from emacore import _plugins, functional, hookspecs
from emacore.backend import reference_update

GROUP = emacore.ENTRY_POINT_GROUP
BUILTINS = {"array_api", "numpy", "torch", "jax"}
FIXTURE_PLUGINS = Path(__file__).parent / "fixture_plugins"


@pytest.fixture
def fake_entry_points(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., None]]:
    """Replace the ``emacore`` entry-point group with the given (name, module) pairs.

    The modules are looked up in ``tests/plugins/fixture_plugins`` (or created in the test and
    put in ``sys.modules``); they are forgotten afterwards.
    """
    monkeypatch.syspath_prepend(str(FIXTURE_PLUGINS))
    monkeypatch.delenv(emacore.DISABLE_AUTOLOAD_ENV, raising=False)
    real = importlib.metadata.entry_points
    before = set(sys.modules)

    def install(*pairs: tuple[str, str]) -> None:
        eps = [importlib.metadata.EntryPoint(name, value, GROUP) for name, value in pairs]

        def entry_points(**params: Any) -> Any:
            if params.get("group") == GROUP:
                return importlib.metadata.EntryPoints(eps)
            return real(**params)

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    yield install
    for name in set(sys.modules) - before:
        if name.startswith("emacore_fixture_"):
            del sys.modules[name]


def _plugin(name: str, *specs: emacore.BackendSpec) -> types.ModuleType:
    """A plugin module called ``name`` whose hook declares ``specs``."""
    module = types.ModuleType(name)

    @emacore.hookimpl
    def emacore_backends() -> list[emacore.BackendSpec]:
        return list(specs)

    module.emacore_backends = emacore_backends  # type: ignore[attr-defined]
    return module


def _spec(name: str, *modules: str) -> emacore.BackendSpec:
    return emacore.BackendSpec(name, modules, load=lambda: emacore.ArrayAPIBackend(name))


def _run_python(code: str, **env: str) -> Any:
    """Run ``code`` in a fresh interpreter; return the JSON it prints."""
    environ = {k: v for k, v in os.environ.items() if k != emacore.DISABLE_AUTOLOAD_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**environ, **env},
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


_IMPORTED_FRAMEWORKS = """
import json, sys
import emacore
names = emacore.backends()
heavy = ("numpy", "torch", "jax", "jaxlib", "array_api_strict", "array_api_compat")
print(json.dumps({"names": names, "imported": sorted(m for m in heavy if m in sys.modules)}))
"""


# -- the installed toy plugin --------------------------------------------------------------


def test_toy_plugin_is_discovered_through_its_entry_point(toy_plugin: types.ModuleType) -> None:
    assert "toy" in emacore.backends()
    assert emacore.backends()[: len(BUILTINS)] == ["array_api", "numpy", "torch", "jax"]
    assert _plugins.get_registry().provider("toy") == "toy"  # the entry point's name
    assert emacore.get_backend("toy") is toy_plugin.BACKEND
    assert isinstance(toy_plugin.BACKEND, emacore.Backend)


def test_ema_on_toy_arrays_runs_the_plugins_update(toy_plugin: types.ModuleType) -> None:
    from emacore_toy_plugin import ToyArray

    rng = np.random.default_rng(0)
    w = ToyArray(rng.standard_normal((3, 4)), dtype=np.float32)
    assert not hasattr(w, "__array_namespace__")
    calls = toy_plugin.UPDATE_CALLS
    ema = emacore.ExponentialMovingAverage(0.5)
    ema.apply([w])
    expected64 = w.data.astype(np.float64)
    reference32 = w.data.copy()
    for _ in range(4):
        w.data[...] = rng.standard_normal((3, 4))  # in place: tracked by identity
        ema.apply([w])
        expected64 = expected64 - (expected64 - w.data.astype(np.float64)) * 0.5
        reference32 = reference_update(reference32, w.data, 0.5)
    average = ema.average(w)
    assert isinstance(average, ToyArray)
    assert average.dtype == np.float32
    assert average.shape == (3, 4)
    np.testing.assert_allclose(average.data, expected64, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(average.data, reference32)
    assert toy_plugin.UPDATE_CALLS - calls == 5
    assert _plugins.resolve(w) is toy_plugin.BACKEND


def test_toy_arrays_through_the_functional_api(toy_plugin: types.ModuleType) -> None:
    from emacore_toy_plugin import ToyArray

    x = ToyArray([1.0, -2.0, 4.0], dtype=np.float64)
    state = functional.init({"w": x}, zero_debias=True)
    calls = toy_plugin.UPDATE_CALLS
    new = functional.update(state, {"w": x}, decay=0.9)
    assert toy_plugin.UPDATE_CALLS - calls == 1
    np.testing.assert_array_equal(state.shadow["w"].data, [0.0, 0.0, 0.0])  # not in place
    np.testing.assert_allclose(new.shadow["w"].data, [0.1, -0.2, 0.4], rtol=1e-15)
    debiased = functional.average(new)["w"]  # ToyArray.__truediv__
    assert isinstance(debiased, ToyArray)
    np.testing.assert_allclose(debiased.data, x.data, rtol=1e-15)


def test_toy_plugin_declares_its_backend_without_importing_numpy(
    toy_plugin: types.ModuleType,
) -> None:
    out = _run_python(_IMPORTED_FRAMEWORKS)
    assert "toy" in out["names"]
    assert out["imported"] == []


def test_autoload_switches_hide_the_toy_plugin(
    toy_plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "toy" not in emacore.Registry(autoload=False).names()
    monkeypatch.setenv(emacore.DISABLE_AUTOLOAD_ENV, "1")
    assert "toy" not in emacore.backends()
    assert set(emacore.backends()) == BUILTINS
    assert "toy" not in emacore.Registry().names()
    assert "toy" in emacore.Registry(autoload=True).names()  # the argument wins over the env


# -- switching autoload off ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_disable_autoload_env_skips_entry_points(
    value: str, monkeypatch: pytest.MonkeyPatch, fake_entry_points: Callable[..., None]
) -> None:
    fake_entry_points(("good", "emacore_fixture_good"))
    monkeypatch.setenv(emacore.DISABLE_AUTOLOAD_ENV, value)
    names = emacore.backends()
    assert set(names) == BUILTINS
    assert "emacore_fixture_good" not in sys.modules


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_falsy_disable_autoload_env_loads_entry_points(
    value: str, monkeypatch: pytest.MonkeyPatch, fake_entry_points: Callable[..., None]
) -> None:
    fake_entry_points(("good", "emacore_fixture_good"))
    monkeypatch.setenv(emacore.DISABLE_AUTOLOAD_ENV, value)
    assert emacore.backends() == ["array_api", "numpy", "torch", "jax", "fixture_good"]
    assert _plugins.get_registry().provider("fixture_good") == "good"


def test_registry_without_autoload_has_only_the_builtins() -> None:
    registry = emacore.Registry(autoload=False)
    assert registry.names() == ["array_api", "numpy", "torch", "jax"]
    assert "toy" not in registry.names()
    assert registry.provider("array_api") == "emacore.generic"
    assert registry.provider("numpy") == "emacore_backends"


# -- broken plugins --------------------------------------------------------------------------


def test_broken_plugins_warn_and_the_rest_keeps_working(
    fake_entry_points: Callable[..., None],
) -> None:
    fake_entry_points(
        ("broken", "emacore_fixture_broken_import"),
        ("missing", "emacore_fixture_no_such_module"),
        ("raising", "emacore_fixture_raising_hook"),
        ("good", "emacore_fixture_good"),
    )
    with pytest.warns(emacore.PluginWarning) as record:
        registry = emacore.Registry()
    messages = [str(w.message) for w in record]
    assert len(messages) == 3, messages
    broken, missing, raising = messages
    assert "'broken'" in broken
    assert "emacore_fixture_broken_import" in broken
    assert "ImportError" in broken
    assert "libtoy.so" in broken
    assert "'missing'" in missing
    assert "ModuleNotFoundError" in missing
    assert "'raising'" in raising
    assert "RuntimeError: emacore_fixture_raising_hook cannot read its configuration" in raising

    assert registry.names() == ["array_api", "numpy", "torch", "jax", "fixture_good"]
    assert registry.get("fixture_good").name == "fixture_good"
    emacore.reset_registry(registry)
    w = np.zeros(2)
    ema = emacore.ExponentialMovingAverage(0.5)
    ema.apply([w])
    w[...] = 4.0
    ema.apply([w])
    np.testing.assert_array_equal(ema.average(w), [2.0, 2.0])


def test_explicit_plugin_whose_hook_raises_warns() -> None:
    plugin = types.ModuleType("emacore_test_raising")

    @emacore.hookimpl
    def emacore_backends() -> list[emacore.BackendSpec]:
        raise ValueError("boom")

    plugin.emacore_backends = emacore_backends  # type: ignore[attr-defined]
    with pytest.warns(emacore.PluginWarning, match=r"'emacore_test_raising'.*ValueError: boom"):
        registry = emacore.Registry(autoload=False, plugins=[plugin])
    assert registry.names() == ["array_api", "numpy", "torch", "jax"]


def test_invalid_declarations_are_skipped_with_a_warning() -> None:
    plugin = _plugin("emacore_test_invalid", "not a spec", _spec(""), _spec("valid"))  # type: ignore[arg-type]
    with pytest.warns(emacore.PluginWarning, match="not a BackendSpec") as record:
        registry = emacore.Registry(autoload=False, plugins=[plugin])
    assert len(record) == 2
    assert all("'emacore_test_invalid'" in str(w.message) for w in record)
    assert registry.names()[-1] == "valid"


def test_backend_whose_library_is_missing_is_an_unknown_backend_error() -> None:
    def load() -> emacore.Backend:
        raise ImportError("No module named 'libfoo'")

    plugin = _plugin(
        "emacore_test_needs_libfoo", emacore.BackendSpec("foo", ("libfoo",), load=load)
    )
    registry = emacore.Registry(autoload=False, plugins=[plugin])
    assert "foo" in registry.names()  # declaring it did not need libfoo
    with pytest.raises(emacore.UnknownBackendError, match="libfoo") as exc:
        registry.get("foo")
    assert "'foo'" in str(exc.value)
    assert "'emacore_test_needs_libfoo'" in str(exc.value)


# -- conflicts and validation ----------------------------------------------------------------


def test_two_plugins_declaring_one_name_conflict() -> None:
    a = _plugin("emacore_test_provider_a", _spec("dup"))
    b = _plugin("emacore_test_provider_b", _spec("dup"))
    with pytest.raises(emacore.BackendConflictError) as exc:
        emacore.Registry(autoload=False, plugins=[a, b])
    message = str(exc.value)
    assert "'dup'" in message
    assert "'emacore_test_provider_a'" in message
    assert "'emacore_test_provider_b'" in message


def test_plugin_declaring_a_builtin_name_conflicts() -> None:
    impostor = _plugin("emacore_test_impostor", _spec("numpy", "numpy"))
    with pytest.raises(emacore.BackendConflictError) as exc:
        emacore.Registry(autoload=False, plugins=[impostor])
    message = str(exc.value)
    assert "'numpy'" in message
    assert "'emacore_backends'" in message  # the built-in provider
    assert "'emacore_test_impostor'" in message


def test_conflict_between_entry_point_plugins_names_both(
    fake_entry_points: Callable[..., None],
) -> None:
    fake_entry_points(("good", "emacore_fixture_good"))
    clone = _plugin("emacore_test_clone", _spec("fixture_good"))
    with pytest.raises(emacore.BackendConflictError, match=r"'emacore_test_clone' and 'good'"):
        emacore.Registry(plugins=[clone])


def test_check_pending_rejects_a_misspelt_hook() -> None:
    plugin = types.ModuleType("emacore_test_typo")

    @emacore.hookimpl
    def emacore_backend() -> list[emacore.BackendSpec]:  # missing "s"
        return []

    plugin.emacore_backend = emacore_backend  # type: ignore[attr-defined]
    with pytest.raises(pluggy.PluginValidationError, match="emacore_backend"):
        emacore.Registry(autoload=False, plugins=[plugin])


def test_hookimpl_with_arguments_the_spec_lacks_is_rejected() -> None:
    plugin = types.ModuleType("emacore_test_signature")

    @emacore.hookimpl
    def emacore_backends(config: Any) -> list[emacore.BackendSpec]:
        return []

    plugin.emacore_backends = emacore_backends  # type: ignore[attr-defined]
    with pytest.raises(pluggy.PluginValidationError, match="config"):
        emacore.Registry(autoload=False, plugins=[plugin])


# -- unknown backends and unhandled objects ------------------------------------------------


def test_unknown_backend_name_lists_the_registered_ones() -> None:
    with pytest.raises(emacore.UnknownBackendError, match="'nope'") as exc:
        emacore.get_backend("nope")
    for name in emacore.backends():
        assert repr(name) in str(exc.value)


def test_ema_with_an_unknown_backend_fails_at_construction() -> None:
    with pytest.raises(emacore.UnknownBackendError, match="'nope'") as exc:
        emacore.ExponentialMovingAverage(0.9, backend="nope")
    assert all(repr(name) in str(exc.value) for name in BUILTINS)


@pytest.mark.parametrize(
    ("leaf", "type_name"), [(object(), "builtins.object"), ("weights", "builtins.str")]
)
def test_object_no_backend_handles_names_its_type(leaf: Any, type_name: str) -> None:
    ema = emacore.ExponentialMovingAverage(0.9)
    with pytest.raises(emacore.UnknownBackendError, match=re.escape(type_name)) as exc:
        ema.apply([leaf])
    assert "'numpy'" in str(exc.value)  # lists the registered backends
    assert type(leaf) not in _plugins.get_registry()._by_type
    with pytest.raises(emacore.UnknownBackendError, match=re.escape(type_name)):
        functional.init({"w": leaf})


# -- resolution --------------------------------------------------------------------------------


Blob = type("Blob", (), {"__module__": "emacore_test_blobs.arrays"})
OtherBlob = type("OtherBlob", (), {"__module__": "emacore_test_elsewhere"})


class CountingBackend(emacore.ArrayAPIBackend):
    def __init__(self) -> None:
        super().__init__("blob")
        self.owns_calls = 0

    def owns(self, x: Any) -> bool:
        self.owns_calls += 1
        return isinstance(x, Blob)


def test_resolution_loads_only_the_claiming_backend_and_caches_per_type() -> None:
    backend = CountingBackend()
    loads: list[str] = []

    def load() -> emacore.Backend:
        loads.append("blob")
        return backend

    plugin = _plugin(
        "emacore_test_blobs_plugin", emacore.BackendSpec("blob", ("emacore_test_blobs",), load)
    )
    registry = emacore.Registry(autoload=False, plugins=[plugin])
    assert loads == []  # declared, not loaded
    for _ in range(3):
        assert registry.resolve(Blob()) is backend
    assert loads == ["blob"]
    assert backend.owns_calls == 1
    assert registry._by_type[Blob] is backend
    assert set(registry._loaded) == {"blob"}  # numpy, torch, jax were never loaded

    with pytest.raises(emacore.UnknownBackendError, match=r"emacore_test_elsewhere\.OtherBlob"):
        registry.resolve(OtherBlob())  # claimed by no one, and not an array-API array
    assert backend.owns_calls == 1
    assert set(registry._loaded) == {"blob", "array_api"}


def test_numpy_and_array_api_arrays_resolve_to_their_backends() -> None:
    xp = pytest.importorskip("array_api_strict")
    registry = emacore.Registry(autoload=False)
    assert registry.resolve(np.zeros(1)) is registry.get("numpy")
    assert registry.resolve(xp.zeros(1)) is registry.get("array_api")
    assert registry._by_type[np.ndarray] is registry.get("numpy")
    assert registry._by_type[type(xp.zeros(1))] is registry.get("array_api")
    assert "torch" not in registry._loaded
    assert "jax" not in registry._loaded


def test_declaring_and_listing_backends_imports_no_framework() -> None:
    out = _run_python(_IMPORTED_FRAMEWORKS, **{emacore.DISABLE_AUTOLOAD_ENV: "1"})
    assert out["names"] == ["array_api", "numpy", "torch", "jax"]
    assert out["imported"] == []


# -- the hook specifications -------------------------------------------------------------------

# Every hookspec, and the tests that exercise it: a new hook needs an entry (and tests) here.
HOOK_TESTS: dict[str, list[Callable[..., Any]]] = {
    "emacore_backends": [
        test_toy_plugin_is_discovered_through_its_entry_point,
        test_broken_plugins_warn_and_the_rest_keeps_working,
        test_two_plugins_declaring_one_name_conflict,
        test_hookimpl_with_arguments_the_spec_lacks_is_rejected,
    ],
}


def test_every_hookspec_is_documented_and_tested() -> None:
    marker = hookspecs.PROJECT_NAME + "_spec"
    specs = {
        name: obj
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, marker)
    }
    assert set(specs) == {"emacore_backends"}
    assert set(specs) == set(HOOK_TESTS)
    for name, spec in specs.items():
        doc = inspect.getdoc(spec)
        assert doc, f"hookspec {name} has no docstring"
        assert ":return:" in doc, f"hookspec {name}'s docstring does not say what it returns"
        assert name in hookspecs.__all__
    registry = emacore.Registry(autoload=False)
    for name in specs:
        caller = getattr(registry._pm.hook, name)
        assert caller.spec is not None
        assert caller.get_hookimpls(), f"no built-in plugin implements {name}"
