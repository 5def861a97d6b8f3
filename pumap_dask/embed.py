"""Scanpy-style entry: ``pumap_dask.embed(adata)`` writes ``obsm["X_pumap"]`` as ``sc.tl.umap``
writes ``obsm["X_umap"]``, and keeps the parameters under ``uns["pumap"]`` (named as scanpy
names its own: ``key_added="X_foo"`` -> ``uns["foo"]``, :func:`pumap_dask.writers.uns_name`)."""

from __future__ import annotations

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
from .writers import (
    ANNDATA_OBSM_KEY,
    OWNER_KEY,
    anndata_elem_io,
    check_output_path,
    check_store_uns,
    is_our_record,
    read_store_uns,
    storable,
    uns_name,
    write_anndata_obsm,
)

logger = logging.getLogger(__name__)

# where every record was kept before records were named after their obsm key: read still
# for the obsm keys it lists as pumap_dask's
LEGACY_UNS_KEY = "pumap"
DICT_ENCODING = {"encoding-type": "dict", "encoding-version": "0.1.0"}


def _uns_record(model: Any, use_rep: str, model_dir: str | None, obsm_keys: list[str],
                neighbors_key: str | None = None) -> dict[str, Any]:
    """The ``uns`` record: parameters (a dict, with ``a`` and ``b`` as ``sc.tl.umap``
    records them) and fit facts in types AnnData stores everywhere, with the ``obsm`` keys
    pumap_dask wrote (the ones a later ``embed`` may replace)."""

    params = {k: v for k, v in model.get_params().items()
              if k not in ("verbose", "work_dir", "callbacks")}
    return storable({
        "params": {"a": float(model.a_), "b": float(model.b_), **params,
                   "use_rep": use_rep, "neighbors_key": neighbors_key},
        "use_rep": use_rep,
        "neighbors_key": neighbors_key,
        "n_epochs": int(model.n_epochs_),
        "knn_method": str(model.knn_method_),
        "init": str(getattr(model, "init_", "")),
        "a": float(model.a_), "b": float(model.b_),
        "model_dir": "" if model_dir is None else os.path.abspath(model_dir),
        "version": __version__,
        "written_by": OWNER_KEY,
        "obsm_keys": list(obsm_keys),
    })


def _owned_obsm_keys(record: Any) -> list[str]:
    """The ``obsm`` keys an ``uns`` record of ours says pumap_dask wrote."""
    if not is_our_record(record):
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
    name = uns_name(key_added)
    record = adata.uns.get(name) if name in adata.uns else None
    ours = is_our_record(record)
    if record is not None and not ours and not overwrite:
        raise InputError(f"adata.uns[{name!r}] exists and was not written by pumap_dask; embed "
                         f"never replaces it: move it away first (e.g. adata.uns['{name}_old'] "
                         f"= adata.uns.pop({name!r})), pass another key_added (its record goes "
                         "to uns[key without 'X_']) or overwrite=True to replace it")
    owned = _owned_obsm_keys(record) if ours else []
    legacy = []  # older versions kept every record in uns["pumap"]
    if name != LEGACY_UNS_KEY and LEGACY_UNS_KEY in adata.uns:
        legacy = _owned_obsm_keys(adata.uns[LEGACY_UNS_KEY])
    if key_added in adata.obsm and key_added not in owned + legacy and not overwrite:
        raise InputError(f"adata.obsm[{key_added!r}] exists and was not written by pumap_dask; "
                         "embed never replaces it: pass another key_added (e.g. 'X_pumap'), or "
                         "overwrite=True to replace it")
    return [k for k in owned if k in adata.obsm and k != key_added] + [key_added]


def _rep_key(use_rep: str) -> str:
    if not isinstance(use_rep, str) or not use_rep:
        raise InputError(f"use_rep must be 'X' or an obsm key such as 'X_pca', got {use_rep!r}")
    return "X" if use_rep == "X" else f"obsm/{use_rep}"


def embed(adata: Any, *, use_rep: str = "X_pca", key_added: str = "X_pumap",
          neighbors_key: str | None = None, copy: bool = False,
          model_dir: str | os.PathLike | None = None, overwrite: bool = False,
          **params: Any) -> Any:
    """Fit a Parametric UMAP on an AnnData object or store and add the embedding to it.

    As ``sc.tl.umap``: the embedding goes to ``obsm[key_added]`` and a record of the fit to
    ``uns[name]``, ``name`` being ``key_added`` without its ``X_`` prefix (``"X_pumap"`` ->
    ``uns["pumap"]``, ``"X_foo"`` -> ``uns["foo"]``, ``"foo"`` -> ``uns["foo"]``). Our
    defaults are umap-learn's (``min_dist=0.1``); ``sc.tl.umap`` uses ``min_dist=0.5``:
    pass ``min_dist=0.5`` to match it.

    Parameters
    ----------
    adata
        An in-memory ``AnnData``, a backed one (``read_h5ad(path, backed="r+")``: its rows
        are read in chunks when ``use_rep="X"``, and ``obsm``/``uns`` are written into the
        file in place), or the path of an AnnData ``.zarr`` store (fitted from the store
        without loading it, and written in place).
    use_rep
        ``obsm`` key to fit on (default ``"X_pca"``, as scanpy), or ``"X"``.
    key_added
        ``obsm`` key of the embedding (default ``"X_pumap"``).
    neighbors_key
        Train on the graph of ``sc.pp.neighbors`` instead of building one:
        ``obsp[uns[neighbors_key]["connectivities_key"]]`` (scanpy's default key
        ``"neighbors"`` names ``obsp["connectivities"]``). The encoder still maps
        ``use_rep`` (pass the representation the neighbors were computed on). None (the
        default): the kNN graph of ``use_rep`` is built with ``n_neighbors`` and ``metric``.
    copy
        Return a new ``AnnData`` with the result and leave ``adata`` untouched (an
        in-memory object only); else write into ``adata`` and return None.
    model_dir
        Also save the fitted model here (to embed new data later with ``transform``). Checked
        before the fit: it must be new, empty or an earlier saved model.
    overwrite
        Replace an ``obsm[key_added]`` or ``uns`` entry that pumap_dask did not write
        (by default those are refused before the fit; entries an earlier ``embed`` wrote
        are always replaced). In a ``.zarr`` store an ``obsm`` array pumap_dask did not
        write is never replaced.
    **params
        :class:`~pumap_dask.ParametricUMAP` parameters (``verbose=True``: progress bars
        of the fit's stages, widgets in a notebook).

    Returns
    -------
    AnnData or None
        With ``copy=True`` the new ``AnnData``, else None. ``obsm[key_added]`` holds the
        embedding (float32) and ``uns[name]`` the record: ``params`` (a dict: ``a``, ``b``
        and the estimator's parameters, as ``sc.tl.umap`` records its own), ``use_rep``,
        ``neighbors_key``, ``model_dir`` and fit facts. Keep the model with ``model_dir``.

    Raises
    ------
    InputError
        Before the fit, for a missing ``use_rep`` or neighbors graph, an ``obsm``/``uns``
        entry pumap_dask did not write, a read-only backed file, or ``copy=True`` with a
        backed object or a store.
    """

    if not isinstance(key_added, str) or not key_added or "/" in key_added or \
            key_added.startswith("."):
        raise InputError(f"key_added must be a plain name such as 'X_pumap', got {key_added!r}")
    for flag, value in (("overwrite", overwrite), ("copy", copy)):
        if not isinstance(value, bool):
            raise ParameterError(f"{flag} must be True or False, got {value!r}")
    if neighbors_key is not None and (not isinstance(neighbors_key, str) or not neighbors_key):
        raise InputError("neighbors_key must be the uns key of sc.pp.neighbors' record (e.g. "
                         f"'neighbors') or None, got {neighbors_key!r}")
    if isinstance(adata, (str, os.PathLike)):
        if copy:
            raise InputError("copy=True needs an AnnData object; a .zarr store is written in "
                             "place: pass copy=False, or embed anndata.read_zarr(path)")
        _embed_store(os.fspath(adata), use_rep, key_added, neighbors_key, model_dir, params,
                     overwrite)
        return None
    if not hasattr(adata, "obsm") or not hasattr(adata, "uns"):
        raise InputError(f"embed expects an AnnData object or the path of an AnnData .zarr "
                         f"store, got {type(adata).__name__}")
    backed = bool(getattr(adata, "isbacked", False))
    if backed and copy:
        raise InputError("copy=True needs an in-memory AnnData; a backed one is written into "
                         "its file: pass copy=False, or embed adata.to_memory()")
    h5 = _backed_file(adata) if backed else None
    _rep_key(use_rep)
    ParametricUMAP(**params)._check_params()
    obsm_keys = _check_in_memory_outputs(adata, use_rep, key_added, overwrite)
    _check_model_dir(model_dir, params)
    graph = None
    if neighbors_key is not None:
        conn = _connectivities_key(adata.uns, list(adata.uns.keys()), list(adata.obsp.keys()),
                                   neighbors_key, use_rep, "adata.")
        graph = adata.obsp[conn]
    if use_rep == "X":
        X = adata.X
        if backed:  # an h5py dataset: read lazily in row chunks
            X = da.from_array(X, chunks=(min(X.shape[0], 65536), X.shape[1]), lock=True)
        elif hasattr(X, "toarray"):
            X = X.toarray()
    else:
        if use_rep not in adata.obsm:
            raise InputError(f"adata.obsm has no {use_rep!r} (keys: {list(adata.obsm.keys())}); "
                             "run sc.pp.pca first or pass use_rep='X' or another obsm key")
        X = adata.obsm[use_rep]
    model = ParametricUMAP(**params).fit(X, graph=graph)
    if model_dir is not None:
        model.save(model_dir)
    name = uns_name(key_added)
    emb = np.asarray(model.embedding_, dtype=np.float32)
    record = _uns_record(model, use_rep, model_dir, obsm_keys, neighbors_key)
    target = adata.copy() if copy else adata
    if h5 is not None:
        _write_backed(h5, key_added, name, emb, record)
    target.obsm[key_added] = emb
    target.uns[name] = record
    logger.info("added obsm[%r] (%d x %d) and uns[%r]%s", key_added, *emb.shape, name,
                f" to {adata.filename}" if h5 is not None else "")
    return target if copy else None


def _connectivities_key(uns: Mapping, uns_keys: list, obsp_keys: list, neighbors_key: str,
                        use_rep: str, where: str) -> str:
    """The ``obsp`` key of the connectivities ``uns[neighbors_key]`` names (scanpy's rule:
    its ``connectivities_key``, else ``connectivities`` for ``neighbors`` and
    ``<key>_connectivities`` for another key); refused when either is missing."""
    if neighbors_key not in uns:
        raise InputError(f"{where}uns has no {neighbors_key!r} (uns keys: {sorted(uns_keys)}); "
                         "run sc.pp.neighbors first (it writes uns['neighbors'] and "
                         "obsp['connectivities']), pass the key_added it was given, or "
                         "neighbors_key=None to build the kNN graph from use_rep")
    entry = uns[neighbors_key]
    entry = entry if isinstance(entry, Mapping) else {}
    default = ("connectivities" if neighbors_key == "neighbors"
               else f"{neighbors_key}_connectivities")
    key = str(entry.get("connectivities_key", default))
    if key not in obsp_keys:
        raise InputError(f"{where}obsp has no {key!r}, the connectivities of "
                         f"uns[{neighbors_key!r}] (obsp keys: {sorted(obsp_keys)}); rerun "
                         "sc.pp.neighbors, or pass another neighbors_key or None")
    params = entry.get("params")
    rep = params.get("use_rep") if isinstance(params, Mapping) else None
    if rep is not None and str(rep) != use_rep:
        logger.warning("the graph of uns[%r] was built on %r but the encoder is fitted on "
                       "use_rep=%r; pass use_rep=%r to map the representation the graph "
                       "describes", neighbors_key, str(rep), use_rep, str(rep))
    return key


def _backed_file(adata: Any) -> Any:
    """The open h5py file of a backed AnnData, checked writable before the fit."""
    manager = getattr(adata, "file", None)
    h5 = getattr(manager, "_file", None)
    where = getattr(adata, "filename", None)
    if h5 is None or not getattr(manager, "is_open", False):
        raise InputError(f"the file of the backed AnnData ({where}) is closed; open it again "
                         "with anndata.read_h5ad(path, backed='r+')")
    if getattr(h5, "mode", "r") != "r+":
        raise InputError(f"{where} is open read-only (backed='r'); embed writes obsm and uns "
                         "into the file in place: open it with anndata.read_h5ad(path, "
                         "backed='r+'), or embed adata.to_memory() (copy=True)")
    for group in ("obsm", "uns"):
        if group in h5 and not hasattr(h5[group], "create_dataset"):
            raise InputError(f"{where} stores {group} in the format of anndata < 0.7, which "
                             "embed cannot write into; convert it once: "
                             "anndata.read_h5ad(path).write_h5ad(new_path)")
    return h5


def _write_backed(h5: Any, key_added: str, name: str, emb: np.ndarray,
                  record: dict[str, Any]) -> None:
    """Write ``obsm[key_added]`` and ``uns[name]`` into a backed AnnData's open ``.h5ad``
    file in place (never ``adata.write()``, which breaks files with ``.raw``). Each entry
    is written under a hidden name and then renamed, so an interrupted write never leaves
    a partial entry under the real name."""
    write_elem = anndata_elem_io()[1]
    for group, key, value in (("obsm", key_added, emb), ("uns", name, record)):
        if group not in h5:
            h5.create_group(group).attrs.update(DICT_ENCODING)
        g = h5[group]
        partial = f".{key}.partial"
        if partial in g:  # left by an interrupted write
            del g[partial]
        write_elem(g, partial, value)
        if key in g:  # ours, or overwrite=True: checked before the fit
            del g[key]
        g.move(partial, key)
    h5.flush()


def _embed_store(store: str, use_rep: str, key_added: str, neighbors_key: str | None,
                 model_dir, params: dict, overwrite: bool = False) -> None:
    """Fit from an AnnData ``.zarr`` store and write obsm/uns into it in place."""

    key = _rep_key(use_rep)
    model = ParametricUMAP(**params)
    model._check_params()

    check_output_path(os.path.join(store, "obsm", key_added), open_zarr(store, key=key),
                      resume=False, store=store)  # refuses a foreign obsm before the fit
    check_store_uns(store, uns_name(key_added), replace_foreign=overwrite)
    _check_model_dir(model_dir, params)
    graph = None if neighbors_key is None else _store_graph(store, neighbors_key, use_rep)
    model.fit(store, key=key, graph=graph)
    source = model
    if model_dir is not None:
        source = model.save(model_dir)
    record = _uns_record(model, use_rep, model_dir, [key_added], neighbors_key)
    write_anndata_obsm(store, source, key=key, obsm_key=key_added, resume=False,
                       uns_record=record, _replace_uns=overwrite)


def _store_graph(store: str, neighbors_key: str, use_rep: str) -> Any:
    """The connectivities ``uns[neighbors_key]`` of an AnnData ``.zarr`` store names."""
    root = zarr.open_group(store, mode="r", use_consolidated=False)
    uns_keys = list(root["uns"].keys()) if "uns" in root else []
    obsp_keys = list(root["obsp"].keys()) if "obsp" in root else []
    entry = read_store_uns(store, neighbors_key)
    uns = {} if entry is None else {neighbors_key: entry}
    conn = _connectivities_key(uns, uns_keys, obsp_keys, neighbors_key, use_rep,
                               f"the store {store}: ")
    read_elem = anndata_elem_io()[0]
    if read_elem is None:
        raise InputError("reading the neighbors graph of a .zarr store needs anndata: "
                         "pip install anndata (or pass neighbors_key=None)")
    return read_elem(root["obsp"][conn])
