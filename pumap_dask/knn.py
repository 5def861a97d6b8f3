"""kNN stage: back-ends behind one small interface.

Every back-end returns ``(indices, distances)``: int64 and float32 arrays of shape
``(n, k)``, sorted ascending, the point itself excluded. Distances are Euclidean, or with
``metric="cosine"`` cosine distances ``1 - cos(x, y)`` in [0, 2].

Zero-norm rows under the cosine metric have no direction: they are defined to lie at
distance 1 from every row, other zero rows included (as scikit-learn's
``cosine_distances``), so their neighbours are arbitrary rows at distance 1 and they never
outrank a row with positive cosine similarity.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
import torch

from .errors import InputError, ParameterError
from .nndescent import nn_descent
from .params import METRICS, positive_int, resolve_device

logger = logging.getLogger(__name__)


# HNSW defaults (usearch's connectivity, expansion_add, expansion_search). Measured
# recall@15 (all rows, one thread): MNIST test set 0.9993, cell-like 20k x 50 0.9994 (as
# hnswlib with the same settings); ef_construction 200 gained nothing over 100 and cost up
# to twice the build time. ``ef`` is raised to at least 2 (k + 1). See
# benchmarks/knn_backends.py and benchmarks/RESULTS.md (issue 19).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 100
HNSW_EF = 64
HNSW_EXTRA = "pumap_dask[hnsw]"
# options each back-end accepts (``knn_kwds``); nndescent takes pynndescent's arguments
BACKEND_KWDS = {"exact": ("block_size",), "hnsw": ("M", "ef_construction", "ef")}

# Work (n^2 * d) up to which "auto" uses exact search on the CPU: about 25k x 784 or
# 100k x 50. Measured on 2 cores: 7k x 784 exact in 0.7 s; pynndescent on 100k x 50 took
# 1.6 s on an idle machine (10 s on a loaded one), so for low-dimensional data this limit
# keeps exact search longer than speed alone would.
EXACT_WORK_LIMIT = 5e11


def check_metric(metric: str) -> str:
    """``metric`` when it is one of :data:`METRICS`, else a ValueError naming them."""
    if metric not in METRICS:
        raise ParameterError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (float32); zero-norm rows stay zero.

    Parameters
    ----------
    X
        (n, d) array.

    Returns
    -------
    ndarray
        (n, d) float32; the cosine similarity of two rows is the dot product of theirs.
    """
    X = np.asarray(X, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    out = np.zeros_like(X)
    nz = norms > 0
    out[nz] = X[nz] / norms[nz, None].astype(np.float32)
    return out


def zero_rows(X: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose every entry is zero (no direction for cosine)."""
    return ~np.asarray(X).any(axis=1)


def exact_knn(
    X: np.ndarray,
    n_neighbors: int,
    *,
    Y: np.ndarray | None = None,
    block_size: int = 2048,
    device: str = "auto",
    exclude_self: bool = True,
    metric: str = "euclidean",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by blockwise matrix products (torch), Euclidean or cosine.

    Memory is bounded by ``block_size`` x ``block_size`` distance tiles plus the running
    top-k, never n x n. With ``metric="cosine"`` the rows are normalised first and the
    distance is ``1 - <x, y>`` of the unit rows (zero rows: distance 1 to everything).

    Parameters
    ----------
    X
        Queries, shape (n, d).
    n_neighbors
        k, not counting the point itself.
    Y
        Reference points (default: X itself, in which case self matches are excluded).
    block_size
        Rows per query and reference tile.
    device
        "auto", "cpu" or "cuda".
    exclude_self
        Drop the query's own index when ``Y`` is ``X``.
    metric
        ``"euclidean"`` or ``"cosine"``.

    Returns
    -------
    indices, distances
        int64 and float32 arrays of shape (n, k), sorted by distance.
    """

    cosine = check_metric(metric) == "cosine"
    dev = resolve_device(device)
    same = Y is None
    if cosine:
        X = normalize_rows(X)
        Y = None if same else normalize_rows(Y)
    Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=dev)
    Yt = Xt if same else torch.as_tensor(np.ascontiguousarray(Y, dtype=np.float32), device=dev)
    n, m = Xt.shape[0], Yt.shape[0]
    k = n_neighbors
    if k > m - (1 if same and exclude_self else 0):
        raise InputError(f"n_neighbors={k} needs at least {k + 1} samples, got {m}")
    out_i = np.empty((n, k), dtype=np.int64)
    out_d = np.empty((n, k), dtype=np.float32)
    y_sq = None if cosine else (Yt * Yt).sum(1)
    with torch.inference_mode():
        for q0 in range(0, n, block_size):
            q = Xt[q0:q0 + block_size]
            q_sq = None if cosine else (q * q).sum(1, keepdim=True)
            best_d = torch.full((q.shape[0], k), float("inf"), device=dev)
            best_i = torch.zeros((q.shape[0], k), dtype=torch.int64, device=dev)
            for r0 in range(0, m, block_size):
                r = Yt[r0:r0 + block_size]
                if cosine:  # 1 - cos, in [0, 2]; a zero row has dot 0, so distance 1
                    d2 = (1.0 - q @ r.T).clamp_(min=0.0, max=2.0)
                else:
                    d2 = (q_sq - 2.0 * (q @ r.T) + y_sq[r0:r0 + block_size]).clamp_(min=0.0)
                if same and exclude_self:
                    lo, hi = max(q0, r0), min(q0 + q.shape[0], r0 + r.shape[0])
                    if lo < hi:
                        idx = torch.arange(lo, hi, device=dev)
                        d2[idx - q0, idx - r0] = float("inf")
                # the tile's own k best first: merging k + k candidates, not k + tile
                tile_d, tile_i = torch.topk(d2, min(k, r.shape[0]), dim=1, largest=False,
                                            sorted=False)
                cand_d = torch.cat([best_d, tile_d], 1)
                cand_i = torch.cat([best_i, tile_i + r0], 1)
                best_d, pos = torch.topk(cand_d, k, dim=1, largest=False, sorted=True)
                best_i = torch.gather(cand_i, 1, pos)
            out_i[q0:q0 + q.shape[0]] = best_i.cpu().numpy()
            out_d[q0:q0 + q.shape[0]] = (best_d if cosine else best_d.sqrt()).cpu().numpy()
    return out_i, out_d


def _drop_self(indices: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From (n, k+1) neighbour lists containing (usually) the point itself, keep k others."""
    n = indices.shape[0]
    is_self = indices == np.arange(n)[:, None]
    # rows without a self match (duplicates can push it out) drop their last column instead
    no_self = ~is_self.any(1)
    is_self[no_self, -1] = True
    first = is_self.argmax(1)
    drop = np.zeros_like(is_self)
    drop[np.arange(n), first] = True
    keep = ~drop
    idx = indices[keep].reshape(n, -1)[:, :k]
    dist = distances[keep].reshape(n, -1)[:, :k]
    return idx.astype(np.int64), dist.astype(np.float32)


def nndescent_knn(
    X: np.ndarray, n_neighbors: int, *, random_state: int | None = None, n_jobs: int = -1,
    metric: str = "euclidean", **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate kNN with pynndescent (CPU). Self is excluded.

    With ``metric="cosine"`` pynndescent searches the unit rows in Euclidean distance (the
    same neighbours: ``|u - v|^2 = 2 (1 - cos)``; this reuses pynndescent's compiled
    Euclidean code, where its own cosine metric costs about a minute of numba compilation
    on first use) and the distances are then computed as ``1 - cos`` pair by pair.
    Zero-norm rows are left out of the search: each lies at distance 1 from every row
    and gets the lowest-numbered other rows as neighbours (see the module docstring).
    """
    check_metric(metric)
    if X.shape[0] < n_neighbors + 1:
        raise InputError(f"n_neighbors={n_neighbors} needs at least {n_neighbors + 1} samples, "
                         f"got {X.shape[0]}")
    if metric == "cosine":
        return _nndescent_cosine(X, n_neighbors, random_state=random_state, n_jobs=n_jobs,
                                 **kwargs)

    n_trees = kwargs.pop("n_trees", min(64, 5 + int(round((X.shape[0]) ** 0.5 / 20.0))))
    n_iters = kwargs.pop("n_iters", max(5, int(round(np.log2(X.shape[0])))))
    # pynndescent compiles its numba kernels on import (about 1.5 s): imported when used
    from pynndescent import NNDescent

    index = NNDescent(
        X, n_neighbors=n_neighbors + 1, metric="euclidean", random_state=random_state,
        n_trees=n_trees, n_iters=n_iters, max_candidates=kwargs.pop("max_candidates", 60),
        low_memory=True, n_jobs=n_jobs,
        verbose=False, **kwargs,
    )
    ind, dist = index.neighbor_graph
    return _drop_self(ind, dist, n_neighbors)


# options of the package's own NN-descent kernel
DESCENT_KWDS = ("n_trees", "max_candidates", "n_iters", "leaf_size")

# Which NN-descent kernel searches: the package's (pumap_dask.nndescent: one thread, compiled
# once per machine and cached on disk) or pynndescent's (one search can use every thread and
# runs about 1.3x faster per thread warm, but every fresh process compiles it again).
# Measured on 2 cores, 50 features: the package's kernel searched 180k trajectory rows in
# 16.2 s in a fresh process (11k rows/s, 8 trees, 32 candidates); pynndescent's compile took
# about 50 s in a fresh process and 60-150 s on fresh Dask workers; warm on 45-60k-row
# partitions it took 7-10 s against the package's 8-11 s.
DESCENT_ROWS_PER_S = 11_000.0  # the package's kernel, one thread, at DESCENT_RATE_FEATURES
DESCENT_RATE_FEATURES = 50
PYNNDESCENT_COMPILE_S = 60.0
PYNNDESCENT_SPEEDUP = 1.3  # per thread, warm


def descent_kernel(rows: float, n_features: int, threads: int, *, one_search: bool) -> str:
    """The NN-descent kernel estimated to finish first: ``"descent"`` (the package's) or
    ``"pynndescent"``.

    Parameters
    ----------
    rows
        Rows searched in all (a partitioned search: the partitions' rows summed, each row
        counted once per partition holding it).
    n_features
        Columns of the rows (the search's cost grows with them; the compile does not).
    threads
        Threads available to the search.
    one_search
        True for one search of all rows (in memory): pynndescent's runs on every thread,
        the package's on one. False for many single-thread partition searches spread over
        the threads (either kernel uses them all).

    Notes
    -----
    The package's kernel costs ``rows / DESCENT_ROWS_PER_S`` thread-seconds (scaled by the
    features); pynndescent's costs :data:`PYNNDESCENT_COMPILE_S` once plus that over
    :data:`PYNNDESCENT_SPEEDUP`. On 2 threads: a one-shot in-memory search uses the package's
    kernel up to about 1M rows of 50 features, a partitioned one up to about 2.4M rows
    searched per thread (a 1M-row fit with 2-fold overlap: 1M per thread).
    """
    threads = max(1, int(threads))
    seconds = rows * max(1, n_features) / (DESCENT_ROWS_PER_S * DESCENT_RATE_FEATURES)
    own = seconds if one_search else seconds / threads
    theirs = PYNNDESCENT_COMPILE_S + seconds / (PYNNDESCENT_SPEEDUP * threads)
    return "descent" if own <= theirs else "pynndescent"


def _search_threads(n_jobs: int | None) -> int:
    """Threads a search with ``n_jobs`` gets (None or below 1: every CPU)."""
    return (os.cpu_count() or 1) if n_jobs is None or n_jobs < 1 else int(n_jobs)


def check_descent_kwds(kwds: dict) -> dict:
    """``kwds`` when all are options of :func:`descent_knn`, else a ParameterError."""
    unknown = sorted(set(kwds) - set(DESCENT_KWDS))
    if unknown:
        raise ParameterError(f"kNN options {unknown} are not options of the partitions' "
                             f"NN-descent search (pumap_dask.nndescent); it takes "
                             f"{list(DESCENT_KWDS)}")
    return kwds


def descent_knn(X: np.ndarray, n_neighbors: int, *, random_state: int | None = None,
                metric: str = "euclidean", **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Approximate kNN on one thread with the package's NN-descent kernel
    (:func:`pumap_dask.nndescent.nn_descent`, compiled once per machine). Self is excluded.

    With ``metric="cosine"`` it searches the unit rows, as :func:`nndescent_knn` does.
    ``kwargs`` are the kernel's options (:data:`DESCENT_KWDS`); others raise a
    ParameterError.
    """
    check_metric(metric)
    check_descent_kwds(kwargs)
    if X.shape[0] < n_neighbors + 1:
        raise InputError(f"n_neighbors={n_neighbors} needs at least {n_neighbors + 1} samples, "
                         f"got {X.shape[0]}")
    if metric == "cosine":
        return _cosine_by_unit_rows(
            X, n_neighbors, lambda U: nn_descent(U, n_neighbors, random_state=random_state,
                                                 **kwargs))
    return nn_descent(X, n_neighbors, random_state=random_state, **kwargs)


def _nndescent_cosine(X: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Cosine kNN by pynndescent on the non-zero unit rows; see :func:`nndescent_knn`."""
    return _cosine_by_unit_rows(
        X, k, lambda U: nndescent_knn(U, k, metric="euclidean", **kwargs))


def _cosine_by_unit_rows(X: np.ndarray, k: int,
                         search: Callable[[np.ndarray], tuple]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine kNN from a Euclidean search of the non-zero unit rows.

    ``search(U)`` returns the Euclidean kNN (self excluded) of the unit rows ``U``: the same
    neighbours as cosine, since ``|u - v|^2 = 2 (1 - cos)``. Distances are then computed as
    ``1 - cos`` pair by pair; zero-norm rows lie at distance 1 from every row and get the
    lowest-numbered other rows as neighbours (see the module docstring).
    """
    U = normalize_rows(X)
    n = U.shape[0]
    zero = ~U.any(axis=1)
    nz = np.flatnonzero(~zero)
    if nz.size < k + 1:  # (almost) all rows zero: nothing to search approximately
        return exact_knn(X, k, metric="cosine", device="cpu")
    ind = np.empty((n, k), dtype=np.int64)
    i, _ = search(U[nz])
    ind[nz] = nz[i]
    for r in np.flatnonzero(zero):  # any k other rows: all lie at distance 1
        cand = np.arange(k + 1)
        ind[r] = cand[cand != r][:k]
    dist = 1.0 - np.einsum("ik,ijk->ij", U, U[ind])  # zero rows: dot 0, distance 1
    dist = np.clip(dist, 0.0, 2.0).astype(np.float32)
    o = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(ind, o, 1), np.take_along_axis(dist, o, 1)


def require_hnsw():
    """The ``usearch.index`` module, or a ParameterError naming the extra that installs it."""
    try:
        from usearch import index as usearch_index
    except ImportError as exc:
        raise ParameterError(
            "knn_method='hnsw' (and local_method='hnsw') needs the optional package usearch; "
            f"install it with `pip install '{HNSW_EXTRA}'` (or `pip install usearch`)") from exc
    return usearch_index


def hnsw_knn(
    X: np.ndarray,
    n_neighbors: int,
    *,
    random_state: int | None = None,
    n_jobs: int = -1,
    metric: str = "euclidean",
    M: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef: int = HNSW_EF,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate kNN with usearch's HNSW graph (CPU; optional extra ``pumap_dask[hnsw]``).

    Every row is inserted into one index, then every row queries it for ``k + 1``
    neighbours and itself is dropped. Euclidean distances are the square roots of usearch's
    squared ``"l2sq"`` distances (computed directly, no cancellation). Rows whose search
    returns fewer than ``k + 1`` neighbours (possible on tiny or badly connected graphs)
    are searched exactly. With ``metric="cosine"`` the non-zero unit rows are searched in
    ``"l2sq"`` (the same neighbours) and the distances are ``1 - cos`` pair by pair, zero
    rows as in :func:`nndescent_knn`.

    Parameters
    ----------
    X
        (n, d) data.
    n_neighbors
        k, not counting the point itself.
    random_state
        When given, the index is built with one thread, which makes the result
        deterministic (a parallel insertion order depends on thread timing); None builds
        with ``n_jobs`` threads. usearch takes no seed (its level generator is fixed), so
        every given value gives the same graph. Queries run on ``n_jobs`` threads either way
        (each query is independent).
    n_jobs
        Threads (-1: all cores).
    metric
        ``"euclidean"`` or ``"cosine"``.
    M, ef_construction, ef
        The graph degree, build-time and query-time candidate list sizes (usearch's
        ``connectivity``, ``expansion_add``, ``expansion_search``); ``ef`` is raised to at
        least ``2 (k + 1)``. The defaults give recall@15 >= 0.95 on the data of
        ``benchmarks/knn_backends.py``; raise ``ef`` for more recall at a higher query cost.

    Returns
    -------
    indices, distances
        int64 and float32 arrays of shape (n, k), sorted by distance, self excluded.

    Raises
    ------
    ParameterError
        usearch is not installed (the message names the extra), or a bad option.
    InputError
        Fewer than ``n_neighbors + 1`` rows.
    """
    check_metric(metric)
    usearch_index = require_hnsw()

    positive_int("M", M, minimum=2)
    positive_int("ef_construction", ef_construction)
    positive_int("ef", ef)
    if X.shape[0] < n_neighbors + 1:
        raise InputError(f"n_neighbors={n_neighbors} needs at least {n_neighbors + 1} samples, "
                         f"got {X.shape[0]}")
    kw = dict(random_state=random_state, n_jobs=n_jobs, M=M, ef_construction=ef_construction,
              ef=ef)
    if metric == "cosine":
        return _cosine_by_unit_rows(X, n_neighbors,
                                    lambda U: hnsw_knn(U, n_neighbors, **kw))
    threads = _search_threads(n_jobs)
    Xc = np.ascontiguousarray(X, dtype=np.float32)
    n, d = Xc.shape
    k1 = n_neighbors + 1
    index = usearch_index.Index(ndim=d, metric="l2sq", dtype="f32", connectivity=int(M),
                                expansion_add=int(ef_construction),
                                expansion_search=max(int(ef), 2 * k1))
    index.add(np.arange(n, dtype=np.uint64), Xc,
              threads=1 if random_state is not None else threads)
    found = index.search(Xc, k1, threads=threads)
    labels = np.asarray(found.keys, dtype=np.int64).reshape(n, k1)
    d2 = np.asarray(found.distances, dtype=np.float32).reshape(n, k1)
    short = np.flatnonzero(np.asarray(found.counts).reshape(n) < k1)
    d2[short] = 0.0  # unfilled slots hold NaN; these rows are replaced below
    dist = np.sqrt(np.maximum(d2, 0.0))
    if short.size:  # the graph search came back short: these rows are searched exactly
        logger.debug("hnsw: %d of %d rows searched exactly (short result lists)",
                     short.size, n)
        labels[short], dist[short] = exact_knn(Xc[short], k1, Y=Xc, device="cpu",
                                               exclude_self=False)
    return _drop_self(labels, dist, n_neighbors)


def backend_kwds(method: str, kwds: dict) -> dict:
    """The options in ``kwds`` that back-end ``method`` takes.

    Options named in :data:`BACKEND_KWDS` for another back-end are dropped (logged), so one
    ``knn_kwds`` can serve whichever back-end ``"auto"`` picks; nndescent receives every
    other option (pynndescent checks them).
    """
    known = {k for names in BACKEND_KWDS.values() for k in names}
    own = BACKEND_KWDS.get(method)
    keep = {k: v for k, v in kwds.items()
            if (k in own if own is not None else k not in known)}
    dropped = sorted(set(kwds) - set(keep))
    if dropped:
        logger.info("kNN options %s do not apply to knn_method=%r; ignored", dropped, method)
    return keep


def choose_method(n: int, d: int, device: str = "cpu") -> str:
    """The ``auto`` rule for in-memory data: exact while n^2*d is small, else nndescent."""
    limit = EXACT_WORK_LIMIT * (100 if device.startswith("cuda") else 1)
    return "exact" if float(n) * n * d <= limit else "nndescent"


def check_precomputed(knn: tuple, n: int, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a user-supplied ``(indices, distances)`` pair; keep the first n_neighbors."""
    if not isinstance(knn, (tuple, list)) or len(knn) != 2:
        raise InputError("precomputed kNN must be a pair (indices, distances)")
    ind, dist = knn
    ind, dist = np.asarray(ind), np.asarray(dist)
    if ind.shape != dist.shape or ind.ndim != 2 or ind.shape[0] != n:
        raise InputError(f"precomputed kNN must be two ({n}, k) arrays; got {ind.shape} and "
                         f"{dist.shape}")
    if ind.shape[1] < n_neighbors:
        raise InputError(f"precomputed kNN has {ind.shape[1]} neighbours per row; "
                         f"n_neighbors={n_neighbors} needs at least that many")
    if (ind[:, 0] == np.arange(n)).all():
        raise InputError("precomputed kNN includes each point as its own first neighbour; "
                         "drop that column (indices[:, 1:], distances[:, 1:])")
    if ind.min() < 0 or ind.max() >= n:
        raise InputError(f"precomputed kNN indices must lie in [0, {n})")
    if not np.isfinite(dist).all() or (dist < 0).any():
        raise InputError("precomputed kNN distances must be finite and non-negative")
    return ind[:, :n_neighbors].astype(np.int64), dist[:, :n_neighbors].astype(np.float32)


def knn_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's true neighbours found (recall@k)."""
    k = exact.shape[1]
    hits = sum(len(np.intersect1d(a[:k], e)) for a, e in zip(approx, exact))
    return hits / float(exact.size)


def sample_recall(
    X: np.ndarray, indices: np.ndarray, n_samples: int = 1000, random_state: int | None = 0,
    device: str = "auto", metric: str = "euclidean",
) -> float:
    """Recall@k of ``indices`` against exact neighbours (in ``metric``) on a random sample
    of rows."""
    rng = np.random.default_rng(random_state)
    n, k = indices.shape
    rows = np.sort(rng.choice(n, size=min(n, n_samples), replace=False))
    _, exact_idx = _exact_rows(X, rows, k, device, metric)
    return knn_recall(indices[rows], exact_idx)


def _exact_rows(X, rows, k, device, metric="euclidean"):
    ind, dist = exact_knn(X[rows], k + 1, Y=X, device=device, exclude_self=False,
                          metric=metric)
    # remove each query's own index
    own = ind == rows[:, None]
    fixed_i, fixed_d = [], []
    for i in range(len(rows)):
        keep = ~own[i]
        fixed_i.append(ind[i][keep][:k])
        fixed_d.append(dist[i][keep][:k])
    return np.array(fixed_d), np.array(fixed_i)


def nearest_neighbors_numpy(
    X: np.ndarray, n_neighbors: int, method: str = "auto", *, random_state: int | None = None,
    device: str = "auto", metric: str = "euclidean", **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """kNN of an in-memory array with the named back-end and ``metric`` ("euclidean" or
    "cosine").

    ``method`` is ``"exact"`` (:func:`exact_knn`), ``"nndescent"`` (:func:`nndescent_knn`),
    ``"hnsw"`` (:func:`hnsw_knn`, optional extra) or ``"auto"`` (:func:`choose_method`);
    ``kwargs`` go to the back-end (e.g. ``M``, ``ef`` for hnsw).
    """
    check_metric(metric)
    dev = resolve_device(device)
    if method == "auto":
        method = choose_method(X.shape[0], X.shape[1], dev)
    kwargs = backend_kwds(method, kwargs)
    backends: dict[str, Callable] = {
        "exact": lambda: exact_knn(X, n_neighbors, device=dev, metric=metric, **kwargs),
        "nndescent": lambda: _in_memory_descent(X, n_neighbors, random_state, metric,
                                                kwargs),
        "hnsw": lambda: hnsw_knn(X, n_neighbors, random_state=random_state, metric=metric,
                                 **kwargs),
    }
    if method not in backends:
        raise ParameterError(f"knn_method for in-memory data must be one of {sorted(backends)} or "
                             f"'auto', got {method!r}")
    t0 = time.perf_counter()
    out = backends[method]()
    logger.info("kNN (%s, %s, k=%d) on %d x %d in %.2fs", method, metric, n_neighbors,
                *X.shape, time.perf_counter() - t0)
    return out


def _in_memory_descent(X: np.ndarray, n_neighbors: int, random_state: int | None,
                       metric: str, kwargs: dict) -> tuple[np.ndarray, np.ndarray]:
    """NN-descent of an in-memory array by the kernel :func:`descent_kernel` picks (or by
    pynndescent when ``kwargs`` name options only it takes)."""
    threads = _search_threads(int(kwargs.pop("n_jobs", -1)))
    kernel = descent_kernel(X.shape[0], X.shape[1], threads, one_search=True)
    foreign = sorted(set(kwargs) - set(DESCENT_KWDS))
    if foreign and kernel == "descent":
        logger.info("kNN options %s are pynndescent's: searching with pynndescent", foreign)
        kernel = "pynndescent"
    logger.debug("in-memory NN-descent: %s (%d rows, %d threads)", kernel, X.shape[0], threads)
    if kernel == "descent":
        return descent_knn(X, n_neighbors, random_state=random_state, metric=metric, **kwargs)
    return nndescent_knn(X, n_neighbors, random_state=random_state, n_jobs=threads,
                         metric=metric, **kwargs)
