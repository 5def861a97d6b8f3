# Sourced by the pipeline scripts: start a Dask scheduler and workers that meet through a
# scheduler file, inside a SLURM allocation (srun) or, without SLURM, on this machine (the
# same commands: this is how the scripts are tested). Stops them when the script exits.
#
#   start_dask_cluster RUN_DIR NWORKERS THREADS [extra dask-worker args...]
#   -> exports PUMAP_SCHEDULER_FILE
# PUMAP_SRUN_ARGS: more options for the workers' srun step (multi_gpu.sh: --gpus-per-task=1).
start_dask_cluster() {
    local run_dir=$1 nworkers=$2 threads=$3
    shift 3
    mkdir -p "$run_dir"
    export PUMAP_SCHEDULER_FILE="$run_dir/scheduler.json"
    rm -f "$PUMAP_SCHEDULER_FILE"  # a stale file from an earlier job points nowhere
    # the scheduler runs beside this script (on the allocation's first node)
    dask scheduler --scheduler-file "$PUMAP_SCHEDULER_FILE" --port 0 \
        --dashboard-address :0 >"$run_dir/scheduler.log" 2>&1 &
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        # one worker process per SLURM task, spread over the allocation's nodes
        # shellcheck disable=SC2086  # PUMAP_SRUN_ARGS: several options, split on spaces
        srun --ntasks="$nworkers" --cpus-per-task="$threads" ${PUMAP_SRUN_ARGS:-} \
            dask worker --scheduler-file "$PUMAP_SCHEDULER_FILE" --nthreads "$threads" \
            --nworkers 1 --local-directory "${TMPDIR:-/tmp}" "$@" \
            >"$run_dir/workers.log" 2>&1 &
    else
        dask worker --scheduler-file "$PUMAP_SCHEDULER_FILE" --nthreads "$threads" \
            --nworkers "$nworkers" "$@" >"$run_dir/workers.log" 2>&1 &
    fi
    # (|| true: workers that have already exited must not fail a job that succeeded)
    trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null' EXIT
    # wait until the workers have registered (pumap-dask waits for the file itself)
    python - "$PUMAP_SCHEDULER_FILE" "$nworkers" <<'PY'
import sys, time
from distributed import Client
path, n = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 120
while True:
    try:
        with Client(scheduler_file=path, timeout="10s") as c:
            c.wait_for_workers(n, timeout=max(1, deadline - time.time()))
        break
    except (OSError, ValueError, TimeoutError):
        if time.time() > deadline:
            sys.exit(f"the Dask cluster in {path} did not start; see the logs beside it")
        time.sleep(0.5)
PY
}
