import os

import pytest

# 8 fake CPU devices for every test; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The default corpus prepared for experiments/tiny.py (tokenizer and chunks), once per
    session: a data dir for `helpers.tiny`."""
    import helpers

    from gopher_jax.data import pipeline

    d = str(tmp_path_factory.mktemp("tiny_data"))
    pipeline.prepare(helpers.tiny(d))
    return d
