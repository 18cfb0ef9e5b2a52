"""Train state: fp32 params, optax optimizer state, fp32 EMA, step, RNG, non-finite counter."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps done
    params: Any  # trainable params (float32)
    opt_state: Any
    ema_params: Any  # float32, sharded like params
    rng: jax.Array  # uint32[2] raw key: checkpointable as a plain array
    nonfinite: jax.Array  # int32 scalar: consecutive non-finite steps skipped


def create_state(params, tx, rng) -> TrainState:
    """Pure constructor: jit it with out_shardings to build the state directly sharded."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params), rng=rng,
                      nonfinite=jnp.zeros((), jnp.int32))


def init_state(params, tx, rng, shardings: TrainState) -> TrainState:
    """The whole train state built under jit with out_shardings, from params already placed on
    the mesh (donated: the fp32 params are not held twice)."""
    params = jax.device_put(params, shardings.params)  # no-op when already placed
    return jax.jit(lambda p, r: create_state(p, tx, r), out_shardings=shardings,
                   donate_argnums=(0,))(params, rng)
