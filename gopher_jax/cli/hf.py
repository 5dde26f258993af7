"""`export hf` and `import hf`: models to and from Hugging Face directories."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    if name == "export hf":
        common.add_workdir(p, default=None)
        p.add_argument("--out", required=True, metavar="DIR",
                       help="the new model directory (must not exist or be empty)")
        p.add_argument("--step", type=int, default=None,
                       help="the checkpoint step (default: the newest)")
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                       help="dtype of the safetensors weights")
        p.add_argument("--max_shard_mb", type=int, default=2048,
                       help="split the weights into files of at most this many MiB")
        p.add_argument("--tokenizer", default=None, metavar="FILE",
                       help="the SentencePiece model (default: the run config's)")
    else:
        p.add_argument("--from", dest="source", required=True, metavar="DIR",
                       help="a model directory written by `export hf`")
        common.add_workdir(p, default=None)


def run(args: argparse.Namespace) -> int:
    if args.name == "export hf":
        from gopher_jax.hf import export

        common.existing_workdir(args.workdir)
        step, tokenizer = export.check(args.workdir, args.out, args.step, args.max_shard_mb,
                                       args.tokenizer)
        common.writable_dir(args.out, "--out")
        out = export.export(args.workdir, args.out, step, args.dtype,
                            args.max_shard_mb * 1024**2, tokenizer)
        console.out(f"exported step {step} of {args.workdir} to {out['dir']}: "
                    f"{out['tensors']} tensors in {len(out['files'])} file(s), "
                    f"{out['bytes'] / 1e6:.1f} MB ({args.dtype})")
        return 0
    from gopher_jax.hf import importer

    importer.read_config(args.source)
    common.writable_dir(args.workdir)
    out = importer.import_hf(args.source, args.workdir)
    console.out(f"imported {args.source} ({out['params']:,} parameters, trained "
                f"{out['source_step']} steps) into {out['workdir']} as step 0; fine-tune with "
                f"`python -m gopher_jax train --config {args.workdir}/experiment.py "
                f"--workdir {args.workdir} --config.train.steps=N`")
    return 0
