"""``ExponentialMovingAverage``: TensorFlow's stateful API, a thin façade over ``functional``.

Leaves are identified by the rules of DESIGN.md §5. A *group* is a set of leaves updated
together since they were created, so they share one `EMAState` (count, decay product,
latest decay); the common training loop has one group and pays for one dictionary lookup per
step. ``apply`` validates everything (decay, shapes, dtypes, devices, writability) before it
touches any shadow, so an update happens for every leaf or for none.
"""

from __future__ import annotations

import contextlib
import fnmatch
import operator
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emacore import _engine, _plugins, _pytree
from emacore._debias import COMPAT_MODES, coefficient
from emacore._precision import dtype_label
from emacore._state import EMAState
from emacore._state_dict import (
    _IDENTITY,
    _NAME,
    _POSITION,
    STATE_FORMAT,
    STATE_VERSION,
    LoadResult,
    parse_copies,
    parse_leaves,
)
from emacore.backend import Backend
from emacore.errors import (
    EMAError,
    EMAWarning,
    ImmutableArrayError,
    LeafMismatchError,
    NonFiniteError,
    StateDictError,
    StructureError,
)
from emacore.schedules import Schedule, TFRamp, as_schedule, check_decay

__all__ = ["EMA", "ExponentialMovingAverage", "LoadResult"]

_ROLES = ("copy", "average", "skip")
_SHADOW_DTYPE_NAMES = ("same", "float16", "bfloat16", "float32", "float64")


def _name_filter(
    option: str, spec: str | Sequence[str] | Callable[[str], bool] | None
) -> Callable[[str], bool] | None:
    """Turn an include/exclude spec into a predicate on leaf names."""
    if spec is None:
        return None
    if isinstance(spec, str):
        pattern = spec
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    if callable(spec):
        return spec
    patterns = list(spec)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{option} must be a glob pattern, a sequence of patterns or a predicate, got {spec!r}"
        )
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class _Group:
    """Leaves created and updated together: one state, one backend call per step.

    ``state`` is the first decay profile's; ``extra`` holds the other profiles' states (same
    leaves, same count, their own shadows and decay products), updated in the same call.
    """

    names: tuple[str, ...]
    state: EMAState
    backends: list[Backend]
    extra: list[EMAState] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {nm: i for i, nm in enumerate(self.names)}
        # shadows never change shape or dtype: keep them for the per-step checks
        specs = getattr(self.state.shadow, "specs", None)  # a backend's layout may know them
        self.specs = (
            list(specs) if specs is not None else [(s.shape, s.dtype) for s in self.state.shadow]
        )
        one = bool(self.backends) and self.backends.count(self.backends[0]) == len(self.backends)
        self.single: Backend | None = self.backends[0] if one else None
        caps = self.single.capabilities if self.single is not None else None
        self.self_checking = caps is not None and caps.self_checking
        self.checks_signature = self.self_checking and caps is not None and caps.checks_signature
        self.all_idx = list(range(len(self.names)))

    def position(self, name: str) -> int:
        return self._index[name]

    @property
    def lanes(self) -> list[EMAState]:
        """Every profile's state, the first profile's first."""
        return [self.state, *self.extra]

    def sub(self, idx: Sequence[int]) -> _Group:
        """The group of the leaves at ``idx`` (every profile's shadows and counters)."""
        lanes = [lane.replace(shadow=[lane.shadow[i] for i in idx]) for lane in self.lanes]
        return _Group(
            tuple(self.names[i] for i in idx), lanes[0], [self.backends[i] for i in idx], lanes[1:]
        )


def _weak(x: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(x)
    except TypeError:  # not weak-referenceable: hold it (ids of live objects are never reused)
        return lambda: x


def _spec_of(schedule: Any) -> Any:
    spec = getattr(schedule, "spec", None)
    return spec() if spec is not None else repr(schedule)


def _one_profile(decay: Any, num_updates: Any) -> Schedule:
    if isinstance(decay, bool):
        raise TypeError(f"decay must be a number or a schedule, got {decay!r}")
    if callable(decay):
        schedule: Schedule = decay
        return schedule
    number = check_decay(decay)
    return TFRamp(number) if num_updates is not None else as_schedule(number)


def _profiles(decay: Any, num_updates: Any) -> tuple[tuple[str, ...], list[Schedule]]:
    """The profiles' names and schedules: ``("",)`` and one schedule for a single decay."""
    if isinstance(decay, Mapping):
        items = list(decay.items())
        for key, _ in items:
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(
                    f"decay profile names must be non-empty strings without '/', got {key!r}"
                )
    elif isinstance(decay, (tuple, list)):
        items = [(None, d) for d in decay]
    else:
        return ("",), [_one_profile(decay, num_updates)]
    if not items:
        raise ValueError("decay: a tuple, list or dict of decays needs at least one profile")
    names, schedules = [], []
    for i, (name, d) in enumerate(items):
        schedules.append(_one_profile(d, num_updates))
        names.append(
            name if name is not None else (f"profile_{i}" if callable(d) else repr(float(d)))
        )
    if len(set(names)) != len(names):
        raise ValueError(f"decay profiles must have distinct names, got {names}")
    return tuple(names), schedules


@dataclass
class _ModuleCache:
    """What ``apply(model)`` found last time, to skip the walk by name while nothing changed.

    Positions, not tensors: the cache must not keep a deleted model's tensors alive. With a
    backend ``snapshot`` (torch: the ids of every module's tensors, in order, and the roles'
    inputs), a step that finds the same snapshot skips ``named_leaves`` too.
    """

    module: int
    fingerprint: Any
    avg_idx: list[int]
    group: _Group | None
    copy_idx: list[int]
    copy_names: list[str]
    copy_backends: list[Backend]
    snapshot: Callable[[Any], tuple[Any, list[Any]] | None] | None = None
    snap_key: Any = None
    snap_avg: list[int] = field(default_factory=list)
    snap_copy: list[int] = field(default_factory=list)
    snap_watch: list[int] = field(default_factory=list)  # tensors whose role could change
    snap_grads: list[bool] = field(default_factory=list)  # their requires_grad then


class _Skipped(Exception):  # noqa: N818 (control flow, not an error)
    """Internal: ``nonfinite="skip"`` abandons this apply before anything changed."""


def _check_loaded(name: str, what: str, loaded: Any, current: Any) -> None:
    """Raise StateDictError unless a loaded array has the shape and dtype it replaces.

    Else every later apply would be refused, or a copy would change its type.
    """
    if tuple(loaded.shape) != tuple(current.shape):
        raise StateDictError(
            f"leaf {name!r}: state dict {what} shape {tuple(loaded.shape)} does not match the "
            f"tracked one's {tuple(current.shape)}"
        )
    got, want = dtype_label(loaded.dtype), dtype_label(current.dtype)
    if got != want:
        raise StateDictError(
            f"leaf {name!r}: state dict {what} dtype {got} does not match the tracked one's {want}"
        )


class ExponentialMovingAverage:
    """Maintain moving averages of variables with exponential decay, as TensorFlow does.

    Parameters
    ----------
    decay : float, Schedule, or a tuple/list/dict of them
        The decay in [0, 1], typically close to 1 (0.999, 0.9999); or a schedule, a callable of
        the step (see `emacore.schedules`). Several (``(0.999, 0.9999)``, or a dict naming
        them) keep one shadow per decay profile, updated in the same call: see `profiles`.
    num_updates : int, 0-d array, callable or None
        TF's optional update counter. When given, the decay used by each ``apply`` is
        ``min(decay, (1 + n) / (10 + n))`` with ``n`` its value *at that apply*. Pass a 0-d
        array you mutate (``n[...] = step``, ``n.fill_(step)``) or a zero-argument callable
        (``lambda: trainer.step``); a plain int is a constant.
    zero_debias : bool
        Start shadows at zero and report averages divided by the bias correction.
        The default correction is the exact ``1 - Π d_i``; ``compat="tensorflow"`` uses TF's.
    name : str
        Suffix of the averages' names: ``average_name(v) == "<v's name>/<name>"``.
    compat : {"default", "tensorflow"}
        ``"tensorflow"`` reproduces TF 2 bit for bit (float32 decay, TF's debias formula).
    backend : str, optional
        Force a backend by name instead of resolving it from each array's type.
    shadow_dtype : None, "same", or a floating dtype (or its name, ``"float64"``)
        The shadows' dtype. None (default): float32 for 16-bit float parameters (bfloat16,
        float16), whose own precision cannot hold a slow average (a bfloat16 shadow with
        decay 0.999 never moves), and the parameter's dtype otherwise; with
        ``compat="tensorflow"`` always the parameter's, as TF does. ``"same"``: the
        parameter's. A dtype: that one for every leaf (it must hold the parameter exactly).
    exact : bool, optional
        Compute every update in the reference order ``s - (s - x) * (1 - d)``, so all
        backends (and TF's kernel, torch_ema's and diffusers' per-tensor paths) give the same
        bits. Default: only with ``compat="tensorflow"``; otherwise a backend may use a
        faster one-pass form (torch's fused ``lerp``) that rounds differently in the last
        place. numpy and the portable backend always compute in the reference order.
    layout : {"auto", "flat", "separate"}
        How shadows are laid out in memory: ``"flat"`` packs them into one buffer per dtype
        and device, so thousands of small tensors update in one kernel; ``"separate"``
        allocates each. ``"auto"`` (default) lets the backend choose (numpy and torch pack
        tensors under 65,536 elements). The portable backend only has ``"separate"`` and
        raises ``ValueError`` for ``"flat"``.
    device : optional
        Keep every shadow on this device instead of its parameter's: ``device="cpu"`` offloads
        the shadows of GPU parameters to host memory (pinned, for torch), and every update
        first copies the parameters there. None (default): each shadow lives with its
        parameter. A backend without that device raises ``ValueError`` naming itself.
    buffers : {"copy", "average", "skip"}
        What ``apply(module)`` does with a module's floating buffers (BatchNorm's running
        statistics): copy their current value into the averaged model (the default, as
        torch's ``AveragedModel`` keeps them current), average them like parameters (timm's
        choice), or leave them out. Integer buffers (``num_batches_tracked``) are copied,
        never averaged or truncated (or left out with ``"skip"``).
    frozen : {"copy", "average", "skip"}
        What ``apply(module)`` does with parameters that do not require grad. Copying (the
        default) gives the same result as averaging a parameter that never changes, for free.
    side_stream : bool
        torch on CUDA: queue each update on a side stream of its own, so it overlaps the
        next forward pass. Reading the averages (``average``, ``copy_to``, ``swapped``,
        ``state_dict``), the next update and any ``torch.optim`` optimizer step first wait
        for it (a wait queued on the device, not a host synchronisation). Other backends,
        and parameters not on one CUDA device, raise ``ValueError`` naming the backend. One
        decay profile only.
    nonfinite : {"ignore", "skip", "raise"}
        What ``apply`` does when a parameter (or a floating buffer or frozen parameter it
        copies) holds NaN or infinity, decided for the whole update: ``"skip"`` leaves every
        shadow, copy and counter as it was (counted in
        `skipped_updates`, the leaves named in `last_nonfinite`, and an `EMAWarning` the
        first time), ``"raise"`` raises `emacore.errors.NonFiniteError` naming the leaves,
        before anything changes. ``"ignore"`` (default) does not look: the check reads
        every parameter once more and waits for the device.
    update_every : int
        Update on the first ``apply`` and then on every ``update_every``-th call only, with
        the decay raised to ``decay ** update_every`` so the average decays as if every
        step had been applied (ema-pytorch's ``update_every``, compensated). The calls in
        between return at once, without looking at the arrays (so ``average(array)`` knows
        the arrays of the last update; containers are looked up by name). The schedule
        sees the number of updates made (pass ``num_updates`` to schedule by training step).
    include, exclude : str, sequence of str, or callable, optional
        Select leaves by name (key path or parameter name): a glob pattern (``"encoder.*"``),
        several, or a predicate ``name -> bool``. A leaf is tracked if it matches ``include``
        (default: all) and not ``exclude``. Applies to modules and named containers; arrays
        in a plain list have no name to match and are always tracked.

    Examples
    --------
    The TensorFlow documentation's example, on numpy:

    >>> import numpy as np
    >>> import emacore
    >>> v = np.zeros((), np.float32)
    >>> step = np.zeros((), np.int64)
    >>> ema = emacore.ExponentialMovingAverage(0.99, num_updates=step)
    >>> ema.apply([v]); float(ema.average(v))
    0.0
    >>> v[...] = 5.0; ema.apply([v]); float(ema.average(v))
    4.5
    >>> step[...] = 10_000; v[...] = 10.0; ema.apply([v]); round(float(ema.average(v)), 5)
    4.555
    """

    def __init__(  # noqa: C901, PLR0912, PLR0915 - each of 17 options refused by name; to split in issue 13 item 1
        self,
        decay: float | Schedule | Sequence[float | Schedule] | Mapping[str, float | Schedule],
        num_updates: Any = None,
        zero_debias: bool = False,
        name: str = "ExponentialMovingAverage",
        *,
        compat: str = "default",
        backend: str | None = None,
        shadow_dtype: Any = None,
        exact: bool | None = None,
        layout: str = "auto",
        device: Any = None,
        buffers: str = "copy",
        frozen: str = "copy",
        include: str | Sequence[str] | Callable[[str], bool] | None = None,
        exclude: str | Sequence[str] | Callable[[str], bool] | None = None,
        update_every: int = 1,
        nonfinite: str = "ignore",
        side_stream: bool = False,
    ) -> None:
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self._profiles, self._schedules = _profiles(decay, num_updates)
        self._schedule: Schedule = self._schedules[0]
        self._lane = 0  # the profile that reads (average, copy_to...) report; see profile()
        if isinstance(num_updates, (bool, str)):
            raise TypeError(
                "num_updates must be None, an int, a 0-d array or a zero-argument callable, "
                f"got {num_updates!r}"
            )
        self._decay = decay
        self._num_updates = num_updates
        self._zero_debias = bool(zero_debias)
        self._name = name
        self._compat = compat
        self._backend_name = backend
        if backend is not None:
            _engine.resolve_backends([], [], backend)  # fails now on an unknown name
        self._groups: dict[tuple[str, ...], _Group] = {}
        self._where: dict[str, _Group] = {}
        self._kinds: dict[str, str] = {}
        self._order: list[str] = []
        self._by_id: dict[int, str] = {}
        self._refs: dict[str, Callable[[], Any]] = {}
        self._by_pos: dict[int, str] = {}
        self._positions: dict[str, int] = {}
        self._seen: dict[str, Callable[[], Any]] = {}
        self._orphans: set[str] = set()
        self._pending: list[str] = []
        self._counter = 0
        self._fast: dict[tuple[int, ...], tuple[_Group]] = {}
        for option, value in (("buffers", buffers), ("frozen", frozen)):
            if value not in _ROLES:
                raise ValueError(f"{option} must be one of {_ROLES}, got {value!r}")
        self._buffers, self._frozen = buffers, frozen
        if isinstance(shadow_dtype, bool) or (
            isinstance(shadow_dtype, str) and shadow_dtype not in _SHADOW_DTYPE_NAMES
        ):
            raise ValueError(
                f"shadow_dtype must be None, one of {_SHADOW_DTYPE_NAMES} or a dtype, got "
                f"{shadow_dtype!r}"
            )
        self._shadow_dtype = shadow_dtype
        if exact is not None and not isinstance(exact, bool):
            raise TypeError(f"exact must be None, True or False, got {exact!r}")
        self._exact = compat == "tensorflow" if exact is None else exact
        if layout not in ("auto", "flat", "separate"):
            raise ValueError(f"layout must be 'auto', 'flat' or 'separate', got {layout!r}")
        self._layout = layout
        self._device = device
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        if update_every > 1 and compat == "tensorflow":
            raise ValueError(
                "update_every has no TensorFlow equivalent: use compat='default' with it"
            )
        if nonfinite not in _engine.NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {_engine.NONFINITE_POLICIES}, got {nonfinite!r}"
            )
        self._nonfinite = nonfinite
        if not isinstance(side_stream, bool):
            raise TypeError(f"side_stream must be True or False, got {side_stream!r}")
        if side_stream and len(self._schedules) > 1:
            raise ValueError("side_stream supports one decay profile, not several")
        if side_stream and device is not None:
            raise ValueError("side_stream=True keeps shadows on their parameters' GPU: no device")
        self._side_stream = side_stream
        self.skipped_updates = 0
        """How many updates ``nonfinite="skip"`` skipped."""
        self.last_nonfinite: list[str] = []
        """The leaves that held NaN or infinity at the last update that found any."""
        self._every = update_every
        self._calls = 0
        self._dt: Any = None  # this apply's time step (None: one step)
        self._include = _name_filter("include", include)
        self._exclude = _name_filter("exclude", exclude)
        self._copies: dict[str, tuple[Any, Backend]] = {}
        self._stored: list[tuple[Any, Any, Backend]] | None = None
        self._module_ref: Callable[[], Any] | None = None
        self._module_cache: _ModuleCache | None = None
        self._module_names: set[str] | None = None

    # -- TF's read-only attributes -------------------------------------------------------

    @property
    def decay(
        self,
    ) -> float | Schedule | Sequence[float | Schedule] | Mapping[str, float | Schedule]:
        """The decay given to the constructor."""
        return self._decay

    @property
    def name(self) -> str:
        """The name of this EMA, the suffix of every average's name."""
        return self._name

    @property
    def zero_debias(self) -> bool:
        """Whether shadows start at zero and averages are bias-corrected."""
        return self._zero_debias

    @property
    def compat(self) -> str:
        """``"default"`` or ``"tensorflow"``."""
        return self._compat

    @property
    def profiles(self) -> tuple[str, ...]:
        """The names of the decay profiles (``()`` for a single decay).

        ``decay=(0.999, 0.9999)`` keeps two shadows of every leaf, named ``"0.999"`` and
        ``"0.9999"``; a dict names them (``{"fast": 0.999, "slow": 0.9999}``); a schedule in a
        tuple is named ``"profile_<i>"``.
        """
        return () if self._profiles == ("",) else self._profiles

    def profile(self, name: str) -> EMAProfile:
        """One profile's averages: ``ema.profile("slow").average(params)``.

        The EMA's own reading methods (`average`, `copy_to`...) report the first profile.

        Examples
        --------
        >>> import numpy as np
        >>> ema = ExponentialMovingAverage({"fast": 0.5, "slow": 0.75})
        >>> w = np.zeros(1); ema.apply([w]); w[...] = 4.0; ema.apply([w])
        >>> ema.average(w), ema.profile("slow").average(w)
        (array([2.]), array([1.]))
        """
        if name not in self.profiles:
            raise KeyError(f"no decay profile {name!r}; this EMA has {list(self.profiles)}")
        return EMAProfile(self, self._profiles.index(name))

    @contextlib.contextmanager
    def _reading(self, lane: int) -> Iterator[None]:
        previous, self._lane = self._lane, lane
        try:
            yield
        finally:
            self._lane = previous

    def _suffix(self) -> str:
        return "" if self._profiles == ("",) else f"/{self._profiles[self._lane]}"

    def __repr__(self) -> str:
        return (
            f"ExponentialMovingAverage(decay={self._decay!r}, num_updates="
            f"{self._num_updates!r}, zero_debias={self._zero_debias}, name={self._name!r}, "
            f"compat={self._compat!r}) tracking {len(self._where)} leaves"
        )

    # -- apply ---------------------------------------------------------------------------

    def apply(self, var_list: Any, *, dt: float | None = None) -> None:
        """Create shadows for new leaves, then update every leaf's shadow.

        Parameters
        ----------
        var_list : array, list, tuple, dict or nested pytree of arrays
            The current parameters. A plain list/tuple of mutable arrays (numpy, torch) is
            tracked by array identity, as TF tracks variables; immutable arrays (JAX) in a plain
            list by position; leaves in a dict or nested container by their key path.
        dt : float, optional
            Steps (or time, in the schedule's unit) since the last update, for irregular
            updates: the decay becomes ``decay ** dt``, pandas' ``ewm(times=...)`` (default:
            one step, or ``update_every``).

        Raises
        ------
        LeafMismatchError, LeafDTypeError, DecayError, ReadOnlyError, UnknownBackendError
            Before any shadow changes.

        Examples
        --------
        >>> import numpy as np
        >>> ema = ExponentialMovingAverage(0.5)
        >>> params = {"w": np.ones(2)}
        >>> ema.apply(params)
        >>> params["w"] = params["w"] * 3  # rebinding is fine: leaves are keyed by name
        >>> ema.apply(params); ema.average(params)["w"]
        array([2., 2.])
        """
        if var_list is None:
            raise TypeError("apply() needs the variables to average (an array or a container)")
        if self._every > 1:
            self._calls += 1
            if (self._calls - 1) % self._every:
                return  # between updates
            if dt is None:
                dt = self._every
        self._dt = dt
        try:
            self._apply(var_list)
        except _Skipped:
            pass  # nonfinite="skip": nothing changed, and that was counted
        except BaseException:
            if self._every > 1:
                self._calls -= 1  # refused: the retry is this update, not the next call
            raise
        finally:
            self._dt = None

    def _apply(self, var_list: Any) -> None:  # noqa: C901, PLR0912 - four ways in, fastest first; to split in issue 13 item 1
        if type(var_list) in (list, tuple):
            # The training loop's case: the same arrays, updated in place, every step. Their
            # ids identify the group with no flattening, type or name lookups; the cache is
            # cleared whenever a tracked array dies (its id may be reused) or groups change.
            ids = tuple(map(id, var_list))
            hit = self._fast.get(ids)
            if hit is not None:
                self._update(hit[0], var_list, hit[0].backends, True, group=hit[0])
                return
        cached = self._module_cache
        if cached is not None and cached.snapshot is not None and id(var_list) == cached.module:
            # the same model, its tensors and their roles unchanged (the backend's cheap
            # snapshot says so): no walk by name
            snap = cached.snapshot(var_list)
            tensors = snap[1] if snap is not None else []
            if (
                snap is not None
                and snap[0] == cached.snap_key
                and [tensors[i].requires_grad for i in cached.snap_watch] == cached.snap_grads
            ):
                avg = [tensors[i] for i in cached.snap_avg]
                self._apply_cached(cached, avg, [tensors[i] for i in cached.snap_copy])
                return
        module = self._module_entries(var_list)
        if module is not None:
            self._apply_module(var_list, module)
            return
        leaves, treedef = _pytree.flatten(var_list)
        if not leaves:
            return
        flat = treedef == _pytree.LEAF or (
            treedef[0] in ("list", "tuple") and treedef[1] == (_pytree.LEAF,) * len(leaves)
        )
        forced_names = [f"#{i}" for i in range(len(leaves))] if self._backend_name else []
        backends = _engine.resolve_backends(leaves, forced_names, self._backend_name)
        traced = _engine.first_traced(leaves, backends)
        if traced is not None:
            raise TypeError(
                f"apply() got a traced array ({type(leaves[traced]).__qualname__}): the stateful "
                "EMA keeps concrete shadows between steps and cannot run inside jit/grad/scan. "
                "Inside a traced function use emacore.functional.init/update/average, which "
                "are pure"
            )
        all_mutable = backends.count(backends[0]) == len(backends) and bool(
            backends[0].capabilities.mutable_arrays
        )
        if not flat:
            names = list(_pytree.leaf_names(treedef))
            if self._include is not None or self._exclude is not None:
                keep = [i for i, nm in enumerate(names) if self._keep(nm)]
                names = [names[i] for i in keep]
                leaves = [leaves[i] for i in keep]
                backends = [backends[i] for i in keep]
                if not leaves:
                    return
        elif all_mutable:
            lookup: Callable[[int], Any] = self._by_id.get
            names = list(map(lookup, map(id, leaves)))  # None: new (named at commit)
        else:
            names = self._flat_names(leaves, backends)
        names = self._update(names, leaves, backends, flat)
        if (
            flat
            and all_mutable
            and type(var_list) in (list, tuple)
            and tuple(names) in self._groups
        ):
            self._fast[ids] = (self._groups[tuple(names)],)
        if not flat:
            self._remember(names, leaves)
        elif not all_mutable:
            positional = [i for i, nm in enumerate(names) if self._kinds[nm] == _POSITION]
            self._remember([names[i] for i in positional], [leaves[i] for i in positional])

    def _keep(self, name: str) -> bool:
        """Whether the include/exclude filters track the leaf ``name``."""
        if self._include is not None and not self._include(name):
            return False
        return self._exclude is None or not self._exclude(name)

    def _module_entries(self, obj: Any) -> list[tuple[str, Any, str]] | None:
        """The named arrays of a framework container (``nn.Module``), or None."""
        if obj is None or isinstance(obj, (dict, list, tuple)):
            return None
        if hasattr(obj, "__array_namespace__"):
            return None
        backend = _plugins.get_registry().container_backend(obj)
        return None if backend is None else backend.named_leaves(obj)

    def _module_roles(
        self, entries: list[tuple[str, Any, str]]
    ) -> tuple[list[str], list[Any], list[str], list[Any]]:
        """Split a module's arrays into (averaged names, arrays, copied names, arrays)."""
        registry = _plugins.get_registry()
        avg_names, avg, copy_names, copies = [], [], [], []
        for name, x, kind in entries:
            if kind == "tied" or not self._keep(name):
                continue  # a tied weight is tracked under its first name
            role = {"buffer": self._buffers, "frozen": self._frozen}.get(kind, "average")
            if role == "average" and not registry.resolve(x).is_floating(x):
                role = "copy"  # integer buffers: copied, never averaged or truncated
            if name in self._where:
                role = "average"  # averaged once, averaged for good: its history is kept
            if role == "average":
                avg_names.append(name)
                avg.append(x)
            elif role == "copy":
                copy_names.append(name)
                copies.append(x)
        return avg_names, avg, copy_names, copies

    def _apply_module(self, module: Any, entries: list[tuple[str, Any, str]]) -> None:
        # The training loop's case: the same tensors (same roles) as the last step. Then the
        # roles, names and group are known and the backend's own pre-write checks suffice;
        # the cache is cleared with the id cache (a tracked array died, groups changed).
        fingerprint = (
            id(module),
            tuple([id(x) for _, x, _ in entries]),
            tuple([kind for _, _, kind in entries]),
        )
        cached = self._module_cache
        if cached is not None and cached.fingerprint == fingerprint:
            # indices, not tensors: the cache must not keep a deleted model's tensors alive
            avg = [entries[i][1] for i in cached.avg_idx]
            self._apply_cached(cached, avg, [entries[i][1] for i in cached.copy_idx])
            return
        avg_names, avg, copy_names, copies = self._module_roles(entries)
        self._check_module(module, set(avg_names) | set(copy_names))
        copy_backends = _engine.resolve_backends(copies, copy_names, self._backend_name)
        self._check_copies(copy_names, copies, copy_backends)  # before any write
        group = None
        if avg:
            backends = _engine.resolve_backends(avg, avg_names, self._backend_name)
            self._update(avg_names, avg, backends, False)
            self._remember(avg_names, avg)
            group = self._groups.get(tuple(avg_names))
            # a frozen (copied) parameter made trainable is averaged from now on, starting
            # from its current value, as any new leaf
            for nm in avg_names:
                self._copies.pop(nm, None)
        self._commit_copies(copy_names, copies, copy_backends)
        self._remember(copy_names, copies)
        self._module_ref = _weak(module)
        self._module_names = set(avg_names) | set(copy_names)
        if group is not None or not avg:
            position = {id(x): i for i, (_, x, kind) in enumerate(entries) if kind != "tied"}
            cache = _ModuleCache(
                id(module),
                fingerprint,
                [position[id(x)] for x in avg],
                group,
                [position[id(x)] for x in copies],
                copy_names,
                copy_backends,
            )
            backend = _plugins.get_registry().container_backend(module)
            snap = backend.snapshot(module) if backend is not None else None
            if backend is not None and snap is not None:
                cache.snapshot = backend.snapshot
                cache.snap_key, tensors = snap
                at: dict[int, int] = {}
                for i, t in enumerate(tensors):
                    at.setdefault(id(t), i)
                cache.snap_avg = [at[id(x)] for x in avg]
                cache.snap_copy = [at[id(x)] for x in copies]
                # a tensor that is not averaged may change role when its requires_grad
                # does (a frozen parameter made trainable); an averaged one stays averaged
                averaged = set(cache.snap_avg)
                cache.snap_watch = [
                    i
                    for i, t in enumerate(tensors)
                    if i not in averaged and t is not None and hasattr(t, "requires_grad")
                ]
                cache.snap_grads = [tensors[i].requires_grad for i in cache.snap_watch]
            self._module_cache = cache

    def _apply_cached(self, cached: _ModuleCache, avg: list[Any], copies: list[Any]) -> None:
        """The training loop's step on a known model: update its group, refresh its copies."""
        self._check_copies(cached.copy_names, copies, cached.copy_backends)
        group = cached.group
        if group is not None:
            self._update(group.names, avg, group.backends, False, group=group)
        self._commit_copies(cached.copy_names, copies, cached.copy_backends)

    def _check_module(self, module: Any, names: set[str]) -> None:
        """One EMA tracks one model, whose parameters and buffers must not change."""
        bound = self._module_ref() if self._module_ref is not None else None
        if bound is not None and bound is not module:
            raise StructureError(
                f"this EMA tracks a {type(bound).__qualname__} object and was given another "
                f"object ({type(module).__qualname__}); their parameter names would collide. "
                "Use one EMA per model, or apply their common parent"
            )
        if self._module_names is not None and names != self._module_names:
            missing = sorted(self._module_names - names)
            new = sorted(names - self._module_names)
            raise StructureError(
                f"the module's tracked parameters and buffers changed since the first apply(): "
                f"missing {missing[:10]}, new {new[:10]}. Create a new EMA for the new model "
                "(load_state_dict(..., strict=False) carries over the leaves that remain)"
            )

    def _check_copies(self, names: list[str], arrays: list[Any], backends: list[Backend]) -> None:
        old = [i for i, nm in enumerate(names) if nm in self._copies]
        clash = [nm for nm in names if nm in self._where]
        if clash:
            raise StructureError(
                f"leaves {clash[:10]} are averaged already and cannot become copies (their "
                "dtype or the buffers/frozen policy changed)"
            )
        if old:
            _engine.check_pairs(
                [names[i] for i in old],
                [self._copies[names[i]][0] for i in old],
                [arrays[i] for i in old],
                [self._copies[names[i]][1] for i in old],
                [backends[i] for i in old],
                check_devices=self._device is None,
            )
        if self._nonfinite != "ignore":
            # a copied buffer or frozen parameter holding NaN is refused (or skipped) with the
            # averaged leaves: the update happens for every leaf or for none
            floating = [i for i, (x, b) in enumerate(zip(arrays, backends)) if b.is_floating(x)]
            if floating:
                self._guard_nonfinite(
                    [names[i] for i in floating],
                    [arrays[i] for i in floating],
                    [backends[i] for i in floating],
                )

    def _commit_copies(self, names: list[str], arrays: list[Any], backends: list[Backend]) -> None:
        for nm, x, b in zip(names, arrays, backends):
            rec = self._copies.get(nm)
            if rec is not None and b.capabilities.mutable_arrays:
                b.assign(rec[0], x)
                continue
            made = _engine.create_shadows([x], [b], zeros=False, device=self._device)
            self._copies[nm] = (made[0], b)
            if rec is None:
                self._kinds[nm] = _NAME
                self._order.append(nm)

    def _flat_names(self, leaves: Sequence[Any], backends: Sequence[Backend]) -> list[Any]:
        """Names of a flat list's leaves; ``None`` where a leaf is new (named at commit)."""
        names: list[Any] = []
        by_id, by_pos = self._by_id, self._by_pos
        for i, (x, b) in enumerate(zip(leaves, backends)):
            names.append(by_id.get(id(x)) if b.capabilities.mutable_arrays else by_pos.get(i, None))
        return names

    def _read_num_updates(self) -> float | int | None:
        n = self._num_updates
        if n is None:
            return None
        if callable(n) and not hasattr(n, "shape"):
            n = n()
        shape = getattr(n, "shape", ())
        if tuple(shape) != ():
            raise ValueError(f"num_updates must be a scalar (0-d), got an array of shape {shape}")
        try:
            value: float | int = operator.index(n)
        except TypeError:
            try:
                value = float(n)
            except (TypeError, ValueError):
                raise TypeError(f"num_updates must be a real number, got {n!r}") from None
            if value.is_integer():
                value = int(value)
        return value

    def _shadow_of(self, name: str, lane: int = 0) -> tuple[Any, Backend]:
        group = self._where[name]
        i = group.position(name)
        state = group.state if lane == 0 else group.extra[lane - 1]
        return state.shadow[i], group.backends[i]

    def _update(  # noqa: C901, PLR0912, PLR0915 - the façade's own update; to split in the engine restructure (issue 13 item 1)
        self,
        names: Any,
        leaves: Sequence[Any],
        backends: Sequence[Backend],
        flat: bool,
        group: _Group | None = None,
    ) -> list[str]:
        fast = group is not None
        if group is None:
            key = tuple(names)
            group = self._groups.get(key) if None not in key else None
        else:
            names = group.names
        n = self._read_num_updates()

        # 1. Validate everything; nothing is modified until this block has passed.
        parts: list[tuple[_Group | None, list[int]]]
        trusted = False
        if group is not None:
            parts = [(group, group.all_idx)]
            # objects from the id cache were checked at an earlier step; a self-checking
            # backend re-checks them before writing (and the core names the leaf if it refuses)
            trusted = (fast and group.self_checking) or (
                group.checks_signature and group.backends == backends
            )
            if not trusted:
                _engine.check_pairs(
                    group.names,
                    group.state.shadow,
                    leaves,
                    group.backends,
                    backends,
                    shadow_specs=group.specs,
                    check_devices=self._device is None,
                )
        else:
            # a known group's names are distinct, so only here can a list repeat an array
            # (a dict may: tied weights under two names get two shadows)
            if flat and len(set(map(id, leaves))) != len(leaves):
                raise StructureError(
                    "the same array appears twice in the list given to apply(); "
                    "each tracked array needs its own shadow"
                )
            names = list(names)
            new_idx = [i for i, nm in enumerate(names) if nm is None or nm not in self._where]
            pending = self._match_pending(names, leaves, new_idx)
            for i, nm in pending.items():
                names[i] = nm
            new_idx = [i for i in new_idx if i not in pending]
            parts = self._partition(names)
            new_names = [self._display(names[i], i) for i in new_idx]
            _engine.check_floating(
                [leaves[i] for i in new_idx], new_names, [backends[i] for i in new_idx]
            )
            _engine.check_new(
                [leaves[i] for i in new_idx], new_names, [backends[i] for i in new_idx]
            )
            old_idx = [i for i, nm in enumerate(names) if nm is not None and nm in self._where]
            if old_idx:
                pairs = [self._shadow_of(names[i]) for i in old_idx]
                _engine.check_pairs(
                    [names[i] for i in old_idx],
                    [s for s, _ in pairs],
                    [leaves[i] for i in old_idx],
                    [b for _, b in pairs],
                    [backends[i] for i in old_idx],
                    check_devices=self._device is None,
                )
        decays = []
        for part_group, _ in parts:
            count = part_group.state.count if part_group is not None else 0
            step = count if n is None else n
            decays.append(
                [
                    _engine.step_decay(schedule, step, self._compat, self._dt)
                    for schedule in self._schedules
                ]
            )
        for part_group, _ in parts:
            if part_group is None:
                continue
            if part_group.single is not None:
                part_group.single.check_writable(part_group.state.shadow, part_group.names)
            else:
                _engine.check_writable(
                    part_group.state.shadow, part_group.names, part_group.backends
                )

        if self._nonfinite != "ignore":
            self._guard_nonfinite(names, leaves, backends)
        if self._side_stream and group is None:
            self._check_side_stream([leaves[i] for i in new_idx], [backends[i] for i in new_idx])
        if self._side_stream:
            self._sync()  # the previous update finished before anything regroups

        # 2. Commit: create shadows, regroup, update.
        if group is None:
            names = self._commit_new(names, leaves, backends, new_idx, pending)
            groups = [
                self._regroup(tuple(names[i] for i in idx), idx, leaves, backends)
                for _, idx in parts
            ]
        else:
            groups = [group]
        for g, (_, idx), ds in zip(groups, parts, decays):
            params = [leaves[i] for i in idx] if len(parts) > 1 else leaves
            if self._device is not None:  # offloaded shadows: bring the parameters over
                params = _engine.on_device(params, g.backends, self._device)
            exact = self._exact
            try:
                if len(ds) > 1:  # several profiles: one call reads the parameters once
                    news = _engine.apply_update_lanes(
                        [lane.shadow for lane in g.lanes],
                        params,
                        g.backends,
                        [coefficient(d, self._compat) for d in ds],
                        exact=exact,
                    )
                    new = news[0]
                elif g.single is not None:
                    c = coefficient(ds[0], self._compat)
                    new = g.single.update(g.state.shadow, params, c, inplace=True, exact=exact)
                else:
                    c = coefficient(ds[0], self._compat)
                    new = _engine.apply_update(
                        g.state.shadow, params, g.backends, c, inplace=True, exact=exact
                    )
            except (ValueError, TypeError):
                if trusted:  # say which leaf and what differs
                    _engine.check_pairs(
                        g.names,
                        g.state.shadow,
                        params,
                        g.backends,
                        backends,
                        shadow_specs=g.specs,
                    )
                raise
            if len(ds) > 1:
                g.extra = [
                    lane.replace(shadow=shadows, **_engine.advance(lane, d))
                    for lane, shadows, d in zip(g.extra, news[1:], ds[1:])
                ]
            g.state = g.state.replace(shadow=new, **_engine.advance(g.state, ds[0]))
        return names if fast else list(names)

    def _guard_nonfinite(
        self, names: Sequence[Any], leaves: Sequence[Any], backends: Sequence[Backend]
    ) -> None:
        shown = [self._display(nm, i) for i, nm in enumerate(names)]
        bad = _engine.nonfinite_leaves(leaves, backends, shown)
        if not bad:
            return
        self.last_nonfinite = bad
        if self._nonfinite == "raise":
            raise NonFiniteError(
                f"parameters hold NaN or infinity: {bad[:10]}"
                + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
                + "; no shadow was updated"
            )
        self.skipped_updates += 1
        if self.skipped_updates == 1:
            warnings.warn(
                f"skipped an EMA update: parameters hold NaN or infinity ({bad[:5]}); "
                "further skips are counted in ema.skipped_updates without a warning",
                EMAWarning,
                stacklevel=4,
            )
        raise _Skipped

    def _check_side_stream(self, leaves: list[Any], backends: list[Backend]) -> None:
        if len(set(backends)) > 1:
            for backend in dict.fromkeys(backends):
                backend.check_side_stream([])  # a backend without streams refuses first
            raise ValueError("side_stream=True needs every leaf of one backend")
        if leaves:
            backends[0].check_side_stream(leaves)

    def _sync(self) -> None:
        """Wait (on the device) for updates still running on a side stream."""
        if not self._side_stream:
            return
        for group in self._groups.values():
            if group.single is not None:
                group.single.wait(group.state.shadow)

    def _display(self, name: Any, i: int) -> str:
        return name if isinstance(name, str) else f"new array #{i} of the list"

    def _partition(self, names: Sequence[Any]) -> list[tuple[_Group | None, list[int]]]:
        """Split requested leaves by their counters: leaves in one part update together."""
        parts: dict[Any, list[int]] = {}
        owners: dict[Any, _Group | None] = {}
        for i, nm in enumerate(names):
            g = self._where.get(nm) if nm is not None else None
            key = (
                tuple((lane.count, lane.decay_product, lane.last_decay) for lane in g.lanes)
                if g is not None
                else None
            )
            parts.setdefault(key, []).append(i)
            owners.setdefault(key, g)
        return [(owners[k], idx) for k, idx in parts.items()]

    def _match_pending(
        self, names: list[Any], leaves: Sequence[Any], new_idx: list[int]
    ) -> dict[int, str]:
        """Bind arrays new to a flat apply to shadows loaded from a state dict, in order."""
        bound: dict[int, str] = {}
        queue = list(self._pending)
        for i in new_idx:
            if names[i] is not None or not queue:
                continue
            cand = queue[0]
            shadow, _ = self._shadow_of(cand)
            if tuple(shadow.shape) == tuple(leaves[i].shape) and shadow.dtype == leaves[i].dtype:
                bound[i] = queue.pop(0)
        return bound

    def _commit_new(
        self,
        names: list[Any],
        leaves: Sequence[Any],
        backends: Sequence[Backend],
        new_idx: list[int],
        pending: dict[int, str],
    ) -> list[str]:
        names = list(names)
        fresh = new_idx
        lanes = self._new_lanes([leaves[i] for i in fresh], [backends[i] for i in fresh])
        # the shadows exist: only now is anything recorded (a creation that raises, say for
        # a shadow_dtype or device the leaves cannot have, leaves the EMA as it was)
        for i, nm in pending.items():
            self._pending.remove(nm)
            self._bind_identity(nm, leaves[i])
        if not fresh:
            return names
        mutable_new = [
            i for i in fresh if names[i] is None and backends[i].capabilities.mutable_arrays
        ]
        if mutable_new and self._orphans:
            warnings.warn(
                f"apply() got {len(mutable_new)} array(s) it has never seen, while "
                f"{len(self._orphans)} tracked array(s) were garbage-collected: code that "
                "rebinds arrays (w = w - lr * g) and passes a plain list creates new shadows "
                "every step. Update in place (w -= lr * g) or pass a dict so leaves are "
                "tracked by name.",
                EMAWarning,
                stacklevel=3,
            )
        for i in fresh:
            if names[i] is None:
                names[i] = self._auto_name()
                if backends[i].capabilities.mutable_arrays:
                    self._kinds[names[i]] = _IDENTITY
                    self._bind_identity(names[i], leaves[i])
                else:
                    self._kinds[names[i]] = _POSITION
                    self._by_pos[i] = names[i]
                    self._positions[names[i]] = i
            else:
                self._kinds[names[i]] = _NAME
            if names[i] not in self._copies:  # a promoted copy keeps its place
                self._order.append(names[i])
        fresh_names = tuple(names[i] for i in fresh)
        group = _Group(fresh_names, lanes[0], [backends[i] for i in fresh], lanes[1:])
        self._add_group(group)
        return names

    def _new_lanes(self, leaves: list[Any], backends: list[Backend]) -> list[EMAState]:
        """A state with new shadows of ``leaves`` for each decay profile (none: no leaves)."""
        if not leaves:
            return []
        dtypes = _engine.shadow_dtypes(leaves, backends, self._shadow_dtype, self._compat)
        return [
            EMAState(
                _engine.create_shadows(
                    leaves,
                    backends,
                    zeros=self._zero_debias,
                    dtypes=dtypes,
                    layout=self._layout,
                    device=self._device,
                ),
                zero_debias=self._zero_debias,
                compat=self._compat,
            )
            for _ in self._schedules
        ]

    def _auto_name(self) -> str:
        while True:
            name = "Variable" if self._counter == 0 else f"Variable_{self._counter}"
            self._counter += 1
            if name not in self._where:
                return name

    def _bind_identity(self, name: str, x: Any) -> None:
        oid = id(x)
        self._by_id[oid] = name
        self._orphans.discard(name)

        def forget(_: Any, oid: int = oid, name: str = name) -> None:
            if self._by_id.get(oid) == name:
                del self._by_id[oid]
                self._orphans.add(name)
            self._fast.clear()
            self._module_cache = None

        try:
            self._refs[name] = weakref.ref(x, forget)
        except TypeError:
            self._refs[name] = lambda: x

    def _add_group(self, group: _Group) -> None:
        if self._side_stream and group.single is not None:
            # checked before the commit: a backend with streams (torch on CUDA)
            side = group.single.use_side_stream(group.state.shadow)
            group.state = group.state.replace(shadow=side)
        self._fast.clear()
        self._module_cache = None
        self._groups[group.names] = group
        for nm in group.names:
            self._where[nm] = group

    def _regroup(
        self,
        names: tuple[str, ...],
        idx: list[int],
        leaves: Sequence[Any],
        backends: Sequence[Backend],
    ) -> _Group:
        """Return the group holding exactly ``names``, splitting other groups as needed."""
        existing = self._groups.get(names)
        if existing is not None:
            return existing
        template = self._where[names[0]]
        lanes = []
        for k, lane in enumerate(template.lanes):
            shadows = [self._shadow_of(nm, k)[0] for nm in names]
            lanes.append(lane.replace(shadow=shadows))
        shadow_backends = [self._shadow_of(nm)[1] for nm in names]
        touched = {id(self._where[nm]): self._where[nm] for nm in names}
        for old in touched.values():
            del self._groups[old.names]
            keep = [i for i, nm in enumerate(old.names) if nm not in set(names)]
            if keep:
                self._add_group(old.sub(keep))
        group = _Group(names, lanes[0], shadow_backends, lanes[1:])
        self._add_group(group)
        return group

    def _remember(self, names: Sequence[str], leaves: Sequence[Any]) -> None:
        """Remember (weakly) the objects last applied under each name, for average(leaf)."""
        try:
            self._seen.update(zip(names, map(weakref.ref, leaves)))
        except TypeError:  # an array type without weak references
            for nm, x in zip(names, leaves):
                self._seen[nm] = _weak(x)

    # -- reading averages ------------------------------------------------------------------

    def _name_of(self, x: Any) -> str | None:
        name = self._by_id.get(id(x))
        if name is not None:
            return name
        for nm, ref in self._seen.items():
            if ref() is x:
                return nm
        return None

    def _averages_of(self, names: Sequence[str]) -> list[Any]:
        self._sync()
        out = []
        for nm in names:
            if nm in self._copies:
                out.append(self._copies[nm][0])
                continue
            group = self._where[nm]
            i = group.position(nm)
            lane = group.lanes[self._lane]
            out.append(_engine.averages(lane, [lane.shadow[i]], [group.backends[i]])[0])
        return out

    def average(self, var: Any) -> Any:
        """Return the moving average of ``var``: a tracked leaf, or a container of them.

        For a single array that is not tracked, returns ``None`` (as TensorFlow does). For a
        container, returns the same container of averages, and raises ``KeyError`` naming
        any leaf that is not tracked. Without ``zero_debias`` the averages are the shadow
        arrays themselves; copy them before modifying.

        Examples
        --------
        >>> import numpy as np
        >>> w = np.ones(2)
        >>> ema = ExponentialMovingAverage(0.9)
        >>> ema.apply([w]); ema.average([w])
        [array([1., 1.])]
        >>> ema.average(np.ones(2)) is None
        True
        """
        kind, names, _, treedef = self._lookup(var)
        if kind == "module":
            return dict(zip(treedef, self._averages_of(names)))
        if kind == "leaf":
            return None if names[0] is None else self._averages_of([names[0]])[0]
        self._require_tracked(kind, names, treedef)
        leaves = _pytree.flatten(var)[0]
        # leaves the include/exclude filters leave out are returned as they are
        averages = [
            self._averages_of([nm])[0] if self._tracked(nm) else x for nm, x in zip(names, leaves)
        ]
        return _pytree.unflatten(treedef, averages)

    def _tracked(self, name: str | None) -> bool:
        return name is not None and (name in self._where or name in self._copies)

    def _lookup(self, var: Any) -> tuple[str, list[Any], list[Any], Any]:
        """Name the leaves of ``var``: ``(kind, names, leaves, treedef)``.

        ``kind`` is ``"module"`` (untracked names are None and dropped), ``"leaf"``, ``"flat"``
        or ``"tree"``; a name is None where the leaf is not tracked.
        """
        names: list[Any]
        entries = self._module_entries(var)
        if entries is not None:
            # by name; then by object, for a submodule of the applied model or a tied weight
            names = [nm if self._tracked(nm) else self._name_of(x) for nm, x, _ in entries]
            keep = [i for i, nm in enumerate(names) if self._tracked(nm)]
            if entries and not keep:
                raise KeyError(
                    f"no moving average for any parameter or buffer of this "
                    f"{type(var).__qualname__}; apply() it (or a model containing it) first"
                )
            keys = [entries[i][0] for i in keep]  # the container's own names
            return "module", [names[i] for i in keep], [entries[i][1] for i in keep], keys
        leaves, treedef = _pytree.flatten(var)
        if treedef == _pytree.LEAF:
            return "leaf", [self._name_of(var)], leaves, treedef
        flat = treedef[0] in ("list", "tuple") and treedef[1] == (_pytree.LEAF,) * len(leaves)
        if flat:
            names = [self._name_of(x) for x in leaves]
            for i, (nm, x) in enumerate(zip(names, leaves)):
                if nm is None:
                    positional = self._by_pos.get(i)
                    if positional is not None and not self._is_mutable(x):
                        names[i] = positional
            return "flat", names, leaves, treedef
        # by key path; a sub-container of what was applied falls back to the objects
        names = [
            nm if self._tracked(nm) else self._name_of(x)
            for nm, x in zip(_pytree.leaf_names(treedef), leaves)
        ]
        return "tree", names, leaves, treedef

    def _excluded(self, kind: str, treedef: Any) -> list[bool]:
        """Which leaves of a named container the include/exclude filters leave out."""
        if kind != "tree" or (self._include is None and self._exclude is None):
            return []
        return [not self._keep(path) for path in _pytree.leaf_names(treedef)]

    def _require_tracked(self, kind: str, names: Sequence[Any], treedef: Any) -> None:
        excluded = self._excluded(kind, treedef)
        missing = [
            str(i if kind == "flat" else _pytree.leaf_names(treedef)[i])
            for i, nm in enumerate(names)
            if not self._tracked(nm) and not (excluded and excluded[i])
        ]
        if missing:
            raise KeyError(
                f"no moving average for leaves {missing[:10]} of the container given; "
                "pass them to apply() first"
            )

    def _is_mutable(self, x: Any) -> bool:
        try:
            return bool(_engine.resolve_backends([x], [])[0].capabilities.mutable_arrays)
        except Exception:
            return False

    def average_name(self, var: Any) -> str:
        """Return the name of ``var``'s moving average: ``"<var's name>/<ema name>"``.

        ``var`` is a tracked array or a leaf's name (its key path, e.g. ``"dense/kernel"``).
        Arrays tracked from a plain list are named ``Variable``, ``Variable_1``, ... in the
        order they were first seen, as TensorFlow names unnamed variables.

        Examples
        --------
        >>> ExponentialMovingAverage(0.9).average_name("dense/kernel")
        'dense/kernel/ExponentialMovingAverage'
        """
        if isinstance(var, str):
            return f"{var}/{self._name}{self._suffix()}"
        name = self._name_of(var)
        if name is None:
            raise KeyError(
                f"{type(var).__qualname__} object is not tracked by this EMA; apply() it "
                "first, or pass the leaf's name"
            )
        return f"{name}/{self._name}{self._suffix()}"

    # -- evaluating with the averages -------------------------------------------------------

    def _live_pairs(self, var_list: Any) -> list[tuple[Any, Any, Backend]]:
        """(live array, its average, backend) for every tracked leaf of ``var_list``.

        Checks, before anything is written, that every live array can be written in place:
        a mutable backend, the average's shape, and the backend's own ``check_assignable``
        (numpy: not read-only; torch: no element aliasing another) where it has one.
        """
        kind, names, leaves, treedef = self._lookup(var_list)
        if kind == "leaf":
            if names[0] is None:
                raise KeyError(f"{type(var_list).__qualname__} object is not tracked by this EMA")
        elif kind != "module":
            self._require_tracked(kind, names, treedef)
            keep = [i for i, nm in enumerate(names) if self._tracked(nm)]  # minus excluded
            names, leaves = [names[i] for i in keep], [leaves[i] for i in keep]
        backends = _engine.resolve_backends(leaves, names, self._backend_name)
        pairs = []
        for nm, live, avg, backend in zip(names, leaves, self._averages_of(names), backends):
            if not backend.capabilities.mutable_arrays:
                raise ImmutableArrayError(
                    f"leaf {nm!r}: backend {backend.name!r} arrays are immutable, so "
                    "copy_to/swapped/store/restore cannot write into them; use "
                    "ema.average(params) and pass the averages on instead"
                )
            if tuple(live.shape) != tuple(avg.shape):  # a write would fail, or broadcast
                raise LeafMismatchError(
                    f"leaf {nm!r}: the array has shape {tuple(live.shape)}, its average "
                    f"{tuple(avg.shape)}; nothing was written"
                )
            pairs.append((live, avg, backend))
        for backend in dict.fromkeys(backends):
            mine = [i for i, b in enumerate(backends) if b is backend]
            backend.check_assignable([leaves[i] for i in mine], [names[i] for i in mine])
        return pairs

    def copy_to(self, var_list: Any) -> None:
        """Write the averages into the tracked arrays of ``var_list`` (in place).

        ``var_list`` is what was applied: a module, a container or arrays. Leaves a module
        has but this EMA does not track (excluded, skipped) are left as they are.

        Examples
        --------
        >>> import numpy as np
        >>> params = {"w": np.zeros(2)}
        >>> ema = ExponentialMovingAverage(0.5)
        >>> ema.apply(params); params["w"][...] = 4.0; ema.apply(params)
        >>> ema.copy_to(params); params["w"]
        array([2., 2.])
        """
        for live, avg, backend in self._live_pairs(var_list):
            backend.assign(live, avg)

    @staticmethod
    def _snapshot(pairs: list[tuple[Any, Any, Backend]]) -> list[tuple[Any, Any, Backend]]:
        """(live array, a copy of its current value, backend) for each pair."""
        return [
            (live, backend.create_shadows([live], zeros=False)[0], backend)
            for live, _, backend in pairs
        ]

    @staticmethod
    def _write_back(saved: list[tuple[Any, Any, Backend]]) -> None:
        for live, value, backend in saved:
            backend.assign(live, value)

    def store(self, var_list: Any) -> None:
        """Save copies of the current (live) values of ``var_list`` for `restore`."""
        self._stored = self._snapshot(self._live_pairs(var_list))

    def restore(self) -> None:
        """Write back the values saved by the last `store`, and forget them."""
        if self._stored is None:
            raise EMAError("restore() called without a matching store()")
        self._write_back(self._stored)
        self._stored = None

    @contextlib.contextmanager
    def swapped(self, var_list: Any) -> Iterator[Any]:
        """Evaluate with the averages: put them into ``var_list``, restore the live values after.

        The live values come back even when the body raises.

        Examples
        --------
        >>> import numpy as np
        >>> params = {"w": np.zeros(2)}
        >>> ema = ExponentialMovingAverage(0.5)
        >>> ema.apply(params); params["w"][...] = 4.0; ema.apply(params)
        >>> with ema.swapped(params):
        ...     print(params["w"])
        [2. 2.]
        >>> params["w"]
        array([4., 4.])
        """
        pairs = self._live_pairs(var_list)
        saved = self._snapshot(pairs)
        try:
            for live, avg, backend in pairs:
                backend.assign(live, avg)
            yield var_list
        finally:
            self._write_back(saved)

    def variables_to_restore(self) -> dict[str, Any]:
        """Map each average's name to the live object it shadows (for restoring averages).

        As TensorFlow's: an averaged leaf is under its average's name (`average_name`), a
        leaf that is copied, not averaged (a module's buffer or frozen parameter), under its
        own name; each maps to the object last applied under that name. Leaves whose object
        is gone (garbage-collected, or not applied since `load_state_dict`) are left out.

        Examples
        --------
        >>> import numpy as np
        >>> ema = ExponentialMovingAverage(0.9)
        >>> params = {"w": np.zeros(1)}
        >>> ema.apply(params)
        >>> list(ema.variables_to_restore())
        ['w/ExponentialMovingAverage']
        >>> ema.variables_to_restore()["w/ExponentialMovingAverage"] is params["w"]
        True
        """
        out: dict[str, Any] = {}
        for nm in self._order:
            ref = self._refs.get(nm) or self._seen.get(nm)
            obj = ref() if ref is not None else None
            if obj is not None:
                # TF restores variables without a moving average under their own names
                key = nm if nm in self._copies else f"{nm}/{self._name}{self._suffix()}"
                out[key] = obj
        return out

    # -- state dicts -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the state as plain dicts, lists, numbers, strings and the shadow arrays.

        The arrays are the shadows themselves (as torch's ``state_dict`` returns parameters):
        copy them to keep a snapshot. Nothing in it needs pickle to be stored.

        Examples
        --------
        >>> import numpy as np
        >>> ema = ExponentialMovingAverage(0.9)
        >>> ema.apply({"w": np.zeros(1)})
        >>> ema.state_dict()["leaves"]["w"]["count"]
        1
        """
        self._sync()
        spec = getattr(self._schedule, "spec", None)
        leaves: dict[str, Any] = {}
        copies: dict[str, Any] = {}
        for order, nm in enumerate(self._order):
            if nm in self._copies:
                copies[nm] = self._copies[nm][0]
                continue
            group = self._where[nm]
            st = group.state
            i = group.position(nm)
            leaves[nm] = {
                "shadow": st.shadow[i],
                "count": st.count,
                "decay_product": st.decay_product,
                "last_decay": st.last_decay,
                "keyed_by": self._kinds[nm],
                "position": self._positions.get(nm),
                "order": order,
            }
            if group.extra:
                leaves[nm]["profiles"] = {
                    name: {
                        "shadow": lane.shadow[i],
                        "decay_product": lane.decay_product,
                        "last_decay": lane.last_decay,
                    }
                    for name, lane in zip(self._profiles[1:], group.extra)
                }
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "name": self._name,
            "zero_debias": self._zero_debias,
            "compat": self._compat,
            "schedule": spec() if spec is not None else repr(self._schedule),
            # every profile's, by name ({} for a single decay)
            "schedules": {
                name: _spec_of(schedule) for name, schedule in zip(self.profiles, self._schedules)
            },
            "leaves": leaves,
            "copies": copies,
            "calls": self._calls,
            "profiles": list(self.profiles),
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> LoadResult:  # noqa: C901, PLR0912 - all checks before any change; issue 13 item 1 splits it
        """Replace this EMA's shadows and counters with those in ``state``.

        Arrays are copied into new shadows; ``state`` is not aliased. With ``strict`` the
        leaves must be exactly those tracked now (any leaves, if nothing is tracked yet).
        Arrays tracked by identity bind to the arrays next passed to ``apply`` as a plain
        list, in the order they were first seen, as TF restores variables by creation order.

        Returns
        -------
        LoadResult
            ``missing_keys`` (tracked here, absent from ``state``) and ``unexpected_keys``
            (in ``state``, not tracked here; ignored when not strict).

        Raises
        ------
        StateDictError
            ``state`` is malformed (a field missing or unknown, of the wrong type or out of
            range, a shadow not a floating array: the checks a checkpoint file passes, naming
            the field), was saved with another ``zero_debias``/``compat``, or (with
            ``strict``) its leaves differ from the tracked ones. Nothing changes then.
        """
        self._sync()
        # every field checked (the same checks as a checkpoint file's), before any change
        leaves = parse_leaves(state, self._zero_debias, self._compat, self.profiles)
        loaded_copies = parse_copies(state)
        calls = int(state.get("calls", 0))  # apply() calls so far, for update_every
        current = set(self._where) | set(self._copies)
        saved = set(leaves) | set(loaded_copies)
        missing = sorted(current - saved) if current else []
        unexpected = sorted(saved - current) if current else []
        if strict and (missing or unexpected):
            raise StateDictError(
                f"state dict leaves differ from the tracked ones: missing {missing[:10]}, "
                f"unexpected {unexpected[:10]}"
            )
        for nm, rec in leaves.items():
            if nm in self._copies:
                raise StateDictError(
                    f"leaf {nm!r} is copied here (a buffer or frozen parameter) but averaged "
                    "in the state dict; load it into an EMA with the same buffers/frozen policy"
                )
            if nm in current:
                shadow, _ = self._shadow_of(nm)
                _check_loaded(nm, "shadow", rec["shadow"], shadow)
                for k, prof in enumerate(rec["profiles"]):
                    _check_loaded(nm, f"profile {k + 1} shadow", prof["shadow"], shadow)
        for nm, arr in loaded_copies.items():
            if nm in self._where:
                raise StateDictError(
                    f"leaf {nm!r} is averaged here but a copy in the state dict; load it into "
                    "an EMA with the same buffers/frozen policy"
                )
            if nm in self._copies:
                _check_loaded(nm, "copy", arr, self._copies[nm][0])
        keep = {nm: rec for nm, rec in leaves.items() if not current or nm in current}
        arrays = [self._placed_like(nm, rec["shadow"]) for nm, rec in keep.items()]
        backends = _engine.resolve_backends(arrays, list(keep), self._backend_name)
        _engine.check_floating(arrays, list(keep), backends)
        kept_copies = {
            nm: self._placed_like(nm, a)
            for nm, a in loaded_copies.items()
            if not current or nm in current
        }
        copy_backends = _engine.resolve_backends(
            list(kept_copies.values()), list(kept_copies), self._backend_name
        )
        tracked = {nm: self._shadow_of(nm)[1] for nm in keep if nm in self._where}
        tracked.update({nm: self._copies[nm][1] for nm in kept_copies if nm in self._copies})
        for nm, b in [*zip(keep, backends), *zip(kept_copies, copy_backends)]:
            if nm in tracked and b is not tracked[nm]:
                raise StateDictError(
                    f"leaf {nm!r}: the state dict holds a {b.name} array, this EMA tracks "
                    f"{tracked[nm].name} ones; convert the arrays first, or save and load "
                    "through emacore.save / emacore.load_into, which converts"
                )
        new_copies = _engine.create_shadows(
            list(kept_copies.values()), copy_backends, zeros=False, device=self._device
        )
        shadows = _engine.create_shadows(
            arrays, backends, zeros=False, layout=self._layout, device=self._device
        )
        lanes = [shadows]
        for k in range(len(self._profiles) - 1):
            more = [self._placed_like(nm, rec["profiles"][k]["shadow"]) for nm, rec in keep.items()]
            for nm, a, b in zip(keep, more, arrays):
                if tuple(a.shape) != tuple(b.shape):
                    raise StateDictError(
                        f"leaf {nm!r}: profile {self._profiles[k + 1]!r} shadow shape "
                        f"{tuple(a.shape)} differs from the first profile's {tuple(b.shape)}"
                    )
            more_backends = _engine.resolve_backends(more, list(keep), self._backend_name)
            lanes.append(
                _engine.create_shadows(
                    more, more_backends, zeros=False, layout=self._layout, device=self._device
                )
            )
        # nothing above changed this EMA; from here on nothing can fail
        self._install(keep, lanes, backends, set(missing))
        self._calls = calls
        self._copies = {nm: rec for nm, rec in self._copies.items() if nm in missing}
        for (nm, _), arr, b in zip(kept_copies.items(), new_copies, copy_backends):
            self._copies[nm] = (arr, b)
            self._kinds[nm] = _NAME
            if nm not in self._order:
                self._order.append(nm)
        return LoadResult(missing, unexpected)

    def _placed_like(self, name: str, array: Any) -> Any:
        """A loaded shadow (or copy) laid out as the one it replaces.

        A whole array is sharded again; a tensor moves to the device of the one it replaces.
        """
        if name in self._where:
            current, backend = self._shadow_of(name)
        elif name in self._copies:
            current, backend = self._copies[name]
        else:
            return array
        try:
            return backend.placed_like(array, current)
        except ValueError as exc:
            raise StateDictError(f"leaf {name!r}: {exc}") from None

    def _install(
        self,
        leaves: dict[str, dict[str, Any]],
        lanes: list[list[Any]],
        backends: list[Backend],
        missing: set[str],
    ) -> None:
        old_where = self._where
        kept = {nm: old_where[nm] for nm in missing if nm in old_where}
        self._groups, self._where = {}, {}
        self._fast.clear()
        self._module_cache = None
        for g in {id(g): g for g in kept.values()}.values():
            self._add_group(g.sub([i for i, nm in enumerate(g.names) if nm in missing]))
        parts: dict[Any, list[int]] = {}
        names = list(leaves)
        for i, nm in enumerate(names):
            rec = leaves[nm]
            counters = [(rec["decay_product"], rec["last_decay"])]
            counters += [(p["decay_product"], p["last_decay"]) for p in rec["profiles"]]
            parts.setdefault((rec["count"], tuple(counters)), []).append(i)
        for (count, counters), idx in parts.items():
            whole = len(idx) == len(names)  # then the backend's lists, with their layout notes
            states = [
                EMAState(
                    arrays if whole else [arrays[i] for i in idx],
                    count=count,
                    decay_product=product,
                    last_decay=last,
                    zero_debias=self._zero_debias,
                    compat=self._compat,
                )
                for arrays, (product, last) in zip(lanes, counters)
            ]
            self._add_group(
                _Group(
                    tuple(names[i] for i in idx),
                    states[0],
                    [backends[i] for i in idx],
                    states[1:],
                )
            )
        ordered = sorted(names, key=lambda nm: leaves[nm]["order"])
        self._order = [nm for nm in self._order if nm in missing] + ordered
        self._pending = []
        for nm in ordered:
            rec = leaves[nm]
            self._kinds[nm] = rec["keyed_by"]
            if rec["keyed_by"] == _IDENTITY:
                ref = self._refs.get(nm)
                if ref is None or ref() is None:
                    self._pending.append(nm)
            elif rec["keyed_by"] == _POSITION and rec["position"] is not None:
                self._by_pos[rec["position"]] = nm
                self._positions[nm] = rec["position"]
        auto = [nm for nm in self._order if nm.startswith("Variable")]
        self._counter = max(self._counter, len(auto))


EMA = ExponentialMovingAverage


class EMAProfile:
    """The averages of one decay profile of an `ExponentialMovingAverage` (`profile`).

    Reads only: the EMA itself is applied, saved and loaded as a whole.
    """

    def __init__(self, ema: ExponentialMovingAverage, lane: int) -> None:
        self._ema = ema
        self._lane = lane

    @property
    def name(self) -> str:
        """The profile's name."""
        return self._ema.profiles[self._lane]

    def average(self, var: Any) -> Any:
        """`ExponentialMovingAverage.average`, for this profile."""
        with self._ema._reading(self._lane):
            return self._ema.average(var)

    def average_name(self, var: Any) -> str:
        """`ExponentialMovingAverage.average_name`: ``<var name>/<ema name>/<profile>``."""
        with self._ema._reading(self._lane):
            return self._ema.average_name(var)

    def variables_to_restore(self) -> dict[str, Any]:
        """`ExponentialMovingAverage.variables_to_restore`, for this profile."""
        with self._ema._reading(self._lane):
            return self._ema.variables_to_restore()

    def copy_to(self, var_list: Any) -> None:
        """`ExponentialMovingAverage.copy_to`, with this profile's averages."""
        with self._ema._reading(self._lane):
            self._ema.copy_to(var_list)

    @contextlib.contextmanager
    def swapped(self, var_list: Any) -> Iterator[Any]:
        """`ExponentialMovingAverage.swapped`, with this profile's averages."""
        with contextlib.ExitStack() as stack:
            with self._ema._reading(self._lane):
                inside = stack.enter_context(self._ema.swapped(var_list))
            yield inside

    def __repr__(self) -> str:
        return f"EMAProfile({self.name!r} of {self._ema!r})"
