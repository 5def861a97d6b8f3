"""Partitioned approximate kNN over chunked data with Dask (the cuML recipe, on CPUs or GPUs).

1. k-means on a random sample of rows gives ``P`` centroids.
2. Every row block sends each of its rows to the ``overlap`` partitions with the nearest
   centroids. Partitions travel in groups (:func:`search_groups`), so the shuffle has one
   small task per (block, group) pair, not per (block, partition): 400 partitions of 50
   blocks were 40,000 such tasks at 10M rows.
3. Each group's task searches its partitions one after another on a worker (the package's
   NN-descent kernel on CPU, or usearch's HNSW with ``local_method="hnsw"``; exact
   blockwise search when the partition is small or the worker has CUDA) and maps local ids
   back to global int64 row ids; its results are bucketed by the row block they belong to.
4. Each row block merges the lists it receives (one per partition holding the row): ids are
   deduplicated, self is excluded and the k nearest are kept.

Nothing gathers the data to one process: the client only sees the k-means sample, the
centroids and (for the recall measurement) ``recall_samples`` rows.

With ``metric="cosine"`` the k-means partitioning and the assignment of rows to centroids
use the rows normalised to unit length (cosine neighbours are Euclidean neighbours of the
unit rows), the local searches are cosine searches, and recall is measured in cosine.

Partition size rule
-------------------
A partition of ``m`` rows and ``d`` features needs about ``m * bytes_per_row(d, k)`` bytes
on its worker while it is built (:func:`bytes_per_row`: the incoming pieces and their
concatenation, pynndescent's heaps and forest). The largest partition allowed is
``PARTITION_MEMORY_FRACTION`` of a worker thread's memory (the worker's memory limit divided
by its threads; the machine's available memory for local schedulers) divided by that. Below
that ceiling the target is ``DEFAULT_PARTITION_ROWS`` rows (measured: pynndescent costs
about 22 us/row at 50k rows and 28 us/row at 100k on one core, while smaller partitions cut
more true neighbourhoods). ``P = ceil(overlap * n / partition_rows)``; centroids whose
expected partition exceeds the ceiling or twice the target (k-means partitions of clustered
data are uneven, and one large partition delays the whole stage) are split by a second
k-means on their sample rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from typing import Any

import dask
import dask.array as da
import numpy as np
import psutil
from dask import delayed
from dask.base import tokenize
from distributed import default_client, futures_of
from sklearn.cluster import KMeans

from .. import knn as knn_stage
from .. import params as P
from ..arrays import reuses_freed_memory
from ..errors import InputError, ParameterError
from ..io import as_dask, check_array, checked_finite, is_lazy, write_json_atomic
from ..params import KNN_METHODS, LOCAL_METHODS, METRICS

logger = logging.getLogger(__name__)

# Lazy (dask / Zarr) input above this many rows uses the partitioned method under "auto".
# Below it one process holds the data comfortably (200k x 100 float32 is 80 MB) and builds
# the kNN in seconds, so the overhead of the shuffle and of overlapping partitions (every
# row is searched `overlap` times) does not pay.
PARTITION_THRESHOLD = 200_000
DEFAULT_PARTITION_ROWS = 50_000
PARTITION_MEMORY_FRACTION = 0.5
# partitions with m * m * d below this are searched exactly on CPU workers (measured on one
# core: exact costs about m * d / 8e9 s per row, NN-descent about 20 us per row: break-even
# near m = 3k rows at d = 50). Set above break-even, at partitions of up to about 6k rows at
# d = 50 (0.25 s exact against 0.11 s warm NN-descent): the NN-descent kernel is compiled
# once per machine (about 20 s, then cached on disk), so small jobs never pay it
LOCAL_EXACT_WORK = 2e9
LOCAL_NNDESCENT = {"n_trees": 8, "max_candidates": 32}
# HNSW (usearch) inside a partition: the single-machine defaults (pumap_dask.knn.HNSW_*)
LOCAL_HNSW: dict = {}
# a search task's rows and results (not the search itself, one partition at a time) may
# use this share of a worker thread's memory
GROUP_MEMORY_FRACTION = 0.25
# search tasks per worker thread at least, so that uneven groups still balance
GROUPS_PER_THREAD = 4
KMEANS_SAMPLE_PER_PARTITION = 256
KMEANS_MAX_SAMPLE = 100_000


class KNNResult(tuple):
    """``(indices, distances)`` dask arrays, plus what was measured while building them.

    Unpacks as a pair: ``indices, distances = nearest_neighbors(X)``.

    Attributes
    ----------
    indices, distances
        Dask arrays (n, k), int64 and float32, row-aligned with the input.
    recall
        Sampled recall@k against exact neighbours, or None when not measured.
    method
        The method used ("exact", "nndescent" or "partitioned").
    n_partitions
        Number of partitions (partitioned method only).
    timings
        Seconds per step.
    """

    def __new__(cls, indices, distances, **info):
        self = super().__new__(cls, (indices, distances))
        self.recall = info.get("recall")
        self.method = info.get("method")
        self.n_partitions = info.get("n_partitions")
        self.timings = info.get("timings", {})
        return self

    @property
    def indices(self):
        return self[0]

    @property
    def distances(self):
        return self[1]


# --------------------------------------------------------------------------- sizing
def bytes_per_row(n_features: int, n_neighbors: int) -> int:
    """Worker memory one partition row needs while its local kNN is built (estimate)."""
    return 12 * n_features + 48 * (n_neighbors + 1) + 256


def _workers(client=None) -> list | None:
    """The scheduler's worker records of ``client`` (else the default client); None
    without a distributed client."""
    if client is None:
        try:
            client = default_client()
        except (ImportError, ValueError):
            return None
    return list(client.scheduler_info()["workers"].values())


def worker_memory_per_thread(client=None) -> float:
    """Memory one task may use: the smallest worker's limit over its threads."""
    workers = _workers(client)
    if workers is not None:
        per = [w["memory_limit"] / max(1, w["nthreads"]) for w in workers if w.get("memory_limit")]
        if per:
            return float(min(per))

    return psutil.virtual_memory().available / max(1, os.cpu_count() or 1)


def partition_plan(n: int, n_features: int, n_neighbors: int, overlap: int, *,
                   n_partitions: int | None = None, partition_rows: int | None = None,
                   memory_per_thread: float | None = None) -> tuple[int, int]:
    """Number of partitions and the largest partition allowed (rows); see module docstring."""
    mem = memory_per_thread if memory_per_thread is not None else worker_memory_per_thread()
    ceiling = max(4 * (n_neighbors + 1),
                  int(PARTITION_MEMORY_FRACTION * mem / bytes_per_row(n_features, n_neighbors)))
    target = min(partition_rows or DEFAULT_PARTITION_ROWS, ceiling)
    if n_partitions is None:
        n_partitions = max(1, math.ceil(overlap * n / target))
    n_partitions = int(min(n_partitions, max(1, n // (2 * (n_neighbors + 1)))))
    return n_partitions, ceiling


def search_groups(n_partitions: int, n_blocks: int, n_rows: int, n_features: int,
                  n_neighbors: int, overlap: int, threads: int,
                  memory_per_thread: float) -> int:
    """Number of search tasks the partitions are grouped into.

    As many as the row blocks (the shuffle then has ``n_blocks ** 2`` pieces each way, not
    ``n_blocks * n_partitions``), at least :data:`GROUPS_PER_THREAD` per worker thread,
    and enough that one task's rows and results stay within
    :data:`GROUP_MEMORY_FRACTION` of a thread's memory; never more than the partitions.
    """
    groups = max(n_blocks, GROUPS_PER_THREAD * max(1, threads))
    held = overlap * n_rows * (4 * n_features + 12 * n_neighbors + 16)
    groups = max(groups, math.ceil(held / (GROUP_MEMORY_FRACTION * memory_per_thread)))
    return int(max(1, min(n_partitions, groups)))


def local_kernel(local_method: str, rows_searched: float, n_features: int,
                 threads: int) -> str:
    """The search inside each partition: ``"hnsw"``, or for nndescent ``"descent"`` (the
    package's cached kernel) or ``"pynndescent"`` (compiled once per worker, faster warm),
    as :func:`pumap_dask.knn.descent_kernel` estimates for ``rows_searched`` rows (the
    partitions' rows summed) over the cluster's ``threads``."""
    if local_method != "nndescent":
        return local_method
    return knn_stage.descent_kernel(rows_searched, n_features, threads, one_search=False)


def total_threads(client=None) -> int:
    """Task threads of the cluster (this machine's cores for local schedulers)."""
    workers = _workers(client)
    if workers is not None:
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers))
    return os.cpu_count() or 1


# --------------------------------------------------------------------------- k-means
def _sq_dist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    return (X * X).sum(1)[:, None] - 2.0 * (X @ C.T) + (C * C).sum(1)[None, :]


def _nearest(X: np.ndarray, C: np.ndarray, overlap: int) -> np.ndarray:
    d2 = _sq_dist(X.astype(np.float32), C)
    if overlap >= C.shape[0]:
        return np.argsort(d2, axis=1)
    part = np.argpartition(d2, overlap - 1, axis=1)[:, :overlap]
    return part


def fit_partitions(sample: np.ndarray, n_partitions: int, overlap: int, n_total: int,
                   max_rows: int, min_rows: int, random_state: int | None) -> np.ndarray:
    """Centroids from a sample; oversized partitions split, near-empty ones dropped."""

    if n_partitions <= 1:
        return sample.mean(0, keepdims=True).astype(np.float32)
    km = KMeans(n_clusters=n_partitions, n_init=1, max_iter=50, random_state=random_state)
    C = km.fit(sample).cluster_centers_.astype(np.float32)
    scale = n_total / sample.shape[0]
    for _ in range(2):
        top = _nearest(sample, C, min(overlap, C.shape[0]))
        est = np.bincount(top.ravel(), minlength=C.shape[0]) * scale
        big = np.flatnonzero(est > max_rows)
        if big.size == 0:
            break
        nearest = _nearest(sample, C, 1)[:, 0]
        new = [C[np.setdiff1d(np.arange(C.shape[0]), big)]]
        for c in big:
            rows = sample[nearest == c]
            parts = min(len(rows), math.ceil(est[c] / (0.8 * max_rows)) + 1)
            if parts <= 1:
                new.append(C[c:c + 1])
                continue
            sub = KMeans(n_clusters=parts, n_init=1, max_iter=50, random_state=random_state)
            new.append(sub.fit(rows).cluster_centers_.astype(np.float32))
        C = np.concatenate(new)
    top = _nearest(sample, C, min(overlap, C.shape[0]))
    est = np.bincount(top.ravel(), minlength=C.shape[0]) * scale
    keep = est >= min_rows
    if keep.sum() >= 1 and not keep.all():
        C = C[keep]
        est = est[keep]
    logger.info("partitions: %d, expected rows min/median/max %d/%d/%d", C.shape[0],
                est.min(), np.median(est), est.max())
    return C


# --------------------------------------------------------------------------- tasks
def _split_block(block: np.ndarray, offset: int, centroids: np.ndarray, overlap: int,
                 metric: str = "euclidean", groups: list | None = None) -> list:
    """Rows of one block sent to each partition: list over groups of lists over their
    partitions of (ids, rows) (one group per partition when ``groups`` is None).

    The rows travel as given; with ``metric="cosine"`` they are assigned by their unit
    vectors (``centroids`` are then centroids of unit rows).
    """
    P = centroids.shape[0]
    keyed = knn_stage.normalize_rows(block) if metric == "cosine" else block
    members_of = rows_by_partition(_nearest(keyed, centroids, min(overlap, P)), P)
    out = []
    for members in (groups if groups is not None else [[p] for p in range(P)]):
        out.append([(members_of[p] + offset, block[members_of[p]]) for p in members])
    return out


def rows_by_partition(top: np.ndarray, n_partitions: int) -> list[np.ndarray]:
    """The rows assigned to each partition, in ascending order, from ``top`` (m, overlap):
    each row's partitions (distinct within a row).

    One stable sort of the (row, partition) pairs by partition, where a test of every
    partition against every row cost ``n_partitions`` passes over the block (at 10M rows,
    455 partitions: most of a split task's time).
    """
    width = top.shape[1]
    flat = top.ravel()
    order = np.argsort(flat, kind="stable")  # pairs in row order within each partition
    starts = np.searchsorted(flat[order], np.arange(n_partitions + 1))
    rows = (order // width).astype(np.int64)
    return [rows[starts[p]:starts[p + 1]] for p in range(n_partitions)]


@reuses_freed_memory
def _search_group(pieces: list, n_neighbors: int, bounds: np.ndarray, device: str,
                  random_state: int | None, metric: str = "euclidean",
                  local_method: str = "nndescent", local_kwds: dict | None = None) -> list:
    """Local kNN of each partition of one group (``pieces``: list over row blocks of lists
    over the group's partitions), one after another; per row block the candidate triples
    of all of them (None where none has rows of that block)."""
    n_blocks = len(bounds) - 1
    per_block: list = [[] for _ in range(n_blocks)]
    for j in range(len(pieces[0]) if pieces else 0):
        found = _local_knn([blk[j] for blk in pieces], n_neighbors, bounds, device,
                           random_state, metric, local_method, local_kwds)
        for b, triple in enumerate(found):
            if triple is not None:
                per_block[b].append(triple)
    return [tuple(np.concatenate(col) for col in zip(*ts)) if ts else None
            for ts in per_block]


def _local_knn(pieces: list, n_neighbors: int, bounds: np.ndarray, device: str,
               random_state: int | None, metric: str = "euclidean",
               local_method: str = "nndescent", local_kwds: dict | None = None) -> list:
    """Local kNN of one partition, bucketed by destination row block.

    ``local_method`` (a :func:`local_kernel`: "descent", "pynndescent" or "hnsw") searches
    partitions too large for exact search on a CPU worker; ``local_kwds`` override its
    defaults (:data:`LOCAL_NNDESCENT`, :data:`LOCAL_HNSW`).

    Returns a list over row blocks of ``(global ids, neighbour global ids, distances)``
    (None where the partition has no rows of that block).
    """
    ids = np.concatenate([p[0] for p in pieces])
    n_blocks = len(bounds) - 1
    if ids.size == 0:
        return [None] * n_blocks
    Xp = np.ascontiguousarray(np.concatenate([p[1] for p in pieces]), dtype=np.float32)
    m, d = Xp.shape
    k = min(n_neighbors, m - 1)
    li = np.full((m, n_neighbors), -1, dtype=np.int64)
    ld = np.full((m, n_neighbors), np.inf, dtype=np.float32)
    if k >= 1:
        dev = knn_stage.resolve_device(device)
        if dev.startswith("cuda") or float(m) * m * d <= LOCAL_EXACT_WORK or m < 4 * (k + 1):
            # centred: the expanded-form distances lose less to cancellation; then direct
            # distances, so that copies of a pair from different partitions agree (cosine
            # is not translation invariant: unit rows, never centred)
            if metric == "cosine":
                a, _ = knn_stage.exact_knn(Xp, k, device=dev, metric="cosine")
            else:
                a, _ = knn_stage.exact_knn(Xp - Xp.mean(0), k, device=dev)
            b = _direct_distances(Xp, a, metric=metric)
            o = np.argsort(b, axis=1, kind="stable")
            a, b = np.take_along_axis(a, o, 1), np.take_along_axis(b, o, 1)
        else:
            # one thread per task: dask runs partitions in parallel. NN-descent is the
            # package's own kernel (pumap_dask.nndescent), which numba caches on disk, or
            # pynndescent's when a thread has many rows to search (:func:`local_kernel`).
            # Their distances are computed directly (no cancellation). Fewer trees and
            # candidates than the single-machine default: each row is searched in
            # `overlap` partitions and merged (measured on cell-like data, 50k-row
            # partition: recall 0.999 either way, 30% less time).
            own = knn_stage.backend_kwds(
                "hnsw" if local_method == "hnsw" else "nndescent", local_kwds or {})
            if local_method == "hnsw":  # one build and query thread per task, as above
                a, b = knn_stage.hnsw_knn(Xp, k, random_state=random_state, n_jobs=1,
                                          metric=metric, **{**LOCAL_HNSW, **own})
            elif local_method == "pynndescent":
                a, b = knn_stage.nndescent_knn(Xp, k, random_state=random_state, n_jobs=1,
                                               metric=metric, **{**LOCAL_NNDESCENT, **own})
            else:
                a, b = knn_stage.descent_knn(Xp, k, random_state=random_state, metric=metric,
                                             **{**LOCAL_NNDESCENT, **own})
        li[:, :k], ld[:, :k] = a, b
    gi = np.where(li >= 0, ids[np.clip(li, 0, None)], -1)
    dest = np.searchsorted(bounds, ids, side="right") - 1
    out: list = [None] * n_blocks
    order = np.argsort(dest, kind="stable")
    starts = np.searchsorted(dest[order], np.arange(n_blocks + 1))
    for b in range(n_blocks):
        sel = order[starts[b]:starts[b + 1]]
        if sel.size:
            out[b] = (ids[sel], gi[sel], ld[sel])
    return out


def _direct_distances(X: np.ndarray, nbr: np.ndarray, rows: int = 8192,
                      metric: str = "euclidean") -> np.ndarray:
    """Distance of each row to its listed neighbours, computed pair by pair."""
    out = np.empty(nbr.shape, dtype=np.float32)
    if metric == "cosine":
        U = knn_stage.normalize_rows(X)  # zero rows stay zero: dot 0, distance 1
        for a in range(0, len(U), rows):
            dots = np.einsum("ik,ijk->ij", U[a:a + rows], U[nbr[a:a + rows]])
            out[a:a + rows] = np.clip(1.0 - dots, 0.0, 2.0)
        return out
    for a in range(0, len(X), rows):
        diff = X[a:a + rows, None, :] - X[nbr[a:a + rows]]
        out[a:a + rows] = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    return out


def merge_candidates(parts: list, offset: int, size: int, n_neighbors: int) -> tuple:
    """Merge per-row neighbour lists from several partitions: dedup ids, drop self, top-k.

    Parameters
    ----------
    parts
        ``(row ids, neighbour ids, distances)`` triples (None entries are skipped); a row
        may appear in several.
    offset, size
        Global id of the block's first row and the block's row count.
    n_neighbors
        k.

    Returns
    -------
    indices, distances
        (size, k) int64 and float32, sorted ascending.
    """
    parts = [p for p in parts if p is not None]
    rows = np.concatenate([p[0] for p in parts]) - offset
    nbr = np.concatenate([p[1] for p in parts])
    dist = np.concatenate([p[2] for p in parts]).astype(np.float32)
    width = nbr.shape[1]
    counts = np.bincount(rows, minlength=size)
    if counts.min(initial=1) == 0:
        missing = np.flatnonzero(counts == 0)
        raise RuntimeError(f"rows {(missing[:5] + offset).tolist()} reached no partition")
    slots = int(counts.max())
    order = np.argsort(rows, kind="stable")
    r_sorted = rows[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(rows)) - starts[r_sorted]
    cand_i = np.full((size, slots * width), -1, dtype=np.int64)
    cand_d = np.full((size, slots * width), np.inf, dtype=np.float32)
    cols = rank[:, None] * width + np.arange(width)[None, :]
    cand_i[r_sorted[:, None], cols] = nbr[order]
    cand_d[r_sorted[:, None], cols] = dist[order]
    own = np.arange(size, dtype=np.int64)[:, None] + offset
    cand_d[(cand_i == own) | (cand_i < 0)] = np.inf
    # deduplicate: sort each row by (id, distance), blank repeats of an id
    by_id = _row_sort(cand_i, cand_d)
    si = np.take_along_axis(cand_i, by_id, 1)
    sd = np.take_along_axis(cand_d, by_id, 1)
    dup = np.zeros_like(si, dtype=bool)
    dup[:, 1:] = si[:, 1:] == si[:, :-1]
    sd[dup] = np.inf
    k = n_neighbors
    if sd.shape[1] > k:
        top = np.argpartition(sd, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(sd.shape[1]), sd.shape)
    ti = np.take_along_axis(si, top, 1)
    td = np.take_along_axis(sd, top, 1)
    o = np.argsort(td, axis=1, kind="stable")
    ti, td = np.take_along_axis(ti, o, 1), np.take_along_axis(td, o, 1)
    if ti.shape[1] < k or not np.isfinite(td).all():
        bad = np.flatnonzero(~np.isfinite(td).all(1)) if ti.shape[1] >= k else np.arange(size)
        raise RuntimeError(
            f"rows {(bad[:5] + offset).tolist()} found fewer than {k} neighbours in their "
            "partitions; use fewer partitions (n_partitions / partition_rows) or a larger overlap")
    return ti.astype(np.int64), td.astype(np.float32)


def _row_sort(ids: np.ndarray, dists: np.ndarray) -> np.ndarray:
    """Per-row order by id, ties broken by distance (so the kept copy is the nearest)."""
    o = np.argsort(dists, axis=1, kind="stable")
    ids_o = np.take_along_axis(ids, o, 1)
    o2 = np.argsort(ids_o, axis=1, kind="stable")
    return np.take_along_axis(o, o2, 1)


@reuses_freed_memory
def _merge_task(parts: list, offset: int, size: int, n_neighbors: int) -> tuple:
    return merge_candidates(parts, offset, size, n_neighbors)


# --------------------------------------------------------------------------- graph building
def _block_bounds(chunks: tuple) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


def _partition_pass(darr, n_neighbors: int, centroids: np.ndarray, overlap: int, device: str,
                    random_state: int | None, tag: str, metric: str = "euclidean",
                    local_method: str = "nndescent", local_kwds: dict | None = None,
                    n_groups: int | None = None) -> list:
    """Delayed per-block candidate triples of one partitioning (list over blocks of lists
    over search groups); ``n_groups`` search tasks (default: one per partition)."""

    bounds = _block_bounds(darr.chunks[0])
    blocks = darr.to_delayed().ravel()
    B, P = len(blocks), centroids.shape[0]
    G = int(min(P, n_groups or P))
    groups = [a.tolist() for a in np.array_split(np.arange(P), G)]
    cents = delayed(centroids, name=f"centroids-{tag}")
    splits = [delayed(_split_block, pure=True, name=f"split-{tag}-{b}")(
        blk, int(bounds[b]), cents, overlap, metric, groups) for b, blk in enumerate(blocks)]
    found = []
    for g in range(G):
        pieces = [s[g] for s in splits]
        found.append(delayed(_search_group, pure=True, name=f"localknn-{tag}-{g}")(
            pieces, n_neighbors, bounds, device, random_state, metric, local_method,
            local_kwds))
    return [[found[g][b] for g in range(G)] for b in range(B)]


def _assemble(darr, per_block: list, n_neighbors: int):
    bounds = _block_bounds(darr.chunks[0])
    ind_blocks, dist_blocks = [], []
    for b, cands in enumerate(per_block):
        size = int(bounds[b + 1] - bounds[b])
        merged = delayed(_merge_task, pure=True)(cands, int(bounds[b]), size, n_neighbors)
        ind_blocks.append(da.from_delayed(merged[0], (size, n_neighbors), dtype=np.int64,
                                          meta=np.empty((0, 0), np.int64)))
        dist_blocks.append(da.from_delayed(merged[1], (size, n_neighbors), dtype=np.float32,
                                           meta=np.empty((0, 0), np.float32)))
    return da.concatenate(ind_blocks, axis=0), da.concatenate(dist_blocks, axis=0)


def _sample_rows(n: int, size: int, random_state: int | None) -> np.ndarray:
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


def partitioned_knn(darr, n_neighbors: int, *, overlap: int = 2, n_partitions: int | None = None,
                    partition_rows: int | None = None, refine: bool = False,
                    random_state: int | None = 0, device: str = "auto", client=None,
                    metric: str = "euclidean", local_method: str = "nndescent",
                    local_kwds: dict | None = None):
    """Lazy partitioned kNN of a validated dask array; see :func:`nearest_neighbors`.

    Returns
    -------
    indices, distances, n_partitions
        Lazy dask arrays row-aligned with ``darr`` and the number of partitions used.
    """
    n, d = darr.shape
    mem = worker_memory_per_thread(client)
    P, ceiling = partition_plan(n, d, n_neighbors, overlap, n_partitions=n_partitions,
                                partition_rows=partition_rows, memory_per_thread=mem)
    passes = 2 if refine else 1
    per_block = None
    for r in range(passes):
        seed = None if random_state is None else int(random_state) + 7919 * r
        sample_idx = _sample_rows(n, min(KMEANS_MAX_SAMPLE,
                                         max(10_000, KMEANS_SAMPLE_PER_PARTITION * P)), seed)
        sample = _compute(darr[sample_idx], client=client)
        if metric == "cosine":
            sample = knn_stage.normalize_rows(sample)
        min_rows = 4 * (n_neighbors + 1)
        target = min(partition_rows or DEFAULT_PARTITION_ROWS, ceiling)
        C = fit_partitions(sample, P, overlap, n, min(ceiling, 2 * target), min_rows, seed)
        threads = total_threads(client)
        G = search_groups(C.shape[0], darr.numblocks[0], n, d, n_neighbors, overlap, threads,
                          mem)
        kernel = local_kernel(local_method, overlap * n, d, threads)
        logger.info("kNN: %d partitions searched in %d tasks over %d row blocks (%s)",
                    C.shape[0], G, darr.numblocks[0], kernel)
        # the centroids' token and the grouping keep runs with other partitionings from
        # sharing task keys
        tag = (f"{_token(darr)}-{n_neighbors}-{overlap}-{r}-{seed}-{metric}-{local_method}-"
               f"{kernel}-{G}-{tokenize(C, local_kwds)[:12]}")
        pb = _partition_pass(darr, n_neighbors, C, overlap, device, seed, tag, metric,
                             kernel, local_kwds, G)
        per_block = pb if per_block is None else [a + b for a, b in zip(per_block, pb)]
        P_used = C.shape[0]
    ind, dist = _assemble(darr, per_block, n_neighbors)
    return ind, dist, P_used


def _token(darr) -> str:
    return darr.name[-12:]


def _wait(*collections) -> None:
    """Block until persisted collections are in memory on the workers; raise their errors."""
    for f in (f for c in collections for f in futures_of(c)):
        if f.exception() is not None:  # waits through the future's own client
            f.result()


def _compute(x, client=None):
    if client is not None:
        return dask.compute(x, scheduler=client)[0]
    return x.compute()


# --------------------------------------------------------------------------- recall
# The sampled recall searches every row for each sampled one: 1,000 rows cost 76 s of a
# 10M-row fit on 2 cores. By default the sample shrinks above 1M rows to keep about 1e9
# distance pairs, down to 200 rows (3,000 neighbour slots: a standard error near 0.004).
RECALL_ROWS = 1000
RECALL_MIN_ROWS = 200
RECALL_PAIRS = 10**9


def recall_rows(n: int) -> int:
    """Rows sampled to measure a kNN's recall over ``n`` rows, by default."""
    return int(min(RECALL_ROWS, max(RECALL_MIN_ROWS, RECALL_PAIRS // max(1, n))))


@reuses_freed_memory
def _block_topk(block: np.ndarray, offset: int, Q: np.ndarray, k: int, device: str,
                metric: str = "euclidean"):
    kk = min(k, block.shape[0])
    i, dd = knn_stage.exact_knn(Q, kk, Y=block, device=device, exclude_self=False,
                                metric=metric)
    return i + offset, dd


def lazy_sample_recall(darr, indices, n_samples: int = 1000, random_state: int | None = 0,
                       device: str = "auto", client=None, metric: str = "euclidean") -> float:
    """Recall@k of ``indices`` on a random sample of rows, exact neighbours (in ``metric``)
    by streaming.

    Only the sampled rows are gathered; each row block of ``darr`` is searched on the
    workers against them and the per-block top lists are merged.
    """

    n = darr.shape[0]
    k = indices.shape[1]
    rows = _sample_rows(n, n_samples, None if random_state is None else int(random_state) + 1)

    sched = {"scheduler": client} if client is not None else {}
    Q, approx = dask.compute(darr[rows], indices[rows], **sched)
    bounds = _block_bounds(darr.chunks[0])
    Qd = delayed(Q, name=f"recall-queries-{_token(darr)}-{tokenize(rows)[:12]}")
    tops = [delayed(_block_topk, pure=True)(blk, int(bounds[b]), Qd, k + 1, device, metric)
            for b, blk in enumerate(darr.to_delayed().ravel())]
    tops = dask.compute(*tops, **sched)
    ci = np.concatenate([t[0] for t in tops], 1)
    cd = np.concatenate([t[1] for t in tops], 1)
    cd[ci == rows[:, None]] = np.inf
    o = np.argsort(cd, axis=1, kind="stable")[:, :k]
    exact = np.take_along_axis(ci, o, 1)
    return knn_stage.knn_recall(np.asarray(approx), exact)


# --------------------------------------------------------------------------- cache
def _cache_params(darr, n_neighbors, method, overlap, n_partitions, partition_rows, refine,
                  random_state, source, metric="euclidean", local_method="nndescent",
                  method_kwds=None, content=None) -> dict:
    # the metric, local method and back-end options are recorded only when not the
    # defaults, so caches written before they existed stay valid
    extra = {} if metric == "euclidean" else {"metric": metric}
    if method == "partitioned" and local_method != "nndescent":
        extra["local_method"] = local_method
    elif method == "partitioned":  # the rule choosing the partitions' NN-descent kernel
        extra["local_search"] = "pumap_dask.nndescent or pynndescent by knn.descent_kernel"
    if method_kwds:
        extra["method_kwds"] = {str(k): method_kwds[k] for k in sorted(method_kwds)}
    if content:  # the input's content digest: a cache of other data is never reused
        extra["input_sha256"] = content
    return {**extra, "shape": list(map(int, darr.shape)),
            "chunks": [int(c) for c in darr.chunks[0]],
            "n_neighbors": int(n_neighbors), "method": method, "overlap": int(overlap),
            "n_partitions": n_partitions, "partition_rows": partition_rows,
            "refine": bool(refine), "random_state": random_state, "source": source,
            "token": darr.name, "content": _store_fingerprint(source)}


def _store_fingerprint(path: str | None) -> str | None:
    """Sizes and modification times of a local Zarr store's files, hashed.

    Dask names a Zarr-backed array by its path, so data rewritten in place would otherwise
    hit the cache of the old data. Reading only file metadata keeps this cheap.
    """
    if path is None or not os.path.isdir(path):
        return None

    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:"
                     f"{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _load_cached(knn_dir: str, params: dict, darr, reused: bool = True):
    meta_path = os.path.join(knn_dir, "meta.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as fh:
        meta = json.load(fh)
    if not meta.get("complete") or meta.get("params") != params:
        logger.info("kNN cache in %s is incomplete or for other input or parameters; "
                    "recomputing it there", knn_dir)
        return None
    # names carry the id of the run that wrote the arrays: dask names Zarr arrays by path,
    # and later stages (the graph's cache) must see a recomputed kNN as new
    run = meta.get("run_id", "")
    ind = da.from_zarr(os.path.join(knn_dir, "indices"), name=f"knn-indices-{run}")
    dist = da.from_zarr(os.path.join(knn_dir, "distances"), name=f"knn-distances-{run}")
    ind, dist = ind.rechunk({0: darr.chunks[0]}), dist.rechunk({0: darr.chunks[0]})
    if reused:  # (else: read back just after this run stored it)
        logger.info("kNN reused from %s", knn_dir)
    return ind, dist, meta


def _store(knn_dir: str, ind, dist, params: dict, info: dict, client=None):
    os.makedirs(knn_dir, exist_ok=True)
    meta_path = os.path.join(knn_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    rows = max(ind.chunks[0])
    if any(c != rows for c in ind.chunks[0][:-1]):  # Zarr needs regular chunks
        ind, dist = ind.rechunk({0: rows}), dist.rechunk({0: rows})
    sched = {"scheduler": client} if client is not None else {}
    w1 = da.to_zarr(ind, os.path.join(knn_dir, "indices"), overwrite=True, compute=False)
    w2 = da.to_zarr(dist, os.path.join(knn_dir, "distances"), overwrite=True, compute=False)
    dask.compute(w1, w2, **sched)

    write_json_atomic(meta_path, {"complete": True, "params": params,
                                   "run_id": uuid.uuid4().hex, **info})


# --------------------------------------------------------------------------- public
def resolve_method(method: str, X: Any, n: int, d: int, device: str) -> str:
    """The ``auto`` rule: see :data:`PARTITION_THRESHOLD`."""
    if method not in KNN_METHODS:
        raise ParameterError(f"method must be one of {KNN_METHODS}, got {method!r}")
    if method != "auto":
        return method
    if is_lazy(X) and n > PARTITION_THRESHOLD:
        return "partitioned"
    return knn_stage.choose_method(n, d, device)


def nearest_neighbors(
    X: Any,
    n_neighbors: int = 15,
    method: str = "auto",
    *,
    overlap: int = 2,
    n_partitions: int | None = None,
    partition_rows: int | None = None,
    refine: bool = False,
    random_state: int | None = 0,
    device: str = "auto",
    recall_samples: int | None = None,
    client=None,
    key: str | None = None,
    work_dir: str | os.PathLike | None = None,
    metric: str = "euclidean",
    local_method: str = "nndescent",
    method_kwds: dict | None = None,
    content: str | None = None,
) -> KNNResult:
    """Approximate kNN of numpy, dask or Zarr input, as dask arrays row-aligned with X.

    Parameters
    ----------
    X
        numpy array, dask array, ``zarr.Array``, or a path to a Zarr array / AnnData store.
    n_neighbors
        k, not counting the point itself.
    method
        ``"auto"``, ``"exact"``, ``"nndescent"``, ``"hnsw"`` (usearch, optional extra
        ``pumap_dask[hnsw]``) or ``"partitioned"``. ``auto``: numpy input
        uses :func:`pumap_dask.knn.choose_method`; lazy input with more than
        :data:`PARTITION_THRESHOLD` rows uses ``"partitioned"``, smaller lazy input is loaded
        and handled like numpy.
    overlap
        Partitions each row is assigned to (its nearest k-means centroids).
    n_partitions, partition_rows
        Force the number of partitions, or the target rows per partition (default
        :data:`DEFAULT_PARTITION_ROWS`, capped by worker memory; see the module docstring).
    refine
        Run a second, independently seeded partitioning and merge both results: rows whose
        true neighbours straddled a partition boundary get a second chance. (A
        neighbours-of-neighbours pass would need k^2 candidate vectors per row from
        anywhere in the data set, about 45 KB per row at k=15 and d=50, moved between workers.)
    random_state
        Seed of the sample, k-means and pynndescent.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``; resolved on each worker (CUDA workers search
        partitions exactly).
    recall_samples
        Rows whose exact neighbours are computed to measure recall@k (0 disables; None:
        :func:`recall_rows` of ``n``).
    client
        A ``distributed.Client``; default: dask's current scheduler (an active client is
        picked up automatically).
    key
        Array inside a Zarr group (AnnData default ``obsm/X_pca``).
    work_dir
        If given, the result is stored under ``work_dir/knn`` (Zarr) and reused by a rerun
        with the same input (path, or dask token of the array) and parameters. It must be
        on a file system all workers see.
    metric
        ``"euclidean"`` or ``"cosine"`` (``1 - cos``; zero-norm rows lie at distance 1 from
        every row, see :mod:`pumap_dask.knn`). Every method, and the recall, uses it.
    local_method
        The search inside each partition of the partitioned method (partitions too large
        for exact search): ``"nndescent"`` (see :func:`local_kernel`) or ``"hnsw"``
        (usearch). Ignored by the other methods.
    method_kwds
        Options of the search back-end: for ``"hnsw"`` (and ``local_method="hnsw"``) ``M``,
        ``ef_construction``, ``ef`` (see :func:`pumap_dask.knn.hnsw_knn`); for
        ``"nndescent"`` NN-descent's (:data:`pumap_dask.knn.DESCENT_KWDS`; others select
        pynndescent in memory); for ``"exact"`` ``block_size``. For the
        partitioned method they reach every partition's local search.
    content
        A digest of X's content (:meth:`pumap_dask.inputs.InputHandle.identity`): the
        ``work_dir`` cache is reused only for input of the same content (without it, for
        the same array name, shape and, for a Zarr path, file sizes and times).

    Returns
    -------
    KNNResult
        Unpacks to ``(indices, distances)``: dask arrays (n, k) of int64 and float32 with
        the row chunks of the validated input, self excluded, sorted ascending; computed
        (persisted or stored), not lazy. ``.recall`` holds the sampled recall@k.

    Raises
    ------
    InputError
        Invalid input; NaN/inf found in a row block (the block is named).
    """

    P.positive_int("n_neighbors", n_neighbors)
    P.positive_int("overlap", overlap)
    P.optional_positive_int("n_partitions", n_partitions)
    P.optional_positive_int("partition_rows", partition_rows)
    if recall_samples is not None:
        P.positive_int("recall_samples", recall_samples, minimum=0)
    P.choice("method", method, KNN_METHODS)
    P.choice("metric", metric, METRICS)
    P.choice("local_method", local_method, LOCAL_METHODS)
    method_kwds = P.knn_kwds(method_kwds, "method_kwds", local_method=False)
    P.device(device)
    P.random_state(random_state)
    P.work_dir(work_dir)
    timings: dict[str, float] = {}
    lazy = is_lazy(X)
    darr = as_dask(X, key=key)
    n, d = darr.shape
    if n < n_neighbors + 1:
        raise InputError(f"n_neighbors={n_neighbors} needs at least {n_neighbors + 1} samples, "
                         f"got {n}")
    dev = knn_stage.resolve_device(device)
    method = resolve_method(method, X, n, d, dev)
    if method == "hnsw" or (method == "partitioned" and local_method == "hnsw"):
        knn_stage.require_hnsw()  # the extra is missing: say so before any work
    if method == "partitioned" and local_method == "nndescent":  # unknown options: now
        knn_stage.check_descent_kwds(knn_stage.backend_kwds("nndescent", method_kwds or {}))
    source = os.path.abspath(os.fspath(X)) if isinstance(X, (str, os.PathLike)) else None
    params = _cache_params(darr, n_neighbors, method, overlap, n_partitions, partition_rows,
                           refine, random_state, source, metric, local_method,
                           method_kwds, content)
    knn_dir = os.path.join(os.fspath(work_dir), "knn") if work_dir is not None else None
    if knn_dir is not None:
        cached = _load_cached(knn_dir, params, darr)
        if cached is not None:
            ind, dist, meta = cached
            return KNNResult(ind, dist, recall=meta.get("recall"), method=method,
                             n_partitions=meta.get("n_partitions"), timings={"cached": 0.0})

    t0 = time.perf_counter()
    checked = checked_finite(darr)
    n_parts = None
    if method == "partitioned":
        ind, dist, n_parts = partitioned_knn(
            checked, n_neighbors, overlap=overlap, n_partitions=n_partitions,
            partition_rows=partition_rows, refine=refine, random_state=random_state,
            device=device, client=client, metric=metric, local_method=local_method,
            local_kwds=method_kwds or None)
        if knn_dir is None:
            sched = {"scheduler": client} if client is not None else {}
            ind, dist = dask.persist(ind, dist, **sched)
            _wait(ind, dist)
    else:
        Xm = X if not lazy else _compute(checked, client=client)
        Xm = check_array(Xm, what="X")
        i, dd = knn_stage.nearest_neighbors_numpy(Xm, n_neighbors, method,
                                                  random_state=random_state, device=dev,
                                                  metric=metric, **(method_kwds or {}))
        ind = da.from_array(i, chunks=(darr.chunks[0], n_neighbors))
        dist = da.from_array(dd, chunks=(darr.chunks[0], n_neighbors))
    if knn_dir is not None:
        _store(knn_dir, ind, dist, params, {"n_partitions": n_parts}, client=client)
        ind, dist, _ = _load_cached(knn_dir, params, darr, reused=False)
    timings["knn"] = time.perf_counter() - t0
    logger.info("kNN (%s, %s, k=%d%s) of %d x %d in %.2fs", method, metric, n_neighbors,
                f", {n_parts} partitions, overlap {overlap}" if n_parts else "", n, d,
                timings["knn"])

    recall = None
    if recall_samples is None:
        recall_samples = recall_rows(n)
    if recall_samples and recall_samples > 0:
        t0 = time.perf_counter()
        # the raw device: each worker resolves "auto" to its own CUDA or CPU
        recall = lazy_sample_recall(darr, ind, recall_samples, random_state, device,
                                    client=client, metric=metric)
        timings["recall"] = time.perf_counter() - t0
        logger.info("kNN recall@%d on %d sampled rows: %.4f (%.2fs)", n_neighbors,
                    min(n, recall_samples), recall, timings["recall"])
        if knn_dir is not None:
            meta_path = os.path.join(knn_dir, "meta.json")
            with open(meta_path) as fh:
                meta = json.load(fh)
            meta["recall"] = recall
            write_json_atomic(meta_path, meta)
    return KNNResult(ind, dist, recall=recall, method=method, n_partitions=n_parts,
                     timings=timings)
