"""Gopher 7.1b (Rae et al. 2021, Table 1)."""

from gopher_jax.config import table1


def get_config():
    # tensor > 1: bf16 params + fp32 master copy, fsdp+tensor (see table1).
    return table1("gopher_7_1b", layers=32, heads=32, kv=128, d_model=4096, lr=1.2e-4,
                  batch_tokens=2097152, grad_clip=0.25, tensor=8)
