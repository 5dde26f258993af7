"""Parameter counts and FLOPs of a config, computed on abstract shapes (nothing allocated)."""

from __future__ import annotations

import math

import jax
import ml_collections
from flax import nnx

from gopher_jax import config as config_lib
from gopher_jax.model import gopher


def count_params(c: ml_collections.ConfigDict) -> dict[str, int]:
    """Counts every parameter the model really has, from `jax.eval_shape` of its init."""
    _, state = gopher.abstract(c.model, platform="cpu")
    sizes = jax.tree.map(lambda v: math.prod(v.shape), nnx.to_pure_dict(state))
    total = sum(jax.tree.leaves(sizes))
    emb = math.prod(state["embed"]["table"].shape)
    if not c.model.tie_embeddings:
        emb += math.prod(state["unembed"].shape)
    return {"total": total, "non_embedding": total - emb, "embedding": emb}


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def params_report(c: ml_collections.ConfigDict) -> str:
    counts = count_params(c)
    fl = config_lib.flops_per_token(c.model, c.data.seq_len)
    m = c.model
    tokens = c.train.steps * c.train.batch_size * c.data.seq_len
    rows = [
        ("config", c.name),
        ("shape", f"layers={m.num_layers} heads={m.num_heads} kv={m.head_dim} "
                  f"d_model={m.d_model} d_ff={config_lib.d_ff(m)} vocab={m.vocab_size} "
                  f"tied={m.tie_embeddings}"),
        ("params total", f"{counts['total']:,} ({human(counts['total'])})"),
        ("params non-embedding", f"{counts['non_embedding']:,} ({human(counts['non_embedding'])})"),
        ("params embedding", f"{counts['embedding']:,}"),
        ("train FLOPs/token", f"{fl['train']:.4g} (seq_len {c.data.seq_len}; 6N = "
                              f"{6 * counts['total']:.4g})"),
        ("train tokens", f"{tokens:.4g} ({c.train.steps} steps x {c.train.batch_size} x "
                         f"{c.data.seq_len})"),
        ("train FLOPs", f"{fl['train'] * tokens:.4g}"),
    ]
    return "\n".join(f"{k:<22} {v}" for k, v in rows)
