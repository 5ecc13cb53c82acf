"""What the benchmark scripts share: the parameter sets, the timing loop and the report's pieces.

``bench_update.py`` (numpy) and ``bench_torch.py`` (torch and its EMA libraries) import this
module by name (``import _harness``): a script run as ``python benchmarks/<script>.py`` has its
own folder on ``sys.path``. It is not part of emacore.

The timing methodology both scripts describe lives here: the methods are interleaved (each
repetition runs every method once, in a shuffled order), a repetition of a fast method loops it
enough times to last about ``MIN_SAMPLE_S`` and records the mean, and the garbage collector is off
while timing, as in ``timeit``. A report gives the median of the repetitions and the p25-p75
spread between them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHAPES_FILE = Path(__file__).with_name("bench_shapes.json")
MIN_SAMPLE_S = 0.02  # a fast method is looped so that one recorded sample lasts this long
SMALL_SET_MAX_TENSOR = 65_536  # a set whose largest tensor is smaller is "many small tensors"


@dataclass
class TimedMethod:
    """One timed contender: a no-argument callable doing one update step, and its samples."""

    label: str
    step: Callable[[], Any]
    samples: list[float] = field(default_factory=list)  # seconds per step, one per repetition
    inner: int = 1  # steps per recorded sample

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quartiles(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[0], q[2]


def load_sets(path: Path = SHAPES_FILE) -> dict[str, list[tuple[int, ...]]]:
    """The parameter sets of ``bench_shapes.json``: name -> the shapes of its tensors."""
    with path.open() as f:
        raw = json.load(f)["sets"]
    return {name: [tuple(s) for s in shapes] for name, shapes in raw.items()}


def parse_args(
    argv: Sequence[str] | None, description: str, sets: Sequence[str], default_repeat: int
) -> argparse.Namespace:
    """The command line both scripts take: ``--repeat``, ``--sets``, ``--markdown``, ``--seed``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--repeat", type=int, default=default_repeat, help="interleaved repetitions per method"
    )
    parser.add_argument(
        "--sets", nargs="+", choices=list(sets), default=list(sets), help="sets to run"
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the order")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


# -- timing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    """Turn the garbage collector off for the block (back on after it if it was on)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_once(fn: Callable[[], Any], inner: int, sync: Callable[[], Any] | None = None) -> float:
    """Seconds per call of ``fn()``, the mean of ``inner`` calls in a row.

    ``sync`` (e.g. ``torch.cuda.synchronize``) waits for the work queued on a device, before the
    clock starts and before it stops.
    """
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    if sync is not None:
        sync()
    return (time.perf_counter() - t0) / inner


def measure(
    methods: Sequence[TimedMethod],
    repeat: int,
    rng: random.Random,
    warmup: int = 0,
    sync: Callable[[], Any] | None = None,
) -> None:
    """Interleave the methods: each repetition runs all of them once, in a shuffled order.

    With the garbage collector off throughout: each method first runs ``warmup`` steps, then one
    timed step picks its inner loop count (so that a sample lasts about ``MIN_SAMPLE_S``); then
    ``repeat`` repetitions each append one sample to every method. ``sync``: see `time_once`.
    """
    with gc_off():
        for m in methods:  # warm up, then pick the inner loop count
            for _ in range(warmup):
                m.step()
            once = max(time_once(m.step, 1, sync), 1e-9)
            m.inner = max(1, math.ceil(MIN_SAMPLE_S / once))
        for _ in range(repeat):
            order = list(methods)
            rng.shuffle(order)
            for m in order:
                m.samples.append(time_once(m.step, m.inner, sync))


# -- the report -----------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    """Milliseconds with three or four significant digits."""
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_bytes(n: float) -> str:
    """Bytes in B, KiB or MiB."""
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if abs(n) >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n:.0f} B"


def load_average() -> str:
    """The 1-minute load average, a hint of how busy the (shared) machine was."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):  # not on every platform
        return "n/a"


def machine() -> str:
    """The machine, its CPU count and the Python version, for a report's header."""
    return (
        f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}"
    )


def speed_target(
    ratios: Sequence[float], small: bool, large_target: float, small_target: float
) -> tuple[str, list[str], bool]:
    """Judge emacore's times over a reference's (``ratios``) against the speed target.

    On a set of many small tensors (``small``) emacore must be at least ``small_target`` times
    faster than the reference, on the others take at most ``large_target`` times its time.
    Returns the target, a table cell per ratio and whether every ratio meets the target.
    """
    if small:
        target = f">= {small_target:g}x faster"
        met = all(1 / x >= small_target for x in ratios)
        cells = [f"{1 / x:.2f}x faster" if x <= 1 else f"{x:.2f}x slower" for x in ratios]
    else:
        target = f"<= {large_target:g}x the time"
        met = all(x <= large_target for x in ratios)
        cells = [f"{x:.2f}x the time" for x in ratios]
    return target, cells, met


def write_report(lines: Sequence[str], markdown: Path | None) -> None:
    """Print the report's lines, and write them to ``markdown`` too unless it is None."""
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if markdown is not None:
        markdown.write_text(text)
