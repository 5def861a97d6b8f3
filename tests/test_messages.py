"""Issue 17's failure classes: each ends with one line on stderr and the right exit code,
before any work where the input allows it, and nothing the package did not write is
replaced (report and export outputs, in-memory AnnData entries)."""

import json
import os
import stat
import time
import types
import warnings

import numpy as np
import pytest
import zarr

import pumap_dask
from pumap_dask import ClusterError, InputError, ModelFileError, ParametricUMAP, cli
from pumap_dask.cli import EXIT_CLUSTER, EXIT_OK, EXIT_USAGE, main
from pumap_dask.distributed import cluster as cluster_mod
from pumap_dask.io import check_array
from pumap_dask.writers import OutputLock

FAST = dict(n_epochs=4, batch_size=1024, hidden_layers=(16,), device="cpu", random_state=0)


@pytest.fixture()
def model_dir(fitted, tmp_path):
    return fitted.save(str(tmp_path / "model"))


@pytest.fixture()
def no_cluster(monkeypatch):
    """Fail the test if a command starts (or connects to) a cluster."""
    def boom(args):
        raise AssertionError("a cluster was started before the input was checked")

    monkeypatch.setattr(cli, "_client", boom)


@pytest.fixture()
def no_fit(monkeypatch):
    """Fail the test if a fit starts (the refusal must come before it)."""
    def boom(self, *a, **k):
        raise AssertionError("the fit ran before the refusal")

    monkeypatch.setattr(ParametricUMAP, "fit", boom)


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("pumap-dask: error:")]
    assert len(lines) <= 1, err
    assert "Traceback" not in err, err
    return code, (lines[0] if lines else ""), err


def _zarr(path, X, chunks=(64, 16)):
    z = zarr.create_array(str(path), shape=X.shape, chunks=chunks, dtype=X.dtype,
                          overwrite=True)
    z[:] = X
    return str(path)


# --------------------------------------------------------------------------- 1. cluster
class _Started(BaseException):
    """Raised by a stand-in LocalCluster: passes through every ``except Exception``."""


@pytest.mark.parametrize("flags", [["--memory", "300MB"],
                                   ["--memory", "64MiB", "--workers", "1"]])
def test_impossible_worker_memory_fails_with_exit_3_before_any_worker_starts(
        store, tmp_path, capsys, monkeypatch, flags):
    def started(*a, **k):
        raise _Started("a LocalCluster was started for workers that cannot run")

    monkeypatch.setattr(cluster_mod, "LocalCluster", started)
    t0 = time.perf_counter()
    code, line, _ = _run(["-q", "fit", store, str(tmp_path / "m")] + flags, capsys)
    assert code == EXIT_CLUSTER and "--memory" in line, line
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "m").exists()


class _FakeClient:
    def __init__(self, results=None, start_error=None):
        self.results, self.start_error = results, start_error

    def wait_for_workers(self, n, timeout=None):
        if self.start_error is not None:
            raise self.start_error

    def run(self, fn, on_error="raise"):
        return self.results


@pytest.mark.parametrize("client, needle", [
    (_FakeClient({"tcp://w1": OSError("Stream is closed")}), "died while loading"),
    (_FakeClient({"tcp://w1": (470 * 2**20, 560 * 2**20)}), "pauses a worker"),
    (_FakeClient(start_error=TimeoutError("no workers")), "did not start within"),
])
def test_workers_that_cannot_work_are_a_cluster_error_naming_memory(client, needle):
    settings = {"workers": 1, "memory": "560MiB"}
    with pytest.raises(ClusterError, match=needle) as exc:
        cluster_mod.check_worker_memory(client, settings, timeout=1)
    assert "--memory" in str(exc.value)
    # workers with room to spare pass
    cluster_mod.check_worker_memory(_FakeClient({"tcp://w1": (400 * 2**20, 4 * 2**30)}),
                                    settings, timeout=1)


def test_workers_that_keep_dying_exit_3_naming_memory(store, tmp_path, capsys, monkeypatch):
    from distributed.scheduler import KilledWorker

    def killed(self, *a, **k):
        raise KilledWorker("knn-block-3", types.SimpleNamespace(address="tcp://w1"), 3)

    monkeypatch.setattr(ParametricUMAP, "fit", killed)
    code, line, _ = _run(["-q", "fit", store, str(tmp_path / "m"), "--scheduler", "threads"],
                         capsys)
    assert code == EXIT_CLUSTER and "kept dying" in line and "--memory" in line, line


# --------------------------------------------------------------------------- 2. messages
def test_overwrite_onto_a_symbolic_link_is_refused(store, model_dir, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    assert main(["-q", "transform", store, model_dir, "--out", str(out), "--scheduler",
                 "threads"]) == EXIT_OK
    link = tmp_path / "link.zarr"
    link.symlink_to(out)
    code, line, _ = _run(["-q", "transform", store, model_dir, "--out", str(link),
                          "--overwrite", "--scheduler", "threads"], capsys)
    assert code == EXIT_USAGE and "symbolic link" in line and str(out) in line, line
    assert link.is_symlink() and zarr.open_array(str(out), mode="r").shape[0] > 0


@pytest.mark.parametrize("content", ["", "not json", "{}", '{"pid": "x", "host": 3}'])
def test_a_garbled_lock_is_taken_over_not_blocking(store, model_dir, tmp_path, capsys,
                                                   monkeypatch, caplog, content):
    out = tmp_path / "o.zarr"
    lock = OutputLock(str(out))
    with open(lock.path, "w") as f:
        f.write(content)
    old = time.time() - 3600
    os.utime(lock.path, (old, old))
    caplog.set_level("WARNING", logger="pumap_dask")
    code, line, _ = _run(["-q", "transform", store, model_dir, "--out", str(out),
                          "--scheduler", "threads"], capsys)
    assert code == EXIT_OK, line
    assert "names no writer" in caplog.text and not os.path.exists(lock.path)
    # a fresh garbled lock (a writer between creating and filling it) is waited for briefly
    monkeypatch.setattr("pumap_dask.writers.GARBLED_LOCK_GRACE_S", 0.3)
    with open(lock.path, "w") as f:
        f.write(content)
    t0 = time.perf_counter()
    with OutputLock(str(out)):
        assert 0.2 < time.perf_counter() - t0 < 10


def test_nan_in_a_late_block_names_the_cli_flag(blobs, model_dir, tmp_path, capsys):
    X = blobs[0].copy()
    X[-3, 2] = np.nan  # the last block
    src = _zarr(tmp_path / "nan.zarr", X)
    code, line, _ = _run(["-q", "transform", src, model_dir, "--out", str(tmp_path / "o.zarr"),
                          "--scheduler", "threads"], capsys)
    assert code == EXIT_USAGE and "--nan-policy nan" in line, line
    assert "nan_policy=" not in line
    code, _, _ = _run(["-q", "transform", src, model_dir, "--out", str(tmp_path / "o2.zarr"),
                       "--scheduler", "threads", "--nan-policy", "nan"], capsys)
    assert code == EXIT_OK
    emb = zarr.open_array(str(tmp_path / "o2.zarr"), mode="r")[:]
    assert np.isnan(emb[len(X) - 3]).all() and np.isfinite(np.delete(emb, len(X) - 3, 0)).all()


def test_embed_refuses_a_user_model_dir_before_the_fit(blobs, tmp_path, no_fit):
    anndata = pytest.importorskip("anndata")
    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    a = anndata.AnnData(X=blobs[0])
    a.obsm["X_pca"] = blobs[0]
    with pytest.raises(ModelFileError, match="not a saved pumap_dask model"):
        pumap_dask.embed(a, model_dir=str(user), **FAST)
    assert (user / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("inside", [False, True])
def test_work_dir_in_model_dir_fails_before_the_fit(store, tmp_path, capsys, no_cluster, inside):
    model = tmp_path / "m"
    work = model / "w" if inside else model
    code, line, _ = _run(["-q", "fit", store, str(model), "--work-dir", str(work)], capsys)
    assert code == EXIT_USAGE and "--work-dir" in line and "model directory" in line, line


def test_report_out_onto_a_file(model_dir, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, line, _ = _run(["-q", "report", model_dir, "--out", str(target)], capsys)
    assert code == EXIT_USAGE and "not a directory" in line and "--out" in line, line
    assert target.read_text() == "mine"


def test_labels_file_that_is_not_npy(store, model_dir, tmp_path, capsys, monkeypatch):
    labels = tmp_path / "labels.csv"
    labels.write_text("a\nb\n")
    monkeypatch.setattr(cli, "write_report", lambda *a, **k: pytest.fail("report ran"))
    for extra in (["--data", store], []):
        code, line, _ = _run(["-q", "report", model_dir, "--labels", str(labels),
                              "--out", str(tmp_path / "r")] + extra, capsys)
        assert code == EXIT_USAGE and "not a readable .npy" in line and "numpy.save" in line, \
            line


def test_export_onto_a_directory(model_dir, tmp_path, capsys):
    target = tmp_path / "enc.onnx"
    target.mkdir()
    for extra in ([], ["--overwrite"]):
        code, line, _ = _run(["-q", "export", model_dir, str(target)] + extra, capsys)
        assert code == EXIT_USAGE and "is a directory" in line, line


@pytest.mark.parametrize("key", ["../a.zarr", "obsm/../../a.zarr", "./X"])
def test_key_outside_the_store(blobs, tmp_path, capsys, no_cluster, key):
    anndata = pytest.importorskip("anndata")
    a = anndata.AnnData(X=blobs[0])
    a.obsm["X_pca"] = blobs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_zarr(str(tmp_path / "a.zarr"))
    code, line, _ = _run(["-q", "fit", str(tmp_path / "a.zarr"), str(tmp_path / "m"), "--key",
                          key], capsys)
    assert code == EXIT_USAGE and "--key" in line and "no '.' or '..'" in line, line


@pytest.mark.parametrize("dtype, scale, cast", [("float32", 1e37, False),
                                                ("float64", 1e40, True)])
def test_values_that_overflow_float32_say_so(blobs, tmp_path, capsys, dtype, scale, cast):
    X = blobs[0].astype(dtype)
    X[-30:] *= scale  # only the last block: found while reading, named by row block
    src = _zarr(tmp_path / "big.zarr", X)
    code, line, _ = _run(["-q", "fit", src, str(tmp_path / "m"), "--scheduler", "threads",
                          "--params", json.dumps(FAST)], capsys)
    largest = float(np.abs(X[np.isfinite(X)]).max())
    assert code == EXIT_USAGE, line
    assert "overflow float32" in line and f"{largest:.3g}" in line and "scale" in line, line
    assert "row block" in line and ("cast" in line) == cast
    with pytest.raises(InputError, match="overflow float32"):  # in-memory input, same check
        check_array(X)


# --------------------------------------------------------------------------- 3. owned outputs
def test_report_never_replaces_files_it_did_not_write(model_dir, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.html").write_text("<html>my own notes</html>")
    code, line, _ = _run(["-q", "report", model_dir, "--out", str(out)], capsys)
    assert code == EXIT_USAGE and "not written by pumap_dask" in line and "--out" in line, line
    assert (out / "report.html").read_text() == "<html>my own notes</html>"
    assert not (out / "report.json").exists()
    # an earlier report of ours is replaced
    mine = tmp_path / "r2"
    assert main(["-q", "report", model_dir, "--out", str(mine)]) == EXIT_OK
    assert main(["-q", "report", model_dir, "--out", str(mine)]) == EXIT_OK
    json.loads((mine / "report.json").read_text())


def test_export_never_replaces_a_file_it_did_not_write(model_dir, tmp_path, capsys):
    target = tmp_path / "enc.onnx"
    target.write_bytes(b"someone else's model")
    code, line, _ = _run(["-q", "export", model_dir, str(target), "--overwrite"], capsys)
    assert code == EXIT_USAGE and "not an ONNX model pumap_dask exported" in line, line
    assert target.read_bytes() == b"someone else's model"


def _adata(blobs):
    anndata = pytest.importorskip("anndata")
    a = anndata.AnnData(X=blobs[0])
    a.obsm["X_pca"] = blobs[0]
    return a


def test_in_memory_embed_refuses_foreign_obsm_and_uns(blobs, monkeypatch):
    a = _adata(blobs)
    a.obsm["X_umap"] = np.ones((len(a), 2), np.float32)
    a.uns["pumap"] = {"my": "notes"}
    real_fit = ParametricUMAP.fit
    monkeypatch.setattr(ParametricUMAP, "fit",
                        lambda *a, **k: pytest.fail("the fit ran before the refusal"))
    with pytest.raises(InputError, match=r"uns\['pumap'\] exists and was not written"):
        pumap_dask.embed(a, **FAST)
    del a.uns["pumap"]
    with pytest.raises(InputError, match=r"obsm\['X_umap'\] exists and was not written"):
        pumap_dask.embed(a, key_added="X_umap", **FAST)
    with pytest.raises(InputError, match="is the input use_rep"):
        pumap_dask.embed(a, key_added="X_pca", overwrite=True, **FAST)
    np.testing.assert_array_equal(a.obsm["X_umap"], 1.0)
    monkeypatch.setattr(ParametricUMAP, "fit", real_fit)
    # our own entries are replaced; a foreign one only with overwrite=True
    pumap_dask.embed(a, **FAST)
    pumap_dask.embed(a, **FAST)
    assert a.uns["pumap"]["written_by"] == "pumap_dask"
    pumap_dask.embed(a, key_added="X_umap", overwrite=True, **FAST)
    assert a.obsm["X_umap"].shape == (len(a), 2) and not np.all(a.obsm["X_umap"] == 1.0)
    assert list(a.uns["pumap"]["obsm_keys"]) == ["X_pumap"]
    assert list(a.uns["umap"]["obsm_keys"]) == ["X_umap"]  # scanpy's naming: X_umap -> umap


def test_store_embed_refuses_a_foreign_uns_record(blobs, tmp_path, no_fit):
    a = _adata(blobs)
    a.uns["pumap"] = {"my": "notes"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_zarr(str(tmp_path / "a.zarr"))
    with pytest.raises(InputError, match="uns/pumap .* was not written by pumap_dask"):
        pumap_dask.embed(str(tmp_path / "a.zarr"), **FAST)


# --------------------------------------------------------------------------- 4. umask
def test_apply_umask_opens_a_private_tree_to_the_umask(tmp_path):
    import tempfile

    from pumap_dask.io import apply_umask, current_umask

    top = tempfile.mkdtemp(dir=tmp_path)  # 0700, as model.save's temporary directory
    os.makedirs(os.path.join(top, "sub"), mode=0o700)
    for name in ("a.json", os.path.join("sub", "b.npy")):
        fd = os.open(os.path.join(top, name), os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    os.symlink("/etc/hostname", os.path.join(top, "link"))
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        apply_umask(top)
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(os.lstat(os.path.join(top, p)).st_mode)

    assert mode(".") == 0o750 and mode("sub") == 0o750
    assert mode("a.json") == 0o640 and mode(os.path.join("sub", "b.npy")) == 0o640
    assert os.path.islink(os.path.join(top, "link"))
