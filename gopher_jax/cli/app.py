"""The command table: each command owns its flags, its help and its exit code.

    python -m gopher_jax --help             the commands
    python -m gopher_jax train --help       train's flags only

A user mistake (a `UserError`: config, flags, data, paths, checkpoints) is one line
`error: <what> (<the fix>)` on stderr with exit code 2 (usage) or 1 (runtime); --verbose or
GOPHER_JAX_VERBOSE=1 prints the traceback too. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from gopher_jax.cli import platform

# name -> (module in gopher_jax.cli, one-line help); "a b" is subcommand b of a.
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("params", "parameter counts and training FLOPs per token (nothing allocated)"),
    "train": ("train", "train, resuming from the newest checkpoint in --workdir"),
    "distill": ("distill", "train a student against a teacher workdir: (1 - lambda) CE + "
                           "lambda T^2 KL(teacher || student)"),
    "teacher logits": ("distill", "store a teacher's top-k log-probs beside the training "
                                  "chunks (for distill --teacher_logits)"),
    "eval": ("evaluate", "bits per byte of a trained workdir on its held-out splits"),
    "sample": ("sample", "generate text from a trained workdir"),
    "tasks": ("tasks", "score a trained workdir on tasks (cloze, multiple choice, generation)"),
    "serve": ("serve", "an OpenAI-compatible HTTP endpoint over a trained workdir (needs "
                       ".[serve])"),
    "data prepare": ("data", "build the dataset, tokenizer and token chunks"),
    "data filter": ("data", "MassiveText quality/repetition filters, dedup, test-set removal"),
    "tokenizer train": ("data", "(re)train the SentencePiece tokenizer"),
    "checkpoint info": ("checkpoint", "list a workdir's checkpoints (steps, sizes, mesh)"),
    "export hf": ("hf", "a checkpoint as a Hugging Face model directory (safetensors, "
                        "modeling code, tokenizer)"),
    "import hf": ("hf", "a Hugging Face directory from `export hf` as a new workdir (step 0)"),
    "aot": ("aot", "compile the train step for a TPU topology here (needs .[tpu])"),
    "scaling run": ("scaling", "train and evaluate a ladder of model sizes"),
    "scaling fit": ("scaling", "fit the scaling law to a ladder's results"),
    "scaling tasks": ("scaling", "score every ladder member on a task suite: which tasks gain "
                                 "from scale"),
    "scaling plan": ("scaling", "the compute-optimal size and tokens for a FLOP budget, as a "
                                "Gopher-shaped config (and its TPU memory)"),
}


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are UsageErrors (one line, exit 2) instead of usage dumps."""

    def error(self, message: str) -> NoReturn:
        from gopher_jax.errors import UsageError

        raise UsageError(message, f"see `{self.prog} --help`")


def build_parser() -> Parser:
    top = Parser(prog="python -m gopher_jax", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="commands:\n" + "\n".join(f"  {k:<16} {h}"
                                                  for k, (_, h) in COMMANDS.items()))
    top.add_argument("--verbose", action="store_true", help="tracebacks with errors")
    subs = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module, text) in COMMANDS.items():
        head, _, tail = name.partition(" ")
        if tail:
            if head not in groups:
                g = subs.add_parser(head, description="subcommands: " + "; ".join(
                    f"{k.partition(' ')[2]}: {h}" for k, (_, h) in COMMANDS.items()
                    if k.startswith(head + " ")))
                groups[head] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                                parser_class=Parser, required=True)
            p = groups[head].add_parser(tail, description=text)
        else:
            p = subs.add_parser(head, description=text)
        p.add_argument("--verbose", action="store_true", help="tracebacks with errors")
        mod = importlib.import_module(f"gopher_jax.cli.{module}")
        mod.add_arguments(p, name)
        p.set_defaults(run=mod.run, name=name)
    return top


def main(argv: list[str] | None = None) -> int:
    platform.configure()  # before anything imports jax
    from gopher_jax import storage

    storage.configure()  # before anything imports gcsfs
    from gopher_jax.cli import common, console
    from gopher_jax.errors import UsageError, UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("GOPHER_JAX_VERBOSE", "") not in ("", "0")
    try:
        argv, overrides = common.split_overrides(argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        args.overrides = overrides
        if overrides and not hasattr(args, "config"):
            raise UsageError(f"`{args.name}` takes no --config overrides", "drop them")
        console.setup_logging(verbose)
        return int(args.run(args) or 0)
    except UserError as e:
        console.error_line(e, verbose)
        return _exit(e.exit_code)
    except OSError as e:  # a path the user gave: missing, read-only, disk full
        console.error_line(OSError(f"{e} (check the path, its permissions and free space)"),
                           verbose)
        return _exit(1)
    except KeyboardInterrupt:
        console.err("error: interrupted")
        return _exit(130)


def _exit(code: int) -> int:
    """With several processes a normal exit would wait for the others in jax.distributed's
    shutdown barrier: leave at once, as the uncaught-error hook does."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run() -> NoReturn:
    code = main()
    if code:
        # The error is reported; background threads of a failed run (an Orbax save that was
        # still writing) would only add tracebacks while the interpreter shuts down.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(0)
