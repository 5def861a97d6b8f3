import numpy as np

from pumap_dask.datasets import clusters, train_test_split


def test_clusters_recipe():
    X, y = clusters()
    assert X.shape == (1500, 32) and X.dtype == np.float32
    assert y.shape == (1500,) and set(np.unique(y)) <= set(range(10))
    assert len(np.unique(y)) == 10
    X2, y2 = clusters()
    np.testing.assert_array_equal(X, X2)
    # points sit near their cluster's centre: within-cluster spread below between-cluster
    centres = np.stack([X[y == c].mean(0) for c in range(10)])
    within = np.mean([np.linalg.norm(X[y == c] - centres[c], axis=1).mean() for c in range(10)])
    between = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(10, 1)]
    assert within < between.mean()


def test_split():
    X, y = clusters(100, 4, 3)
    Xtr, Xte, ytr, yte = train_test_split(X, y)
    assert len(Xtr) == 70 and len(Xte) == 30
