"""The default run: a small Gopher-shaped model on the Shakespeare corpus, ~10 min on 2 cores."""

from gopher_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "default"
    # 8k pieces: a 32k BPE vocabulary on 5 MB of Shakespeare leaves most pieces unused.
    c.model.update(vocab_size=8000, num_layers=4, num_heads=4, head_dim=64, d_model=256,
                   dtype="auto", remat_policy="none")
    c.data.seq_len = 128
    c.train.update(steps=450, batch_size=16, learning_rate=2e-3, warmup_steps=50,
                   log_every=25, eval_every=150, checkpoint_every=150, b2=0.99)
    return c
