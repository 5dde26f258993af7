"""The ladder config: its members in size order, each member's full run config (the shared
settings plus its shape and learning-rate overrides), and a member's sizes and compute."""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from gopher_jax.errors import ConfigError
from gopher_jax.model import sizes
from gopher_jax.scaling import grid

# A member may change its shape and its learning-rate schedule, nothing that changes which
# tokens it sees.
MEMBER_KEYS = {
    "model": {"num_layers", "num_heads", "head_dim", "d_model", "mlp_ratio"},
    "train": {"learning_rate", "init_learning_rate", "warmup_steps", "lr_decay_factor",
              "grad_clip", "b1", "b2", "eps", "microbatches", "optimizer", "weight_decay"},
}


def _members(ladder: ml_collections.ConfigDict) -> dict[str, Any]:
    """name -> overrides: the ladder's `members`, or its sizes x budgets (grid.py)."""
    if grid.is_grid(ladder):
        return grid.members(ladder)[0]
    return ladder.members if "members" in ladder else {}


def member_names(ladder: ml_collections.ConfigDict) -> list[str]:
    """Members from smallest to largest (non-embedding parameters, then name)."""
    members = _members(ladder)
    if not members:
        raise ConfigError("this config has no `members`",
                          "`scaling` needs a ladder config such as experiments/scaling_ladder.py")
    return sorted(members.keys(), key=lambda n: (
        sizes.param_counts(member_config(ladder, n).model)["non_embedding"], n))


def member_config(ladder: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The full run config of one member: the shared settings plus its overrides."""
    members = _members(ladder)
    if name not in members:
        raise ConfigError(f"no member {name!r} in the ladder",
                          f"name one of {sorted(members.keys())}")
    c = copy.deepcopy(ladder)
    c.unlock()  # config_flags hands over a locked ladder
    for key in ("members", "scaling"):
        if key in c:
            del c[key]
    for section, values in members[name].items():
        values = ml_collections.ConfigDict(values)
        allowed = MEMBER_KEYS.get(section)
        if allowed is not None and section == "train" and grid.is_grid(ladder):
            allowed = allowed | grid.TRAIN_KEYS
        if allowed is None:
            raise ConfigError(
                f"member {name!r} overrides section {section!r}",
                f"members may only set {sorted(MEMBER_KEYS)} so that all see the same tokens")
        bad = sorted(set(values.keys()) - allowed)
        if bad:
            raise ConfigError(
                f"member {name!r} sets {section}.{bad}", f"a member may only set {section}."
                f"{sorted(allowed)}: data, seed, steps and batch are shared by the ladder")
        c[section].update(values.to_dict())
    c.name = f"{ladder.name}/{name}"
    return c


def resolve_member(ladder: ml_collections.ConfigDict, member: str) -> str:
    """`--member` as an index into the size order or as a name."""
    names = member_names(ladder)
    if member in names:
        return member
    try:
        i = int(member)
    except ValueError:
        i = None
    if i is None or not 0 <= i < len(names):
        raise ConfigError(f"--member={member!r} is not a member",
                          f"give an index 0..{len(names) - 1} (smallest first) or one of "
                          f"{names}")
    return names[i]


def describe(ladder: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """Sizes and compute of a member, from its config (nothing allocated)."""
    c = member_config(ladder, name)
    m, t = c.model, c.train
    counts = sizes.param_counts(m)
    tokens = t.steps * t.batch_size * c.data.seq_len
    fl = sizes.flops_per_token(m, c.data.seq_len)["train"]
    out = {
        "member": name, "num_layers": m.num_layers, "d_model": m.d_model,
        "num_heads": m.num_heads, "head_dim": m.head_dim, "learning_rate": t.learning_rate,
        "params_non_embedding": counts["non_embedding"], "params_total": counts["total"],
        "train_tokens": tokens, "train_flops": fl * tokens, "steps": t.steps,
        "flops_per_token": fl,
    }
    if grid.is_grid(ladder):
        out.update(grid.members(ladder)[1][name])
    return out


def c_split(ladder: ml_collections.ConfigDict) -> tuple[str, str]:
    """The held-out splits every member is measured on: (validation, test)."""
    return ladder.data.eval_split, ladder.data.test_split
