"""`aot`: compile the real train step for a TPU topology on this machine (needs .[tpu])."""

from __future__ import annotations

import argparse
import json
import pathlib

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p)
    p.add_argument("--topology", default="v5p:2x2x1",
                   help="TPU generation and chip grid, e.g. v5p:16x16x16 or v3:32x32")
    p.add_argument("--num_slices", type=int, default=1,
                   help="slices of --topology (data parallel across them)")
    p.add_argument("--json", "--aot_json", dest="json", default="", metavar="FILE",
                   help="also write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    from gopher_jax import aot
    from gopher_jax.errors import UsageError

    c = common.load_config(args)
    if args.num_slices < 1:
        raise UsageError(f"--num_slices={args.num_slices} must be >= 1", "pass 1 or more")
    aot.parse_topology(args.topology)  # a typo is refused before libtpu starts
    if args.json:
        common.writable_dir(pathlib.Path(args.json).absolute().parent, "--json directory")
    try:
        r = aot.aot_compile(c, args.topology, args.num_slices)
    except aot.DoesNotFit as e:
        console.out(f"{c.name} on {args.topology} x {args.num_slices}: DOES NOT FIT (the "
                    f"compiler ran out of HBM): {e}\n{aot.ADVICE}")
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(
                {"config": c.name, "topology": args.topology, "num_slices": args.num_slices,
                 "fits": False, "error": str(e)}, indent=2))
        return 1
    console.out(aot.format_report(r))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(r.to_dict(), indent=2))
    return 0 if r.fits else 1
