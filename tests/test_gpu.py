"""GPU code paths; skipped without CUDA (their CPU fallbacks are covered elsewhere)."""

import numpy as np
import pytest
import torch

import pumap_dask
from pumap_dask.knn import exact_knn, resolve_device

from .conftest import FAST

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_request_falls_back_to_cpu_without_gpu(blobs):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("cuda") == "cpu"
    assert resolve_device("auto") == "cpu"
    m = pumap_dask.ParametricUMAP(**{**FAST, "device": "cuda"}).fit(blobs[0])
    assert np.isfinite(m.embedding_).all()


@pytest.mark.gpu
@cuda
def test_exact_knn_cuda_matches_cpu(digits):
    X = digits[0]
    ci, cd = exact_knn(X, 10, device="cpu")
    gi, gd = exact_knn(X, 10, device="cuda")
    np.testing.assert_allclose(gd, cd, rtol=1e-3, atol=1e-3)
    assert (gi == ci).mean() > 0.99


@pytest.mark.gpu
@cuda
def test_fit_and_transform_cuda(blobs):
    m = pumap_dask.ParametricUMAP(**{**FAST, "device": "cuda"}).fit(blobs[0])
    cpu = m.transform(blobs[1])
    lazy = pumap_dask.transform(blobs[1], m, device="cuda").compute()
    assert np.abs(lazy - cpu).max() < 1e-3
