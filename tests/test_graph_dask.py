"""Distributed fuzzy graph and its edge store (threaded scheduler and a LocalCluster)."""

import glob
import json
import os

import numpy as np
import pytest

import dask
import dask.array as da

from pumap_dask.datasets import cell_like
from pumap_dask.graph import categorical_intersection, fuzzy_simplicial_set, graph_to_edges
from pumap_dask.distributed.edges import EdgeStore
from pumap_dask.distributed.graph_dask import build_edge_store
from pumap_dask.knn import exact_knn

K = 10


@pytest.fixture(scope="module")
def knn():
    X, _ = cell_like(3000, n_features=20, random_state=2, chunk_rows=1000)
    X = np.vstack([X, X[:25]])  # exact duplicates: rows with rho == 0
    ind, dist = exact_knn(X, K, device="cpu")
    return ind, dist


def _lazy(ind, dist, rows=700):
    return da.from_array(ind, chunks=(rows, K)), da.from_array(dist, chunks=(rows, K))


def _assert_same(store, ref):
    G = store.to_csr()
    assert G.shape == ref.shape
    diff = abs(G - ref)
    assert diff.nnz == 0 or diff.max() <= 1e-6
    assert G.nnz == ref.nnz


@pytest.mark.parametrize("mix,lc", [(1.0, 1.0), (0.4, 1.5)])
def test_equals_in_memory_graph_threaded(knn, tmp_path, mix, lc):
    ind, dist = knn
    ref = fuzzy_simplicial_set(ind, dist, set_op_mix_ratio=mix, local_connectivity=lc)
    with dask.config.set(scheduler="threads"):
        store = build_edge_store(*_lazy(ind, dist), tmp_path, set_op_mix_ratio=mix,
                                 local_connectivity=lc, n_epochs=None)
    _assert_same(store, ref)
    assert len(store) == 5  # one shard per row block
    h, t, w = store.read()
    assert h.dtype == np.int64 and t.dtype == np.int64 and w.dtype == np.float32
    assert store.n_edges == len(h) == ref.nnz


def test_pruning_matches_graph_to_edges(knn, tmp_path):
    ind, dist = knn
    ref = fuzzy_simplicial_set(ind, dist)
    rh, rt, rw = graph_to_edges(ref, n_epochs=3)  # a visible cut
    with dask.config.set(scheduler="threads"):
        store = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=3)
    h, t, w = store.read()
    np.testing.assert_array_equal(h, rh)
    np.testing.assert_array_equal(t, rt)
    np.testing.assert_allclose(w, rw, atol=1e-6)
    assert store.n_edges < ref.nnz
    assert sum(len(s[0]) for s in store.iter_shards()) == store.n_edges


def test_distributed_equals_in_memory(knn, cluster_client, tmp_path):
    ind, dist = knn
    ref = fuzzy_simplicial_set(ind, dist)
    store = build_edge_store(*_lazy(ind, dist, rows=1000), tmp_path, n_epochs=None,
                             client=cluster_client)
    _assert_same(store, ref)
    # the active client is used by default, and the store is reused
    again = build_edge_store(*_lazy(ind, dist, rows=1000), tmp_path, n_epochs=None)
    assert again.n_edges == store.n_edges


def _mark_incomplete(gdir):
    """meta.json as a killed run leaves it (before the last shard was written)."""
    meta_path = os.path.join(gdir, "meta.json")
    with open(meta_path) as fh:
        meta = json.load(fh)
    meta["complete"] = False
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)


def test_rerun_reuses_and_repairs(knn, tmp_path):
    ind, dist = knn
    ref = fuzzy_simplicial_set(ind, dist)
    with dask.config.set(scheduler="threads"):
        store = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None)
        gdir = store.path
        shards = sorted(glob.glob(os.path.join(gdir, "shard-*.zarr")))

        def mtimes():
            return {p: os.stat(os.path.join(p, "zarr.json")).st_mtime_ns for p in shards}

        before = mtimes()
        build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None)
        assert mtimes() == before  # complete: nothing rewritten

        # simulate a killed run: shard 1 lost its marker, shard 3 vanished leaving a temp dir
        os.remove(os.path.join(gdir, "shard-00001.done"))
        os.rename(shards[3], shards[3] + ".tmp-deadbeef")
        _mark_incomplete(gdir)
        with pytest.raises(RuntimeError, match="incomplete"):
            EdgeStore(gdir)
        store = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None)
    after = mtimes()
    for i, p in enumerate(shards):
        if i in (1, 3):
            assert after[p] != before[p]
        else:
            assert after[p] == before[p]
    assert not glob.glob(os.path.join(gdir, "*.tmp-*"))
    _assert_same(store, ref)


def test_other_parameters_rebuild(knn, tmp_path):
    ind, dist = knn
    with dask.config.set(scheduler="threads"):
        a = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None)
        b = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None, set_op_mix_ratio=0.0)
    assert b.n_edges < a.n_edges
    _assert_same(b, fuzzy_simplicial_set(ind, dist, set_op_mix_ratio=0.0))
    assert b.nbytes_on_disk() > 0


def _labels(n, seed=0):
    """Labels 0..3 with about a fifth unknown (-1)."""
    return np.random.default_rng(seed).integers(-1, 4, n)


def test_labelled_graph_equals_in_memory(knn, tmp_path, scheduler):
    """Labels mixed in on the workers (threads or a LocalCluster) give the in-memory
    categorical intersection: all edges, and the edges kept after pruning."""
    ind, dist = knn
    y = _labels(len(ind))
    G = fuzzy_simplicial_set(ind, dist)
    ref = categorical_intersection(G, y, 0.7)
    store = build_edge_store(*_lazy(ind, dist), tmp_path / "all", n_epochs=None, y=y,
                             target_weight=0.7, client=scheduler)
    _assert_same(store, ref)
    assert len(store) == 5 and store.params["labels"]["n_known"] == int((y >= 0).sum())
    # float labels, NaN unknown, as a dask array: the same codes; pruned as apply_labels
    yf = np.where(y >= 0, y, np.nan).astype(np.float64)
    pruned = build_edge_store(*_lazy(ind, dist), tmp_path / "pruned", n_epochs=200,
                              y=da.from_array(yf, chunks=1000), target_weight=0.7)
    rh, rt, rw = graph_to_edges(ref, n_epochs=200)
    h, t, w = pruned.read()
    np.testing.assert_array_equal(h, rh)
    np.testing.assert_array_equal(t, rt)
    np.testing.assert_allclose(w, rw, atol=1e-6)
    assert pruned.n_edges < store.n_edges  # the cut removed edges to other labels


def test_labelled_rerun_reuses_repairs_and_rebuilds(knn, tmp_path):
    ind, dist = knn
    y = _labels(len(ind))
    G = fuzzy_simplicial_set(ind, dist)
    with dask.config.set(scheduler="threads"):
        a = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None, y=y)
        gdir = a.path
        first = a.read()
        shard2 = os.path.join(gdir, "shard-00002.zarr", "zarr.json")
        before = os.stat(shard2).st_mtime_ns
        # a killed run: shard 1 lost its marker
        os.remove(os.path.join(gdir, "shard-00001.done"))
        _mark_incomplete(gdir)
        b = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None, y=y)
        assert os.stat(shard2).st_mtime_ns == before  # only the lost shard recomputed
        for x, z in zip(first, b.read()):  # deterministic
            np.testing.assert_array_equal(x, z)
        # other labels, another target_weight, no labels: rebuilt
        y2 = y.copy()
        y2[:300] = 3
        c = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None, y=y2)
        _assert_same(c, categorical_intersection(G, y2, 0.5))
        d = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None, y=y2,
                             target_weight=1.0)
        _assert_same(d, categorical_intersection(G, y2, 1.0))
        e = build_edge_store(*_lazy(ind, dist), tmp_path, n_epochs=None)
        _assert_same(e, G)
        assert "labels" not in e.params


def test_label_errors(knn, tmp_path):
    ind, dist = knn
    with pytest.raises(ValueError, match="labels for a graph of 3025 points"):
        build_edge_store(*_lazy(ind, dist), tmp_path, y=np.zeros(10))
    with pytest.raises(ValueError, match=r"target_weight must lie in \[0, 1\]"):
        build_edge_store(*_lazy(ind, dist), tmp_path, y=np.zeros(len(ind)), target_weight=2)


def test_estimator_partitioned_fit(tmp_path, scheduler, monkeypatch):
    """A partitioned fit on both schedulers: reproducible, reusing its work_dir, and never
    building the (n, n) graph on the client (edges are read from the shards, the initial
    layout comes from landmarks)."""
    from pumap_dask import ParametricUMAP, pipeline
    from pumap_dask.datasets import write_cell_like_zarr

    from .conftest import FAST

    def no_csr(self):
        raise AssertionError("the client built the full graph")

    monkeypatch.setattr(EdgeStore, "to_csr", no_csr)
    monkeypatch.setattr(EdgeStore, "read", no_csr)
    monkeypatch.setattr(pipeline, "N_LANDMARKS", 500)
    # three fits per scheduler and no check of the layout's quality: 3 epochs are enough
    fast = {**FAST, "n_epochs": 3}
    path = str(tmp_path / "x.zarr")
    write_cell_like_zarr(path, 3000, n_features=20, chunk_rows=1000, random_state=4)
    work = tmp_path / "work"
    m = ParametricUMAP(knn_method="partitioned", work_dir=str(work), random_state=0,
                       **fast).fit(path)
    assert m.knn_method_ == "partitioned"
    assert m.knn_recall_ >= 0.95
    assert m.embedding_.shape == (3000, 2) and np.isfinite(m.embedding_).all()
    store = EdgeStore(work / "graph")
    assert m.n_edges_ == store.n_edges
    # a rank's edges with the heads as row pointers (sorted shards): the same edges
    head, tail, weight = store.read_compact([1, 2])
    ptr, tail_p, weight_p = store.read_compact([1, 2], pointers=True)
    assert len(ptr) == len(head) and np.array_equal(np.asarray(ptr), head)
    assert np.array_equal(tail_p, tail) and np.array_equal(weight_p, weight)
    assert not hasattr(m, "graph_")  # no (n, n) matrix is built on the client
    assert m.init_.startswith("landmark-")
    shard = os.path.join(store.path, store.shards[0], "zarr.json")
    before = os.stat(shard).st_mtime_ns
    m2 = ParametricUMAP(knn_method="partitioned", work_dir=str(work), random_state=0,
                        **fast).fit(path)  # reuses kNN and shards
    assert os.stat(shard).st_mtime_ns == before
    assert m2.knn_recall_ == m.knn_recall_
    np.testing.assert_array_equal(m2.embedding_, m.embedding_)  # reproducible
    # no work_dir: a temporary one, removed afterwards
    m3 = ParametricUMAP(knn_method="partitioned", random_state=0, **fast).fit(path)
    assert m3.n_edges_ == m.n_edges_
