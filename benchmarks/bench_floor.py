"""Is the torch benchmark's floor the machine's floor? Where the large-set targets lie against it.

Run ``python benchmarks/bench_floor.py`` (or ``nox -s bench_floor``); it prints a markdown report.
It needs gcc with OpenMP (on this machine's image) and torch; timm's ``ModelEmaV3`` is timed when
it imports.

``bench_torch.py`` judges emacore against a floor: one torch ``a.lerp_(b, w)`` over two flat
float32 buffers, which moves the 12 bytes a parameter every EMA update must move (read the
parameter, read and write the shadow). A floor measured with torch's own kernel could hide a
slow kernel, so this script sets beside it, in one interleaved run on each large set of
``bench_shapes.json``:

1. the same update written in C: one OpenMP loop ``a[i] += w * (b[i] - a[i])``, vectorised by
   ``gcc -O3 -march=native -fopenmp``, with as many threads as torch's intra-op pool (the
   machine's floor for this traffic, as far as a compiler gets it);
2. the C loop over the set's tensors as allocated one by one, all of them in one OpenMP
   region (each thread takes its share of the elements across the tensors): the best an
   update of separately allocated tensors can do, with no per-tensor start and join;
3. torch's flat ``lerp_`` (``bench_torch``'s floor) and ``torch._foreach_lerp_`` over the
   separate tensors (one kernel, parallel region and join per tensor);
4. the fastest peer of ``bench_torch`` on these sets, timm ``ModelEmaV3(foreach=True)``, and
   emacore's ``apply`` on the parameters as allocated and flattened.

jax is left out: its thread pool and torch's OpenMP threads, in one process, wait for work by
spinning and take the two cores from each other (a ``_foreach_lerp_`` then took 14x its time).
The C loops share torch's OpenMP runtime (``libgomp.so.1``, loaded by torch first), so one pool
of threads serves both.
Each row's time is divided by the faster of the two flat loops, C's and torch's (``x floor``):
the machine's floor for this traffic. The last table puts the issues' target, 0.95x the fastest
peer's time, against that floor: a target below 1.00x of it asks for an update faster than the
machine can move the bytes any update must move.

The C code is compiled into a temporary folder at run time and loaded with ``ctypes``; it is a
measuring stick, not part of emacore. Its result is checked against torch's ``lerp_``.
"""

from __future__ import annotations

import ctypes
import gc
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _harness import (
    TimedMethod,
    fmt_ms,
    load_average,
    load_sets,
    machine,
    measure,
    parse_args,
    write_report,
)
from torch import nn

import emacore
from emacore.integrations.flatten import flatten_parameters

DECAY = 0.999
WEIGHT = 1.0 - DECAY
TARGET = 0.95  # the issues' target on the large sets: <= 0.95x the fastest peer's time
DEFAULT_REPEAT = 41
LARGE_SETS = ["resnet50", "gpt2-small"]

C_SOURCE = r"""
#include <omp.h>

void lerp_flat(float *restrict a, const float *restrict b, long n, float w) {
    #pragma omp parallel for simd schedule(static)
    for (long i = 0; i < n; i++) a[i] += w * (b[i] - a[i]);
}

/* k tensors, one parallel region: thread t updates elements [t/T, (t+1)/T) of their total */
void lerp_many(float **a, float **b, const long *n, int k, float w) {
    long total = 0;
    for (int j = 0; j < k; j++) total += n[j];
    #pragma omp parallel
    {
        long t = omp_get_thread_num(), T = omp_get_num_threads();
        long lo = total * t / T, hi = total * (t + 1) / T, base = 0;
        for (int j = 0; j < k; j++) {
            long s = lo > base ? lo - base : 0, e = hi - base < n[j] ? hi - base : n[j];
            float *restrict x = a[j];
            const float *restrict y = b[j];
            #pragma omp simd
            for (long i = s; i < e; i++) x[i] += w * (y[i] - x[i]);
            base += n[j];
        }
    }
}
"""

C_FLAT = "C: one flat OpenMP loop (gcc -O3 -march=native)"
C_MANY = "C: one OpenMP region over the tensors as allocated"
TORCH_FLAT = "torch: one flat `a.lerp_(b, w)` (bench_torch's floor)"
TORCH_FOREACH = "torch: `_foreach_lerp_` over the tensors as allocated"
TIMM = "timm `ModelEmaV3(foreach=True)`"
EMACORE_LIST = "emacore `apply(list_of_params)`"
EMACORE_FLAT = "emacore `apply(model)`, parameters flattened"


def build_library(folder: Path) -> ctypes.CDLL:
    """Compile the C loops for this machine and load them."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("bench_floor needs gcc (or cc) with OpenMP to build its C floor")
    source, library = folder / "lerp.c", folder / "liblerp.so"
    source.write_text(C_SOURCE)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    subprocess.run([compiler, *flags, str(source), "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.lerp_flat.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_float]
    lib.lerp_many.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_float,
    ]
    return lib


def c_threads(lib: ctypes.CDLL) -> None:
    """Give the C loops' OpenMP runtime as many threads as torch's intra-op pool has."""
    set_threads = lib.omp_set_num_threads
    set_threads.argtypes = [ctypes.c_int]
    set_threads(torch.get_num_threads())


def check_c(lib: ctypes.CDLL) -> None:
    """The C loops compute what torch's lerp_ does (to float32 rounding)."""
    gen = torch.Generator().manual_seed(1)
    parts_a = [torch.randn(n, generator=gen) for n in (5, 70_000, 3, 1_000)]
    parts_b = [torch.randn(n, generator=gen) for n in (5, 70_000, 3, 1_000)]
    want = [a.clone().lerp_(b, WEIGHT) for a, b in zip(parts_a, parts_b)]
    flat_a, flat_b = torch.cat(parts_a), torch.cat(parts_b)
    lib.lerp_flat(flat_a.data_ptr(), flat_b.data_ptr(), flat_a.numel(), WEIGHT)
    many = c_many(lib, parts_a, parts_b)
    many()
    torch.testing.assert_close(flat_a, torch.cat(want), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(parts_a), torch.cat(want), rtol=1e-6, atol=1e-7)


def c_many(lib: ctypes.CDLL, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Any:
    """A step moving each tensor of ``a`` toward its peer in ``b``, in one OpenMP region."""
    k = len(a)
    ptrs_a = (ctypes.c_void_p * k)(*[t.data_ptr() for t in a])
    ptrs_b = (ctypes.c_void_p * k)(*[t.data_ptr() for t in b])
    sizes = (ctypes.c_long * k)(*[t.numel() for t in a])
    return lambda: lib.lerp_many(ptrs_a, ptrs_b, sizes, k, WEIGHT)


def timm_step(model: nn.Module) -> Callable[[], Any] | None:
    """timm's ModelEmaV3 update of ``model``; None when timm is not installed."""
    try:
        from bench_torch import _timm_model_ema_v3

        ema = _timm_model_ema_v3()(model, decay=DECAY, foreach=True)
    except ImportError:
        return None
    return lambda: ema.update(model)


def run_set(
    lib: ctypes.CDLL, shapes: list[tuple[int, ...]], repeat: int, seed: int
) -> list[TimedMethod]:
    """Every method of the module docstring on one set, warmed up, then interleaved."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.ParameterList(nn.Parameter(torch.randn(s, generator=gen)) for s in shapes)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    with torch.no_grad():
        shadows = [p.detach().clone() for p in params]
        c_shadows = [p.detach().clone() for p in params]
        for p in params:
            p.add_(1.0)  # so that s - p is not zero
    flat_a, flat_b = torch.zeros(total), torch.full((total,), 1e-3)
    flat_c = torch.zeros(total)
    ema_list = emacore.ExponentialMovingAverage(DECAY)
    twin = flatten_parameters(nn.ParameterList(nn.Parameter(p.detach().clone()) for p in params))
    ema_flat = emacore.ExponentialMovingAverage(DECAY)

    def foreach() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(shadows, params, WEIGHT)

    steps: dict[str, Callable[[], Any] | None] = {
        C_FLAT: lambda: lib.lerp_flat(flat_c.data_ptr(), flat_b.data_ptr(), total, WEIGHT),
        C_MANY: c_many(lib, c_shadows, params),
        TORCH_FLAT: lambda: flat_a.lerp_(flat_b, WEIGHT),
        TORCH_FOREACH: foreach,
        TIMM: timm_step(model),
        EMACORE_LIST: lambda: ema_list.apply(params),
        EMACORE_FLAT: lambda: ema_flat.apply(twin),
    }
    methods = [TimedMethod(label, step) for label, step in steps.items() if step is not None]
    for m in methods:  # shadows made, then warmed up
        for _ in range(4):
            m.step()
    measure(methods, repeat, random.Random(seed))
    return methods


def report(results: dict[str, tuple[int, list[TimedMethod]]], loads: tuple[str, str]) -> list[str]:
    """The report's lines: every method's time against the floor, then the targets'."""
    lines = [
        "## Is the floor the machine's? One EMA update step (float32, 12 bytes a parameter)",
        "",
        f"- machine: {machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads; the C loops get as many)",
        "- median of the interleaved repetitions; x floor: time / the faster flat loop's "
        "(C or torch), the machine's floor for this traffic",
        f"- 1-minute load average before / after the run: {loads[0]} / {loads[1]}",
        "",
        "| set | method | median ms | p25-p75 ms | x floor | GB/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    verdicts = []
    for name, (params, methods) in results.items():
        by = {m.label: m for m in methods}
        # the machine's floor: the faster of the two flat loops (neither kernel is privileged)
        floor_time = min(by[C_FLAT].median, by[TORCH_FLAT].median)
        for m in methods:
            lo, hi = m.quartiles()
            lines.append(
                f"| {name} | {m.label} | {fmt_ms(m.median)} | {fmt_ms(lo)}-{fmt_ms(hi)} | "
                f"{m.median / floor_time:.3f} | {12 * params / m.median / 1e9:.1f} |"
            )
        if TIMM in by:
            target = TARGET * by[TIMM].median
            verdicts.append(
                f"| {name} | {fmt_ms(by[TIMM].median)} ({by[TIMM].median / floor_time:.3f}x) | "
                f"{fmt_ms(target)} ({target / floor_time:.3f}x) | "
                f"{'below the floor' if target < floor_time else 'above the floor'} |"
            )
    if verdicts:
        lines += [
            "",
            f"The target, {TARGET:g}x the fastest peer's time (timm on both sets), against the "
            "floor:",
            "",
            "| set | timm (x floor) | target (x floor) | the target lies |",
            "|---|---:|---:|---|",
            *verdicts,
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    sets = load_sets()
    args = parse_args(argv, (__doc__ or "").splitlines()[0], LARGE_SETS, DEFAULT_REPEAT)
    before = load_average()
    with tempfile.TemporaryDirectory() as folder:
        lib = build_library(Path(folder))
        c_threads(lib)
        check_c(lib)
        results = {}
        for name in args.sets:
            print(f"# {name}", file=sys.stderr)
            params = sum(torch.Size(s).numel() for s in sets[name])
            results[name] = (params, run_set(lib, sets[name], args.repeat, args.seed))
            gc.collect()
    write_report(report(results, (before, load_average())), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
