"""Worker for tests/distributed/test_jax_multiprocess.py: one of 2 JAX processes on CPU.

``python jax_multiprocess_worker.py PORT PROCESS_ID DIR``: joins a 2-process
``jax.distributed`` run (gloo CPU collectives), makes a parameter sharded over both
processes' devices, and checks that the EMA keeps its sharding, that the compiled update
contains no collective, and that the averages of this process's shards are right; then saves
the EMA through orbax (each process its shards, into ``DIR``) and restores it replicated.
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: str, process_id: str, out: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id)
    )
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import emacore

    assert jax.process_count() == 2 and len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    whole = np.arange(32.0, dtype=np.float32).reshape(8, 4)

    def make(k: float) -> jax.Array:
        return jax.make_array_from_callback(whole.shape, sharding, lambda idx: whole[idx] + k)

    ema = emacore.EMA(0.5)
    ema.apply({"w": make(0.0)})
    ema.apply({"w": make(2.0)})
    avg = ema.average({"w": make(0.0)})["w"]
    assert avg.sharding == sharding, avg.sharding
    assert not avg.is_fully_addressable
    for shard in avg.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), (whole + 1.0)[shard.index])
    (group,) = ema._groups.values()
    part = group.state.shadow.plan.parts[0]
    hlo = part.jitted[True].lower(group.state.shadow.arrays, [make(0.0)], 0.5).compile()
    text = hlo.as_text()
    assert not any(op in text for op in ("all-gather", "all-reduce", "collective-permute")), text
    # the same update, written the gather-then-update way, does communicate: the check bites
    gathered = jax.jit(lambda s, p: s + 0.5 * (p - s), out_shardings=NamedSharding(mesh, P()))
    text = gathered.lower(avg, make(0.0)).compile().as_text()
    assert "all-gather" in text or "all-reduce" in text, text
    # sharded save (each process writes its shards), restored replicated instead
    from emacore.integrations import orbax as eo

    eo.save(ema, f"{out}/ema")
    replicated = NamedSharding(mesh, P())
    zeros = jax.make_array_from_callback(whole.shape, replicated, lambda idx: 0 * whole[idx])
    other = emacore.EMA(0.5)
    other.apply({"w": zeros})
    eo.load_into(other, f"{out}/ema")
    back = other.average({"w": zeros})["w"]
    assert back.sharding == replicated, back.sharding
    for shard in back.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), whole + 1.0)
    print("ok", jax.process_index(), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
