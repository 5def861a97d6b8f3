"""Partitioned kNN over chunked input (threaded scheduler and a LocalCluster)."""

import numpy as np
import pytest

import dask
import dask.array as da

from pumap_dask.datasets import cell_like, write_cell_like_zarr
from pumap_dask.errors import InputError
from pumap_dask.knn import exact_knn, knn_recall
from pumap_dask.distributed import knn_dask
from pumap_dask.distributed.knn_dask import merge_candidates, nearest_neighbors

K = 15


@pytest.fixture(scope="module")
def cells():
    X, _ = cell_like(6000, n_features=30, random_state=1, chunk_rows=2000)
    ind, _ = exact_knn(X, K, device="cpu")
    return X, ind


def _check(res, X, chunks, exact_ind, min_recall=0.95):
    ind, dist = res
    assert isinstance(ind, da.Array) and isinstance(dist, da.Array)
    assert ind.chunks == (chunks, (K,)) and dist.chunks == (chunks, (K,))
    assert ind.dtype == np.int64 and dist.dtype == np.float32
    i, d = dask.compute(ind, dist)
    assert i.dtype == np.int64 and d.dtype == np.float32 and i.shape == (len(X), K)
    assert (i != np.arange(len(X))[:, None]).all()
    assert (np.diff(d, axis=1) >= 0).all()
    assert all(len(np.unique(row)) == K for row in i)  # no repeated neighbour ids
    true_d = np.linalg.norm(X[np.arange(len(X))[:, None]] - X[i], axis=2)
    np.testing.assert_allclose(d, true_d, rtol=1e-3, atol=1e-3)
    assert knn_recall(i, exact_ind) >= min_recall
    assert res.recall is None or res.recall >= min_recall
    return i, d


def test_partitioned_threaded(cells):
    X, exact_ind = cells
    dX = da.from_array(X, chunks=(1500, 30))
    with dask.config.set(scheduler="threads"):
        res = nearest_neighbors(dX, K, "partitioned", n_partitions=6, recall_samples=500)
    assert res.method == "partitioned" and res.n_partitions >= 2 and res.recall >= 0.95
    _check(res, X, dX.chunks[0], exact_ind)


def _nndescent_in_partitions(cells, monkeypatch, recall_samples=300):
    # force NN-descent inside the partitions (normally used for partitions > ~6k rows)
    monkeypatch.setattr(knn_dask, "LOCAL_EXACT_WORK", 0.0)
    X, exact_ind = cells
    dX = da.from_array(X, chunks=(2500, 30))
    with dask.config.set(scheduler="threads"):
        res = nearest_neighbors(dX, K, "partitioned", n_partitions=3,
                                recall_samples=recall_samples)
    _check(res, X, dX.chunks[0], exact_ind)


def test_partitioned_nndescent_local(cells, monkeypatch):
    _nndescent_in_partitions(cells, monkeypatch)


def test_partitioned_zarr_distributed(cells, cluster_client, tmp_path):
    X, exact_ind = cells
    path = str(tmp_path / "x.zarr")
    write_cell_like_zarr(path, 6000, n_features=30, chunk_rows=2000, random_state=1)
    # small partitions are searched exactly: no numba compilation in fresh worker processes
    res = nearest_neighbors(path, K, "partitioned", n_partitions=8, recall_samples=300,
                            client=cluster_client)
    with dask.config.set(scheduler=cluster_client):  # the results live on the workers
        _check(res, X, (2000, 2000, 2000), exact_ind)
    # the active client is picked up without passing it
    with cluster_client.as_current(), dask.config.set(scheduler=cluster_client):
        res2 = nearest_neighbors(path, K, "partitioned", n_partitions=8, recall_samples=0)
        np.testing.assert_array_equal(res2[0].compute(), res[0].compute())


def test_refine_and_overlap_one(cells):
    X, exact_ind = cells
    dX = da.from_array(X, chunks=(2000, 30))
    with dask.config.set(scheduler="threads"):
        plain = nearest_neighbors(dX, K, "partitioned", n_partitions=8, overlap=1,
                                  recall_samples=0)
        refined = nearest_neighbors(dX, K, "partitioned", n_partitions=8, overlap=1,
                                    refine=True, recall_samples=0)
    r0 = knn_recall(plain[0].compute(), exact_ind)
    r1 = knn_recall(refined[0].compute(), exact_ind)
    assert r1 >= r0 and r1 > 0.9
    _check(refined, X, dX.chunks[0], exact_ind, min_recall=0.9)


def test_merge_deduplicates():
    # row 0 of a block at offset 10 appears in two partitions that share neighbours
    a = (np.array([10]), np.array([[11, 12, 13]]), np.array([[1.0, 2.0, 3.0]], np.float32))
    b = (np.array([10]), np.array([[12, 10, 14]]), np.array([[2.0, 0.0, 2.5]], np.float32))
    c = (np.array([11]), np.array([[10, 12, 13]]), np.array([[1.0, 1.5, 2.0]], np.float32))
    i, d = merge_candidates([a, None, b, c], offset=10, size=2, n_neighbors=3)
    np.testing.assert_array_equal(i, [[11, 12, 14], [10, 12, 13]])
    np.testing.assert_allclose(d, [[1.0, 2.0, 2.5], [1.0, 1.5, 2.0]])


def test_auto_rules(cells, monkeypatch):
    X, exact_ind = cells
    with dask.config.set(scheduler="threads"):
        res = nearest_neighbors(X[:1000], K, recall_samples=100)
        assert res.method == "exact" and res[0].shape == (1000, K)
        monkeypatch.setattr(knn_dask, "PARTITION_THRESHOLD", 3000)
        dX = da.from_array(X, chunks=(3000, 30))
        res = nearest_neighbors(dX, K, recall_samples=0, n_partitions=6)
        assert res.method == "partitioned"
        res = nearest_neighbors(dX[:2000], K, recall_samples=0)
        assert res.method == "exact"


def test_nan_block_is_named(cells):
    X = cells[0].copy()
    X[4321, 3] = np.nan
    dX = da.from_array(X, chunks=(2000, 30))
    with dask.config.set(scheduler="threads"):
        with pytest.raises(InputError, match=r"row block \[4000, 6000\)"):
            nearest_neighbors(dX, K, "partitioned", n_partitions=3)


def test_work_dir_cache(cells, tmp_path):
    X, exact_ind = cells
    dX = da.from_array(X, chunks=(2000, 30))
    with dask.config.set(scheduler="threads"):
        r1 = nearest_neighbors(dX, K, "partitioned", n_partitions=4, work_dir=tmp_path,
                               recall_samples=200)
        r2 = nearest_neighbors(dX, K, "partitioned", n_partitions=4, work_dir=tmp_path)
    assert r2.timings == {"cached": 0.0} and r2.recall == r1.recall
    assert r2[0].name == r1[0].name  # same run: the graph stage may reuse its shards
    with dask.config.set(scheduler="threads"):
        r3 = nearest_neighbors(dX, K, "partitioned", n_partitions=3, work_dir=tmp_path,
                               recall_samples=0)
    assert r3[0].name != r1[0].name  # recomputed in place: a new name
    np.testing.assert_array_equal(r2[0].compute(), r1[0].compute())
    assert r2[0].chunks == dX.chunks[:1] + ((K,),)


def test_nan_block_is_named_distributed(cells, cluster_client):
    X = cells[0].copy()
    X[10, 0] = np.inf
    dX = da.from_array(X, chunks=(2000, 30))
    with pytest.raises(InputError, match=r"row block \[0, 2000\)"):
        nearest_neighbors(dX, K, "partitioned", n_partitions=3, client=cluster_client)


def test_work_dir_irregular_chunks_and_other_input(cells, tmp_path):
    X, exact_ind = cells
    dX = da.from_array(X, chunks=((1000, 2000, 2000, 1000), (30,)))
    with dask.config.set(scheduler="threads"):
        r1 = nearest_neighbors(dX, K, "partitioned", n_partitions=3, work_dir=tmp_path,
                               recall_samples=0)
        assert r1[0].chunks[0] == dX.chunks[0]
        i1 = r1[0].compute()  # r1 reads the work_dir, which the next call replaces
        other = da.from_array(X[::-1].copy(), chunks=dX.chunks)  # same shape, other data
        r2 = nearest_neighbors(other, K, "partitioned", n_partitions=3, work_dir=tmp_path,
                               recall_samples=0)
    assert r2.timings != {"cached": 0.0}
    assert knn_recall(i1, exact_ind) > 0.95


def test_work_dir_cache_sees_zarr_rewritten_in_place(cells, tmp_path):
    """Dask names Zarr arrays by path: new data at the same path must not reuse the cache."""
    import zarr

    X = cells[0]
    path = str(tmp_path / "x.zarr")
    z = zarr.create_array(path, shape=X.shape, chunks=(2000, 30), dtype="float32")
    z[:] = X
    with dask.config.set(scheduler="threads"):
        r1 = nearest_neighbors(path, K, "partitioned", n_partitions=3,
                               work_dir=tmp_path / "w", recall_samples=0)
        first = r1[0].compute()
        z[:] = X[::-1]  # same shape and path, different data
        r2 = nearest_neighbors(path, K, "partitioned", n_partitions=3,
                               work_dir=tmp_path / "w", recall_samples=0)
    assert r2.timings != {"cached": 0.0}
    n = len(X)
    # reversed rows: row i's neighbours are the old neighbours of row n-1-i, mirrored
    assert knn_recall(r2[0].compute()[::-1], n - 1 - first) > 0.99


def test_grouped_search_gives_the_per_partition_result_with_fewer_tasks(cells):
    X, _ = cells
    dX = da.from_array(X, chunks=(1000, 30))  # 6 blocks
    C = knn_dask.fit_partitions(X[::3], 8, 2, len(X), 3000, 64, 0)
    P = C.shape[0]

    def run(n_groups):
        pb = knn_dask._partition_pass(dX, K, C, 2, "cpu", 0, f"t{n_groups}", n_groups=n_groups)
        ind, dist = knn_dask._assemble(dX, pb, K)
        tasks = len(dict(ind.__dask_graph__()))
        with dask.config.set(scheduler="threads"):
            return dask.compute(ind, dist), tasks

    (i1, d1), t1 = run(None)  # one search task per partition
    (i3, d3), t3 = run(3)
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_array_equal(d1, d3)
    assert t3 < t1 - 2 * 6 * (P - 3) + 10  # the shuffle shrinks by blocks x (P - groups)


def test_search_groups_rule():
    # as many groups as row blocks, at least 4 per thread, never more than the partitions
    assert knn_dask.search_groups(400, 50, 10_000_000, 50, 15, 2, 2, 3e9) == 50
    assert knn_dask.search_groups(40, 5, 1_000_000, 50, 15, 2, 2, 3e9) == 8
    assert knn_dask.search_groups(6, 50, 100_000, 50, 15, 2, 2, 3e9) == 6
    # little memory per thread: more, smaller groups (each holds its rows and results)
    few = knn_dask.search_groups(400, 50, 10_000_000, 50, 15, 2, 2, 1e8)
    assert few > 50 and 2 * 10_000_000 * 396 / few <= 0.25 * 1e8


def test_many_partitions_per_thread_search_with_pynndescent(cells, monkeypatch):
    # the rule: the package's cached kernel for a few partitions per worker thread,
    # pynndescent's (compiled once per worker, faster warm) for many
    assert knn_dask.local_kernel("nndescent", 2 * 1_000_000, 50, 2) == "descent"
    assert knn_dask.local_kernel("nndescent", 2 * 10_000_000, 50, 2) == "pynndescent"
    assert knn_dask.local_kernel("hnsw", 2 * 10_000_000, 50, 2) == "hnsw"
    from pumap_dask import knn as knn_stage

    used = []

    def spy(X, k, **kw):  # stands in for pynndescent (no compile in the test)
        used.append(kw.pop("n_jobs"))
        return knn_stage.descent_knn(X, k, **kw)

    monkeypatch.setattr(knn_stage, "nndescent_knn", spy)
    monkeypatch.setattr(knn_stage, "PYNNDESCENT_COMPILE_S", 0.0)
    _nndescent_in_partitions(cells, monkeypatch, recall_samples=0)
    assert used and set(used) == {1}  # one thread per partition task


def test_default_recall_sample_shrinks_with_rows(cells, monkeypatch, caplog):
    """By default the recall is sampled on fewer rows as n grows (its search costs rows x n)."""
    import logging

    assert knn_dask.recall_rows(5000) == knn_dask.recall_rows(1_000_000) == 1000
    assert knn_dask.recall_rows(3_000_000) == 333
    assert knn_dask.recall_rows(10_000_000) == knn_dask.recall_rows(10**9) == 200
    X, _ = cells
    monkeypatch.setattr(knn_dask, "RECALL_PAIRS", 300 * len(X))  # 6,000 rows -> 300 sampled
    with dask.config.set(scheduler="threads"), caplog.at_level(logging.INFO, "pumap_dask"):
        res = nearest_neighbors(da.from_array(X, chunks=(1500, 30)), K, "partitioned",
                                n_partitions=6)
    assert any("on 300 sampled rows" in r.getMessage() for r in caplog.records)
    assert res.recall >= 0.95


@pytest.mark.parametrize("overlap", [1, 2, 3, 7])
def test_rows_by_partition_is_the_per_partition_test(overlap):
    # each partition's rows, in ascending order, as a test of every partition against
    # every row gives them (empty partitions included, and every row in every partition
    # when the overlap reaches the partition count)
    rng = np.random.default_rng(overlap)
    P = 7
    block = rng.standard_normal((500, 4)).astype(np.float32)
    centroids = rng.standard_normal((P, 4)).astype(np.float32) * 3
    centroids[3] = 100.0  # no row's nearest
    top = knn_dask._nearest(block, centroids, min(overlap, P))
    got = knn_dask.rows_by_partition(top, P)
    for p in range(P):
        want = np.flatnonzero((top == p).any(1))
        np.testing.assert_array_equal(got[p], want)
        assert got[p].dtype == np.int64
    assert len(got[3]) == (500 if overlap >= P else 0)
    pieces = knn_dask._split_block(block, 1000, centroids, overlap,
                                   groups=[[0, 1], [2, 3, 4, 5, 6]])
    assert [len(g) for g in pieces] == [2, 5]
    ids, rows = pieces[1][2]
    np.testing.assert_array_equal(ids, got[4] + 1000)
    np.testing.assert_array_equal(rows, block[got[4]])
