# Shared by the launch scripts (sourced, not run): the environment every rank needs, and the dry run.

# Variables passed to every rank when they are set here (DeepSpeed's launcher forwards NCCL_* and
# PYTHON* by itself; the rest goes through .deepspeed_env). Keep this list in step with docs/launch.md.
MOBA_TRAIN_ENV_VARS=(
  MOBA_TRAIN_CACHE HF_HOME HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE TOKENIZERS_PARALLELISM
  WANDB_MODE WANDB_DIR WANDB_PROJECT WANDB_ENTITY
  LLAMA3_8B_PATH QWEN2_5_7B_PATH
  PYTORCH_CUDA_ALLOC_CONF CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS
  TRITON_CACHE_DIR
)

# Defaults that matter at long context: fewer fragmentation OOMs, NCCL errors raised instead of hangs,
# nothing fetched from the Hugging Face hub.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

PYTHON=${PYTHON:-python}

# DRY_RUN=1: check the launch on this machine instead (no GPU, no weights; exits 1 when a rule fails or a
# stage does not fit). Usage: dry_run_or_continue "$RECIPE" "$NODES" "$GPUS_PER_NODE" "$@"
dry_run_or_continue() {
  local recipe=$1 nodes=$2 gpus=$3
  shift 3
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "DRY_RUN=1: checking recipe=$recipe on $nodes node(s) x $gpus GPU(s) instead of launching"
    exec "$PYTHON" -m moba_train recipe="$recipe" dry_run=true nodes="$nodes" gpus_per_node="$gpus" "$@"
  fi
}
