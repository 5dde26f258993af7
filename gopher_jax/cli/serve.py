"""`serve`: an OpenAI-compatible endpoint over a trained workdir (README: Serving)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

from gopher_jax.cli import common, console
from gopher_jax.errors import UserError


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p, default=None)
    common.add_workdir(p)
    common.add_int8(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but 127.0.0.1, localhost or ::1 needs "
                        "--api_key_file")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed)")
    p.add_argument("--api_key_file", default="", metavar="FILE",
                   help="a file holding the key clients must send (Authorization: Bearer KEY)")
    p.add_argument("--audit_log", default="", metavar="FILE",
                   help="append one JSON line per completion request (format: README)")
    p.add_argument("--audit_max_bytes", type=int, default=100 * 2**20,
                   help="rotate the audit log at this size")
    p.add_argument("--audit_backups", type=int, default=5,
                   help="rotated audit logs kept (FILE.1 ... FILE.N)")
    p.add_argument("--redact_output", action="store_true",
                   help="replace e-mails, phones, IPs and card numbers in answers "
                        "(gopher_jax/pii.py; needs .[data])")
    p.add_argument("--slots", type=int, default=8,
                   help="requests decoded together (rounded up to the mesh's batch devices)")
    p.add_argument("--queue", type=int, default=64,
                   help="prompts that may wait for a slot; more get 429")
    p.add_argument("--max_prompt_tokens", type=int, default=0,
                   help="longest prompt in tokens, EOS included (0: data.seq_len)")
    p.add_argument("--max_tokens", type=int, default=256,
                   help="most tokens a request may ask for")
    p.add_argument("--timeout_s", type=float, default=120.0,
                   help="a request not finished this long after it arrived gets 504")
    p.add_argument("--model_name", default="",
                   help="the model id clients use (default: the workdir's name)")


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"serve needs {' and '.join(missing)}", "pip install -e .[serve]")
    from gopher_jax.serve import server

    options = server.Options(**{f.name: getattr(args, f.name)
                                for f in dataclasses.fields(server.Options)})
    api_key = server.check(options)  # before the checkpoint is read
    c = common.trained_config(args)
    prepared = server.prepare(c, args.workdir, options, api_key)
    console.out(f"serving {prepared.service.model_name} (step {prepared.service.model_step}) "
                f"on {prepared.url}")
    server.serve(prepared)
    console.out("drained: every request answered")
    return 0
