"""Placement polish of new points against the frozen training embedding (``refine=True``).

The encoder generalises less than UMAP's own kNN-based transform on small training sets
(issue 11). :func:`refine_embedding` closes that gap the way umap-learn's ``transform``
places new points: each new row's neighbours among the training rows (exact, blockwise
torch) define fuzzy memberships, and a few epochs of the UMAP attractive/repulsive SGD
move the new points only, the training embedding fixed. The start is the encoder's output,
so fewer epochs are needed than from umap-learn's weighted-mean start.

Every step is per row: each row's edges are sampled on a deterministic schedule from
their weight, and its negative samples come from a counter-based hash of (seed, global
row id, epoch, neighbour, sample). A row's result therefore does not depend on how the
input is chunked, and :func:`refine_transform` maps the polish over dask row blocks
lazily, with the training rows and embedding shipped once as one task-graph key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from .arrays import sample_ids, to_host
from .errors import InputError, ModelFileError, ParameterError
from .graph import smooth_knn_dist
from .io import is_lazy
from .knn import exact_knn
from .model import TRAINING_DATA, checked_file, load_embedding, read_config

logger = logging.getLogger(__name__)

DEFAULT_REFINE_EPOCHS = 100
DEFAULT_MAX_TRAINING_ROWS = 200_000


@dataclass(frozen=True)
class RefineReference:
    """What the polish needs of the fit: training rows, their embedding and the curve."""

    data: np.ndarray        # (m, d) float32 training rows (all, or a sample)
    embedding: np.ndarray   # (m, n_components) float32, row-aligned with ``data``
    a: float
    b: float
    n_neighbors: int
    metric: str = "euclidean"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _negatives(row_ids: np.ndarray, key: int, n_samples: int, m: int) -> np.ndarray:
    """(n, n_samples) pseudo-random training ids, a function of (row id, key, sample) only."""
    k = _splitmix64(np.array([key], dtype=np.uint64))[0]
    base = _splitmix64(row_ids.astype(np.uint64) ^ k)
    s = np.arange(1, n_samples + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    with np.errstate(over="ignore"):
        h = _splitmix64(base[:, None] + s[None, :])
    return (h % np.uint64(m)).astype(np.int64)


def memberships(distances: np.ndarray, local_connectivity: float = 1.0) -> np.ndarray:
    """Fuzzy memberships of new rows to their training neighbours, row by row.

    ``exp(-max(0, d - rho) / sigma)`` with the per-row rho and sigma of the training graph
    (:func:`pumap_dask.graph.smooth_knn_dist`); the nearest neighbour gets 1. No statistic
    across rows enters, so a row's weights do not depend on its block.
    """

    sigma, rho = smooth_knn_dist(distances, local_connectivity=local_connectivity,
                                 mean_distance=0.0)
    gap = distances.astype(np.float32) - rho[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = np.exp(-(gap / sigma[:, None]))
    return np.where((gap <= 0) | (sigma[:, None] == 0), 1.0, w).astype(np.float32)


def optimize_new_points(init: np.ndarray, reference_embedding: np.ndarray,
                        indices: np.ndarray, weights: np.ndarray, *, a: float, b: float,
                        n_epochs: int = DEFAULT_REFINE_EPOCHS, learning_rate: float = 0.25,
                        negative_sample_rate: int = 5, repulsion_strength: float = 1.0,
                        row_ids: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """UMAP's SGD on new points only (umap-learn's ``move_other=False``), vectorised.

    Each epoch visits the k neighbour columns in turn; an edge of weight w is sampled in
    epoch e when ``floor((e + 1) w) > floor(e w)`` (w <= 1, so about w times per epoch, as
    umap-learn's ``epochs_per_sample``), and each sample pulls the point towards its
    neighbour and pushes it from ``negative_sample_rate`` random training points, with
    umap-learn's gradients, clipping at 4 and learning rate decayed linearly to zero.

    Parameters
    ----------
    init
        (n, c) starting positions (the encoder's output).
    reference_embedding
        (m, c) fixed training embedding.
    indices, weights
        (n, k) neighbour ids into ``reference_embedding`` and their memberships in [0, 1].
    a, b
        The fitted low-dimensional curve.
    n_epochs
        Epochs of SGD (0 returns ``init``).
    learning_rate
        Initial step size (umap-learn's transform uses its learning rate / 4 = 0.25).
    negative_sample_rate, repulsion_strength
        As in UMAP.
    row_ids
        Global ids of the rows (default 0..n-1): they seed the negative samples, so a row
        gets the same result in any block.
    seed
        Seed of the negative samples.

    Returns
    -------
    numpy.ndarray
        (n, c) float32 positions.
    """
    Y = np.array(init, dtype=np.float32, copy=True)
    E = np.asarray(reference_embedding, dtype=np.float32)
    n, k = indices.shape
    if n == 0 or n_epochs <= 0:
        return Y
    m = E.shape[0]
    rows = np.arange(n, dtype=np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, 1.0)
    w = np.where(w < 1.0 / n_epochs, 0.0, w)  # umap-learn drops edges too weak to sample
    a, b = float(a), float(b)
    two_ab, two_gb = 2.0 * a * b, 2.0 * repulsion_strength * b
    S = int(negative_sample_rate)
    for e in range(n_epochs):
        alpha = np.float32(learning_rate * (1.0 - e / n_epochs))
        sampled = np.floor((e + 1) * w) > np.floor(e * w)
        for j in range(k):
            sel = np.flatnonzero(sampled[:, j])
            if sel.size == 0:
                continue
            y = Y[sel]
            diff = y - E[indices[sel, j]]
            d2 = (diff * diff).sum(1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                coef = np.where(d2 > 0, -two_ab * d2 ** (b - 1.0) / (a * d2 ** b + 1.0), 0.0)
            y = y + alpha * np.clip(coef * diff, -4.0, 4.0).astype(np.float32)
            if S:
                neg = _negatives(rows[sel], (seed * 1_000_003 + e) * 4099 + j, S, m)
                diff = y[:, None, :] - E[neg]
                d2 = (diff * diff).sum(2, keepdims=True)
                coef = np.where(d2 > 0, two_gb / ((0.001 + d2) * (a * d2 ** b + 1.0)), 0.0)
                y = y + alpha * np.clip(coef * diff, -4.0, 4.0).sum(1).astype(np.float32)
            Y[sel] = y
    return Y


def refine_embedding(X: np.ndarray, init: np.ndarray, reference: RefineReference, *,
                     n_epochs: int = DEFAULT_REFINE_EPOCHS, row_offset: int = 0,
                     seed: int = 0, device: str = "cpu",
                     learning_rate: float = 0.25) -> np.ndarray:
    """Polish the encoder's embedding ``init`` of new rows ``X`` against the training data.

    Parameters
    ----------
    X
        (n, d) new rows.
    init
        (n, c) their encoder embedding.
    reference
        Training rows, embedding and curve (see :func:`reference_from_model`).
    n_epochs
        SGD epochs (default 100, umap-learn's for small sets).
    row_offset
        Global id of the first row (for chunk-independent negative samples).
    seed
        Seed of the negative samples.
    device
        Device of the exact kNN search.
    learning_rate
        Initial SGD step.

    Returns
    -------
    numpy.ndarray
        (n, c) float32 refined positions. Rows whose ``init`` is not finite, and rows equal
        to a training row (whose encoder output is their training position), stay as
        they are.
    """

    X = np.asarray(X, dtype=np.float32)
    out = np.array(init, dtype=np.float32, copy=True)
    ok = np.isfinite(out).all(1) & np.isfinite(X).all(1)
    if not ok.any():
        return out
    k = min(reference.n_neighbors, reference.data.shape[0])
    ind, dist = exact_knn(X[ok], k, Y=reference.data, device=device, metric=reference.metric)
    # a row equal to a training row keeps the encoder's output, its training position (as
    # umap-learn's transform returns embedding_ for the training data itself)
    move = ~(X[ok] == reference.data[ind[:, 0]]).all(1)
    sel = np.flatnonzero(ok)[move]
    rows = sel.astype(np.int64) + int(row_offset)
    out[sel] = optimize_new_points(out[sel], reference.embedding, ind[move],
                                   memberships(dist[move]), a=reference.a, b=reference.b,
                                   n_epochs=n_epochs, row_ids=rows, seed=seed,
                                   learning_rate=learning_rate)
    return out


# ---------------------------------------------------------------------- training rows
def keep_training_rows(X: Any, max_rows: int = DEFAULT_MAX_TRAINING_ROWS,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The training rows a fitted estimator keeps for ``transform(..., refine=True)``.

    In-memory input is kept as float32 (a reference when it already is float32 and
    C-contiguous); above ``max_rows`` rows, a fixed random sample of ``max_rows`` rows and
    their ids. Lazy input (dask, Zarr, paths) is not kept (None): pass ``training_data=``
    to ``transform`` or refine against a saved model's stored rows.

    Returns
    -------
    (rows, ids) or None
        ``ids`` is None when every row is kept.
    """

    if X is None or is_lazy(X):
        return None

    X = to_host(X)  # CuPy input: the host copy
    X = X.reshape(X.shape[0], -1)
    if X.shape[0] > max_rows:
        ids = sample_ids(X.shape[0], max_rows, seed)
        return np.ascontiguousarray(X[ids], dtype=np.float32), ids
    return np.ascontiguousarray(X, dtype=np.float32), None


def training_rows_for_save(est: Any, embedding: np.ndarray | None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(embedding, training rows) to store with ``save(..., include_training_data=True)``.

    When the estimator kept a sample of its rows, only the sample is stored; its row ids
    are regenerated on load from ``random_state`` (see :func:`sample_ids`).

    Raises
    ------
    InputError
        When the estimator kept no training rows (it was fitted on lazy input) or the
        embedding is not saved.
    """
    kept = getattr(est, "_refine_rows", None)
    if kept is None and has_training_rows(est):  # a loaded model that stores its rows
        kept = (reference_from_model(est).data, None)
    if kept is None:
        raise InputError("include_training_data=True needs the training rows, which this "
                         "model did not keep (it was fitted on lazy input or loaded without "
                         "them); fit on in-memory data")
    if embedding is None:
        raise InputError("include_training_data=True needs include_embedding=True (the "
                         "rows are refined against the training embedding)")
    return embedding, kept[0]


def stored_reference(path: str | os.PathLike) -> RefineReference | None:
    """The refine reference stored in a saved model directory, or None if it has none.

    Raises
    ------
    pumap_dask.model.ModelFileError
        When the stored rows or embedding are corrupt or inconsistent.
    """

    doc = read_config(path)
    sha = doc.get("training_data_sha256")
    if not sha:
        return None
    tpath = checked_file(path, TRAINING_DATA, sha, "training data was")
    data = np.load(tpath, allow_pickle=False)
    emb = load_embedding(path, doc)
    params, fitted = doc["params"], doc["fitted"]
    if emb is None:
        raise ModelFileError(f"{tpath} is stored without the training embedding")
    if data.shape[0] < emb.shape[0]:  # a sample: its ids follow from the seed
        emb = emb[sample_ids(emb.shape[0], data.shape[0], params.get("random_state") or 0)]
    if emb.shape[0] != data.shape[0]:
        raise ModelFileError(f"{tpath} is not row-aligned with the stored embedding")
    return RefineReference(data, np.asarray(emb, np.float32), float(fitted["a"]),
                           float(fitted["b"]), int(params.get("n_neighbors", 15)),
                           params.get("metric", "euclidean"))


_NO_ROWS = ("transform(..., refine=True) needs the training rows: fit on in-memory data "
            "(the estimator keeps them), pass training_data= (the rows the model was fitted "
            "on), or load a model saved with save(..., include_training_data=True)")


def reference_from_model(model: Any, training_data: Any = None) -> RefineReference:
    """The training rows, embedding and curve that ``refine=True`` polishes against.

    Parameters
    ----------
    model
        A fitted (or loaded) :class:`~pumap_dask.ParametricUMAP`.
    training_data
        The rows the model was fitted on (row-aligned with its embedding); overrides the
        kept or stored rows. Lazy arrays are computed (at most
        ``DEFAULT_MAX_TRAINING_ROWS`` rows are kept, a fixed sample).

    Raises
    ------
    InputError
        When no training rows or no training embedding are available.
    """
    emb = getattr(model, "embedding_", None)
    if emb is None:
        raise InputError("transform(..., refine=True) needs the training embedding; save "
                         "the model with include_embedding=True")
    emb = np.asarray(emb, dtype=np.float32)
    a, b, k = float(model.a_), float(model.b_), int(model.n_neighbors)
    metric = getattr(model, "metric", "euclidean")
    if training_data is not None:
        X = training_data
        if hasattr(X, "compute"):
            X = X.compute()
        X = np.asarray(X)
        if X.shape[0] != emb.shape[0]:
            raise InputError(f"training_data has {X.shape[0]} rows but the model was fitted "
                             f"on {emb.shape[0]}; pass the rows it was fitted on")
        rows, ids = keep_training_rows(X)
        return RefineReference(rows, emb if ids is None else emb[ids], a, b, k, metric)
    kept = getattr(model, "_refine_rows", None)
    if kept is not None:
        rows, ids = kept
        return RefineReference(rows, emb if ids is None else emb[ids], a, b, k, metric)
    cached = getattr(model, "_refine_reference", None)
    if cached is not None:
        return cached
    path = getattr(model, "model_path_", None)
    if path and os.path.exists(path):
        ref = stored_reference(path)
        if ref is not None:
            model._refine_reference = ref  # read and checked once per loaded model
            return ref
    raise InputError(_NO_ROWS)


def check_refine(refine: Any) -> bool:
    """Validate ``transform``'s ``refine`` argument: True (polish) or False (the encoder)."""
    if isinstance(refine, (bool, np.bool_)):
        return bool(refine)
    raise ParameterError(f"refine must be True (polish new points against the training "
                         f"embedding) or False (the encoder alone, the default), got {refine!r}")


def has_training_rows(model: Any) -> bool:
    """Whether ``model`` holds (or its saved directory stores) rows to refine against."""
    if getattr(model, "_refine_rows", None) is not None \
            or getattr(model, "_refine_reference", None) is not None:
        return True
    path = getattr(model, "model_path_", None)  # set, with what it stores, by load()
    return bool(path and getattr(model, "_training_data_sha256", None)
                and getattr(model, "embedding_", None) is not None and os.path.exists(path))


def _refine_block(block: np.ndarray, init: np.ndarray, offset: np.ndarray,
                  reference: RefineReference, n_epochs: int, seed: int) -> np.ndarray:
    """Refine one row block (runs on a worker); its global row offset seeds the negatives."""
    return refine_embedding(np.asarray(block), init, reference, n_epochs=n_epochs,
                            row_offset=int(offset[0]) if len(offset) else 0, seed=seed)


def refine_transform(X: Any, init: Any, reference: RefineReference, *,
                     n_epochs: int = DEFAULT_REFINE_EPOCHS, seed: int = 0) -> Any:
    """Refine an embedding of ``X``: numpy in, numpy out; dask in, lazy dask out.

    Parameters
    ----------
    X
        The new rows (numpy or dask array; one column chunk is made if needed).
    init
        Their encoder embedding, same row chunks as ``X`` when lazy.
    reference
        See :func:`reference_from_model`; shipped to the workers once, as one key.
    n_epochs, seed
        See :func:`refine_embedding`.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        (n, n_components) float32. The result for a row does not depend on the chunking
        (up to float rounding of the kNN distances).
    """
    if not hasattr(init, "dask"):
        return refine_embedding(np.asarray(X).reshape(len(X), -1), init, reference,
                                n_epochs=n_epochs, seed=seed)

    darr = X if hasattr(X, "dask") else da.from_array(np.asarray(X), chunks=(init.chunks[0],
                                                                              -1))
    if darr.ndim > 2:
        darr = darr.reshape(darr.shape[0], -1)
    if len(darr.chunks[1]) > 1:
        darr = darr.rechunk({1: -1})
    if darr.chunks[0] != init.chunks[0]:
        darr = darr.rechunk({0: init.chunks[0]})
    offsets = da.arange(init.shape[0], chunks=(init.chunks[0],), dtype=np.int64)  # row ids
    ref = dask.delayed(reference, pure=True, traverse=False)
    return da.blockwise(
        _refine_block, "ij", darr, "ik", init, "ij", offsets, "i", ref, None,
        n_epochs=int(n_epochs), seed=int(seed), concatenate=True, dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
        name="pumap-refine-" + dask.base.tokenize(darr.name, init.name, ref.key, n_epochs,
                                                  seed))


__all__ = ["RefineReference", "check_refine",
           "has_training_rows", "keep_training_rows", "memberships", "optimize_new_points",
           "reference_from_model", "refine_embedding", "refine_transform", "sample_ids",
           "stored_reference", "training_rows_for_save"]
