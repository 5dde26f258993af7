"""An IsoFLOP ladder (Hoffmann et al. 2022, approach 2) small enough for 2 CPU cores:
three FLOP budgets, five to seven Gopher-shaped sizes on each, for `python -m gopher_jax
scaling`.

For a budget C, size N trains on D = C / (train FLOPs per token of N) tokens (model/sizes.py:
about 7 N at this context, N counting every parameter), read as a prefix of the one token
stream every member shares (seed 0, 8 x 128 tokens a step). Shapes follow Table 1's rules:
feed-forward 4 x d_model, heads x key/value size (16) = d_model, depth growing with width;
smaller models take larger peak learning rates. A 1,024-piece vocabulary keeps the embedding
from dominating models this small.

Budget: 2.21e13 training FLOPs over the 17 members, about 11 minutes of training on 2 CPU
cores (10.0 min measured for the first 15; `scaling run` also evaluates each member).
"""

import ml_collections

from gopher_jax.config import base_config

HEAD_DIM = 16
# name -> (num_layers, d_model, peak learning rate)
SIZES = {
    "L1_d16": (1, 16, 6e-3),
    "L1_d32": (1, 32, 5e-3),
    "L2_d32": (2, 32, 5e-3),
    "L2_d48": (2, 48, 4e-3),
    "L2_d64": (2, 64, 4e-3),
    "L3_d96": (3, 96, 3e-3),
    "L4_d128": (4, 128, 2.5e-3),
    "L5_d160": (5, 160, 2e-3),
}
# name -> (training FLOPs, the sizes trained on it)
BUDGETS = {
    # The two smallest sizes were added after a first run put this budget's minimum at
    # L1_d32, its smallest size then: a profile needs sizes on both sides of its minimum.
    "C3e11": (3e11, "L1_d16,L1_d32,L2_d32,L2_d48,L2_d64,L3_d96,L4_d128"),
    "C1e12": (1e12, "L1_d32,L2_d48,L2_d64,L3_d96,L4_d128"),
    "C3e12": (3e12, "L2_d48,L2_d64,L3_d96,L4_d128,L5_d160"),
}


def get_config():
    c = base_config()
    c.name = "isoflop_ladder"
    c.model.update(vocab_size=1024, num_layers=2, d_model=64, num_heads=64 // HEAD_DIM,
                   head_dim=HEAD_DIM, dtype="auto", remat_policy="none")
    c.data.seq_len = 128
    # steps, warmup_steps and eval_every are set per member by its budget (scaling/grid.py).
    c.train.update(steps=1000, batch_size=8, warmup_steps=10, b2=0.99, log_every=50,
                   eval_every=0, eval_batches=4, checkpoint_every=200, checkpoint_keep=1)
    c.scaling = ml_collections.ConfigDict()
    c.scaling.sizes = ml_collections.ConfigDict()
    for name, (layers, d_model, lr) in SIZES.items():
        c.scaling.sizes[name] = {
            "model": {"num_layers": layers, "d_model": d_model,
                      "num_heads": d_model // HEAD_DIM, "head_dim": HEAD_DIM},
            "train": {"learning_rate": lr},
        }
    c.scaling.budgets = ml_collections.ConfigDict(
        {name: {"flops": flops, "sizes": sizes} for name, (flops, sizes) in BUDGETS.items()})
    c.scaling.warmup_fraction = 0.1
    c.scaling.curve_points = 8  # validation evaluations along each member's training
    c.scaling.eval_batches = 48  # final bits per byte on 48 x 8 x 128 tokens of each split
    return c
