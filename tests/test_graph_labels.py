"""Semi-supervised fits: labels mixed into the fuzzy graph (umap-learn's target_weight)."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.preprocessing import normalize

import dask.array as da

from pumap_dask import ParametricUMAP
from pumap_dask.graph import (categorical_intersection, far_label_distance,
                              fuzzy_simplicial_set, label_codes)
from pumap_dask.errors import InputError
from pumap_dask.knn import exact_knn

from .conftest import FAST


@pytest.fixture(scope="module")
def small_graph():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    return fuzzy_simplicial_set(*exact_knn(X, 10, device="cpu")), rng.integers(-1, 4, 300)


def test_label_codes():
    np.testing.assert_array_equal(label_codes(np.array([3, -1, 7, 3])), [0, -1, 1, 0])
    np.testing.assert_array_equal(label_codes(np.array([0.5, np.nan, -1.0])), [0, -1, -1])
    np.testing.assert_array_equal(label_codes(np.array(["b", "a", "b"])), [1, 0, 1])
    with pytest.raises(ValueError, match="1-d"):
        label_codes(np.zeros((3, 2)))


def test_intersection_rule(small_graph):
    G, y = small_graph
    out = categorical_intersection(G, y, 0.5)
    assert abs(out - out.T).max() < 1e-6 and out.max() <= 1.0 + 1e-6
    assert out.diagonal().max() == 0 and (out.data > 0).all()
    coo = out.tocoo()
    same = (y[coo.row] == y[coo.col]) & (y[coo.row] >= 0)
    diff = (y[coo.row] != y[coo.col]) & (y[coo.row] >= 0) & (y[coo.col] >= 0)
    assert coo.data[same].mean() > 10 * coo.data[diff].mean()
    # target_weight 1 all but removes edges between different labels
    hard = categorical_intersection(G, y, 1.0).tocoo()
    d = (y[hard.row] != y[hard.col]) & (y[hard.row] >= 0) & (y[hard.col] >= 0)
    assert hard.data[d].max(initial=0) < 1e-12
    assert far_label_distance(0.5) == 5.0
    # no labels known: the graph itself (umap-learn's fuzzy union gives 2w - w^2)
    none = categorical_intersection(G, np.full(300, -1), 0.5)
    assert (none != 0).nnz == G.nnz and abs(none - G).max() < 1e-6


def test_unlabelled_rows_keep_their_edges(small_graph):
    """Issue 19: edges between two unlabelled rows keep their weight, at any fraction known,
    so partial labels do not inflate the unlabelled rows' weak (between-class) edges."""
    G, y = small_graph
    out = categorical_intersection(G, y, 0.5).tocoo()
    both = (y[out.row] < 0) & (y[out.col] < 0)
    assert both.sum() > 100
    w_in = np.asarray(G[out.row[both], out.col[both]]).ravel()
    np.testing.assert_allclose(out.data[both], w_in, rtol=1e-6)


@pytest.mark.parametrize("target_weight", [0.0, 0.5, 0.9])
def test_matches_umap_learn(small_graph, target_weight):
    """umap-learn's label distances and row rescale (its fast_intersection and max
    normalisation), then the mean of the rows and their transpose where umap-learn takes
    the fuzzy union (its discrete_metric_simplicial_set_intersection)."""
    umap_ = pytest.importorskip("umap.umap_")
    G, y = small_graph
    far = far_label_distance(target_weight)
    coo = sp.coo_matrix(G, copy=True)
    umap_.fast_intersection(coo.row, coo.col, coo.data, y, 1.0, far)
    A = normalize(coo.tocsr(), norm="max")
    ours = categorical_intersection(G, y, target_weight)
    mean = sp.csr_matrix((A + A.T) / 2)
    assert abs(ours - mean).max() < 1e-6 and ours.nnz == mean.nnz
    ref = umap_.discrete_metric_simplicial_set_intersection(sp.coo_matrix(G), y, far_dist=far)
    assert abs(ref.tocsr() - (A + A.T - A.multiply(A.T))).max() < 1e-6


def _knn_accuracy(model, X_test, y_train, y_test, k=15):
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(k).fit(model.embedding_, y_train)
    return clf.score(model.transform(X_test), y_test)


def test_labels_separate_classes_on_held_out_data(digits):
    from sklearn.model_selection import train_test_split

    X, y = digits
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    unsup = ParametricUMAP(random_state=1, **FAST).fit(Xtr)
    sup = ParametricUMAP(random_state=1, target_weight=0.5, **FAST).fit(Xtr, ytr)
    a_u = _knn_accuracy(unsup, Xte, ytr, yte)
    a_s = _knn_accuracy(sup, Xte, ytr, yte)
    # measured 0.857 -> 0.900 (seed 0: 0.835 -> 0.883)
    assert a_s >= a_u + 0.02, (a_u, a_s)
    # the training graph itself: fewer edges between classes
    coo_u, coo_s = unsup.graph_.tocoo(), sup.graph_.tocoo()
    cross_u = coo_u.data[ytr[coo_u.row] != ytr[coo_u.col]].sum() / coo_u.data.sum()
    cross_s = coo_s.data[ytr[coo_s.row] != ytr[coo_s.col]].sum() / coo_s.data.sum()
    assert cross_s < 0.5 * cross_u


def test_label_errors():
    X = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    with pytest.raises(InputError, match="60 labels"):
        ParametricUMAP(**FAST).fit(X, np.zeros(59))
    with pytest.raises(ValueError, match=r"target_weight must lie in \[0, 1\]"):
        ParametricUMAP(target_weight=1.5, **FAST).fit(X, np.zeros(60))
    with pytest.raises(InputError, match="one comparable type"):
        ParametricUMAP(**FAST).fit(X, np.array([1, "a"] * 30, dtype=object))
    # a partitioned fit checks its labels before any stage runs, too
    with pytest.raises(InputError, match="60 labels"):
        ParametricUMAP(knn_method="partitioned", **FAST).fit(
            da.from_array(X, chunks=(30, 4)), da.zeros(59, chunks=30))


def test_partially_labelled_fit_runs(blobs):
    Xtr, _, ytr, _ = blobs
    y = ytr.copy()
    y[::2] = -1
    m = ParametricUMAP(random_state=0, **FAST).fit(Xtr, y)
    assert np.isfinite(m.embedding_).all() and m.embedding_.shape == (len(Xtr), 2)
    np.testing.assert_array_equal(m.fit_transform(Xtr, y), m.embedding_)


def test_run_graph_labels_partitioned_equals_in_memory(small_graph, tmp_path):
    """The graph stage with labels: edge shards (partitioned) == in-memory edges."""
    import dask

    from pumap_dask import pipeline

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    ind, dist = exact_knn(X, 10, device="cpu")
    y = small_graph[1]
    params = {**ParametricUMAP(random_state=0, target_weight=0.8).get_params(),
              "device": "cpu"}
    mem = pipeline.run_graph(pipeline.Neighbors(ind, dist, "exact"), params, y=y)
    lazy = pipeline.Neighbors(da.from_array(ind, chunks=(70, 10)),
                              da.from_array(dist, chunks=(70, 10)), "partitioned")
    with dask.config.set(scheduler="threads"):
        part = pipeline.run_graph(lazy, params, work_dir=str(tmp_path), y=y)
    assert part.graph is None and part.n_vertices == mem.n_vertices == 300
    assert part.head is None and len(part) == len(mem)  # on disk until loaded
    part = part.load()
    np.testing.assert_array_equal(part.head, mem.head)
    np.testing.assert_array_equal(part.tail, mem.tail)
    np.testing.assert_allclose(part.weight, mem.weight, atol=1e-6)
    unlabelled = pipeline.run_graph(pipeline.Neighbors(ind, dist, "exact"), params)
    assert len(mem) < len(unlabelled)  # pruned after the labels cut edges between classes


def _cross_label_weight(store, y):
    h, t, w = store.read()
    return w[y[h] != y[t]].sum() / w.sum()


def test_partitioned_fit_with_labels(tmp_path, monkeypatch):
    """fit(X, y) with knn_method="partitioned": the labels reach the edge shards (the
    training graph), and the embedding separates the labels on held-out rows."""
    import dask

    from pumap_dask import pipeline
    from pumap_dask.datasets import clusters, train_test_split
    from pumap_dask.distributed.edges import EdgeStore

    monkeypatch.setattr(pipeline, "N_LANDMARKS", 500)  # landmark layout, as at scale
    # few features: the clusters touch (raw 15-NN accuracy 0.99), so labels have edges to cut
    X, lab = clusters(n_samples=1500, n_features=4, n_clusters=8, random_state=0)
    Xtr, Xte, ytr, yte = train_test_split(X, lab, random_state=0)
    y = ytr.copy()
    y[::4] = -1  # partly labelled
    fits = {}
    with dask.config.set(scheduler="threads"):
        for name, labels in (("unsup", None), ("sup", y)):
            work = tmp_path / name
            m = ParametricUMAP(knn_method="partitioned", work_dir=str(work), random_state=0,
                               target_weight=0.7, **FAST).fit(
                da.from_array(Xtr, chunks=(400, -1)), labels)
            assert m.knn_method_ == "partitioned" and not hasattr(m, "graph_")
            fits[name] = (m, EdgeStore(work / "graph"))
    (unsup, g_u), (sup, g_s) = fits["unsup"], fits["sup"]
    assert sup.n_edges_ == g_s.n_edges and g_s.params["labels"]["n_known"] == (y >= 0).sum()
    # measured: 2.6% of the weight between labels -> 1.1%; held-out 0.973 -> 0.978
    assert _cross_label_weight(g_s, ytr) < 0.5 * _cross_label_weight(g_u, ytr)
    a_u = _knn_accuracy(unsup, Xte, ytr, yte)
    a_s = _knn_accuracy(sup, Xte, ytr, yte)
    assert np.isfinite(sup.embedding_).all() and a_s >= 0.9 and a_s >= a_u - 0.02, (a_u, a_s)
