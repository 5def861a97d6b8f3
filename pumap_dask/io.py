"""Input stage: accept numpy, dask, Zarr arrays, Zarr paths and AnnData ``.zarr`` stores.

Everything here validates *lazily*: shape, dtype and chunking are checked from metadata,
never by computing the data. Value checks (NaN/inf) happen block by block when the data is
actually read, and name the offending row block.
"""

from __future__ import annotations

import hashlib
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
    if key is not None:
        check_key(key, path)
    keys = [key] if key is not None else [DEFAULT_ANNDATA_KEY, "X"]
    for k in keys:
        try:
            arr = node[k]
        except KeyError:
            continue
        except ValueError as exc:  # a path zarr refuses to resolve
            raise InputError(f"key {k!r} is not an array path inside {path!r} ({exc}); pass "
                             "key= (CLI: --key) naming one of its arrays, such as "
                             f"{DEFAULT_ANNDATA_KEY!r}") from None
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
    obsm = node.get("obsm")  # an AnnData store: name its obsm arrays
    have = (f"its obsm arrays: {sorted(f'obsm/{k}' for k in obsm.array_keys())}"
            if isinstance(obsm, zarr.Group) else f"its top level: {sorted(node.keys())}")
    raise InputError(
        f"no array {' or '.join(repr(k) for k in keys)} in the Zarr group {path!r}; "
        f"pass key= (CLI: --key) naming one of its arrays ({have})"
    )


def check_key(key: Any, path: str = "the store") -> str:
    """Refuse a ``key`` that is not a plain array path inside a Zarr group.

    Parameters
    ----------
    key
        An array path such as ``obsm/X_pca``: non-empty ``/``-separated names, none of them
        ``.`` or ``..`` (a key never reaches outside its store).
    path
        The store, for the message.

    Returns
    -------
    str
        ``key``.

    Raises
    ------
    InputError
        For anything else, naming ``--key``.
    """
    parts = key.strip("/").split("/") if isinstance(key, str) else []
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"key {key!r} is not an array path inside {path!r}: pass key= (CLI: "
                         f"--key) naming an array of that store, such as "
                         f"{DEFAULT_ANNDATA_KEY!r} (no '.' or '..' parts; to read another "
                         "store, pass its path as the input)")
    return key


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
    arr = _to_float32(arr, what=what, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise InputError(
            f"{what} contains NaN or infinite values in {bad.size} rows "
            f"(first: {bad[:5].tolist()}); "
            "impute or drop them first"
        )
    _check_range(arr, what, "")
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
        if np.issubdtype(darr.dtype, np.floating) and darr.dtype.itemsize > 4:
            # the one cast to float32, checked: values beyond its range fail by name
            meta = getattr(darr, "_meta", None)
            meta = meta.astype(np.float32) if meta is not None else np.empty((0, 0), np.float32)
            darr = darr.map_blocks(_to_float32, what=what, dtype=np.float32, meta=meta)
        else:
            darr = darr.astype(np.float32)
    return darr


FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_limit(n_features: int) -> float:
    """The largest absolute value rows of ``n_features`` values may hold so that squared
    distances between them stay finite in float32 (the kNN, graph and training compute in
    float32): ``sqrt(float32 max / (4 n_features))``."""
    return math.sqrt(FLOAT32_MAX / (4 * max(1, int(n_features))))


def _where(block_info) -> str:
    if not block_info:
        return ""
    loc = block_info[0]["array-location"][0]
    return f" in row block [{loc[0]}, {loc[1]})"


def _overflow_error(what: str, largest: float, where: str, detail: str) -> InputError:
    return InputError(
        f"{what} has values up to {largest:.3g} in absolute value{where}, which overflow "
        f"float32 ({detail}): scale the data down first, e.g. standardise each feature or "
        f"divide {what} by {largest:.0e}")


def _to_float32(block: Any, block_info=None, what: str = "X", copy: bool = True) -> Any:
    """``block`` as float32, failing (by name, not as infinities later) when finite values
    lie beyond float32's range."""
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        out = block.astype(np.float32, copy=copy) if hasattr(block, "astype") \
            else np.asarray(block, dtype=np.float32)
    if np.issubdtype(block.dtype, np.floating) and block.dtype.itemsize > 4 \
            and bool(np.isinf(out).any()):
        src_finite = np.isfinite(block)
        if bool((src_finite & ~np.isfinite(out)).any()):
            finite = block[src_finite]
            largest = max(float(finite.max()), -float(finite.min()))
            raise _overflow_error(what, largest, _where(block_info),
                                  f"its largest value is {FLOAT32_MAX:.3g}, and the input is "
                                  "cast to float32")
    if not copy:
        out = np.ascontiguousarray(out)
    return out


def _check_range(block: Any, what: str, where: str, largest: float | None = None) -> None:
    """Fail when finite values are so large that squared distances between rows overflow
    float32 (which otherwise surfaces as an empty kNN graph or NaN training)."""
    if block.size == 0:
        return
    if largest is None:
        largest = max(float(block.max()), -float(block.min()))
    d = block.shape[1] if block.ndim == 2 else 1
    limit = float32_limit(d)
    if largest > limit:
        raise _overflow_error(what, largest, where,
                              f"squared distances between rows of {d} features overflow "
                              f"float32 above {limit:.2g}")


def _finite_block(block: np.ndarray, block_info=None, what: str = "X") -> np.ndarray:
    """``block`` unchanged, after checking that it is finite and within float32's usable
    range: two reductions (the max and min propagate NaN and infinities), no temporary."""
    if block.size == 0:
        return block
    hi, lo = float(block.max()), float(block.min())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        loc = block_info[0]["array-location"][0] if block_info else ("?", "?")
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        start = int(loc[0]) if block_info else 0
        raise InputError(
            f"{what} contains NaN or infinite values in row block [{loc[0]}, {loc[1]}) "
            f"(first bad rows: {[start + int(r) for r in rows[:5]]}); "
            "impute or drop them first"
        )
    _check_range(block, what, _where(block_info), largest=max(hi, -lo))
    return block


def block_sha256(block: np.ndarray) -> str:
    """sha256 of a block's rows as C-ordered float32 (its shape included): the content
    identity of one block of an input."""
    arr = np.ascontiguousarray(block, dtype=np.float32)
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _digest_block(block: np.ndarray, block_info=None, what: str = "X",
                  finite: bool = True) -> np.ndarray:
    """The content digest of one block and (``finite``) its finiteness check, in one read."""
    if finite:
        _finite_block(block, block_info, what)
    return np.frombuffer(bytes.fromhex(block_sha256(block)), dtype=np.uint8)[None, :]


def block_digests(darr, what: str = "X", finite: bool = True):
    """A lazy (n_blocks, 32) uint8 array: each row block's sha256, computed in the same
    pass as its finiteness check (:func:`checked_finite`; ``finite=False``: no check), so
    a caller that reads every block anyway gets the identity for the cost of hashing."""
    darr = darr.rechunk({1: -1}) if len(darr.chunks[1]) > 1 else darr
    return darr.map_blocks(_digest_block, what=what, finite=finite, dtype=np.uint8,
                           chunks=((1,) * len(darr.chunks[0]), (32,)),
                           meta=np.empty((0, 0), np.uint8))


def content_sha256(digests: np.ndarray, shape: tuple, chunks: tuple) -> str:
    """One identity for a whole input from its per-block digests and its blocking."""
    h = hashlib.sha256(f"{tuple(map(int, shape))}{tuple(map(int, chunks))}".encode())
    h.update(np.ascontiguousarray(digests, dtype=np.uint8).tobytes())
    return h.hexdigest()


def checked_finite(darr, what: str = "X"):
    """Return ``darr`` with a per-block finiteness check that runs when blocks are computed."""
    return darr.map_blocks(_finite_block, what=what, dtype=darr.dtype,
                           meta=np.empty((0, 0), darr.dtype))


def path_within(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """True when ``inner`` is ``outer`` or lies inside it (symbolic links resolved)."""
    a, b = os.path.realpath(os.fspath(inner)), os.path.realpath(os.fspath(outer))
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


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


def current_umask() -> int:
    """The process's file mode creation mask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give a directory tree the modes the user's umask asks for.

    Directories become ``0o777 & ~umask`` and files ``0o666 & ~umask`` (what ``mkdir`` and
    ``open`` make), so a tree built in a private temporary directory (``mkdtemp`` makes
    0700) and renamed into place is as readable as anything else the user writes.
    Symbolic links are left alone and never followed.

    Parameters
    ----------
    path
        A directory (its whole tree) or a single file.
    """
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    path = os.fspath(path)
    if os.path.islink(path):
        return
    if not os.path.isdir(path):
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, dir_mode)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, file_mode)
