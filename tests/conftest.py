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


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS-API emulator for the session; STORAGE_EMULATOR_HOST points this process (and the
    subprocesses it starts) at it, and gopher_jax.storage derives every client's settings."""
    import helpers

    from gopher_jax import storage

    proc, url = helpers.start_fake_gcs(tmp_path_factory.mktemp("gcs"))
    os.environ["STORAGE_EMULATOR_HOST"] = url
    storage.configure()
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture
def bucket(gcs_server, request) -> str:
    """A new bucket for the test: 'gs://<name>'."""
    import re

    import helpers

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:50] + "-b"
    helpers.create_bucket(gcs_server, name)
    return f"gs://{name}"
