"""An EMA of parameters sharded over a JAX mesh: run it with

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/jax_sharded_ema.py

Shadows keep each parameter's sharding (and may live in pinned host memory: add
``device="pinned_host"``), the compiled update contains no collective (the tests check its HLO),
and the old shadows are donated every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import emacore

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
params = {
    "w": jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("data", "model"))),
    "b": jax.device_put(jnp.zeros(32), NamedSharding(mesh, P("model"))),
}
ema = emacore.ExponentialMovingAverage(0.9)


@jax.jit
def train_step(params):  # stands in for a real step
    return jax.tree_util.tree_map(lambda p: p - 0.1 * jnp.sign(p + 0.5), params)


for _ in range(10):
    params = train_step(params)
    ema.apply(params)  # one compiled update per device set, shadows donated

avg = ema.average(params)
assert avg["w"].sharding == params["w"].sharding  # sharded like the parameter
print(avg["w"].sharding.spec, float(avg["b"][0]))
