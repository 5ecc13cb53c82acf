"""The backend contract is declared, not probed (ARCHITECTURE.md §4, invariant 3).

Every seam the core calls on a backend is a member of `emacore.backend.Backend`, documented,
with a portable default in `emacore.ArrayAPIBackend`; the core calls it plainly. These tests
parse the core and fail on any ``getattr``/``hasattr`` that asks a backend whether it has a
member, check that the portable backend implements (and the protocol documents) every member,
and that a backend written against the protocol without subclassing still gets every default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import emacore
import emacore_backends
from emacore import functional
from emacore.backend import Backend, Capabilities, reference_update

CORE = Path(emacore.__file__).parent
BACKENDS = Path(emacore_backends.__file__).parent


def protocol_members() -> list[str]:
    """The members `Backend` declares: its annotated attributes and its methods, in order."""
    attrs = list(inspect.get_annotations(Backend))
    methods = [n for n, v in vars(Backend).items() if not n.startswith("_") and callable(v)]
    return attrs + methods


def _backend_class_members() -> set[str]:
    """Public methods and attributes of every backend class (a subclass of ArrayAPIBackend)
    defined in the core or a built-in backend: whatever a backend may have, a probe may ask."""
    names: set[str] = set()
    for path in [*CORE.rglob("*.py"), *BACKENDS.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
            if node.name != "ArrayAPIBackend" and "ArrayAPIBackend" not in bases:
                continue
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return {n for n in names if not n.startswith("_")}


# Expressions that hold a backend, as the core names them: a probe of one of these is a probe
# of a backend whatever member it asks for.
_BACKEND_NAMES = re.compile(r"^(\w+_)?(backend|backends|b|single|forced|candidate|generic)$")
_BACKEND_CALLS = ("container_backend", "resolve", "get_backend")
_REGISTRY = re.compile(r"^self$|registry")  # whose ``get(name)`` returns a backend

# Probes that look like backend probes by the member name they ask for, but ask something
# else: each entry is (module, the call as ast.unparse writes it) and says what is probed.
ALLOWED = {
    # an array's own array-API method (the standard's x.to_device), not Backend.to_device
    ("_generic.py", "getattr(x, 'to_device', None)"),
    # an array's device attribute (a Python scalar has none), not Backend.device
    ("schedules.py", "getattr(n, 'device', None)"),
    ("schedules.py", "getattr(x, 'device', None)"),
    # a Keras model's name, in an error message
    ("integrations/keras.py", "getattr(model, 'name', model)"),
    # a dtype by name from an array namespace (``xp.float32``)
    ("_engine.py", "getattr(xp, policy)"),
    ("posthoc.py", "getattr(xp, out)"),
    # a counter of an EMAState by its field name
    ("checkpoint.py", "getattr(state, key)"),
}

# The one place that asks a backend what it has: the registry completes a backend that does not
# subclass ArrayAPIBackend with the portable defaults, once, when it loads it.
COMPLETION = ("_generic.py", "getattr(backend, member, _MISSING)")


def _names_backend(node: ast.expr) -> bool:
    """Whether ``node`` is an expression holding a backend (or its type)."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id == "type" and node.args:
            return _names_backend(node.args[0])
        if isinstance(func, ast.Attribute):
            if func.attr == "get":
                return bool(_REGISTRY.search(ast.unparse(func.value)))
            return func.attr in _BACKEND_CALLS
        return isinstance(func, ast.Name) and func.id in _BACKEND_CALLS
    if isinstance(node, ast.Subscript):
        return _names_backend(node.value)
    if isinstance(node, ast.Attribute):
        return bool(_BACKEND_NAMES.match(node.attr))
    return isinstance(node, ast.Name) and bool(_BACKEND_NAMES.match(node.id))


def backend_probes() -> list[str]:
    """Every getattr/hasattr in the core that asks a backend what it has.

    A call is a probe when its object is an expression holding a backend (``backend``, ``b``,
    ``backends[0]``, ``group.single``, ``type(b)``, a registry lookup...), when the member it
    asks for is one a backend has (a `Backend` member, or a public member of any backend
    class in the core or the built-in backends), or when that member is not a string
    constant (it could be any of them). `ALLOWED` lists the calls that match and probe
    something else.
    """
    members = set(protocol_members()) | _backend_class_members()
    found = []
    for path in sorted(CORE.rglob("*.py")):
        module = path.relative_to(CORE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
            ):
                continue
            obj, attr = node.args[0], node.args[1]
            named = attr.value if isinstance(attr, ast.Constant) else None
            if not (_names_backend(obj) or named is None or named in members):
                continue
            if (module, ast.unparse(node)) in ALLOWED | {COMPLETION}:
                continue
            found.append((module, node.lineno, ast.unparse(node)))
    return [f"{module}:{line}: {call}" for module, line, call in sorted(found)]


def test_the_core_never_probes_a_backend() -> None:
    """No getattr/hasattr of a backend in the core: each seam is declared and called."""
    probes = backend_probes()
    assert not probes, "backend probes in the core:\n" + "\n".join(probes)


def test_the_allow_list_is_current() -> None:
    """Every allowed call still exists: a stale entry would hide nothing, but mislead."""
    calls = set()
    for path in CORE.rglob("*.py"):
        module = path.relative_to(CORE).as_posix()
        calls |= {(module, ast.unparse(n)) for n in ast.walk(ast.parse(path.read_text()))}
    assert calls >= ALLOWED | {COMPLETION}, sorted((ALLOWED | {COMPLETION}) - calls)


def test_the_rule_catches_probes() -> None:
    """The rule recognises each way of probing a backend that the core once used."""
    members = set(protocol_members()) | _backend_class_members()
    for source in (
        "getattr(backend, 'check_new', None)",
        "getattr(backends[0], 'update_lanes', None)",
        "getattr(type(b), 'is_traced', None)",
        "getattr(group.single, 'wait', None)",
        "getattr(_plugins.get_registry().container_backend(m), 'snapshot', None)",
        "getattr(self.get(name), 'flatten_node', None)",
        "hasattr(thing, 'scalar_like')",
    ):
        call = ast.parse(source, mode="eval").body
        assert isinstance(call, ast.Call)
        obj, attr = call.args[0], call.args[1]
        assert isinstance(attr, ast.Constant)
        assert _names_backend(obj) or attr.value in members, source


def test_the_portable_backend_implements_every_member() -> None:
    """`ArrayAPIBackend` has every member of the protocol (methods callable), so a backend
    that subclasses it satisfies the protocol whatever it overrides."""
    backend = emacore.ArrayAPIBackend()
    for member in protocol_members():
        assert hasattr(backend, member), member
        if callable(vars(Backend).get(member)):
            assert callable(getattr(backend, member)), member
    assert isinstance(backend, Backend)


def test_every_member_is_documented() -> None:
    """Each method of the protocol has a docstring; each attribute is in the class's
    ``Attributes`` section; so is every `Capabilities` flag in its own."""
    doc = inspect.getdoc(Backend) or ""
    for member in protocol_members():
        value = vars(Backend).get(member)
        if callable(value):
            text = inspect.getdoc(value) or ""
            assert len(text) > 40, f"Backend.{member} is not documented"
        else:
            assert re.search(rf"^{member} : ", doc, re.M), f"Backend.{member} is not documented"
    caps = inspect.getdoc(Capabilities) or ""
    for flag in dataclasses.fields(Capabilities):
        entry = re.search(rf"^{flag.name} : bool\n((?:    .+\n?)+)", caps, re.M)
        assert entry is not None, f"Capabilities.{flag.name} is not documented"


def test_backends_and_plugins_import_public_names() -> None:
    """The reference update is public for plugins, and no module of a built-in backend or of
    the toy plugin imports it (or the portable backend) from a private core module."""
    assert reference_update is emacore.backend.reference_update
    assert "reference_update" in emacore.backend.__all__
    plugin = Path(__file__).parents[1] / "plugins"
    for path in [*BACKENDS.rglob("*.py"), *plugin.rglob("*.py")]:
        text = path.read_text()
        for private in ("emacore._kernel", "emacore._generic"):
            assert private not in text, f"{path} imports {private}"


class _Plain:
    """A backend for numpy arrays that implements the protocol as it stood before its
    optional seams were declared, without subclassing `ArrayAPIBackend`."""

    name = "plain"
    capabilities = Capabilities(mutable_arrays=True, inplace_update=True)

    def __init__(self) -> None:
        self.updates = 0

    def owns(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def namespace(self, x: Any) -> Any:
        import array_api_compat.numpy

        return array_api_compat.numpy

    def device(self, x: Any) -> Any:
        return "cpu"

    def is_floating(self, x: Any) -> bool:
        return bool(x.dtype.kind == "f")

    def create_shadows(self, params: Any, *, zeros: bool, layout: str = "auto") -> list[Any]:
        return [np.zeros_like(p) if zeros else p.copy() for p in params]

    def update(
        self, shadows: Any, params: Any, c: Any, *, inplace: bool, exact: bool = True
    ) -> Any:
        self.updates += 1
        new = [reference_update(s, p, c) for s, p in zip(shadows, params)]
        if not inplace:
            return new
        for s, n in zip(shadows, new):
            s[...] = n
        return list(shadows)

    def check_writable(self, shadows: Any, names: Any) -> None:
        pass

    def to_host(self, x: Any) -> Any:
        return x

    def is_traced(self, x: Any) -> bool:
        return False

    def to_device(self, x: Any, device: Any) -> Any:
        return x

    def assign(self, dst: Any, src: Any) -> None:
        dst[...] = src

    def named_leaves(self, obj: Any) -> list[tuple[str, Any, str]] | None:
        return None


def test_a_backend_that_does_not_subclass_gets_the_defaults() -> None:
    """The registry completes a protocol implementation that lacks the optional seams with
    the portable defaults: every feature that needs one works, with the right numbers."""
    plain = _Plain()

    class Plugin:
        @emacore.hookimpl
        def emacore_backends(self) -> list[emacore.BackendSpec]:
            return [emacore.BackendSpec("plain", (), load=lambda: plain)]

    registry = emacore.Registry(autoload=False, plugins=[Plugin()])
    emacore.reset_registry(registry)
    try:
        backend = registry.get("plain")
        assert backend is registry.get("plain")  # completed once: one identity
        assert backend.name == "plain" and backend.capabilities is plain.capabilities
        assert isinstance(backend, Backend)
        ema = emacore.EMA(0.5, backend="plain", zero_debias=True, nonfinite="skip")
        same = emacore.EMA(0.5, zero_debias=True, nonfinite="skip")  # the numpy backend's
        params = {"w": np.array([1.0, 2.0]), "b": np.array([4.0])}
        for w in ([1.0, 2.0], [3.0, np.nan], [3.0, 4.0]):
            params["w"][...] = w
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", emacore.EMAWarning)  # the skipped update
                ema.apply(params)  # all_finite: the portable check; update: the plugin's
                same.apply(params)
        assert ema.skipped_updates == 1 and plain.updates == 2
        for k, v in same.average(params).items():  # debiased: scalar_like's default
            np.testing.assert_array_equal(ema.average(params)[k], v)
        live = {"w": np.zeros(2), "b": np.zeros(1)}
        ema.copy_to(live)  # check_assignable: nothing to refuse
        np.testing.assert_array_equal(live["w"], same.average(params)["w"])
        assert registry.completed(plain) is backend  # the object itself: the same completion
        state = functional.init(params, backend=plain)  # a backend passed as an object
        state = functional.update(state, params, 0.5, backend=plain)
        np.testing.assert_array_equal(state.shadow["w"], params["w"])
        with pytest.raises(ValueError, match="backend 'plain' has no streams"):
            emacore.EMA(0.5, backend="plain", side_stream=True).apply(params)
    finally:
        emacore.reset_registry()
