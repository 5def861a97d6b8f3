"""pipelines/: the SLURM scripts' bodies run here without sbatch, against real ``dask
scheduler`` and ``dask worker`` processes that meet through a scheduler file."""

import json
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import pumap_dask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = os.path.join(ROOT, "pipelines")

anndata = pytest.importorskip("anndata")
pytestmark = pytest.mark.skipif(shutil.which("dask") is None, reason="no `dask` command")


def _adata_store(path, X, chunk=128):
    """An AnnData store whose obsm/X_pca has several row chunks (one edge shard each)."""
    import zarr

    a = anndata.AnnData(X=np.zeros((len(X), 1), np.float32))
    a.obsm["X_pca"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a.write_zarr(path)
    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    attrs = dict(g["obsm/X_pca"].attrs)
    del g["obsm/X_pca"]
    arr = g.create_array("obsm/X_pca", shape=X.shape, chunks=(chunk, X.shape[1]),
                         dtype="float32")
    arr[:] = X
    arr.attrs.update(attrs)
    zarr.consolidate_metadata(str(path))
    return str(path)


def _start(script, *args, cwd, env=None):
    """Start a pipeline script (as sbatch would, without SLURM's variables); see _finish."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(env or {})
    return subprocess.Popen(["bash", os.path.join(PIPELINES, script), *map(str, args)],
                            cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc, timeout=600):
    """Wait for a started script, which must succeed; returns its CompletedProcess."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    script = os.path.basename(proc.args[1])
    assert proc.returncode == 0, f"{script} failed:\n{out[-3000:]}\n{err[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(script, *args, cwd, env=None, timeout=600):
    return _finish(_start(script, *args, cwd=cwd, env=env), timeout)


def _job(tmp_path, store, extra=""):
    text = open(os.path.join(PIPELINES, "job.toml")).read()
    text = text.replace('"cells.zarr"', f'"{store}"')
    text = text.replace('min_dist = 0.1', 'min_dist = 0.1\nn_epochs = 3\nbatch_size = 1024\n'
                        'hidden_layers = [16]\ndevice = "cpu"\ntrain_world_size = 2\n' + extra)
    job = tmp_path / "job.toml"
    job.write_text(text)
    return str(job)


def test_slurm_allocation_script_with_a_scheduler_file(blobs, tmp_path):
    """Scheduler + 2 workers through a scheduler file, fit (partitioned, DDP over the 2
    workers) and transform from pipelines/job.toml, then the report."""
    store = _adata_store(tmp_path / "cells.zarr", blobs[0])
    job = _job(tmp_path, store)
    np.save(tmp_path / "labels.npy", blobs[2])  # [report] labels: the report's accuracy
    with open(job) as f:
        text = f.read().replace('# labels = "obs/cell_type"',
                                f'labels = "{tmp_path / "labels.npy"}"')
    with open(job, "w") as f:
        f.write(text)
    p = _run("slurm_allocation.sh", job, cwd=tmp_path,
             env={"PUMAP_WORKERS": "2", "PUMAP_RUN_DIR": str(tmp_path / "run")})
    model = pumap_dask.load(tmp_path / "model")
    assert model.knn_method_ == "partitioned" and model.train_world_size_ == 2
    emb = anndata.read_zarr(store).obsm["X_pumap"]
    np.testing.assert_allclose(emb, model.transform(blobs[0], refine=False), atol=1e-5)
    assert os.path.exists(tmp_path / "model" / "report.html")
    with open(tmp_path / "model" / "report.json") as f:
        metrics = json.load(f)["metrics"]  # report --data and --labels from [report]
    assert isinstance(metrics["trustworthiness"], float)
    assert isinstance(metrics["label_accuracy"], float)
    assert "done:" in p.stdout


def test_job_array_projects_each_store(blobs, fitted, tmp_path):
    stores = [_adata_store(tmp_path / f"s{i}.zarr", X) for i, X in enumerate(blobs[:2])]
    (tmp_path / "stores.txt").write_text("\n".join(stores) + "\n")
    model = fitted.save(str(tmp_path / "model"))
    # the array's tasks run at the same time, as SLURM runs them (and the two processes'
    # imports share the 2 cores instead of following each other)
    tasks = [_start("job_array.sh", tmp_path / "stores.txt", model, cwd=tmp_path,
                    env={"SLURM_ARRAY_TASK_ID": str(task), "PUMAP_SCHEDULER": "threads"})
             for task in range(2)]
    for proc in tasks:
        _finish(proc)
    for store, X in zip(stores, blobs[:2]):
        np.testing.assert_allclose(anndata.read_zarr(store).obsm["X_pumap"],
                                   fitted.transform(X, refine=False), atol=1e-5)


def test_job_array_without_task_id_fails_clearly(tmp_path):
    p = subprocess.run(["bash", os.path.join(PIPELINES, "job_array.sh"), "x.txt", "m"],
                       cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")})
    assert p.returncode != 0 and "SLURM_ARRAY_TASK_ID" in p.stderr


@pytest.mark.slow
def test_multi_gpu_script_on_cpu_workers(blobs, tmp_path):
    """The multi-GPU allocation's body with 2 CPU workers: one Gloo rank per worker."""
    store = _adata_store(tmp_path / "cells.zarr", blobs[0])
    job = _job(tmp_path, store)
    p = _run("multi_gpu.sh", job, cwd=tmp_path,
             env={"PUMAP_WORKERS": "2", "PUMAP_DEVICE": "cpu",
                  "PUMAP_RUN_DIR": str(tmp_path / "run")})
    assert pumap_dask.load(tmp_path / "model").train_world_size_ == 2
    assert "Parametric UMAP" in p.stdout or "train_world_size" in p.stdout


def test_jobqueue_login_dry_run(blobs, tmp_path):
    pytest.importorskip("dask_jobqueue")
    store = _adata_store(tmp_path / "cells.zarr", blobs[0])
    text = open(os.path.join(PIPELINES, "jobqueue.toml")).read().replace(
        '"cells.zarr"', f'"{store}"')
    (tmp_path / "jq.toml").write_text(text)
    p = _run("jobqueue_login.sh", tmp_path / "jq.toml", "--dry-run", cwd=tmp_path)
    assert "#SBATCH" in p.stdout and "submit 4 SLURM job(s)" in p.stdout
    assert not os.path.exists(tmp_path / "model")


# ---------------------------------------------------------------- the job file, first
SHIM = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$SHIM_LOG"
case "$(basename "$0") $1" in
    "python -") cat > /dev/null ;;  # _cluster.sh's wait for the workers
    "pumap-dask job-get")
        shift 2
        for name in "$@"; do
            case $name in
                fit.model) echo model ;; report.data) echo "cells 2.zarr" ;;
                report.labels) echo obs/cell_type ;; --default|"") ;; *) echo ;;
            esac
        done ;;
esac
"""


def _shims(tmp_path, names):
    """Commands that only log their arguments to ``SHIM_LOG`` (``pumap-dask job-get`` also
    answers); returns the environment that puts them first on PATH."""
    bin_dir = tmp_path / "shims"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text(SHIM)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SHIM_LOG": str(tmp_path / "log")}


def _log(tmp_path):
    return (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []


@pytest.mark.parametrize("script", ["slurm_allocation.sh", "multi_gpu.sh"])
def test_scripts_check_the_job_first_then_srun_one_task_per_gpu(tmp_path, script):
    """Under SLURM (srun, dask, python and pumap-dask stand-ins): check-job before the
    scheduler starts; multi_gpu.sh's workers get --gpus-per-task=1; the report gets the
    [report] table's --data and --labels; PUMAP_SETUP is sourced first."""
    env = _shims(tmp_path, ["pumap-dask", "dask", "srun", "python"])
    (tmp_path / "setup.sh").write_text('echo "setup $UNSET_IN_MODULE_SCRIPTS" >> "$SHIM_LOG"\n')
    env.update(SLURM_JOB_ID="7", SLURM_NTASKS="4", SLURM_CPUS_PER_TASK="8",
               PUMAP_RUN_DIR=str(tmp_path / "run"), PUMAP_SETUP=str(tmp_path / "setup.sh"))
    _run(script, "job.toml", cwd=tmp_path, env=env, timeout=60)
    log = _log(tmp_path)
    commands = [" ".join(line.split()[:2]) for line in log]
    assert commands[:2] == ["setup", "pumap-dask check-job"]  # setup under set +u
    assert commands.index("pumap-dask check-job") < commands.index("dask scheduler")
    srun = next(line for line in log if line.startswith("srun"))
    assert "--ntasks=4" in srun and "dask worker" in srun
    if script == "multi_gpu.sh":
        assert "--gpus-per-task=1" in srun and "--nthreads 1" in srun
    else:
        report = next(line for line in log if line.startswith("pumap-dask report"))
        assert report == "pumap-dask report model --data cells 2.zarr --labels obs/cell_type"


def test_a_bad_job_file_fails_before_any_worker_starts(tmp_path):
    """The real check-job: a fit key at the top level fails the script, naming its table,
    before `dask scheduler` or srun runs."""
    env = _shims(tmp_path, ["dask", "srun"])
    (tmp_path / "job.toml").write_text('n_neighbors = 15\n[fit]\ninput = "x.zarr"\n'
                                       'model = "m"\n')
    p = subprocess.run(["bash", os.path.join(PIPELINES, "slurm_allocation.sh"), "job.toml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, **env, "SLURM_JOB_ID": "7"})
    assert p.returncode == 2
    assert "n_neighbors belongs in the [fit] table" in p.stderr
    assert _log(tmp_path) == []  # no scheduler, no workers
