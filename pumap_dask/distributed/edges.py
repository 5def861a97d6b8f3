"""The edge store: the contract between the graph stage and training.

:func:`pumap_dask.distributed.graph_dask.build_edge_store` writes the pruned symmetric
fuzzy graph as one Zarr shard per row block (``head`` int64, ``tail`` int64, ``weight``
float32, rows of the block as heads) plus ``meta.json``; :class:`EdgeStore` reads it back,
shard by shard or whole, for the trainer. Layout of ``work_dir/graph``::

    meta.json                  parameters, kNN fingerprint, max weight, threshold, shards
    shard-00000.zarr/          a Zarr group {head, tail, weight}
    shard-00000.done           completion marker (JSON with the edge count)
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import zarr

from ..batches import SortedHeads, is_sorted, row_pointers

META = "meta.json"


class EdgeStore:
    """Read access to an edge list persisted as shards by :func:`build_edge_store`.

    Parameters
    ----------
    path
        The graph directory (``work_dir/graph``).

    Attributes
    ----------
    n_vertices, n_edges, threshold, max_weight, params
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with open(os.path.join(self.path, META)) as fh:
            meta = json.load(fh)
        if not meta.get("complete"):
            raise RuntimeError(f"the edge store in {self.path} is incomplete; rerun the graph "
                               "stage with the same work_dir to finish it")
        self.meta = meta
        self.params = meta["params"]
        self.n_vertices = int(meta["params"]["n"])
        self.threshold = float(meta["threshold"])
        self.max_weight = float(meta["max_weight"])
        self.shards = [s["name"] for s in meta["shards"]]
        self.n_edges = int(sum(s["n_edges"] for s in meta["shards"]))

    def __repr__(self) -> str:
        return (f"EdgeStore({self.path!r}, n_vertices={self.n_vertices}, n_edges={self.n_edges}, "
                f"shards={len(self.shards)})")

    def __len__(self) -> int:
        return len(self.shards)

    def read_shard(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Edges of shard ``i`` as (head int64, tail int64, weight float32)."""
        return _read_shard(os.path.join(self.path, self.shards[i]))

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield each shard's (head, tail, weight) in row order."""
        for i in range(len(self.shards)):
            yield self.read_shard(i)

    __iter__ = iter_shards

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All edges in memory: (head int64, tail int64, weight float32)."""
        parts = list(self.iter_shards())
        if not parts:
            return (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))

    def read_compact(self, shards: list[int] | None = None, pointers: bool = False
                     ) -> tuple[np.ndarray | SortedHeads, np.ndarray, np.ndarray]:
        """The edges of ``shards`` (default: all, in row order), shard by shard, with the
        narrowest index type.

        Memory is 12 bytes per edge below 2^31 vertices (int32 ids, float32 weights), plus
        one shard's int64 ids while it is copied in. With ``pointers`` the heads come as
        :class:`pumap_dask.batches.SortedHeads` (8 bytes per row instead of 4 per edge:
        what neighbourhood batches use) when the edges read are sorted by head, as the
        graph stage writes them.
        """
        ids = range(len(self.shards)) if shards is None else shards
        count = sum(int(self.meta["shards"][i]["n_edges"]) for i in ids)
        itype = np.int32 if self.n_vertices < 2**31 else np.int64
        head = None if pointers else np.empty(count, itype)
        counts = np.zeros(self.n_vertices, np.int64) if pointers else None
        tail = np.empty(count, itype)
        weight = np.empty(count, np.float32)
        at, last = 0, -1
        for h, t, w in map(self.read_shard, ids):
            if counts is not None:
                if len(h) and (h[0] < last or not is_sorted(h)):  # not sorted: ids after all
                    return self.read_compact(shards)
                if len(h):  # the shard's rows' edge counts, from its own row pointers
                    lo, hi = int(h[0]), int(h[-1]) + 1
                    counts[lo:hi] += np.diff(row_pointers(h, lo, hi))
                    last = hi - 1
            else:
                head[at:at + len(h)] = h
            tail[at:at + len(h)] = t
            weight[at:at + len(h)] = w
            at += len(h)
        if counts is not None:
            indptr = np.zeros(self.n_vertices + 1, np.int64)
            np.cumsum(counts, out=indptr[1:])
            return SortedHeads(indptr), tail, weight
        return head, tail, weight

    def to_csr(self) -> sp.csr_matrix:
        """The (pruned) symmetric graph as an (n, n) CSR matrix."""
        h, t, w = self.read()
        n = self.n_vertices
        return sp.csr_matrix((w, (h, t)), shape=(n, n))

    def nbytes_on_disk(self) -> int:
        """Bytes used by the shards on disk."""
        total = 0
        for name in self.shards:
            for root, _, files in os.walk(os.path.join(self.path, name)):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total


def _read_shard(path: str):
    g = zarr.open_group(path, mode="r")
    return (np.asarray(g["head"][:], dtype=np.int64), np.asarray(g["tail"][:], dtype=np.int64),
            np.asarray(g["weight"][:], dtype=np.float32))
