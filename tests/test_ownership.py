"""Nothing of the user's is overwritten, and partial outputs are never readable (issue 17):
owned work directories, exclusive fits, obsm arrays moved into place only when complete."""

import os
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import zarr

from pumap_dask import InputError, ParametricUMAP
from pumap_dask.cli import EXIT_USAGE, main
from pumap_dask.workdir import WORK_MARKER, claim_work_dir
from pumap_dask.writers import write_anndata_obsm

from .conftest import FAST, slow_writer


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("own") / "model")


def test_foreign_work_dir_is_refused_before_any_work(blobs, tmp_path):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "train").mkdir()
    (work / "train" / "train.pt").write_bytes(b"my own file")
    with pytest.raises(InputError, match="did not write.*never overwritten or deleted"):
        ParametricUMAP(work_dir=str(work), **FAST).fit(blobs[0])
    assert (work / "train" / "train.pt").read_bytes() == b"my own file"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        claim_work_dir(tmp_path / "afile")


def test_empty_or_own_work_dir_is_claimed_and_reused(blobs, tmp_path):
    work = tmp_path / "w"
    work.mkdir()  # empty: claimed
    ParametricUMAP(work_dir=str(work), random_state=0, **FAST).fit(blobs[0])
    assert (work / WORK_MARKER).is_file() and (work / "train" / "train.pt").is_file()
    ParametricUMAP(work_dir=str(work), random_state=0, **FAST).fit(blobs[0])  # ours: reused


def _hold_lock(path: str, seconds: float) -> subprocess.Popen:
    """A real second process holding a fit's lock on ``path`` (as a running fit does)."""
    code = textwrap.dedent(f"""
        import sys, time
        from pumap_dask.workdir import work_directory
        with work_directory({path!r}):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_fits_never_share_a_work_dir(blobs, tmp_path):
    work = str(tmp_path / "w")
    proc = _hold_lock(work, 60)
    try:
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=rf"another writer \(pid {proc.pid} "):
            ParametricUMAP(work_dir=work, **FAST).fit(blobs[0])
        assert time.perf_counter() - t0 < 30  # at once, not after a fit
    finally:
        proc.kill()
        proc.wait()


def test_second_cli_fit_into_one_model_dir_fails_at_once(blobs, tmp_path, capsys):
    src = str(tmp_path / "x.zarr")
    zarr.create_array(src, shape=blobs[0].shape, chunks=(200, 16), dtype="float32")[:] = blobs[0]
    model = str(tmp_path / "model")
    from pumap_dask.writers import OutputLock

    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pumap_dask.writers import OutputLock
        with OutputLock({model!r}):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        code = main(["-q", "fit", src, model, "--scheduler", "threads",
                     "--params", '{"n_epochs": 2}'])
        assert code == EXIT_USAGE
        assert f"pid {proc.pid}" in capsys.readouterr().err
        assert not os.path.exists(model) and not os.path.exists(model + ".work")
    finally:
        proc.kill()
        proc.wait()
    assert OutputLock(model).acquire()  # the dead holder's lock is taken over


def test_killed_obsm_write_leaves_no_readable_partial_array(saved, blobs, tmp_path):
    anndata = pytest.importorskip("anndata")
    X = np.tile(blobs[1], (20, 1))
    adata = anndata.AnnData(X=np.zeros((len(X), 2), np.float32))
    adata.obsm["X_pca"] = X
    store = str(tmp_path / "cells.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(store)
    proc = subprocess.Popen(slow_writer(f"w.write_anndata_obsm({store!r}, {str(saved)!r}, chunk_rows=100)"))
    partial = os.path.join(str(tmp_path), ".cells.zarr.obsm-X_pumap.partial")
    deadline = time.time() + 60
    while time.time() < deadline:
        done = os.path.join(partial, ".pumap_done")
        if os.path.isdir(done) and len(os.listdir(done)) >= 3:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not os.path.exists(os.path.join(store, "obsm", "X_pumap"))
    zarr.consolidate_metadata(store)  # as a user's tool might: still no partial array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "X_pumap" not in anndata.read_zarr(store).obsm
    # no lock inside the AnnData groups
    assert not [n for n in os.listdir(os.path.join(store, "obsm")) if "lock" in n]
    write_anndata_obsm(store, saved, chunk_rows=100)  # resumes the partial array, moves it in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = anndata.read_zarr(store)
    assert back.obsm["X_pumap"].shape == (len(X), 2) and np.isfinite(back.obsm["X_pumap"]).all()
    assert not os.path.exists(partial)
