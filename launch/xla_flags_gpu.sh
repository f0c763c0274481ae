#!/usr/bin/env bash
# XLA flags for training on NVIDIA GPUs (H100/H200), appended to XLA_FLAGS. Source it in a launch
# script or a shell before `llmjax train|bench` (it only sets variables):
#   source launch/xla_flags_gpu.sh
#   launch/xla_flags_gpu.sh --check    # which of the flags the installed jaxlib's XLA knows
# They live here, not in Python: XLA aborts on flags it does not know, and flag names change
# between jax releases, so a run on another jax can drop or edit a flag without a code change.
#   latency-hiding scheduler   overlap collectives (FSDP all-gathers, reduce-scatters) with compute
#   pipelined collectives      start the next layer's all-gather / this layer's reduce-scatter early
#   combine thresholds         fewer, larger collectives
#   while-loop double buffering  overlap across iterations of the scanned layer loop
#   triton gemm off            cuBLAS for the dense matmuls
#   command buffers off        CUDA graphs can capture collectives badly in multi-GPU steps
LLMJAX_XLA_GPU_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_enable_while_loop_double_buffering=true
  --xla_gpu_enable_triton_gemm=false
  --xla_gpu_enable_command_buffer=
)

if [[ "${BASH_SOURCE[0]}" == "$0" && "${1:-}" == "--check" ]]; then
  status=0
  for flag in "${LLMJAX_XLA_GPU_FLAGS[@]}"; do
    if XLA_FLAGS="$flag" JAX_PLATFORMS=cpu python3 -c "import jax.numpy as j; j.ones(1).block_until_ready()" \
        >/dev/null 2>&1; then
      echo "known    $flag"
    else
      echo "UNKNOWN  $flag"; status=1
    fi
  done
  exit "$status"
fi
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${LLMJAX_XLA_GPU_FLAGS[*]}"
