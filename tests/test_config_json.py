"""Configs stored by earlier runs (config.json, ladder.json) load over today's defaults."""

import json

import pytest

from gopher_jax import config as config_lib
from gopher_jax.errors import ConfigError


def _stored_before_new_keys() -> dict:
    """Today's default config as JSON, less two keys, as a run made before they existed."""
    d = json.loads(config_lib.base_config().to_json())
    del d["model"]["attention_impl"], d["data"]["docs_per_shard"]
    d["model"]["num_layers"] = 3
    d["members"] = {"small": {"model": {"d_model": 64}}}
    return d


def test_a_stored_config_gets_the_keys_added_since_and_keeps_its_values():
    c = config_lib.from_json(json.dumps(_stored_before_new_keys()))
    base = config_lib.base_config()
    assert c.model.attention_impl == base.model.attention_impl
    assert c.data.docs_per_shard == base.data.docs_per_shard
    assert c.model.num_layers == 3
    assert c.members.small.model.d_model == 64
    config_lib.check(c)


def test_a_config_missing_a_key_is_one_config_error_not_a_key_error():
    c = config_lib.base_config()
    del c.model["num_layers"]
    with pytest.raises(ConfigError, match="no model.num_layers"):
        config_lib.check(c)
