"""The CLI's user errors: one line on stderr, a distinct exit code, before any cluster starts."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from pumap_dask import cli
from pumap_dask.cli import EXIT_CLUSTER, EXIT_FAILED, EXIT_USAGE, main


@pytest.fixture()
def no_cluster(monkeypatch):
    """Fail the test if a command starts (or connects to) a cluster."""
    def boom(args):
        raise AssertionError("a cluster was started before the input was checked")

    monkeypatch.setattr(cli, "_client", boom)


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("pumap-dask: error:")]
    return code, lines, err


@pytest.mark.parametrize("extra, needle", [
    (["--params", "{bad json"], "--params is not valid JSON"),
    (["--params", "[1, 2]"], "JSON object"),
    (["--params", '{"n_epoch": 5}'], "unknown parameter(s) ['n_epoch']"),
    (["--min-dist", "-1"], "min_dist must lie in [0, inf), got -1.0 (flag --min-dist)"),
    (["--min-dist", "nan"], "min_dist must be a finite number"),
    (["--min-dist", "2"], "min_dist must not exceed spread"),
    (["--n-neighbors", "0"], "n_neighbors must be a positive integer"),
    (["--n-neighbors", "5000"], "needs at least 5001"),
    (["--device", "tpu"], "device must be"),
    (["--params", '{"hidden_layers": []}'], "hidden_layers"),
    (["--params", '{"learning_rate": NaN}'], "learning_rate must be a finite number"),
    (["--params", '{"knn_overlap": 0}'], "knn_overlap"),
    (["--params", '{"tolerance": -1}'], "tolerance"),
    (["--params", '{"n_projection": -5}'], "n_projection"),
    (["--params", '{"correlation_weight": NaN}'], "correlation_weight"),
])
def test_fit_bad_parameters_fail_before_any_cluster(store, tmp_path, capsys, no_cluster, extra,
                                                    needle):
    t0 = time.perf_counter()
    code, lines, err = _run(["fit", store, str(tmp_path / "model")] + extra, capsys)
    assert code == EXIT_USAGE
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "model").exists()


def test_fit_bad_paths(store, tmp_path, capsys, no_cluster):
    code, lines, _ = _run(["fit", str(tmp_path / "missing.zarr"), str(tmp_path / "m")], capsys)
    assert code == EXIT_USAGE and "no Zarr store" in lines[0]
    # the model directory may not replace the input or a directory that is not a model
    code, lines, _ = _run(["fit", store, store], capsys)
    assert code == EXIT_USAGE and "is the input" in lines[0]
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    code, lines, _ = _run(["fit", store, str(other)], capsys)
    assert code == EXIT_USAGE and "not a saved pumap_dask model" in lines[0]
    assert (other / "keep.txt").read_text() == "x"
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        code, lines, _ = _run(["fit", store, str(ro / "model")], capsys)
        assert code == EXIT_USAGE and "not writable" in lines[0]


def test_transform_errors_name_flags(store, tmp_path, capsys, no_cluster, fitted):
    model = fitted.save(tmp_path / "model")
    code, lines, _ = _run(["transform", store, model], capsys)
    assert code == EXIT_USAGE and "--out" in lines[0] and "--obsm" in lines[0]
    code, lines, _ = _run(["transform", store, model, "--out", store], capsys)
    assert code == EXIT_USAGE and "input" in lines[0]
    code, lines, _ = _run(["transform", store, str(tmp_path / "nomodel"), "--out",
                           str(tmp_path / "o.zarr")], capsys)
    assert code == EXIT_USAGE and "no saved model" in lines[0]
    code, lines, _ = _run(["transform", store, model, "--out", str(tmp_path / "o.zarr"),
                           "--device", "tpu"], capsys)
    assert code == EXIT_USAGE and "--device" in lines[0]


def test_transform_existing_output_names_overwrite_flag(store, tmp_path, capsys, fitted, blobs):
    model = fitted.save(tmp_path / "model")
    out = str(tmp_path / "o.zarr")
    assert main(["-q", "transform", store, model, "--out", out, "--scheduler", "threads"]) == 0
    # the same output from a differently chunked input: a different transform
    code, lines, _ = _run(["-q", "transform", str(_rechunked(store, tmp_path)), model, "--out",
                           out, "--scheduler", "threads"], capsys)
    assert code == EXIT_USAGE and "--overwrite" in lines[0]


def _rechunked(store, tmp_path):
    src = zarr.open_array(store, mode="r")
    z = zarr.create_array(str(tmp_path / "in2.zarr"), shape=src.shape, chunks=(50, 16),
                          dtype="float32")
    z[:] = src[:]
    return tmp_path / "in2.zarr"


def test_impossible_cluster_settings(store, tmp_path, capsys):
    for flag in (["--workers", "0"], ["--threads", "-1"], ["--connect-timeout", "0"],
                 ["--scheduler", "nowhere"], ["--memory", "lots"]):
        with pytest.raises(SystemExit) as exc:
            main(["fit", store, str(tmp_path / "m")] + flag)
        assert exc.value.code == EXIT_USAGE
        assert flag[0] in capsys.readouterr().err


def test_unreachable_scheduler_times_out(store, tmp_path, capsys):
    t0 = time.perf_counter()
    code, lines, _ = _run(["fit", store, str(tmp_path / "m"), "--scheduler",
                           "tcp://127.0.0.1:9", "--connect-timeout", "2"], capsys)
    assert code == EXIT_CLUSTER and "cannot reach the Dask scheduler" in lines[0]
    assert time.perf_counter() - t0 < 20


def test_failing_stage_and_nan_input_in_a_subprocess(blobs, tmp_path):
    """NaN input on a real LocalCluster: one line on stderr, exit 2, no shutdown tracebacks."""
    X = blobs[0].copy()
    X[5, 3] = np.nan
    z = zarr.create_array(str(tmp_path / "nan.zarr"), shape=X.shape, chunks=(64, 16),
                          dtype="float32")
    z[:] = X
    proc = subprocess.run(
        [sys.executable, "-m", "pumap_dask.cli", "-q", "fit", str(tmp_path / "nan.zarr"),
         str(tmp_path / "m"), "--workers", "1", "--params", '{"n_epochs": 2}'],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pumap-dask: error:")]
    assert len(errors) == 1 and "NaN" in errors[0]
    assert not (tmp_path / "m").exists()
    assert EXIT_FAILED not in (EXIT_USAGE, EXIT_CLUSTER)


def test_anndata_without_x_pca_says_which_array(blobs, tmp_path, caplog):
    anndata = pytest.importorskip("anndata")
    import warnings

    adata = anndata.AnnData(X=blobs[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(tmp_path / "a.zarr")
    from pumap_dask.io import open_zarr

    caplog.set_level("WARNING", logger="pumap_dask")
    arr = open_zarr(str(tmp_path / "a.zarr"))
    assert arr.shape == blobs[0].shape
    assert "no 'obsm/X_pca'; using its 'X' array" in caplog.text
