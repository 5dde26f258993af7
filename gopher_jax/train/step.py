"""Loss, gradient accumulation over microbatches, and the optimiser update (one jitted step)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from gopher_jax.data import tokenized
from gopher_jax.layout import Layout
from gopher_jax.model import gopher
from gopher_jax.parallel import rules as rules_lib
from gopher_jax.train.optimizer import optimizer, schedule
from gopher_jax.train.state import State

Batch = dict[str, jax.Array]
LN2 = math.log(2.0)


def split_batch(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Chunks of seq_len + 1 tokens -> inputs, input segment ids, targets, target weights
    (the data format's `target_weights`: same document or a document-ending EOS)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    weights = tokenized.target_weights(tokens, seg)
    return tokens[:, :-1], seg[:, :-1], tokens[:, 1:], weights.astype(jnp.float32)


def loss_sums(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(summed nll in nats, summed target weight), cross-entropy in float32."""
    inputs, seg, targets, weights = split_batch(batch)
    return gopher.nll_sum(graphdef, params, inputs, seg, targets, weights), jnp.sum(weights)


# (graphdef, params, batch, extra) -> (the summed loss to differentiate, {name: summed
# metric}); the dict holds at least "nll" (the summed cross-entropy in nats) and "weight".
LossSums = Callable[[nnx.GraphDef, Any, Batch, Any], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss in place of the plain cross-entropy (train/distill.py): its `sums`, and `extra`,
    an input of every step that is not trained (a teacher's params), placed by
    `extra_shardings`. Its sums other than nll and weight become metrics (per target)."""

    sums: LossSums
    extra: Any = None
    extra_shardings: Any = None


def _ce_sums(graphdef: nnx.GraphDef, params: Any, batch: Batch, extra: Any
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del extra
    nll, w = loss_sums(graphdef, params, batch)
    return nll, {"nll": nll, "weight": w}


def gradients(graphdef: nnx.GraphDef, params: Any, batch: Batch, microbatches: int,
              batch_spec: PartitionSpec | None = None) -> tuple[Any, jax.Array, jax.Array]:
    """Gradients of the *summed* nll, the summed nll and the summed weight, accumulated over
    `microbatches` slices of the batch (sums make k slices of b equal one batch of k*b)."""
    g, _, sums = objective_gradients(graphdef, params, batch, microbatches, batch_spec)
    return g, sums["nll"], sums["weight"]


def objective_gradients(graphdef: nnx.GraphDef, params: Any, batch: Batch, microbatches: int,
                        batch_spec: PartitionSpec | None = None, sums: LossSums = _ce_sums,
                        extra: Any = None) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    """(gradients of the summed loss, the summed loss, its metric sums) of `sums`, accumulated
    like `gradients`."""
    k = microbatches

    def f(p: Any, b: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        return sums(graphdef, p, b, extra)

    if k == 1:
        (loss, aux), g = jax.value_and_grad(f, has_aux=True)(params, batch)
        return g, loss, aux

    # Microbatch i takes rows i, i+k, ...: every data shard holds rows of every microbatch.
    def micro(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        if jax.sharding.get_abstract_mesh().empty:
            return x
        spec = PartitionSpec(None, *(batch_spec or ()), *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, spec)

    def body(carry: Any, b: Batch) -> tuple[Any, None]:
        g_acc, loss_acc, aux_acc = carry
        (loss, aux), g = jax.value_and_grad(f, has_aux=True)(params, b)
        return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss,
                jax.tree.map(jnp.add, aux_acc, aux)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = jax.tree.map(lambda x: x[0], jax.tree.map(micro, batch))
    aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                        jax.eval_shape(f, params, first)[1])
    init = (zeros, jnp.zeros((), jnp.float32), aux0)
    (g, loss, aux), _ = jax.lax.scan(body, init, jax.tree.map(micro, batch))
    return g, loss, aux


def make_train_step(c: ml_collections.ConfigDict, layout: Layout | Mesh,
                    objective: Loss | None = None) -> Callable[[State, Batch], Any]:
    """A jitted (state, batch) -> (state, metrics) with donated state and the layout's
    shardings (a Mesh: the layout of `c` on it). With an `objective` the step minimises its
    loss ("loss" in the metrics; the cross-entropy is "ce_loss", bits_per_byte stays the
    cross-entropy's) and is a function calling the jitted one with objective.extra."""
    layout = Layout.of(c, layout)
    graphdef, rules = layout.graphdef, layout.rules
    tx, lr_fn = optimizer(c.train), schedule(c.train)
    batch_spec = layout.batch_sharding.spec
    sums = _ce_sums if objective is None else objective.sums

    def step(state: State, batch: Batch, extra: Any = None
             ) -> tuple[State, dict[str, jax.Array]]:
        with rules_lib.use_rules(rules):
            params = state["params"]
            g, loss, aux = objective_gradients(graphdef, params, batch, c.train.microbatches,
                                               batch_spec, sums, extra)
            nll, w = aux["nll"], aux["weight"]
        with rules_lib.use_rules(rules), jax.named_scope("optimizer"):
            denom = jnp.maximum(w, 1.0)
            g = jax.tree.map(lambda x: x.astype(jnp.float32) / denom, g)
            if c.train.master_fp32:
                master = state["opt_state"]["master"]
                updates, tx_state = tx.update(g, state["opt_state"]["tx"], master)
                master = optax.apply_updates(master, updates)
                opt_state = {"master": master, "tx": tx_state}
                new_params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)
            else:
                updates, opt_state = tx.update(g, state["opt_state"], params)
                new_params = optax.apply_updates(params, updates)
        nbytes = jnp.sum(batch["num_bytes"]).astype(jnp.float32)
        metrics = {
            "loss": loss / denom,
            "bits_per_byte": nll / LN2 / jnp.maximum(nbytes, 1.0),
            "grad_norm": optax.tree.norm(g),
            "learning_rate": lr_fn(state["step"]),
            "tokens": w,
        }
        if objective is not None:
            metrics["ce_loss"] = nll / denom
            metrics.update({k: v / denom for k, v in aux.items() if k not in ("nll", "weight")})
        new = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        return new, metrics

    shardings = layout.state_shardings
    if objective is None:
        return jax.jit(step, in_shardings=(shardings, layout.batch_sharding),
                       out_shardings=(shardings, layout.replicated), donate_argnums=(0,))
    jitted = jax.jit(step, in_shardings=(shardings, layout.batch_sharding,
                                         objective.extra_shardings),
                     out_shardings=(shardings, layout.replicated), donate_argnums=(0,))
    return lambda state, batch: jitted(state, batch, objective.extra)


def make_eval_step(c: ml_collections.ConfigDict, layout: Layout | Mesh
                   ) -> Callable[[Any, Batch], Any]:
    """(params, batch) -> (summed nll in nats, summed weight, summed bytes of weighted targets)."""
    layout = Layout.of(c, layout)
    graphdef, rules = layout.graphdef, layout.rules

    def step(params: Any, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        with rules_lib.use_rules(rules):
            nll, w = loss_sums(graphdef, params, batch)
        return nll, w, jnp.sum(batch["num_bytes"]).astype(jnp.float32)

    return jax.jit(step, in_shardings=(layout.param_shardings, layout.batch_sharding))
