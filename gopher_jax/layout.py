"""Where a run's arrays live on the mesh, worked out once from (config, mesh).

A `Layout` holds the model's graphdef, the abstract train state with its shardings (params
by the logical rules, optimiser moments and the master copy like their params, counters
replicated) and the global batch's sharding and shapes. The step builders, AOT compilation,
the training loop, evaluation and the benchmarks take it rather than working these out again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gopher_jax.data import tokenized
from gopher_jax.model import gopher
from gopher_jax.parallel import rules as rules_lib
from gopher_jax.train.optimizer import optimizer
from gopher_jax.train.state import State, init_state


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: rules_lib.Rules
    graphdef: nnx.GraphDef
    state: State  # ShapeDtypeStructs carrying their shardings: a restore or AOT target
    state_shardings: State
    batch_sharding: NamedSharding  # dim 0 (rows) over the rule set's batch axes
    batch: dict[str, jax.ShapeDtypeStruct]  # the global training batch

    @property
    def param_shardings(self) -> Any:
        return self.state_shardings["params"]

    def with_params(self, params: Any) -> Layout:
        """This layout with the param shardings those of `params` (placed arrays whose tree
        may differ from the float params': int8 kernels, model/int8.py)."""
        shardings = jax.tree.map(lambda x: x.sharding, params)
        return dataclasses.replace(self, state_shardings={**self.state_shardings,
                                                          "params": shardings})

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @classmethod
    def build(cls, c: ml_collections.ConfigDict, mesh: Mesh, platform: str | None = None
              ) -> Layout:
        """The layout of config `c` on `mesh`; `platform` (default: the mesh's devices')
        resolves model.dtype 'auto'."""
        platform = platform or mesh.devices.flat[0].platform
        rules = rules_lib.get_rules(c.mesh.rules)
        graphdef, params = gopher.abstract(c.model, platform)
        specs = jax.tree.map(lambda names: rules_lib.logical_to_spec(names, rules),
                             gopher.logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))
        shapes = jax.eval_shape(lambda: init_state(c, 0, platform))
        shardings = _state_shardings(c, mesh, specs, shapes)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             shapes, shardings)
        rows = NamedSharding(mesh, rules_lib.logical_to_spec(("batch",), rules))
        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype)
                 in tokenized.batch_shapes(c.train.batch_size, c.data.seq_len).items()}
        return cls(mesh, rules, graphdef, state, shardings, rows, batch)

    @classmethod
    def of(cls, c: ml_collections.ConfigDict, layout_or_mesh: Layout | Mesh) -> Layout:
        """A Layout as given, or the layout of `c` on the given Mesh."""
        if isinstance(layout_or_mesh, Layout):
            return layout_or_mesh
        return cls.build(c, layout_or_mesh)


def _state_shardings(c: ml_collections.ConfigDict, mesh: Mesh, param_specs: Any,
                     shapes: State) -> State:
    psh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs,
                       is_leaf=lambda x: isinstance(x, PartitionSpec))
    replicated = NamedSharding(mesh, PartitionSpec())
    tx = optimizer(c.train)

    def like_params(tx_state: Any) -> Any:
        return optax.tree_map_params(
            tx, lambda _, s: s, jax.tree.map(lambda _: replicated, tx_state), psh,
            transform_non_params=lambda _: replicated)

    if c.train.master_fp32:
        opt = {"master": psh, "tx": like_params(shapes["opt_state"]["tx"])}
    else:
        opt = like_params(shapes["opt_state"])
    return {"step": replicated, "params": psh, "opt_state": opt}
