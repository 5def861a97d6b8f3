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


def test_cell_like_matches_zarr(tmp_path):
    import zarr

    from pumap_dask.datasets import cell_like, write_cell_like_zarr

    X, y = cell_like(2500, n_features=20, random_state=5, chunk_rows=1000)
    assert X.shape == (2500, 20) and X.dtype == np.float32 and y.dtype == np.int64
    arr = write_cell_like_zarr(str(tmp_path / "x.zarr"), 2500, n_features=20, chunk_rows=1000,
                               random_state=5, labels_path=str(tmp_path / "y.zarr"))
    assert arr.chunks == (1000, 20)
    np.testing.assert_array_equal(arr[:], X)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "y.zarr"))[:], y)
    # complete chunks reproduce: chunk seeds do not depend on n_samples
    X2, _ = cell_like(1500, n_features=20, random_state=5, chunk_rows=1000)
    np.testing.assert_array_equal(X2[:1000], X[:1000])
    X3, _ = cell_like(1500, n_features=20, random_state=6, chunk_rows=1000)
    assert not np.allclose(X3, X2)


def test_cell_like_is_pca_like():
    from pumap_dask.datasets import cell_like

    X, y = cell_like(20000, random_state=0)
    var = X.var(0)
    assert var[:5].sum() > 0.5 * var.sum()  # variance concentrated in leading components
    sizes = np.bincount(y)
    assert sizes.max() > 20 * sizes[sizes > 0].min()  # very different population sizes
