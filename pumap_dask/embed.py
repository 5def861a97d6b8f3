"""Scanpy-style entry: ``pumap_dask.embed(adata)`` writes ``obsm["X_pumap"]`` as ``sc.tl.umap``
writes ``obsm["X_umap"]``, and keeps the parameters under ``uns["pumap"]``."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import dask.array as da
import numpy as np
import zarr

from ._version import __version__
from .errors import InputError
from .estimator import ParametricUMAP
from .io import open_zarr
from .writers import _drop_consolidated, check_output_path, write_anndata_obsm

logger = logging.getLogger(__name__)


def _uns_record(model: Any, use_rep: str, model_dir: str | None) -> dict[str, Any]:
    """``uns["pumap"]``: parameters and fit facts in types AnnData stores everywhere."""

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
    }


def _rep_key(use_rep: str) -> str:
    if not isinstance(use_rep, str) or not use_rep:
        raise InputError(f"use_rep must be 'X' or an obsm key such as 'X_pca', got {use_rep!r}")
    return "X" if use_rep == "X" else f"obsm/{use_rep}"


def embed(adata: Any, *, use_rep: str = "X_pca", key_added: str = "X_pumap",
          model_dir: str | os.PathLike | None = None, **params: Any):
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
        Also save the fitted model here (to embed new data later with ``transform``).
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
    if isinstance(adata, (str, os.PathLike)):
        return _embed_store(os.fspath(adata), use_rep, key_added, model_dir, params)
    if not hasattr(adata, "obsm") or not hasattr(adata, "uns"):
        raise InputError(f"embed expects an AnnData object or the path of an AnnData .zarr "
                         f"store, got {type(adata).__name__}")
    _rep_key(use_rep)
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
    adata.uns["pumap"] = _uns_record(model, use_rep, model_dir)
    logger.info("added obsm[%r] (%d x %d) and uns['pumap']", key_added,
                *adata.obsm[key_added].shape)
    return model


def _embed_store(store: str, use_rep: str, key_added: str, model_dir, params: dict):
    """Fit from an AnnData ``.zarr`` store and write obsm/uns into it in place."""

    key = _rep_key(use_rep)
    model = ParametricUMAP(**params)
    model._check_params()

    check_output_path(os.path.join(store, "obsm", key_added), open_zarr(store, key=key),
                      resume=False, store=store)  # refuses a foreign obsm before the fit
    model.fit(store, key=key)
    source = model
    if model_dir is not None:
        source = model.save(model_dir)
    write_anndata_obsm(store, source, key=key, obsm_key=key_added, resume=False)
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    uns = root["uns"] if "uns" in root else root.create_group("uns")
    if not uns.attrs.get("encoding-type"):
        uns.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    record = _uns_record(model, use_rep, model_dir)
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
