#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher: run once, on the first host of the hostfile; it reaches
# every host over passwordless ssh (pdsh) and starts GPUS_PER_NODE ranks on each.
#
#   HOSTFILE=hostfile RECIPE=llama3_8b_128k_to_1m launch/deepspeed_multinode.sh model.path=/models/Llama-3.1-8B
#   DRY_RUN=1 HOSTFILE=hostfile launch/deepspeed_multinode.sh model.path=/models/Llama-3.1-8B   # check first
#
# The hostfile lists one host per line with its GPU count: `node1 slots=8` (launch/hostfile.example).
# Every host needs the same paths: the current directory, the virtual environment, the model, the cache.
# Extra arguments are moba-train overrides (key=value). Environment: see docs/launch.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"

RECIPE=${RECIPE:-llama3_8b_128k_to_1m}
HOSTFILE=${HOSTFILE:-hostfile}
if [[ ! -f "$HOSTFILE" ]]; then
  echo "hostfile '$HOSTFILE' not found: write one line per host, e.g. 'node1 slots=8' (launch/hostfile.example)" >&2
  exit 2
fi
HOSTS=$(grep -vE '^[[:space:]]*(#|$)' "$HOSTFILE")
NODES=${NODES:-$(wc -l <<<"$HOSTS")}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(sed -nE '1s/.*slots=([0-9]+).*/\1/p' <<<"$HOSTS")}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NR==1 {print $1}' <<<"$HOSTS")}
MASTER_PORT=${MASTER_PORT:-29500}

dry_run_or_continue "$RECIPE" "$NODES" "$GPUS_PER_NODE" "$@"

# DeepSpeed reads .deepspeed_env (KEY=VALUE lines, nothing else) from the current directory and exports
# them on every host (which run in this same directory: it must exist there too); NCCL_* and PYTHON* variables are forwarded by the launcher itself.
: > .deepspeed_env
for name in "${MOBA_TRAIN_ENV_VARS[@]}"; do
  if [[ -n "${!name:-}" ]]; then echo "$name=${!name}" >> .deepspeed_env; fi
done

exec deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module moba_train recipe="$RECIPE" "$@"
