"""Several decays at once: one EMA with K profiles against K separate EMAs (issue 5, item 4).

Run ``python benchmarks/bench_profiles.py [--backends numpy torch jax]`` (or
``nox -s bench_profiles``); it prints a markdown table.

For every backend importable here and every parameter set of ``bench_shapes.json`` (float32),
it times, side by side in one run, one update step of:

1. ``ExponentialMovingAverage((0.999, 0.9999, ...))``: K profiles, one ``apply``;
2. K separate ``ExponentialMovingAverage`` objects, each applied once per step,

for K = 2 and K = 4. numpy and torch get a plain list of arrays updated in place (the same
objects every step, as a training loop passes them); jax gets a dict of arrays, a new one each
step, and every step blocks until the new shadows are ready. Methodology as the other scripts
(``_harness``): interleaved repetitions in a shuffled order, fast methods looped to ~20 ms per
sample, medians with the p25-p75 spread, garbage collector off. Only ratios measured side by
side in one run mean anything on this shared, noisy machine.

One EMA with K profiles reads the parameters once per step for all of its profiles (numpy:
block by block; torch: the small parameters are gathered once; jax: one compiled loop), where K
separate EMAs read them K times and pay K times the per-step overhead.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _harness import TimedMethod, fmt_ms, load_average, load_sets, machine, measure, write_report

import emacore

DECAYS = (0.999, 0.9999, 0.99, 0.9995)
KS = (2, 4)


def _stepper(backend: str, shapes: list[tuple[int, ...]], rng: np.random.Generator) -> Any:
    """(make params, next params each step, wait for the shadows) for one backend."""
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if backend == "numpy":
        params = [v.copy() for v in values]
        return params, lambda: params, lambda ema: None
    if backend == "torch":
        import torch

        tparams = [torch.from_numpy(v.copy()) for v in values]
        return tparams, lambda: tparams, lambda ema: None
    import jax
    import jax.numpy as jnp

    copies = [{f"{i:04d}": jnp.asarray(v) + k for i, v in enumerate(values)} for k in range(2)]
    turn = [0]

    def nxt() -> Any:
        turn[0] ^= 1
        return copies[turn[0]]

    def wait(ema: Any) -> None:
        for group in ema._groups.values():
            for lane in group.lanes:
                jax.block_until_ready(getattr(lane.shadow, "arrays", lane.shadow))

    return copies[0], nxt, wait


def _methods(backend: str, shapes: list[tuple[int, ...]], k: int) -> list[TimedMethod]:
    rng = np.random.default_rng(0)
    first, nxt, wait = _stepper(backend, shapes, rng)
    multi = emacore.EMA(DECAYS[:k])
    separate = [emacore.EMA(d) for d in DECAYS[:k]]
    multi.apply(first)
    for ema in separate:
        ema.apply(first)

    def one() -> None:
        multi.apply(nxt())
        wait(multi)

    def many() -> None:
        params = nxt()
        for ema in separate:
            ema.apply(params)
        for ema in separate:
            wait(ema)

    return [
        TimedMethod(f"{backend} K={k}: one EMA, {k} profiles", one),
        TimedMethod(f"{backend} K={k}: {k} separate EMAs", many),
    ]


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    available = [
        b for b in ("numpy", "torch", "jax") if b == "numpy" or importlib.util.find_spec(b)
    ]
    parser.add_argument(
        "--backends", nargs="+", default=available, choices=("numpy", "torch", "jax")
    )
    parser.add_argument("--sets", nargs="+", default=["resnet50", "many-small"])
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    sets = load_sets()
    lines = [
        "## One EMA with K decay profiles vs K separate EMAs (float32, one update step)",
        "",
        f"- machine: {machine()}",
        f"- median of {args.repeat} interleaved repetitions; x: one EMA's time / K EMAs' time",
        "",
        "| set | backend | K | one EMA, K profiles | K separate EMAs | x |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rng = random.Random(0)
    for name in args.sets:
        for backend in args.backends:
            for k in KS:
                methods = _methods(backend, sets[name], k)
                measure(methods, args.repeat, rng, warmup=2)
                one, many = methods
                lines.append(
                    f"| {name} | {backend} | {k} | {fmt_ms(one.median)} | {fmt_ms(many.median)} "
                    f"| {one.median / many.median:.2f} |"
                )
                del methods
                gc.collect()
    lines += ["", f"- load average before/after: {load_average()}"]
    write_report(lines, None if args.markdown is None else Path(args.markdown))


if __name__ == "__main__":
    main(sys.argv[1:])
