"""Initial layouts the encoder is pre-trained to reproduce before UMAP training.

Starting the encoder from the graph's spectral layout (as UMAP starts its embedding) gives
it the global arrangement of the clusters; the UMAP loss then refines local structure.
Measured on MNIST (benchmarks/RESULTS.md) this lifts held-out kNN accuracy by several
points over a random start.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from .graph import fuzzy_simplicial_set
from .knn import nearest_neighbors_numpy

logger = logging.getLogger(__name__)

LAYOUT_SCALE = 10.0
# Rows of the spectral layout. Up to this many rows the full graph's spectral layout is
# used; above it, the layout of a kNN graph among this many sampled rows (landmarks), so the
# cost stays bounded at any n (benchmarks/init_scale.py measures both at 200k rows).
N_LANDMARKS = 20_000


def _rescale(layout: np.ndarray) -> np.ndarray:
    layout = layout - layout.mean(0)
    span = np.abs(layout).max()
    return (LAYOUT_SCALE * layout / (span if span > 0 else 1.0)).astype(np.float32)


def pca_layout(X: np.ndarray, n_components: int, max_rows: int = 20000,
               random_state: int | None = 0) -> np.ndarray:
    """Leading principal components of X, scaled to [-10, 10]."""
    rng = np.random.default_rng(random_state)
    n = X.shape[0]
    rows = np.sort(rng.choice(n, size=min(n, max_rows), replace=False))
    S = np.asarray(X[rows], dtype=np.float64)
    mean = S.mean(0)
    _, _, Vt = np.linalg.svd(S - mean, full_matrices=False)
    V = np.zeros((X.shape[1], n_components))
    p = min(n_components, Vt.shape[0])
    V[:, :p] = Vt[:p].T
    return _rescale((np.asarray(X, dtype=np.float64) - mean) @ V)


def spectral_layout(graph: sp.spmatrix, n_components: int, random_state: int | None = 0,
                    maxiter: int | None = None) -> np.ndarray | None:
    """Eigenvectors of the normalised graph Laplacian (skipping the trivial one).

    Returns None when the graph is disconnected or the eigensolver does not converge; the
    caller falls back to PCA.
    """

    n = graph.shape[0]
    if n <= n_components + 2:
        return None
    n_comp, _ = connected_components(graph, directed=False)
    if n_comp > 1:
        logger.info("graph has %d connected components; using the PCA layout", n_comp)
        return None
    return _connected_spectral(graph, n_components, random_state, maxiter)


def _connected_spectral(graph: sp.spmatrix, n_components: int, random_state: int | None,
                        maxiter: int | None = None) -> np.ndarray | None:
    """Spectral layout of a connected graph, or None when the eigensolver fails."""

    n = graph.shape[0]
    deg = np.asarray(graph.sum(axis=1)).ravel()
    dinv = sp.diags(1.0 / np.sqrt(np.maximum(deg, 1e-12)))
    A = (dinv @ graph @ dinv).tocsr()
    k = n_components + 1
    v0 = np.random.default_rng(random_state).uniform(size=n) + np.sqrt(deg)
    try:
        vals, vecs = eigsh(A, k=k, which="LA", tol=1e-4, v0=v0,
                           ncv=max(2 * k + 1, int(np.sqrt(n))), maxiter=maxiter or n * 5)
    except (ArpackNoConvergence, ValueError) as exc:
        logger.info("spectral layout failed (%s); using the PCA layout", exc)
        return None
    order = np.argsort(vals)[::-1]
    return _rescale(vecs[:, order[1:k]])


def landmark_rows(n: int, n_landmarks: int = N_LANDMARKS,
                  random_state: int | None = 0) -> np.ndarray:
    """Sorted row ids of a uniform sample of ``min(n, n_landmarks)`` rows."""
    if n <= n_landmarks:
        return np.arange(n)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(n, size=n_landmarks, replace=False))


def landmark_layout(X_landmarks: np.ndarray, n_components: int, n_neighbors: int = 15, *,
                    random_state: int | None = 0, device: str = "cpu",
                    set_op_mix_ratio: float = 1.0,
                    local_connectivity: float = 1.0,
                    metric: str = "euclidean") -> tuple[np.ndarray, str]:
    """Spectral layout of a sample of rows, from a fuzzy kNN graph among the sample itself.

    The spectral layout of a uniform sample approximates the global arrangement of the full
    data (as Nystrom methods rely on), at a cost set by the sample size, not by n. A
    disconnected sample graph gets the sample's PCA layout (a component-by-component layout
    measured no better: benchmarks/RESULTS.md).

    Parameters
    ----------
    X_landmarks
        (m, d) sampled rows, in memory.
    n_components
        Layout dimension.
    n_neighbors
        k of the sample's kNN graph.
    metric
        Its distance, ``"euclidean"`` or ``"cosine"``.

    Returns
    -------
    layout, method
        (m, n_components) float32 scaled to [-10, 10], and "spectral" or "pca".
    """

    X_landmarks = np.ascontiguousarray(X_landmarks, dtype=np.float32)
    k = min(n_neighbors, X_landmarks.shape[0] - 1)
    ind, dist = nearest_neighbors_numpy(X_landmarks, k, "auto", random_state=random_state,
                                        device=device, metric=metric)
    graph = fuzzy_simplicial_set(ind, dist, set_op_mix_ratio=set_op_mix_ratio,
                                 local_connectivity=local_connectivity)
    layout = spectral_layout(graph, n_components, random_state)
    if layout is None:
        return pca_layout(X_landmarks, n_components, random_state=random_state), "pca"
    return layout, "spectral"
