"""Gopher 7.1b (Rae et al. 2021, Table 1)."""

from gopher_jax.config import table1


def get_config():
    c = table1("gopher_7_1b", layers=32, heads=32, kv=128, d_model=4096, lr=1.2e-4,
               batch_tokens=2097152, grad_clip=0.25)
    # Paper: bf16 parameters with an fp32 master copy in the partitioned optimiser state.
    c.model.param_dtype = "bfloat16"
    c.train.master_fp32 = True
    c.mesh.rules = "fsdp+tensor"
    c.mesh.tensor = 8
    return c
