"""`transform` means the encoder: the same rows give the same embedding through every
container and entry point (numpy, dask, Zarr array and path, a saved and loaded model,
pumap_dask.transform and ONNX), with no argument needed."""

import os

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import pumap_dask
from pumap_dask import ParametricUMAP

from .conftest import FAST


@pytest.fixture(scope="module")
def small_fit(digits):
    X, _ = digits
    # a small in-memory fit: where a polish used to apply by default
    return ParametricUMAP(random_state=0, **FAST).fit(X[:1200]), X[1200:1700]


def test_same_rows_same_embedding_everywhere(small_fit, tmp_path):
    model, X = small_fit
    ref = model.transform(X)
    assert ref.shape == (len(X), 2) and ref.dtype == np.float32
    path = str(tmp_path / "rows.zarr")
    zarr.create_array(path, shape=X.shape, chunks=(128, X.shape[1]), dtype="float32")[:] = X
    saved = model.save(tmp_path / "model")
    loaded = pumap_dask.load(saved)
    with dask.config.set(scheduler="threads"):
        outs = {
            "numpy, refine=False": model.transform(X, refine=False),
            "dask": model.transform(da.from_array(X, chunks=(97, -1))).compute(),
            "zarr array": model.transform(zarr.open_array(path, mode="r")).compute(),
            "zarr path": model.transform(path).compute(),
            "loaded model, numpy": loaded.transform(X),
            "loaded model, dask": loaded.transform(da.from_array(X, chunks=200)).compute(),
            "pumap_dask.transform(model)": pumap_dask.transform(X, model).compute(),
            "pumap_dask.transform(dir)": pumap_dask.transform(path, saved).compute(),
        }
    for name, out in outs.items():
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=name)
    # one row alone gets what it gets in a batch (no dependence on the other rows)
    np.testing.assert_allclose(model.transform(X[7:8]), ref[7:8], atol=1e-5, rtol=0)


def test_onnx_gives_the_same_rows(small_fit, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, X = small_fit
    sess = ort.InferenceSession(model.export_onnx(tmp_path / "enc.onnx"),
                                providers=["CPUExecutionProvider"])
    Z = sess.run(None, {"X": X.astype(np.float32)})[0]
    np.testing.assert_allclose(Z, model.transform(X), atol=1e-5, rtol=0)


def test_save_stores_no_training_rows_by_default(small_fit, tmp_path):
    model, _ = small_fit
    assert "training_data.npy" not in os.listdir(model.save(tmp_path / "m"))
    assert "training_data.npy" in os.listdir(model.save(tmp_path / "with",
                                                        include_training_data=True))
