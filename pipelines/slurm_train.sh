#!/usr/bin/env bash
# Example: FBSEM-Net data-parallel training on a SLURM cluster, torchrun on every node.
#
#   sbatch pipelines/slurm_train.sh            # edit the #SBATCH lines and the paths below first
#
# One torchrun agent per node (--ntasks-per-node=1) starts one rank per GPU; the agents meet
# through torchrun's c10d rendezvous on the first node. GPU ranks use nccl, CPU ranks gloo
# (the package chooses by --device). --out must be on a filesystem every node sees: rank 0
# writes the checkpoints there and every rank reads them on resume. A failed or preempted
# rank makes torchrun restart the workers (--max-restarts); they resume from the last
# complete stage/epoch. After a requeue (scontrol requeue / --requeue) the job starts again
# with --resume and continues the same run.
#SBATCH --job-name=fbsem-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

DATA=${DATA:-/shared/fbsem/data/train}        # written by `sirf-fbsem simulate`
OUT=${OUT:-/shared/fbsem/runs/seq-$SLURM_JOB_ID}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-4}

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$head_node:29500" \
    --rdzv-id "$SLURM_JOB_ID" \
    --max-restarts 3 \
    -m sirf_fbsem train \
        --data "$DATA" --out "$OUT" --mode sequential --stages 10 \
        --epochs 50 --batch-size 32 --device cuda --no-progress --resume
# --batch-size is the global batch: each of the nodes x GPUs ranks takes an equal share.
# Batch reconstruction of an archive works the same way:
#   srun torchrun ... -m sirf_fbsem reconstruct @scans.txt --model "$OUT/model.pt" \
#       --output-dir /shared/fbsem/recon --device cuda
