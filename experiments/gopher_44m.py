"""Gopher 44m (Rae et al. 2021, Table 1)."""

from gopher_jax.config import table1


def get_config():
    c = table1("gopher_44m", layers=8, heads=16, kv=32, d_model=512, lr=6e-4,
               batch_tokens=262144, grad_clip=1.0)
    return c
