"""Logical axis rules as data: each rule set maps logical axis names to mesh axes.

Every logical name is declared here: parameters carry `PARAM_AXES`, data batches and
activations `ACTIVATION_AXES`. Mesh axes are ('data', 'fsdp', 'tensor'). A declared name
absent from a rule set is replicated; a name that is not declared is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import PartitionSpec

from gopher_jax import names
from gopher_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# vocab: vocabulary entries, embed: d_model, kv: the key/value size of a head, mlp: the
# feed-forward hidden units, layers: the stacked layers of the scanned model, norm: RMSNorm scales.
PARAM_AXES = ("vocab", "embed", "heads", "kv", "mlp", "layers", "norm")
# batch: the rows of a data batch; act_*: activations, constrained at block boundaries.
ACTIVATION_AXES = ("batch", "act_batch", "act_length", "act_embed", "act_heads", "act_mlp",
                   "act_vocab")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The batch of activations is split over every data-parallel axis in all rule sets.
_BATCH = (("act_batch", ("data", "fsdp")), ("batch", ("data", "fsdp")))

RULE_SETS: dict[str, Rules] = {
    # Pure data parallelism: parameters and optimiser state replicated.
    "data-only": _BATCH,
    # ZeRO-3 style: every large matrix split along d_model over fsdp; gathered per layer.
    "fsdp": _BATCH + (("embed", "fsdp"),),
    # Megatron style: heads, MLP hidden and vocab split over tensor. The residual stream
    # between blocks (act_embed: what the layer scan keeps for the backward pass) is split
    # over tensor too, as sequence parallelism does; XLA all-gathers it into the attention
    # and MLP input matmuls and reduce-scatters their outputs.
    "tensor": _BATCH + (
        ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
        ("act_embed", "tensor"),
        ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
    ),
    # Both: the layout Gopher used for 280B (model parallel inside, partitioned state).
    "fsdp+tensor": _BATCH + (
        ("embed", "fsdp"),
        ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
        ("act_embed", "tensor"),
        ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
    ),
}


def check_rule_set(name: str, rules: Rules) -> None:
    """Raises ValueError unless `rules` maps declared logical names, once each, to mesh axes."""
    seen = set()
    for logical, axes in rules:
        if logical not in LOGICAL_AXES:
            raise ValueError(f"rule set {name!r} maps undeclared logical axis {logical!r}; "
                             f"declared names: {LOGICAL_AXES}")
        if logical in seen:
            raise ValueError(f"rule set {name!r} maps logical axis {logical!r} twice")
        seen.add(logical)
        for a in () if axes is None else (axes,) if isinstance(axes, str) else axes:
            if a not in MESH_AXES:
                raise ValueError(f"rule set {name!r} maps {logical!r} to {a!r}, which is not "
                                 f"a mesh axis {MESH_AXES}")


names.check_table("mesh.rules", RULE_SETS, names.RULE_SETS)
for _name, _rules in RULE_SETS.items():
    check_rule_set(_name, _rules)


def get_rules(name: str) -> Rules:
    if name not in RULE_SETS:
        raise ConfigError(f"unknown rule set mesh.rules={name!r}",
                          f"choose one of {names.RULE_SETS}")
    return RULE_SETS[name]


def _check_declared(names: Sequence[str | None]) -> None:
    for n in names:
        if n is not None and n not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis name {n!r}; declared names (in "
                             f"parallel/rules.py): {LOGICAL_AXES}")


def mesh_axes_for(rules: Rules, logical: str) -> tuple[str, ...]:
    """The mesh axes `logical` is split over (none: replicated). Undeclared names raise."""
    _check_declared((logical,))
    for name, axes in rules:
        if name == logical:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def mesh_axes_used(rules: Rules) -> set[str]:
    return {a for name, _ in rules for a in mesh_axes_for(rules, name)}


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
    """('embed', 'mlp') -> PartitionSpec('fsdp', None) under the 'fsdp' rules."""
    if names is None:
        return PartitionSpec()
    out = []
    for n in names:
        axes = mesh_axes_for(rules, n) if n is not None else ()
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


_ACTIVE: list[Rules] = []


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Rules for `constrain` while tracing; without them constraints are no-ops."""
    _ACTIVE.append(rules)
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_rules() -> Rules | None:
    """The rules of the innermost `use_rules`, or None outside one."""
    return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names, under the active rules and mesh."""
    _check_declared(names)
    if not _ACTIVE or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, _ACTIVE[-1]))
