# XLA flags for training on NVIDIA GPUs, the set MaxText's GPU configs use: the
# latency-hiding scheduler (overlaps collectives with compute), pipelined all-gather /
# reduce-scatter / all-reduce and double-buffered while loops (the FSDP gathers of layer l+1
# run during layer l of the scanned blocks), large combine thresholds (fewer, bigger
# collectives), collectives on the highest-priority stream, and cuBLAS rather than Triton
# for GEMMs. tests/test_slurm_gpu.py checks that this XLA knows every one (XLA aborts on an
# unknown flag).
#
# Sourced by launch/slurm/train.sbatch and benchmarks/gpu_check.sh: `gpu_xla_flags` prints
# $XLA_FLAGS with these added; a flag already in $XLA_FLAGS keeps the caller's value.
GPU_XLA_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_enable_triton_gemm=false
)

gpu_xla_flags() {
  local out=() flag
  for flag in "${GPU_XLA_FLAGS[@]}"; do
    case " ${XLA_FLAGS:-} " in
      *" ${flag%%=*}="*) ;;  # set by the caller
      *) out+=("$flag") ;;
    esac
  done
  echo "${out[*]}${XLA_FLAGS:+ ${XLA_FLAGS}}"
}
