"""fit(X, graph=G): a precomputed fuzzy graph instead of the kNN and graph stages."""

import numpy as np
import pytest
import scipy.sparse as sp

from pumap_dask import ParametricUMAP, fuzzy_simplicial_set
from pumap_dask.graph import check_precomputed_graph
from pumap_dask.errors import InputError
from pumap_dask.knn import exact_knn

from .conftest import FAST

K = 15


@pytest.fixture(scope="module")
def data(blobs):
    X = blobs[0][:400]
    i, d = exact_knn(X, K, device="cpu")
    return X, (i, d), fuzzy_simplicial_set(i, d)


def test_graph_fit_equals_knn_fit(data):
    X, knn, G = data
    # a normal fit (exact kNN for this size) and a fit on its graph: the same embedding
    a = ParametricUMAP(random_state=3, **FAST).fit(X)
    b = ParametricUMAP(random_state=3, **FAST).fit(X, graph=G)
    assert a.knn_method_ == "exact"
    assert b.knn_method_ == "precomputed-graph" and b.n_edges_ == a.n_edges_
    np.testing.assert_array_equal(a.embedding_, b.embedding_)
    assert (b.graph_ != G).nnz == 0


def test_graph_formats_give_the_same_edges(data):
    from pumap_dask.graph import graph_to_edges

    G = data[2]
    ref = graph_to_edges(check_precomputed_graph(G, G.shape[0]), n_epochs=200)
    for other in (G.tocoo(), G.tocsc(), sp.csr_array(G), G.astype(np.float64)):
        out = graph_to_edges(check_precomputed_graph(other, G.shape[0]), n_epochs=200)
        for r, o in zip(ref, out):
            np.testing.assert_array_equal(r, o)


def test_graph_fit_with_labels(data, blobs):
    X, _, G = data
    y = blobs[2][:400].copy()
    y[::3] = -1
    m = ParametricUMAP(random_state=0, init="pca", **FAST).fit(X, y, graph=G)
    assert np.isfinite(m.embedding_).all() and m.graph_.shape == G.shape


def test_graph_self_loops_dropped(data, caplog):
    X, _, G = data
    H = (G + sp.identity(G.shape[0], format="csr", dtype=np.float32)).tocsr()
    with caplog.at_level("WARNING"):
        out = check_precomputed_graph(H, G.shape[0])
    assert "self loops" in caplog.text
    assert out.diagonal().max() == 0 and (out != G).nnz == 0


@pytest.mark.parametrize("make, msg", [
    (lambda G: G.toarray(), "scipy.sparse"),
    (lambda G: G[:-1, :-1], r"shape \(400, 400\)"),
    (lambda G: sp.triu(G).tocsr(), "symmetric"),
    (lambda G: G * 2.0, r"\(0, 1\]"),
    (lambda G: -G, r"\(0, 1\]"),
    (lambda G: _with_nan(G), "finite"),
    (lambda G: sp.csr_matrix(G.shape, dtype=np.float32), "no edges"),
])
def test_bad_graphs_fail_clearly(data, make, msg):
    X, knn, G = data
    with pytest.raises(InputError, match=msg):
        ParametricUMAP(**FAST).fit(X, graph=make(G.copy()))


def test_graph_and_knn_not_both(data):
    X, knn, G = data
    with pytest.raises(InputError, match="not both"):
        ParametricUMAP(**FAST).fit(X, knn=knn, graph=G)


def _with_nan(G):
    G = G.copy()
    G.data[0] = np.nan
    return G
