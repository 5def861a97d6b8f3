import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from pumap_dask.errors import InputError
from pumap_dask.knn import (check_precomputed, exact_knn, knn_recall, nearest_neighbors_numpy,
                            sample_recall)


def _sk(X, k):
    d, i = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    return i[:, 1:], d[:, 1:]


def test_exact_matches_sklearn(digits):
    X = digits[0][:700]
    ind, dist = exact_knn(X, 10, block_size=128)  # several tiles in both directions
    ri, rd = _sk(X, 10)
    np.testing.assert_allclose(dist, rd, rtol=1e-4, atol=1e-3)
    assert knn_recall(ind, ri) > 0.99
    assert ind.dtype == np.int64 and dist.dtype == np.float32
    assert (ind != np.arange(len(X))[:, None]).all()
    assert (np.diff(dist, axis=1) >= 0).all()


def test_exact_independent_of_block_size(digits):
    X = digits[0][:300]
    a = exact_knn(X, 5, block_size=64)
    b = exact_knn(X, 5, block_size=1000)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-4)


def test_duplicates_have_zero_distance():
    X = np.repeat(np.arange(10, dtype=np.float32)[:, None], 3, axis=0)
    ind, dist = exact_knn(X, 2)
    assert (dist[:, 0] == 0).all()
    assert (ind != np.arange(30)[:, None]).all()


def test_nndescent_recall(digits):
    X = digits[0]
    ind, dist = nearest_neighbors_numpy(X, 15, "nndescent", random_state=0)
    assert ind.shape == (len(X), 15)
    assert (ind != np.arange(len(X))[:, None]).all()
    assert sample_recall(X, ind, n_samples=300) > 0.9


def test_descent_kernel_rule():
    from pumap_dask.knn import descent_kernel

    # one-shot in-memory search on 2 threads: the cached kernel until pynndescent's
    # parallel search repays its compile (about 1M rows of 50 features)
    assert descent_kernel(180_000, 50, 2, one_search=True) == "descent"
    assert descent_kernel(3_000_000, 50, 2, one_search=True) == "pynndescent"
    # many threads repay the compile sooner; more features cost more per row
    assert descent_kernel(800_000, 50, 32, one_search=True) == "pynndescent"
    assert descent_kernel(800_000, 50, 2, one_search=True) == "descent"
    assert descent_kernel(800_000, 784, 2, one_search=True) == "pynndescent"
    # partitions: both kernels use every thread
    assert descent_kernel(2_000_000, 50, 2, one_search=False) == "descent"
    assert descent_kernel(20_000_000, 50, 2, one_search=False) == "pynndescent"


def test_in_memory_nndescent_kernel_choice(monkeypatch):
    import pumap_dask.knn as knn

    X = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    used = []

    def spy(name):
        def search(X, k, **kw):
            used.append((name, kw))
            return knn.exact_knn(X, k, device="cpu")
        return search

    monkeypatch.setattr(knn, "descent_knn", spy("descent"))
    monkeypatch.setattr(knn, "nndescent_knn", spy("pynndescent"))
    nearest_neighbors_numpy(X, 5, "nndescent", random_state=0, n_trees=4)
    # an option only pynndescent takes selects it (its threads passed on)
    nearest_neighbors_numpy(X, 5, "nndescent", random_state=0, diversify_prob=0.5)
    assert used[0] == ("descent", {"random_state": 0, "metric": "euclidean", "n_trees": 4})
    assert used[1][0] == "pynndescent" and used[1][1]["diversify_prob"] == 0.5
    assert used[1][1]["n_jobs"] >= 1
    monkeypatch.setattr(knn, "PYNNDESCENT_COMPILE_S", 0.0)  # a large search: pynndescent
    nearest_neighbors_numpy(X, 5, "nndescent", random_state=0)
    assert used[2][0] == "pynndescent"


def test_too_few_samples():
    with pytest.raises(InputError, match="needs at least"):
        exact_knn(np.zeros((5, 2), np.float32), 5)


def test_precomputed_validation():
    ind = np.array([[1], [0]])
    dist = np.ones((2, 1))
    i, d = check_precomputed((ind, dist), 2, 1)
    assert i.dtype == np.int64
    with pytest.raises(InputError, match="own first neighbour"):
        check_precomputed((np.array([[0, 1], [1, 0]]), np.ones((2, 2))), 2, 1)
    with pytest.raises(InputError, match="at least"):
        check_precomputed((ind, dist), 2, 3)
    with pytest.raises(InputError, match="pair"):
        check_precomputed(ind, 2, 1)
