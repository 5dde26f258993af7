"""Gopher 1.4b (Rae et al. 2021, Table 1)."""

from gopher_jax.config import table1


def get_config():
    c = table1("gopher_1_4b", layers=24, heads=16, kv=128, d_model=2048, lr=2e-4,
               batch_tokens=262144, grad_clip=1.0)
    return c
