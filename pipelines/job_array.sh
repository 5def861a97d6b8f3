#!/usr/bin/env bash
#SBATCH --job-name=pumap-project
#SBATCH --array=0-99%20
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=00:30:00
#
# A job array projecting many AnnData stores with one fitted model: task i embeds line i of
# STORES.txt into its obsm/X_pumap. Each task uses a LocalCluster on its own node; a task
# that fails or times out is resubmitted as is and resumes its unfinished blocks.
#
#   sbatch --array=0-$(( $(wc -l < stores.txt) - 1 )) pipelines/job_array.sh stores.txt model
set -euo pipefail
list=${1:?usage: job_array.sh STORES.txt MODEL_DIR}
model=${2:?usage: job_array.sh STORES.txt MODEL_DIR}
task=${SLURM_ARRAY_TASK_ID:?SLURM_ARRAY_TASK_ID is not set (run under sbatch --array)}
# --- site setup: `module load ...` and `conda activate ENV` (or `source VENV/bin/activate`)
# go here, or in a file PUMAP_SETUP names, sourced here (see pipelines/README.md) ----------
set +u; if [ -n "${PUMAP_SETUP:-}" ]; then source "$PUMAP_SETUP"; fi; set -u  # for conda
# --- end of site setup ------------------------------------------------------------------
store=$(sed -n "$((task + 1))p" "$list")
if [ -z "$store" ]; then
    echo "no store on line $((task + 1)) of $list" >&2
    exit 2
fi
pumap-dask transform "$store" "$model" --obsm X_pumap --key "${PUMAP_KEY:-obsm/X_pca}" \
    --scheduler "${PUMAP_SCHEDULER:-local}" --workers 1 --threads "${SLURM_CPUS_PER_TASK:-1}"
echo "task $task: $store -> obsm/X_pumap"
