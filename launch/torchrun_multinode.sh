#!/usr/bin/env bash
# Multi-node training with torchrun and its c10d rendezvous: run the same command on every node (by
# hand, pdsh, or your scheduler); the nodes find each other at MASTER_ADDR:MASTER_PORT.
#
#   NNODES=4 MASTER_ADDR=node1 RECIPE=llama3_8b_128k_to_1m launch/torchrun_multinode.sh model.path=/models/Llama-3.1-8B
#   DRY_RUN=1 NNODES=4 launch/torchrun_multinode.sh model.path=/models/Llama-3.1-8B        # check first
#
# Extra arguments are moba-train overrides (key=value). Environment: see docs/launch.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"

RECIPE=${RECIPE:-llama3_8b_128k_to_1m}
NNODES=${NNODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-moba-$RECIPE}        # the same on every node of one job, different between jobs

dry_run_or_continue "$RECIPE" "$NNODES" "$GPUS_PER_NODE" "$@"

: "${MASTER_ADDR:?set MASTER_ADDR to the host name of one node (the rendezvous endpoint), the same on every node}"
exec torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
  --max_restarts 0 \
  -m moba_train recipe="$RECIPE" "$@"
