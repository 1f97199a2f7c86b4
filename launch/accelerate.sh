#!/usr/bin/env bash
# workbench train under `accelerate launch`, used as a launcher only (it starts torchrun; workbench never imports
# accelerate, so parallel.* still picks the engine). Everything after the script's own options goes to
# `workbench` unchanged, e.g.
#
#   launch/accelerate.sh train configs/llama3/debug.toml --parallel.backend ddp --parallel.dp_replicate 2
#   NPROC=8 launch/accelerate.sh train CONFIG --parallel.backend fsdp2 --parallel.dp_shard 8
#
# Every launch setting is a flag (--multi_gpu is accelerate's torchrun path, on CPU too: gloo), so a saved
# `accelerate config` does not change the launch. On one node the ranks meet at MASTER_ADDR=127.0.0.1,
# MASTER_PORT (29500; accelerate picks a free one if that is taken).
#
# Several nodes: the same command on every node with NNODES, NODE_RANK and MASTER_ADDR (node 0's address,
# reachable from the others); NPROC is per node:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/accelerate.sh train CONFIG ...   # on 10.0.0.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/accelerate.sh train CONFIG ...   # on the other
set -euo pipefail
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 2)")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
mode=(--multi_gpu --gpu_ids all)  # one process in all: accelerate refuses --multi_gpu, and runs it plainly
if (( NPROC * NNODES == 1 )); then mode=(); fi
# accelerate launch with its stores bound to MASTER_ADDR only (workbench/parallel/rendezvous.py)
exec "$PYTHON" -m workbench.parallel.rendezvous accelerate "${mode[@]}" --mixed_precision no --dynamo_backend no \
    --num_processes $((NPROC * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --rdzv_backend static \
    --num_cpu_threads_per_process "${OMP_NUM_THREADS:-1}" --module workbench.cli "$@"
