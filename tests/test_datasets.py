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


def test_trajectory_like_shapes_labels_and_determinism():
    from pumap_dask.datasets import TRAJ_N_POPULATIONS, trajectory_like

    X, y = trajectory_like(20000, n_features=30, random_state=3)
    assert X.shape == (20000, 30) and X.dtype == np.float32 and y.dtype == np.int64
    assert np.isfinite(X).all()
    assert set(np.unique(y)) == set(range(TRAJ_N_POPULATIONS))
    X2, y2 = trajectory_like(20000, n_features=30, random_state=3)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    X3, _ = trajectory_like(20000, n_features=30, random_state=4)
    assert not np.allclose(X3, X)
    # a row does not depend on n_samples
    X4, y4 = trajectory_like(5000, n_features=30, random_state=3)
    np.testing.assert_array_equal(X4, X[:5000])
    np.testing.assert_array_equal(y4, y[:5000])
    # populations of varied size and width
    _, _, path, _ = trajectory_like(20000, n_features=30, random_state=3, return_paths=True)
    pop = path < 0
    sizes = np.bincount(y[pop])
    assert sizes.max() > 5 * sizes.min()
    widths = np.array([X[pop & (y == c)].std(0).mean() for c in range(TRAJ_N_POPULATIONS)])
    assert widths.max() > 3 * widths.min()


def test_trajectory_like_paths_lie_between_their_ends():
    from pumap_dask.datasets import TRAJ_N_PATHS, trajectory_layout, trajectory_like

    X, y, path, t = trajectory_like(30000, random_state=1, return_paths=True)
    on = path >= 0
    assert 0.28 < on.mean() < 0.39  # about a third of the cells on paths
    assert np.isnan(t[~on]).all() and ((t[on] >= 0) & (t[on] <= 1)).all()
    lay = trajectory_layout(random_state=1)
    centres, ends = lay["centres"], lay["ends"]
    assert set(np.unique(path[on])) == set(range(TRAJ_N_PATHS))
    bend = []
    # each path cell is labelled by the population its path leaves
    np.testing.assert_array_equal(y[on], ends[path[on], 0])
    for j in range(TRAJ_N_PATHS):
        sel = path == j
        a, b = centres[ends[j, 0]], centres[ends[j, 1]]
        s = (X[sel] - a) @ (b - a) / np.dot(b - a, b - a)  # position along the chord
        assert -0.3 < np.median(s[t[sel] < 0.1]) < 0.3  # starts at its start's centre
        assert 0.7 < np.median(s[t[sel] > 0.9]) < 1.3  # ... and ends at its end's
        # the middle of the path is away from both ends, yet not far beyond them
        d_a, d_b = np.linalg.norm(X[sel] - a, axis=1), np.linalg.norm(X[sel] - b, axis=1)
        first, mid, last = t[sel] < 0.2, np.abs(t[sel] - 0.5) < 0.1, t[sel] > 0.8
        assert np.median(d_a[mid]) > np.median(d_a[first])
        assert np.median(d_b[mid]) > np.median(d_b[last])
        assert np.median(np.maximum(d_a, d_b)[mid]) < 1.5 * np.linalg.norm(b - a)
        centre = X[sel][np.abs(t[sel] - 0.5) < 0.05].mean(0)
        bend.append(np.linalg.norm(centre - 0.5 * (a + b)) / np.linalg.norm(b - a))
    # curved: on most paths the middle lies off the straight chord (the linear map into
    # input space flattens some bends)
    assert np.mean(np.array(bend) > 0.1) > 0.5


def test_trajectory_like_zarr_is_chunk_independent(tmp_path):
    import zarr

    from pumap_dask.datasets import TRAJ_BLOCK_ROWS, trajectory_like, write_trajectory_like_zarr

    n = 2 * TRAJ_BLOCK_ROWS + 1234
    X, y = trajectory_like(n, n_features=12, random_state=7)
    for chunk_rows in (1000, 5000, n + 10):
        arr = write_trajectory_like_zarr(str(tmp_path / f"x{chunk_rows}.zarr"), n,
                                         n_features=12, chunk_rows=chunk_rows, random_state=7,
                                         labels_path=str(tmp_path / f"y{chunk_rows}.zarr"))
        assert arr.chunks == (min(chunk_rows, n + 10), 12) and arr.dtype == np.float32
        np.testing.assert_array_equal(arr[:], X)
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / f"y{chunk_rows}.zarr"))[:],
                                      y)
    # rows from an offset: the same rows as the whole set's tail (held-out queries)
    tail = write_trajectory_like_zarr(str(tmp_path / "tail.zarr"), n - 7000, n_features=12,
                                      chunk_rows=3000, random_state=7, start=7000)
    np.testing.assert_array_equal(tail[:], X[7000:])


def test_trajectory_like_rejects_bad_sizes():
    import pytest

    from pumap_dask.datasets import trajectory_like, write_trajectory_like_zarr
    from pumap_dask.errors import ParameterError

    with pytest.raises(ParameterError):
        trajectory_like(0)
    with pytest.raises(ParameterError):
        write_trajectory_like_zarr("unused.zarr", 10, chunk_rows=0)
