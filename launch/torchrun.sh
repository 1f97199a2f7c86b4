#!/usr/bin/env bash
# workbench train under torchrun, on one node or several. Everything after the script's own options goes
# to `workbench` unchanged, e.g.
#
#   launch/torchrun.sh train configs/llama3/debug.toml --parallel.backend fsdp2 --parallel.dp_shard 2
#   NPROC=8 launch/torchrun.sh train CONFIG --parallel.backend fsdp2 --parallel.dp_shard 8
#
# Several nodes: run the same command on every node with NNODES, NODE_RANK and RDZV_ENDPOINT (the host:port
# of node 0, reachable from the others). The endpoint defaults to loopback, so nothing listens beyond
# 127.0.0.1 unless you name an address (the stores then listen on that address only;
# WORKBENCH_RDZV_ALL_INTERFACES=1 is the explicit opt-in for every interface):
#
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=10.0.0.1:29500 launch/torchrun.sh train CONFIG ...   # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=10.0.0.1:29500 launch/torchrun.sh train CONFIG ...   # on the other
#
# MAX_RESTARTS (default 0) restarts every worker from the last complete checkpoint after a failure; pass
# --resume to train so that the restarted workers continue the run instead of refusing its folder.
set -euo pipefail
NPROC=${NPROC:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 2)")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python3}
if [[ "$NNODES" == 1 && "$RDZV_ENDPOINT" == 127.0.0.1:29500 ]]; then
    rdzv=(--standalone)  # one node: a free port on loopback
else
    rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
          --rdzv-id "${RDZV_ID:-workbench}")
fi
# torchrun with its stores bound to the endpoint's address only (workbench/parallel/rendezvous.py)
exec "$PYTHON" -m workbench.parallel.rendezvous "${rdzv[@]}" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
    -m workbench.cli "$@"
