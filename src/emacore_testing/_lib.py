"""`Lib`, how the conformance suite makes and reads arrays, and one factory per built-in backend.

A factory imports its array library when it is called, never before: importing this module
costs numpy only (a runtime dependency of emacore), so a third party running the suite for its
own backend never needs torch or jax installed.
"""

from __future__ import annotations

import importlib
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

Host = npt.NDArray[Any]


@dataclass(frozen=True)
class Lib:
    """How the conformance tests make and read arrays of one backend, on one device.

    A third-party backend provides one of these for its arrays, through a ``lib`` fixture, and
    the suite does the rest: every test takes ``lib`` and goes through it to make parameters,
    read averages back and check where they live.

    Attributes
    ----------
    name : str
        Shown in test ids and messages (``"numpy"``, ``"torch"``).
    backend : str
        The emacore backend name the arrays resolve to (``emacore.backends()`` lists them).
    xp : module
        The array namespace the tests compare dtypes and build extra arrays with.
    device : object
        The device every array of ``make`` is placed on. A non-default one, where the library
        has it, checks that emacore keeps an array's placement.
    mutable : bool
        Whether the arrays update in place (numpy, torch) or each update returns new ones
        (jax): the tests that rely on in-place writes skip where this is False.
    make : callable
        ``make(host)``: a new array of this backend from a numpy array (or anything
        ``np.array`` takes), with its dtype and on ``device``. It may call ``pytest.skip``
        for a dtype the backend cannot hold in this run (jax without x64 and float64).
    read : callable
        ``read(x)``: a numpy copy of an array of this backend, wherever it lives.
    dtype : callable
        ``dtype(name)``: the backend's dtype object for a numpy dtype name (``"float32"``).
    device_of : callable
        ``device_of(x)``: the device an array lives on, comparable with ``device``.
    set_value : callable
        ``set_value(x, host)``: writes ``host`` into ``x`` and returns the array to use from
        then on (``x`` itself where the arrays are mutable, a new array where they are not).
    float64 : bool
        Whether the backend holds float64 in this run (False: jax without jax_enable_x64);
        the float64 references are then compared at float32 tolerances.

    Examples
    --------
    >>> import numpy as np
    >>> from emacore_testing import Lib
    >>> mine = Lib(
    ...     name="mine",
    ...     backend="numpy",
    ...     xp=np,
    ...     device="cpu",
    ...     mutable=True,
    ...     make=lambda a: np.array(a, copy=True),
    ...     read=lambda x: np.array(x, copy=True),
    ...     dtype=np.dtype,
    ...     device_of=lambda x: "cpu",
    ...     set_value=lambda x, v: np.copyto(x, v) or x,
    ... )
    >>> mine
    Lib(mine)
    >>> mine.read(mine.set_value(mine.make([0.0, 1.0]), np.array([2.0, 3.0])))
    array([2., 3.])
    """

    name: str
    backend: str
    xp: Any
    device: Any
    mutable: bool
    make: Callable[[Any], Any]
    read: Callable[[Any], Host]
    dtype: Callable[[str], Any]
    device_of: Callable[[Any], Any]
    set_value: Callable[[Any, Host], Any]
    float64: bool = True

    def __repr__(self) -> str:
        return f"Lib({self.name})"


def numpy_lib() -> Lib:
    """The `Lib` of numpy arrays, on the CPU.

    Examples
    --------
    >>> from emacore_testing import numpy_lib
    >>> lib = numpy_lib()
    >>> lib.read(lib.make([1.0, 2.0])), lib.dtype("float32")
    (array([1., 2.]), dtype('float32'))
    """

    def set_value(x: Any, v: Host) -> Any:
        x[...] = v
        return x

    return Lib(
        name="numpy",
        backend="numpy",
        xp=np,
        device="cpu",
        mutable=True,
        make=lambda a: np.array(a, copy=True),
        read=lambda x: np.array(x, copy=True),
        dtype=lambda name: np.dtype(name),
        device_of=lambda x: "cpu",
        set_value=set_value,
    )


def strict_lib() -> Lib:
    """The `Lib` of array-api-strict arrays, on its non-default device ``device1``.

    The portable backend (``"array_api"``) runs the suite through it: a library that has only
    what the array API standard promises, on a device that is not the default one, so that a
    placement emacore dropped shows.

    Examples
    --------
    >>> from emacore_testing import strict_lib
    >>> lib = strict_lib()
    >>> lib.device_of(lib.make([1.0])) == lib.device, lib.backend
    (True, 'array_api')
    """
    xp = importlib.import_module("array_api_strict")
    device = xp.Device("device1")  # a non-default device: placement must be kept
    cpu = xp.__array_namespace_info__().default_device()

    def read(x: Any) -> Host:
        return np.asarray(x.to_device(cpu))

    def set_value(x: Any, v: Host) -> Any:
        x[...] = xp.asarray(v, device=x.device)
        return x

    return Lib(
        name="array_api_strict",
        backend="array_api",
        xp=xp,
        device=device,
        mutable=True,
        make=lambda a: xp.asarray(np.array(a, copy=True), device=device),
        read=read,
        dtype=lambda name: operator.attrgetter(name)(xp),  # xp.float32 by its name
        device_of=lambda x: x.device,
        set_value=set_value,
    )


def torch_lib() -> Lib:
    """The `Lib` of torch tensors, on the CPU.

    Examples
    --------
    >>> import torch
    >>> from emacore_testing import torch_lib
    >>> lib = torch_lib()
    >>> lib.make([1.0, 2.0]).dtype, lib.dtype("float32")
    (torch.float64, torch.float32)
    """
    torch = importlib.import_module("torch")

    def set_value(x: Any, v: Host) -> Any:
        with torch.no_grad():
            x.copy_(torch.from_numpy(np.asarray(v)))
        return x

    return Lib(
        name="torch",
        backend="torch",
        xp=torch,
        device=torch.device("cpu"),
        mutable=True,
        make=lambda a: torch.tensor(np.array(a, copy=True)),
        read=lambda x: x.detach().cpu().numpy().copy(),
        dtype=lambda name: operator.attrgetter(name)(torch),  # torch.float32 by its name
        device_of=lambda x: x.device,
        set_value=set_value,
    )


# jax runs its conformance twice, in separate processes (`nox -s tests(jax)` and
# `tests(jax_x32)`): with jax_enable_x64, for the float64 cases, and without it, as most users
# run. Without x64 jax has no 64-bit dtypes: a test that makes a float64 (or int64) array or
# asks for the float64 dtype skips, saying the x64 process runs it; the rest run in float32.
JAX_X64_ENV = "EMACORE_JAX_X64"
_WIDE = ("float64", "complex128", "int64", "uint64")


def _jax_x64() -> bool:
    flag = os.environ.get(JAX_X64_ENV, "1")
    if flag not in ("0", "1"):
        raise pytest.UsageError(f"{JAX_X64_ENV} must be 0 or 1, got {flag!r}")
    return flag == "1"


def _needs_x64(dtype: str) -> None:
    if dtype in _WIDE and not _jax_x64():
        pytest.skip(f"{dtype} needs jax_enable_x64: the x64 jax session runs this case")


def jax_lib() -> Lib:
    """The `Lib` of jax arrays, on jax's first device; immutable.

    It sets ``jax_enable_x64`` from ``EMACORE_JAX_X64`` (``"1"``, the default, or ``"0"``).
    Without x64, making or asking for a 64-bit dtype skips the test that does, saying that the
    x64 run covers it.

    Examples
    --------
    >>> import jax
    >>> from emacore_testing import jax_lib
    >>> lib = jax_lib()
    >>> import numpy as np
    >>> lib.mutable, lib.read(lib.make(np.array([1.0, 2.0], np.float32))).tolist()
    (False, [1.0, 2.0])
    """
    jax = importlib.import_module("jax")
    jax.config.update("jax_enable_x64", _jax_x64())
    jnp = importlib.import_module("jax.numpy")
    device = jax.devices()[0]

    def make(a: Any) -> Any:
        host = np.array(a, copy=True)
        _needs_x64(host.dtype.name)
        return jnp.asarray(host)

    def dtype(name: str) -> Any:
        _needs_x64(np.dtype(name).name)
        return jnp.dtype(name)

    return Lib(
        name="jax",
        backend="jax",
        xp=jnp,
        device=device,
        mutable=False,
        make=make,
        read=lambda x: np.array(x, copy=True),
        dtype=dtype,
        device_of=lambda x: next(iter(x.devices())),
        set_value=lambda x, v: jnp.asarray(np.asarray(v), dtype=x.dtype),  # a new array
        float64=_jax_x64(),
    )


BUILTIN_LIBS: dict[str, Callable[[], Lib]] = {
    "numpy": numpy_lib,
    "array_api_strict": strict_lib,
    "torch": torch_lib,
    "jax": jax_lib,
}
"""The factory of each built-in backend's `Lib`, by the name ``EMACORE_TEST_BACKENDS`` uses."""
