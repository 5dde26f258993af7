"""Starting and stopping the server: the checkpoint restored on the config's mesh (as
`tasks` does), the engine warmed up in its thread while /health already answers, uvicorn on
a socket bound here (so a busy port is one error line), SIGTERM/SIGINT draining: no new
connections, in-flight requests and streams finish, the engine stops, exit 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import ml_collections
import uvicorn

from gopher_jax.errors import UsageError, UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the binds that may go without an API key


@dataclasses.dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_file: str = ""
    audit_log: str = ""
    audit_max_bytes: int = 100 * 2**20
    audit_backups: int = 5
    redact_output: bool = False
    slots: int = 8
    queue: int = 64
    max_prompt_tokens: int = 0  # 0: data.seq_len
    max_tokens: int = 256
    timeout_s: float = 120.0
    model_name: str = ""
    int8: bool = False  # weight-only int8 kernels (model/int8.py)


def check(o: Options) -> str | None:
    """Refuses options that cannot work, before anything is loaded -> the API key (or None
    on a loopback bind without a key file)."""
    for name, least in (("slots", 1), ("queue", 1), ("max_tokens", 1), ("audit_max_bytes", 1),
                        ("audit_backups", 0), ("max_prompt_tokens", 0)):
        if getattr(o, name) < least:
            raise UsageError(f"--{name}={getattr(o, name)} must be >= {least}",
                             f"pass {least} or more")
    if not o.timeout_s > 0:
        raise UsageError(f"--timeout_s={o.timeout_s} must be > 0", "pass a number of seconds")
    if not 0 <= o.port < 65536:
        raise UsageError(f"--port={o.port} is not a port", "pass 0..65535 (0: any free port)")
    if o.max_prompt_tokens and o.max_prompt_tokens < 2:
        raise UsageError(f"--max_prompt_tokens={o.max_prompt_tokens} leaves no room for a "
                         "prompt after EOS", "pass 2 or more (default: data.seq_len)")
    if o.redact_output:
        from gopher_jax import pii

        pii.check_available()
    if o.api_key_file:
        try:
            key = open(o.api_key_file, encoding="utf-8").read().strip()
        except OSError as e:
            raise UserError(f"--api_key_file {o.api_key_file} cannot be read ({e.strerror})",
                            "pass a readable file holding the key") from None
        if not key or any(ch.isspace() for ch in key):
            raise UserError(f"--api_key_file {o.api_key_file} holds no key (or one with "
                            "spaces)", "write one key, on one line, into the file")
        return key
    if o.host not in LOOPBACK:
        raise UsageError(f"--host {o.host} is not loopback: serving it needs an API key",
                         "pass --api_key_file FILE (clients send Authorization: Bearer KEY), "
                         "or --host 127.0.0.1")
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port), or a UserError."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name: localhost
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})",
                        "pick another --port or stop what uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclasses.dataclass
class Prepared:
    service: Any  # app.Service
    sock: socket.socket
    url: str
    options: Options


def prepare(c: ml_collections.ConfigDict, workdir: str, o: Options, api_key: str | None
            ) -> Prepared:
    """The restored model, its engine (not started), the app's service, the bound socket."""
    import jax

    from gopher_jax import pii
    from gopher_jax.data import pipeline
    from gopher_jax.evaluate import restore_params
    from gopher_jax.layout import Layout
    from gopher_jax.parallel import distributed
    from gopher_jax.parallel import mesh as mesh_lib
    from gopher_jax.serve.app import Limits, Service
    from gopher_jax.serve.audit import AuditLog
    from gopher_jax.serve.batch import Batch
    from gopher_jax.serve.engine import Engine
    from gopher_jax.tasks.run import rows_per_batch

    distributed.initialize_from_env()
    if jax.process_count() > 1:
        raise UsageError("serve runs in one process", "start it without --coordinator")
    tok = pipeline.load_tokenizer(c)
    max_prompt = o.max_prompt_tokens or c.data.seq_len
    audit = None
    if o.audit_log:
        try:
            audit = AuditLog(o.audit_log, o.audit_max_bytes, o.audit_backups)
        except OSError as e:
            raise UserError(f"--audit_log {o.audit_log} cannot be opened ({e.strerror})",
                            "pass a writable path") from None
    layout = Layout.of(c, mesh_lib.make_mesh(c))
    params, step = restore_params(c, workdir, layout, o.int8)
    slots = rows_per_batch(o.slots, layout)
    batch = Batch(c, layout, params, slots, max_prompt, max_prompt + o.max_tokens)
    engine = Engine(batch, tok.decode_bytes, tok.eos_id, o.queue)
    name = o.model_name or os.path.basename(os.path.normpath(str(workdir)))
    service = Service(engine=engine, tokenizer=tok, vocab_size=c.model.vocab_size,
                      model_name=name, model_step=step,
                      limits=Limits(max_prompt, o.max_tokens, o.timeout_s), api_key=api_key,
                      audit=audit, redact=pii.redact if o.redact_output else None)
    sock = bind(o.host, o.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return Prepared(service, sock, url, o)


def serve(p: Prepared) -> None:
    """Warms up and serves until SIGTERM or SIGINT; returns once drained. A failed warm-up
    stops the server: a UserError naming the failure."""
    from gopher_jax.serve.app import create_app

    service = p.service
    failed: list[Exception] = []

    def warm_up() -> None:
        try:
            service.engine.start()
        except Exception as e:  # noqa: BLE001 - reported by serve() in the main thread
            failed.append(e)
            server.should_exit = True
            return
        service.ready = True

    config = uvicorn.Config(create_app(service), log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(p.options.timeout_s) + 5,
                            lifespan="off")
    server = _Server(config, service)
    threading.Thread(target=warm_up, name="gopher-serve-warm-up", daemon=True).start()
    try:
        server.run(sockets=[p.sock])
    finally:
        service.draining = True
        service.engine.stop()
        if service.audit is not None:
            service.audit.close()
    if failed:  # compiling or allocating the cache (too many --slots for the memory)
        what = str(failed[0]).strip().splitlines()
        raise UserError(f"the model could not be warmed up ({type(failed[0]).__name__}"
                        f"{': ' + what[0] if what else ''})",
                        "lower --slots, --max_prompt_tokens or --max_tokens if memory ran out")


class _Server(uvicorn.Server):
    """uvicorn's server whose SIGTERM/SIGINT drain and then return: uvicorn re-raises a caught
    signal after its shutdown, which would end the process by that signal instead of 0."""

    def __init__(self, config: uvicorn.Config, service: Any):
        super().__init__(config)
        self.service = service

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle_exit)
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)
