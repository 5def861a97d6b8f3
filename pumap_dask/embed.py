"""Scanpy-style entry: ``pumap_dask.embed(adata)`` writes ``obsm["X_pumap"]`` as ``sc.tl.umap``
writes ``obsm["X_umap"]``, and keeps the parameters under ``uns["pumap"]``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import zarr

from ._version import __version__
from .errors import InputError, ParameterError
from .estimator import ParametricUMAP
from .io import open_zarr, path_within
from .model import check_model_path
from .writers import ANNDATA_OBSM_KEY, _drop_consolidated, check_output_path, write_anndata_obsm

logger = logging.getLogger(__name__)

UNS_KEY = "pumap"
OWNER = "pumap_dask"
# the keys of every uns["pumap"] record, also those written before records named their owner
_RECORD_KEYS = {"params", "use_rep", "n_epochs", "knn_method", "a", "b", "model_dir", "version"}


def _uns_record(model: Any, use_rep: str, model_dir: str | None,
                obsm_keys: list[str]) -> dict[str, Any]:
    """``uns["pumap"]``: parameters and fit facts in types AnnData stores everywhere, with
    the ``obsm`` keys pumap_dask wrote (the ones a later ``embed`` may replace)."""

    params = {k: v for k, v in model.get_params().items()
              if k not in ("verbose", "work_dir", "callbacks")}
    return {
        "params": json.dumps(params, default=str, sort_keys=True),
        "use_rep": use_rep,
        "n_epochs": int(model.n_epochs_),
        "knn_method": str(model.knn_method_),
        "init": str(getattr(model, "init_", "")),
        "a": float(model.a_), "b": float(model.b_),
        "model_dir": "" if model_dir is None else os.path.abspath(model_dir),
        "version": __version__,
        "written_by": OWNER,
        "obsm_keys": list(obsm_keys),
    }


def _is_our_record(record: Any) -> bool:
    """True when an ``uns["pumap"]`` value is a record :func:`embed` wrote."""
    if not isinstance(record, Mapping):
        return False
    return record.get("written_by") == OWNER or _RECORD_KEYS <= set(record)


def _owned_obsm_keys(record: Any) -> list[str]:
    """The ``obsm`` keys an ``uns["pumap"]`` record of ours says pumap_dask wrote."""
    if not _is_our_record(record):
        return []
    keys = record.get("obsm_keys")
    if keys is None:  # written before records listed them: the default key
        return [ANNDATA_OBSM_KEY]
    if isinstance(keys, str):
        return [keys]
    return [str(k) for k in np.asarray(keys).ravel().tolist()]


def _check_model_dir(model_dir: Any, params: dict) -> None:
    """Before the fit: the model can be saved at ``model_dir``, away from the work files."""
    if model_dir is None:
        return
    check_model_path(model_dir)  # a directory that is not a saved model is refused now
    work_dir = params.get("work_dir")
    if work_dir and (path_within(work_dir, model_dir) or path_within(model_dir, work_dir)):
        raise ParameterError(f"work_dir {work_dir} overlaps model_dir {model_dir}: saving the "
                             "model replaces that directory; pass a work_dir outside model_dir")


def _check_in_memory_outputs(adata: Any, use_rep: str, key_added: str, overwrite: bool
                             ) -> list[str]:
    """Refuse, before the fit, to replace ``obsm``/``uns`` entries pumap_dask did not write
    (the rules of an AnnData store, :func:`pumap_dask.writers.check_output_path`); returns
    the obsm keys the new record lists as ours."""
    if use_rep != "X" and key_added == use_rep:
        raise InputError(f"key_added {key_added!r} is the input use_rep: the embedding would "
                         "replace the data it is fitted on; pass another key_added")
    record = adata.uns.get(UNS_KEY) if UNS_KEY in adata.uns else None
    ours = _is_our_record(record)
    if record is not None and not ours and not overwrite:
        raise InputError(f"adata.uns[{UNS_KEY!r}] exists and was not written by pumap_dask; embed "
                         "never replaces it: move it away first (e.g. adata.uns['pumap_old'] = "
                         f"adata.uns.pop({UNS_KEY!r})) or pass overwrite=True to replace it")
    owned = _owned_obsm_keys(record) if ours else []
    if key_added in adata.obsm and key_added not in owned and not overwrite:
        raise InputError(f"adata.obsm[{key_added!r}] exists and was not written by pumap_dask; "
                         "embed never replaces it: pass another key_added (e.g. 'X_pumap'), or "
                         "overwrite=True to replace it")
    return [k for k in owned if k in adata.obsm and k != key_added] + [key_added]


def _store_record(store: str) -> Any:
    """The ``uns/pumap`` entry of an AnnData store: None when absent, a dict when it can be
    read, else a marker that it is something else."""
    try:
        root = zarr.open_group(store, mode="r", use_consolidated=False)
        node = root["uns"][UNS_KEY] if "uns" in root and UNS_KEY in root["uns"] else None
    except (KeyError, ValueError, TypeError, OSError):
        return None
    if node is None:
        return None
    fallback = node.attrs.get(OWNER) if isinstance(node, zarr.Group) else None
    if isinstance(fallback, Mapping):  # written without anndata: attributes of a group
        return fallback
    try:
        from anndata.io import read_elem
    except ImportError:
        try:
            from anndata.experimental import read_elem
        except ImportError:
            read_elem = None
    if read_elem is not None:
        try:
            return read_elem(node)
        except Exception:  # not an element anndata can read: not ours
            return False
    if isinstance(node, zarr.Group):  # without anndata: judge by the entry names
        return dict.fromkeys(node.keys(), "")
    return False


def _rep_key(use_rep: str) -> str:
    if not isinstance(use_rep, str) or not use_rep:
        raise InputError(f"use_rep must be 'X' or an obsm key such as 'X_pca', got {use_rep!r}")
    return "X" if use_rep == "X" else f"obsm/{use_rep}"


def embed(adata: Any, *, use_rep: str = "X_pca", key_added: str = "X_pumap",
          model_dir: str | os.PathLike | None = None, overwrite: bool = False, **params: Any):
    """Fit a Parametric UMAP on an AnnData object or store and add the embedding to it.

    Parameters
    ----------
    adata
        An in-memory ``AnnData``, a backed one (``read_h5ad(..., backed="r+")``; its rows are
        read in chunks when ``use_rep="X"``), or the path of an AnnData ``.zarr`` store (fitted
        from the store without loading it, and written in place).
    use_rep
        ``obsm`` key to fit on (default ``"X_pca"``, as scanpy), or ``"X"``.
    key_added
        ``obsm`` key of the embedding (default ``"X_pumap"``).
    model_dir
        Also save the fitted model here (to embed new data later with ``transform``). Checked
        before the fit: it must be new, empty or an earlier saved model.
    overwrite
        Replace an ``obsm[key_added]`` or ``uns["pumap"]`` that pumap_dask did not write
        (by default those are refused before the fit; entries an earlier ``embed`` wrote
        are always replaced). In a ``.zarr`` store an ``obsm`` array pumap_dask did not
        write is never replaced.
    **params
        :class:`~pumap_dask.ParametricUMAP` parameters.

    Returns
    -------
    ParametricUMAP
        The fitted model. ``adata.obsm[key_added]`` holds the embedding and
        ``adata.uns["pumap"]`` the parameters (``params`` as a JSON string), as
        ``sc.tl.umap`` records its own. A backed object is written by ``adata.write()``.
    """

    if not isinstance(key_added, str) or not key_added or "/" in key_added:
        raise InputError(f"key_added must be a plain name such as 'X_pumap', got {key_added!r}")
    if not isinstance(overwrite, bool):
        raise ParameterError(f"overwrite must be True or False, got {overwrite!r}")
    if isinstance(adata, (str, os.PathLike)):
        return _embed_store(os.fspath(adata), use_rep, key_added, model_dir, params, overwrite)
    if not hasattr(adata, "obsm") or not hasattr(adata, "uns"):
        raise InputError(f"embed expects an AnnData object or the path of an AnnData .zarr "
                         f"store, got {type(adata).__name__}")
    _rep_key(use_rep)
    ParametricUMAP(**params)._check_params()
    obsm_keys = _check_in_memory_outputs(adata, use_rep, key_added, overwrite)
    _check_model_dir(model_dir, params)
    if use_rep == "X":
        X = adata.X
        if getattr(adata, "isbacked", False):  # an h5py dataset: read lazily in row chunks

            X = da.from_array(X, chunks=(min(X.shape[0], 65536), X.shape[1]), lock=True)
        elif hasattr(X, "toarray"):
            X = X.toarray()
    else:
        if use_rep not in adata.obsm:
            raise InputError(f"adata.obsm has no {use_rep!r} (keys: {list(adata.obsm.keys())}); "
                             "run sc.pp.pca first or pass use_rep='X' or another obsm key")
        X = adata.obsm[use_rep]
    model = ParametricUMAP(**params).fit(X)
    adata.obsm[key_added] = np.asarray(model.embedding_, dtype=np.float32)
    if model_dir is not None:
        model.save(model_dir)
    adata.uns[UNS_KEY] = _uns_record(model, use_rep, model_dir, obsm_keys)
    logger.info("added obsm[%r] (%d x %d) and uns['pumap']", key_added,
                *adata.obsm[key_added].shape)
    return model


def _embed_store(store: str, use_rep: str, key_added: str, model_dir, params: dict,
                 overwrite: bool = False):
    """Fit from an AnnData ``.zarr`` store and write obsm/uns into it in place."""

    key = _rep_key(use_rep)
    model = ParametricUMAP(**params)
    model._check_params()

    check_output_path(os.path.join(store, "obsm", key_added), open_zarr(store, key=key),
                      resume=False, store=store)  # refuses a foreign obsm before the fit
    record = _store_record(store)
    if record is not None and not _is_our_record(record) and not overwrite:
        raise InputError(f"uns/{UNS_KEY} in {store} exists and was not written by pumap_dask; "
                         "embed never replaces it: move it away first or pass overwrite=True "
                         "to replace it")
    _check_model_dir(model_dir, params)
    model.fit(store, key=key)
    source = model
    if model_dir is not None:
        source = model.save(model_dir)
    write_anndata_obsm(store, source, key=key, obsm_key=key_added, resume=False)
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    uns = root["uns"] if "uns" in root else root.create_group("uns")
    if not uns.attrs.get("encoding-type"):
        uns.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    record = _uns_record(model, use_rep, model_dir, [key_added])
    if UNS_KEY in uns:  # ours, or overwrite=True (checked before the fit)
        del uns[UNS_KEY]
    try:
        from anndata.io import write_elem
    except ImportError:
        try:
            from anndata.experimental import write_elem
        except ImportError:
            write_elem = None
    if write_elem is not None:
        write_elem(uns, "pumap", record)
    else:  # without anndata: the record as attributes of a plain group
        g = uns.require_group("pumap")
        g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0",
                        "pumap_dask": record})
    _drop_consolidated(store)  # refreshed, if the store had consolidated metadata
    logger.info("wrote obsm/%s and uns/pumap into %s", key_added, store)
    return model
