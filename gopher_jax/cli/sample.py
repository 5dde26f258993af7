"""`sample`: continue a prompt with a trained workdir's model."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p, default=None)
    common.add_workdir(p)
    common.add_int8(p)
    p.add_argument("--prompt", default="", help="the text to continue")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (>= 1)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature, >= 0 (0 = greedy)")
    p.add_argument("--top_k", type=int, default=40,
                   help="keep the k most likely tokens, 0..vocab size (0 = all)")
    p.add_argument("--seed", "--sample_seed", dest="seed", type=int, default=0,
                   help="random seed of the sampling")


def run(args: argparse.Namespace) -> int:
    from gopher_jax import sample

    c = common.trained_config(args)
    # Before any checkpoint is read: a bad option costs nothing.
    sample.check_options(c.model.vocab_size, args.max_new_tokens, args.temperature, args.top_k)
    common.data_dir(c)
    out = sample.run(c, args.workdir, args.prompt, args.max_new_tokens, args.temperature,
                     args.top_k, args.seed, args.int8)
    for n in out["notices"]:
        console.err(f"notice: {n}")
    console.out(out["text"])
    return 0
