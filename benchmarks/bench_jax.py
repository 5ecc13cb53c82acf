"""Time one EMA update step of emacore's jax backend against optax and hand-written jit (CPU).

Run ``python benchmarks/bench_jax.py`` (or ``nox -s bench_jax``); it prints a markdown report.

For every parameter set of ``bench_shapes.json`` (next to this script: ResNet-50, GPT-2-small,
2,000 tensors of 256; float32, decay 0.999) it builds ``PARAM_COPIES`` pytrees of the set's
parameters (a dict of ``jax.Array`` s, keyed ``"0000"``, ``"0001"``, ... in the set's order) and
times, side by side in one run, one update step of:

1. emacore, stateful: ``ExponentialMovingAverage(0.999).apply(params)``, ``params`` being the
   next of the pre-made pytrees each step, as a training loop rebinds its parameters (leaves
   are tracked by key path; the old shadows are donated to emacore's compiled update);
2. emacore, functional inside the user's jit:
   ``jax.jit(lambda state, p: functional.update(state, p, 0.999), donate_argnums=0)`` on a
   state from ``functional.init(params, traceable=True)`` (one shadow array per leaf, the
   parameters' structure), and from ``functional.init(params, traceable=True,
   layout="auto")`` (small leaves packed, large ones raveled: a `emacore.ShadowTree`);
3. optax: ``optax.ema(0.999, debias=False)``, its ``update`` jitted with the state donated:
   ``jax.jit(lambda state, p: tx.update(p, state)[1], donate_argnums=0)``. Only the new state
   is returned: the ``updates`` output equals the new average (``debias=False``), and
   returning it too would make XLA write a second copy of the model every step;
4. by hand: ``jax.jit(lambda s, p: jax.tree_util.tree_map(lambda a, b: a + 0.001 * (b - a),
   s, p), donate_argnums=0)``;
5. a floor: the same ``a + 0.001 * (b - a)``, jitted with ``a`` donated, over two flat float32
   arrays holding as many elements as the set has parameters. It moves the 12 bytes per
   parameter an update must move (read ``p``, read and write ``s``) in one compiled call over
   one buffer, with no per-leaf dispatch, so it is about the floor of a step;
6. a copy: ``jax.jit(lambda dst, src: dst.at[:].set(src), donate_argnums=0)`` over flat arrays
   of 1.5 floats a parameter, written into the donated ``dst``: the same 12 bytes, the
   device's copy bandwidth (``x copy`` is the share of it a method reaches).

``--device cuda`` (or ``gpu``) puts the parameters, every state and the floor and copy buffers
on jax's first GPU device (``jax.devices("gpu")[0]``) instead of its first CPU device; the
header names the device.

Every step ends with ``jax.block_until_ready`` on the new state (jax dispatches
asynchronously), so a sample is the time of the whole update. For the stateful EMA that state
is reached through the EMA's private group table (``ema._groups``): the public
``ema.average(params)`` would add its own lookup to emacore's time.

Methodology: the machine this runs on is shared and noisy, so only ratios measured side by side
in one run mean anything. Each method's first call (tracing and compilation, plus, for the
stateful EMA, the creation of its shadows) is timed on its own; its state was created before it,
apart (``init ms``; the stateful EMA creates its shadows in its first ``apply``). Then a few
warm-up steps, and the methods are interleaved: each of ``--repeat`` repetitions runs every
method once, in a shuffled order. A repetition of a fast method loops it enough times to last
about 20 ms and records the mean. The report gives the median and the p25-p75 spread. The
garbage collector is off while timing, as in ``timeit``. ``compile ms`` is the first call's
time minus the steady-state median. ``donated`` says whether the largest array of a method's
state was deleted by a step (its buffer donated to the new state), checked after timing.
XLA's CPU thread settings are left at their defaults; the header reports ``XLA_FLAGS``.

Targets (from the issue): on the two large sets, emacore at most 0.95x the time of the fastest
peer (optax or the hand-written jit; the floor is reported but is not a peer); on the
many-small set at least 3x faster than the fastest peer. Both emacore rows are judged.

Memory: the GPT-2-small set has 124M parameters, 500 MB per float32 copy. It needs about
4.5 GB: two parameter copies, four states, two floor buffers. Sets are run one at a time and
freed in between.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import (
    SMALL_SET_MAX_TENSOR,
    TimedMethod,
    fmt_ms,
    load_average,
    load_sets,
    machine,
    measure,
    parse_args,
    speed_target,
    write_report,
)

import emacore
from emacore import functional

DECAY = 0.999
WEIGHT = 1.0 - DECAY
DEFAULT_REPEAT = 25
PARAM_COPIES = 2  # pre-made parameter pytrees, passed in turn (a new pytree every step)
WARMUP_STEPS = 3  # steps after the first (which compiles) before anything is measured
LARGE_TARGET = 0.95  # emacore <= 0.95x the fastest peer's time on the large sets
SMALL_TARGET = 3.0  # emacore >= 3x faster than the fastest peer on the many-small set
BYTES_PER_PARAM = 12  # read p, read s, write s (float32)

STATEFUL = "emacore `ExponentialMovingAverage.apply(params)`"
FUNCTIONAL = "emacore `functional.update` in `jax.jit` (donated)"
FUNCTIONAL_PACKED = 'emacore `functional.update` in `jax.jit` (donated), `layout="auto"`'
OPTAX = "optax `ema(debias=False).update` in `jax.jit` (donated)"
HAND = "by hand `jax.jit(tree_map(lerp))` (donated)"
FLOOR = "floor: one flat `a + w * (b - a)` (donated)"
COPY = "copy: one flat `dst.at[:].set(src)` (donated), 12 bytes a parameter"

EMACORE, PEER, BASELINE = "emacore", "peer", "baseline"

Params = dict[str, jax.Array]

# where everything runs (`--device`): jax's first device of that platform; CPU unless asked
DEVICE: Any = None


@dataclass(kw_only=True)
class Method(TimedMethod):
    """One timed contender, its role, and what its first call and its donation showed."""

    role: str  # EMACORE, PEER or BASELINE
    init_s: float | None = None  # creating its state, apart from the first call (None: in it)
    first_s: float = 0.0  # the first call: trace, compile, (shadows), one step
    donated: bool | None = None


@dataclass
class SetResult:
    """Everything measured on one parameter set."""

    name: str
    tensors: int
    params: int
    largest: int
    methods: list[Method]

    def by_label(self) -> dict[str, Method]:
        return {m.label: m for m in self.methods}

    def fastest_peer(self) -> Method:
        return min((m for m in self.methods if m.role == PEER), key=lambda m: m.median)

    @property
    def small(self) -> bool:
        return self.largest < SMALL_SET_MAX_TENSOR


class Contender:
    """A method's state and its step: ``step()`` updates and blocks until the state is ready.

    ``probe()`` returns the largest array of the current state; if a step deletes it, the step
    donated its input's buffers.
    """

    def __init__(self, step: Callable[[], None], state: Callable[[], Any]) -> None:
        self.step = step
        self._state = state

    def probe(self) -> jax.Array:
        leaves: list[jax.Array] = jax.tree_util.tree_leaves(self._state())
        return max(leaves, key=lambda x: x.size)


# -- the contenders -------------------------------------------------------------------------


def emacore_stateful(copies: Sequence[Params]) -> Contender:
    ema = emacore.ExponentialMovingAverage(DECAY)
    feed = itertools.cycle(copies)

    def shadows() -> list[Any]:
        # private: the shadows of every group, without the public average()'s lookup
        return [g.state.shadow for g in ema._groups.values()]

    def step() -> None:
        ema.apply(next(feed))
        jax.block_until_ready(shadows())

    return Contender(step, shadows)


def jitted(fn: Callable[[Any, Params], Any], state: Any, copies: Sequence[Params]) -> Contender:
    """A step ``state = fn(state, params)`` (``fn`` jitted, donating ``state``)."""
    box = [state]
    feed = itertools.cycle(copies)

    def step() -> None:
        box[0] = fn(box[0], next(feed))
        jax.block_until_ready(box[0])

    return Contender(step, lambda: box[0])


def emacore_functional(copies: Sequence[Params]) -> tuple[Contender, float]:
    t0 = time.perf_counter()
    state = jax.block_until_ready(functional.init(copies[0], traceable=True))
    init_s = time.perf_counter() - t0
    fn = jax.jit(lambda s, p: functional.update(s, p, DECAY), donate_argnums=0)
    return jitted(fn, state, copies), init_s


def emacore_functional_packed(copies: Sequence[Params]) -> tuple[Contender, float]:
    t0 = time.perf_counter()
    state = jax.block_until_ready(functional.init(copies[0], traceable=True, layout="auto"))
    init_s = time.perf_counter() - t0
    fn = jax.jit(lambda s, p: functional.update(s, p, DECAY), donate_argnums=0)
    return jitted(fn, state, copies), init_s


def optax_ema(copies: Sequence[Params]) -> tuple[Contender, float]:
    tx = optax.ema(DECAY, debias=False)
    t0 = time.perf_counter()
    state = jax.block_until_ready(tx.init(copies[0]))
    init_s = time.perf_counter() - t0
    fn = jax.jit(lambda s, p: tx.update(p, s)[1], donate_argnums=0)
    return jitted(fn, state, copies), init_s


def by_hand(copies: Sequence[Params]) -> tuple[Contender, float]:
    t0 = time.perf_counter()
    state = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, copies[0]))
    init_s = time.perf_counter() - t0

    def lerp(s: Params, p: Params) -> Params:
        out: Params = jax.tree_util.tree_map(lambda a, b: a + WEIGHT * (b - a), s, p)
        return out

    return jitted(jax.jit(lerp, donate_argnums=0), state, copies), init_s


def floor(total: int) -> tuple[Contender, float]:
    t0 = time.perf_counter()
    a = jax.block_until_ready(jnp.zeros(total, jnp.float32, device=DEVICE))
    b = jax.block_until_ready(jnp.ones(total, jnp.float32, device=DEVICE))
    init_s = time.perf_counter() - t0
    fn = jax.jit(lambda a, b: a + WEIGHT * (b - a), donate_argnums=0)
    box = [a]

    def step() -> None:
        box[0] = fn(box[0], b)
        box[0].block_until_ready()

    return Contender(step, lambda: box[0]), init_s


def copy_baseline(total: int) -> tuple[Contender, float]:
    """A copy moving the 12 bytes a parameter an update moves: 1.5 floats read, 1.5 written
    (into the donated destination, as the update writes its donated state)."""
    n = total * 3 // 2
    t0 = time.perf_counter()
    dst = jax.block_until_ready(jnp.zeros(n, jnp.float32, device=DEVICE))
    src = jax.block_until_ready(jnp.ones(n, jnp.float32, device=DEVICE))
    init_s = time.perf_counter() - t0
    fn = jax.jit(lambda dst, src: dst.at[:].set(src), donate_argnums=0)
    box = [dst]

    def step() -> None:
        box[0] = fn(box[0], src)
        box[0].block_until_ready()

    return Contender(step, lambda: box[0]), init_s


# -- running a set --------------------------------------------------------------------------


def make_params(shapes: Sequence[tuple[int, ...]], seed: int, copy: int) -> Params:
    """One pytree of the set's parameters (float32, standard normal)."""
    rng = np.random.default_rng([seed, copy])
    return {
        f"{i:04d}": jax.device_put(rng.standard_normal(shape, dtype=np.float32), DEVICE)
        for i, shape in enumerate(shapes)
    }


def released() -> None:
    raise RuntimeError("this method's state was released after its set was measured")


def run_set(name: str, shapes: list[tuple[int, ...]], repeat: int, seed: int) -> SetResult:
    copies = [make_params(shapes, seed, k) for k in range(PARAM_COPIES)]
    jax.block_until_ready(copies)
    total = sum(int(np.prod(s)) for s in shapes)
    largest = max(int(np.prod(s)) for s in shapes)
    print(f"# {name}: {len(shapes)} tensors, {total:,} parameters", file=sys.stderr)

    made: list[tuple[str, str, Contender, float | None]] = [
        (STATEFUL, EMACORE, emacore_stateful(copies), None)
    ]
    for label, role, factory in (
        (FUNCTIONAL, EMACORE, emacore_functional),
        (FUNCTIONAL_PACKED, EMACORE, emacore_functional_packed),
        (OPTAX, PEER, optax_ema),
        (HAND, PEER, by_hand),
    ):
        made.append((label, role, *factory(copies)))
    made.append((FLOOR, BASELINE, *floor(total)))
    made.append((COPY, BASELINE, *copy_baseline(total)))

    methods = []
    for label, role, contender, init_s in made:
        t0 = time.perf_counter()
        contender.step()  # trace, compile (stateful: create the shadows), one step
        first_s = time.perf_counter() - t0
        print(f"#   {label}: first call {first_s:.2f} s", file=sys.stderr)
        for _ in range(WARMUP_STEPS):
            contender.step()
        methods.append(Method(label, contender.step, role=role, init_s=init_s, first_s=first_s))
    measure(methods, repeat, random.Random(seed))  # all were warmed up already
    for m, (_, _, contender, _) in zip(methods, made):
        before = contender.probe()
        contender.step()
        m.donated = before.is_deleted()
        m.step = released  # drop the closure: it holds this method's state
    return SetResult(name, len(shapes), total, largest, methods)


# -- the report -----------------------------------------------------------------------------


def package_versions() -> str:
    from importlib.metadata import version

    return f"jax {jax.__version__}, jaxlib {version('jaxlib')}, optax {optax.__version__}"


def header(repeat: int, results: list[SetResult], loads: tuple[str, str]) -> list[str]:
    return [
        f"## emacore (jax backend, {DEVICE.platform.upper()}) vs optax and hand-written jit: "
        f"one update step (float32, decay {DECAY})",
        "",
        f"- machine: {machine()}, emacore {emacore.__version__}; {package_versions()}",
        f"- device: {DEVICE} ({DEVICE.device_kind}); jax devices: "
        f"{', '.join(str(d) for d in jax.devices())}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')!r} (defaults kept)",
        "- sets: "
        + "; ".join(f"{r.name} ({r.tensors:,} tensors, {r.params:,} params)" for r in results),
        f"- params: a dict pytree of float32 `jax.Array`s; {PARAM_COPIES} pre-made copies passed "
        "in turn, a new pytree each step; every step blocks until its result is ready",
        f"- median of {repeat} interleaved repetitions (shuffled order); p25-p75 is the spread "
        "between repetitions; a fast method is looped to ~20 ms per repetition",
        "- x peer: time / the fastest peer's time on that set (below 1: faster); "
        "x floor: time / the flat floor's",
        f"- GB/s: {BYTES_PER_PARAM} bytes x parameters / median time",
        "- x copy: the copy's time / the method's, that is the share of the copy bandwidth the "
        "method reaches (both move 12 bytes a parameter)",
        "- init ms: creating the method's state, before its first call (stateful emacore: in "
        "its first call); first ms: the first call (trace, compile, one step); compile ms: "
        "first minus the median",
        "- donated: the largest array of the method's state was deleted by a step",
        f"- 1-minute load average before / after the run: {loads[0]} / {loads[1]} "
        f"(the machine has {os.cpu_count()} CPUs; above that, other processes competed)",
        "",
    ]


def results_table(results: list[SetResult]) -> list[str]:
    lines = [
        "| set | method | median ms | p25-p75 ms | x peer | x floor | x copy | GB/s | init ms | "
        "first ms | compile ms | donated |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        fastest = r.fastest_peer()
        floor_time = r.by_label()[FLOOR].median
        copy_time = r.by_label()[COPY].median
        for m in r.methods:
            lo, hi = m.quartiles()
            label = f"**{m.label}**" if m is fastest else m.label
            gbps = BYTES_PER_PARAM * r.params / m.median / 1e9
            init = "(in first)" if m.init_s is None else fmt_ms(m.init_s)
            donated = {None: "-", True: "yes", False: "NO"}[m.donated]
            lines.append(
                f"| {r.name} | {label} | {fmt_ms(m.median)} | {fmt_ms(lo)}-{fmt_ms(hi)} | "
                f"{m.median / fastest.median:.2f} | {m.median / floor_time:.2f} | "
                f"{copy_time / m.median:.2f} | {gbps:.1f} | "
                f"{init} | {fmt_ms(m.first_s)} | {fmt_ms(m.first_s - m.median)} | {donated} |"
            )
    lines += ["", "The fastest peer of each set is in bold."]
    return lines


def targets_table(results: list[SetResult]) -> list[str]:
    lines = [
        "",
        f"Targets: emacore <= {LARGE_TARGET:g}x the fastest peer's time on the large sets, "
        f">= {SMALL_TARGET:g}x faster than it on many small tensors; judged for each emacore "
        "row apart (functional: a state of one array per leaf, and a packed one):",
        "",
        "| set | fastest peer | target | stateful `apply` | met | functional in `jit` | met | "
        'functional, `layout="auto"` | met |',
        "|---|---|---|---:|---|---:|---|---:|---|",
    ]
    for r in results:
        fastest = r.fastest_peer()
        by_label = r.by_label()
        cells: list[str] = []
        for label in (STATEFUL, FUNCTIONAL, FUNCTIONAL_PACKED):
            ratio = by_label[label].median / fastest.median
            target, (cell,), met = speed_target([ratio], r.small, LARGE_TARGET, SMALL_TARGET)
            cells += [cell, "yes" if met else "NO"]
        lines.append(
            f"| {r.name} | {fastest.label} ({fmt_ms(fastest.median)} ms) | {target} | "
            f"{' | '.join(cells)} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    global DEVICE
    shapes = load_sets()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu", help="cpu (default), cuda or gpu")
    known, rest = pre.parse_known_args(argv)
    platform = {"cuda": "gpu"}.get(known.device, known.device)
    try:
        DEVICE = jax.devices(platform)[0]
    except RuntimeError as exc:
        print(f"--device {known.device}: jax has no such device: {exc}", file=sys.stderr)
        return 2
    args = parse_args(rest, (__doc__ or "").splitlines()[0], list(shapes), DEFAULT_REPEAT)

    jax.block_until_ready(
        jnp.ones(1, device=DEVICE) + 1
    )  # start the backend before any first call is timed
    load_before = load_average()
    results = []
    for name in args.sets:
        results.append(run_set(name, shapes[name], args.repeat, args.seed))
        gc.collect()  # free this set's parameters and every method's state before the next one

    report = [
        *header(args.repeat, results, (load_before, load_average())),
        *results_table(results),
        *targets_table(results),
    ]
    write_report(report, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
