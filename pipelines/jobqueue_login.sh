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
pumap-dask fit --config "$job" "$@"
