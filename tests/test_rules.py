"""Logical axis names: declared once in parallel/rules.py, and nothing else is accepted."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from gopher_jax import config as config_lib
from gopher_jax.model import gopher
from gopher_jax.parallel import rules as rules_lib


def test_every_name_the_model_uses_is_declared():
    c = config_lib.base_config()
    c.model.update(vocab_size=96, num_layers=2, num_heads=4, head_dim=8, d_model=32,
                   tie_embeddings=False)
    _, state = gopher.abstract(c.model)
    names = jax.tree.leaves(gopher.logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))
    used = {n for axes in names for n in axes if n is not None}
    assert used == set(rules_lib.PARAM_AXES)


@pytest.mark.parametrize("rule_set", sorted(rules_lib.RULE_SETS))
def test_declared_names_missing_from_a_rule_set_are_replicated(rule_set):
    rules = rules_lib.get_rules(rule_set)
    assert rules_lib.logical_to_spec(("kv", "act_length", None), rules) == \
        PartitionSpec(None, None, None)


@pytest.mark.parametrize("rule_set", sorted(rules_lib.RULE_SETS))
def test_undeclared_name_is_an_error_naming_it(rule_set):
    rules = rules_lib.get_rules(rule_set)
    with pytest.raises(ValueError, match="unknown logical axis name 'heads_typo'.*'heads'"):
        rules_lib.logical_to_spec(("embed", "heads_typo"), rules)
    with pytest.raises(ValueError, match="'act_hidden'"):
        rules_lib.constrain(jnp.zeros((2, 3)), ("act_batch", "act_hidden"))


def test_rule_sets_may_map_only_declared_names_to_mesh_axes():
    with pytest.raises(ValueError, match="undeclared logical axis 'hidden'"):
        rules_lib.check_rule_set("bad", (("hidden", "tensor"),))
    with pytest.raises(ValueError, match="'model', which is not a mesh axis"):
        rules_lib.check_rule_set("bad", (("mlp", "model"),))
    with pytest.raises(ValueError, match="'mlp' twice"):
        rules_lib.check_rule_set("bad", (("mlp", "tensor"), ("mlp", None)))
    for name, rules in rules_lib.RULE_SETS.items():
        rules_lib.check_rule_set(name, rules)
