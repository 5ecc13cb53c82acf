"""Time one EMA update step of emacore's torch backend against the PyTorch EMA libraries (CPU).

Run ``python benchmarks/bench_torch.py`` (or ``nox -s bench_torch``); it prints a markdown report.

For every parameter set of ``bench_shapes.json`` (next to this script: ResNet-50, GPT-2-small,
2,000 tensors of 256; float32, decay 0.999) it builds an ``nn.Module`` (an ``nn.ParameterList``)
holding ``nn.Parameter`` s of exactly the set's shapes and times, side by side in one run, one
update step of:

1. emacore, module path: ``ExponentialMovingAverage(0.999).apply(model)``;
2. emacore, list path: ``ExponentialMovingAverage(0.999).apply(params)`` on a plain list of the
   parameters (tracked by identity; the cached fast path);
   and the module path on a copy of the model whose parameters were first put in one buffer
   by ``emacore.integrations.flatten.flatten_parameters`` (the update is then one ``lerp_``);
3. by hand: ``torch._foreach_lerp_(shadows, params, 1 - d)`` under ``torch.no_grad()`` over
   lists built once (what the fused libraries run, without their bookkeeping);
4. the peers, each through its documented per-step call with a constant decay:
   timm ``ModelEmaV3(foreach=True).update(model)``; torch's
   ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)).update_parameters(model)``;
   torch_ema ``ExponentialMovingAverage(params, d, use_num_updates=False).update()``;
   ema-pytorch ``EMA(model, update_after_step=0, update_every=1).update()`` with its default
   per-tensor loop and with ``use_foreach=True``; diffusers
   ``EMAModel(params, foreach=True).step(params)``;
5. a floor: a single ``a.lerp_(b, 1 - d)`` over two flat contiguous float32 buffers holding as
   many elements as the set has parameters. It moves the 12 bytes per parameter an update must
   move (read ``p``, read and write ``s``) in one kernel call, so it is about the memory
   bandwidth floor, with torch's intra-op threads;
6. a copy, ``b.copy_(a)``, of 1.5 floats a parameter: the same 12 bytes, the device's copy
   bandwidth (``x copy`` is the share of it a method reaches).

``--device cuda`` runs all of it on the GPU instead (a sample then waits for the device with
``torch.cuda.synchronize`` before its clock starts and stops; allocations come from the CUDA
caching allocator's counters), and adds a table of the share of the copy bandwidth emacore
reaches on the large sets (the issue's aim on an H100: 85%). On a GPU machine without nox:
``EMACORE_TEST_BACKENDS=torch python -m pytest -m gpu tests/torch`` then
``PYTHONPATH=src:benchmarks python benchmarks/bench_torch.py --device cuda``.

Methodology: the machine this runs on is shared and noisy, so only ratios measured side by side
in one run mean anything. Every method is warmed up (the first step creates or copies the
shadows; a few more steps follow), then the methods are interleaved: each of ``--repeat``
repetitions runs every method once, in a shuffled order. A repetition of a fast method loops it
enough times to last about 20 ms and records the mean. The report gives the median and the
p25-p75 spread. The garbage collector is off while timing, as in ``timeit``. torch's thread
settings are left at their defaults; the header reports them.

Memory allocated per step (after the first) is measured apart from the timings: a few steps of
each method run under ``torch.profiler.profile(activities=[CPU], profile_memory=True)``, and the
report gives the bytes and the number of the allocations torch's CPU allocator recorded, per
step (each allocation's size is counted, whether or not it is freed within the step). Python
objects (lists, tuples) are not torch allocations and are not counted.

Targets (from the issue): on the two large sets, emacore at most 0.95x the time of the fastest
peer (the libraries of item 4; "by hand" is reported but is not a peer); on the many-small set
at least 3x faster than the fastest peer; no torch memory allocated per step after the first.
They are judged twice: for the two emacore rows on the parameters as allocated (both must meet
them), and for the row on flattened parameters.

Memory: the GPT-2-small set has 124M parameters, 500 MB per float32 copy. Each method keeps its
own shadows, so that set needs about 6.5 GB (parameters, ten shadow copies, two floor buffers,
diffusers' per-step temporaries). Sets are run one at a time and freed in between. A peer that is
not installed is skipped, and the report says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
from torch import nn
from torch.profiler import ProfilerActivity, profile

import emacore
from emacore.integrations.flatten import flatten_parameters

DECAY = 0.999
WEIGHT = 1.0 - DECAY
DEFAULT_REPEAT = 25
WARMUP_STEPS = 3  # steps after the first (which creates the shadows) before anything is measured
MEMORY_STEPS = 3  # steps profiled for the memory figures
LARGE_TARGET = 0.95  # emacore <= 0.95x the fastest peer's time on the large sets
SMALL_TARGET = 3.0  # emacore >= 3x faster than the fastest peer on the many-small set
BYTES_PER_PARAM = 12  # read p, read s, write s (float32)

EMACORE_MODULE = "emacore `apply(model)`"
EMACORE_LIST = "emacore `apply(list_of_params)`"
EMACORE_FLAT = "emacore `apply(model)`, parameters flattened"
HAND = "by hand `torch._foreach_lerp_`"
FLOOR = "floor: one flat `a.lerp_(b, w)`"
COPY = "copy: one flat `b.copy_(a)` of 12 bytes a parameter"
COPY_TARGET = 0.85  # on a GPU: emacore at >= 85% of the copy bandwidth (the H100 aim)

# where everything runs (`--device`); CPU unless asked
DEVICE = torch.device("cpu")

EMACORE, PEER, BASELINE = "emacore", "peer", "baseline"


@dataclass(kw_only=True)
class Method(TimedMethod):
    """One timed contender, its role and its torch allocations per step."""

    role: str  # EMACORE, PEER or BASELINE
    alloc_bytes: float | None = None  # torch CPU allocations per step, after the first
    alloc_count: float | None = None


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

    def fastest_peer(self) -> Method | None:
        peers = [m for m in self.methods if m.role == PEER]
        return min(peers, key=lambda m: m.median) if peers else None

    @property
    def small(self) -> bool:
        return self.largest < SMALL_SET_MAX_TENSOR


# -- the peers ------------------------------------------------------------------------------

# A peer factory takes (model, its parameter list) and returns the step callable; it creates
# the peer's shadows. Factories are looked up lazily so that a missing package only skips it.
PeerFactory = Callable[[nn.Module, list[nn.Parameter]], Callable[[], Any]]


def _timm_model_ema_v3() -> Any:
    """timm's ``ModelEmaV3``; by file path when ``import timm`` fails (torchvision missing)."""
    try:
        from timm.utils.model_ema import ModelEmaV3

        return ModelEmaV3
    except Exception:  # timm imports torchvision, which may not load beside this torch
        spec = importlib.util.find_spec("timm")  # locates the package without running it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("timm is not installed") from None
        path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
        file_spec = importlib.util.spec_from_file_location("_bench_timm_model_ema", path)
        if file_spec is None or file_spec.loader is None:
            raise ImportError(f"cannot load {path}") from None
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)  # it needs only torch
        return module.ModelEmaV3


def timm_v3(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    model_ema_v3 = _timm_model_ema_v3()
    ema = model_ema_v3(model, decay=DECAY, foreach=True)
    return lambda: ema.update(model)


def averaged_model(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    make_avg_fn: Callable[[float], Any] = get_ema_multi_avg_fn  # untyped in torch
    avg = AveragedModel(model, multi_avg_fn=make_avg_fn(DECAY))
    return lambda: avg.update_parameters(model)


def torch_ema(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(params, decay=DECAY, use_num_updates=False)
    return lambda: ema.update()


def _ema_pytorch(model: nn.Module, use_foreach: bool) -> Callable[[], Any]:
    from ema_pytorch import EMA

    ema = EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=use_foreach)
    return lambda: ema.update()


def ema_pytorch_loop(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    return _ema_pytorch(model, use_foreach=False)


def ema_pytorch_foreach(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    return _ema_pytorch(model, use_foreach=True)


def diffusers_ema(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=DECAY, foreach=True, use_ema_warmup=False)
    return lambda: ema.step(params)


PEERS: dict[str, PeerFactory] = {
    "timm `ModelEmaV3(foreach=True)`": timm_v3,
    "torch `AveragedModel(get_ema_multi_avg_fn)`": averaged_model,
    "torch_ema `ExponentialMovingAverage`": torch_ema,
    "ema-pytorch `EMA` (default loop)": ema_pytorch_loop,
    "ema-pytorch `EMA(use_foreach=True)`": ema_pytorch_foreach,
    "diffusers `EMAModel(foreach=True)`": diffusers_ema,
}


def package_versions() -> dict[str, str]:
    """Versions of the peers' packages (``-`` where one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("timm", "torch-ema", "ema-pytorch", "diffusers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "-"
    return out


# -- emacore, by hand, floor ----------------------------------------------------------------


def emacore_module(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    ema = emacore.ExponentialMovingAverage(DECAY)
    ema.apply(model)  # creates the shadows
    return lambda: ema.apply(model)


def emacore_list(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    ema = emacore.ExponentialMovingAverage(DECAY)
    ema.apply(params)  # creates the shadows
    return lambda: ema.apply(params)


def emacore_flattened(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    """The module path on a copy of the model whose parameters share one buffer."""
    twin = copy.deepcopy(model)
    flatten_parameters(twin)
    ema = emacore.ExponentialMovingAverage(DECAY)
    ema.apply(twin)  # creates the shadows
    with torch.no_grad():  # as run_set does to the others' parameters
        for p in twin.parameters():
            p.add_(1.0)
    return lambda: ema.apply(twin)


def by_hand(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], Any]:
    with torch.no_grad():
        shadows = [p.detach().clone() for p in params]
    targets: list[torch.Tensor] = list(params)
    lerp, no_grad = torch._foreach_lerp_, torch.no_grad

    def step() -> None:
        with no_grad():
            lerp(shadows, targets, WEIGHT)

    return step


def floor(total: int) -> Callable[[], Any]:
    a = torch.zeros(total, dtype=torch.float32, device=DEVICE)
    b = torch.full((total,), 1e-3, dtype=torch.float32, device=DEVICE)
    return lambda: a.lerp_(b, WEIGHT)


def copy_baseline(total: int) -> Callable[[], Any]:
    """A copy moving the 12 bytes a parameter an update moves: 1.5 floats read, 1.5 written."""
    n = total * 3 // 2
    a = torch.ones(n, dtype=torch.float32, device=DEVICE)
    b = torch.empty(n, dtype=torch.float32, device=DEVICE)
    return lambda: b.copy_(a)


def sync() -> Callable[[], Any] | None:
    """What waits for the device's queued work (None on CPU, where calls return when done)."""
    return torch.cuda.synchronize if DEVICE.type == "cuda" else None


def released() -> None:
    raise RuntimeError("this method's shadows were freed after its set was measured")


# -- measuring ------------------------------------------------------------------------------


class Model(nn.Module):
    """The parameters of one set, as a module (peers want a model or a parameter iterable)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.params = nn.ParameterList(
            nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32).to(DEVICE))
            for shape in shapes
        )


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs every start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocations(fn: Callable[[], Any], steps: int) -> tuple[float, float]:
    """(bytes, count) of the torch allocations of one ``fn()``, averaged over ``steps``.

    On CPU from the profiler's memory records; on CUDA from the caching allocator's counters
    (every allocation it served, freed or not).
    """
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats(DEVICE)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        after = torch.cuda.memory_stats(DEVICE)
        key_bytes, key_count = "allocated_bytes.all.allocated", "allocation.all.allocated"
        return (
            (after[key_bytes] - before[key_bytes]) / steps,
            (after[key_count] - before[key_count]) / steps,
        )
    with (
        quiet_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        for _ in range(steps):
            fn()
    total = count = 0
    # every allocation is a "[memory]" record with a positive size (a free: negative)
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]" and event.nbytes() > 0:
            total += event.nbytes()
            count += 1
    return total / steps, count / steps


def run_set(
    name: str, shapes: list[tuple[int, ...]], repeat: int, seed: int, skipped: dict[str, str]
) -> SetResult:
    model = Model(shapes, seed)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    largest = max(p.numel() for p in params)
    print(f"# {name}: {len(params)} tensors, {total:,} parameters", file=sys.stderr)

    factories: list[tuple[str, str, PeerFactory]] = [
        (EMACORE_MODULE, EMACORE, emacore_module),
        (EMACORE_LIST, EMACORE, emacore_list),
        (EMACORE_FLAT, EMACORE, emacore_flattened),
        (HAND, BASELINE, by_hand),
        *((label, PEER, factory) for label, factory in PEERS.items()),
    ]
    methods = []
    for label, role, factory in factories:
        if label in skipped:
            continue
        try:
            step = factory(model, params)
        except ImportError as exc:
            skipped[label] = f"not importable: {exc}"
            print(f"#   skipped {label}: {exc}", file=sys.stderr)
            continue
        methods.append(Method(label, step, role=role))
    methods.append(Method(FLOOR, floor(total), role=BASELINE))
    methods.append(Method(COPY, copy_baseline(total), role=BASELINE))

    with torch.no_grad():  # so that s - p is not zero; shadows were copied from the params
        for p in params:
            p.add_(1.0)
    for m in methods:  # the first step (copies, for some peers), then the warm-up
        for _ in range(1 + WARMUP_STEPS):
            m.step()
    measure(methods, repeat, random.Random(seed), sync=sync())  # all were warmed up already
    for m in methods:
        m.alloc_bytes, m.alloc_count = allocations(m.step, MEMORY_STEPS)
        m.step = released  # drop the closure: it holds this method's shadows
    return SetResult(name, len(params), total, largest, methods)


# -- the report -----------------------------------------------------------------------------


def fmt_alloc(m: Method) -> str:
    if m.alloc_bytes is None or m.alloc_count is None:
        return "-"
    if m.alloc_count == 0:
        return "0"
    return f"{fmt_bytes(m.alloc_bytes)} in {m.alloc_count:g}"


def header(
    repeat: int, results: list[SetResult], loads: tuple[str, str], skipped: dict[str, str]
) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    lines = [
        f"## emacore (torch backend, {where()}) vs PyTorch EMA libraries: one update step "
        f"(float32, decay {DECAY})",
        "",
        f"- machine: {machine()}, torch {torch.__version__}, emacore {emacore.__version__}; "
        f"{versions}",
        f"- device: {DEVICE}"
        + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else ""),
        f"- torch threads: {torch.get_num_threads()} intra-op, "
        f"{torch.get_num_interop_threads()} inter-op (defaults kept)",
        "- sets: "
        + "; ".join(f"{r.name} ({r.tensors:,} tensors, {r.params:,} params)" for r in results),
        f"- median of {repeat} interleaved repetitions (shuffled order); p25-p75 is the spread "
        "between repetitions; a fast method is looped to ~20 ms per repetition",
        "- x peer: time / the fastest peer's time on that set (below 1: faster); "
        "x floor: time / the flat `lerp_` floor's",
        f"- GB/s: {BYTES_PER_PARAM} bytes x parameters / median time",
        "- alloc/step: torch allocations per step after the first (bytes in how many), over "
        f"{MEMORY_STEPS} steps: on CPU from `torch.profiler` with `profile_memory=True`, on "
        "CUDA from the caching allocator's counters",
        "- x copy: the copy's time / the method's, that is the share of the copy bandwidth the "
        "method reaches (both move 12 bytes a parameter)",
        f"- 1-minute load average before / after the run: {loads[0]} / {loads[1]} "
        f"(the machine has {os.cpu_count()} CPUs; above that, other processes competed)",
    ]
    lines.extend(f"- skipped {label}: {why}" for label, why in skipped.items())
    lines.append("")
    return lines


def results_table(results: list[SetResult]) -> list[str]:
    lines = [
        "| set | method | median ms | p25-p75 ms | x peer | x floor | x copy | GB/s | alloc/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fastest = r.fastest_peer()
        floor_time = r.by_label()[FLOOR].median
        copy_time = r.by_label()[COPY].median
        for m in r.methods:
            lo, hi = m.quartiles()
            peer = f"{m.median / fastest.median:.2f}" if fastest is not None else "-"
            label = f"**{m.label}**" if m is fastest else m.label
            gbps = BYTES_PER_PARAM * r.params / m.median / 1e9
            lines.append(
                f"| {r.name} | {label} | {fmt_ms(m.median)} | {fmt_ms(lo)}-{fmt_ms(hi)} | "
                f"{peer} | {m.median / floor_time:.2f} | {copy_time / m.median:.2f} | "
                f"{gbps:.1f} | {fmt_alloc(m)} |"
            )
    lines += ["", "The fastest peer of each set is in bold."]
    return lines


def targets_table(results: list[SetResult]) -> list[str]:
    lines = [
        "",
        f"Targets: emacore <= {LARGE_TARGET:g}x the fastest peer's time on the large sets, "
        f">= {SMALL_TARGET:g}x faster than it on many small tensors, and no torch allocation "
        "per step after the first. Parameters as the model allocated them (one by one), and "
        "flattened into one buffer first (`emacore.integrations.flatten.flatten_parameters`):",
        "",
        "| set | fastest peer | target | `apply(model)` | `apply(list)` | met | "
        "`apply(model)`, flattened | met flattened | no alloc met |",
        "|---|---|---|---:|---:|---|---:|---|---|",
    ]
    for r in results:
        fastest = r.fastest_peer()
        by_label = r.by_label()
        labels = (EMACORE_MODULE, EMACORE_LIST, EMACORE_FLAT)
        no_alloc = all(by_label[k].alloc_count == 0 for k in labels if k in by_label)
        if fastest is None:
            lines.append(f"| {r.name} | (no peer ran) | - | - | - | - | - | - | {no_alloc} |")
            continue
        cells: list[str] = []
        for group in ((EMACORE_MODULE, EMACORE_LIST), (EMACORE_FLAT,)):
            ratios = [by_label[k].median / fastest.median for k in group if k in by_label]
            target, group_cells, group_met = speed_target(
                ratios, r.small, LARGE_TARGET, SMALL_TARGET
            )
            cells += [*group_cells, "yes" if group_met and ratios else "NO"]
        lines.append(
            f"| {r.name} | {fastest.label} ({fmt_ms(fastest.median)} ms) | {target} | "
            f"{' | '.join(cells)} | {'yes' if no_alloc else 'NO'} |"
        )
    return lines


def where() -> str:
    return "CUDA" if DEVICE.type == "cuda" else "CPU"


def copy_table(results: list[SetResult]) -> list[str]:
    """On a GPU: the share of the copy bandwidth each emacore row reaches on the large sets."""
    if DEVICE.type != "cuda":
        return []
    lines = [
        "",
        f"GPU aim: emacore at >= {COPY_TARGET:.0%} of the copy bandwidth measured in the same run "
        "(the large sets; many small tensors are bound by launches, not bandwidth):",
        "",
        "| set | copy GB/s | `apply(model)` | `apply(list)` | `apply(model)`, flattened | "
        "met (best row) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.small:
            continue
        by_label = r.by_label()
        copy_time = by_label[COPY].median
        shares = [
            copy_time / by_label[k].median for k in (EMACORE_MODULE, EMACORE_LIST, EMACORE_FLAT)
        ]
        cells = " | ".join(f"{x:.0%}" for x in shares)
        gbps = BYTES_PER_PARAM * r.params / copy_time / 1e9
        met = "yes" if max(shares) >= COPY_TARGET else "NO"
        lines.append(f"| {r.name} | {gbps:.0f} | {cells} | {met} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    global DEVICE
    shapes = load_sets()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    known, rest = pre.parse_known_args(argv)
    DEVICE = torch.device(known.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {known.device}: torch sees no CUDA device", file=sys.stderr)
        return 2
    args = parse_args(rest, (__doc__ or "").splitlines()[0], list(shapes), DEFAULT_REPEAT)

    load_before = load_average()
    skipped: dict[str, str] = {}
    results = []
    for name in args.sets:
        results.append(run_set(name, shapes[name], args.repeat, args.seed, skipped))
        gc.collect()  # free this set's model and every method's shadows before the next one

    report = [
        *header(args.repeat, results, (load_before, load_average()), skipped),
        *results_table(results),
        *targets_table(results),
        *copy_table(results),
    ]
    write_report(report, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
