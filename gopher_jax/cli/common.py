"""Flags and checks shared by several commands: the config, the workdir, multi-process."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import uuid

import ml_collections
from etils import epath

from gopher_jax import config as config_lib
from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.errors import ConfigError, UsageError, UserError

DEFAULT_CONFIG = "experiments/default.py"
DEFAULT_WORKDIR = "runs/default"


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without them, ['a.b=v', ...]) from `--config.a.b=v` or `--config.a.b v`."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key = a[len("--config."):]
            if "=" in key:
                overrides.append(key)
            elif i + 1 < len(argv):
                overrides.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                raise UsageError(f"{a} has no value", f"write {a}=VALUE")
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def add_config(p: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG) -> None:
    text = "experiment config file (a get_config() .py); override keys as --config.a.b=v"
    if default is None:
        text += "; default: the config the workdir was trained with"
    p.add_argument("--config", default=default, metavar="FILE", help=text)


def add_workdir(p: argparse.ArgumentParser, default: str | None = DEFAULT_WORKDIR) -> None:
    p.add_argument("--workdir", default=default, required=default is None, metavar="DIR",
                   help="run directory (checkpoints, metrics, config.json)")


def add_int8(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8", action="store_true",
                   help="weight-only int8 inference (per-output-channel scales)")


def add_multiprocess(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (launch/local.py, SLURM and TPU VMs set these)")
    g.add_argument("--coordinator", default="", metavar="HOST:PORT",
                   help="address of process 0")
    g.add_argument("--num_processes", type=int, default=0)
    g.add_argument("--process_id", type=int, default=-1)


def apply_multiprocess(args: argparse.Namespace) -> None:
    """The flags become the environment that parallel.distributed reads."""
    if args.coordinator:
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--coordinator needs --num_processes >= 1 and 0 <= --process_id "
                             f"< num_processes (got {args.num_processes}, {args.process_id})",
                             "pass all three flags")
        os.environ.update(GOPHER_COORDINATOR=args.coordinator,
                          GOPHER_NUM_PROCESSES=str(args.num_processes),
                          GOPHER_PROCESS_ID=str(args.process_id))


def load_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """--config FILE with the overrides, checked (ranges, names) before any work."""
    c = load_config_file(args.config, args.overrides)
    config_lib.check(c)
    return c


def load_config_file(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """config.load, with a config file that does not run (a syntax error, get_config
    raising) as one ConfigError naming the file and line; --verbose shows the traceback."""
    try:
        return config_lib.load(path, overrides)
    except UserError:
        raise
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno}: {e.msg}",
                          "fix the syntax there") from e
    except Exception as e:  # noqa: BLE001 - whatever the user's get_config() raises
        import traceback

        here = pathlib.Path(path).resolve()
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if pathlib.Path(f.filename).resolve() == here]
        where = f" line {lines[-1]}" if lines else ""
        raise ConfigError(f"config file {path}{where} raised {type(e).__name__}: {e}",
                          "fix get_config() there; --verbose shows the traceback") from e


def trained_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """For commands on a trained workdir: --config if given, else the workdir's config.json
    (with the overrides applied to it)."""
    workdir = existing_workdir(args.workdir)
    if args.config is not None:
        return load_config(args)
    path = workdir / workdir_lib.CONFIG_JSON
    if not path.is_file():
        raise UserError(f"{workdir} has no {workdir_lib.CONFIG_JSON} (not a training workdir?)",
                        "pass the --workdir of a `train` run, or --config FILE")
    c = config_lib.apply_overrides(stored_config(path), args.overrides)
    config_lib.check(c)
    return c


def stored_config(path: epath.Path) -> ml_collections.ConfigDict:
    """A config a run stored (config.json): damaged or hand-edited into one that does not
    load, it is one error naming it."""
    fix = "restore it from the run's copy, or pass --config FILE"
    stored = storage.read_json(path, fix)
    try:
        return config_lib.from_json(json.dumps(stored))
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{path} does not hold a config ({type(e).__name__}: {e})",
                        fix) from e


def existing_workdir(workdir: str) -> epath.Path:
    storage.check(workdir, "--workdir")
    path = storage.path(workdir)
    if not path.is_dir():
        raise UserError(f"workdir {workdir} does not exist",
                        "pass the --workdir of a `train` run")
    return path


def data_dir(c: ml_collections.ConfigDict) -> epath.Path:
    """data.data_dir for a command that reads prepared data: one that exists may be read-only
    (a shared dataset; preparing refuses by name only what it would have to write there);
    one that does not must be creatable."""
    path = storage.path(c.data.data_dir)
    if path.is_dir():
        return path
    return writable_dir(c.data.data_dir, "data dir (data.data_dir)")


def writable_dir(path: str | os.PathLike, what: str = "workdir") -> epath.Path:
    """Refuses a directory that cannot be written (checked by writing a probe file, since
    permission bits say little for root, network file systems or buckets); for a local
    directory not made yet, its nearest existing parent is checked. Leaves nothing behind."""
    storage.check(path, what)
    p = storage.path(path)
    if storage.is_remote(path):
        probe = p / f".gopher_jax_probe.{uuid.uuid4().hex}"
        try:
            probe.write_text("")
            probe.unlink()
        except Exception as e:  # noqa: BLE001 - any refusal of the bucket: permission, network
            raise UserError(f"{what} {path} is not writable ({type(e).__name__}: {e})",
                            "check the bucket name and your credentials") from None
        return p
    local = pathlib.Path(p)
    target = next((q for q in (local, *local.parents) if q.exists()), None)
    if target is None or not target.is_dir():
        raise UserError(f"{what} {path} cannot be created: {target} is not a directory",
                        "pass another path")
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".gopher_jax_probe"):
            pass
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror})",
                        "pass a writable path or fix its permissions") from None
    return p
