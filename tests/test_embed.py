"""pumap_dask.embed: the scanpy-style entry on AnnData objects, backed files and .zarr stores."""

import json
import warnings

import numpy as np
import pytest

import pumap_dask
from pumap_dask import InputError

anndata = pytest.importorskip("anndata")

FAST = dict(n_epochs=4, batch_size=1024, hidden_layers=(16,), device="cpu", random_state=0)


def _adata(blobs):
    X = blobs[0]
    a = anndata.AnnData(X=np.repeat(X, 2, axis=1))
    a.obsm["X_pca"] = X
    return a


def test_in_memory_anndata(blobs):
    a = _adata(blobs)
    model = pumap_dask.embed(a, **FAST)
    assert a.obsm["X_pumap"].shape == (len(a), 2)
    np.testing.assert_allclose(a.obsm["X_pumap"], model.transform(a.obsm["X_pca"]), atol=1e-5)
    rec = a.uns["pumap"]
    assert rec["use_rep"] == "X_pca" and json.loads(rec["params"])["n_epochs"] == 4
    assert model.n_features_in_ == a.obsm["X_pca"].shape[1]


def test_backed_h5ad_fits_on_x_and_writes(blobs, tmp_path):
    a = _adata(blobs)
    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r+")
    model = pumap_dask.embed(backed, use_rep="X", key_added="X_emb", **FAST)
    assert model.n_features_in_ == a.X.shape[1]
    backed.write()
    back = anndata.read_h5ad(path)
    np.testing.assert_allclose(back.obsm["X_emb"], model.transform(a.X), atol=1e-5)
    assert back.uns["pumap"]["use_rep"] == "X"


def test_zarr_store_in_place(blobs, tmp_path):
    a = _adata(blobs)
    a.obsm["X_other"] = np.ones((len(a), 2), np.float32)
    store = str(tmp_path / "a.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a.write_zarr(store)
    model = pumap_dask.embed(store, model_dir=str(tmp_path / "model"), **FAST)
    back = anndata.read_zarr(store)
    np.testing.assert_allclose(back.obsm["X_pumap"], model.transform(a.obsm["X_pca"]),
                               atol=1e-5)
    assert back.uns["pumap"]["model_dir"].endswith("model")
    assert json.loads(back.uns["pumap"]["params"])["hidden_layers"] == [16]
    # rerun: our own obsm is replaced; an obsm we did not write is refused before the fit
    pumap_dask.embed(store, **FAST)
    with pytest.raises(InputError, match="not written by pumap_dask"):
        pumap_dask.embed(store, key_added="X_other", **FAST)
    with pytest.raises(InputError, match="is the input"):
        pumap_dask.embed(store, key_added="X_pca", **FAST)
    np.testing.assert_array_equal(anndata.read_zarr(store).obsm["X_other"], 1.0)


def test_bad_arguments(blobs):
    a = _adata(blobs)
    with pytest.raises(InputError, match="no 'X_umap'"):
        pumap_dask.embed(a, use_rep="X_umap", **FAST)
    with pytest.raises(InputError, match="key_added"):
        pumap_dask.embed(a, key_added="a/b", **FAST)
    with pytest.raises(InputError, match="AnnData"):
        pumap_dask.embed(np.zeros((10, 2)), **FAST)
    with pytest.raises(ValueError, match="min_dist"):
        pumap_dask.embed(a, min_dist=-1.0)
