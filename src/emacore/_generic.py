"""The portable backend: any array array-api-compat knows (array-api-strict, dask, cupy...).

It owns every object with ``__array_namespace__`` and every array array-api-compat wraps
(dask, cupy, pydata sparse...) that no dedicated backend claims; asking never imports a
framework. Lazy dask arrays are persisted whenever a shadow is made or updated (`_settled`),
so a shadow is always a few computed chunks: its graph does not grow with the number of
updates, and it holds no reference to the parameters of earlier steps.

Every method is written against the array API standard through ``array-api-compat``. Framework
backends subclass `ArrayAPIBackend` and override only what they do faster; the update
here is the reference kernel applied leaf by leaf, which is what the fast paths are tested
against. `ArrayAPIBackend` implements every member of `emacore.backend.Backend`, each
default giving what the core did before the member was declared; `complete` lends those
defaults to a backend that implements the protocol without subclassing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from emacore._kernel import reference_update
from emacore.backend import Backend, BackendSpec, Capabilities
from emacore.errors import ImmutableArrayError
from emacore.hookspecs import hookimpl

__all__ = ["ArrayAPIBackend", "GENERIC", "complete"]


class ArrayAPIBackend:
    """Backend for any array that implements the Python array API standard.

    Parameters
    ----------
    name : str
        The backend's registered name.
    capabilities : Capabilities, optional
        What the backend can do; the generic backend updates functionally.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> backend = ArrayAPIBackend()
    >>> backend.owns(xp.asarray([1.0]))
    True
    """

    traces = False
    """Standard arrays are concrete; a subclass that overrides `is_traced` traces."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "traces" not in vars(cls):  # declared by the subclass: as it says
            cls.traces = cls.is_traced is not ArrayAPIBackend.is_traced

    def __init__(self, name: str = "array_api", capabilities: Capabilities | None = None) -> None:
        self.name = name
        self.capabilities = capabilities or Capabilities(mutable_arrays=True)

    def __repr__(self) -> str:
        return f"<emacore backend {self.name!r}>"

    def owns(self, x: Any) -> bool:
        """Return True for any array array-api-compat gives a namespace for.

        That is every object with ``__array_namespace__`` and the arrays array-api-compat
        wraps (dask, cupy, pydata sparse...); it looks the type up in ``sys.modules`` and
        never imports a framework to ask.
        """
        import array_api_compat

        return bool(array_api_compat.is_array_api_obj(x))

    def namespace(self, x: Any) -> Any:
        """Return ``x``'s array-API namespace (wrapped by array-api-compat where needed)."""
        import array_api_compat

        return array_api_compat.array_namespace(x)

    def device(self, x: Any) -> Any:
        """Return ``x``'s device."""
        import array_api_compat

        return array_api_compat.device(x)

    def scalar_device(self, x: Any) -> Any:
        """Return ``device(x)``: a 0-d array goes where its leaf is."""
        return self.device(x)

    def is_floating(self, x: Any) -> bool:
        """Return True if ``x`` has a real floating dtype."""
        return bool(self.namespace(x).isdtype(x.dtype, "real floating"))

    def is_traced(self, x: Any) -> bool:
        """Standard arrays are concrete."""
        return False

    def create_shadows(
        self, params: Sequence[Any], *, zeros: bool, layout: str = "auto"
    ) -> list[Any]:
        """Return detached copies (or zeros) of ``params`` on their own devices (separately)."""
        if layout not in ("auto", "separate"):
            raise ValueError(
                f"backend {self.name!r} has no {layout!r} layout: it keeps each shadow "
                "separate (layout='auto' or 'separate')"
            )
        out = []
        for p in params:
            xp = self.namespace(p)
            if zeros:
                out.append(xp.zeros(p.shape, dtype=p.dtype, device=self.device(p)))
            else:
                out.append(xp.asarray(p, copy=True))
        return _settled(out)

    def check_new(self, params: Sequence[Any], names: Sequence[str]) -> None:
        """Accept every new leaf: portable arrays can be tracked together."""

    def placed_like(self, x: Any, like: Any) -> Any:
        """Return ``x`` as it is: its placement is the caller's."""
        return x

    def update(
        self,
        shadows: Sequence[Any],
        params: Sequence[Any],
        c: float,
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[Any]:
        """Return the reference update of every pair (functional: new arrays; always exact)."""
        if hasattr(c, "shape"):  # a traced 0-d coefficient: cast it, or it would promote
            return _settled(
                [
                    reference_update(s, p, self.namespace(s).astype(c, s.dtype))
                    for s, p in zip(shadows, params)
                ]
            )
        return _settled([reference_update(s, p, c) for s, p in zip(shadows, params)])

    def update_lanes(
        self,
        shadow_lists: Sequence[Sequence[Any]],
        params: Sequence[Any],
        cs: Sequence[Any],
        *,
        inplace: bool,
        exact: bool = True,
    ) -> list[list[Any]]:
        """One `update` per profile (the parameters are read once per profile)."""
        return [
            self.update(shadows, params, c, inplace=inplace, exact=exact)
            for shadows, c in zip(shadow_lists, cs)
        ]

    def check_writable(self, shadows: Sequence[Any], names: Sequence[str]) -> None:
        """Nothing to check: the generic backend never writes in place."""

    def all_finite(self, params: Sequence[Any]) -> list[bool]:
        """Whether each array holds only finite values (for the ``nonfinite`` guard).

        One reduction per array here; backends override it with one fused call and a
        single device-to-host transfer.
        """
        out = []
        for p in params:
            xp = self.namespace(p)
            out.append(bool(xp.all(xp.isfinite(p))))
        return out

    def select(self, flag: Any, new: Sequence[Any], old: Sequence[Any]) -> Any:
        """``new`` where ``flag`` is true, else ``old``: one ``where`` per array."""
        return [self.namespace(n).where(flag, n, o) for n, o in zip(new, old)]

    def scalar_like(self, value: float, x: Any) -> Any:
        """``value`` as a 0-d array of ``x``'s dtype on ``x``'s device."""
        return self.namespace(x).asarray(value, dtype=x.dtype, device=self.device(x))

    def to_device(self, x: Any, device: Any) -> Any:
        """Return ``x`` on ``device`` (through the array API's ``to_device``)."""
        import array_api_compat

        if array_api_compat.device(x) == device:
            return x
        try:
            return array_api_compat.to_device(x, device)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"backend {self.name!r} cannot move arrays to {device!r}: {exc}"
            ) from exc

    def assign(self, dst: Any, src: Any) -> None:
        """Write ``src`` into ``dst`` (``dst[...] = src``), cast to ``dst``'s dtype.

        A shadow may be wider than its parameter, and the standard does not cast in a setitem.
        Refused for immutable arrays.
        """
        if not self.capabilities.mutable_arrays:
            raise ImmutableArrayError(
                f"backend {self.name!r}: its arrays are immutable, so averages cannot be "
                "written into them in place (copy_to, swapped, store/restore); use "
                "ema.average(params) and pass the averages on instead"
            )
        src = self.to_device(src, self.device(dst))
        if src.dtype != dst.dtype:
            src = self.namespace(dst).astype(src, dst.dtype)
        dst[...] = src

    def check_assignable(self, arrays: Sequence[Any], names: Sequence[str]) -> None:
        """Nothing to check beyond `assign`'s own refusal of immutable arrays."""

    def named_leaves(self, obj: Any) -> list[tuple[str, Any, str]] | None:
        """The generic backend knows no framework containers."""
        return None

    def snapshot(self, obj: Any) -> tuple[Any, list[Any]] | None:
        """No cheap snapshot: ``apply`` walks a container by name each step."""
        return None

    def flatten_node(self, obj: Any) -> tuple[tuple[str, ...], list[Any], Any] | None:
        """The generic backend knows no framework pytree nodes: everything is a leaf."""
        return None

    def check_side_stream(self, params: Sequence[Any]) -> None:
        """Refuse: the generic backend has no streams."""
        raise ValueError(
            f"side_stream=True: backend {self.name!r} has no streams (torch on CUDA has)"
        )

    def use_side_stream(self, shadows: Sequence[Any]) -> Sequence[Any]:
        """Refuse, as `check_side_stream` does."""
        self.check_side_stream(shadows)
        return shadows

    def wait(self, shadows: Sequence[Any]) -> None:
        """Nothing to wait for: without streams every update has finished."""

    def to_host(self, x: Any) -> Any:
        """Return ``x`` copied to the host as a buffer numpy can read."""
        import array_api_compat

        if array_api_compat.is_dask_array(x):  # no host device to move to: compute it
            lazy: Any = x  # (dask's compute is untyped)
            return lazy.compute()
        if array_api_compat.is_cupy_array(x):  # cupy has no to_device method; compat's does
            return array_api_compat.to_device(x, "cpu")
        if getattr(x, "to_device", None) is None or array_api_compat.is_numpy_array(x):
            return x
        try:
            return x.to_device("cpu")
        except Exception:  # a library without a "cpu" device string (array-api-strict)
            pass
        with contextlib.suppress(Exception):  # its default device, where the host is
            return x.to_device(self.namespace(x).__array_namespace_info__().default_device())
        return x

    def from_host(self, host: Any, like: Any, dtype: str | None = None) -> Any:
        """Return ``host`` as an array of ``like``'s namespace, dtype (or ``dtype``) and device.

        ``xp.asarray`` reads a numpy array through the buffer protocol (or ``__array__``); a
        library whose ``asarray`` refuses it gets it through DLPack. The cast comes after the
        transfer, so a float32 host array becomes bfloat16 in the library that has it.
        """
        import numpy as np  # the host format (checkpoints need it; imported on first load)

        xp = self.namespace(like)
        target = like.dtype
        if dtype is not None:  # by name, through the standard's inspection of the namespace
            target = xp.__array_namespace_info__().dtypes().get(dtype)
            if target is None:
                raise ValueError(f"backend {self.name!r} has no {dtype} arrays")
        host = np.asarray(host)
        device = self.device(like)
        try:
            out = xp.asarray(host, device=device)
        except TypeError:  # an asarray that takes only its own arrays: through DLPack
            out = self.to_device(xp.from_dlpack(host), device)
        if out.dtype != target:
            out = xp.astype(out, target)
        return _settled([out])[0]


def _settled(arrays: list[Any]) -> list[Any]:
    """``arrays`` with every dask array among them persisted (computed, kept as chunks).

    An update of lazy shadows would otherwise stack one more layer of graph on every shadow
    at each step, holding every past parameter alive and recomputing them all when the
    average is read (1,600 graph keys after 100 updates of a 4-chunk array, where a persisted
    shadow keeps 4). The array's own ``persist`` method: the core names no framework module.
    """
    import array_api_compat

    def persisted(x: Any) -> Any:
        if not array_api_compat.is_dask_array(x):
            return x
        lazy: Any = x  # (dask's persist is untyped)
        return lazy.persist()

    return [persisted(x) for x in arrays]


def _members() -> tuple[str, ...]:
    """The members `Backend` declares (its methods and attributes), in its order."""
    attrs = tuple(Backend.__annotations__)
    methods = tuple(n for n, v in vars(Backend).items() if not n.startswith("_") and callable(v))
    return attrs + methods


class _Completed(ArrayAPIBackend):
    """A backend that implements the protocol without subclassing `ArrayAPIBackend`.

    Each member the wrapped backend has is its own (bound to it); each it lacks is the
    portable default, which reaches the wrapped backend's own members through ``self``.
    """

    def __init__(self, backend: Any) -> None:
        self.wrapped = backend
        for member in _MEMBERS:
            # the one tolerant place: the core calls every member without asking
            own = getattr(backend, member, _MISSING)
            if own is not _MISSING:
                setattr(self, member, own)
        if "traces" not in vars(self):
            # is_traced is its own (the protocol asks for it): ask it, as the core always did
            self.traces = True

    def __repr__(self) -> str:
        return f"<emacore backend {self.name!r} ({self.wrapped!r}, completed)>"


_MISSING = object()
_MEMBERS = _members()


def complete(backend: Any) -> Backend:
    """Return ``backend`` with every member of the protocol.

    A subclass of `ArrayAPIBackend` has them all and is returned as it is; another object is
    wrapped so that the members it lacks are the portable defaults. The registry calls this
    once per backend it loads (or is given as an object), and keeps the result.
    """
    if isinstance(backend, ArrayAPIBackend):
        return backend
    return _Completed(backend)


GENERIC = ArrayAPIBackend()


@hookimpl
def emacore_backends() -> list[BackendSpec]:
    """Declare the generic array-API backend."""
    return [
        BackendSpec(
            "array_api",
            (),
            load=lambda: GENERIC,
            description="any array array-api-compat knows (portable, unfused)",
        )
    ]
