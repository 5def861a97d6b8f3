"""Synthetic data: the seed's generators and a cell-like generator for scale runs."""

from __future__ import annotations

import numpy as np
import zarr

from .errors import ParameterError


def clusters(
    n_samples: int = 1500,
    n_features: int = 32,
    n_clusters: int = 10,
    random_state: int | None = 42,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters of varied size and spread (the seed's ``type = "cluster"``).

    Each cluster has a centre uniform in [-7.5, 7.5)^d and a standard deviation uniform in
    [0.5, 2.5); its size follows a weight uniform in [0.5, 2.5)
    (``floor(n * w / (n_clusters * 1.25))`` points), topped up with random labels,
    shuffled and truncated to ``n_samples``.

    Returns
    -------
    X : float32 array (n_samples, n_features)
    labels : int64 array (n_samples,)
    """
    if n_samples < 1 or n_features < 1 or n_clusters < 1:
        raise ParameterError("n_samples, n_features and n_clusters must be positive")
    rng = np.random.default_rng(random_state)
    centres = rng.uniform(-7.5, 7.5, size=(n_clusters, n_features))
    sds = rng.uniform(0.5, 2.5, size=n_clusters)
    weights = rng.uniform(0.5, 2.5, size=n_clusters)
    sizes = np.floor(n_samples * weights / (n_clusters * 1.25)).astype(np.int64)
    labels = np.repeat(np.arange(n_clusters), sizes)
    short = n_samples - labels.size
    if short > 0:
        labels = np.concatenate([labels, rng.integers(0, n_clusters, size=short)])
    labels = rng.permutation(labels)[:n_samples]
    X = centres[labels] + sds[labels, None] * rng.standard_normal((n_samples, n_features))
    return X.astype(np.float32), labels.astype(np.int64)


def train_test_split(X: np.ndarray, labels: np.ndarray, train_fraction: float = 0.7,
                     random_state: int | None = 42):
    """Random split as in the vignette: ``floor(train_fraction * n)`` rows for training."""
    rng = np.random.default_rng(random_state)
    n = X.shape[0]
    idx = rng.permutation(n)
    n_train = int(np.floor(train_fraction * n))
    tr, te = np.sort(idx[:n_train]), np.sort(idx[n_train:])
    return X[tr], X[te], labels[tr], labels[te]


# --------------------------------------------------------------------------- cell-like data
# Latent layout: a few dimensions holding discrete populations of very different sizes
# (some rare) and branching trajectories between some of them. It is mapped linearly into
# n_features with per-component scales decaying like a PCA spectrum, plus small noise.
CELL_LATENT_DIM = 8
CELL_N_CLUSTERS = 12
CELL_N_TRAJECTORIES = 3
CELL_TRAJECTORY_FRACTION = 0.25


def _cell_layout(n_features: int, random_state: int) -> dict:
    """Global layout parameters, a function of the seed (and n_features) only."""
    rng = np.random.default_rng([int(random_state), 0x5EED])
    L, C, T = CELL_LATENT_DIM, CELL_N_CLUSTERS, CELL_N_TRAJECTORIES
    centres = rng.uniform(-10.0, 10.0, size=(C, L))
    # anisotropic spreads: each population varies mostly along a few latent directions
    spreads = rng.uniform(0.3, 1.2, size=(C, 1)) * np.geomspace(1.0, 0.15, L)[None, :]
    rot = np.stack([np.linalg.qr(rng.standard_normal((L, L)))[0] for _ in range(C)])
    # very different population sizes (log-normal weights), the last two rare (~0.3%)
    w = rng.lognormal(0.0, 1.2, size=C)
    w[-2:] = 0.0
    w = w / w.sum() * (1.0 - CELL_TRAJECTORY_FRACTION - 0.006)
    w[-2:] = 0.003
    # trajectories: start population -> branch point -> two end populations
    traj = []
    for _ in range(T):
        a, b, c = rng.choice(C - 2, size=3, replace=False)
        branch = 0.5 * (centres[a] + 0.5 * (centres[b] + centres[c])) + rng.normal(0, 2.0, L)
        traj.append((centres[a], branch, centres[b], centres[c]))
    tw = rng.uniform(0.5, 1.5, size=T)
    tw = tw / tw.sum() * CELL_TRAJECTORY_FRACTION
    # linear map into n_features with a decaying (PCA-like) spectrum
    basis = rng.standard_normal((L, n_features)) / np.sqrt(L)
    scales = 6.0 * (1.0 + np.arange(n_features)) ** -0.9
    noise = 0.05 + 0.15 * (1.0 + np.arange(n_features)) ** -0.5
    return dict(centres=centres, spreads=spreads, rot=rot, traj=traj,
                weights=np.concatenate([w, tw]), map=basis * scales[None, :], noise=noise)


def _cell_chunk(layout: dict, n_rows: int, random_state: int, chunk_index: int):
    """Rows of one chunk, drawn with the chunk's own seed."""
    rng = np.random.default_rng([int(random_state), int(chunk_index)])
    C = len(layout["centres"])
    comp = rng.choice(len(layout["weights"]), size=n_rows, p=layout["weights"])
    Z = np.empty((n_rows, CELL_LATENT_DIM))
    is_cl = comp < C
    ci = comp[is_cl]
    eps = rng.standard_normal((ci.size, CELL_LATENT_DIM)) * layout["spreads"][ci]
    Z[is_cl] = layout["centres"][ci] + np.einsum("nl,nlm->nm", eps, layout["rot"][ci])
    labels = comp.astype(np.int64)
    tr_rows = np.flatnonzero(~is_cl)
    if tr_rows.size:
        t = rng.uniform(0.0, 1.0, size=tr_rows.size)
        arm = rng.integers(0, 2, size=tr_rows.size)
        for j, (start, branch, end_b, end_c) in enumerate(layout["traj"]):
            sel = comp[tr_rows] == C + j
            tt, aa = t[sel][:, None], arm[sel][:, None]
            # first half: start -> branch; second half: branch -> one of the two ends
            first = start + (branch - start) * np.minimum(tt * 2, 1.0)
            end = np.where(aa == 0, end_b, end_c)
            pos = np.where(tt < 0.5, first, branch + (end - branch) * (tt * 2 - 1.0))
            Z[tr_rows[sel]] = pos + rng.normal(0.0, 0.25, size=pos.shape)
            labels[tr_rows[sel]] = C + 2 * j + arm[sel]
    X = Z @ layout["map"] + rng.standard_normal((n_rows, layout["map"].shape[1])) * layout["noise"]
    return X.astype(np.float32), labels


def _chunk_bounds(n_samples: int, chunk_rows: int):
    for c, start in enumerate(range(0, n_samples, chunk_rows)):
        yield c, start, min(start + chunk_rows, n_samples)


def cell_like(
    n_samples: int, n_features: int = 50, random_state: int = 0, *, chunk_rows: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic data shaped like PCA scores of single cells, in memory.

    A latent layout of ``CELL_LATENT_DIM`` dimensions holds ``CELL_N_CLUSTERS`` populations
    of very different sizes (two of them rare, 0.3% each) and ``CELL_N_TRAJECTORIES``
    branching trajectories (start population -> branch point -> two end populations). It is
    mapped linearly into ``n_features`` with per-component scales decaying like a PCA
    spectrum, and small noise is added. Rows are generated in chunks of ``chunk_rows``, each
    with its own seed ``(random_state, chunk index)``; the layout depends on
    ``random_state`` only, so the result equals :func:`write_cell_like_zarr` read back.

    Parameters
    ----------
    n_samples, n_features
        Shape of the output.
    random_state
        Seed of the layout and of every chunk.
    chunk_rows
        Rows per generation chunk (changing it changes the rows drawn, not the layout).

    Returns
    -------
    X : float32 array (n_samples, n_features)
    labels : int64 array (n_samples,)
        Population ids; trajectory arms get their own ids after the clusters'.
    """
    if n_samples < 1 or n_features < 1 or chunk_rows < 1:
        raise ParameterError("n_samples, n_features and chunk_rows must be positive")
    layout = _cell_layout(n_features, random_state)
    parts = [_cell_chunk(layout, b - a, random_state, c)
             for c, a, b in _chunk_bounds(n_samples, chunk_rows)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_cell_like_zarr(
    path: str, n_samples: int, n_features: int = 50, chunk_rows: int = 100_000,
    random_state: int = 0, *, labels_path: str | None = None, overwrite: bool = True,
):
    """Write :func:`cell_like` data to a Zarr array chunk by chunk, in bounded memory.

    Only one chunk of ``chunk_rows`` rows is in memory at a time, so any ``n_samples``
    (10M included) can be written. The Zarr chunking equals the generation chunking.

    Parameters
    ----------
    path
        Where to create the Zarr (v3) array of shape (n_samples, n_features), float32.
    n_samples, n_features, chunk_rows, random_state
        As in :func:`cell_like`.
    labels_path
        If given, also write the int64 population labels to a Zarr array there.
    overwrite
        Replace existing arrays at the paths.

    Returns
    -------
    zarr.Array
    """

    if n_samples < 1 or n_features < 1 or chunk_rows < 1:
        raise ParameterError("n_samples, n_features and chunk_rows must be positive")
    layout = _cell_layout(n_features, random_state)
    arr = zarr.create_array(path, shape=(n_samples, n_features), chunks=(chunk_rows, n_features),
                            dtype="float32", zarr_format=3, overwrite=overwrite)
    lab = None
    if labels_path is not None:
        lab = zarr.create_array(labels_path, shape=(n_samples,), chunks=(chunk_rows,),
                                dtype="int64", zarr_format=3, overwrite=overwrite)
    for c, a, b in _chunk_bounds(n_samples, chunk_rows):
        X, y = _cell_chunk(layout, b - a, random_state, c)
        arr[a:b] = X
        if lab is not None:
            lab[a:b] = y
    return arr
