"""Every durable artefact knows what made it (issue 17): a rerun with changed data never
reuses a checkpoint, a kNN cache or a transform output of other data."""

import logging
import os
import stat

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import zarr

import pumap_dask
from pumap_dask import InputError, ModelFileError, ParametricUMAP, TrainingError
from pumap_dask.report import format_info, model_summary
from pumap_dask.writers import transform_to_zarr

from .conftest import FAST


def _zarr(path, X, chunk=100):
    z = zarr.create_array(str(path), shape=X.shape, chunks=(chunk, X.shape[1]),
                          dtype="float32", overwrite=True)
    z[:] = X
    return str(path)


# --------------------------------------------------------------------------- transform outputs
def test_transform_output_of_other_input_is_refused(fitted, blobs, tmp_path):
    X = blobs[1]
    Y = X[::-1].copy()  # same shape, other rows
    out = tmp_path / "emb.zarr"
    with dask.config.set(scheduler="threads"):
        first = transform_to_zarr(_zarr(tmp_path / "x.zarr", X), fitted, out)[:]
        again = transform_to_zarr(str(tmp_path / "x.zarr"), fitted, out)[:]  # resumes
        np.testing.assert_array_equal(again, first)
        with pytest.raises(InputError, match=r"made from other input.*block 0 .*rows 0 to "
                                             r"100.*resume=False \(CLI: --overwrite\)"):
            transform_to_zarr(_zarr(tmp_path / "y.zarr", Y), fitted, out)
        replaced = transform_to_zarr(str(tmp_path / "y.zarr"), fitted, out, resume=False)[:]
    np.testing.assert_allclose(replaced, fitted.transform(Y), atol=1e-5)


def test_half_finished_output_resumed_with_other_input_is_refused(fitted, blobs, tmp_path):
    X = blobs[1]
    out = tmp_path / "emb.zarr"
    with dask.config.set(scheduler="threads"):
        transform_to_zarr(_zarr(tmp_path / "x.zarr", X), fitted, out)
        done = out / ".pumap_done"
        os.remove(done / "1")  # as if killed before block 1 finished
        Y = X.copy()
        Y[:100] += 1.0  # block 0, kept, differs; block 1 would be recomputed
        with pytest.raises(InputError, match="block 0"):
            transform_to_zarr(_zarr(tmp_path / "y.zarr", Y), fitted, out)
        # the same input finishes the missing block and nothing else
        fin = transform_to_zarr(str(tmp_path / "x.zarr"), fitted, out)[:]
    np.testing.assert_allclose(fin, fitted.transform(X), atol=1e-5)


# --------------------------------------------------------------------------- fits
def test_checkpoint_of_other_data_is_never_resumed(blobs, tmp_path, caplog):
    """The same data times 3 has the same graph (size, weight sum): before, its checkpoint
    was resumed and the old encoder, centring and scale ended up in the new model."""
    X = blobs[0]
    work = str(tmp_path / "work")
    kw = dict(random_state=0, **FAST)
    ParametricUMAP(work_dir=work, **kw).fit(X)
    assert os.path.exists(os.path.join(work, "train", "train.pt"))
    caplog.set_level(logging.INFO, logger="pumap_dask")
    m = ParametricUMAP(work_dir=work, **kw).fit(3 * X)
    assert "resuming training" not in caplog.text
    assert "of other input or parameters; starting over" in caplog.text
    ref = ParametricUMAP(**kw).fit(3 * X)
    np.testing.assert_array_equal(m.embedding_, ref.embedding_)
    assert m.input_identity_ != ParametricUMAP(**kw).fit(X).input_identity_


def test_knn_cache_of_other_content_is_recomputed(blobs, tmp_path, caplog):
    """A Zarr array rewritten in place keeps its dask name: the cache is keyed by content."""
    X = np.concatenate([blobs[0], blobs[1]])
    path = _zarr(tmp_path / "x.zarr", X)
    kw = dict(knn_method="partitioned", work_dir=str(tmp_path / "work"), random_state=0,
              train_world_size=1, **FAST)
    with dask.config.set(scheduler="threads"):
        ParametricUMAP(**kw).fit(zarr.open_array(path, mode="r"))
        rng = np.random.default_rng(1)
        zarr.open_array(path, mode="r+")[:] = X[rng.permutation(len(X))]  # other rows
        caplog.set_level(logging.INFO, logger="pumap_dask")
        m = ParametricUMAP(**kw).fit(zarr.open_array(path, mode="r"))
        assert "kNN reused" not in caplog.text
        assert "recomputing it there" in caplog.text
        caplog.clear()
        again = ParametricUMAP(**kw).fit(zarr.open_array(path, mode="r"))
    assert "kNN reused" in caplog.text  # same content: reused
    np.testing.assert_array_equal(again.embedding_, m.embedding_)


def test_model_records_its_input_identity(fitted, blobs, tmp_path):
    ident = fitted.input_identity_
    assert ident["rows"] == len(blobs[0]) and ident["features"] == blobs[0].shape[1]
    assert len(ident["sha256"]) == 64
    path = fitted.save(tmp_path / "m")
    assert pumap_dask.load(path).input_identity_ == ident
    text = format_info(model_summary(path))
    assert ident["sha256"][:12] in text
    # lazy input of the same rows: the same rows and features, its own blocked digest
    lazy = ParametricUMAP(random_state=3, **FAST).fit(da.from_array(blobs[0], chunks=100))
    assert lazy.input_identity_["rows"] == ident["rows"]


# --------------------------------------------------------------------------- finite or fail
def test_diverged_fit_fails_naming_learning_rate(blobs):
    with pytest.raises(TrainingError, match="diverged.*learning_rate"):
        ParametricUMAP(learning_rate=1e12, random_state=0, **FAST).fit(blobs[0] * 1e6)


def test_non_finite_weights_are_never_saved_or_loaded(fitted, tmp_path):
    import copy
    import json

    from pumap_dask.model import CONFIG_HASH, config_sha256, file_sha256

    broken = copy.deepcopy(fitted)
    with torch.no_grad():
        next(broken.encoder_.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite weights"):
        broken.save(tmp_path / "nan")
    assert not os.path.exists(tmp_path / "nan")
    # a directory edited to hold NaN weights (checksums re-sealed) is refused on load
    path = fitted.save(tmp_path / "m")
    state = torch.load(os.path.join(path, "weights.pt"), weights_only=True)
    first = next(iter(state))
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, os.path.join(path, "weights.pt"))
    with open(os.path.join(path, "config.json")) as f:
        doc = json.load(f)
    doc["weights_sha256"] = file_sha256(os.path.join(path, "weights.pt"))
    doc[CONFIG_HASH] = config_sha256(doc)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(doc, f)
    with pytest.raises(ModelFileError, match="non-finite weights"):
        pumap_dask.load(path)


def test_model_directory_follows_the_umask(fitted, tmp_path):
    old = os.umask(0o022)
    try:
        path = fitted.save(tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(path, "weights.pt")).st_mode) == 0o644


def test_finite_input_encoding_to_non_finite_rows_is_an_error(fitted, blobs):
    """A model whose weights make finite rows non-finite (here: an infinite bias) never
    publishes that output, in memory or lazily."""
    import copy

    broken = copy.deepcopy(fitted)
    with torch.no_grad():
        last = [m for m in broken.encoder_.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias[0] = float("inf")
    with pytest.raises(ModelFileError, match="finite input rows to NaN or infinite.*refit"):
        broken.transform(blobs[1])
    with dask.config.set(scheduler="threads"), \
            pytest.raises(ModelFileError, match="finite input rows"):
        broken.transform(da.from_array(blobs[1], chunks=50)).compute()
