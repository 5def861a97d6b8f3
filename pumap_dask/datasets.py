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


# --------------------------------------------------------------------------- trajectory-rich data
# Issue 20: about twice cell_like's populations, of varied size and width, and a third of
# the cells on curved differentiation paths between pairs of nearby populations, each path
# cell labelled by the population it leaves (so a label follows the position along a path).
# Rows are drawn in fixed blocks of TRAJ_BLOCK_ROWS, each with its own seed, so a row
# depends only on (random_state, its index): never on n_samples or on the chunking.
TRAJ_LATENT_DIM = 10
TRAJ_N_POPULATIONS = 32
TRAJ_N_PATHS = 24
TRAJ_PATH_FRACTION = 1.0 / 3.0
TRAJ_BLOCK_ROWS = 8192
TRAJ_PATH_NOISE = 0.8
TRAJ_BOX = 3.5  # centres uniform in [-TRAJ_BOX, TRAJ_BOX]^L
TRAJ_WIDTHS = (0.7, 4.0)  # population widths, log-uniform in this range
TRAJ_INPUT_NOISE = 4.0  # scale of the per-feature technical noise in input space


def _trajectory_layout(n_features: int, random_state: int) -> dict:
    """Global layout of :func:`trajectory_like`, a function of the seed (and n_features)."""
    rng = np.random.default_rng([int(random_state), 0x7A1E])
    L, P, T = TRAJ_LATENT_DIM, TRAJ_N_POPULATIONS, TRAJ_N_PATHS
    centres = rng.uniform(-TRAJ_BOX, TRAJ_BOX, size=(P, L))
    # widths differing about 6-fold (log-uniform), each population anisotropic and rotated
    widths = np.exp(rng.uniform(np.log(TRAJ_WIDTHS[0]), np.log(TRAJ_WIDTHS[1]), size=P))
    spreads = widths[:, None] * np.geomspace(1.0, 0.3, L)[None, :]
    rot = np.stack([np.linalg.qr(rng.standard_normal((L, L)))[0] for _ in range(P)])
    w = rng.lognormal(0.0, 1.0, size=P)
    w = w / w.sum() * (1.0 - TRAJ_PATH_FRACTION)
    # paths: from a population to one of its 4 nearest others, a quadratic Bezier curve
    # whose control point is pushed off the chord (perpendicular) by 25-50% of its length
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    pairs: list[tuple[int, int]] = []
    starts = rng.permutation(P)
    while len(pairs) < T:
        a = int(starts[len(pairs) % P])
        near = np.argsort(dist[a])[:4]
        b = int(near[rng.integers(0, 4)])
        if (a, b) in pairs or (b, a) in pairs:
            b = int(next((c for c in near if (a, c) not in pairs and (c, a) not in pairs), b))
        pairs.append((a, b))
    ends = np.array(pairs, dtype=np.int64)
    chord = centres[ends[:, 1]] - centres[ends[:, 0]]
    off = rng.standard_normal((T, L))
    off -= (np.sum(off * chord, 1) / np.sum(chord * chord, 1))[:, None] * chord
    off *= (rng.uniform(0.25, 0.5, size=T) * np.linalg.norm(chord, axis=1)
            / np.linalg.norm(off, axis=1))[:, None]
    control = 0.5 * (centres[ends[:, 0]] + centres[ends[:, 1]]) + off
    tw = rng.uniform(0.5, 1.5, size=T)
    tw = tw / tw.sum() * TRAJ_PATH_FRACTION
    basis = rng.standard_normal((L, n_features)) / np.sqrt(L)
    scales = 6.0 * (1.0 + np.arange(n_features)) ** -0.9
    noise = TRAJ_INPUT_NOISE * (0.05 + 0.15 * (1.0 + np.arange(n_features)) ** -0.5)
    return {"centres": centres, "spreads": spreads, "rot": rot, "ends": ends,
            "control": control, "weights": np.concatenate([w, tw]),
            "map": basis * scales[None, :], "noise": noise}


def _trajectory_block(layout: dict, random_state: int, block: int):
    """All TRAJ_BLOCK_ROWS rows of one generation block: X, labels, path ids (-1: a
    population cell) and positions t along the path (NaN for population cells)."""
    rng = np.random.default_rng([int(random_state), int(block), 0x7A1E])
    n, L, P = TRAJ_BLOCK_ROWS, TRAJ_LATENT_DIM, TRAJ_N_POPULATIONS
    comp = rng.choice(len(layout["weights"]), size=n, p=layout["weights"])
    eps = rng.standard_normal((n, L))
    t = rng.uniform(0.0, 1.0, size=n)
    Z = np.empty((n, L))
    pop = comp < P
    ci = comp[pop]
    Z[pop] = layout["centres"][ci] + np.einsum("nl,nlm->nm", eps[pop] * layout["spreads"][ci],
                                               layout["rot"][ci])
    path = np.where(pop, -1, comp - P).astype(np.int64)
    on = ~pop
    j, tt = path[on], t[on][:, None]
    start = layout["centres"][layout["ends"][j, 0]]
    end = layout["centres"][layout["ends"][j, 1]]
    Z[on] = ((1 - tt) ** 2 * start + 2 * (1 - tt) * tt * layout["control"][j] + tt ** 2 * end
             + TRAJ_PATH_NOISE * eps[on])
    labels = np.where(pop, comp, layout["ends"][np.maximum(path, 0), 0]).astype(np.int64)
    X = Z @ layout["map"] + rng.standard_normal((n, layout["map"].shape[1])) * layout["noise"]
    return X.astype(np.float32), labels, path, np.where(pop, np.nan, t)


def _trajectory_rows(layout: dict, random_state: int, start: int, stop: int):
    """Rows ``start:stop``, from the generation blocks that cover them."""
    first, last = start // TRAJ_BLOCK_ROWS, (stop - 1) // TRAJ_BLOCK_ROWS
    parts = [_trajectory_block(layout, random_state, k) for k in range(first, last + 1)]
    lo = start - first * TRAJ_BLOCK_ROWS
    return tuple(np.concatenate([p[i] for p in parts])[lo:lo + stop - start] for i in range(4))


def _check_trajectory_args(n_samples: int, n_features: int, chunk_rows: int = 1) -> None:
    if n_samples < 1 or n_features < 1 or chunk_rows < 1:
        raise ParameterError("n_samples, n_features and chunk_rows must be positive")


def trajectory_like(
    n_samples: int, n_features: int = 50, random_state: int = 0, *,
    return_paths: bool = False,
) -> tuple[np.ndarray, ...]:
    """Trajectory-rich synthetic cells, in memory (issue 20's harder benchmark data).

    A latent space of :data:`TRAJ_LATENT_DIM` dimensions holds
    :data:`TRAJ_N_POPULATIONS` populations of log-normal sizes and widths differing about
    6-fold (anisotropic, rotated Gaussians, crowded so that neighbours overlap), and
    :data:`TRAJ_N_PATHS` differentiation paths,
    each from a population to one of its four nearest others: a quadratic Bezier curve
    bent off the chord by 25-50% of its length, with Gaussian noise of
    :data:`TRAJ_PATH_NOISE`. About a third of the cells (:data:`TRAJ_PATH_FRACTION`) lie on
    paths, at a uniform position along them, each labelled by the population its path
    leaves, so a label follows the position along a path. The latent rows are mapped
    linearly into ``n_features`` with scales decaying like a PCA spectrum, plus per-feature
    technical noise. Input-space 15-NN accuracy is about 0.86 (45k/5k rows), near the
    cell data that issue 20 measured on (0.866).

    Rows are generated in fixed blocks of :data:`TRAJ_BLOCK_ROWS`, each with its own seed
    ``(random_state, block index)``: row ``i`` is the same for every ``n_samples > i`` and
    equals :func:`write_trajectory_like_zarr`'s at any ``chunk_rows``.

    Parameters
    ----------
    n_samples, n_features
        Shape of the output.
    random_state
        Seed of the layout and of every block.
    return_paths
        Also return each row's path id (-1 for population cells) and position t in [0, 1]
        along it (NaN for population cells).

    Returns
    -------
    X : float32 array (n_samples, n_features)
    labels : int64 array (n_samples,)
        Population ids in ``[0, TRAJ_N_POPULATIONS)``; a path cell has its start's id.
    path : int64 array (n_samples,), only with ``return_paths``
    t : float64 array (n_samples,), only with ``return_paths``
    """
    _check_trajectory_args(n_samples, n_features)
    layout = _trajectory_layout(n_features, random_state)
    X, y, path, t = _trajectory_rows(layout, random_state, 0, n_samples)
    return (X, y, path, t) if return_paths else (X, y)


def trajectory_layout(n_features: int = 50, random_state: int = 0) -> dict[str, np.ndarray]:
    """The population centres and path end points of :func:`trajectory_like` in input space.

    Returns
    -------
    dict
        ``centres`` (TRAJ_N_POPULATIONS, n_features): the populations' centres mapped into
        input space; ``ends`` (TRAJ_N_PATHS, 2): each path's start and end population.
    """
    _check_trajectory_args(1, n_features)
    layout = _trajectory_layout(n_features, random_state)
    return {"centres": (layout["centres"] @ layout["map"]).astype(np.float32),
            "ends": layout["ends"].copy()}


def write_trajectory_like_zarr(
    path: str, n_samples: int, n_features: int = 50, chunk_rows: int = 100_000,
    random_state: int = 0, *, labels_path: str | None = None, overwrite: bool = True,
    start: int = 0,
):
    """Write :func:`trajectory_like` data to a Zarr array chunk by chunk, in bounded memory.

    One chunk of ``chunk_rows`` rows (plus at most two generation blocks) is in memory at a
    time, so any ``n_samples`` can be written; the rows equal :func:`trajectory_like`'s
    whatever ``chunk_rows`` is. The Zarr chunking is ``chunk_rows``.

    Parameters
    ----------
    path
        Where to create the Zarr (v3) array of shape (n_samples, n_features), float32.
    n_samples, n_features, random_state
        As in :func:`trajectory_like`.
    chunk_rows
        Rows per written chunk.
    labels_path
        If given, also write the int64 labels to a Zarr array there.
    overwrite
        Replace existing arrays at the paths.
    start
        Index of the first row written: rows ``start:start + n_samples`` of the same
        population (e.g. held-out queries beside a training set written from 0).

    Returns
    -------
    zarr.Array
    """
    _check_trajectory_args(n_samples, n_features, chunk_rows)
    if start < 0:
        raise ParameterError(f"start must be >= 0, got {start}")
    layout = _trajectory_layout(n_features, random_state)
    arr = zarr.create_array(path, shape=(n_samples, n_features), chunks=(chunk_rows, n_features),
                            dtype="float32", zarr_format=3, overwrite=overwrite)
    lab = None
    if labels_path is not None:
        lab = zarr.create_array(labels_path, shape=(n_samples,), chunks=(chunk_rows,),
                                dtype="int64", zarr_format=3, overwrite=overwrite)
    for _, a, b in _chunk_bounds(n_samples, chunk_rows):
        X, y, _, _ = _trajectory_rows(layout, random_state, start + a, start + b)
        arr[a:b] = X
        if lab is not None:
            lab[a:b] = y
    return arr
