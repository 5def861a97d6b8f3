import os
import pickle
import subprocess
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import pumap_dask
from pumap_dask import InputError, ModelFileError
from pumap_dask.writers import transform_to_zarr, write_anndata_obsm

from .conftest import slow_writer


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("models") / "model")


def _check_lazy(lazy, n, chunks):
    assert isinstance(lazy, da.Array)
    assert lazy.shape == (n, 2)
    assert lazy.dtype == np.float32
    assert lazy.chunks == (chunks, (2,))
    out = lazy.compute()
    assert out.shape == lazy.shape and out.dtype == lazy.dtype
    return out


@pytest.mark.parametrize("chunks", [(50, 16), (123, 5), (1000, 16)])
def test_lazy_equals_numpy_threaded(fitted, blobs, chunks):
    Xte = blobs[1]
    ref = fitted.transform(Xte, refine=False)
    darr = da.from_array(Xte, chunks=chunks)
    with dask.config.set(scheduler="threads"):
        out = _check_lazy(pumap_dask.transform(darr, fitted), len(Xte), darr.chunks[0])
    assert np.abs(out - ref).max() <= 1e-5


def test_numpy_zarr_path_and_loaded_model(fitted, saved, blobs, tmp_path):
    Xte = blobs[1]
    ref = fitted.transform(Xte, refine=False)
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=Xte.shape, chunks=(40, 16),
                          dtype="float32")
    z[:] = Xte
    for X in (Xte, z, str(tmp_path / "x.zarr")):
        for model in (fitted, saved, pumap_dask.load(saved)):
            out = pumap_dask.transform(X, model)
            assert isinstance(out, da.Array)
            assert np.abs(out.compute() - ref).max() <= 1e-5
    # the estimator returns lazy output for lazy input
    assert isinstance(fitted.transform(z), da.Array)


def test_distributed_cluster(fitted, saved, blobs, cluster_client):
    Xte = blobs[1]
    ref = fitted.transform(Xte, refine=False)
    darr = da.from_array(Xte, chunks=(37, 16))
    for model in (fitted, saved):
        lazy = pumap_dask.transform(darr, model)
        out = cluster_client.compute(lazy).result()
        assert np.abs(out - ref).max() <= 1e-5


def test_weights_ship_once(fitted, blobs):
    """The serialised model is one key in the graph, not repeated per task."""
    X = da.from_array(np.repeat(blobs[1], 20, axis=0), chunks=(25, 16))
    lazy = pumap_dask.transform(X, fitted)
    graph = dict(lazy.__dask_graph__())
    state_bytes = len(pickle.dumps(fitted.encoder_.state_dict()))
    total = len(pickle.dumps(graph))
    assert X.numblocks[0] > 100
    assert total < 3 * state_bytes + 2000 * X.numblocks[0]


def test_saved_model_graph_carries_only_path(saved, blobs):
    X = da.from_array(blobs[1], chunks=(10, 16))
    graph = dict(pumap_dask.transform(X, saved).__dask_graph__())
    assert len(pickle.dumps(graph)) < 200_000


def test_transform_errors(fitted, saved, tmp_path, blobs):
    with pytest.raises(InputError, match="X has 3 features, but ParametricUMAP is expecting 16 features"):
        pumap_dask.transform(da.zeros((10, 3), chunks=5), fitted)
    with pytest.raises(InputError, match="2-D"):
        pumap_dask.transform(da.zeros((10,), chunks=5), fitted)
    with pytest.raises(InputError, match="compute_chunk_sizes"):
        x = da.from_array(blobs[1], chunks=(50, 16))
        pumap_dask.transform(x[x[:, 0] > 0], fitted)
    bad = blobs[1].copy()
    bad[77, 3] = np.nan
    lazy = pumap_dask.transform(da.from_array(bad, chunks=(50, 16)), fitted)
    with pytest.raises(InputError, match=r"row block \[50, 100\)"):
        lazy.compute()
    out = pumap_dask.transform(da.from_array(bad, chunks=(50, 16)), fitted,
                               nan_policy="nan").compute()
    assert np.isnan(out[77]).all() and np.isfinite(np.delete(out, 77, 0)).all()
    # a model whose weights changed on disk fails its hash
    import shutil

    broken = shutil.copytree(saved, tmp_path / "broken")
    with open(os.path.join(broken, "weights.pt"), "ab") as f:
        f.write(b"x")
    with pytest.raises(ModelFileError, match="sha256"):
        pumap_dask.transform(blobs[1], str(broken))


def test_transform_to_zarr_resumes(fitted, saved, blobs, tmp_path, caplog):
    X = np.repeat(blobs[1], 3, axis=0)
    ref = fitted.transform(X, refine=False)
    out = tmp_path / "emb.zarr"
    z = transform_to_zarr(da.from_array(X, chunks=(100, 16)), saved, out)
    assert np.abs(z[:] - ref).max() <= 1e-5
    assert z.attrs["pumap_dask"]["complete"] is True
    # lose two blocks' results and their markers, as a killed job would
    zw = zarr.open_array(str(out), mode="r+")
    zw[100:300] = np.nan
    for i in (1, 2):
        os.remove(out / ".pumap_done" / str(i))
    caplog.set_level("INFO", logger="pumap_dask")
    z = transform_to_zarr(da.from_array(X, chunks=(100, 16)), saved, out)
    assert "2 of 6 blocks to compute" in caplog.text
    assert np.abs(z[:] - ref).max() <= 1e-5
    with pytest.raises(InputError, match="different transform"):
        transform_to_zarr(da.from_array(X, chunks=(50, 16)), saved, out)
    z = transform_to_zarr(da.from_array(X, chunks=(50, 16)), saved, out, resume=False)
    assert z.chunks == (50, 2)


def test_transform_to_zarr_sharded(fitted, saved, blobs, tmp_path, scheduler):
    X = np.repeat(blobs[1], 2, axis=0)
    ref = fitted.transform(X, refine=False)
    z = transform_to_zarr(da.from_array(X, chunks=(160, 16)), saved, tmp_path / "s.zarr",
                          sharded=True)
    assert z.shards == (160, 2)
    assert np.abs(z[:] - ref).max() <= 1e-5


def test_transform_to_zarr_killed_process(saved, blobs, tmp_path):
    """Kill the writing process halfway, rerun, and get the uninterrupted result."""
    X = np.tile(blobs[1], (40, 1))
    src = tmp_path / "x.zarr"
    z = zarr.create_array(str(src), shape=X.shape, chunks=(200, 16), dtype="float32")
    z[:] = X
    full = transform_to_zarr(str(src), saved, tmp_path / "full.zarr")[:]
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(slow_writer(f"w.transform_to_zarr({str(src)!r}, {str(saved)!r}, {str(out)!r})"))
    done = out / ".pumap_done"
    n_blocks = -(-X.shape[0] // 200)
    import time

    deadline = time.time() + 60
    while time.time() < deadline:
        if done.exists() and len(os.listdir(done)) >= 5:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    finished = len([p for p in os.listdir(done) if not p.endswith(".tmp")])
    assert 0 < finished < n_blocks
    out_arr = transform_to_zarr(str(src), saved, out)
    np.testing.assert_array_equal(out_arr[:], full)


def test_anndata_obsm(fitted, saved, blobs, tmp_path):
    anndata = pytest.importorskip("anndata")
    Xte = blobs[1]
    adata = anndata.AnnData(X=np.zeros((len(Xte), 3), np.float32))
    adata.obsm["X_pca"] = Xte
    adata.obs["label"] = blobs[3].astype(str)
    store = tmp_path / "cells.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adata.write_zarr(store)

    def files():
        out = {}
        for root, _, names in os.walk(store):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), store)
                ours = (rel.startswith(os.path.join("obsm", "X_pumap"))
                        or rel.startswith(os.path.join("uns", "pumap")))
                if not ours and name != ".zmetadata":
                    with open(os.path.join(root, name), "rb") as f:
                        out[rel] = f.read()
        return out

    before = files()
    write_anndata_obsm(store, saved)
    back = anndata.read_zarr(store)
    assert np.abs(back.obsm["X_pumap"] - fitted.transform(Xte, refine=False)).max() <= 1e-5
    np.testing.assert_array_equal(back.obsm["X_pca"], Xte)
    assert files() == before  # nothing else was rewritten
    # the store (and its obsm/X_pca) is accepted as input directly
    out = pumap_dask.transform(str(store), saved).compute()
    assert np.abs(out - fitted.transform(Xte, refine=False)).max() <= 1e-5


def test_out_of_distribution(fitted, saved, blobs, tmp_path, caplog):
    Xte = blobs[1].copy()
    emb, mask = pumap_dask.transform(Xte, fitted, return_ood=True)
    assert mask.shape == (len(Xte),) and mask.dtype == bool
    assert mask.compute().mean() < 0.05
    shifted = Xte.copy()
    shifted[::2, 0] += 1000.0  # a "batch effect" on half the rows
    for model in (fitted, saved):
        m = pumap_dask.ood_mask(shifted, model).compute()
        np.testing.assert_array_equal(m[::2], True)
    caplog.set_level("INFO", logger="pumap_dask")
    transform_to_zarr(shifted, saved, tmp_path / "o.zarr")
    assert any(r.levelname == "WARNING" and "far outside the training data" in r.message
               for r in caplog.records)


def test_forward_batch_defaults_by_device():
    # the default rows per forward pass is decided in one place: cache-sized on a CPU,
    # large on a GPU; a given size is kept
    from pumap_dask.encoder import FORWARD_BATCH, forward_batch

    assert forward_batch(None, "cpu") == FORWARD_BATCH["cpu"] == 4096
    assert forward_batch(None, "cuda:1") == FORWARD_BATCH["cuda"] == 65536
    assert forward_batch(0, "cpu") == 4096 and forward_batch(100, "cuda") == 100
