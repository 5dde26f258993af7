"""A ladder of six Gopher-shaped models on the default corpus, for `python -m gopher_jax scaling`.

Every member sees the same 655,360 tokens in the same order (shared seed, data, steps and
batch); only the shape and the learning rate differ. Shapes follow Table 1's rules: feed-forward
4 x d_model, heads x key/value size = d_model (key/value size 32), depth growing with width.
Smaller models take larger peak learning rates, as in Table 1.

Budget: ~9e13 training FLOPs summed over the members (`python -m gopher_jax params` per
member), about 30 minutes on 2 quiet CPU cores.
"""

import ml_collections

from gopher_jax.config import base_config

# (num_layers, d_model, peak learning rate)
LADDER = (
    (2, 64, 5e-3),
    (3, 96, 4e-3),
    (4, 128, 3.5e-3),
    (5, 160, 3e-3),
    (6, 192, 2.5e-3),
    (8, 256, 2e-3),
)
HEAD_DIM = 32


def get_config():
    c = base_config()
    c.name = "scaling_ladder"
    # Shared by every member: the default corpus, tokenizer and context (experiments/default.py).
    c.model.update(vocab_size=8000, head_dim=HEAD_DIM, dtype="auto", remat_policy="none")
    c.data.seq_len = 128
    c.train.update(steps=320, batch_size=16, warmup_steps=32, b2=0.99, log_every=40,
                   eval_every=0, checkpoint_every=80, checkpoint_keep=1)
    c.members = ml_collections.ConfigDict()
    for layers, d_model, lr in LADDER:
        c.members[f"L{layers}_d{d_model}"] = {
            "model": {"num_layers": layers, "d_model": d_model,
                      "num_heads": d_model // HEAD_DIM, "head_dim": HEAD_DIM},
            "train": {"learning_rate": lr},
        }
    c.scaling = ml_collections.ConfigDict()
    c.scaling.eval_batches = -1  # -1: the whole validation and test splits
    return c
