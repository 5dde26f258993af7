"""A model that trains in seconds on one CPU core: for tests and smoke runs."""

from gopher_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.model.update(vocab_size=512, num_layers=2, num_heads=4, head_dim=16, d_model=64,
                   dtype="auto", remat_policy="none")
    c.data.seq_len = 64
    c.train.update(steps=60, batch_size=16, learning_rate=3e-3, warmup_steps=10, log_every=10,
                   eval_every=30, eval_batches=4, checkpoint_every=30, b2=0.99)
    return c
