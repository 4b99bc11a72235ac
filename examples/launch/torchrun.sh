#!/usr/bin/env bash
# Launch a megaphi run with torchrun on one node or many (run this on every node).
#   NNODES=16 NODE_RANK=0 MASTER_ADDR=node001 bash examples/launch/torchrun.sh CONFIG.yaml [key=value ...]
# The Phi-4 14B runs:
#   pre-training at 4K  examples/phi4_14b_pretrain.yaml  tp=2 x pp=4 (one 8-GPU node per replica),
#                       sequence parallel, distributed optimizer; global batch 5,760 x 4,096
#   mid-training at 16K examples/phi4_14b_midtrain.yaml  tp=2 x cp=2 x pp=4 (two nodes per
#                       replica); global batch 1,440 x 16,384; starts from the pre-training run
set -euo pipefail
if [[ $# -lt 1 || "$1" != *.yaml ]]; then
  echo "usage: bash $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
cd "$(dirname "$0")/../.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron's TP communication overlap needs ordered kernels
exec python -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megaphi.train --config "$CONFIG" "$@"
