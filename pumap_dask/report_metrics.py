"""Quality measures of ``pumap-dask report``: labels and metrics on an embedded sample.

:func:`load_labels` resolves labels given as an array, a ``.npy`` file or a key of a Zarr
/ AnnData store (categoricals decoded) to integer codes; :func:`quality_metrics` measures
trustworthiness, kNN preservation and, with labels, cross-validated 15-NN accuracy on a
seeded sample (:func:`sample_rows`); :func:`load_label_colors` finds the palette an
AnnData store keeps for an ``obs`` column (``uns/<column>_colors``) and
:func:`label_transfer_accuracy` scores query rows against a labelled reference. Used by
:func:`pumap_dask.report.write_report`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import zarr
from sklearn.manifold import trustworthiness
from sklearn.model_selection import KFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from .errors import InputError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- labels
def _read_zarr_labels(node: Any, where: str) -> tuple[np.ndarray, list[str] | None]:
    """A 1-D zarr array, or an AnnData categorical / nullable group -> (values, names)."""

    if isinstance(node, zarr.Array):
        return np.asarray(node[...]), None
    attrs = dict(node.attrs)
    kind = attrs.get("encoding-type")
    keys = set(node.keys())
    if {"codes", "categories"} <= keys:
        codes = np.asarray(node["codes"][...]).astype(np.int64)
        names = [str(c) for c in np.asarray(node["categories"][...]).tolist()]
        return codes, names
    if {"values", "mask"} <= keys:  # AnnData nullable-integer / nullable-boolean
        values = np.asarray(node["values"][...]).astype(np.int64)
        mask = np.asarray(node["mask"][...]).astype(bool)
        uniq, codes = np.unique(values[~mask], return_inverse=True)
        out = np.full(values.shape, -1, np.int64)
        out[~mask] = codes
        return out, [str(u) for u in uniq.tolist()]
    raise InputError(f"labels {where} is a Zarr group of encoding {kind!r} with arrays "
                     f"{sorted(keys)}; expected a 1-D array or an AnnData categorical "
                     "(codes + categories)")


def read_labels_file(path: str | os.PathLike) -> np.ndarray:
    """The labels saved in a ``.npy`` file (strings or numbers; pickled objects are refused).

    Raises
    ------
    InputError
        When the file is not a readable ``.npy`` array, saying how to make one.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValueError("no .npy header: not written by numpy.save")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        why = str(exc).split(". ")[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"labels file {path} is not a readable .npy array ({why}): save the labels with "
            "numpy.save('labels.npy', np.asarray(labels, dtype=str)) and pass that file (CLI: "
            "--labels FILE.npy), or name an array inside the data (e.g. obs/cell_type)"
        ) from None


def load_labels(labels: Any, data: Any = None, n_rows: int | None = None
                ) -> tuple[np.ndarray, list[str]]:
    """Resolve labels to integer codes (-1: missing) and their names.

    Parameters
    ----------
    labels
        A 1-D array, the path of a ``.npy`` file, or a key inside the Zarr / AnnData store
        ``data`` (e.g. ``"obs/cell_type"``; AnnData categoricals are decoded).
    data
        The data's Zarr store (path or group), needed for a key.
    n_rows
        The expected length.

    Returns
    -------
    codes, names
        ``codes`` int32 of length n (``-1`` for missing values), ``names[code]``.

    Raises
    ------
    InputError
        When the labels cannot be found or have the wrong length or shape.
    """
    names: list[str] | None = None
    if isinstance(labels, (str, os.PathLike)):
        spec = os.fspath(labels)
        if os.path.isfile(spec):
            values = read_labels_file(spec)
        else:
            if isinstance(data, (str, os.PathLike)):
                try:
                    root = zarr.open(os.fspath(data), mode="r")
                except Exception as exc:
                    raise InputError(f"cannot open {data!r} to read labels {spec!r}: "
                                     f"{exc}") from exc
            elif isinstance(data, zarr.Group):
                root = data
            else:
                raise InputError(f"labels {spec!r} is neither a .npy file nor a key of a "
                                 "Zarr store: pass data as the path of a Zarr / AnnData "
                                 "store to read labels from it, or pass the labels as an "
                                 "array")
            if not isinstance(root, zarr.Group):
                raise InputError(f"labels key {spec!r} needs a Zarr group (an AnnData "
                                 f"store), but {data!r} is a single array")
            try:
                node = root[spec]
            except KeyError:
                top = sorted(root.group_keys()) if hasattr(root, "group_keys") else []
                hint = ""
                if "obs" in top:
                    hint = f"; obs holds {sorted(root['obs'].keys())[:20]}"
                raise InputError(f"no labels {spec!r} in {data!r}{hint}") from None
            values, names = _read_zarr_labels(node, repr(spec))
    else:
        values = np.asarray(labels)
    if values.ndim != 1:
        raise InputError(f"labels must be 1-D (one per row), got shape {values.shape}")
    if n_rows is not None and values.shape[0] != n_rows:
        raise InputError(f"labels have {values.shape[0]} values but the data has {n_rows} "
                         "rows")
    if names is None:
        if values.dtype == object:  # e.g. strings with None from pandas
            values = values.astype(str)
        if values.dtype.kind == "f":
            ok = np.isfinite(values)
            uniq, inv = np.unique(values[ok], return_inverse=True)
            codes = np.full(values.shape, -1, np.int64)
            codes[ok] = inv
        else:
            uniq, codes = np.unique(values, return_inverse=True)
        names = [str(u) for u in uniq.tolist()]
    else:
        codes = values
    return np.asarray(codes, dtype=np.int32).reshape(-1), names


def load_label_colors(labels: Any, data: Any, n_names: int) -> list[str] | None:
    """The palette an AnnData store keeps for a categorical ``obs`` column, if any.

    scanpy stores one colour per category, in the categories' order, as
    ``uns/<column>_colors``; :func:`load_labels` decodes the categories in that order, so
    ``colors[code]`` is the colour of ``names[code]``.

    Parameters
    ----------
    labels
        What :func:`load_labels` was given: only a key ``"obs/<column>"`` of a categorical
        column has a palette.
    data
        The AnnData store (path or ``zarr.Group``).
    n_names
        The number of label names (categories) the colours must cover.

    Returns
    -------
    list of str or None
        The colours (as stored: hex strings or colour names), or None when the store has
        none, or when they do not cover the categories (logged).
    """
    if not isinstance(labels, (str, os.PathLike)) or os.path.isfile(os.fspath(labels)):
        return None
    spec = os.fspath(labels).strip("/")
    parts = spec.split("/")
    if len(parts) != 2 or parts[0] != "obs":
        return None
    try:
        root = data if isinstance(data, zarr.Group) else zarr.open(os.fspath(data), mode="r")
        column = root[spec] if isinstance(root, zarr.Group) else None
        if not isinstance(column, zarr.Group) or "categories" not in column:
            return None  # a plain array: AnnData keeps colours only for categoricals
        node = root[f"uns/{parts[1]}_colors"]
    except (KeyError, TypeError, ValueError, OSError, FileNotFoundError):
        return None
    if not isinstance(node, zarr.Array) or node.ndim != 1:
        return None
    colors = [str(c) for c in np.asarray(node[...]).tolist()]
    if len(colors) < n_names:
        logger.warning("uns/%s_colors holds %d colours for %d categories of %s: using the "
                       "report's own palette", parts[1], len(colors), n_names, spec)
        return None
    return colors[:n_names]


# --------------------------------------------------------------------------- metrics
def sample_rows(n: int, n_sample: int, random_state: int) -> np.ndarray:
    """Sorted indices of a seeded random sample of ``min(n, n_sample)`` rows (all when
    ``n <= n_sample``)."""
    if n <= n_sample:
        return np.arange(n)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(n, size=n_sample, replace=False))


def knn_preservation(X: np.ndarray, emb: np.ndarray, n_neighbors: int = 15) -> float:
    """Mean fraction of each point's exact ``n_neighbors`` input-space neighbours that are
    also among its ``n_neighbors`` embedding neighbours (self excluded)."""

    def neighbours(A: np.ndarray) -> np.ndarray:
        return NearestNeighbors(n_neighbors=n_neighbors).fit(A).kneighbors(
            return_distance=False)

    a, b = neighbours(X), neighbours(emb)
    n = a.shape[0]
    # one sorted id per (row, neighbour) pair: count ids both sets share
    rows = np.arange(n, dtype=np.int64)[:, None] * n
    both = np.intersect1d((rows + a).ravel(), (rows + b).ravel(), assume_unique=True)
    return float(both.size) / float(a.size)


def quality_metrics(X: np.ndarray, emb: np.ndarray, codes: np.ndarray | None,
                    n_neighbors: int, random_state: int) -> dict[str, Any]:
    """Trustworthiness, kNN preservation and (with labels) 5-fold 15-NN label accuracy of
    an embedded sample, each a value or a ``"not computed (...)"`` reason."""

    m = X.shape[0]
    out: dict[str, Any] = {}
    if n_neighbors < m / 2:
        out["trustworthiness"] = float(trustworthiness(X, emb, n_neighbors=n_neighbors))
    else:
        out["trustworthiness"] = (f"not computed (the sample of {m} rows needs more than "
                                  f"{2 * n_neighbors} for n_neighbors={n_neighbors})")
    if n_neighbors < m:
        out["knn_preservation"] = knn_preservation(X, emb, n_neighbors)
    else:
        out["knn_preservation"] = f"not computed (only {m} rows sampled)"
    if codes is None:
        out["label_accuracy"] = "not computed (pass --labels)"
        out["label_accuracy_input"] = out["label_accuracy"]
        return out
    ok = codes >= 0
    k = 15
    if int(ok.sum()) < 2 * k:  # each training fold (4/5 of the rows) needs k neighbours
        reason = f"not computed (only {int(ok.sum())} labelled rows in the sample)"
        out["label_accuracy"] = out["label_accuracy_input"] = reason
        return out
    folds = KFold(5, shuffle=True, random_state=random_state)
    clf = KNeighborsClassifier(n_neighbors=k)
    out["label_accuracy"] = float(cross_val_score(clf, emb[ok], codes[ok], cv=folds).mean())
    # the same classifier on the input: what the embedding could at best keep
    out["label_accuracy_input"] = float(cross_val_score(clf, X[ok], codes[ok],
                                                        cv=folds).mean())
    return out


def label_transfer_accuracy(ref_emb: np.ndarray, ref_names: np.ndarray, query_emb: np.ndarray,
                            query_names: np.ndarray, k: int = 15) -> dict[str, Any]:
    """How often a k-NN classifier on the labelled reference embedding predicts each query
    row's own label from its embedding.

    Parameters
    ----------
    ref_emb, ref_names
        Reference embedding rows and their label names (None / ``""``: unlabelled).
    query_emb, query_names
        Query embedding rows and their label names.
    k
        Neighbours of the classifier.

    Returns
    -------
    dict
        ``accuracy`` (a float, or a ``"not computed (...)"`` reason), ``n_scored`` (query rows
        whose label the reference has) and ``n_unknown`` (query rows whose label it lacks).
    """
    ref_names = np.asarray(ref_names, dtype=object)
    query_names = np.asarray(query_names, dtype=object)
    ref_ok = np.array([n is not None and n != "" for n in ref_names], dtype=bool)
    known = set(ref_names[ref_ok].tolist())
    q_ok = np.array([n in known for n in query_names], dtype=bool)
    q_lab = np.array([n is not None and n != "" for n in query_names], dtype=bool)
    out: dict[str, Any] = {"n_scored": int(q_ok.sum()), "n_unknown": int((q_lab & ~q_ok).sum())}
    if int(ref_ok.sum()) < k:
        out["accuracy"] = f"not computed (only {int(ref_ok.sum())} labelled reference rows)"
    elif not q_ok.any():
        out["accuracy"] = "not computed (no query label is among the reference's labels)"
    else:
        clf = KNeighborsClassifier(n_neighbors=k).fit(ref_emb[ref_ok],
                                                       ref_names[ref_ok].astype(str))
        pred = clf.predict(query_emb[q_ok])
        out["accuracy"] = float(np.mean(pred == query_names[q_ok].astype(str)))
    return out


__all__ = ["knn_preservation", "label_transfer_accuracy", "load_label_colors", "load_labels",
           "quality_metrics", "sample_rows"]
