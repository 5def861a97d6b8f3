"""Graph stage: the fuzzy simplicial set of a kNN graph.

Row-local quantities (rho, sigma, directed memberships) are pure functions of a row block,
so they run unchanged inside ``map_blocks``; the symmetrisation is the only step that
mixes rows.

Conventions: the kNN given here excludes each point itself. umap-learn's
``fuzzy_simplicial_set`` counts the point as its own first neighbour, so our ``k``
neighbours correspond to umap-learn's ``n_neighbors = k + 1`` and the binary-search target
is ``log2(k + 1)``; given the same neighbours the two graphs agree (tested).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from .errors import InputError
from .params import check_graph_params

SMOOTH_K_TOLERANCE = 1e-5
MIN_K_DIST_SCALE = 1e-3


def smooth_knn_dist(
    distances: np.ndarray,
    *,
    local_connectivity: float = 1.0,
    tolerance: float = SMOOTH_K_TOLERANCE,
    n_iter: int = 64,
    mean_distance: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row rho and sigma, vectorised over rows.

    Parameters
    ----------
    distances
        (n, k) neighbour distances, self excluded, sorted ascending.
    local_connectivity
        Number of nearest neighbours assumed fully connected (may be fractional).
    tolerance
        Binary-search tolerance on the membership sum (the seed's ``bandwidth``).
    n_iter
        Binary-search iterations.
    mean_distance
        Global mean neighbour distance used as a floor for rows with rho == 0. Defaults to
        the mean of ``distances`` (with the implicit self column); pass the global value
        when processing one row block of a larger array.

    Returns
    -------
    sigma, rho
        float32 arrays of shape (n,).
    """
    d = np.asarray(distances, dtype=np.float64)
    n, k = d.shape
    target = np.log2(k + 1)
    # rho: distance to the local_connectivity-th non-zero neighbour (interpolated)
    nz = np.where(d > 0, d, np.inf)
    nz.sort(axis=1)
    n_nonzero = np.isfinite(nz).sum(1)
    index = int(np.floor(local_connectivity))
    interp = local_connectivity - index
    rho = np.zeros(n)
    enough = n_nonzero >= local_connectivity
    if index > 0:
        lo_val = nz[:, index - 1]
        rho_e = lo_val.copy()
        if interp > SMOOTH_K_TOLERANCE and index < k:
            rho_e = lo_val + interp * (nz[:, index] - lo_val)
    else:
        rho_e = interp * nz[:, 0]
    rho[enough] = rho_e[enough]
    few = ~enough & (n_nonzero > 0)
    if few.any():
        rho[few] = np.where(np.isfinite(nz[few]), nz[few], -np.inf).max(1)

    # sigma: binary search so that sum_j exp(-max(0, d_ij - rho_i) / sigma_i) = log2(k + 1)
    gap = np.maximum(d - rho[:, None], 0.0)
    lo = np.zeros(n)
    hi = np.full(n, np.inf)
    mid = np.ones(n)
    active = np.ones(n, dtype=bool)
    for _ in range(n_iter):
        if not active.any():
            break
        a = np.flatnonzero(active)
        g = gap[a]
        m = mid[a][:, None]
        psum = np.where(g > 0, np.exp(-g / m), 1.0).sum(1)
        done = np.abs(psum - target) < tolerance
        above = psum > target
        h, lw, md = hi[a], lo[a], mid[a]
        h = np.where(~done & above, md, h)
        lw = np.where(~done & ~above, md, lw)
        new_mid = np.where(np.isinf(h), md * 2.0, (lw + h) / 2.0)
        md = np.where(done, md, new_mid)
        hi[a], lo[a], mid[a] = h, lw, md
        active[a[done]] = False
    sigma = mid
    # floor sigma relative to the row's (or the global) mean distance, as umap-learn does;
    # means include the implicit zero self-distance
    row_mean = d.sum(1) / (k + 1)
    if mean_distance is None:
        mean_distance = float(d.sum() / (n * (k + 1))) if n else 0.0
    floor = np.where(rho > 0, MIN_K_DIST_SCALE * row_mean, MIN_K_DIST_SCALE * mean_distance)
    sigma = np.maximum(sigma, floor)
    return sigma.astype(np.float32), rho.astype(np.float32)


def membership_strengths(
    indices: np.ndarray, distances: np.ndarray, sigma: np.ndarray, rho: np.ndarray,
    row_offset: int = 0,
) -> np.ndarray:
    """Directed memberships ``exp(-max(0, d - rho) / sigma)``; 0 for self matches.

    ``row_offset`` is the global id of the block's first row, so that blocks of a larger
    array recognise self matches.
    """
    d = distances.astype(np.float32)
    gap = d - rho[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = np.exp(-(gap / sigma[:, None]))
    w = np.where((gap <= 0) | (sigma[:, None] == 0), 1.0, w).astype(np.float32)
    rows = np.arange(indices.shape[0], dtype=np.int64)[:, None] + row_offset
    w[indices == rows] = 0.0
    return w


def symmetrize(directed: sp.spmatrix, set_op_mix_ratio: float = 1.0) -> sp.csr_matrix:
    """Fuzzy union/intersection mix: ``mix*(W + W^T - W*W^T) + (1-mix)*(W*W^T)``."""
    W = directed.tocsr()
    return fuzzy_set_union(W, W.T.tocsr(), set_op_mix_ratio)


def fuzzy_set_union(W: sp.csr_matrix, Wt: sp.csr_matrix,
                    set_op_mix_ratio: float = 1.0) -> sp.csr_matrix:
    """``mix*(W + Wt - W*Wt) + (1-mix)*(W*Wt)`` of two same-shape matrices, zeros removed.

    ``W`` holds some rows of a directed graph and ``Wt`` the same rows of its transpose:
    the whole matrices in :func:`symmetrize`, one row block of each in
    :mod:`pumap_dask.distributed.graph_dask` (so both paths give the same weights).
    """
    prod = W.multiply(Wt)
    G = set_op_mix_ratio * (W + Wt - prod) + (1.0 - set_op_mix_ratio) * prod
    G = sp.csr_matrix(G)
    G.eliminate_zeros()
    return G


def fuzzy_simplicial_set(
    indices: np.ndarray,
    distances: np.ndarray,
    *,
    set_op_mix_ratio: float = 1.0,
    local_connectivity: float = 1.0,
    tolerance: float = SMOOTH_K_TOLERANCE,
) -> sp.csr_matrix:
    """The symmetric fuzzy graph of a kNN (self excluded), as an (n, n) CSR matrix.

    Parameters
    ----------
    indices, distances
        (n, k) kNN arrays, self excluded, sorted by distance.
    set_op_mix_ratio
        1.0 is the fuzzy union (UMAP's default), 0.0 the fuzzy intersection.
    local_connectivity, tolerance
        See :func:`smooth_knn_dist`.

    Returns
    -------
    scipy.sparse.csr_matrix
        Symmetric, weights in (0, 1], no self loops.
    """

    check_graph_params(set_op_mix_ratio, local_connectivity, tolerance)
    n, k = indices.shape
    sigma, rho = smooth_knn_dist(distances, local_connectivity=local_connectivity,
                                 tolerance=tolerance)
    w = membership_strengths(indices, distances, sigma, rho)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    directed = sp.coo_matrix((w.ravel(), (rows, indices.ravel())), shape=(n, n))
    directed.sum_duplicates()
    return symmetrize(directed, set_op_mix_ratio)


def graph_to_edges(
    graph: sp.spmatrix, n_epochs: int | None = None, min_weight_ratio: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge list (head, tail, weight) of a graph, pruned as UMAP prunes.

    Edges with weight below ``max(w) / n_epochs`` are dropped (or below
    ``max(w) * min_weight_ratio`` when given), since they would never be sampled.
    """
    coo = graph.tocoo()
    w = coo.data.astype(np.float32)
    thresh = 0.0
    if min_weight_ratio is not None:
        thresh = w.max(initial=0.0) * min_weight_ratio
    elif n_epochs:
        thresh = w.max(initial=0.0) / float(n_epochs)
    keep = w >= thresh if thresh > 0 else w > 0
    return coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), w[keep]


# ----------------------------------------------------------------------- labels (semi-supervised)
UNKNOWN_LABEL_DIST = 1.0
# How the label-weighted, row-rescaled rows A are combined with their transpose: the mean
# (A + A^T) / 2, i.e. :func:`fuzzy_set_union` with this mix. umap-learn takes the fuzzy
# union A + A^T - A * A^T, which on a graph that is already symmetric inflates every weight
# w to 2w - w^2: weak (often between-class) edges of the unlabelled rows double while
# strong ones stay, and the unlabelled rows drift away from the labelled rows of their
# class (issue 19, benchmarks/RESULTS.md). The mean leaves edges between unlabelled rows
# exactly as they were (no labels known: the graph itself).
LABEL_SET_OP_MIX = 0.5


def far_label_distance(target_weight: float) -> float:
    """Distance between different labels for a ``target_weight`` in [0, 1] (umap-learn's
    rule: ``2.5 / (1 - target_weight)``, effectively infinite at 1)."""
    return 2.5 / (1.0 - target_weight) if target_weight < 1.0 else 1e12


def label_codes(y: np.ndarray) -> np.ndarray:
    """Integer codes of a label vector; -1 marks unknown labels.

    Integer labels keep -1 as unknown; float labels treat -1 and NaN as unknown; other
    labels (strings, ...) are all known.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError(f"y must be a 1-d vector of labels, got shape {y.shape}")
    unknown = np.zeros(y.shape, dtype=bool)
    if y.dtype.kind in "iub":
        unknown = y == -1
    elif y.dtype.kind == "f":
        unknown = np.isnan(y) | (y == -1)
    codes = np.full(y.shape, -1, dtype=np.int64)
    if (~unknown).any():
        _, inv = np.unique(y[~unknown], return_inverse=True)
        codes[~unknown] = inv
    return codes


def categorical_intersection(
    graph: sp.spmatrix, y: np.ndarray, target_weight: float = 0.5, *,
    unknown_dist: float = UNKNOWN_LABEL_DIST,
) -> sp.csr_matrix:
    """Mix categorical labels into a fuzzy graph (semi-supervised UMAP).

    The label distances of umap-learn's categorical target with ``target_weight``: each
    edge weight is multiplied by ``exp(-unknown_dist)`` when either end has an unknown
    label, by ``exp(-far_dist)`` when the labels differ (:func:`far_label_distance`), and
    kept when they agree; each row is then rescaled so its largest weight is 1 (every point
    keeps full confidence in one neighbour), as umap-learn's
    ``discrete_metric_simplicial_set_intersection`` does. Unlike umap-learn, the rescaled
    rows ``A`` are symmetrised by their mean ``(A + A^T) / 2`` (:data:`LABEL_SET_OP_MIX`),
    not the fuzzy union ``A + A^T - A * A^T``: the input graph is symmetric already, so
    edges between unlabelled rows keep their weights, and unknown labels change nothing
    (partial labels do not pull the unlabelled rows away from their class).

    The first two steps are row local (:func:`label_rows`): a partitioned fit runs them per
    row block on the workers and combines ``A`` with ``A^T`` across blocks
    (:func:`pumap_dask.distributed.graph_dask.build_edge_store` with ``y``), with the same result.

    Parameters
    ----------
    graph
        Symmetric fuzzy graph (n, n).
    y
        (n,) labels; -1 (or NaN for float labels) is unknown. See :func:`label_codes`.
    target_weight
        In [0, 1]: 0 lets labels barely matter (far_dist 2.5), 1 cuts edges between
        different labels.
    unknown_dist
        Label distance of an unknown label to any point.

    Returns
    -------
    scipy.sparse.csr_matrix
        Symmetric, weights in (0, 1], no explicit zeros.
    """
    codes = label_codes(y)
    if codes.shape[0] != graph.shape[0]:
        raise InputError(f"y has {codes.shape[0]} labels for a graph of {graph.shape[0]} "
                         "points")
    A = label_rows(sp.csr_matrix(graph), codes, target_weight, unknown_dist=unknown_dist)
    return symmetrize(A, LABEL_SET_OP_MIX)


def label_rows(
    rows: sp.spmatrix, codes: np.ndarray, target_weight: float = 0.5, *, row_offset: int = 0,
    unknown_dist: float = UNKNOWN_LABEL_DIST,
) -> sp.csr_matrix:
    """The row-local half of :func:`categorical_intersection`: label factors and row rescale.

    Each weight is multiplied by its label factor and each row rescaled to a maximum of 1;
    the mean of the result and its transpose is the labelled graph. Rows are
    independent, so a row block of the graph gives the same rows as the whole graph
    (:func:`pumap_dask.distributed.graph_dask.build_edge_store` runs this per block on the workers).

    Parameters
    ----------
    rows
        Rows ``[row_offset, row_offset + m)`` of the symmetric fuzzy graph, shape (m, n).
    codes
        (n,) label codes of all points (:func:`label_codes`; -1: unknown).
    target_weight, unknown_dist
        As in :func:`categorical_intersection`.
    row_offset
        Global id of the first row.

    Returns
    -------
    scipy.sparse.csr_matrix
        (m, n) float32, each non-empty row with maximum 1, no explicit zeros; not symmetric.
    """
    coo = sp.coo_matrix(rows)
    ci, cj = codes[coo.row.astype(np.int64) + row_offset], codes[coo.col]
    unknown = (ci < 0) | (cj < 0)
    factor = np.where(unknown, np.exp(-unknown_dist),
                      np.where(ci != cj, np.exp(-far_label_distance(target_weight)), 1.0))
    w = (coo.data * factor).astype(np.float32)
    A = sp.csr_matrix((w, (coo.row, coo.col)), shape=coo.shape)
    A.eliminate_zeros()
    row_max = np.asarray(A.max(axis=1).todense()).ravel()
    scale = np.divide(1.0, row_max, out=np.zeros_like(row_max, dtype=np.float64),
                      where=row_max > 0)
    return sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ A)


# ----------------------------------------------------------------------- precomputed graphs
GRAPH_SYMMETRY_TOL = 1e-5


def check_precomputed_graph(graph, n: int) -> sp.csr_matrix:
    """Validate a user-supplied fuzzy graph and return it as canonical CSR (float32).

    The graph must be a ``scipy.sparse`` (n, n) matrix, symmetric (to
    :data:`GRAPH_SYMMETRY_TOL`), with finite weights in (0, 1] and at least one edge, as
    :func:`fuzzy_simplicial_set` (or umap-learn's ``graph_``) returns. Explicitly stored
    zeros are dropped; self loops (diagonal entries) are dropped with a warning, since
    UMAP's graphs have none.

    Parameters
    ----------
    graph
        The fuzzy graph.
    n
        Rows of X.

    Returns
    -------
    scipy.sparse.csr_matrix
        float32, sorted indices, no zeros, no self loops.

    Raises
    ------
    InputError
        Naming what is wrong.
    """

    if not sp.issparse(graph):
        raise InputError("graph must be a scipy.sparse matrix (n, n) such as "
                         "pumap_dask.fuzzy_simplicial_set's or umap-learn's graph_, got "
                         f"{type(graph).__name__}")
    if graph.ndim != 2 or graph.shape != (n, n):
        raise InputError(f"graph must have shape ({n}, {n}) (one row and column per row of X), "
                         f"got {graph.shape}")
    G = sp.csr_matrix(graph, dtype=np.float32, copy=True)
    G.sum_duplicates()
    if not np.isfinite(G.data).all():
        raise InputError("graph weights must be finite (found NaN or inf)")
    if (G.data < 0).any() or (G.data > 1).any():
        lo, hi = float(G.data.min()), float(G.data.max())
        raise InputError(f"graph weights must lie in (0, 1] (fuzzy memberships), found values "
                         f"in [{lo:g}, {hi:g}]")
    G.eliminate_zeros()
    diag = G.diagonal()
    if diag.any():
        logging.getLogger(__name__).warning(
            "graph has %d self loops (diagonal entries); dropped", int((diag != 0).sum()))
        G.setdiag(0)
        G.eliminate_zeros()
    if G.nnz == 0:
        raise InputError("graph has no edges (off the diagonal); nothing to train on")
    asym = abs(G - G.T)
    if asym.nnz and asym.max() > GRAPH_SYMMETRY_TOL:
        raise InputError(f"graph must be symmetric (largest |G - G.T| is {asym.max():.3g}); "
                         "symmetrise it first, e.g. the fuzzy union G + G.T - G.multiply(G.T)")
    G.sort_indices()
    return G
