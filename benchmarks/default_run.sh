#!/usr/bin/env bash
# README's command 1, exactly as README states it, on a fresh clone of this repository at HEAD
# (its own virtualenv and data dir), then `eval` at 2x/4x/8x the trained context and the
# default task suite. Prints the numbers README quotes and writes OUT/default_run.json.
#   bash benchmarks/default_run.sh [OUT_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$(mktemp -d)}" && cd "${1:-.}" && pwd)
rm -rf "$out/clone"
git clone -q "$repo" "$out/clone"
cd "$out/clone"
export GOPHER_JAX_DATA="$out/data" JAX_PLATFORMS=cpu
rm -rf "$GOPHER_JAX_DATA"
cmd1=$(sed -n '/^# 1\./{n;p;q}' README.md)
t0=$(date +%s)
bash -c "$cmd1" > "$out/command1.log" 2>&1
t1=$(date +%s)
. .venv/bin/activate
cp runs/default/eval.json "$out/eval_128.json"
for len in 256 512 1024; do
  python -m gopher_jax eval --workdir runs/default "--config.data.seq_len=$len" \
    > "$out/eval_$len.log" 2>&1
  cp runs/default/eval.json "$out/eval_$len.json"
done
python -m gopher_jax tasks --workdir runs/default > "$out/tasks.log" 2>&1
cp runs/default/tasks.json "$out/tasks.json"
python - "$out" "$(git rev-parse --short HEAD)" "$((t1 - t0))" <<'PY'
import json, pathlib, sys
out, commit, seconds = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
evals = {L: json.loads((out / f"eval_{L}.json").read_text()) for L in (128, 256, 512, 1024)}
bpb = {L: {s: r["bits_per_byte"] for s, r in e["splits"].items()} for L, e in evals.items()}
unigram = {s: r["unigram_bits_per_byte"] for s, r in evals[128]["splits"].items()}
summary = {"commit": commit, "command1_seconds": seconds, "bits_per_byte": bpb,
           "unigram_bits_per_byte": unigram,
           "tasks": json.loads((out / "tasks.json").read_text())}
(out / "default_run.json").write_text(json.dumps(summary, indent=2))
print(f"commit {commit}: command 1 in {seconds} s")
for L, b in bpb.items():
    print(f"  context {L}: " + ", ".join(f"{s} {v:.4f}" for s, v in b.items()))
print("  unigram: " + ", ".join(f"{s} {v:.4f}" for s, v in unigram.items()))
PY
