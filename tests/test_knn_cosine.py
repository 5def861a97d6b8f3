"""metric="cosine" in every kNN back-end, the estimator parameter and saved models."""

import json
import os

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

import dask
import dask.array as da

from pumap_dask import ParametricUMAP, load
from pumap_dask.knn import (exact_knn, knn_recall, nearest_neighbors_numpy, normalize_rows,
                            sample_recall)
from pumap_dask.distributed.knn_dask import nearest_neighbors

from .conftest import FAST

K = 15


def _directional_clusters(n=3000, d=24, n_clusters=12, seed=0):
    """Clusters of directions at varied norms: cosine neighbours differ from Euclidean."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    lab = rng.integers(n_clusters, size=n)
    X = centres[lab] + 0.35 * rng.normal(size=(n, d))
    X *= rng.uniform(0.2, 5.0, size=(n, 1))  # norms vary: irrelevant to cosine
    return X.astype(np.float32), lab


@pytest.fixture(scope="module")
def dirs():
    X, lab = _directional_clusters()
    ind, _ = exact_knn(X, K, metric="cosine", device="cpu")
    return X, lab, ind


def test_exact_cosine_matches_sklearn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 20)).astype(np.float32)
    ind, dist = exact_knn(X, 10, block_size=128, metric="cosine", device="cpu")
    rd, ri = NearestNeighbors(n_neighbors=11, metric="cosine",
                              algorithm="brute").fit(X).kneighbors(X)
    np.testing.assert_array_equal(ind, ri[:, 1:])
    np.testing.assert_allclose(dist, rd[:, 1:], atol=1e-5)
    assert ind.dtype == np.int64 and dist.dtype == np.float32
    # queries against other points
    Q = rng.normal(size=(50, 20)).astype(np.float32)
    qi, qd = exact_knn(Q, 5, Y=X, metric="cosine", device="cpu")
    rd, ri = NearestNeighbors(n_neighbors=5, metric="cosine", algorithm="brute").fit(
        X).kneighbors(Q)
    np.testing.assert_array_equal(qi, ri)
    np.testing.assert_allclose(qd, rd, atol=1e-5)


def test_cosine_ignores_norms_and_ranges_to_two():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    scaled = X * rng.uniform(0.01, 100, size=(200, 1)).astype(np.float32)
    a = exact_knn(X, 7, metric="cosine", device="cpu")
    b = exact_knn(scaled, 7, metric="cosine", device="cpu")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    # opposite directions: distance 2
    Y = np.array([[1.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]], np.float32)
    i, d = exact_knn(Y, 2, metric="cosine", device="cpu")
    np.testing.assert_allclose(d[0], [2.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(d[1], [0.0, 2.0], atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "nndescent"])
def test_zero_rows_are_at_distance_one(method):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 10)).astype(np.float32)
    zero = [3, 50, 51]
    X[zero] = 0.0
    ind, dist = nearest_neighbors_numpy(X, 8, method, metric="cosine", device="cpu",
                                        random_state=0)
    assert np.isfinite(dist).all()
    assert (ind != np.arange(300)[:, None]).all()
    # a zero row lies at distance 1 from every row, other zero rows included
    np.testing.assert_array_equal(dist[zero], 1.0)
    others = np.setdiff1d(np.arange(300), zero)
    holds_zero = np.isin(ind[others], zero)
    np.testing.assert_array_equal(dist[others][holds_zero], 1.0)
    assert (np.diff(dist, axis=1) >= 0).all()
    # as scikit-learn's cosine distances
    from sklearn.metrics.pairwise import cosine_distances

    np.testing.assert_allclose(cosine_distances(X[zero], X), 1.0)
    np.testing.assert_array_equal(normalize_rows(X)[zero], 0.0)


def test_nndescent_cosine_recall(dirs):
    X, _, exact = dirs
    ind, dist = nearest_neighbors_numpy(X, K, "nndescent", metric="cosine", random_state=0)
    r = knn_recall(ind, exact)
    assert r >= 0.9, r
    assert sample_recall(X, ind, n_samples=300, metric="cosine", device="cpu") >= 0.9
    # distances are cosine distances of the listed pairs
    U = normalize_rows(X)
    ref = 1.0 - np.einsum("ik,ijk->ij", U, U[ind])
    np.testing.assert_allclose(dist, ref, atol=1e-4)


def test_partitioned_cosine_recall(dirs, scheduler):
    X, _, exact = dirs
    dX = da.from_array(X, chunks=(1000, X.shape[1]))
    res = nearest_neighbors(dX, K, "partitioned", n_partitions=4, recall_samples=300,
                            metric="cosine", client=scheduler)
    i, d = dask.compute(*res, scheduler=scheduler or "threads")
    r = knn_recall(i, exact)
    assert r >= 0.9, r
    assert res.recall >= 0.9 and res.n_partitions >= 2
    U = normalize_rows(X)
    np.testing.assert_allclose(d, 1.0 - np.einsum("ik,ijk->ij", U, U[i]), atol=1e-4)
    assert (np.diff(d, axis=1) >= 0).all() and (i != np.arange(len(X))[:, None]).all()
    # the Euclidean kNN of the same data is a different graph
    eu = exact_knn(X, K, device="cpu")[0]
    assert knn_recall(eu, exact) < 0.8


def test_metric_validated():
    with pytest.raises(ValueError, match=r"metric must be one of \('euclidean', 'cosine'\)"):
        ParametricUMAP(metric="manhattan").fit(np.zeros((30, 3), np.float32))
    with pytest.raises(ValueError, match="metric must be one of"):
        exact_knn(np.zeros((30, 3), np.float32), 3, metric="l1")
    with pytest.raises(ValueError, match="metric must be one of"):
        nearest_neighbors(np.zeros((30, 3), np.float32), 3, metric="dot")


def test_cosine_fit_in_memory_and_saved(dirs, tmp_path):
    X, lab, _ = dirs
    Xs = X[:800]
    m = ParametricUMAP(metric="cosine", random_state=0, **FAST).fit(Xs)
    e = ParametricUMAP(random_state=0, **FAST).fit(Xs)
    assert m.embedding_.shape == (800, 2) and np.isfinite(m.embedding_).all()
    # the graph is of the cosine kNN: differs from the Euclidean one
    assert (m.graph_ != e.graph_).nnz > 0
    path = m.save(tmp_path / "m")
    with open(os.path.join(path, "config.json")) as fh:
        assert json.load(fh)["params"]["metric"] == "cosine"
    m2 = load(path)
    assert m2.metric == "cosine"
    np.testing.assert_allclose(m2.transform(Xs[:50]), m.transform(Xs[:50]), atol=1e-6)


def test_model_without_metric_loads_as_euclidean(fitted, tmp_path):
    from pumap_dask import model as model_stage

    path = fitted.save(tmp_path / "old")
    cfg = os.path.join(path, "config.json")
    with open(cfg) as fh:
        doc = json.load(fh)
    del doc["params"]["metric"]  # as written before the parameter existed
    doc["config_sha256"] = model_stage.config_sha256(doc)
    with open(cfg, "w") as fh:
        json.dump(doc, fh)
    assert load(path).metric == "euclidean"
    doc["params"]["metric"] = "hamming"
    doc["config_sha256"] = model_stage.config_sha256(doc)
    with open(cfg, "w") as fh:
        json.dump(doc, fh)
    with pytest.raises(model_stage.ModelFileError, match="metric"):
        load(path)


def test_cosine_fit_partitioned(scheduler):
    X, _ = _directional_clusters(n=2400, d=16, seed=3)
    dX = da.from_array(X, chunks=(800, 16))
    m = ParametricUMAP(metric="cosine", knn_method="partitioned", random_state=0,
                       **FAST).fit(dX)
    assert m.knn_method_ == "partitioned" and m.knn_recall_ >= 0.9
    assert m.embedding_.shape == (2400, 2) and np.isfinite(m.embedding_).all()


def test_work_dir_cache_keyed_by_metric(dirs, tmp_path):
    X, _, exact = dirs
    dX = da.from_array(X[:1200], chunks=(400, X.shape[1]))
    with dask.config.set(scheduler="threads"):
        eu = nearest_neighbors(dX, K, "partitioned", n_partitions=2, recall_samples=0,
                               work_dir=tmp_path)
        ei = eu[0].compute()  # before the store is replaced
        co = nearest_neighbors(dX, K, "partitioned", n_partitions=2, recall_samples=0,
                               work_dir=tmp_path, metric="cosine")
        again = nearest_neighbors(dX, K, "partitioned", n_partitions=2, recall_samples=0,
                                  work_dir=tmp_path, metric="cosine")
    assert "cached" not in co.timings and "cached" in again.timings  # not the Euclidean one
    ci = co[0].compute()
    ref = exact_knn(X[:1200], K, metric="cosine", device="cpu")[0]
    assert knn_recall(ci, ref) > 0.95 > knn_recall(ei, ref)
    np.testing.assert_array_equal(again[0].compute(), ci)
