#!/usr/bin/env bash
# libtpu flags for training on TPU v5p/v5e/v6e, appended to LIBTPU_INIT_ARGS. Source it on every
# worker before `llmjax train` (e.g. through launch/tpu_pod.sh --setup or in the command), or
# before `llmjax compile` to see their effect on the compiled step:
#   source launch/xla_flags_tpu.sh
#   launch/xla_flags_tpu.sh --check    # compile a small step for v5e-8 with them (needs libtpu)
# Kept out of Python for the same reason as the GPU flags: libtpu rejects flags it does not know.
#   async collective fusion    overlap FSDP all-gathers / reduce-scatters with the layer compute
#   data-parallel all-reduce   fuse and overlap the gradient all-reduce across replicas
LLMJAX_LIBTPU_FLAGS=(
  --xla_tpu_enable_async_collective_fusion=true
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  --xla_tpu_overlap_compute_collective_tc=true
  --xla_enable_async_all_gather=true
  --xla_tpu_enable_data_parallel_all_reduce_opt=true
  --xla_tpu_data_parallel_opt_different_sized_ops=true
)

if [[ "${BASH_SOURCE[0]}" == "$0" && "${1:-}" == "--check" ]]; then
  LIBTPU_INIT_ARGS="${LLMJAX_LIBTPU_FLAGS[*]}" JAX_PLATFORMS=cpu python3 -m llmjax.cli compile --topology v5e-8 \
    model.compute_dtype=bfloat16 model.n_layers=1 >/dev/null && echo "libtpu accepts: ${LLMJAX_LIBTPU_FLAGS[*]}"
  exit $?
fi
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:+$LIBTPU_INIT_ARGS }${LLMJAX_LIBTPU_FLAGS[*]}"
