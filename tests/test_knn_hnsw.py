"""knn_method="hnsw" (usearch, optional extra): in memory, in the partitioned back-end, in a fit."""

import importlib.util
import sys

import numpy as np
import pytest

import dask
import dask.array as da

from pumap_dask import ParametricUMAP
from pumap_dask import knn as knn_stage
from pumap_dask.distributed import knn_dask
from pumap_dask.datasets import cell_like
from pumap_dask.errors import ParameterError
from pumap_dask.knn import exact_knn, hnsw_knn, knn_recall, nearest_neighbors_numpy

from .conftest import FAST

K = 15
HAVE_USEARCH = importlib.util.find_spec("usearch") is not None
needs_usearch = pytest.mark.skipif(not HAVE_USEARCH,
                                   reason="usearch not installed (pip install 'pumap_dask[hnsw]')")


def _directional_clusters(n=3000, d=24, n_clusters=12, seed=0):
    """Clusters of directions at varied norms: cosine neighbours differ from Euclidean."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    lab = rng.integers(n_clusters, size=n)
    X = centres[lab] + 0.35 * rng.normal(size=(n, d))
    X *= rng.uniform(0.2, 5.0, size=(n, 1))
    return X.astype(np.float32)


@pytest.fixture(scope="module")
def cells():
    X, lab = cell_like(4000, n_features=30, random_state=2)
    return np.asarray(X), lab


def _check_lists(X, ind, dist, metric):
    n = len(X)
    assert ind.shape == (n, K) and dist.shape == (n, K)
    assert ind.dtype == np.int64 and dist.dtype == np.float32
    assert (ind != np.arange(n)[:, None]).all()  # self excluded
    assert (np.diff(dist, axis=1) >= -1e-6).all()
    assert all(len(np.unique(r)) == K for r in ind)
    if metric == "euclidean":
        true = np.linalg.norm(X[:, None, :] - X[ind], axis=2)
    else:
        U = knn_stage.normalize_rows(X)
        true = 1.0 - np.einsum("ik,ijk->ij", U, U[ind])
    np.testing.assert_allclose(dist, true, rtol=1e-4, atol=1e-4)


@needs_usearch
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_hnsw_recall_and_distances(cells, metric):
    X = cells[0] if metric == "euclidean" else _directional_clusters()
    ind, dist = hnsw_knn(X, K, random_state=0, metric=metric)
    _check_lists(X, ind, dist, metric)
    ex, _ = exact_knn(X, K, device="cpu", metric=metric)
    assert knn_recall(ind, ex) >= 0.95


@needs_usearch
def test_hnsw_deterministic_and_options(cells):
    X = cells[0][:2000]
    a = hnsw_knn(X, K, random_state=7)
    b = hnsw_knn(X, K, random_state=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # the options reach usearch: a tiny graph and ef still return valid lists
    i, d = nearest_neighbors_numpy(X, K, "hnsw", random_state=0, device="cpu", M=4,
                                   ef_construction=20, ef=8)
    _check_lists(X, i, d, "euclidean")
    with pytest.raises(ValueError, match="ef"):
        hnsw_knn(X, K, ef=0)


@needs_usearch
def test_hnsw_zero_rows_and_duplicates_cosine():
    X = _directional_clusters(600)
    X[:5] = 0.0  # no direction: distance 1 to everything
    X[10:20] = X[30]  # duplicates of one row
    ind, dist = hnsw_knn(X, K, random_state=0, metric="cosine")
    assert (ind != np.arange(len(X))[:, None]).all()
    np.testing.assert_allclose(dist[:5], 1.0, atol=1e-6)
    np.testing.assert_allclose(dist[10, :9], 0.0, atol=1e-5)


def test_backend_kwds_filtering():
    kw = {"M": 8, "ef": 20, "block_size": 512, "n_trees": 4}
    assert knn_stage.backend_kwds("hnsw", kw) == {"M": 8, "ef": 20}
    assert knn_stage.backend_kwds("exact", kw) == {"block_size": 512}
    assert knn_stage.backend_kwds("nndescent", kw) == {"n_trees": 4}


def test_missing_usearch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "usearch", None)  # import fails as if not installed
    X = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(ParameterError, match=r"pumap_dask\[hnsw\]"):
        hnsw_knn(X, 5)
    with pytest.raises(ParameterError, match=r"pumap_dask\[hnsw\]"):
        ParametricUMAP(knn_method="hnsw", n_neighbors=5, **FAST).fit(X)
    with pytest.raises(ParameterError, match=r"pumap_dask\[hnsw\]"):
        knn_dask.nearest_neighbors(da.from_array(X, chunks=25), 5, "partitioned",
                                   local_method="hnsw")


@needs_usearch
def test_hnsw_short_result_lists_are_searched_exactly():
    # a 16-row graph of degree 2 leaves some rows with fewer than k + 1 results
    X = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    ind, dist = hnsw_knn(X, 15, random_state=0, M=2, ef_construction=4, ef=4)
    ex_i, ex_d = exact_knn(X, 15, device="cpu")
    np.testing.assert_array_equal(np.sort(ind, 1), np.sort(ex_i, 1))
    np.testing.assert_allclose(dist, ex_d, rtol=1e-4, atol=1e-5)


def test_knn_kwds_validation():
    X = np.zeros((40, 3), np.float32)
    for bad, msg in [("M=16", "dict"), ({"M": 1}, "M"), ({"ef": -3}, "ef"),
                     ({"local_method": "annoy"}, "local_method"), ({3: 1}, "string keys")]:
        with pytest.raises(ValueError, match=msg):
            ParametricUMAP(knn_kwds=bad).fit(X)
    with pytest.raises(ValueError, match="local_method"):
        knn_dask.nearest_neighbors(X, 5, "exact", method_kwds={"local_method": "hnsw"})
    with pytest.raises(ValueError, match="local_method"):
        knn_dask.nearest_neighbors(X, 5, "partitioned", local_method="annoy")


@needs_usearch
def test_knn_dask_in_memory_hnsw(cells):
    X = cells[0][:1500]
    res = knn_dask.nearest_neighbors(X, K, "hnsw", recall_samples=200,
                                     method_kwds={"ef": 40})
    assert res.method == "hnsw" and res.recall >= 0.95
    i, _ = dask.compute(*res)
    ref, _ = hnsw_knn(X, K, random_state=0, ef=40)
    np.testing.assert_array_equal(i, ref)


@needs_usearch
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_partitioned_hnsw_threaded(cells, metric, monkeypatch):
    # force the local approximate search (normally only partitions > ~20k rows)
    monkeypatch.setattr(knn_dask, "LOCAL_EXACT_WORK", 0.0)
    called = []
    real = knn_stage.hnsw_knn

    def spy(*a, **kw):
        called.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(knn_stage, "hnsw_knn", spy)
    X = cells[0] if metric == "euclidean" else _directional_clusters(4000)
    dX = da.from_array(X, chunks=(1500, X.shape[1]))
    with dask.config.set(scheduler="threads"):
        res = knn_dask.nearest_neighbors(dX, K, "partitioned", n_partitions=3,
                                         local_method="hnsw", metric=metric,
                                         method_kwds={"ef": 48, "n_trees": 3},
                                         recall_samples=300)
    assert called and all(c["n_jobs"] == 1 and c["ef"] == 48 and "n_trees" not in c
                          for c in called)
    i, d = dask.compute(*res)
    _check_lists(X, i, d, metric)
    ex, _ = exact_knn(X, K, device="cpu", metric=metric)
    assert knn_recall(i, ex) >= 0.95 and res.recall >= 0.95


@needs_usearch
def test_fit_with_hnsw(cells):
    from sklearn.manifold import trustworthiness

    X = cells[0][:800]
    m = ParametricUMAP(knn_method="hnsw", random_state=0, knn_kwds={"ef": 48}, **FAST).fit(X)
    assert m.knn_method_ == "hnsw"
    assert np.isfinite(m.embedding_).all()
    assert trustworthiness(X, m.embedding_, n_neighbors=K) > 0.85
    # the in-memory form of a partitioned fit uses the partitions' local method
    m2 = ParametricUMAP(knn_method="partitioned", knn_kwds={"local_method": "hnsw"},
                        init="pca", random_state=0, **FAST).fit(X[:400])
    assert m2.knn_method_ == "hnsw"
