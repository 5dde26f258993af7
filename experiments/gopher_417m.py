"""Gopher 417m (Rae et al. 2021, Table 1)."""

from gopher_jax.config import table1


def get_config():
    c = table1("gopher_417m", layers=12, heads=12, kv=128, d_model=1536, lr=2e-4,
               batch_tokens=262144, grad_clip=1.0)
    return c
