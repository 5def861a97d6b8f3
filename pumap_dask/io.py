"""Input stage: accept numpy, dask, Zarr arrays, Zarr paths and AnnData ``.zarr`` stores.

Everything here validates *lazily*: shape, dtype and chunking are checked from metadata,
never by computing the data. Value checks (NaN/inf) happen block by block when the data is
actually read, and name the offending row block.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from typing import Any

import dask.array as da
import numpy as np
import zarr

from .errors import InputError, InputTypeError

logger = logging.getLogger(__name__)

DEFAULT_ANNDATA_KEY = "obsm/X_pca"


def is_lazy(X: Any) -> bool:
    """Return True for inputs handled lazily (dask arrays, Zarr arrays, paths)."""
    if isinstance(X, (str, os.PathLike)):
        return True
    mod = type(X).__module__
    return mod.startswith("dask") or mod.startswith("zarr")


def open_zarr(path: str | os.PathLike, key: str | None = None):
    """Open a Zarr array, or an array inside a Zarr group such as an AnnData store.

    Parameters
    ----------
    path
        Path to a Zarr array, or to a Zarr group (e.g. an AnnData ``.zarr`` store).
    key
        Array inside the group. For AnnData stores the default is ``obsm/X_pca`` and,
        when that is absent, a dense ``X``.

    Returns
    -------
    zarr.Array
    """

    path = os.fspath(path)
    if not os.path.exists(path) and "://" not in path:
        raise InputError(f"no Zarr store at {path!r}: check the path")
    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise InputError(f"{path!r} is not a readable Zarr array or group: {exc}") from exc
    if isinstance(node, zarr.Array):
        if key is not None:
            raise InputError(f"{path!r} is a Zarr array, not a group; drop key={key!r}")
        return node
    keys = [key] if key is not None else [DEFAULT_ANNDATA_KEY, "X"]
    for k in keys:
        try:
            arr = node[k]
        except KeyError:
            continue
        if isinstance(arr, zarr.Array):
            if key is None and k != DEFAULT_ANNDATA_KEY:
                logger.warning("%s has no %r; using its %r array (%d x %d). Pass key= (CLI: "
                               "--key) to choose another array", path, DEFAULT_ANNDATA_KEY, k,
                               *(tuple(arr.shape) + (0, 0))[:2])
            return arr
        if k == "X":
            raise InputError(
                f"'X' in {path!r} is a sparse matrix group; pass key= naming a dense array "
                "such as 'obsm/X_pca'"
            )
    raise InputError(
        f"no array {' or '.join(repr(k) for k in keys)} in the Zarr group {path!r}; "
        f"pass key= naming one of its arrays (top level: {sorted(node.keys())})"
    )


def _check_shape_dtype(shape: tuple, dtype: np.dtype, what: str) -> None:
    if len(shape) != 2:
        hint = "reshape to (n_samples, n_features)"
        if len(shape) == 1:
            hint = ("Reshape your data: a single sample needs X.reshape(1, -1), a single "
                    "feature X.reshape(-1, 1)")
        raise InputError(f"{what} must be 2-D (n_samples, n_features), got shape {shape}; {hint}")
    if np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"Complex data not supported: {what} has dtype {dtype}; pass the real "
                         "part or the magnitude")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
            or np.issubdtype(dtype, np.bool_)):
        raise InputError(
            f"{what} has dtype {dtype}, which is not numeric; convert it, "
            "e.g. X.astype('float32')"
        )
    if shape[1] == 0:
        raise InputError(f"{what} has 0 feature(s) (shape={tuple(shape)}) while a minimum of 1 "
                         "is required.")


def check_n_features(n_features: int, expected: int) -> None:
    """Fail, before any compute, when input and model disagree on the number of features."""
    if n_features != expected:
        raise InputError(f"X has {n_features} features, but ParametricUMAP is expecting "
                         f"{expected} features as input (the number it was fitted on)")


def check_array(X: Any, *, what: str = "X", min_samples: int = 1) -> np.ndarray:
    """Validate an in-memory array and return it as C-contiguous float32.

    Raises
    ------
    InputError
        For non-2-D, non-numeric, empty or non-finite input.
    """
    if hasattr(X, "toarray") and hasattr(X, "nnz"):
        raise InputError(f"{what} is a sparse matrix; densify it (X.toarray()) or reduce it "
                         "with PCA first")
    arr = np.asarray(X)
    if arr.dtype == object:
        # numbers held in an object array (e.g. from pandas) are fine; anything else is not
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise InputTypeError(f"{what} holds non-numeric values (dtype object: {exc}); "
                                 "convert it, e.g. X.astype('float32')") from None
    _check_shape_dtype(arr.shape, arr.dtype, what)
    if arr.shape[0] < min_samples:
        raise InputError(f"{what} has {arr.shape[0]} samples; at least {min_samples} needed")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise InputError(
            f"{what} contains NaN or infinite values in {bad.size} rows "
            f"(first: {bad[:5].tolist()}); "
            "impute or drop them first"
        )
    return arr


def as_dask(X: Any, *, key: str | None = None, what: str = "X", chunk_rows: int | None = None):
    """Wrap any supported input as a lazily validated dask array (float32, one feature chunk).

    Parameters
    ----------
    X
        numpy array, dask array, ``zarr.Array``, or a path to a Zarr array / AnnData store.
    key
        Array inside a Zarr group (AnnData default ``obsm/X_pca``).
    chunk_rows
        Rows per block for in-memory input (default: about 64 MiB blocks).

    Returns
    -------
    dask.array.Array
        Float32, 2-D, features in one chunk. Nothing is computed.
    """

    if isinstance(X, (str, os.PathLike)):
        X = open_zarr(X, key=key)
    if isinstance(X, da.Array):
        darr = X
    else:
        mod = type(X).__module__
        if mod.startswith("zarr"):
            shape, dtype = tuple(X.shape), np.dtype(X.dtype)
            _check_shape_dtype(shape, dtype, what)
            chunks = X.chunks
            rows = chunks[0]
            if chunk_rows is not None:
                rows = max(1, (chunk_rows // rows) * rows) if chunk_rows >= rows else rows
            darr = da.from_array(X, chunks=(rows, shape[1]), asarray=False, inline_array=True)
        else:
            arr = np.asarray(X)
            _check_shape_dtype(arr.shape, arr.dtype, what)
            if chunk_rows is None:
                chunk_rows = max(1024, (64 << 20) // max(1, 4 * arr.shape[1]))
            darr = da.from_array(arr, chunks=(chunk_rows, arr.shape[1]))
    _check_shape_dtype(darr.shape, darr.dtype, what)
    if any(np.isnan(c) for c in darr.chunks[0]) or np.isnan(darr.shape[0]):
        raise InputError(
            f"{what} has unknown chunk sizes along rows; call X.compute_chunk_sizes() first"
        )
    if len(darr.chunks[1]) > 1:
        logger.info("%s: features are split into %d chunks; rechunking to one chunk "
                    "(call x.rechunk({1: -1}) yourself to avoid this)", what, len(darr.chunks[1]))
        darr = darr.rechunk({1: -1})
    if darr.dtype != np.float32:
        darr = darr.astype(np.float32)
    return darr


def _finite_block(block: np.ndarray, block_info=None, what: str = "X") -> np.ndarray:
    if not np.isfinite(block).all():
        loc = block_info[0]["array-location"][0] if block_info else ("?", "?")
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        raise InputError(
            f"{what} contains NaN or infinite values in row block [{loc[0]}, {loc[1]}) "
            f"(first bad rows: {[int(loc[0]) + int(r) for r in rows[:5]]}); "
            "impute or drop them first"
        )
    return block


def checked_finite(darr, what: str = "X"):
    """Return ``darr`` with a per-block finiteness check that runs when blocks are computed."""
    return darr.map_blocks(_finite_block, what=what, dtype=darr.dtype,
                           meta=np.empty((0, 0), darr.dtype))


def write_json_atomic(path: str, doc: dict) -> None:
    """Write a JSON document so readers see the old file or the whole new one, never a part.

    Used for every metadata file and completion marker of the resumable stages.
    """

    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, path)


def flatten_input(X: Any, input_shape: tuple[int, ...] | None = None) -> Any:
    """n-D numpy input (n, *dims) as rows (n, prod(dims)); 2-D input unchanged.

    Parameters
    ----------
    X
        An in-memory array (anything numpy accepts). Lazy input is returned unchanged.
    input_shape
        The fitted trailing shape, checked when given and ``X`` is n-D.

    Returns
    -------
    The rows, and leaves 1-D / 2-D input to the usual checks.
    """

    if is_lazy(X):
        if getattr(X, "ndim", 2) > 2:
            raise InputError(f"X has shape {tuple(X.shape)}: n-D input (n, *dims) is accepted "
                             "as a numpy array only; reshape lazy input to (n_samples, "
                             "n_features) rows (X.reshape(len(X), -1)): a model fitted on "
                             "n-D data takes its flattened rows too")
        return X
    if hasattr(X, "toarray") and hasattr(X, "nnz"):
        return X
    arr = np.asarray(X)
    if arr.ndim <= 2:
        return X
    if input_shape is not None and tuple(arr.shape[1:]) != tuple(input_shape):
        raise InputError(f"X has samples of shape {tuple(arr.shape[1:])}, but ParametricUMAP "
                         f"was fitted on samples of shape {tuple(input_shape)}")
    return arr.reshape(arr.shape[0], -1)


def input_shape_of(X: Any) -> tuple[int, ...] | None:
    """The trailing shape of n-D in-memory input, or None for 2-D / lazy input."""

    if is_lazy(X) or (hasattr(X, "toarray") and hasattr(X, "nnz")):
        return None
    shape = np.asarray(X).shape  # (not np.shape: array-likes may refuse array functions)
    return tuple(int(s) for s in shape[1:]) if len(shape) > 2 else None


def to_jsonable(value: Any, *, float32: bool = False) -> Any:
    """A copy of ``value`` in plain JSON types: the package's one sanitiser.

    dicts (keys as strings), lists and tuples (as lists), numpy arrays and scalars (as
    Python numbers); non-finite floats become None (JSON has no NaN); anything else with a
    ``tolist`` is converted by it, and other objects by ``str``. ``float32``: float arrays
    are rounded to float32 first (what the model files store).
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(x, float32=float32) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(x, float32=float32) for x in value]
    if isinstance(value, np.ndarray):
        if float32 and value.dtype.kind == "f":
            value = value.astype(np.float32)
        return to_jsonable(value.tolist(), float32=float32)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist(), float32=float32)
    return str(value)
