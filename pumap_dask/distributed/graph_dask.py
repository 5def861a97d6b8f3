"""Distributed graph stage: fuzzy simplicial set of a chunked kNN, persisted as edge shards.

Per row block (``map_blocks`` style, one task per block of the kNN arrays):

1. rho/sigma and directed memberships with :func:`pumap_dask.graph.smooth_knn_dist` and
   :func:`pumap_dask.graph.membership_strengths` (global mean distance, block row offset).
2. Each block keeps its own edges ``i -> j`` and sends each edge transposed, ``(j, i, w)``,
   to the block owning row ``j`` (a shuffle keyed by destination row block).
3. Each destination block combines the rows it owns, ``W[D, :]`` and ``W^T[D, :]``, exactly as
   :func:`pumap_dask.graph.symmetrize` does (``mix * (W + W^T - W o W^T) + (1 - mix) * W o W^T``).
4. With labels (a semi-supervised fit), :func:`pumap_dask.graph.categorical_intersection`
   per block: each block rescales its own rows (:func:`pumap_dask.graph.label_rows`, row
   local) and sends its entries transposed to the blocks owning their columns, as in step
   2; each block then takes the mean of its rows of ``A`` and ``A^T`` (step 3's formula
   with mix :data:`pumap_dask.graph.LABEL_SET_OP_MIX`).
5. The global maximum weight gives the pruning threshold ``max(w) / n_epochs`` (as
   :func:`pumap_dask.graph.graph_to_edges`), then each block writes its pruned edges
   (head int64, tail int64, weight float32) as one Zarr shard.

Work directory layout (``work_dir/graph``)::

    meta.json                  parameters, kNN (and label) fingerprint, max weight,
                               threshold, shards
    shard-00000.zarr/          a Zarr group {head, tail, weight}, rows of block 0 as heads
    shard-00000.done           completion marker (JSON with the edge count)

Shards are written under a temporary name and renamed when whole; a shard counts only when
its marker exists. A rerun with the same work_dir and parameters reuses complete shards and
recomputes the others (including leftovers of a killed run); other parameters, another kNN
or other labels rebuild the graph. The work directory must be on a
file system that every worker sees.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
import uuid

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import zarr
from dask import delayed
from dask.base import tokenize

from ..arrays import reuses_freed_memory
from ..errors import ParameterError
from ..graph import (
    LABEL_SET_OP_MIX,
    SMOOTH_K_TOLERANCE,
    fuzzy_set_union,
    label_codes,
    label_rows,
    membership_strengths,
    smooth_knn_dist,
)
from ..io import write_json_atomic
from ..params import check_graph_params, optional_positive_int
from ..params import work_dir as check_work_dir
from .edges import META, EdgeStore

logger = logging.getLogger(__name__)

GRAPH_DIR = "graph"


def _shard_name(b: int) -> str:
    return f"shard-{b:05d}.zarr"


def _marker(gdir: str, b: int) -> str:
    return os.path.join(gdir, f"shard-{b:05d}.done")


def _shard_complete(gdir: str, b: int) -> bool:
    return os.path.exists(_marker(gdir, b)) and os.path.isdir(os.path.join(gdir, _shard_name(b)))


# --------------------------------------------------------------------------- tasks
@reuses_freed_memory
def _directed_block(ind: np.ndarray, dist: np.ndarray, offset: int, mean_distance: float,
                    local_connectivity: float, tolerance: float, bounds: np.ndarray) -> dict:
    """Directed memberships of one row block: own edges plus transposed edges by destination."""
    ind = np.asarray(ind, dtype=np.int64)
    sigma, rho = smooth_knn_dist(dist, local_connectivity=local_connectivity,
                                 tolerance=tolerance, mean_distance=mean_distance)
    w = membership_strengths(ind, dist, sigma, rho, row_offset=offset).ravel()
    n_rows, k = ind.shape
    heads = np.repeat(np.arange(n_rows, dtype=np.int64) + offset, k)
    return _exchange(heads, ind.ravel(), w, bounds)


def _exchange(heads: np.ndarray, tails: np.ndarray, w: np.ndarray, bounds: np.ndarray) -> dict:
    """A block's edges ``i -> j`` as its own, plus transposed, ``(j, i, w)``, grouped by
    the block owning row ``j`` (the column slices that block needs for its rows of W^T)."""
    dest = np.searchsorted(bounds, tails, side="right") - 1
    order = np.argsort(dest, kind="stable")
    starts = np.searchsorted(dest[order], np.arange(len(bounds)))
    transposed = []
    for b in range(len(bounds) - 1):
        sel = order[starts[b]:starts[b + 1]]
        transposed.append((tails[sel], heads[sel], w[sel]))  # rows of W^T live in block b
    return {"own": (heads, tails, w), "transposed": transposed}


def _labelled_block(G: sp.csr_matrix, codes: np.ndarray, offset: int, target_weight: float,
                    bounds: np.ndarray) -> dict:
    """Label-weighted, row-rescaled rows of one block (:func:`pumap_dask.graph.label_rows`),
    as own edges plus transposed edges by destination block (see :func:`_exchange`)."""
    A = label_rows(G, codes, target_weight, row_offset=offset).tocoo()
    return _exchange(A.row.astype(np.int64) + offset, A.col.astype(np.int64), A.data, bounds)


@reuses_freed_memory
def _symmetric_rows(own: tuple, incoming: list, offset: int, size: int, n: int,
                    set_op_mix_ratio: float) -> sp.csr_matrix:
    """Rows [offset, offset + size) of the symmetrised graph, shape (size, n)."""
    h, t, w = own
    W = sp.coo_matrix((w, (h - offset, t)), shape=(size, n)).tocsr()
    W.sum_duplicates()
    rows = np.concatenate([p[0] for p in incoming]) - offset
    cols = np.concatenate([p[1] for p in incoming])
    vals = np.concatenate([p[2] for p in incoming])
    Wt = sp.coo_matrix((vals, (rows, cols)), shape=(size, n)).tocsr()
    Wt.sum_duplicates()
    return fuzzy_set_union(W, Wt, set_op_mix_ratio)


def _block_max(G: sp.csr_matrix) -> float:
    return float(G.data.max(initial=0.0))


def _write_shard(G: sp.csr_matrix, gdir: str, b: int, offset: int, threshold: float) -> int:
    """Write one block's pruned edges atomically (temp dir, rename, then marker)."""

    coo = G.tocoo()
    w = coo.data.astype(np.float32)
    keep = w >= threshold if threshold > 0 else w > 0
    head = coo.row[keep].astype(np.int64) + offset
    tail = coo.col[keep].astype(np.int64)
    w = w[keep]
    final = os.path.join(gdir, _shard_name(b))
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    g = zarr.open_group(tmp, mode="w", zarr_format=3)
    chunk = max(1, min(len(w), 1 << 22))
    for name, arr in (("head", head), ("tail", tail), ("weight", w)):
        a = g.create_array(name, shape=arr.shape, chunks=(chunk,), dtype=arr.dtype)
        a[:] = arr
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_json_atomic(_marker(gdir, b), {"n_edges": int(len(w))})
    return int(len(w))


# --------------------------------------------------------------------------- driver
def _fingerprint(indices, distances) -> str:
    return tokenize(indices.name, distances.name)


def _label_plan(y, target_weight: float, n: int) -> tuple[np.ndarray, dict]:
    """Label codes of ``y`` (computed once if lazy) and their entry in the graph parameters."""

    target_weight = float(target_weight)
    if not 0.0 <= target_weight <= 1.0:
        raise ParameterError(f"target_weight must lie in [0, 1], got {target_weight}")
    y = np.asarray(y.compute() if hasattr(y, "compute") else y)
    codes = label_codes(y)
    if codes.shape[0] != n:
        raise ParameterError(f"y has {codes.shape[0]} labels for a graph of {n} points")
    # the smallest code type: every worker holds all n codes (the columns reach any row)
    codes = codes.astype(np.int32 if codes.max(initial=0) < 2**31 - 1 else np.int64)
    digest = hashlib.sha256(np.ascontiguousarray(codes, dtype=np.int64).tobytes()).hexdigest()
    # the symmetrisation rule is part of the parameters: a store of an older rule is rebuilt
    return codes, {"codes": digest, "n_known": int((codes >= 0).sum()),
                   "target_weight": target_weight, "set_op_mix": LABEL_SET_OP_MIX}


def _cleanup(gdir: str, n_blocks: int) -> None:
    """Remove leftovers of killed runs: temp dirs/files and shards without markers."""
    for tmp in glob.glob(os.path.join(gdir, "*.tmp-*")):
        logger.info("removing leftover %s", tmp)
        shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
    for b in range(n_blocks):
        d = os.path.join(gdir, _shard_name(b))
        if os.path.isdir(d) and not os.path.exists(_marker(gdir, b)):
            logger.info("shard %d has no completion marker; recomputing it", b)
            shutil.rmtree(d)
        elif os.path.exists(_marker(gdir, b)) and not os.path.isdir(d):
            os.remove(_marker(gdir, b))


def build_edge_store(
    indices,
    distances,
    work_dir: str | os.PathLike,
    *,
    set_op_mix_ratio: float = 1.0,
    local_connectivity: float = 1.0,
    tolerance: float = SMOOTH_K_TOLERANCE,
    n_epochs: int | None = 200,
    y=None,
    target_weight: float = 0.5,
    client=None,
) -> EdgeStore:
    """Build the fuzzy graph of a chunked kNN on the workers and persist its edges.

    Parameters
    ----------
    indices, distances
        (n, k) kNN arrays (dask or numpy), self excluded, sorted ascending; both with the
        same row chunks. Their row blocks become the graph's row blocks and shards.
    work_dir
        Directory for ``graph/`` (shards and metadata); reused by a rerun.
    set_op_mix_ratio, local_connectivity, tolerance
        As in :func:`pumap_dask.graph.fuzzy_simplicial_set`.
    n_epochs
        Edges with weight below ``max(w) / n_epochs`` are dropped; None or 0 keeps all
        (non-zero) edges.
    y
        Optional (n,) labels of a semi-supervised fit (numpy, or a dask array computed once;
        -1, or NaN for float labels, is unknown; see :func:`pumap_dask.graph.label_codes`).
        They are mixed into the graph on the workers, before pruning, exactly as
        :func:`pumap_dask.graph.categorical_intersection` mixes them into an in-memory
        graph; the shards then hold the labelled graph. Only the label codes (n ints)
        travel to the workers.
    target_weight
        Weight of the labels, in [0, 1] (see
        :func:`pumap_dask.graph.categorical_intersection`); ignored without ``y``.
    client
        A ``distributed.Client``; default: dask's current scheduler.

    Returns
    -------
    EdgeStore
    """

    check_graph_params(set_op_mix_ratio, local_connectivity, tolerance)
    optional_positive_int("n_epochs", n_epochs or None)
    if check_work_dir(work_dir) is None:
        raise ParameterError("work_dir is required: the edge shards are written there")
    if not isinstance(indices, da.Array):
        indices = da.from_array(np.asarray(indices), chunks=(min(len(indices), 100_000), -1))
    if not isinstance(distances, da.Array):
        distances = da.from_array(np.asarray(distances), chunks=indices.chunks)
    if indices.shape != distances.shape or indices.chunks[0] != distances.chunks[0]:
        raise ParameterError("indices and distances must have the same shape and row chunks")
    indices = indices.rechunk({1: -1})
    distances = distances.rechunk({1: -1})
    sched = {"scheduler": client} if client is not None else {}
    n, k = indices.shape
    chunks = tuple(int(c) for c in indices.chunks[0])
    bounds = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
    B = len(chunks)
    gdir = os.path.join(os.fspath(work_dir), GRAPH_DIR)
    os.makedirs(gdir, exist_ok=True)
    params = {"n": int(n), "k": int(k), "chunks": list(chunks),
              "set_op_mix_ratio": float(set_op_mix_ratio),
              "local_connectivity": float(local_connectivity), "tolerance": float(tolerance),
              "n_epochs": n_epochs, "knn": _fingerprint(indices, distances)}
    codes = None
    if y is not None:  # an unlabelled graph keeps its parameters (and old stores stay valid)
        codes, params["labels"] = _label_plan(y, target_weight, n)
    meta_path = os.path.join(gdir, META)
    meta = None
    if os.path.exists(meta_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("params") != params:
            logger.info("graph in %s was built with other parameters or kNN; rebuilding", gdir)
            for old in glob.glob(os.path.join(gdir, "shard-*")):
                shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
            os.remove(meta_path)
            meta = None
        elif meta.get("complete"):
            logger.info("graph reused from %s", gdir)
            return EdgeStore(gdir)
    if meta is None:
        # shards without a meta.json have no known parameters or threshold: never reuse them
        for old in glob.glob(os.path.join(gdir, "shard-*")):
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    _cleanup(gdir, B)

    t0 = time.perf_counter()
    total = float(distances.sum(dtype=np.float64).compute(**sched))
    mean_distance = total / (n * (k + 1)) if n else 0.0
    ind_blocks = indices.to_delayed().ravel()
    dist_blocks = distances.to_delayed().ravel()
    directed = [delayed(_directed_block, pure=True)(
        ib, db, int(bounds[b]), mean_distance, float(local_connectivity), float(tolerance),
        bounds) for b, (ib, db) in enumerate(zip(ind_blocks, dist_blocks))]
    sym = []
    for b in range(B):
        incoming = [directed[s]["transposed"][b] for s in range(B)]
        sym.append(delayed(_symmetric_rows, pure=True)(
            directed[b]["own"], incoming, int(bounds[b]), chunks[b], int(n),
            float(set_op_mix_ratio)))
    if codes is not None:
        # categorical intersection: rows rescaled per block, then the mean of A and A^T,
        # whose rows come from every block's column slice (the exchange of step 2)
        codes_d = delayed(codes, pure=True)  # one key: shipped once per worker
        labelled = [delayed(_labelled_block, pure=True)(
            sym[b], codes_d, int(bounds[b]), params["labels"]["target_weight"], bounds)
            for b in range(B)]
        sym = [delayed(_symmetric_rows, pure=True)(
            labelled[b]["own"], [labelled[s]["transposed"][b] for s in range(B)],
            int(bounds[b]), chunks[b], int(n), LABEL_SET_OP_MIX) for b in range(B)]

    if meta is None or "threshold" not in meta:
        # stage 1: symmetrise on the workers (kept there) and find the global maximum
        sym = list(dask.persist(*sym, **sched))
        maxima = dask.compute(*[delayed(_block_max)(g) for g in sym], **sched)
        max_w = float(max(maxima, default=0.0))
        # float32 like the in-memory path, so an edge at the threshold is kept the same way
        threshold = float(np.float32(max_w) / np.float32(n_epochs)) if n_epochs else 0.0
        meta = {"params": params, "max_weight": max_w, "threshold": threshold,
                "complete": False}
        write_json_atomic(meta_path, meta)
    threshold = float(meta["threshold"])
    logger.info("graph: symmetrised %d rows in %d blocks (max weight %.4g, threshold %.4g) "
                "in %.2fs", n, B, meta["max_weight"], threshold, time.perf_counter() - t0)
    if codes is not None:
        logger.info("graph: labels mixed in on the workers (target_weight %.2f, %d of %d rows "
                    "labelled)", params["labels"]["target_weight"],
                    params["labels"]["n_known"], n)

    # stage 2: write the missing shards
    t0 = time.perf_counter()
    todo = [b for b in range(B) if not _shard_complete(gdir, b)]
    writes = [delayed(_write_shard)(sym[b], gdir, b, int(bounds[b]), threshold) for b in todo]
    dask.compute(*writes, **sched)
    shards = []
    for b in range(B):
        with open(_marker(gdir, b)) as fh:
            n_edges = json.load(fh)["n_edges"]
        shards.append({"name": _shard_name(b), "rows": [int(bounds[b]), int(bounds[b + 1])],
                       "n_edges": int(n_edges)})
    meta.update(shards=shards, complete=True)
    write_json_atomic(meta_path, meta)
    store = EdgeStore(gdir)
    logger.info("graph: wrote %d of %d shards, %d edges in total, in %.2fs", len(todo), B,
                store.n_edges, time.perf_counter() - t0)
    return store
