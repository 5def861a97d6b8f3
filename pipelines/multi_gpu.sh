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
#   pumap-dask check-job job.toml && sbatch pipelines/multi_gpu.sh job.toml
#
# Each worker's srun task gets --gpus-per-task=1 (SLURM binds one GPU to each task).
# Without SLURM (or without GPUs) the same script runs PUMAP_WORKERS CPU workers with Gloo.
# Sites that launch with torchrun/srun instead of Dask use the training entry directly:
#   srun torchrun --nproc-per-node 4 -m pumap_dask.distributed.ddp cells.zarr model.work model
set -euo pipefail
job=${1:?usage: multi_gpu.sh JOB.toml}
# --- site setup: `module load ...` and `conda activate ENV` (or `source VENV/bin/activate`)
# go here, or in a file PUMAP_SETUP names, sourced here (see pipelines/README.md) ----------
set +u; if [ -n "${PUMAP_SETUP:-}" ]; then source "$PUMAP_SETUP"; fi; set -u  # for conda
# --- end of site setup ------------------------------------------------------------------
# the whole job file (keys, values, inputs, output ownership), before any worker starts
pumap-dask check-job "$job"
model=$(pumap-dask job-get "$job" fit.model)
here=${PUMAP_PIPELINES:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
source "$here/_cluster.sh" || { echo "sbatch runs a copy of this script: set" \
    "PUMAP_PIPELINES=/path/to/pipelines" >&2; exit 2; }

run_dir=${PUMAP_RUN_DIR:-$PWD/pumap_run_${SLURM_JOB_ID:-local}}
ranks=${SLURM_NTASKS:-${PUMAP_WORKERS:-2}}
device=${PUMAP_DEVICE:-cuda}
if [ "$device" != "cpu" ]; then  # one task per GPU: each worker (one DDP rank) sees its own
    export PUMAP_SRUN_ARGS="--gpus-per-task=1 ${PUMAP_SRUN_ARGS:-}"
fi
start_dask_cluster "$run_dir" "$ranks" 1

pumap-dask fit --config "$job" --scheduler-file "$PUMAP_SCHEDULER_FILE" --device "$device" \
    --params "{\"train_world_size\": $ranks}"
pumap-dask info "$model"
