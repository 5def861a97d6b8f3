"""The package's NN-descent kernel (the partitions' search): recall, determinism, options,
and its compiled code reused from numba's disk cache by a fresh process."""

import os
import subprocess
import sys

import numpy as np
import pytest

import dask
import dask.array as da

from pumap_dask.datasets import trajectory_like
from pumap_dask.errors import ParameterError
from pumap_dask.knn import descent_knn, exact_knn, knn_recall
from pumap_dask.distributed.knn_dask import nearest_neighbors
from pumap_dask.nndescent import nn_descent

K = 15


@pytest.fixture(scope="module")
def rows():
    X, _ = trajectory_like(4000, n_features=20, random_state=3)
    return X.astype(np.float32)


def test_recall_order_and_distances(rows):
    ind, dist = nn_descent(rows, K, random_state=0)
    assert ind.shape == dist.shape == (len(rows), K)
    assert ind.dtype == np.int64 and dist.dtype == np.float32
    assert (ind != np.arange(len(rows))[:, None]).all()  # self excluded
    assert all(len(np.unique(r)) == K for r in ind)
    assert (np.diff(dist, axis=1) >= 0).all()
    direct = np.linalg.norm(rows[:, None, :] - rows[ind], axis=2)
    np.testing.assert_allclose(dist, direct, rtol=1e-4, atol=1e-4)
    exact, _ = exact_knn(rows, K, device="cpu")
    assert knn_recall(ind, exact) >= 0.98


def test_deterministic_per_seed(rows):
    a = nn_descent(rows, K, random_state=7)
    b = nn_descent(rows, K, random_state=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_duplicate_rows_and_tiny_input():
    X = np.repeat(np.arange(30, dtype=np.float32)[:, None], 2, axis=0)  # every row twice
    ind, dist = nn_descent(X, 3, random_state=0)
    assert (ind != np.arange(len(X))[:, None]).all() and (dist[:, 0] == 0).all()
    with pytest.raises(ValueError, match="more than k=5"):
        nn_descent(X[:5], 5)


def test_cosine_through_descent_knn(rows):
    ind, dist = descent_knn(rows, K, random_state=0, metric="cosine")
    exact, exact_d = exact_knn(rows, K, device="cpu", metric="cosine")
    assert knn_recall(ind, exact) >= 0.98
    assert dist.min() >= 0 and dist.max() <= 2


def test_unknown_options_are_refused_before_any_work(rows):
    with pytest.raises(ParameterError, match="n_trees"):
        descent_knn(rows, K, diversify_prob=0.5)
    dX = da.from_array(rows, chunks=(1000, 20))
    with dask.config.set(scheduler="sync"):
        with pytest.raises(ParameterError, match="not options of the partitions"):
            nearest_neighbors(dX, K, "partitioned", n_partitions=2, method_kwds={"delta": 0.1})


_CHILD = """
import numpy as np
from pumap_dask.arrays import host_kernel
from pumap_dask.nndescent import _descent, nn_descent
nn_descent(np.random.default_rng(0).normal(size=(300, 5)), 5, random_state=0)
print(host_kernel(_descent, reassociate=True).stats.cache_hits.__len__() > 0
      and sum(host_kernel(_descent, reassociate=True).stats.cache_hits.values()))
"""


def test_a_fresh_process_loads_the_kernel_from_the_disk_cache(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}

    def child() -> str:
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    assert child() == "False"  # compiled: nothing cached yet
    assert int(child()) >= 1  # the second process compiles nothing
