"""The train state, born sharded: `Layout` gives its shardings, jit's out_shardings places it.

state = {"step": int32[], "params": tree, "opt_state": tree}. With train.master_fp32 the
params are stored in model.param_dtype (bf16) and opt_state holds {"master": fp32 params,
"tx": optax state}; the update runs on the master copy, which is sharded like the params.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from gopher_jax.model import gopher
from gopher_jax.train.optimizer import optimizer

State = dict[str, Any]


class Placement(Protocol):
    """Where a state is born: a `gopher_jax.layout.Layout` (which imports this module)."""

    mesh: Mesh
    state_shardings: State


def init_params(c: ml_collections.ConfigDict, seed: int | jax.Array, platform: str | None = None
                ) -> Any:
    return nnx.to_pure_dict(nnx.state(gopher.create(c.model, seed, platform)))


def init_state(c: ml_collections.ConfigDict, seed: int | jax.Array,
               platform: str | None = None) -> State:
    params = init_params(c, seed, platform)
    tx = optimizer(c.train)
    if c.train.master_fp32:
        master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        opt_state = {"master": master, "tx": tx.init(master)}
    else:
        opt_state = tx.init(params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}


def create_state(c: ml_collections.ConfigDict, layout: Placement) -> State:
    """The initial state, created directly in its shards (no host ever holds it whole)."""
    with jax.set_mesh(layout.mesh):
        return jax.jit(lambda: init_state(c, c.seed), out_shardings=layout.state_shardings)()
