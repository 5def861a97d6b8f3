#!/usr/bin/env bash
#SBATCH --job-name=pumap-gpu
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=256G
#SBATCH --time=02:00:00
#
# Multi-GPU training: one Dask worker per GPU (one thread, so one DDP rank each); the kNN and
# graph run on the same workers, then training runs as torch DDP with NCCL, one rank per GPU.
#
#   sbatch pipelines/multi_gpu.sh job.toml
#
# Without SLURM (or without GPUs) the same script runs PUMAP_WORKERS CPU workers with Gloo.
# Sites that launch with torchrun/srun instead of Dask use the training entry directly:
#   srun torchrun --nproc-per-node 4 -m pumap_dask.distributed.ddp cells.zarr model.work model
set -euo pipefail
job=${1:?usage: multi_gpu.sh JOB.toml}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/_cluster.sh"

run_dir=${PUMAP_RUN_DIR:-$PWD/pumap_run_${SLURM_JOB_ID:-local}}
ranks=${SLURM_NTASKS:-${PUMAP_WORKERS:-2}}
device=${PUMAP_DEVICE:-cuda}
start_dask_cluster "$run_dir" "$ranks" 1

pumap-dask fit --config "$job" --scheduler-file "$PUMAP_SCHEDULER_FILE" --device "$device" \
    --params "{\"train_world_size\": $ranks}"
model=$(python -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['fit']['model'])" "$job")
pumap-dask info "$model"
