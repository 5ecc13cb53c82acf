"""Time one EMA update step of emacore against hand-written numpy and the memory-bandwidth floor.

Run ``python benchmarks/bench_update.py`` (or ``nox -s bench_numpy``; ``nox -s bench`` runs it
with the torch and jax benchmarks into the report); it prints a markdown report.

For every parameter set of ``bench_shapes.json`` (next to this script; float32, decay 0.999) it
times, side by side in one run:

1. emacore's stateful API: ``ExponentialMovingAverage(0.999).apply(params)`` on a plain list of
   numpy arrays (after one warm-up ``apply`` that creates the shadows);
2. emacore's functional API: ``functional.update(state, params, 0.999, inplace=True)``;
3. the naive loop ``s *= d; s += (1 - d) * p`` over per-tensor shadows;
4. the best single-threaded hand-written update: three ufuncs per tensor writing into a
   preallocated scratch (``t = s - p; t *= 1 - d; s -= t``), the baseline of the targets;
5. a STREAM-like floor: ``np.add(a, b, out=a)`` over flat float32 buffers holding as many
   elements as the set has parameters, which moves the 12 bytes per parameter an update must
   move (read ``p``, read and write ``s``), on one thread and on as many threads as emacore uses.

Methodology: the machine this runs on is shared and noisy, so the methods are interleaved (each
repetition runs every method once, in a shuffled order) and the report gives the median of
``--repeat`` repetitions. A repetition of a fast method loops it enough times to last about
20 ms and records the mean. The garbage collector is off while timing, as in ``timeit``.
Peak extra memory per step is measured apart from the timings with ``tracemalloc``, to which
numpy reports its array-data allocations; the figures also include the Python objects a call
creates (lists of names, tuples), a few KiB per thousand tensors.

Threads: emacore's numpy backend spreads large updates over a thread pool (numpy releases the GIL
inside ufunc loops). The pool size is read from the environment variable ``EMACORE_NUM_THREADS``
when emacore's numpy backend is first loaded, default ``min(os.cpu_count(), 4)``; run for example
``EMACORE_NUM_THREADS=1 python benchmarks/bench_update.py`` to measure it single-threaded. The
emacore rows are compared with the floor measured on that many threads; the single-threaded
methods with the one-thread floor. The report's header says which values were used.

Memory: the GPT-2-small set has 124M parameters, 500 MB per float32 copy; it needs about 3.5 GB
(parameters, three sets of shadows, a scratch, two floor buffers). Sets are run one at a time and
freed in between.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import random
import sys
import tracemalloc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from _harness import (
    SMALL_SET_MAX_TENSOR,
    TimedMethod,
    fmt_bytes,
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
DTYPE = np.float32
DEFAULT_REPEAT = 31
LARGE_TARGET = 0.6  # emacore <= 0.6x the hand-written time on the large sets
SMALL_TARGET = 3.0  # emacore >= 3x faster than hand-written on the many-small set

STATEFUL = "emacore `ExponentialMovingAverage.apply`"
FUNCTIONAL = "emacore `functional.update(inplace=True)`"
NAIVE = "naive loop `s *= d; s += (1 - d) * p`"
HAND = "hand-written ufuncs with `out=` (1 thread)"


@dataclass(kw_only=True)
class Method(TimedMethod):
    """One timed contender and the floor it is compared with."""

    floor: str  # key of the floor it is compared with


@dataclass
class SetResult:
    """Everything measured on one parameter set."""

    name: str
    tensors: int
    params: int
    methods: list[Method]
    first_step_bytes: dict[str, int]
    steady_bytes: dict[str, int]


def emacore_threads() -> int:
    """The number of threads emacore's numpy backend was configured with."""
    # Private, read for the report only; fall back to the documented rule if it moves.
    threads = getattr(emacore.get_backend("numpy"), "_threads", None)
    if threads is None:
        env = os.environ.get("EMACORE_NUM_THREADS")
        threads = int(env) if env else min(os.cpu_count() or 1, 4)
    return max(1, int(threads))


def traced_peak(fn: Callable[[], Any]) -> int:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


class FunctionalStep:
    """``functional.update`` in place; keeps the returned state for the next step."""

    def __init__(self, params: list[np.ndarray]) -> None:
        self.params = params
        self.state: emacore.EMAState | None = None

    def first(self) -> None:
        state = functional.init(self.params)
        self.state = functional.update(state, self.params, DECAY, inplace=True)

    def __call__(self) -> None:
        assert self.state is not None
        self.state = functional.update(self.state, self.params, DECAY, inplace=True)


def naive_step(shadows: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Callable[[], None]:
    d = DECAY

    def step() -> None:
        for s, p in zip(shadows, params, strict=True):
            s *= d
            s += (1 - d) * p

    return step


def ufunc_step(shadows: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Callable[[], None]:
    """The hand-written update: one scratch sized for the largest tensor, a view per tensor."""
    scratch = np.empty(max(p.size for p in params), dtype=DTYPE)
    triples = [
        (s, p, scratch[: p.size].reshape(p.shape)) for s, p in zip(shadows, params, strict=True)
    ]
    c = DTYPE(1 - DECAY)
    subtract, multiply = np.subtract, np.multiply

    def step() -> None:
        for s, p, t in triples:
            subtract(s, p, out=t)
            multiply(t, c, out=t)
            subtract(s, t, out=s)

    return step


def floor_step(
    a: np.ndarray, b: np.ndarray, threads: int, pool: ThreadPoolExecutor | None
) -> Callable[[], None]:
    """``a += b`` over flat buffers (12 bytes per element), split in ``threads`` equal parts."""
    if threads == 1:
        add = np.add

        def step() -> None:
            add(a, b, out=a)

        return step
    assert pool is not None
    bounds = [a.size * k // threads for k in range(threads + 1)]
    parts = [(a[lo:hi], b[lo:hi]) for lo, hi in itertools.pairwise(bounds)]

    def step_threads() -> None:
        futures = [pool.submit(np.add, x, y, out=x) for x, y in parts[1:]]
        np.add(parts[0][0], parts[0][1], out=parts[0][0])
        for f in futures:
            f.result()

    return step_threads


def run_set(
    name: str,
    shapes: list[tuple[int, ...]],
    repeat: int,
    threads: int,
    pool: ThreadPoolExecutor | None,
    seed: int,
) -> SetResult:
    np_rng = np.random.default_rng(seed)
    params = [np_rng.standard_normal(shape, dtype=DTYPE) for shape in shapes]
    total = sum(p.size for p in params)
    print(f"# {name}: {len(params)} tensors, {total:,} parameters", file=sys.stderr)

    ema = emacore.ExponentialMovingAverage(DECAY)
    func = FunctionalStep(params)
    first = {STATEFUL: traced_peak(lambda: ema.apply(params)), FUNCTIONAL: traced_peak(func.first)}
    shadows = [p.copy() for p in params]  # shared by the naive and hand-written loops
    for p in params:  # so that s - p is not zero
        p += 1.0

    a = np.zeros(total, dtype=DTYPE)
    b = np.full(total, 1e-3, dtype=DTYPE)
    methods = [
        Method(STATEFUL, lambda: ema.apply(params), floor=f"{threads}T"),
        Method(FUNCTIONAL, func, floor=f"{threads}T"),
        Method(NAIVE, naive_step(shadows, params), floor="1T"),
        Method(HAND, ufunc_step(shadows, params), floor="1T"),
        Method("floor `np.add(a, b, out=a)`, 1 thread", floor_step(a, b, 1, None), floor="1T"),
    ]
    if threads > 1:
        methods.append(
            Method(
                f"floor `np.add(a, b, out=a)`, {threads} threads",
                floor_step(a, b, threads, pool),
                floor=f"{threads}T",
            )
        )
    measure(methods, repeat, random.Random(seed), warmup=1)
    steady = {m.label: traced_peak(m.step) for m in methods[:4]}
    return SetResult(name, len(params), total, methods, first, steady)


def header(
    repeat: int, threads: int, results: list[SetResult], loads: tuple[str, str]
) -> list[str]:
    from emacore_backends import numpy as backend_module

    env = os.environ.get("EMACORE_NUM_THREADS")
    return [
        "## emacore: one EMA update step (float32, decay 0.999)",
        "",
        f"- machine: {machine()}, numpy {np.__version__}, emacore {emacore.__version__}",
        f"- emacore numpy backend: {threads} threads (EMACORE_NUM_THREADS="
        f"{env if env else 'unset'}; default min(cpu_count, 4)); BLOCK={backend_module.BLOCK}, "
        f"SMALL={backend_module.SMALL}, THREAD_MIN={backend_module.THREAD_MIN}",
        "- sets: "
        + "; ".join(f"{r.name} ({r.tensors:,} tensors, {r.params:,} params)" for r in results),
        f"- median of {repeat} interleaved repetitions (shuffled order);"
        " p25-p75 is the spread between repetitions",
        "- floor: `np.add(a, b, out=a)` over flat float32 buffers of the set's size "
        "(12 bytes per parameter); `1T` = one thread, "
        f"`{threads}T` = split over {threads} threads. emacore rows use the {threads}T floor, "
        "the others the 1T floor",
        "- GB/s: 12 bytes x parameters / median time",
        f"- 1-minute load average before / after the run: {loads[0]} / {loads[1]} "
        f"(the machine has {os.cpu_count()} CPUs; above ~1, other processes competed)",
        "",
    ]


def results_table(results: list[SetResult]) -> list[str]:
    lines = [
        "| set | method | median ms | p25-p75 ms | x hand-written | x floor (which) | GB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        by_label = {m.label: m for m in r.methods}
        floors = {m.floor: m.median for m in r.methods if m.label.startswith("floor")}
        hand = by_label[HAND].median
        for m in r.methods:
            lo, hi = m.quartiles()
            gbps = 12 * r.params / m.median / 1e9
            lines.append(
                f"| {r.name} | {m.label} | {fmt_ms(m.median)} | {fmt_ms(lo)}-{fmt_ms(hi)} | "
                f"{m.median / hand:.2f} | {m.median / floors[m.floor]:.2f} ({m.floor}) | "
                f"{gbps:.1f} |"
            )
    return lines


def memory_table(results: list[SetResult]) -> list[str]:
    lines = [
        "",
        "Peak extra memory (tracemalloc: numpy array data and Python objects) of one step, "
        "after the first, and of the first step (which creates the shadows):",
        "",
        "| set | method | peak extra per step | first step | one copy of the params |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        for label, n in r.steady_bytes.items():
            first = r.first_step_bytes.get(label)
            lines.append(
                f"| {r.name} | {label} | {fmt_bytes(n)} | "
                f"{fmt_bytes(first) if first is not None else '-'} | "
                f"{fmt_bytes(r.params * np.dtype(DTYPE).itemsize)} |"
            )
    return lines


def targets_table(results: list[SetResult], shapes: dict[str, list[tuple[int, ...]]]) -> list[str]:
    lines = [
        "",
        "Targets: emacore <= 0.6x the hand-written time on the large sets, "
        ">= 3x faster than it on many small tensors:",
        "",
        "| set | target | stateful | functional | met |",
        "|---|---|---:|---:|---|",
    ]
    for r in results:
        by_label = {m.label: m for m in r.methods}
        hand = by_label[HAND].median
        ratios = [by_label[k].median / hand for k in (STATEFUL, FUNCTIONAL)]
        small = max(math.prod(s) for s in shapes[r.name]) < SMALL_SET_MAX_TENSOR
        target, cells, met = speed_target(ratios, small, LARGE_TARGET, SMALL_TARGET)
        lines.append(
            f"| {r.name} | {target} | {cells[0]} | {cells[1]} | {'yes' if met else 'NO'} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    shapes = load_sets()
    args = parse_args(argv, __doc__.splitlines()[0], list(shapes), DEFAULT_REPEAT)

    threads = emacore_threads()
    load_before = load_average()
    results = []
    with ThreadPoolExecutor(max_workers=max(1, threads - 1)) as pool:
        for name in args.sets:
            results.append(run_set(name, shapes[name], args.repeat, threads, pool, args.seed))
            gc.collect()  # free this set's arrays before the next one

    report = [
        *header(args.repeat, threads, results, (load_before, load_average())),
        *results_table(results),
        *memory_table(results),
        *targets_table(results, shapes),
    ]
    write_report(report, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
