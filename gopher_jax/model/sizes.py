"""The model's sizes: closed-form parameter counts and training FLOPs per token of a config,
the counts of the real module (on abstract shapes, nothing allocated), and their report."""

from __future__ import annotations

import math

import ml_collections

from gopher_jax import config as config_lib


def param_counts(m: ml_collections.ConfigDict) -> dict[str, int]:
    """Closed-form counts; `tests/test_model.py` checks them against the real module."""
    h = m.num_heads * m.head_dim
    per_layer = (
        3 * m.d_model * h  # q, k, v
        + h * m.d_model  # output
        + m.d_model * h  # relative-position projection
        + 2 * h  # u, v biases
        + 2 * m.d_model * config_lib.d_ff(m)  # MLP
        + 2 * m.d_model  # two RMSNorm scales
    )
    emb = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    non_emb = m.num_layers * per_layer + m.d_model
    return {"total": non_emb + emb, "non_embedding": non_emb, "embedding": emb}


def flops_per_token(m: ml_collections.ConfigDict, seq_len: int,
                    causal: bool = False) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward), without remat recompute.

    Matmuls count 2 FLOPs per multiply-add. Attention counts the full T x T score matrices
    (content and position terms) and the weighted sum of values: PaLM's convention
    (Chowdhery et al. 2022, appendix B), which ignores the causal mask. `causal=True` counts
    only the scores on or below the diagonal, (T + 1) / 2 keys per query: the useful work.
    The blocked attention (model/attention.py) computes between the two.
    """
    h = m.num_heads * m.head_dim
    keys = (seq_len + 1) / 2 if causal else seq_len
    proj = 2 * (4 * m.d_model * h + 2 * m.d_model * config_lib.d_ff(m))
    rel = 2 * m.d_model * h  # projecting one sinusoid per position
    attn = 2 * 3 * keys * h  # content scores, position scores, values
    head = 2 * m.d_model * m.vocab_size
    fwd = m.num_layers * (proj + rel + attn) + head
    return {"forward": float(fwd), "train": float(3 * fwd)}


def count_params(c: ml_collections.ConfigDict) -> dict[str, int]:
    """Counts every parameter the model really has, from `jax.eval_shape` of its init."""
    import jax  # here, so that the closed forms above need no jax
    from flax import nnx

    from gopher_jax.model import gopher

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
    fl = flops_per_token(c.model, c.data.seq_len)
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
