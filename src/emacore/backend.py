"""What a backend is: the protocol plugin authors implement and the record they declare.

The core owns the math (schedules, debias, the update formula), validation, state and the
public API. A backend owns what differs between array libraries: recognising its arrays, their
namespace and device, making detached shadows, and the fastest correct way to run the update
(in place, fused, jitted). `emacore.ArrayAPIBackend` implements every method portably; a
backend subclasses it and overrides only what it does better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Backend", "BackendSpec", "Capabilities"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; drives the conformance tests and the docs' capability table.

    Attributes
    ----------
    mutable_arrays : bool
        The library's arrays can be modified in place, so a bare array passed to
        ``apply`` is tracked by identity (as TF tracks variables) rather than by position.
    inplace_update : bool
        ``update(..., inplace=True)`` writes into the shadow arrays it is given.
    fused_update : bool
        One update call covers many leaves with less than one pass of Python per leaf.
    one_device : bool
        Every array of this backend lives on one device (numpy: the host), so the core skips
        per-leaf device checks.
    self_checking : bool
        ``update`` checks every parameter's dtype and size against its shadow before it writes
        anything, and raises ``ValueError``/``TypeError`` otherwise. For arrays it has already
        checked (the very same objects as last step) the core then skips its own per-leaf
        check, and runs it only to name the leaf when ``update`` refuses.
    """

    mutable_arrays: bool = True
    inplace_update: bool = False
    fused_update: bool = False
    one_device: bool = False
    self_checking: bool = False
    checks_signature: bool = False
    places_params: bool = False


@runtime_checkable
class Backend(Protocol):
    """The interface the core calls. Subclass `emacore.ArrayAPIBackend` to get it all."""

    name: str
    capabilities: Capabilities

    def owns(self, x: Any) -> bool:
        """Return True if ``x`` is an array this backend handles."""
        ...

    def namespace(self, x: Any) -> Any:
        """Return the array-API namespace of ``x``."""
        ...

    def device(self, x: Any) -> Any:
        """Return the device ``x`` lives on."""
        ...

    def is_floating(self, x: Any) -> bool:
        """Return True if ``x`` has a real floating dtype."""
        ...

    def create_shadows(
        self, params: Sequence[Any], *, zeros: bool, layout: str = "auto"
    ) -> list[Any]:
        """Return new shadows: detached copies of ``params`` (or zeros), on their devices.

        ``layout`` is ``"auto"`` (the backend chooses), ``"flat"`` (pack the shadows in one
        buffer per dtype and device, so many small tensors cost one kernel) or
        ``"separate"`` (one allocation per shadow). A backend that cannot honour a layout
        raises ``ValueError`` naming itself and the layout.
        """
        ...

    def update(
        self,
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: float,
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[Any]:
        """Return ``shadow - (shadow - param) * c`` for every pair.

        With ``inplace=True`` and ``capabilities.inplace_update``, the shadows are written in
        place and returned; otherwise new arrays are returned and the inputs are untouched.
        With ``exact=True`` (``compat="tensorflow"``) the arithmetic must match the reference
        kernel (``emacore._kernel.reference_update``) bit for bit; with ``exact=False`` a
        backend may use a fused form that rounds differently in the last place (torch's
        one-pass ``lerp``), never a less accurate one.
        """
        ...

    def check_writable(self, shadows: Sequence[Any], names: Sequence[str]) -> None:
        """Raise `emacore.errors.ReadOnlyError` naming any shadow that cannot be written."""
        ...

    def to_host(self, x: Any) -> Any:
        """Return ``x`` as something ``numpy.asarray`` accepts (for checkpoints and tests)."""
        ...

    def is_traced(self, x: Any) -> bool:
        """Return True for a placeholder of a trace (a JAX tracer): no concrete value."""
        ...

    def to_device(self, x: Any, device: Any) -> Any:
        """Return ``x`` on ``device`` (``x`` itself when it is there already).

        Used for offloaded shadows (``device=``): raises ``ValueError`` naming the backend
        for a device it does not have.
        """
        ...

    def assign(self, dst: Any, src: Any) -> None:
        """Write ``src`` into the array ``dst`` in place (for ``copy_to``, ``swapped``, copies).

        Raises `emacore.errors.EMAError` naming the backend where arrays are immutable. A
        backend may also define ``check_assignable(arrays, names)``: the core calls it with
        every array it is about to write, before writing any, so that it can raise
        `emacore.errors.ReadOnlyError` naming one ``assign`` would fail on.
        """
        ...

    def named_leaves(self, obj: Any) -> list[tuple[str, Any, str]] | None:
        """Return the arrays of a framework container (a ``torch.nn.Module``), or None.

        Each entry is ``(name, array, kind)`` with kind ``"param"`` (trainable), ``"frozen"``
        (a parameter that does not require grad), ``"buffer"``, or ``"tied"`` (an array
        listed before under another name, e.g. tied embeddings: tracked once, reported under
        both names). ``None`` means ``obj`` is not a container this backend knows.
        """
        ...


@dataclass(frozen=True)
class BackendSpec:
    """A backend declared by a plugin through the ``emacore_backends`` hook.

    Attributes
    ----------
    name : str
        The backend's unique name (``"numpy"``, ``"torch"``, ...).
    array_modules : tuple of str
        Top-level modules whose array types this backend claims (``type(x).__module__``'s first
        component, e.g. ``("jax", "jaxlib")``). Resolution looks here first, without importing
        anything, then asks the loaded backend's ``owns``.
    load : callable
        Zero-argument function returning the `Backend`; called on first use only, so
        declaring a backend never imports its framework.
    description : str
        One line for ``emacore.backends()`` listings and docs.

    Examples
    --------
    >>> spec = BackendSpec("toy", ("toy_arrays",), load=lambda: None, description="toy arrays")
    >>> spec.name
    'toy'
    """

    name: str
    array_modules: tuple[str, ...]
    load: Callable[[], Backend] = field(repr=False)
    description: str = ""
