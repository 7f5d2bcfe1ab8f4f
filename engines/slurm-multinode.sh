#!/bin/bash
# The trl engine on several nodes of one Slurm allocation: one `accelerate launch` per node,
# all meeting at the allocation's first node. Use it as the train stage's launch command:
#
#   training:
#     engine: trl
#     accelerate: zero3
#     processes: 8            # all GPUs of all nodes
#     launch: "bash engines/slurm-multinode.sh {python} {accelerate} {processes} {port} {script} {engine_dir}"
#   resources:
#     train: {gpus: 4, sbatch: ["--nodes=2", "--ntasks-per-node=1"]}
#
# Not yet run on a multi-node cluster: none was at hand when it was written.
set -euo pipefail
python=$1 config=$2 processes=$3 port=$4 script=$5 engine_dir=$6
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --ntasks-per-node=1 bash -c "'$python' -m accelerate.commands.launch --quiet --config_file '$config' \
    --num_machines $SLURM_NNODES --machine_rank \$SLURM_NODEID --main_process_ip $head \
    --main_process_port $port --num_processes $processes '$script' '$engine_dir'"
