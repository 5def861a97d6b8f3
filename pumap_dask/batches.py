"""Neighbourhood batches: many positive edges per encoded row.

The edge sampler (``batching="edges"``) draws each step's positive edges in proportion to
their weight and encodes both ends of each: about two rows per positive sample, and the
encoder's forward and backward pass is almost all of a step's cost. A neighbourhood batch
instead draws a few *seed* rows uniformly, takes the seeds' graph neighbours, and trains
on **every** edge of the graph between the rows so gathered (each weighted by its
membership strength, as the edge sampler weights them by how often it draws them). On a
kNN graph the neighbours of a row are largely each other's neighbours, so a step encodes
about one row per 5-10 positive edges: the same positive samples for a fraction of the
encoder passes.

Every edge between two batch rows is kept in both directions (the graph holds both). The
trainer repels each from ``negative_sample_rate`` rows of a pool drawn uniformly from all
rows (:func:`pumap_dask.train._neighbourhood_loss`): the batch's own rows come from a few
neighbourhoods only.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .arrays import host_kernel

# Trial draws that size the seeds per step for a wanted number of edges per step.
CALIBRATION_DRAWS = 4
# edges compared per slice when checking that heads come sorted (bounds the temporary)
SORTED_CHECK_SLICE = 1 << 24


class SortedHeads:
    """The head ids of an edge list sorted by head, held as row pointers.

    ``indptr`` (n + 1 int64, as a CSR matrix's) instead of one id per edge: 8 bytes per row
    where the ids take 4 per edge (at 10M rows, 80 MB against 950 MB). ``len`` is the edge
    count; ``np.asarray`` expands the ids (int32 below 2^31 rows) where a caller needs them.
    """

    def __init__(self, indptr: np.ndarray) -> None:
        self.indptr = np.asarray(indptr, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indptr[-1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        n = len(self.indptr) - 1
        ids = np.repeat(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64),
                        np.diff(self.indptr))
        return ids if dtype is None else ids.astype(dtype, copy=False)


def row_pointers(head: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Where rows ``start..stop`` begin in ``head`` (sorted ids): ``stop - start + 1`` int64
    offsets, by binary search (``np.bincount`` would first copy every id to int64).

    The probes take the ids' own type (mixed types would copy the ids too)."""
    probe = head.dtype if stop < np.iinfo(head.dtype).max else np.int64
    return np.searchsorted(head, np.arange(start, stop + 1, dtype=probe),
                           side="left").astype(np.int64)


def is_sorted(a: np.ndarray) -> bool:
    """Whether ``a`` never decreases (checked slice by slice: no full-length temporary)."""
    step = SORTED_CHECK_SLICE
    windows = (a[i:i + step + 1] for i in range(0, max(0, len(a) - 1), step))
    return all(bool(np.all(w[1:] >= w[:-1])) for w in windows)


def _draw_batch(indptr, tail, weight, slot, seeds):  # pragma: no cover - compiled by numba
    """The batch of ``seeds``: its rows (the seeds and their neighbours, sorted, distinct)
    and every edge among them (ends as positions in the rows, CSR order, and weight).

    ``slot`` (one entry per row, all -1) maps a row to its position while drawing and is
    left all -1 again.
    """
    m = len(seeds)
    for r in seeds:
        m += indptr[r + 1] - indptr[r]
    cand = np.empty(m, dtype=np.int64)
    m = 0
    for r in seeds:
        cand[m] = r
        m += 1
    for r in seeds:
        for p in range(indptr[r], indptr[r + 1]):
            cand[m] = tail[p]
            m += 1
    rows = np.unique(cand)
    n_edges = 0
    for i in range(len(rows)):
        slot[rows[i]] = i
        n_edges += indptr[rows[i] + 1] - indptr[rows[i]]
    h = np.empty(n_edges, dtype=np.int64)
    t = np.empty(n_edges, dtype=np.int64)
    w = np.empty(n_edges, dtype=np.float32)
    k = 0
    for i in range(len(rows)):
        for p in range(indptr[rows[i]], indptr[rows[i] + 1]):
            j = slot[tail[p]]
            if j >= 0:  # the tail is a batch row
                h[k] = i
                t[k] = j
                w[k] = weight[p]
                k += 1
    for r in rows:
        slot[r] = -1
    return rows, h[:k].copy(), t[:k].copy(), w[:k].copy()


class NeighbourhoodSampler:
    """Draws neighbourhood batches from an edge list (this rank's edges under DDP).

    Parameters
    ----------
    head, tail, weight
        The edge list (both directions of each graph edge), ids in ``[0, n)``.
    n
        Rows of the training matrix.
    edges_per_step
        Wanted positive edges per step; the seeds per step are sized to give about this
        many (see :meth:`calibrate`).
    """

    def __init__(self, head, tail, weight, n: int, edges_per_step: int) -> None:
        ids = np.int32 if n < 2**31 else np.int64
        if isinstance(head, SortedHeads):
            if len(head.indptr) != n + 1:
                raise ValueError(f"row pointers for {len(head.indptr) - 1} rows, not {n}")
            self.indptr = head.indptr
            order = None
        else:
            head = np.asarray(head)
            order = None if is_sorted(head) else np.argsort(head, kind="stable")
            if order is not None:
                head = head[order]
            self.indptr = row_pointers(head, 0, n)  # no int64 copy of the ids (1.9 GB at 10M)
        if order is not None:  # graphs' edge lists come sorted; others are sorted here
            self.tail = np.asarray(tail)[order].astype(ids)
            self.weight = np.asarray(weight, dtype=np.float32)[order]
        else:
            self.tail = np.asarray(tail).astype(ids, copy=False)  # the caller's, not a copy
            self.weight = np.asarray(weight, dtype=np.float32)
        self.active = np.flatnonzero(np.diff(self.indptr))  # rows with an edge here
        self.slot = np.full(n, -1, dtype=np.int32)  # row -> place in the batch (one per replica)
        self.seeds = self.calibrate(int(edges_per_step))

    def fork(self) -> "NeighbourhoodSampler":
        """A sampler of the same edges (shared, not copied) with its own scratch row map,
        so that two threads can draw at once."""
        twin = copy.copy(self)
        twin.slot = np.full(len(self.slot), -1, dtype=self.slot.dtype)
        return twin

    def draw(self, gen: torch.Generator, seeds: int | None = None):
        """One batch.

        Returns
        -------
        rows : torch.Tensor
            The distinct rows to encode.
        h, t : torch.Tensor
            Each positive edge's ends as positions in ``rows``.
        w : torch.Tensor
            Each positive edge's weight (float32).
        """
        s = self.seeds if seeds is None else seeds
        pick = torch.randint(len(self.active), (s,), generator=gen).numpy()
        rows, h, t, w = host_kernel(_draw_batch)(self.indptr, self.tail, self.weight,
                                                 self.slot, self.active[pick])
        return (torch.from_numpy(rows), torch.from_numpy(h), torch.from_numpy(t),
                torch.from_numpy(w))

    def calibrate(self, edges_per_step: int) -> int:
        """Seeds per step giving about ``edges_per_step`` positive edges.

        The edges grow about linearly with the seeds while neighbourhoods rarely overlap,
        faster on small data; a few scaled trial draws settle it.
        """
        if len(self.active) == 0:
            return 1
        # its own fixed stream: sizing never moves the trainer's (a resumed run repeats)
        probe = torch.Generator().manual_seed(0)
        seeds = max(1, edges_per_step // 32)
        for _ in range(3):
            got = np.mean([len(self.draw(probe, seeds)[1])
                           for _ in range(CALIBRATION_DRAWS)])
            seeds = max(1, int(round(seeds * edges_per_step / max(got, 1.0))))
        return seeds
