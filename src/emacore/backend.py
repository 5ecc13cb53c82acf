"""What a backend is: the protocol plugin authors implement and the record they declare.

The core owns the math (schedules, debias, the update formula), validation, state and the
public API. A backend owns what differs between array libraries: recognising its arrays, their
namespace and device, making detached shadows, and the fastest correct way to run the update
(in place, fused, jitted). Every seam the core calls on a backend is a member of `Backend`,
and `emacore.ArrayAPIBackend` implements each one portably: a backend subclasses it and
overrides only what it does better. `reference_update` is the update written once; a fast
path is tested against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from emacore._kernel import reference_update

__all__ = ["Backend", "BackendSpec", "Capabilities", "ShadowList", "reference_update"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; drives the conformance tests and the docs' capability table.

    Each flag is a promise the backend makes; the core reads it to skip work the backend
    already does, or to refuse what the backend cannot do, with an error naming it.

    Attributes
    ----------
    mutable_arrays : bool
        The library's arrays can be modified in place, so a bare array passed to
        ``apply`` is tracked by identity (as TF tracks variables) rather than by position,
        and ``copy_to``/``swapped``/``store``/``restore`` may write into them. Read by the
        stateful class (leaf identity, evaluation) and by ``ArrayAPIBackend.assign``.
    inplace_update : bool
        ``update(..., inplace=True)`` writes into the shadow arrays it is given. Read by the
        conformance tests and the docs' table; the core asks for ``inplace`` and uses what
        ``update`` returns either way.
    fused_update : bool
        One update call covers many leaves with less than one pass of Python per leaf.
        Read by the conformance tests and the docs' table only: nothing in the core
        depends on it.
    one_device : bool
        Every array of this backend lives on one device (numpy: the host), so the core
        skips per-leaf device checks. Read by the core's pair checks (``_engine``) and the
        stateful class.
    self_checking : bool
        ``update`` checks every parameter's dtype and size against its shadow before it writes
        anything, and raises ``ValueError``/``TypeError`` otherwise. For arrays it has already
        checked (the very same objects as last step) the core then skips its own per-leaf
        check, and runs it only to name the leaf when ``update`` refuses. Read by the
        stateful class and ``functional.update``.
    checks_signature : bool
        With ``self_checking``: ``update``'s own check covers any parameters of a shadow
        list it made, not only the very objects it saw last step (jax checks each new
        signature when it traces the update, and jit refuses arrays on other devices), so
        the stateful class skips its per-leaf shape and dtype check for new arrays of a
        known group too, which is what JAX code passes every step. Read by the stateful
        class.
    places_params : bool
        ``update`` takes parameters that live elsewhere than their offloaded shadows
        (``device=``) and brings them over itself, inside its fused call, and
        ``create_shadows`` accepts the target placement: the core then moves no parameter
        with ``to_device`` before calling either. Read by the core's shadow creation and
        update (``_engine.create_shadows``, ``_engine.on_device``).
    """

    mutable_arrays: bool = True
    inplace_update: bool = False
    fused_update: bool = False
    one_device: bool = False
    self_checking: bool = False
    checks_signature: bool = False
    places_params: bool = False


class ShadowList(list):  # type: ignore[type-arg]
    """A flat list of shadows a backend created together, with the backend's notes on them.

    What `Backend.create_shadows` may return (a backend subclasses it to hold its layout);
    public here so that a backend or plugin needs no private emacore module.

    ``backend_data`` lets a backend remember how it laid the shadows out (numpy packs them in
    one buffer) without a lookup per step. ``flatten`` and ``unflatten`` pass the same object
    through, so the notes survive a functional update of a flat list.

    ``views`` is False where reading an item costs a copy (jax slices its packed buffers on
    read): the core then reads ``first()`` and ``specs`` instead of every item, and keeps such
    a list whole in a state of any structure (`ShadowTree`).
    """

    backend_data: Any = None
    views: bool = True
    specs: Any = None  # each shadow's (shape, dtype), where the backend or the core noted them
    noted: tuple[Any, ...] | None = None  # the items when the core noted ``specs``

    def first(self) -> Any:
        """One of the shadow arrays (for its type and placement), reading no other."""
        return self[0]


@runtime_checkable
class Backend(Protocol):
    """Every seam the core calls on a backend: what it gets, what it returns, and when.

    Subclass `emacore.ArrayAPIBackend`: it implements each member portably, so a backend
    overrides only what its library does better and inherits the rest, including members
    added to this protocol later. A backend that implements the protocol without
    subclassing still loads: the registry completes it with the portable default of each
    member it lacks (once, when it loads it). The core calls every member plainly; a
    member whose default does nothing (``check_new``, ``check_assignable``, ``wait``) or
    answers None (``named_leaves``, ``snapshot``, ``flatten_node``) marks an optional
    capability.

    Attributes
    ----------
    name : str
        The backend's registered name, used in every error message about it.
    capabilities : Capabilities
        What the backend can do (see `Capabilities`).
    traces : bool
        Whether the backend's arrays can be placeholders of a trace, so that `is_traced`
        can return True. The core asks `is_traced` of the parameters only when some
        backend among them says so, which spares a call per step to backends whose arrays
        are always concrete. `emacore.ArrayAPIBackend` sets it for each subclass: True
        where the subclass overrides `is_traced`.
    """

    name: str
    capabilities: Capabilities
    traces: bool

    # -- recognising arrays --------------------------------------------------------------

    def owns(self, x: Any) -> bool:
        """Return True if ``x`` is an array this backend handles.

        Called when an array of a new type is first resolved (the answer is cached per
        type), and for every leaf when a backend is forced by name.
        """
        ...

    def namespace(self, x: Any) -> Any:
        """Return the array-API namespace of ``x`` (for the core's portable math on it)."""
        ...

    def device(self, x: Any) -> Any:
        """Return the device ``x`` lives on (None where it is not known, e.g. a tracer's).

        Compared between a parameter and its shadow by the per-step checks, unless
        ``capabilities.one_device``.
        """
        ...

    def scalar_device(self, x: Any) -> Any:
        """Return where a 0-d array that goes with ``x`` should live.

        Called when ``functional.init(..., traceable=True)`` makes its 0-d counters beside
        the first leaf. The portable default is ``device(x)``; jax answers a replicated
        sharding, since a 0-d array cannot take a sharded leaf's partitioning.
        """
        ...

    def is_floating(self, x: Any) -> bool:
        """Return True if ``x`` has a real floating dtype (only those are averaged)."""
        ...

    def is_traced(self, x: Any) -> bool:
        """Return True for a placeholder of a trace (a JAX tracer): no concrete value.

        Asked of one parameter of each type per update, and only where some backend has
        ``traces`` set; a traced parameter turns Python checks on values into traced ones.
        """
        ...

    # -- making shadows ------------------------------------------------------------------

    def create_shadows(
        self, params: Sequence[Any], *, zeros: bool, layout: str = "auto"
    ) -> list[Any]:
        """Return new shadows: detached copies of ``params`` (or zeros), on their devices.

        ``layout`` is ``"auto"`` (the backend chooses), ``"flat"`` (pack the shadows in one
        buffer per dtype and device, so many small tensors cost one kernel) or
        ``"separate"`` (one allocation per shadow). A backend that cannot honour a layout
        raises ``ValueError`` naming itself and the layout. Called once per new group of
        leaves, with all of this backend's new leaves at once, so it can pack them; with
        ``layout="auto"`` the keyword is left out (plugins written before layouts existed).
        A backend with ``capabilities.places_params`` is also given ``device=``, the
        placement of offloaded shadows, and makes them there itself.
        """
        ...

    def check_new(self, params: Sequence[Any], names: Sequence[str]) -> None:
        """Raise ``ValueError`` if these new leaves cannot be tracked together.

        Called with this backend's new leaves (and their names) before any shadow is made;
        the portable default accepts everything. Torch refuses sharded DTensors mixed with
        plain tensors.
        """
        ...

    def placed_like(self, x: Any, like: Any) -> Any:
        """Return the loaded array ``x`` laid out as the shadow ``like`` it replaces.

        Called by ``load_state_dict`` for every loaded shadow and copy, before anything is
        installed; a ``ValueError`` becomes a `emacore.errors.StateDictError` naming the
        leaf. The portable default returns ``x`` as it is; torch moves it to ``like``'s
        device (or shards it as ``like`` is).
        """
        ...

    # -- updating ------------------------------------------------------------------------

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
        With ``exact=True`` (``compat="tensorflow"``) the arithmetic must match
        `reference_update` bit for bit; with ``exact=False`` a backend may use a fused form
        that rounds differently in the last place (torch's one-pass ``lerp``), never a less
        accurate one. Called once per step with all of this backend's leaves of a group,
        after every check has passed.
        """
        ...

    def update_lanes(
        self,
        shadow_lists: Sequence[Sequence[Any]],
        params: Sequence[Any],
        cs: Sequence[Any],
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[list[Any]]:
        """Update several profiles' shadows of the same parameters: one list per profile.

        ``shadow_lists[k]`` moves with coefficient ``cs[k]``, exactly as ``update`` would
        move it. Called by the stateful class with several decays, when every leaf of the
        group belongs to this backend. The portable default calls ``update`` once per
        profile; numpy, torch and jax read the parameters once for all of them.
        """
        ...

    def check_writable(self, shadows: Sequence[Any], names: Sequence[str]) -> None:
        """Raise `emacore.errors.ReadOnlyError` naming any shadow that cannot be written.

        Called before an in-place update writes anything.
        """
        ...

    def all_finite(self, params: Sequence[Any]) -> list[bool]:
        """Return, for each array, whether it holds only finite values.

        Called for the ``nonfinite="skip"``/``"raise"`` guard on concrete parameters,
        before the update. The portable default runs one reduction per array; a backend
        overrides it with one fused call and one device-to-host transfer.
        """
        ...

    def select(self, flag: Any, new: Sequence[Any], old: Sequence[Any]) -> Any:
        """Return ``new`` where the 0-d boolean array ``flag`` is true, else ``old``.

        Called by ``functional.update`` under a trace with ``nonfinite="skip"``, on the
        shadows of a packed layout (a `emacore.ShadowTree` whose list is the backend's);
        the result keeps that layout. The portable default is one ``where`` per array.
        """
        ...

    def scalar_like(self, value: float, x: Any) -> Any:
        """Return ``value`` as a 0-d array of ``x``'s dtype, placed to combine with ``x``.

        Called to divide a shadow by its debias correction: a 0-d array operand keeps the
        division a true one where a compiler would rewrite a division by a constant. The
        portable default makes it on ``x``'s device; jax leaves it uncommitted.
        """
        ...

    # -- evaluation, offloading and checkpoints ------------------------------------------

    def to_host(self, x: Any) -> Any:
        """Return ``x`` as something ``numpy.asarray`` accepts (for checkpoints and tests)."""
        ...

    def from_host(self, host: Any, like: Any, dtype: str | None = None) -> Any:
        """Return the host array ``host`` as an array of this backend, placed as ``like``.

        The way back of `to_host`: ``host`` is a numpy array (or anything ``numpy.asarray``
        accepts, such as what another backend's `to_host` returns), ``like`` an array of this
        backend. The result holds ``host``'s values with ``like``'s dtype, or the dtype
        named by ``dtype`` (``"float32"``, ``"bfloat16"``..., as ``shadow_dtype`` names
        them), on ``like``'s device (sharded as ``like`` is). A checkpoint stores bfloat16
        as float32, so ``host`` may be float32 where the result is bfloat16 (exact). The
        result may share memory with ``host``; the core passes a fresh host array.

        Called by `emacore.load_into` and `emacore.load_state` (``like=``) for every array
        of the file, with the shadow (or parameter) it is loaded for; a ``ValueError`` or
        ``TypeError`` becomes a `emacore.checkpoint.CheckpointError` naming the array. The
        portable default is ``xp.asarray(host, device=device(like))`` cast with
        ``xp.astype``; torch and jax override it to place the array as a sharded ``like`` is.
        """
        ...

    def to_device(self, x: Any, device: Any) -> Any:
        """Return ``x`` on ``device`` (``x`` itself when it is there already).

        Used for offloaded shadows (``device=``): raises ``ValueError`` naming the backend
        for a device it does not have.
        """
        ...

    def assign(self, dst: Any, src: Any) -> None:
        """Write ``src`` into the array ``dst`` in place (for ``copy_to``, ``swapped``, copies).

        Raises `emacore.errors.EMAError` naming the backend where arrays are immutable.
        """
        ...

    def check_assignable(self, arrays: Sequence[Any], names: Sequence[str]) -> None:
        """Raise `emacore.errors.ReadOnlyError` naming an array ``assign`` would fail on.

        Called with every array of this backend that ``copy_to``, ``swapped`` or
        ``restore`` is about to write, before writing any, so that nothing is half-written.
        The portable default accepts everything.
        """
        ...

    # -- framework containers ------------------------------------------------------------

    def named_leaves(self, obj: Any) -> list[tuple[str, Any, str]] | None:
        """Return the arrays of a framework container (a ``torch.nn.Module``), or None.

        Each entry is ``(name, array, kind)`` with kind ``"param"`` (trainable), ``"frozen"``
        (a parameter that does not require grad), ``"buffer"``, or ``"tied"`` (an array
        listed before under another name, e.g. tied embeddings: tracked once, reported under
        both names). ``None`` means ``obj`` is not a container this backend knows. Asked
        only of backends whose array modules are already imported.
        """
        ...

    def snapshot(self, obj: Any) -> tuple[Any, list[Any]] | None:
        """Return a cheap key of a container's arrays and the arrays, or None.

        Called on a container this backend's `named_leaves` knows, each step: an unchanged
        key (and unchanged ``requires_grad`` where the arrays have it) lets ``apply`` skip
        the walk by name. The arrays are those the key describes (torch: every module's
        parameters and buffers, module by module), among them every array `named_leaves`
        lists. The portable default, None, means no snapshot: ``apply`` walks the container.
        """
        ...

    def flatten_node(self, obj: Any) -> tuple[tuple[str, ...], list[Any], Any] | None:
        """Split one level of the framework's own container (a JAX pytree node), or None.

        Returns the children's names, the children, and what rebuilds the node from them;
        None for an object that is a leaf to this backend (the portable default). Asked
        once per type of an object the core's pytree code does not know, only of backends
        whose array modules are already imported.
        """
        ...

    # -- side streams --------------------------------------------------------------------

    def check_side_stream(self, params: Sequence[Any]) -> None:
        """Raise ``ValueError`` unless these parameters can update on a side stream.

        Called for ``side_stream=True`` with the new leaves before any shadow is made, and
        with an empty list to ask only whether the backend has streams at all. The
        portable default refuses: it has none.
        """
        ...

    def use_side_stream(self, shadows: Sequence[Any]) -> Sequence[Any]:
        """Return ``shadows`` set to update on a side stream of their own (idempotent).

        Called once per group of shadows after `check_side_stream` accepted them; the
        result replaces the group's shadows. The portable default refuses, as
        `check_side_stream` does.
        """
        ...

    def wait(self, shadows: Sequence[Any]) -> None:
        """Make the current stream wait for an update of ``shadows`` still running.

        Called with ``side_stream=True`` before anything reads the shadows (averages,
        state dicts, evaluation) or regroups them. The portable default has nothing to
        wait for.
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
