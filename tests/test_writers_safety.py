"""Writers own what they write: nothing a user made is ever overwritten or deleted."""

import json
import os
import warnings

import dask.array as da
import numpy as np
import pytest
import zarr

from pumap_dask.errors import InputError
from pumap_dask.writers import (OutputLock, check_output_path, transform_to_zarr,
                                write_anndata_obsm)


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("m") / "model")


def _zarr_input(path, X):
    z = zarr.create_array(str(path), shape=X.shape, chunks=(100, X.shape[1]), dtype="float32")
    z[:] = X
    return str(path)


def _snapshot(root):
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.mark.parametrize("resume", [True, False])
def test_output_equal_to_or_inside_input_is_refused(saved, blobs, tmp_path, resume):
    src = _zarr_input(tmp_path / "in.zarr", blobs[1])
    before = _snapshot(src)
    for out in (src, os.path.join(src, "emb")):
        with pytest.raises(InputError, match="input"):
            transform_to_zarr(src, saved, out, resume=resume)
        with pytest.raises(InputError, match="input"):  # a zarr.Array input too
            transform_to_zarr(zarr.open_array(src, mode="r"), saved, out, resume=resume)
    assert _snapshot(src) == before


@pytest.mark.parametrize("resume", [True, False])
def test_foreign_zarr_and_directories_are_refused(saved, blobs, tmp_path, resume):
    foreign = _zarr_input(tmp_path / "foreign.zarr", blobs[1][:, :2].copy())
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("a", shape=(3,), dtype="f4")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("precious")
    afile = tmp_path / "afile"
    afile.write_text("x")
    snaps = {p: _snapshot(p) for p in (foreign, tmp_path / "group.zarr", plain)}
    cases = [(foreign, "not written by pumap_dask"), (tmp_path / "group.zarr", "Zarr group"),
             (tmp_path / "group.zarr" / "emb", "inside the Zarr group"),
             (plain, "non-empty directory"), (afile, "is a file")]
    for out, msg in cases:
        with pytest.raises(InputError, match=msg):
            transform_to_zarr(blobs[1], saved, out, resume=resume)
    for p, snap in snaps.items():
        assert _snapshot(p) == snap
    assert afile.read_text() == "x"
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    z = transform_to_zarr(blobs[1], saved, tmp_path / "empty", resume=resume)
    assert z.shape == (len(blobs[1]), 2)


def test_overwrite_replaces_only_our_output(saved, blobs, tmp_path):
    out = tmp_path / "emb.zarr"
    transform_to_zarr(da.from_array(blobs[1], chunks=(50, 16)), saved, out)
    assert check_output_path(out, resume=True) == "resume"
    assert check_output_path(out, resume=False) == "replace"
    z = transform_to_zarr(da.from_array(blobs[1], chunks=(60, 16)), saved, out, resume=False)
    assert z.chunks == (60, 2)
    assert z.attrs["pumap_dask"]["complete"] is True


def _anndata_store(path, X, zarr_format=None):
    anndata = pytest.importorskip("anndata")
    adata = anndata.AnnData(X=np.zeros((len(X), 3), np.float32))
    adata.obsm["X_pca"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(path)
    return str(path)


@pytest.mark.parametrize("resume", [True, False])
def test_anndata_store_as_out_is_refused(saved, blobs, tmp_path, resume):
    anndata = pytest.importorskip("anndata")
    store = _anndata_store(tmp_path / "cells.zarr", blobs[1])
    before = _snapshot(store)
    for out in (store, os.path.join(store, "obsm", "X_pumap")):
        with pytest.raises(InputError, match="AnnData store|--obsm"):
            transform_to_zarr(blobs[1], saved, out, resume=resume)
    assert _snapshot(store) == before
    back = anndata.read_zarr(store)
    np.testing.assert_array_equal(back.obsm["X_pca"], blobs[1])


def test_anndata_obsm_keeps_format_and_refuses_foreign_keys(saved, blobs, tmp_path):
    anndata = pytest.importorskip("anndata")
    store = _anndata_store(tmp_path / "cells.zarr", blobs[1])
    fmt = zarr.open_group(store, mode="r").metadata.zarr_format
    write_anndata_obsm(store, saved)
    write_anndata_obsm(store, saved, resume=False)  # replaces only obsm/X_pumap
    arr = zarr.open_array(os.path.join(store, "obsm", "X_pumap"), mode="r")
    assert arr.metadata.zarr_format == fmt
    back = anndata.read_zarr(store)
    assert back.obsm["X_pumap"].shape == (len(blobs[1]), 2)
    # obsm/X_pca was not written by us: never a target, even with overwrite
    for resume in (True, False):
        with pytest.raises(InputError, match="not written by pumap_dask"):
            write_anndata_obsm(store, saved, obsm_key="X_pca", resume=resume)
    with pytest.raises(InputError, match="plain name"):
        write_anndata_obsm(store, saved, obsm_key="../X")
    # input and output the same array
    with pytest.raises(InputError, match="input"):
        write_anndata_obsm(store, saved, key="obsm/X_pumap", resume=False)
    np.testing.assert_array_equal(anndata.read_zarr(store).obsm["X_pca"], blobs[1])
    # a path that is no store is not created
    with pytest.raises(InputError, match="not an AnnData"):
        write_anndata_obsm(tmp_path / "missing.zarr", saved)
    assert not (tmp_path / "missing.zarr").exists()


def test_concurrent_writer_fails_clearly(saved, blobs, tmp_path):
    out = tmp_path / "emb.zarr"
    with OutputLock(str(out)) as lock:  # another live writer holds the output
        assert os.path.exists(lock.path)
        with pytest.raises(InputError, match="another writer"):
            transform_to_zarr(blobs[1], saved, out, resume=False)
    assert not os.path.exists(lock.path)
    # a lock left by a dead process on this host is taken over
    with open(lock.path, "w") as f:
        import socket

        json.dump({"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "since": 0}, f)
    z = transform_to_zarr(blobs[1], saved, out)
    assert z.attrs["pumap_dask"]["complete"] is True
    assert not os.path.exists(lock.path)


def test_writer_arguments_fail_fast(saved, blobs, tmp_path):
    for kwargs, msg in [({"zarr_format": 5}, "zarr_format"), ({"chunk_rows": 0}, "chunk_rows"),
                        ({"batch_size": -1}, "batch_size"), ({"device": "tpu"}, "device"),
                        ({"nan_policy": "drop"}, "nan_policy"),
                        ({"sharded": True, "zarr_format": 2}, "sharded")]:
        with pytest.raises(ValueError, match=msg):
            transform_to_zarr(blobs[1], saved, tmp_path / "o.zarr", **kwargs)
    assert not (tmp_path / "o.zarr").exists()


def test_each_input_block_is_read_once(saved, blobs, tmp_path):
    # the embedding, the range check and the input digests share each block's read (an
    # optimised graph per consumer read and decompressed every block three times)
    X = np.asarray(blobs[0], dtype=np.float32)
    reads = []

    def read(block, block_info=None):
        reads.append(block_info[0]["chunk-location"][0])
        return block

    darr = da.from_array(X, chunks=(100, X.shape[1])).map_blocks(read, dtype=np.float32)
    out = transform_to_zarr(darr, saved, tmp_path / "emb.zarr")
    assert out.shape == (X.shape[0], 2)
    assert sorted(reads) == list(range(darr.numblocks[0]))
