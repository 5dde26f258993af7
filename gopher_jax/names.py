"""The accepted values of the config's enumerated keys, owned here once.

`config.check` validates against these tuples; each table that implements a set of names
(attention functions, remat policies, optimisers, rule sets) calls `check_table` at import,
so a name accepted here and missing there (or the reverse) fails on the first import.
"""

from __future__ import annotations

from collections.abc import Iterable

# model.attention_impl: "auto" resolves to one of the others when tracing (model/attention.py).
ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_gpu")
# model.remat_policy: what the backward pass may keep of each block (model/gopher.py).
REMAT_POLICIES = ("none", "nothing_saveable", "dots", "dots_no_batch")
# train.optimizer (train/optimizer.py).
OPTIMIZERS = ("adam", "adamw")
# mesh.rules: logical-axis rule sets (parallel/rules.py).
RULE_SETS = ("data-only", "fsdp", "tensor", "fsdp+tensor")
# train.spike_policy (train/spikes.py).
SPIKE_POLICIES = ("off", "rewind")
# model.param_dtype and model.dtype (the compute dtype also accepts "auto").
DTYPES = ("float32", "bfloat16", "float16")


def check_table(what: str, table: Iterable[str], names: Iterable[str]) -> None:
    """Raises RuntimeError unless `table`'s keys are exactly `names`: a programming error."""
    have, want = set(table), set(names)
    if have != want:
        raise RuntimeError(f"{what}: the table implements {sorted(have)} but "
                           f"gopher_jax.names accepts {sorted(want)}")
