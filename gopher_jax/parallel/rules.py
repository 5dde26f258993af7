"""Logical axis rules as data: each rule set maps logical axis names to mesh axes.

Parameters carry the names on the left of `PARAM_AXES`; activations the `act_*` names.
Mesh axes are ('data', 'fsdp', 'tensor'). A logical name absent from a rule set is replicated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The batch of activations is split over every data-parallel axis in all rule sets.
_BATCH = (("act_batch", ("data", "fsdp")), ("batch", ("data", "fsdp")))

RULE_SETS: dict[str, Rules] = {
    # Pure data parallelism: parameters and optimiser state replicated.
    "data-only": _BATCH,
    # ZeRO-3 style: every large matrix split along d_model over fsdp; gathered per layer.
    "fsdp": _BATCH + (("embed", "fsdp"),),
    # Megatron style: heads, MLP hidden and vocab split over tensor.
    "tensor": _BATCH + (
        ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
        ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
    ),
    # Both: the layout Gopher used for 280B (model parallel inside, partitioned state).
    "fsdp+tensor": _BATCH + (
        ("embed", "fsdp"),
        ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
        ("act_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
    ),
}


def get_rules(name: str) -> Rules:
    if name not in RULE_SETS:
        raise ValueError(f"unknown rule set {name!r}; choose one of {tuple(RULE_SETS)}")
    return RULE_SETS[name]


def mesh_axes_for(rules: Rules, logical: str) -> tuple[str, ...]:
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


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names, under the active rules and mesh."""
    if not _ACTIVE or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, _ACTIVE[-1]))
