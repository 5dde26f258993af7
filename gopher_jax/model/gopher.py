"""The Gopher decoder: embedding, pre-norm blocks (scanned or not), final RMSNorm, logits."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gopher_jax import names
from gopher_jax.config import d_ff
from gopher_jax.model import cross_entropy
from gopher_jax.model.attention import RelativeAttention, relative_sinusoids
from gopher_jax.model.layers import MLP, Dtype, Embed, RMSNorm, fan_in_init, param
from gopher_jax.parallel.rules import constrain

EMBED_ACT = ("act_batch", "act_length", "act_embed")
# A decode step's residual x [B, 1, D] keeps d_model whole: with it split over tensor
# (act_embed), XLA's partitioner (jax 0.10.2 on CPU, Shardy and GSPMD alike) swapped the rows
# of two batch shards in the step (tests/test_decode.py); a step saves nothing to split.
STEP_ACT = ("act_batch", "act_length", None)

# model.remat_policy -> what the backward pass may keep of each block's forward pass.
REMAT_POLICIES = {
    "none": None,  # no remat: everything is kept
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
names.check_table("model.remat_policy", REMAT_POLICIES, names.REMAT_POLICIES)


def compute_dtype(name: str, platform: str | None = None) -> Dtype:
    """'auto' is bfloat16 on TPU/GPU and float32 on CPU (where bf16 matmuls are slower)."""
    if name == "auto":
        platform = platform or jax.default_backend()
        return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


class Block(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, m: ml_collections.ConfigDict, param_dtype: Dtype, dtype: Dtype,
                 rngs: nnx.Rngs):
        out_scale = (2 * m.num_layers) ** -0.5  # residual branches summed over 2L additions
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps, param_dtype, rngs)
        self.attn = RelativeAttention(m.d_model, m.num_heads, m.head_dim, out_scale,
                                      param_dtype, dtype, rngs, block_q=m.attention_block_q,
                                      impl=m.attention_impl)
        self.mlp_norm = RMSNorm(m.d_model, m.norm_eps, param_dtype, rngs)
        self.mlp = MLP(m.d_model, d_ff(m), out_scale, param_dtype, dtype, rngs)

    def __call__(self, x: jax.Array, rel: jax.Array, segment_ids: jax.Array) -> jax.Array:
        return self.prefill(x, rel, segment_ids)[0]

    def _mlp(self, x: jax.Array, names: tuple[str | None, ...] = EMBED_ACT) -> jax.Array:
        with jax.named_scope("mlp"):
            return constrain(x + self.mlp(self.mlp_norm(x)), names)

    def prefill(self, x: jax.Array, rel: jax.Array, segment_ids: jax.Array
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, T, D], segment_ids [B, T] -> (the block's output, this layer's keys and
        values [B, T, H, K])."""
        # Named scopes label the ops in profiles (benchmarks/train_step.py --profile).
        with jax.named_scope("attention"):
            a, kv = self.attn.prefill(self.attn_norm(x), rel, segment_ids)
            x = constrain(x + a, EMBED_ACT)
        return self._mlp(x), kv

    def step(self, x: jax.Array, cache: tuple[jax.Array, jax.Array], r: jax.Array,
             pos: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, 1, D] at position `pos` against this layer's cache: see
        `RelativeAttention.step`."""
        with jax.named_scope("attention"):
            a, cache = self.attn.step(self.attn_norm(x), cache, r, pos, mask)
            x = constrain(x + a, STEP_ACT)
        return self._mlp(x, STEP_ACT), cache


class Gopher(nnx.Module):
    def __init__(self, m: ml_collections.ConfigDict, rngs: nnx.Rngs, platform: str | None = None):
        param_dtype, dtype = jnp.dtype(m.param_dtype), compute_dtype(m.dtype, platform)
        self.m, self.dtype = m, dtype
        self.embed = Embed(m.vocab_size, m.d_model, param_dtype, dtype, rngs)
        if m.scan_layers:
            @nnx.split_rngs(splits=m.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stack(rngs: nnx.Rngs) -> Block:
                return Block(m, param_dtype, dtype, rngs)

            self.blocks = stack(rngs)
        else:
            self.blocks = nnx.List([Block(m, param_dtype, dtype, rngs)
                                    for _ in range(m.num_layers)])
        self.final_norm = RMSNorm(m.d_model, m.norm_eps, param_dtype, rngs)
        if not m.tie_embeddings:
            self.unembed = param(rngs, fan_in_init(m.d_model), (m.vocab_size, m.d_model),
                                 ("vocab", "embed"), param_dtype)

    def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int -> final (normed) hidden states [B, T, D]. Any T: positions are
        relative."""
        m = self.m
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        rel = relative_sinusoids(tokens.shape[1], m.d_model, m.rel_pos_max_wavelength)
        with jax.named_scope("embed"):
            x = constrain(self.embed(tokens), EMBED_ACT)

        def block_fn(block: Block, x: jax.Array) -> jax.Array:
            return block(x, rel, segment_ids)

        if m.remat_policy != "none":
            block_fn = nnx.remat(block_fn, policy=REMAT_POLICIES[m.remat_policy],
                                 prevent_cse=not m.scan_layers)
        if m.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run(block: Block, x: jax.Array) -> jax.Array:
                return block_fn(block, x)

            x = run(self.blocks, x)
        else:
            for block in self.blocks:
                x = block_fn(block, x)
        return self.final_norm(x)

    def output_embedding(self) -> jax.Array:
        """[vocab, D] in the compute dtype: the embedding table when tied."""
        table = self.embed.table if self.m.tie_embeddings else self.unembed
        return table[...].astype(self.dtype)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int -> float32 logits [B, T, vocab]."""
        return self.logits(self.hidden(tokens, segment_ids))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final hidden states [B, T, D] -> float32 logits [B, T, vocab]."""
        with jax.named_scope("logits"):
            logits = jnp.einsum("btd,vd->btv", x, self.output_embedding(),
                                preferred_element_type=jnp.float32)
            return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def nll_sum(self, tokens: jax.Array, segment_ids: jax.Array, targets: jax.Array,
                weights: jax.Array) -> jax.Array:
        """Summed weighted next-token nll in nats (float32), without [B, T, vocab] logits kept
        for the backward pass: `cross_entropy.nll_sum` in chunks of `model.loss_chunk`."""
        x = self.hidden(tokens, segment_ids)
        with jax.named_scope("cross_entropy"):
            return cross_entropy.nll_sum(x, self.output_embedding(), targets, weights,
                                         self.m.loss_chunk)


def create(m: ml_collections.ConfigDict, seed: int | jax.Array = 0,
           platform: str | None = None) -> Gopher:
    """A concrete model (params on the default device). Sharded creation: `train/state.py`."""
    return Gopher(m, nnx.Rngs(params=seed), platform)


def abstract(m: ml_collections.ConfigDict, platform: str | None = None
             ) -> tuple[nnx.GraphDef, nnx.State]:
    """GraphDef and the abstract param State (shapes, dtypes, logical names), no allocation."""
    # jax.eval_shape rather than nnx.eval_shape: the latter turns logical names into mesh
    # shardings when a mesh is active, and logical names are not mesh axes.
    graphdefs = []

    def init() -> nnx.State:
        graphdef, state = nnx.split(Gopher(m, nnx.Rngs(params=0), platform))
        graphdefs.append(graphdef)
        return state

    state = jax.eval_shape(init)
    return graphdefs[0], state


def logical_axes(state: nnx.State) -> Any:
    """The pure-dict tree of logical axis names of every param."""
    names = jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), state,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.to_pure_dict(names)


def apply(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array,
          segment_ids: jax.Array | None = None) -> jax.Array:
    """Functional forward pass (logits) over a pure-dict param tree."""
    model = nnx.merge(graphdef, params)
    return model(tokens, segment_ids)


def nll_sum(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, segment_ids: jax.Array,
            targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Functional `Gopher.nll_sum` over a pure-dict param tree."""
    return nnx.merge(graphdef, params).nll_sum(tokens, segment_ids, targets, weights)
