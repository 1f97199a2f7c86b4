#!/usr/bin/env bash
# workbench train under DeepSpeed's launcher (`deepspeed`), used as a launcher only: parallel.* still picks the
# engine. Everything after the script's own options goes to `workbench` unchanged, e.g.
#
#   launch/deepspeed.sh train configs/llama3/debug.toml --parallel.backend ddp --parallel.dp_replicate 2
#   NPROC=8 launch/deepspeed.sh train CONFIG --parallel.backend fsdp2 --parallel.dp_shard 8
#
# The launcher adds --local_rank=N to every rank's arguments; workbench accepts and ignores it (LOCAL_RANK,
# which the launcher sets too, is what counts). Without CUDA, DS_ACCELERATOR defaults to cpu (gloo), and NPROC
# processes start on this machine. On one node the ranks meet at MASTER_ADDR=127.0.0.1, MASTER_PORT (29500;
# a second run on the same node needs another).
#
# Several nodes: a hostfile (a line `HOST slots=N` per node; NPROC, when set, overrides the slots) and node 0's
# address, reachable from the others. Either deepspeed starts every node over ssh (pdsh) from node 0:
#
#   HOSTFILE=hosts MASTER_ADDR=10.0.0.1 launch/deepspeed.sh train CONFIG ...
#
# or, without ssh, the same command on every node with its NODE_RANK (its line in the hostfile):
#
#   HOSTFILE=hosts MASTER_ADDR=10.0.0.1 NODE_RANK=0 launch/deepspeed.sh train CONFIG ...   # on 10.0.0.1
#   HOSTFILE=hosts MASTER_ADDR=10.0.0.1 NODE_RANK=1 launch/deepspeed.sh train CONFIG ...   # on the other
set -euo pipefail
PYTHON=${PYTHON:-python3}
HOSTFILE=${HOSTFILE:-}
NODE_RANK=${NODE_RANK:-}
MASTER_PORT=${MASTER_PORT:-29500}
ncuda=0
if [[ -z "${NPROC:-}" || -z "${DS_ACCELERATOR:-}" ]]; then
    ncuda=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    if [[ "$ncuda" == 0 ]]; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
fi
if [[ -z "$HOSTFILE" ]]; then
    # this node only; a missing hostfile keeps deepspeed from reading its default /job/hostfile
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    nodes=(--hostfile /dev/null --num_gpus "${NPROC:-$(( ncuda > 0 ? ncuda : 2 ))}")
else
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "launch/deepspeed.sh: HOSTFILE is set: set MASTER_ADDR to node 0's address too" >&2
        exit 2
    fi
    nodes=(--hostfile "$HOSTFILE")
    if [[ -n "${NPROC:-}" ]]; then nodes+=(--num_gpus "$NPROC"); fi
    if [[ -n "$NODE_RANK" ]]; then nodes+=(--no_ssh --node_rank "$NODE_RANK"); fi
fi
exec "$PYTHON" -m deepspeed.launcher.runner "${nodes[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module workbench.cli "$@"
