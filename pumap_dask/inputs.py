"""The fit's input, opened once: the handle every stage reads, and the checks made at the door.

:func:`open_input` validates ``X`` lazily (shape, dtype, chunks; NaN for numpy) into an
:class:`InputHandle`; :func:`check_sizes` and :func:`check_labels` are the pre-flight
checks the pipeline, the command line and ``embed`` share.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import dask
import numpy as np

from .arrays import is_cupy, sample_ids, to_host
from .errors import InputError
from .graph import label_codes
from .io import (
    as_dask,
    block_digests,
    block_sha256,
    check_array,
    checked_finite,
    content_sha256,
    flatten_input,
    input_shape_of,
    is_lazy,
)

logger = logging.getLogger(__name__)
# Largest training matrix (bytes, float32) loaded into the training process for lazy input.
TRAIN_MEMORY_BUDGET = 4 << 30


@dataclass(frozen=True)
class RowSample:
    """A seeded uniform sample of another input's rows, as something the workers open.

    Holds the parent's ``source`` and ``key`` and the sample's size and seed, from which
    :func:`pumap_dask.arrays.sample_ids` draws the same rows wherever it is opened
    (:func:`open_input`): a training rank receives a few bytes, not the sample's row ids
    inside a dask graph (8 bytes per row, which a sample of millions of rows would make
    too large to ship).
    """

    source: Any
    key: str | None
    rows: int
    seed: int


@dataclass
class InputHandle:
    """The validated input, opened once.

    Attributes
    ----------
    darr
        Lazy float32 dask array (features in one chunk), nothing computed.
    data
        The rows in memory (numpy input, or lazy input once loaded), else None.
    lazy
        Whether the input came as a dask/Zarr array or a path.
    source
        The input, as given (a path stays a path, so the stages reopen nothing else).
    key
        Array inside a Zarr group.
    """

    darr: Any
    data: np.ndarray | None
    lazy: bool
    source: Any
    key: str | None
    input_shape: tuple | None = None  # trailing shape of n-D numpy input (rows flattened)
    opened_from: RowSample | None = None  # a lazy sample's recipe (see opener)
    _identity: dict | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.darr.shape[0])

    @property
    def d(self) -> int:
        return int(self.darr.shape[1])

    def check_budget(self) -> None:
        """Fail (before any stage) when the training matrix would not fit
        :data:`TRAIN_MEMORY_BUDGET` bytes."""
        budget = TRAIN_MEMORY_BUDGET
        need = self.n * self.d * 4
        if self.data is None and need > budget:
            raise InputError(
                f"the training matrix needs {need / 2**30:.1f} GiB, above the training "
                f"memory budget of {budget / 2**30:.1f} GiB "
                "(pumap_dask.inputs.TRAIN_MEMORY_BUDGET); raise it, or reduce the features "
                "first (e.g. PCA to 50 components, as single-cell pipelines do)")

    def load(self) -> np.ndarray:
        """The rows in memory (loaded block by block, NaN-checked, once)."""
        if self.data is None:
            self.check_budget()
            logger.info("loading %d x %d input into memory for training", self.n, self.d)
            self.data = check_array(checked_finite(self.darr).compute(), what="X")
        return self.data

    def identity(self) -> dict:
        """What the input is, by content: ``{"rows", "features", "sha256"}``.

        In-memory rows are hashed directly; lazy input block by block on the workers, in
        one read that also checks every block for NaN (so a bad late block fails here,
        before the kNN). Work-directory artefacts (kNN cache, training checkpoints) are
        reused only for the same identity, and the saved model records it.
        """
        if self._identity is None:
            if self.data is not None:
                sha = content_sha256(np.frombuffer(bytes.fromhex(block_sha256(self.data)),
                                                   np.uint8), self.data.shape,
                                     (self.data.shape[0],))
                self._identity = {"rows": self.n, "features": self.d, "sha256": sha}
            else:
                identities([self])
        return self._identity

    def _identify(self, digests: np.ndarray) -> None:
        """Record the identity of lazy input from its blocks' digests."""
        sha = content_sha256(digests, self.darr.shape, self.darr.chunks[0])
        self._identity = {"rows": self.n, "features": self.d, "sha256": sha}

    def sample(self, m: int, seed: int) -> tuple["InputHandle", np.ndarray]:
        """A seeded uniform sample of ``m`` rows as an input of its own, and its row ids.

        In-memory rows are copied; lazy input stays lazy (its blocks are read where the
        sample's are computed, in blocks of the input's row chunk). Its identity is its
        own rows' content (hashed when asked for: one more read of the input's blocks), so
        work-directory artefacts of a sample are reused only for the same rows, and a
        training rank's row cache checks them as any input's.
        """
        ids = sample_ids(self.n, m, seed)
        if self.data is not None:
            data = self.data[ids]
            out = InputHandle(as_dask(data), data, False, data, None, self.input_shape)
        else:
            darr = self.darr[ids].rechunk({0: max(self.darr.chunks[0])})
            source, key = self.opener()
            out = InputHandle(darr, None, True, darr, None, self.input_shape,
                              opened_from=RowSample(source, key, m, seed))
        return out, ids

    def opener(self) -> tuple[Any, str | None]:
        """What a worker passes to :func:`open_input` to open these rows itself: the
        ``(source, key)`` they came from, or for a lazy sample its :class:`RowSample`."""
        if self.opened_from is not None:
            return self.opened_from, None
        return self.source, self.key

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Some rows (sorted ids) in memory, read from the input without loading the rest."""
        if self.data is not None:
            return self.data[ids]
        return check_array(checked_finite(self.darr)[ids].compute(), what="X")


def identities(handles: Sequence[InputHandle]) -> list[dict]:
    """Each input's :meth:`~InputHandle.identity`, the lazy ones' blocks read in one pass.

    The digests of all lazy inputs not yet identified are computed together, so inputs
    built from the same blocks (a sample, :meth:`InputHandle.sample`, and the input it was
    drawn from) read those blocks once: their read tasks are the same tasks.
    """
    lazy = list({id(h): h for h in handles if h._identity is None and h.data is None}.values())
    if lazy:
        t0 = time.perf_counter()
        digests = dask.compute(*(block_digests(h.darr) for h in lazy))
        for h, dg in zip(lazy, digests):
            h._identify(dg)
        logger.info("input identity: %d blocks read and hashed in %.1fs",
                    sum(len(dg) for dg in digests), time.perf_counter() - t0)
    return [h.identity() for h in handles]


def open_input(X: Any, key: str | None = None) -> InputHandle:
    """Validate ``X`` lazily (shape, dtype, chunks; NaN for numpy) and open it once.

    ``X`` may be a :class:`RowSample` (what :meth:`InputHandle.opener` gives a worker): its
    parent is opened and the same rows sampled.
    """
    if isinstance(X, RowSample):
        return open_input(X.source, X.key).sample(X.rows, X.seed)[0]

    lazy = is_lazy(X)
    if lazy:
        flatten_input(X)  # n-D lazy input: a clear error
        if is_cupy(getattr(X, "_meta", None)) or is_cupy(X):
            X = X.map_blocks(to_host, dtype=X.dtype, meta=np.empty((0,) * X.ndim, X.dtype))
            logger.info("fit: CuPy chunks are copied to host memory block by block (the kNN "
                        "and graph stages run on the host; training uses the GPU when "
                        "device allows)")
        return InputHandle(as_dask(X, key=key), None, True, X, key)
    if is_cupy(X):
        logger.info("fit: copying the CuPy array to host memory (the kNN and graph stages "
                    "run on the host; training uses the GPU when device allows)")
        X = to_host(X)
    # n-D numpy input (n, *dims): every stage sees flattened rows; the shape is kept for
    # the networks (see pumap_dask.networks)
    shape = input_shape_of(X)
    data = check_array(flatten_input(X), what="X", min_samples=1)
    return InputHandle(as_dask(data), data, False, X if shape is None else data, key, shape)


def check_sizes(handle: InputHandle, n_neighbors: int) -> None:
    """Fail before any stage when there are too few rows for ``n_neighbors``."""
    if handle.n < n_neighbors + 1:
        raise InputError(f"X has {handle.n} samples but n_neighbors={n_neighbors} needs at "
                         f"least {n_neighbors + 1}; lower n_neighbors or add samples")


def check_labels(y: Any, n: int) -> np.ndarray:
    """Validate the labels of a semi-supervised fit before any stage runs.

    Parameters
    ----------
    y
        One label per row of X: numpy, a list, or a dask array (computed here, once: n
        labels are held on the client for in-memory and partitioned fits alike).
    n
        The number of rows of X.

    Returns
    -------
    numpy.ndarray
        The labels, in memory.

    Raises
    ------
    InputError
        When y is not a 1-d vector of n labels, or its labels cannot be compared (mixed
        types).
    """
    y = np.asarray(y.compute() if hasattr(y, "compute") else y)
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"y must be a 1-d vector of {n} labels (one per row of X; -1 for "
                         f"unknown), got shape {y.shape}")
    try:
        label_codes(y)
    except TypeError as exc:
        raise InputError(f"y: the labels must be of one comparable type (ints, floats or "
                         f"strings), got {y.dtype} values that cannot be sorted: {exc}") from exc
    return y
