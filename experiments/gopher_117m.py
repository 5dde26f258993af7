"""Gopher 117m (Rae et al. 2021, Table 1)."""

from gopher_jax.config import table1


def get_config():
    c = table1("gopher_117m", layers=12, heads=12, kv=64, d_model=768, lr=6e-4,
               batch_tokens=262144, grad_clip=1.0)
    return c
