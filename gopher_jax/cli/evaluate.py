"""`eval`: bits per byte of a trained workdir on its held-out splits, with a unigram baseline."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p, default=None)
    common.add_workdir(p)
    common.add_multiprocess(p)
    common.add_int8(p)


def run(args: argparse.Namespace) -> int:
    c = common.trained_config(args)
    common.writable_dir(args.workdir)  # eval.json goes there
    common.data_dir(c)
    common.apply_multiprocess(args)
    import jax

    from gopher_jax import evaluate

    results = evaluate.run(c, args.workdir, args.int8)
    if jax.process_index() != 0:
        return 0
    for w in results.warnings:
        console.err(f"warning: {w}")
    for split, r in results.splits.items():
        console.out(f"{split:>10}: bits/byte {r.bits_per_byte:.4f} (unigram baseline "
                    f"{r.unigram_bits_per_byte:.4f}), loss {r.loss:.4f} nats/token over "
                    f"{r.tokens:,.0f} tokens, {r.bytes:,.0f} bytes  [step {results.step}]")
        for name, by_split in (results.sources or {}).items():
            if split in by_split:
                q = by_split[split]
                console.out(f"{'':>10}  {name}: bits/byte {q.bits_per_byte:.4f} (unigram "
                            f"{q.unigram_bits_per_byte:.4f}) over {q.bytes:,.0f} bytes")
    return 0
