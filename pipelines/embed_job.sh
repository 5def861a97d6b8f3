#!/usr/bin/env bash
# Scheduled batch job: fit a parametric UMAP on a reference store, then project new stores.
#
#   pipelines/embed_job.sh REFERENCE.zarr MODEL_DIR [QUERY.zarr ...]
#
# Environment:
#   PUMAP_SCHEDULER  'local' (LocalCluster, default), 'threads', or a scheduler address
#                    (e.g. tcp://node01:8786 started by your Slurm/PBS script)
#   PUMAP_KEY        array inside the stores (default obsm/X_pca)
#   PUMAP_PARAMS     extra ParametricUMAP parameters as JSON (default {})
#   PUMAP_REFIT      1 to refit even when MODEL_DIR exists (default 0)
#
# Each query store gets obsm/X_pumap written in place. Both steps are safe to rerun after a
# failure: an existing model is reused, and the transform resumes the blocks it had not
# finished.
#
# Under Slurm, for example:
#   #SBATCH --nodes=2 --ntasks-per-node=1
#   srun --nodes=1 --ntasks=1 dask scheduler --scheduler-file sched.json &
#   srun dask worker --scheduler-file sched.json --nthreads 4 &
#   PUMAP_SCHEDULER=$(python -c "import json;print(json.load(open('sched.json'))['address'])") \
#       pipelines/embed_job.sh ref.zarr model/ batch1.zarr batch2.zarr
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,8p' "$0" >&2
    exit 2
fi
# --- site setup: `module load ...` and `conda activate ENV` (or `source VENV/bin/activate`)
# go here, or in a file PUMAP_SETUP names, sourced here (see pipelines/README.md) ----------
set +u; if [ -n "${PUMAP_SETUP:-}" ]; then source "$PUMAP_SETUP"; fi; set -u  # for conda
# --- end of site setup ------------------------------------------------------------------
ref=$1
model=$2
shift 2
scheduler=${PUMAP_SCHEDULER:-local}
key=${PUMAP_KEY:-obsm/X_pca}
params=${PUMAP_PARAMS:-{\}}
for query in "$@"; do  # before the fit: a typo in a query path costs no fit
    if [ ! -e "$query" ]; then
        echo "embed_job.sh: no query store $query; check the path (nothing was run)" >&2
        exit 2
    fi
done

if [ -d "$model" ] && [ "${PUMAP_REFIT:-0}" != "1" ]; then
    echo "reusing model $model (PUMAP_REFIT=1 to refit)"
else
    pumap-dask fit "$ref" "$model" --key "$key" --scheduler "$scheduler" --params "$params"
fi

for query in "$@"; do
    pumap-dask transform "$query" "$model" --key "$key" --obsm X_pumap --scheduler "$scheduler"
    echo "embedded $query -> obsm/X_pumap"
done
