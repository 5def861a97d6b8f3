"""pumap_dask.embed: the scanpy-style entry on AnnData objects, backed files and .zarr stores."""

import json
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest

import pumap_dask
from pumap_dask import InputError, ParametricUMAP
from pumap_dask.cli import main
from pumap_dask.knn import exact_knn
from pumap_dask.writers import uns_name, write_anndata_obsm

anndata = pytest.importorskip("anndata")

FAST = dict(n_epochs=4, batch_size=1024, hidden_layers=(16,), device="cpu", random_state=0)


def _adata(blobs):
    X = blobs[0]
    a = anndata.AnnData(X=np.repeat(X, 2, axis=1))
    a.obsm["X_pca"] = X
    return a


def _write(a, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a.write_zarr(path) if str(path).endswith(".zarr") else a.write_h5ad(path)


def test_in_memory_anndata(blobs, tmp_path):
    a = _adata(blobs)
    assert pumap_dask.embed(a, model_dir=str(tmp_path / "m"), **FAST) is None  # as scanpy
    model = pumap_dask.load(str(tmp_path / "m"))
    assert a.obsm["X_pumap"].shape == (len(a), 2)
    np.testing.assert_allclose(a.obsm["X_pumap"], model.transform(a.obsm["X_pca"]), atol=1e-5)
    rec = a.uns["pumap"]
    params = rec["params"]  # a dict, as sc.tl.umap records: a, b and our parameters
    assert rec["use_rep"] == "X_pca" and params["n_epochs"] == 4
    assert params["a"] == rec["a"] and params["min_dist"] == 0.1
    assert list(params["hidden_layers"]) == [16] and "work_dir" not in params
    assert model.n_features_in_ == a.obsm["X_pca"].shape[1]
    # the record is written as it is, to h5ad and zarr alike
    for name in ("a.h5ad", "a.zarr"):
        _write(a, tmp_path / name)
        read = anndata.read_zarr if name.endswith(".zarr") else anndata.read_h5ad
        assert read(tmp_path / name).uns["pumap"]["params"]["n_epochs"] == 4


def test_uns_names_copy_and_old_records(blobs):
    assert [uns_name(k) for k in ("X_pumap", "X_foo", "emb", "X_")] == \
        ["pumap", "foo", "emb", "X_"]
    a = _adata(blobs)
    # a record of an older version: every obsm key's record in uns["pumap"], params as JSON
    a.obsm["X_old"] = np.zeros((len(a), 2), np.float32)
    a.uns["pumap"] = {"params": json.dumps({"n_epochs": 4}), "written_by": "pumap_dask",
                      "obsm_keys": ["X_old"]}
    out = pumap_dask.embed(a, key_added="X_old", copy=True, **FAST)
    assert out is not a and out.obsm["X_old"].any() and out.uns["old"]["obsm_keys"] == ["X_old"]
    assert not a.obsm["X_old"].any() and "old" not in a.uns  # the input is untouched
    a.uns["foo"] = {"my": "notes"}
    with pytest.raises(InputError, match=r"uns\['foo'\] exists and was not written"):
        pumap_dask.embed(a, key_added="X_foo", **FAST)
    assert pumap_dask.embed(a, key_added="emb", **FAST) is None
    assert a.obsm["emb"].shape == (len(a), 2) and a.uns["emb"]["written_by"] == "pumap_dask"


def _neighbors(a, key="neighbors", k=15):
    i, d = exact_knn(a.obsm["X_pca"], k, device="cpu")
    conn = "connectivities" if key == "neighbors" else f"{key}_connectivities"
    a.obsp[conn] = pumap_dask.fuzzy_simplicial_set(i, d)
    a.uns[key] = {"connectivities_key": conn, "distances_key": "distances",
                  "params": {"n_neighbors": k, "method": "umap", "use_rep": "X_pca"}}


def test_neighbors_key_trains_on_the_scanpy_graph(blobs, tmp_path):
    a = _adata(blobs)
    _neighbors(a)
    pumap_dask.embed(a, neighbors_key="neighbors", **FAST)
    rec = a.uns["pumap"]
    assert rec["knn_method"] == "precomputed-graph" and rec["neighbors_key"] == "neighbors"
    assert rec["params"]["neighbors_key"] == "neighbors"
    # a store: the graph is read from its obsp
    store = str(tmp_path / "a.zarr")
    b = _adata(blobs)
    _neighbors(b, "nn")
    _write(b, store)
    pumap_dask.embed(store, neighbors_key="nn", **FAST)
    assert anndata.read_zarr(store).uns["pumap"]["knn_method"] == "precomputed-graph"


def _no_fit(*args, **kwargs):
    raise RuntimeError("the fit ran")


def test_neighbors_key_missing_is_refused_before_the_fit(blobs, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ParametricUMAP, "fit", _no_fit)
    a = _adata(blobs)
    _neighbors(a)
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="the fit ran"):
        pumap_dask.embed(a, use_rep="X", neighbors_key="neighbors", **FAST)
    assert "was built on 'X_pca'" in caplog.text  # the graph is not of use_rep: said
    a = _adata(blobs)
    a.uns["other"] = {}
    with pytest.raises(InputError, match=r"uns has no 'neighbors' \(uns keys: \['other'\]\)"):
        pumap_dask.embed(a, neighbors_key="neighbors", **FAST)
    a.uns["nn"] = {"connectivities_key": "nn_conn"}
    a.obsp["mine"] = np.eye(len(a))
    with pytest.raises(InputError, match=r"obsp has no 'nn_conn'.*obsp keys: \['mine'\]"):
        pumap_dask.embed(a, neighbors_key="nn", **FAST)
    store = str(tmp_path / "a.zarr")
    _write(a, store)
    with pytest.raises(InputError, match=r"store .*uns has no 'neighbors'"):
        pumap_dask.embed(store, neighbors_key="neighbors", **FAST)


def _legacy_raw(path, n_obs):
    """Give an .h5ad file the raw of anndata < 0.7: root entries raw.X, raw.var, raw.varm."""
    from anndata.io import write_elem

    with h5py.File(path, "r+") as f:
        write_elem(f, "raw.X", np.arange(n_obs * 3, dtype=np.float32).reshape(n_obs, 3))
        write_elem(f, "raw.var", pd.DataFrame(index=["g0", "g1", "g2"]))
        write_elem(f, "raw.varm", {})


@pytest.mark.parametrize("raw", ["none", "current", "legacy"])
def test_backed_h5ad_is_written_in_place(blobs, tmp_path, raw):
    a = _adata(blobs)
    if raw == "current":
        a.raw = a
    path = tmp_path / "a.h5ad"
    _write(a, path)
    if raw == "legacy":
        _legacy_raw(path, len(a))
    backed = anndata.read_h5ad(path, backed="r+")
    pumap_dask.embed(backed, use_rep="X", key_added="X_emb", model_dir=str(tmp_path / "m"),
                     **FAST)
    assert backed.obsm["X_emb"].shape == (len(a), 2) and "emb" in backed.uns
    backed.file.close()
    back = anndata.read_h5ad(path)  # written into the file, without adata.write()
    model = pumap_dask.load(str(tmp_path / "m"))
    np.testing.assert_allclose(back.obsm["X_emb"], model.transform(a.X), atol=1e-5)
    assert back.uns["emb"]["use_rep"] == "X" and back.uns["emb"]["params"]["n_epochs"] == 4
    if raw == "none":
        assert back.raw is None
    else:  # .raw still reads
        assert back.raw.shape == (len(a), 3 if raw == "legacy" else a.n_vars)
        want = a.X if raw == "current" else np.arange(len(a) * 3).reshape(len(a), 3)
        np.testing.assert_array_equal(back.raw.X, want)


def test_backed_h5ad_refusals(blobs, tmp_path, monkeypatch):
    monkeypatch.setattr(ParametricUMAP, "fit",
                        lambda *a, **k: pytest.fail("the fit ran before the refusal"))
    path = tmp_path / "a.h5ad"
    _write(_adata(blobs), path)
    backed = anndata.read_h5ad(path, backed="r")
    with pytest.raises(InputError, match=r"read-only.*backed='r\+'"):
        pumap_dask.embed(backed, use_rep="X", **FAST)
    with pytest.raises(InputError, match="copy=True needs an in-memory AnnData"):
        pumap_dask.embed(backed, use_rep="X", copy=True, **FAST)
    backed.file.close()
    with pytest.raises(InputError, match="copy=True needs an AnnData object"):
        pumap_dask.embed(str(tmp_path / "a.zarr"), copy=True, **FAST)


def test_zarr_store_in_place(blobs, tmp_path):
    a = _adata(blobs)
    a.obsm["X_other"] = np.ones((len(a), 2), np.float32)
    store = str(tmp_path / "a.zarr")
    _write(a, store)
    assert pumap_dask.embed(store, model_dir=str(tmp_path / "model"), **FAST) is None
    model = pumap_dask.load(str(tmp_path / "model"))
    back = anndata.read_zarr(store)
    np.testing.assert_allclose(back.obsm["X_pumap"], model.transform(a.obsm["X_pca"]),
                               atol=1e-5)
    assert back.uns["pumap"]["model_dir"].endswith("model")
    assert list(back.uns["pumap"]["params"]["hidden_layers"]) == [16]
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


def test_transform_obsm_records_its_uns_entry(blobs, tmp_path, monkeypatch):
    a = _adata(blobs)
    a.uns["foreign"] = {"my": "notes"}
    store, model = str(tmp_path / "a.zarr"), str(tmp_path / "m")
    _write(a, store)
    ParametricUMAP(**FAST).fit(a.obsm["X_pca"]).save(model)
    cmd = ["-q", "transform", store, model, "--scheduler", "threads", "--obsm"]
    assert main([*cmd, "X_proj"]) == 0
    back = anndata.read_zarr(store)
    rec = back.uns["proj"]
    assert rec["model"] == model and rec["n_components"] == 2 and rec["use_rep"] == "X_pca"
    assert rec["params"]["n_epochs"] == 4 and rec["written_by"] == "pumap_dask"
    np.testing.assert_allclose(back.obsm["X_proj"], pumap_dask.load(model).transform(
        a.obsm["X_pca"]), atol=1e-5)
    assert main([*cmd, "X_proj", "--overwrite"]) == 0
    # a uns entry pumap_dask did not write is refused, before any transform
    monkeypatch.setattr("pumap_dask.writers.transform_to_zarr",
                        lambda *a, **k: pytest.fail("transformed before the refusal"))
    with pytest.raises(InputError, match="uns/foreign .* not written by pumap_dask"):
        write_anndata_obsm(store, model, obsm_key="X_foreign")
    assert main([*cmd, "X_foreign"]) != 0
    assert dict(anndata.read_zarr(store).uns["foreign"]) == {"my": "notes"}
