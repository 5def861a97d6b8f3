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
# job file, then `pumap-dask report` with the [report] table's data and labels. Submit with
#   pumap-dask check-job job.toml && sbatch pipelines/slurm_allocation.sh job.toml
# (check-job on the login node: a typo in the job file costs no allocation; the script runs it
# again before any worker starts). [transform] is optional.
# Without SLURM the same script starts the workers on this machine (PUMAP_WORKERS of them).
#
# Rerunning the same job after a kill or a timeout resumes: the fit from its work directory
# (kNN, graph shards, training checkpoints), the transform from its finished blocks.
set -euo pipefail
job=${1:?usage: slurm_allocation.sh JOB.toml}
# --- site setup: `module load ...` and `conda activate ENV` (or `source VENV/bin/activate`)
# go here, or in a file PUMAP_SETUP names, sourced here (see pipelines/README.md) ----------
set +u; if [ -n "${PUMAP_SETUP:-}" ]; then source "$PUMAP_SETUP"; fi; set -u  # for conda
# --- end of site setup ------------------------------------------------------------------
here=${PUMAP_PIPELINES:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
source "$here/_cluster.sh" || { echo "sbatch runs a copy of this script: set" \
    "PUMAP_PIPELINES=/path/to/pipelines" >&2; exit 2; }

# the whole job file (keys, values, inputs, output ownership), before any worker starts
pumap-dask check-job "$job"
values=$(pumap-dask job-get "$job" fit.model transform.input report.data report.key \
    report.labels report.out report.sample --default "")
mapfile -t v <<<"$values"  # one line a key ($(...) drops the trailing empty ones)
model=${v[0]:-} transform_input=${v[1]:-}
if [ -z "$model" ]; then
    echo "$job has no [fit] table with model = ...: slurm_allocation.sh fits a model" >&2
    exit 2
fi
report_args=() flags=(data key labels out sample)  # report.* -> --data ... (when set)
for i in "${!flags[@]}"; do
    if [ -n "${v[i + 2]:-}" ]; then report_args+=("--${flags[i]}" "${v[i + 2]}"); fi
done

run_dir=${PUMAP_RUN_DIR:-$PWD/pumap_run_${SLURM_JOB_ID:-local}}
workers=${SLURM_NTASKS:-${PUMAP_WORKERS:-2}}
threads=${SLURM_CPUS_PER_TASK:-${PUMAP_THREADS:-1}}
start_dask_cluster "$run_dir" "$workers" "$threads"

pumap-dask fit --config "$job" --scheduler-file "$PUMAP_SCHEDULER_FILE"
if [ -n "$transform_input" ]; then
    pumap-dask transform --config "$job" --scheduler-file "$PUMAP_SCHEDULER_FILE"
fi
pumap-dask report "$model" ${report_args[@]+"${report_args[@]}"}
echo "done: $model"
