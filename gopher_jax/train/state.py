"""The train state, born sharded: abstract shapes -> logical rules -> jit with out_shardings.

state = {"step": int32[], "params": tree, "opt_state": tree}. With train.master_fp32 the
params are stored in model.param_dtype (bf16) and opt_state holds {"master": fp32 params,
"tx": optax state}; the update runs on the master copy, which is sharded like the params.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gopher_jax.model import gopher
from gopher_jax.parallel import rules as rules_lib
from gopher_jax.train.optimizer import optimizer

State = dict[str, Any]


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


def param_specs(c: ml_collections.ConfigDict, platform: str | None = None) -> Any:
    """PartitionSpecs of every param under the config's rule set."""
    _, abstract_state = gopher.abstract(c.model, platform)
    rules = rules_lib.get_rules(c.mesh.rules)
    return jax.tree.map(lambda names: rules_lib.logical_to_spec(names, rules),
                        gopher.logical_axes(abstract_state), is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(c: ml_collections.ConfigDict, mesh: Mesh, platform: str | None = None
                    ) -> State:
    """Params by the rules; optimiser moments (and the master copy) like their params;
    counters replicated."""
    specs = param_specs(c, platform)
    psh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                       is_leaf=lambda x: isinstance(x, PartitionSpec))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda: init_state(c, 0, platform))
    tx = optimizer(c.train)

    def like_params(tx_state: Any) -> Any:
        return optax.tree_map_params(
            tx, lambda _, s: s, jax.tree.map(lambda _: replicated, tx_state), psh,
            transform_non_params=lambda _: replicated)

    if c.train.master_fp32:
        opt = {"master": psh, "tx": like_params(abstract["opt_state"]["tx"])}
    else:
        opt = like_params(abstract["opt_state"])
    return {"step": replicated, "params": psh, "opt_state": opt}


def abstract_state(c: ml_collections.ConfigDict, mesh: Mesh, platform: str | None = None
                   ) -> State:
    """ShapeDtypeStructs carrying the shardings of `mesh`: a restore or AOT target."""
    shapes = jax.eval_shape(lambda: init_state(c, 0, platform))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, state_shardings(c, mesh, platform))


def create_state(c: ml_collections.ConfigDict, mesh: Mesh) -> State:
    """The initial state, created directly in its shards (no host ever holds it whole)."""
    shardings = state_shardings(c, mesh)
    with jax.set_mesh(mesh):
        return jax.jit(lambda: init_state(c, c.seed), out_shardings=shardings)()
