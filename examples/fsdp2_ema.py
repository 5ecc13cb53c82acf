"""An EMA of an FSDP2-sharded model, shard-local: run it with

    torchrun --standalone --nproc_per_node=2 examples/fsdp2_ema.py

(gloo on CPU here; use "nccl" and CUDA devices on GPUs). Every update touches only the local
shards (no collective); the averages are DTensors sharded like the parameters; evaluation
swaps them in; the EMA's state goes through torch.distributed.checkpoint, sharded.
"""

import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

import emacore

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
for layer in model:
    if isinstance(layer, nn.Linear):
        fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ema = emacore.ExponentialMovingAverage(0.99)

for _ in range(20):
    loss = model(torch.randn(8, 16)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    with CommDebugMode() as comm:
        ema.apply(model)  # after each optimizer step
    assert comm.get_total_counts() == 0  # shard-local: nothing communicated

with ema.swapped(model):  # evaluate with the averages, sharded like the parameters
    val = model(torch.ones(2, 16)).sum().item()

with tempfile.TemporaryDirectory() as tmp:  # a real run would use a shared path
    path = [tmp]
    dist.broadcast_object_list(path)  # every process writes to rank 0's directory
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=path[0])
    state = {"ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=path[0])  # loads into the (sharded) shadows
    ema.load_state_dict(state["ema"])
    dist.barrier()

if dist.get_rank() == 0:
    w = ema.average(model)["0.weight"]
    print(type(w).__name__, w.placements, tuple(w.to_local().shape), f"val={val:.4f}")
dist.destroy_process_group()
