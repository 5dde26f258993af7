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

    from gopher_jax import data

    d = str(tmp_path_factory.mktemp("tiny_data"))
    data.prepare(helpers.tiny(d))
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


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir):
    """experiments/tiny.py trained for 4 steps (one checkpoint) through the CLI:
    <root>/work, with its own data dir <root>/data (a copy of `data_dir`: the CLI's own
    preparation is tested elsewhere). Returns <root>."""
    import shutil

    import helpers

    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(data_dir, root / "data")
    p = helpers.run_cli("train", "--config", helpers.ROOT / "experiments" / "tiny.py",
                        f"--config.data.data_dir={root}/data", f"--workdir={root}/work",
                        "--config.train.steps=4", "--config.train.warmup_steps=1",
                        "--config.train.checkpoint_every=4", "--config.train.eval_every=0",
                        "--config.train.log_every=2")
    assert p.returncode == 0, p.stderr[-3000:]
    return root
