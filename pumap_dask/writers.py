"""Writers: lazy embeddings to Zarr (resumable) and to AnnData ``obsm``.

Each dask block of the embedding is written to one chunk-aligned region (so no two tasks
touch the same Zarr chunk or shard), then a marker file records the block as finished. A
rerun with ``resume=True`` computes only the blocks without a marker, so a job killed
halfway loses nothing already written and the final array equals an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from .io import InputError, as_dask
from .transform import model_source, ood_mask, report_ood, transform

logger = logging.getLogger(__name__)

DONE_DIR = ".pumap_done"
ANNDATA_OBSM_KEY = "X_pumap"


def _regular_rows(darr, chunk_rows: int | None):
    """Rechunk rows to equal blocks (the last may be shorter), as Zarr chunks require."""
    rows = darr.chunks[0]
    target = int(chunk_rows or max(rows))
    regular = all(r == target for r in rows[:-1]) and rows[-1] <= target
    return darr if regular else darr.rechunk({0: target})


def _done_path(out_path: str, i: int) -> str:
    return os.path.join(out_path, DONE_DIR, str(i))


def _write_block(emb: np.ndarray, ood: np.ndarray, out_path: str, start: int,
                 i: int) -> tuple[int, int]:
    """Write one block's embedding at rows [start, start+len) and mark it finished.

    Returns the block's counts of NaN rows and out-of-distribution rows.
    """
    import zarr

    z = zarr.open_array(out_path, mode="r+")
    z[start:start + emb.shape[0]] = emb
    marker = _done_path(out_path, i)
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(emb.shape[0]))
    os.replace(tmp, marker)
    return int(np.isnan(emb[:, 0]).sum()), int(ood.sum())


def _open_or_create(out_path: str, shape: tuple, chunk_rows: int, n_components: int,
                    attrs: dict, resume: bool, sharded: bool, zarr_format: int):
    import zarr

    if os.path.exists(os.path.join(out_path, "zarr.json")) or \
            os.path.exists(os.path.join(out_path, ".zarray")):
        if resume:
            z = zarr.open_array(out_path, mode="r+")
            old = dict(z.attrs).get("pumap_dask", {})
            same = (tuple(z.shape) == shape and old.get("model_sha256") == attrs["model_sha256"]
                    and old.get("block_rows") == chunk_rows)
            if same:
                return z
            raise InputError(
                f"{out_path} holds a different transform (shape {z.shape}, model "
                f"{old.get('model_sha256', '?')[:12]}, block rows {old.get('block_rows')}); pass "
                "resume=False to overwrite it or choose another out_path")
        import shutil

        shutil.rmtree(out_path)
    kwargs: dict[str, Any] = dict(shape=shape, dtype="float32", fill_value=np.nan,
                                  zarr_format=zarr_format)
    if sharded and zarr_format == 3:
        # one shard per dask block keeps every write aligned to whole shards
        inner = max(1, chunk_rows // 16)
        while chunk_rows % inner:
            inner -= 1
        kwargs.update(chunks=(inner, n_components), shards=(chunk_rows, n_components))
    else:
        kwargs.update(chunks=(chunk_rows, n_components))
    z = zarr.create_array(out_path, **kwargs)
    z.attrs["pumap_dask"] = attrs
    return z


def transform_to_zarr(
    X: Any,
    model: Any,
    out_path: str | os.PathLike,
    *,
    key: str | None = None,
    resume: bool = True,
    chunk_rows: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    nan_policy: str = "raise",
    sharded: bool = False,
    zarr_format: int = 3,
) -> "zarr.Array":  # noqa: F821
    """Embed ``X`` block by block into a Zarr array, resumably.

    Parameters
    ----------
    X, model, key, batch_size, device, nan_policy
        As for :func:`pumap_dask.transform`.
    out_path
        Directory of the output Zarr array (n_samples, n_components), float32.
    resume
        Reuse an existing output made by the same model and blocking, computing only blocks
        not yet recorded as finished. ``False`` overwrites.
    chunk_rows
        Rows per block and output chunk (default: the input's row chunk size).
    sharded
        Write a Zarr v3 sharded array with one shard per block (writes stay shard-aligned).
    zarr_format
        2 or 3.

    Returns
    -------
    zarr.Array
        The finished output array.
    """
    import dask
    import zarr

    out_path = os.path.abspath(os.fspath(out_path))
    darr = _regular_rows(as_dask(X, key=key), chunk_rows)
    source = model_source(model)
    emb = transform(darr, source, batch_size=batch_size, device=device, nan_policy=nan_policy)
    rows = darr.chunks[0]
    block_rows = rows[0]
    attrs = {"model_sha256": source.sha256, "block_rows": block_rows,
             "n_blocks": len(rows), "complete": False}
    z = _open_or_create(out_path, (darr.shape[0], source.n_components), block_rows,
                        source.n_components, attrs, resume, sharded, zarr_format)
    os.makedirs(os.path.join(out_path, DONE_DIR), exist_ok=True)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    todo = [i for i in range(len(rows)) if not os.path.exists(_done_path(out_path, i))]
    logger.info("transform_to_zarr %s: %d of %d blocks to compute (%d already done)",
                out_path, len(todo), len(rows), len(rows) - len(todo))
    t0 = time.perf_counter()
    blocks = emb.to_delayed().ravel()
    ood = ood_mask(darr, model).to_delayed().ravel()
    tasks = [dask.delayed(_write_block, pure=False)(blocks[i], ood[i], out_path,
                                                    int(starts[i]), i)
             for i in todo]
    counts = dask.compute(*tasks) if tasks else []
    n_nan = sum(c[0] for c in counts)
    if counts:
        report_ood(sum(c[1] for c in counts), sum(rows[i] for i in todo))
    if n_nan:
        logger.warning("%d rows had non-finite input and got NaN embeddings", n_nan)
    attrs = dict(z.attrs["pumap_dask"])
    attrs["complete"] = True
    z.attrs["pumap_dask"] = attrs
    dt = time.perf_counter() - t0
    logger.info("transform_to_zarr wrote %d rows in %.1fs (%.0f rows/s)",
                sum(rows[i] for i in todo), dt, sum(rows[i] for i in todo) / max(dt, 1e-9))
    return zarr.open_array(out_path, mode="r")


def write_anndata_obsm(
    store: str | os.PathLike,
    model: Any,
    *,
    key: str | None = None,
    obsm_key: str = ANNDATA_OBSM_KEY,
    resume: bool = True,
    **kwargs,
) -> "zarr.Array":  # noqa: F821
    """Embed an AnnData ``.zarr`` store's data and write it to ``obsm[obsm_key]`` in place.

    Only the new array is written; the rest of the store is untouched. The array carries
    AnnData's encoding attributes so ``anndata.read_zarr`` sees it as ``obsm[obsm_key]``.

    Parameters
    ----------
    store
        Path of the AnnData ``.zarr`` store.
    model
        Fitted estimator or saved-model path.
    key
        Input array inside the store (default ``obsm/X_pca``, then ``X``).
    obsm_key
        Name of the embedding in ``obsm``.
    resume, kwargs
        As for :func:`transform_to_zarr`.
    """
    import zarr

    store = os.path.abspath(os.fspath(store))
    root = zarr.open_group(store, mode="r+")
    fmt = root.metadata.zarr_format
    if "obsm" not in root:
        g = root.create_group("obsm")
        g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    n_obs = _anndata_n_obs(root)
    from .io import open_zarr

    src = open_zarr(store, key=key)
    if n_obs is not None and src.shape[0] != n_obs:
        raise InputError(f"input array has {src.shape[0]} rows but the store has {n_obs} obs")
    out = transform_to_zarr(src, model, os.path.join(store, "obsm", obsm_key), resume=resume,
                            zarr_format=fmt, **kwargs)
    arr = zarr.open_array(os.path.join(store, "obsm", obsm_key), mode="r+")
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    _drop_consolidated(store)
    return out


def _anndata_n_obs(root) -> int | None:
    try:
        obs = root["obs"]
        idx = obs.attrs.get("_index", "_index")
        return int(obs[idx].shape[0])
    except Exception:  # not an AnnData layout we know; skip the check
        return None


def _drop_consolidated(store: str) -> None:
    """Refresh consolidated metadata (if present) so readers see the new array."""
    import zarr

    for name in (".zmetadata",):
        if os.path.exists(os.path.join(store, name)):
            zarr.consolidate_metadata(store)
            return
    zj = os.path.join(store, "zarr.json")
    if os.path.exists(zj):
        with open(zj) as f:
            meta = json.load(f)
        if meta.get("consolidated_metadata"):
            zarr.consolidate_metadata(store)
