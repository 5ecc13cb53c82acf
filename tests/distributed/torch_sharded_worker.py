"""Worker for tests/distributed/test_torch_sharded.py, run under ``torch.distributed.run``.

``train DIR``: FSDP2-sharded model on gloo/CPU; every EMA update runs under ``CommDebugMode``
and must communicate nothing; the averages (gathered whole, outside the EMA) are checked against
float64 math; ``swapped`` puts them in and takes them out; the EMA state is saved through
``torch.distributed.checkpoint`` (sharded) and the expected averages to ``DIR/expected.npz``.
``reload DIR``: any number of processes: a new EMA over the same model loads the sharded
checkpoint (resharded onto this world size) and must report the same averages; so must one
loaded from the portable (whole-array) export.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

import emacore


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def full(x: torch.Tensor) -> np.ndarray:
    return (x.full_tensor() if isinstance(x, DTensor) else x).detach().double().numpy()


def done(out: str, what: str) -> None:
    # a file per process: the processes share one stdout, where their prints interleave even
    # within a line (CI once read "ok trainok train 1\n 0")
    with open(os.path.join(out, f"ok {what}"), "w") as f:
        f.write(what)


def train(out: str) -> None:
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = emacore.EMA(0.75, zero_debias=True)
    ref: dict[str, np.ndarray] = {}
    prod = 1.0
    for step in range(4):
        if step:
            x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        with CommDebugMode() as comm:
            ema.apply(model)
        assert comm.get_total_counts() == 0, comm.get_comm_counts()
        for name, p in model.named_parameters():
            v = full(p)
            ref[name] = ref.get(name, np.zeros_like(v)) * 0.75 + 0.25 * v
        prod *= 0.75
    with CommDebugMode() as comm:
        averages = ema.average(model)
    assert comm.get_total_counts() == 0, comm.get_comm_counts()
    for name, avg in averages.items():
        assert isinstance(avg, DTensor), (name, type(avg))
        assert avg.placements == dict(model.named_parameters())[name].placements
        np.testing.assert_allclose(full(avg), ref[name] / (1 - prod), rtol=1e-6, atol=1e-7)
    live = {name: full(p) for name, p in model.named_parameters()}
    with ema.swapped(model):
        for name, p in model.named_parameters():
            np.testing.assert_allclose(full(p), ref[name] / (1 - prod), rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(full(p), live[name])
    # a model half sharded: refused before anything is tracked
    mixed = nn.Linear(2, 2)
    mixed.extra = nn.Parameter(torch.zeros(2))
    fully_shard(mixed, ignored_params={mixed.extra})
    try:
        emacore.EMA(0.5).apply(mixed)
    except ValueError as exc:
        assert "is a DTensor (sharded) but leaf" in str(exc), exc  # noqa: PT017 (no pytest here)
    else:
        raise AssertionError("a mix of sharded and plain parameters was accepted")
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=os.path.join(out, "ckpt"))
    # the portable export gathers each shadow whole: every process joins, rank 0's file counts
    emacore.save(ema, os.path.join(out, f"portable{dist.get_rank()}.safetensors"))
    if dist.get_rank() == 0:
        np.savez(os.path.join(out, "expected.npz"), **{k: v / (1 - prod) for k, v in ref.items()})
    done(out, f"train {dist.get_rank()}")


def reload(out: str) -> None:
    model = build()
    ema = emacore.EMA(0.75, zero_debias=True)
    ema.apply(model)  # shadows sharded for this world size, overwritten by the load
    state = {"ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(out, "ckpt"))
    ema.load_state_dict(state["ema"])
    expected = np.load(os.path.join(out, "expected.npz"))
    for name, avg in ema.average(model).items():
        np.testing.assert_allclose(full(avg), expected[name], rtol=1e-6, atol=1e-7)
    # the portable file, whole arrays, sharded again for this world size
    other = emacore.EMA(0.75, zero_debias=True)
    other.apply(model)
    emacore.load_into(other, os.path.join(out, "portable0.safetensors"))
    for name, avg in other.average(model).items():
        assert isinstance(avg, DTensor), (name, type(avg))
        np.testing.assert_allclose(full(avg), expected[name], rtol=1e-6, atol=1e-7)
    # a state dict sharded on another mesh is refused, naming the leaf
    if dist.get_world_size() == 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, distribute_tensor

        moved = ema.state_dict()
        rec = moved["leaves"]["0.weight"]
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("other",))
        rec["shadow"] = distribute_tensor(rec["shadow"].full_tensor(), mesh, [Replicate()])
        try:
            ema.load_state_dict(moved)
        except emacore.StateDictError as exc:
            assert "leaf '0.weight': it is sharded as" in str(exc), exc  # noqa: PT017
        else:
            raise AssertionError("a shadow sharded on another mesh was loaded")
    done(out, f"reload {dist.get_rank()} {dist.get_world_size()}")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        {"train": train, "reload": reload}[sys.argv[1]](sys.argv[2])
    finally:
        dist.destroy_process_group()
