"""`data prepare` and `tokenizer train`."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p)


def run(args: argparse.Namespace) -> int:
    c = common.load_config(args)
    common.writable_dir(c.data.data_dir, "data dir (data.data_dir)")
    if args.name == "tokenizer train":
        return _tokenizer(c)
    from gopher_jax.data import pipeline

    info = pipeline.prepare(c, log=console.out)
    console.out(f"[data] {info['dataset']}: tokenizer {info['tokenizer']}")
    for split, s in info["splits"].items():
        console.out(f"[data]   {split:>10}: {s['num_chunks']:>8,} chunks  {s['num_tokens']:>12,} "
                    f"tokens  {s['num_bytes']:>13,} bytes  {s['tokens_per_byte']:.3f} tokens/byte"
                    f"{'  (reused)' if s['reused'] else ''}")
    for name, si in info.get("sources", {}).items():
        console.out(f"[data] source {name} ({info['shares'][name]:.1%} of the rows):")
        for split, s in si["splits"].items():
            console.out(f"[data]   {split:>10}: {s['num_chunks']:>8,} chunks  "
                        f"{s['num_tokens']:>12,} tokens  {s['num_bytes']:>13,} bytes")
    console.out(f"[data] chunks in {info['chunks_dir']}")
    return 0


def _tokenizer(c) -> int:
    from gopher_jax.data import tokenizer

    out = tokenizer.train_and_measure(c)
    tok = out["tokenizer"]
    console.out(f"[tokenizer] trained {tok.vocab_size}-piece BPE on {c.data.dataset}:"
                f"{c.data.train_split} in {out['seconds']:.1f}s -> {tok.path}")
    s = out["held_out"]
    if s is not None:
        console.out(f"[tokenizer] {c.data.eval_split}: {s['bytes']:,} bytes -> {s['tokens']:,} "
                    f"tokens ({s['tokens_per_byte']:.3f} tokens/byte), "
                    f"round trip exact: {s['roundtrip_exact']}")
    return 0
