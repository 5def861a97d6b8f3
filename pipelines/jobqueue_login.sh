#!/usr/bin/env bash
# From a login node: dask-jobqueue submits SLURM jobs for the workers, this process is the
# client (keep it alive, e.g. in tmux, or submit this script itself as a small job).
#
#   pipelines/jobqueue_login.sh [JOB.toml] [--dry-run]
#
# --dry-run prints the resolved job and the worker job script, and submits nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
job=${1:-$here/jobqueue.toml}
shift || true
# --- site setup: `module load ...` and `conda activate ENV` (or `source VENV/bin/activate`)
# go here, or in a file PUMAP_SETUP names, sourced here (see pipelines/README.md) ----------
set +u; if [ -n "${PUMAP_SETUP:-}" ]; then source "$PUMAP_SETUP"; fi; set -u  # for conda
# --- end of site setup ------------------------------------------------------------------

pumap-dask check-job "$job"  # the whole job file, before any SLURM job is submitted
pumap-dask fit --config "$job" "$@"
