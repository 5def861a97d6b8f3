#!/usr/bin/env bash
#SBATCH --job-name=pumap-fit
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#
# One SLURM allocation: a Dask scheduler and workers that find each other through a scheduler
# file on the shared file system, then `pumap-dask fit` and `pumap-dask transform` from one
# job file. Submit with:   sbatch pipelines/slurm_allocation.sh job.toml
# Without SLURM the same script starts the workers on this machine (PUMAP_WORKERS of them).
#
# Rerunning the same job after a kill or a timeout resumes: the fit from its work directory
# (kNN, graph shards, training checkpoints), the transform from its finished blocks.
set -euo pipefail
job=${1:?usage: slurm_allocation.sh JOB.toml}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/_cluster.sh"

run_dir=${PUMAP_RUN_DIR:-$PWD/pumap_run_${SLURM_JOB_ID:-local}}
workers=${SLURM_NTASKS:-${PUMAP_WORKERS:-2}}
threads=${SLURM_CPUS_PER_TASK:-${PUMAP_THREADS:-1}}
start_dask_cluster "$run_dir" "$workers" "$threads"

pumap-dask fit --config "$job" --scheduler-file "$PUMAP_SCHEDULER_FILE"
pumap-dask transform --config "$job" --scheduler-file "$PUMAP_SCHEDULER_FILE"
model=$(python -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['fit']['model'])" "$job")
pumap-dask report "$model"
echo "done: $model"
