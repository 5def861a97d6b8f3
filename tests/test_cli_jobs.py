"""Scheduled jobs through the command line: job files, precedence, info/report, resume after a
kill, exit codes. The commands run in this process (``cli.main`` returns the exit code, its
stderr is captured, its log lines reach ``caplog``); a real ``pumap-dask`` subprocess is used
where the process is the point: the jobs that get killed, and one check that the exit code and
the one-line reason reach a batch scheduler (about 7 s of imports per subprocess)."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import pumap_dask
from pumap_dask import cli
from pumap_dask.cli import EXIT_CLUSTER, EXIT_OK, EXIT_USAGE, main

FIT = {"n_epochs": 4, "batch_size": 1024, "hidden_layers": [16], "device": "cpu"}


def _store(path, X, chunk=64):
    z = zarr.create_array(str(path), shape=X.shape, chunks=(chunk, X.shape[1]),
                          dtype="float32")
    z[:] = X
    return str(path)


def _toml(path, text):
    path.write_text(text)
    return str(path)


def _cli(*args, env=None, timeout=300):
    """Run ``pumap-dask`` in a subprocess; returns (code, stdout, stderr)."""
    env = {**os.environ, "PUMAP_PROGRESS_INTERVAL": "0.2", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "pumap_dask.cli", *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _errline(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("pumap-dask: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def store(blobs, tmp_path):
    return _store(tmp_path / "in.zarr", blobs[0])


# ---------------------------------------------------------------- job files and precedence
def test_precedence_defaults_file_params_flags(store, tmp_path, capsys):
    job = _toml(tmp_path / "job.toml", f"""
log_level = "warning"
[fit]
input = "{store}"
model = "{tmp_path / 'm'}"
n_neighbors = 10
min_dist = 0.3
spread = 2.0
n_epochs = 7
[cluster]
scheduler = "threads"
workers = 3
""")
    code = main(["fit", "--config", job, "--n-neighbors", "12", "--params",
                 '{"min_dist": 0.2, "n_epochs": 9}', "--workers",
                 "4", "--dry-run"])
    assert code == EXIT_OK
    out = capsys.readouterr().out
    resolved = json.loads(out[:out.rindex("}") + 1])
    p = resolved["params"]
    assert p["n_neighbors"] == 12          # flag > file
    assert p["min_dist"] == 0.2            # --params > file
    assert p["spread"] == 2.0              # file > default
    assert p["n_epochs"] == 9
    assert p["n_components"] == 2          # default
    assert resolved["cluster"]["workers"] == 4 and resolved["cluster"]["scheduler"] == "threads"
    assert resolved["input"] == store
    assert "threaded scheduler" in out
    assert not os.path.exists(tmp_path / "m")  # a dry run writes nothing


@pytest.mark.parametrize("text, needle", [
    ("[fit]\nn_neighbours = 5\n", "unknown key(s) ['n_neighbours'] in [fit]"),
    ("[fitt]\nn_neighbors = 5\n", "unknown key(s) ['fitt']"),
    ("[fit]\nmin_dist = -1.0\n", "[fit]: min_dist must lie in [0, inf)"),
    ("[fit]\nknn_method = 'fast'\n", "knn_method"),
    ("[cluster]\nworkers = 0\n", "[cluster] workers must be a positive integer"),
    ("[cluster]\nscheduler = 'yarn'\n", "scheduler must be one of"),
    ("[cluster]\nmemory = 'lots'\n", "memory must be 'auto' or a size"),
    ("[slurm]\nwalltime = 5\n", "[slurm] walltime must be a non-empty string"),
    ("[transform]\noverwrite = 'yes'\n", "overwrite must be true or false"),
    ("log_level = 'loud'\n", "log_level must be one of"),
    ("[fit\n", "is not valid TOML"),
])
def test_bad_job_files_fail_before_work(store, tmp_path, capsys, monkeypatch, text, needle):
    monkeypatch.setattr(cli, "_client", lambda args: pytest.fail("cluster started"))
    job = _toml(tmp_path / "job.toml", text)
    code = main(["fit", store, str(tmp_path / "m"), "--config", job])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    line = _errline(err)
    assert needle in line and "job.toml" in line
    assert not os.path.exists(tmp_path / "m")


def test_missing_or_unknown_config_files(store, tmp_path, capsys):
    code = main(["fit", store, str(tmp_path / "m"), "--config", str(tmp_path / "nope.toml")])
    assert code == EXIT_USAGE and "does not exist" in _errline(capsys.readouterr().err)
    (tmp_path / "job.ini").write_text("[fit]\n")
    code = main(["fit", store, str(tmp_path / "m"), "--config", str(tmp_path / "job.ini")])
    assert code == EXIT_USAGE and ".toml, .yaml or .yml" in _errline(capsys.readouterr().err)
    code = main(["fit"])  # neither positional nor a job file
    assert code == EXIT_USAGE and "needs INPUT" in _errline(capsys.readouterr().err)


def test_yaml_job_file(store, tmp_path, capsys):
    pytest.importorskip("yaml")
    job = tmp_path / "job.yaml"
    job.write_text(f"fit:\n  input: {store}\n  model: {tmp_path / 'm'}\n  n_neighbors: 8\n"
                   "cluster:\n  scheduler: threads\n")
    assert main(["-q", "fit", "--config", str(job), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert json.loads(out[:out.rindex("}") + 1])["params"]["n_neighbors"] == 8


def test_jobqueue_dry_run_prints_the_job_script(store, tmp_path, capsys):
    pytest.importorskip("dask_jobqueue")
    job = _toml(tmp_path / "job.toml", f"""
[fit]
input = "{store}"
model = "{tmp_path / 'm'}"
[cluster]
scheduler = "slurm"
[slurm]
jobs = 3
cores = 4
memory = "8GiB"
walltime = "01:00:00"
queue = "short"
""")
    assert main(["-q", "fit", "--config", job, "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "submit 3 SLURM job(s)" in out
    assert "#SBATCH -p short" in out and "#SBATCH -t 01:00:00" in out
    assert "dask" in out and "--nthreads" in out


# ---------------------------------------------------------------- end to end
@pytest.fixture()
def run_cli(capsys, caplog, monkeypatch):
    """Run ``pumap-dask`` in this process; returns (code, stdout, stderr + the log lines).

    The log lines (progress included) go to ``caplog`` here rather than to stderr; the
    command's own level (``-q`` or not) decides which are emitted, as in a subprocess."""
    monkeypatch.setenv("PUMAP_PROGRESS_INTERVAL", "0.2")
    caplog.set_level(logging.INFO, logger="pumap_dask")  # restored after the test

    def run(*args):
        caplog.clear()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err + caplog.text

    return run


def test_fit_info_transform_report_end_to_end(blobs, store, tmp_path, run_cli):
    query = _store(tmp_path / "query.zarr", blobs[1])
    labels = tmp_path / "labels.npy"
    np.save(labels, blobs[3])
    model = tmp_path / "model"
    job = _toml(tmp_path / "job.toml", f"""
[fit]
input = "{store}"
model = "{model}"
n_epochs = 4
batch_size = 1024
hidden_layers = [16]
device = "cpu"
[transform]
input = "{query}"
model = "{model}"
out = "{tmp_path / 'emb.zarr'}"
[cluster]
scheduler = "threads"
""")
    code, out, err = run_cli("fit", "--config", job, "--random-state", "7")
    assert code == 0, err
    assert "train: 4/4 epochs" in err  # progress as log lines (stderr is not a terminal)
    assert not os.path.exists(str(model) + ".work")  # default work dir removed after success
    run = json.load(open(model / "run_config.json"))
    assert run["resolved"]["params"]["random_state"] == 7 and run["config_file"] == job
    code, out, err = run_cli("info", model)
    assert code == 0, err
    assert "random_state" in out and "n_epochs" in out and str(len(blobs[0])) in out
    code, out, err = run_cli("transform", "--config", job)
    assert code == 0, err
    fitted = pumap_dask.load(model)
    emb = zarr.open_array(str(tmp_path / "emb.zarr"), mode="r")[:]
    assert np.abs(emb - fitted.transform(blobs[1], refine=False)).max() <= 1e-5
    code, out, err = run_cli("report", model, "--data", query, "--labels", labels,
                             "--sample", "300")
    assert code == 0, err
    rep = json.load(open(model / "report.json"))
    html = (model / "report.html").read_text()
    assert "data:image/png;base64" in html
    assert json.dumps(rep)  # plain JSON
    assert any("trust" in k.lower() for k in json.dumps(rep).split('"'))
    # a refit replaces the model with its run config and report (never anything else)
    code, out, err = run_cli("fit", "--config", job, "-q")
    assert code == 0, err
    assert not (model / "report.html").exists() and (model / "run_config.json").exists()


# ---------------------------------------------------------------- a killed job resumes
def _wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the job ended before it could be killed: {err[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the job")
        time.sleep(0.05)


def test_killed_fit_resumes_from_its_work_directory(blobs, tmp_path, run_cli):
    from pumap_dask.datasets import clusters

    X, _ = clusters(3000, 16, 5, random_state=1)
    src = _store(tmp_path / "big.zarr", X, chunk=500)
    work = tmp_path / "work"
    # 12 epochs: the job is killed 0.3 s after its first checkpoint, and the rerun trains the
    # rest in this process (40 epochs took 20 s here for no more proof)
    params = json.dumps({"n_epochs": 12, "batch_size": 512, "hidden_layers": [32],
                         "knn_method": "partitioned", "device": "cpu"})
    cmd = [sys.executable, "-m", "pumap_dask.cli", "fit", src, str(tmp_path / "m"),
           "--scheduler", "threads", "--work-dir", str(work), "--params", params]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = work / "train"
    _wait_for(lambda: ckpt.exists() and any(ckpt.iterdir()), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "m" / "config.json").exists()
    # the rerun (the same command) in this process: only the killed job needs its own
    code, _, err = run_cli(*cmd[3:])
    assert code == 0, err
    assert "kNN reused" in err and "graph reused" in err
    assert "resuming training from" in err
    assert pumap_dask.load(tmp_path / "m").n_epochs_ == 12
    assert work.exists()  # a work directory given by the user is never removed


def test_killed_transform_resumes_unfinished_blocks(fitted, tmp_path, run_cli):
    rng = np.random.default_rng(0)
    # 300 blocks of 40 rows: the job is killed once 5 are done, and the rerun (in this
    # process) computes the rest; 1,000 blocks cost 18 s more here for no more proof
    n_blocks = 300
    X = rng.normal(size=(40 * n_blocks, 16)).astype(np.float32)
    src = _store(tmp_path / "q.zarr", X, chunk=40)
    model = fitted.save(str(tmp_path / "model"))
    out = tmp_path / "emb.zarr"
    cmd = [sys.executable, "-m", "pumap_dask.cli", "transform", src, model, "--out",
           str(out), "--scheduler", "threads"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = out / ".pumap_done"

    def some_blocks():
        return done.exists() and len(os.listdir(done)) >= 5

    _wait_for(some_blocks, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(os.listdir(done))
    assert 0 < n_done < n_blocks
    code, _, err = run_cli(*cmd[3:])  # the rerun, in this process
    assert code == 0, err
    assert f"({n_done} already done)" in err or "already done" in err
    emb = zarr.open_array(str(out), mode="r")[:]
    assert np.abs(emb - fitted.transform(X, refine=False)).max() <= 1e-5


# ---------------------------------------------------------------- exit codes and messages
def test_exit_codes_and_one_line_reasons(store, fitted, tmp_path, run_cli):
    # one real subprocess: the exit code and the one-line reason reach the batch scheduler
    code, _, err = _cli("fit", store, tmp_path / "m", "--scheduler-file",
                        tmp_path / "nowhere.json", "--connect-timeout", "1")
    assert code == EXIT_CLUSTER and "did not appear within 1 s" in _errline(err)
    # the rest in this process: main() returns the code, its one line goes to stderr
    code, _, err = run_cli("fit", tmp_path / "missing.zarr", tmp_path / "m", "--scheduler",
                           "threads")
    assert code == EXIT_USAGE and "missing.zarr" in _errline(err)
    anndata_like = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    anndata_like.create_array("obsm/X_pca", shape=(50, 4), dtype="float32")
    code, _, err = run_cli("fit", tmp_path / "g.zarr", tmp_path / "m", "--key", "obsm/X_umap",
                           "--scheduler", "threads")
    assert code == EXIT_USAGE and "X_umap" in _errline(err)
    bad = _toml(tmp_path / "bad.toml", "[fit]\nn_neighbors = 'many'\n")
    code, _, err = run_cli("fit", store, tmp_path / "m", "--config", bad)
    assert code == EXIT_USAGE and "n_neighbors" in _errline(err)
    model = fitted.save(str(tmp_path / "model"))
    cfg = json.load(open(os.path.join(model, "config.json")))
    cfg["format_version"] = 99
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(cfg, f)
    for cmd in (("info", model), ("transform", store, model, "--out", tmp_path / "e.zarr",
                                  "--scheduler", "threads")):
        code, _, err = run_cli(*cmd)
        assert code == EXIT_USAGE, err
        assert "version" in _errline(err)


def test_work_dir_must_be_shared_by_the_workers(tmp_path):
    from pumap_dask.errors import ClusterError
    from pumap_dask.distributed.cluster import check_shared_directory

    class Blind:  # a client whose workers do not see this machine's files
        def run(self, fn, path, token):
            return {"tcp://node7:1234": False, "tcp://node8:1234": fn(path, token)}

    with pytest.raises(ClusterError, match="not visible from 1 of 2 Dask workers"):
        check_shared_directory(Blind(), str(tmp_path / "w"))
    assert os.listdir(tmp_path / "w") == []  # the probe is removed


def test_mpi_without_dask_mpi_says_how_to_install(store, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dask_mpi(name, *a, **k):
        if name.startswith("dask_mpi"):
            raise ImportError("No module named 'dask_mpi'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask_mpi)
    code = main(["-q", "fit", store, str(tmp_path / "m"), "--scheduler", "mpi"])
    assert code == EXIT_CLUSTER
    assert "pumap_dask[mpi]" in _errline(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "m") and not os.path.exists(tmp_path / "m.work")


# ---------------------------------------------------------------- check-job and job-get
def _full_job(tmp_path, store, **tables):
    """A job file with [fit], [transform] (into the fit's model) and [report] tables;
    ``tables`` adds lines: {"fit": "n_neighbors = 500"}."""
    text = {"fit": f'input = "{store}"\nmodel = "{tmp_path / "m"}"\n',
            "transform": f'input = "{store}"\nmodel = "{tmp_path / "m"}"\n'
                         f'out = "{tmp_path / "e.zarr"}"\n',
            "report": f'data = "{store}"\n'}
    for table, extra in tables.items():
        text[table] = text.get(table, "") + extra + "\n"
    return _toml(tmp_path / "job.toml", "".join(f"[{t}]\n{body}" for t, body in text.items()))


def test_check_job_checks_the_whole_file_and_starts_nothing(store, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setattr(cli, "_client", lambda args: pytest.fail("cluster started"))
    job = _full_job(tmp_path, store)
    assert main(["-q", "check-job", job]) == EXIT_OK
    out = capsys.readouterr().out
    assert "ok" in out and "fit" in out and "transform" in out and "report" in out
    assert sorted(os.listdir(tmp_path)) == ["in.zarr", "job.toml"]  # wrote nothing


@pytest.mark.parametrize("tables, needle", [
    ({"fit": 'work_dir = "{tmp}/in.zarr"'}, "--work-dir"),               # not ours
    ({"transform": 'key = "obsm/X_pca"'}, "drop key="),                  # a plain array
    ({"report": 'labels = "missing.npy"'}, "missing.npy"),
    ({"fit": 'n_neighbors = 1000'}, "n_neighbors"),                      # too few rows
    ({"cluster": 'workers = 0'}, "[cluster] workers"),
])
def test_check_job_fails_naming_the_problem(store, tmp_path, capsys, tables, needle):
    job = _full_job(tmp_path, store, **{t: v.format(tmp=tmp_path) for t, v in tables.items()})
    assert main(["-q", "check-job", job]) == EXIT_USAGE
    assert needle in _errline(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["in.zarr", "job.toml"]


def test_check_job_missing_input_and_unowned_output(store, tmp_path, capsys):
    job = _toml(tmp_path / "job.toml", f'[fit]\ninput = "{tmp_path / "no.zarr"}"\n'
                                       f'model = "{tmp_path / "m"}"\n')
    assert main(["-q", "check-job", job]) == EXIT_USAGE
    assert "no.zarr" in _errline(capsys.readouterr().err)
    job = _toml(tmp_path / "job.toml", f'[transform]\ninput = "{store}"\n'
                                       f'model = "{tmp_path / "m"}"\nout = "o.zarr"\n')
    assert main(["-q", "check-job", job]) == EXIT_USAGE  # no [fit] makes that model
    assert "no saved model" in _errline(capsys.readouterr().err)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    _full_job(tmp_path, store)
    job = _toml(tmp_path / "job.toml", (tmp_path / "job.toml").read_text().replace(
        str(tmp_path / "e.zarr"), str(tmp_path / "theirs")))
    assert main(["-q", "check-job", job]) == EXIT_USAGE
    assert "not written by pumap_dask" in _errline(capsys.readouterr().err)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("text, needle", [
    ("n_neighbors = 15\n[fit]\nmin_dist = 0.1\n", "n_neighbors belongs in the [fit] table"),
    ("[cluster]\nmin_dist = 0.1\n", "min_dist belongs in the [fit] table"),
    ("input = 'x.zarr'\n", "input belongs in the [fit] or [transform] table"),
    ("[slurm]\nkey = 'obsm/X_pca'\n", "key belongs in the [fit], [transform] or [report] table"),
])
def test_a_key_in_the_wrong_table_says_where_it_belongs(tmp_path, capsys, text, needle):
    job = _toml(tmp_path / "job.toml", text)
    assert main(["check-job", job]) == EXIT_USAGE
    line = _errline(capsys.readouterr().err)
    assert needle in line and "job.toml" in line


def test_job_get_toml_and_yaml(tmp_path, capsys):
    docs = {"job.toml": '[fit]\nmodel = "m dir"\nhidden_layers = [16, 8]\n'
                        '[report]\nlabels = "obs/cell_type"\n',
            "job.yaml": "fit:\n  model: m dir\n  hidden_layers: [16, 8]\n"
                        "report:\n  labels: obs/cell_type\n"}
    for name, text in docs.items():
        if name.endswith(".yaml"):
            pytest.importorskip("yaml")
        job = _toml(tmp_path / name, text)
        assert main(["job-get", job, "fit.model", "fit.hidden_layers", "report.labels",
                     "report.data", "--default", ""]) == EXIT_OK
        assert capsys.readouterr().out == "m dir\n[16, 8]\nobs/cell_type\n\n"
        assert main(["job-get", job, "report.data"]) == EXIT_USAGE  # not set, no default
        assert "add data = ... in the [report] table" in _errline(capsys.readouterr().err)
        assert main(["job-get", job, "fit.modle"]) == EXIT_USAGE  # a typo in a script
        assert "[fit] takes no key 'modle'" in _errline(capsys.readouterr().err)


def test_wrong_key_of_an_anndata_store_names_its_obsm_arrays(tmp_path, capsys):
    store = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    store.create_array("obsm/X_pca", shape=(50, 4), dtype="float32")
    store.create_array("obsm/X_umap", shape=(50, 2), dtype="float32")
    store.create_group("obs")
    code = main(["fit", str(tmp_path / "a.zarr"), str(tmp_path / "m"), "--key", "obsm/X_pcb",
                 "--scheduler", "threads", "--dry-run"])
    line = _errline(capsys.readouterr().err)
    assert code == EXIT_USAGE and "--key" in line
    assert "['obsm/X_pca', 'obsm/X_umap']" in line and "'obs'" not in line
