"""Shard-local EMA vs gather-then-update on a sharded model (issue 6, item 3), 2 processes.

Run ``python benchmarks/bench_distributed.py`` (or ``nox -s bench_distributed``): it starts
itself under ``torch.distributed.run`` with 2 processes on gloo (CPU) and prints a markdown
table from rank 0.

The model holds the parameter shapes of one set of ``bench_shapes.json`` (default
``resnet50``: 161 tensors, 25.6M float32 parameters), each an ``nn.Parameter`` DTensor with
FSDP2's placement (``distribute_tensor(..., [Shard(0)])`` over the 2 processes). Side by
side, interleaved, it times one update step of:

1. emacore: ``ExponentialMovingAverage(0.999).apply(model)``: DTensor shadows, updated on
   each process's local shards;
2. gather-then-update, what diffusers does under ZeRO-3 and Composer under FSDP: every
   parameter gathered whole (``DTensor.full_tensor()``, an all-gather) and a full shadow on
   every process updated with ``lerp_``.

Per method: the median time of a step (``--repeat`` interleaved repetitions, after warm-up;
the two processes are synchronised with a barrier before and after each timed step, so a
sample is the slower process's time); the collectives counted by ``CommDebugMode`` during one
step; the bytes each process receives in one step (an all-gather of ``n`` float32 elements
over ``W`` processes brings ``4·n·(W−1)/W`` bytes to each); and the shadow memory each process
holds (its shadows' storage; the gather method also allocates a transient whole copy of each
parameter per step). The processes' peak RSS is reported too (rank 0; it includes the model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = Path(__file__).with_name("bench_shapes.json")


def _launch(argv: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        "--worker",
        *argv,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    import emacore

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    shapes = [tuple(s) for s in json.loads(SHAPES.read_text())["sets"][args.set]]
    gen = torch.Generator().manual_seed(0)
    model = nn.ParameterList(
        [
            nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh, [Shard(0)]))
            for s in shapes
        ]
    )
    n_params = sum(int(np.prod(s)) for s in shapes)

    ema = emacore.EMA(0.999)
    ema.apply(model)
    full_shadows = [p.full_tensor().clone() for p in model]

    def shard_local() -> None:
        ema.apply(model)

    def gather_then_update() -> None:
        with torch.no_grad():
            for s, p in zip(full_shadows, model):
                s.lerp_(p.full_tensor(), 0.001)

    methods = {"emacore shard-local": shard_local, "gather-then-update": gather_then_update}
    comms = {}
    for name, fn in methods.items():
        with CommDebugMode() as mode:
            fn()
        comms[name] = {str(k): v for k, v in mode.get_comm_counts().items()}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for rep in range(args.warmup + args.repeat):
        for name in order if rep % 2 else order[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            methods[name]()
            dist.barrier()
            if rep >= args.warmup:
                samples[name].append(time.perf_counter() - t0)
    local_shadow = sum(
        s.to_local().numel() * 4 for s in ema.state_dict()["leaves"].values() for s in [s["shadow"]]
    )
    shadow_bytes = {
        "emacore shard-local": local_shadow,
        "gather-then-update": sum(s.numel() * 4 for s in full_shadows),
    }
    received = {
        "emacore shard-local": 0,
        "gather-then-update": 4 * n_params * (world - 1) // world,
    }
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if rank == 0:
        base = statistics.median(samples["emacore shard-local"])
        print(f"## EMA update on an FSDP2-sharded model: {args.set}, {world} processes, gloo/CPU")
        print()
        print(f"- {len(shapes)} tensors, {n_params:,} float32 parameters, Shard(0) over {world}")
        print(f"- median of {args.repeat} interleaved repetitions, each between two barriers")
        print(f"- peak RSS of rank 0 (both methods, model included): {peak_rss / 2**20:.0f} MiB")
        print()
        print(
            "| method | median ms | x emacore | collectives per step | bytes received "
            "per process per step | shadow bytes per process |"
        )
        print("|---|---:|---:|---|---:|---:|")
        for name in methods:
            med = statistics.median(samples[name])
            counts = ", ".join(f"{k.split('.')[-1]} x{v}" for k, v in comms[name].items()) or "none"
            print(
                f"| {name} | {med * 1e3:.1f} | {med / base:.2f} | {counts} | "
                f"{received[name] / 2**20:.1f} MiB | {shadow_bytes[name] / 2**20:.1f} MiB |"
            )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set", default="resnet50", choices=["resnet50", "gpt2-small", "many-small"]
    )
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
    else:
        _launch([a for a in sys.argv[1:]])


if __name__ == "__main__":
    main()
