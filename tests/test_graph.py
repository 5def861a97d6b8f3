import numpy as np
import pytest
import scipy.sparse as sp

from pumap_dask.graph import fuzzy_simplicial_set, graph_to_edges, smooth_knn_dist
from pumap_dask.knn import exact_knn


def _umap_graph(X, ind, dist, **kw):
    umap_ = pytest.importorskip("umap.umap_")
    n, k = ind.shape
    ui = np.hstack([np.arange(n)[:, None], ind])
    ud = np.hstack([np.zeros((n, 1), np.float32), dist])
    G, _, _ = umap_.fuzzy_simplicial_set(X, k + 1, 0, "euclidean", knn_indices=ui,
                                          knn_dists=ud, **kw)
    return G.tocsr()


@pytest.mark.parametrize("local_connectivity", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("mix", [1.0, 0.3])
def test_equals_umap_learn(digits, local_connectivity, mix):
    X = np.vstack([digits[0][:600], digits[0][:40]])  # includes exact duplicates
    ind, dist = exact_knn(X, 15)
    ours = fuzzy_simplicial_set(ind, dist, set_op_mix_ratio=mix,
                                local_connectivity=local_connectivity)
    ref = _umap_graph(X, ind, dist, set_op_mix_ratio=mix, local_connectivity=local_connectivity)
    assert ours.shape == ref.shape
    assert ours.nnz == ref.nnz
    assert abs(ours - ref).max() <= 1e-5


def test_invariants(digits):
    X = digits[0][:500]
    ind, dist = exact_knn(X, 10)
    G = fuzzy_simplicial_set(ind, dist)
    assert abs(G - G.T).max() == 0
    assert G.data.min() > 0 and G.data.max() <= 1.0
    assert G.diagonal().sum() == 0
    # with local_connectivity=1 each point's nearest neighbour has membership 1
    rowmax = np.asarray(G.max(axis=1).todense()).ravel()
    np.testing.assert_allclose(rowmax, 1.0, atol=1e-6)


def test_sigma_hits_target():
    rng = np.random.default_rng(0)
    d = np.sort(rng.uniform(0.5, 3.0, size=(50, 15)), axis=1).astype(np.float32)
    sigma, rho = smooth_knn_dist(d)
    np.testing.assert_allclose(rho, d[:, 0])
    psum = np.exp(-np.maximum(d - rho[:, None], 0) / sigma[:, None]).sum(1)
    np.testing.assert_allclose(psum, np.log2(16), atol=1e-3)


def test_zero_distances_work():
    # all neighbours at distance 0 (duplicates) must not produce NaN
    ind = np.array([[1, 2], [0, 2], [0, 1]])
    dist = np.zeros((3, 2), np.float32)
    G = fuzzy_simplicial_set(ind, dist)
    assert np.isfinite(G.data).all()
    np.testing.assert_allclose(G.toarray(), 1 - np.eye(3))


def test_pruning():
    G = sp.csr_matrix(np.array([[0, 1.0, 0.001], [1.0, 0, 0.5], [0.001, 0.5, 0]]))
    h, t, w = graph_to_edges(G, n_epochs=200)
    assert w.min() >= 1.0 / 200
    assert len(h) == 4
    h, t, w = graph_to_edges(G)
    assert len(h) == 6
