"""Report stage: what a saved model is (``pumap-dask info``) and how good it is
(``pumap-dask report``).

:func:`model_summary` reads a model directory through :mod:`pumap_dask.model`'s verified
readers; :func:`format_info` turns the summary into text. :func:`write_report` adds the
figures and quality metrics (:mod:`pumap_dask.report_metrics`) and writes ``report.json``
and one self-contained ``report.html`` (figures are PNG data URIs; no external CSS, JS or
images).

With data, every row is embedded block by block through the lazy transform (only the
n x 2 embedding is held) and drawn: up to ``scatter_max`` (50,000) points as a scatter of
small markers, more as a 2-D histogram (one image, so millions of points draw in about a
second) whose bin count grows with n. Labels from an AnnData ``obs`` column keep the
store's palette (``uns/<column>_colors``). Quality is measured on a seeded random sample:
trustworthiness, kNN preservation and, with labels, cross-validated 15-NN accuracy. Query
rows (``query``: new data, or an embedding this model's transform wrote) get their own
panel over the reference, their own trustworthiness and kNN preservation and, with labels
on both sides, the accuracy of transferring the reference's labels to them.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
import uuid
from typing import Any

import dask
import numpy as np
import zarr

from . import plotting
from .errors import InputError, ModelFileError, ParameterError
from .io import as_dask, check_n_features, to_jsonable, write_json_atomic
from .model import EMBEDDING, WEIGHTS, checked_file, load_embedding, read_config
from .report_format import (
    NOT_RECORDED,
    RUN_CONFIG,
    fmt_num,
    ordered_stages,
    recall_text,
    run_config_shown,
    run_rows,
    run_summary,
    samples_text,
    stage_table,
)
from .report_html import render_html
from .report_metrics import (
    knn_preservation,
    label_transfer_accuracy,
    load_label_colors,
    load_labels,
    quality_metrics,
    sample_rows,
)
from .state import package_versions
from .transform import transform
from .writers import OWNER_KEY, is_pumap_output

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_VERSION = 1
MAX_LEGEND_LABELS = 20
SCATTER_MAX = 50_000  # up to this many points: a scatter; above: a 2-D histogram
NEEDS_DATA = "not computed (pass --data)"


# --------------------------------------------------------------------------- summary
def _recorded_versions(doc: dict[str, Any], run_config: Any
                       ) -> tuple[dict[str, Any], str | None]:
    """The versions the model (or its run config) recorded, and where they were found."""
    fitted = doc["fitted"]
    record = fitted.get("fit_record") if isinstance(fitted.get("fit_record"), dict) else {}
    rc = run_config if isinstance(run_config, dict) else {}
    for where, found in (("recorded in the model (config.json)", doc.get("versions")),
                         ("recorded in the model (config.json)", fitted.get("versions")),
                         ("recorded by the fit (config.json)", record.get("versions")),
                         (f"recorded by the CLI ({RUN_CONFIG})", rc.get("versions"))):
        if found:
            return (dict(found) if isinstance(found, dict) else {"recorded": str(found)}), where
    return {}, None


def _read_run_config(model_dir: str) -> dict[str, Any] | None:
    path = os.path.join(model_dir, RUN_CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        logger.warning("cannot read %s (%s); the report shows no run config", path, exc)
        return {"error": f"unreadable {RUN_CONFIG}: {exc}"}
    return doc if isinstance(doc, dict) else {"value": doc}


def model_summary(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Describe a saved model: shape, parameters, fit metadata, timings, versions.

    The config and weights are verified (checksums, structure, architecture) by
    :func:`pumap_dask.model.load_encoder`; the embedding is not read.

    Parameters
    ----------
    model_dir
        A directory written by ``ParametricUMAP.save`` (or ``pumap-dask fit``).

    Returns
    -------
    dict
        JSON-ready: ``model_dir``, ``format_version``, ``n_samples_fit``, ``n_features``,
        ``n_components``, ``encoder``, ``params``, ``fitted`` (init, knn_method,
        knn_recall, n_edges, a, b, n_epochs, train_world_size), ``timings`` (stage ->
        seconds, pipeline order), ``peak_memory`` (stage -> peak RSS bytes of the fitting
        process, or None when the fit did not record it), ``worker_peak_memory`` (the
        largest Dask worker's, distributed fits; or None), ``loss`` (n_epochs, final,
        min), ``loss_history``, ``versions`` (``recorded`` at fit time, ``recorded_by``:
        where they were found, and, for packages not recorded, the
        ``reading_environment``), ``run`` (fit start and end, save time, host, cluster and
        command: :func:`pumap_dask.report_format.run_summary`), ``run_config``
        (``run_config.json``, or None), ``has_embedding`` and ``weights_sha256``.

    Raises
    ------
    ModelFileError
        When the directory is missing, incomplete, corrupt or was modified.
    """
    path = os.path.abspath(os.fspath(model_dir))
    doc = read_config(path)  # described, never rebuilt: a custom network's code is not run
    checked_file(path, WEIGHTS, doc["weights_sha256"], "weights were")
    fitted, params, enc = doc["fitted"], doc["params"], doc["encoder"]
    history = [float(x) for x in fitted["loss_history"]]
    # optional (fits since peak-memory tracking); {} means nothing was recorded
    peak = fitted.get("peak_memory") or None
    worker_peak = fitted.get("worker_peak_memory") or None
    run_config = _read_run_config(path)
    recorded, recorded_by = _recorded_versions(doc, run_config)
    env = {k: v for k, v in package_versions().items() if k not in recorded}
    return {
        "model_dir": path,
        "format_version": doc["format_version"],
        "n_samples_fit": fitted["n_samples_fit"],
        "n_features": enc["n_features"],
        "n_components": enc["n_components"],
        "encoder": dict(enc),
        "params": dict(params),
        "fitted": {k: fitted.get(k) for k in ("init", "knn_method", "knn_recall", "n_edges",
                                              "a", "b", "n_epochs", "train_world_size")
                   if k in fitted},
        "timings": ordered_stages(dict(fitted.get("timings") or {})),
        "peak_memory": None if peak is None else ordered_stages(peak),
        "worker_peak_memory": None if worker_peak is None else ordered_stages(worker_peak),
        "loss": {"n_epochs": len(history), "final": history[-1] if history else None,
                 "min": min(history) if history else None},
        "loss_history": history,
        "versions": {"recorded": dict(recorded), "recorded_by": recorded_by,
                     "reading_environment": env},
        "run": run_summary(fitted, run_config),
        "run_config": run_config,
        "has_embedding": "embedding_sha256" in doc,
        "weights_sha256": doc["weights_sha256"],
        "input_identity": fitted.get("input_identity"),
    }


# --------------------------------------------------------------------------- text


def _kv(rows: list[tuple[str, Any]], indent: str = "  ") -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows]


def _identity_text(ident: dict | None) -> str:
    if not ident:
        return NOT_RECORDED
    return (f"{fmt_num(ident['rows'])} x {fmt_num(ident['features'])} rows, content sha256 "
            f"{ident['sha256'][:16]}...")


def format_info(summary: dict[str, Any]) -> str:
    """Human-readable text of a :func:`model_summary` (what ``pumap-dask info`` prints).

    Parameters
    ----------
    summary
        The dict :func:`model_summary` returns.

    Returns
    -------
    str
        Sections Model, Parameters, Fit (with a stage table of wall time and peak
        memory), Run (fit start and end, save time, host, cluster, command), Versions and
        Run config.
    """
    enc, fitted, loss = summary["encoder"], summary["fitted"], summary["loss"]
    if "factory" in enc:  # a custom network (pumap_dask.networks)
        arch = (f"{enc['n_features']} -> {enc['factory']}({enc.get('factory_arg')}) -> "
                f"{enc['n_components']}")
    else:
        arch = " -> ".join(str(x) for x in [enc["n_features"], *enc["hidden_layers"],
                                            enc["n_components"]])
    if enc.get("n_projection"):
        arch += f" (PCA projection to {enc['n_projection']} first)"
    lines = [f"pumap_dask model at {summary['model_dir']}", "", "Model"]
    lines += _kv([
        ("format version", summary["format_version"]),
        ("samples fitted", samples_text(summary)),
        ("features", fmt_num(summary["n_features"])),
        ("components", fmt_num(summary["n_components"])),
        ("encoder", arch),
        ("training embedding", f"saved ({EMBEDDING})" if summary["has_embedding"]
         else "not saved"),
        ("weights sha256", summary["weights_sha256"][:16] + "..."),
        ("fitted on", _identity_text(summary.get("input_identity"))),
    ])
    lines += ["", "Parameters"]
    lines += _kv([(k, json.dumps(v)) for k, v in sorted(summary["params"].items())])
    lines += ["", "Fit"]
    final = "-" if loss["final"] is None else f"{loss['final']:.4g}"
    lines += _kv([
        ("init", fitted.get("init")),
        ("kNN method", fitted.get("knn_method")),
        ("kNN recall", recall_text(fitted)),
        ("graph edges", fmt_num(fitted.get("n_edges"))),
        ("a, b", f"{fmt_num(fitted.get('a'))}, {fmt_num(fitted.get('b'))}"),
        ("train world size", fitted.get("train_world_size", NOT_RECORDED)),
        ("epochs", f"{loss['n_epochs']} (final loss {final})"),
    ])
    head, rows = stage_table(summary)
    if rows:
        table = [head, *rows]
        w = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines.append("")
        lines += ["  " + "  ".join(f"{c:<{w[0]}}" if i == 0 else f"{c:>{w[i]}}"
                                   for i, c in enumerate(r)) for r in table]
    else:
        lines.append(f"  timings: {NOT_RECORDED}")
    lines += ["", "Run"]
    lines += _kv(run_rows(summary.get("run") or {}))
    lines += ["", "Versions"]
    versions = summary["versions"]
    rec = versions["recorded"]
    if rec:
        lines.append(f"  {versions.get('recorded_by') or 'recorded in the model'}:")
    else:
        lines.append(f"  at fit time: {NOT_RECORDED}")
    lines += _kv(sorted(rec.items()), "    ")
    if versions["reading_environment"]:
        lines.append("  reading environment (not recorded at fit time):")
        lines += _kv(sorted(versions["reading_environment"].items()), "    ")
    lines += ["", "Run config"]
    if summary["run_config"] is None:
        lines.append(f"  {NOT_RECORDED} (no {RUN_CONFIG})")
    else:
        text = json.dumps(run_config_shown(summary["run_config"]), indent=2, sort_keys=True,
                          default=str)
        lines += ["  " + line for line in text.splitlines()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- embedding
def embed_all(darr: Any, model_dir: str, blocks_at_once: int = 8) -> np.ndarray:
    """Embed every row of a dask array into one preallocated (n, n_components) array.

    Blocks are computed a few at a time (on whatever scheduler is active) and copied into
    place, so memory holds the embedding plus a few blocks, never a concatenated copy.
    """

    emb = transform(darr, model_dir)
    out = np.empty(emb.shape, dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(emb.chunks[0])])
    blocks = list(range(len(emb.chunks[0])))
    for i in range(0, len(blocks), blocks_at_once):
        group = blocks[i:i + blocks_at_once]
        parts = dask.compute(*[emb.blocks[b] for b in group])
        for b, part in zip(group, parts):
            out[starts[b]:starts[b + 1]] = part
    return out


# --------------------------------------------------------------------------- report
def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _describe_data(data: Any, key: str | None) -> str:
    if isinstance(data, (str, os.PathLike)):
        return os.path.abspath(os.fspath(data)) + (f" [{key}]" if key else "")
    return f"in-memory {type(data).__module__.split('.')[0]}.{type(data).__name__}"


def hist_bins(n: int, most: int) -> int:
    """Bins along the histogram's longer axis for ``n`` points: about sqrt(n / 4), so an
    occupied bin holds some 10 points, not one or two (a speckled picture); at least 64,
    at most ``most``."""
    return int(min(most, max(min(64, most), round(math.sqrt(n / 4)))))


def _legend_rows(codes: np.ndarray, names: list[str], rgba: np.ndarray) -> list[dict]:
    """One entry per label for the HTML legend: full name, colour and points drawn."""
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    return [{"name": str(n), "color": c, "count": int(k)}
            for n, c, k in zip(names, plotting.hex_colors(rgba), counts)]


def _draw_embedding(emb: np.ndarray, codes: np.ndarray | None, names: list[str] | None,
                    colors: list[str] | None, bins: int, scatter_max: int,
                    legend_title: str, figures: dict[str, bytes]) -> dict[str, Any]:
    """Draw the embedding: a scatter of small markers coloured by label (up to
    MAX_LEGEND_LABELS labels) for up to ``scatter_max`` points; above, a 2-D histogram by
    majority label beside the density (or the density alone). Adds the PNGs to
    ``figures`` and returns what the picture shows."""

    n = emb.shape[0]
    n_lab = len(names) if names is not None else 0
    colour = codes is not None and 0 < n_lab <= MAX_LEGEND_LABELS
    rgba = plotting.label_colors(n_lab, colors) if colour else None
    n_nonfinite = int((~np.isfinite(emb[:, :2]).all(axis=1)).sum())
    out: dict[str, Any] = {"n_points": int(n), "n_labels": n_lab if codes is not None else None,
                           "n_nonfinite": n_nonfinite}
    many = f"{n_lab} labels (more than {MAX_LEGEND_LABELS}): not coloured"
    if n <= scatter_max:
        extent = plotting.view_extent(emb)
        outside = plotting.n_outside(emb, extent)
        note = f"{n:,} points" + (f"; {outside:,} outliers outside the drawn area"
                                  if outside else "")
        if codes is not None and not colour:
            note += f"; {many}"
        figures["embedding"] = plotting.plot_scatter_embedding(
            emb, codes=codes if colour else None, names=names if colour else None,
            colors=rgba, extent=extent, legend_title=legend_title, note=note,
            title="Embedding by label" if colour else "Embedding")
        out.update(view="scatter", coloured_by="label" if colour else "one colour",
                   extent=list(extent), n_outside=outside,
                   marker_size=plotting.marker_size(n))
    else:
        binned = plotting.bin_embedding(emb[:, :2], hist_bins(n, bins),
                                        codes if colour else None, n_lab if colour else 0)
        ny, nx = binned["counts"].shape
        note = f"{n:,} points in {nx} x {ny} bins"
        if binned["n_outside"]:
            note += f"; {binned['n_outside']:,} outliers outside the drawn area"
        if codes is not None and not colour:
            note += f"; {many}: density shown"
        density = plotting.plot_binned_embedding(binned["counts"], binned["extent"],
                                                 title="Embedding: density", note=note)
        if colour:
            figures["embedding"] = plotting.plot_binned_embedding(
                binned["counts"], binned["extent"], majority=binned["majority"],
                names=names, colors=rgba, title="Embedding: majority label per bin",
                note=note)
            figures["embedding_density"] = density
        else:
            figures["embedding"] = density
        out.update(view="histogram", coloured_by="majority label per bin" if colour
                   else "density", bins=[nx, ny], extent=list(binned["extent"]),
                   n_outside=binned["n_outside"])
    out["note_text"] = note
    if colour:
        out["legend"] = _legend_rows(codes, names, rgba)
        out["palette"] = (f"{legend_title} colours of the AnnData store"
                          if plotting.usable_palette(colors, n_lab) else "tab10/tab20")
    if emb.shape[1] > 2:
        out["note"] = f"first 2 of {emb.shape[1]} components drawn"
    return out


def check_query(query: Any, key: str | None = None) -> None:
    """Before any work: the query is readable (input rows, or a Zarr array this package's
    transform wrote).

    Raises
    ------
    InputError
        When it cannot be opened.
    """
    if not (isinstance(query, (str, os.PathLike)) and is_pumap_output(query)):
        as_dask(query, key=key)


def _query_embedding(query: Any, key: str | None, summary: dict[str, Any]
                     ) -> tuple[np.ndarray, Any]:
    """The query's embedding and its input rows (None when the query is an embedding that
    ``pumap-dask transform`` wrote with this model: used as it is)."""
    if isinstance(query, (str, os.PathLike)) and is_pumap_output(query):
        arr = zarr.open_array(os.fspath(query), mode="r")
        record = dict(arr.attrs).get(OWNER_KEY, {})
        if record.get("model_sha256") != summary["weights_sha256"]:
            raise InputError(f"{os.fspath(query)} is an embedding another model wrote "
                             "(pumap-dask transform); pass the query's input rows (CLI: "
                             "--query INPUT) or an embedding this model wrote")
        if not record.get("complete"):
            raise InputError(f"{os.fspath(query)} is an unfinished pumap-dask transform "
                             "output; rerun that transform to finish it, or pass the "
                             "query's input rows")
        return np.asarray(arr[...], dtype=np.float32), None
    qdarr = as_dask(query, key=key)
    check_n_features(qdarr.shape[1], summary["n_features"])
    return embed_all(qdarr, summary["model_dir"]), qdarr


def _query_colors(qnames: list[str], names: list[str] | None, ref_rgba: np.ndarray | None,
                  store_colors: list[str] | None) -> np.ndarray:
    """Query label colours: a label the reference has keeps the reference's colour; the
    others take the next colours of the palette (or, without reference labels, the query
    store's own AnnData palette)."""
    if names is None or ref_rgba is None:
        return plotting.label_colors(len(qnames), store_colors)
    index = {n: i for i, n in enumerate(names)}
    new = [n for n in qnames if n not in index]
    extra = plotting.label_colors(len(names) + len(new))[len(names):]
    more = {n: extra[j] for j, n in enumerate(new)}
    return np.asarray([ref_rgba[index[n]] if n in index else more[n] for n in qnames])


def _draw_query(qemb: np.ndarray, qcodes: np.ndarray | None, qnames: list[str] | None,
                qrgba: np.ndarray | None, reference: np.ndarray | None, scatter_max: int,
                legend_title: str, random_state: int, figures: dict[str, bytes]
                ) -> dict[str, Any]:
    """The query panel: query points (a seeded sample of ``scatter_max`` when there are
    more) over the reference embedding in grey."""
    n = qemb.shape[0]
    rng = np.random.default_rng(random_state)
    idx = np.sort(rng.choice(n, scatter_max, replace=False)) if n > scatter_max else None
    pts = qemb if idx is None else qemb[idx]
    codes = None if qcodes is None else (qcodes if idx is None else qcodes[idx])
    colour = codes is not None and 0 < len(qnames or []) <= MAX_LEGEND_LABELS
    bg = None
    if reference is not None and reference.shape[1] >= 2:
        bg = reference
        if bg.shape[0] > SCATTER_MAX:
            bg = bg[np.sort(rng.choice(bg.shape[0], SCATTER_MAX, replace=False))]
    extent = plotting.view_extent(pts, *([] if bg is None else [bg]))
    outside = plotting.n_outside(pts, extent)
    note = (f"{n:,} query points" if idx is None
            else f"a random {scatter_max:,} of {n:,} query points")
    if bg is not None:
        note += f" over {reference.shape[0]:,} reference points (grey)"
    if outside:
        note += f"; {outside:,} outside the drawn area"
    if codes is not None and not colour:
        note += f"; {len(qnames)} labels (more than {MAX_LEGEND_LABELS}): not coloured"
    figures["query"] = plotting.plot_scatter_embedding(
        pts, codes=codes if colour else None, names=qnames if colour else None,
        colors=qrgba if colour else None, background=bg, extent=extent,
        legend_title=legend_title, point_color="C3", seed=random_state, note=note,
        title="Query data on the reference" if bg is not None else "Query data")
    out: dict[str, Any] = {"n_points": int(n), "n_drawn": int(pts.shape[0]), "view": "scatter",
                           "coloured_by": "label" if colour else "one colour",
                           "extent": list(extent), "n_outside": outside, "note_text": note,
                           "reference_drawn": None if bg is None else int(bg.shape[0])}
    if colour:
        out["legend"] = _legend_rows(codes, qnames, qrgba)
    return out


def _is_report_file(path: str) -> bool:
    """True when ``path`` is a report.json / report.html that :func:`write_report` wrote."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            return isinstance(doc, dict) and "report_version" in doc and "summary" in doc
        with open(path, "rb") as f:
            head = f.read(4096)
        return head.startswith(b"<!DOCTYPE html>") and b"<title>pumap_dask report:" in head
    except (OSError, ValueError):
        return False


def check_report_dir(out_dir: str | os.PathLike) -> str:
    """Refuse a report location where writing would replace something pumap_dask did not write.

    ``out_dir`` may be absent, a directory, or a directory holding an earlier report (whose
    two files a new report replaces); a file there, or a ``report.json`` / ``report.html``
    written by anything else, is refused.

    Parameters
    ----------
    out_dir
        The intended report directory.

    Returns
    -------
    str
        The absolute path.

    Raises
    ------
    InputError
        Naming the path and what to pass instead (CLI: ``--out``).
    """
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"the report directory {out} exists and is not a directory; pass a "
                         "directory for report.html and report.json (CLI: --out DIR, new or "
                         "holding an earlier report)")
    for name in (REPORT_JSON, REPORT_HTML):
        path = os.path.join(out, name)
        if os.path.lexists(path) and not _is_report_file(path):
            raise InputError(f"{path} exists and was not written by pumap_dask; it is never "
                             "overwritten: pass another report directory (CLI: --out DIR) or "
                             "move the file away")
    return out


def _label_title(labels: Any) -> str:
    """What the labels are called in a legend: the column of ``obs/<column>``, else
    ``label``."""
    if isinstance(labels, (str, os.PathLike)) and not os.path.isfile(os.fspath(labels)):
        return os.fspath(labels).rstrip("/").rsplit("/", 1)[-1] or "label"
    return "label"


def _labels_text(labels: Any, codes: np.ndarray | None) -> str | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        return os.fspath(labels)
    return f"array of {len(codes)}"


def write_report(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 data: Any = None, key: str | None = None, labels: Any = None,
                 query: Any = None, query_key: str | None = None, query_labels: Any = None,
                 n_sample: int = 5000, n_neighbors: int = 15, random_state: int = 0,
                 bins: int = 512, scatter_max: int = SCATTER_MAX) -> dict[str, Any]:
    """Write ``report.json`` and a self-contained ``report.html`` for a saved model.

    Parameters
    ----------
    model_dir
        The saved model.
    out_dir
        Where to write the two files (default: ``model_dir``); created if missing. An
        earlier report there is replaced; a file there, or a ``report.json`` /
        ``report.html`` pumap_dask did not write, is refused (:func:`check_report_dir`).
    data
        Rows to embed and measure: anything :func:`pumap_dask.io.as_dask` accepts (a Zarr
        array / AnnData store path, ``zarr.Array``, dask or numpy array). Without it the
        picture is the saved training embedding (if any) and the metrics that need the
        input are marked ``"not computed (pass --data)"``.
    key
        Array inside a Zarr group / AnnData store (default ``obsm/X_pca``).
    labels
        None, a 1-D array (one per row), a ``.npy`` path, or a key inside the data's store
        (e.g. ``"obs/cell_type"``; AnnData categoricals are decoded, and drawn in the
        store's ``uns/<column>_colors`` when it has them). Colours the picture by label
        (up to 20 labels) and adds the 15-NN accuracy.
    query
        New rows to show in their own panel, over the reference (the data's embedding, or
        the training embedding): input rows (as ``data``; embedded here) or the Zarr array
        ``pumap-dask transform --out`` wrote with this model (used as it is). Input rows
        also get their own trustworthiness and kNN preservation.
    query_key
        Array inside the query's store (default ``key``).
    query_labels
        Labels of the query rows (as ``labels``, keys inside the query's store). A label the
        reference has keeps its colour; with reference labels too, the report adds how
        often a 15-NN classifier on the reference embedding predicts them.
    n_sample
        Rows sampled (seeded by ``random_state``) for the quality metrics (of the data and
        of the query each).
    n_neighbors
        Neighbourhood size of trustworthiness and kNN preservation.
    random_state
        Seed of the samples, of the cross-validation folds and of the drawing order.
    bins
        The most histogram bins along the picture's longer axis (a histogram is drawn for
        more than ``scatter_max`` points; its bins grow with n up to this).
    scatter_max
        Up to this many points the embedding is a scatter of small markers; above, a 2-D
        histogram. A larger query is drawn as a seeded sample of this many points.

    Returns
    -------
    dict
        The report, as written to ``report.json`` (plus ``paths``).

    Raises
    ------
    ModelFileError
        When the model directory is broken.
    ImportError
        When matplotlib is missing (``pip install pumap_dask[plot]``).
    InputError
        For data, query or labels that do not fit the model, or an ``out_dir`` that is a
        file or holds report files pumap_dask did not write (:func:`check_report_dir`).
    """

    plotting.require_matplotlib()  # fail before any expensive work
    for name, value, least in (("n_sample", n_sample, 2), ("n_neighbors", n_neighbors, 1),
                               ("bins", bins, 8), ("scatter_max", scatter_max, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
                or value < least:
            raise ParameterError(f"{name} must be an integer >= {least}, got {value!r}")
    if query_labels is not None and query is None:
        raise ParameterError("query_labels needs query (CLI: --query-labels needs --query)")
    t_start = time.perf_counter()
    out_dir = check_report_dir(out_dir if out_dir is not None else model_dir)
    summary = model_summary(model_dir)
    model_dir = summary["model_dir"]
    query_key = key if query_key is None else query_key
    if query is not None:
        check_query(query, query_key)  # before any work
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the report directory {out_dir} ({exc.strerror}): "
                         "pass a writable out_dir (CLI: --out DIR)") from None
    steps: dict[str, float] = {}
    figures: dict[str, bytes] = {}
    codes, names, colors = None, None, None
    legend_title = _label_title(labels)

    darr = None
    if data is not None:
        darr = as_dask(data, key=key)
        check_n_features(darr.shape[1], summary["n_features"])
        if labels is not None:
            codes, names = load_labels(labels, data, darr.shape[0])
            colors = load_label_colors(labels, data, len(names))
        t0 = time.perf_counter()
        emb = embed_all(darr, model_dir)
        steps["embed all rows"] = time.perf_counter() - t0
        source = f"{emb.shape[0]:,} rows of {_describe_data(data, key)}"
    else:
        emb = load_embedding(model_dir, read_config(model_dir))
        source = f"training embedding ({EMBEDDING})" if emb is not None else None
        if emb is not None and labels is not None:
            codes, names = load_labels(labels, None, emb.shape[0])

    picture: dict[str, Any] = {"source": source}
    if emb is not None and emb.shape[1] >= 2:
        t0 = time.perf_counter()
        picture.update(_draw_embedding(emb, codes, names, colors, bins, scatter_max,
                                       legend_title, figures))
        steps["draw embedding"] = time.perf_counter() - t0
    elif emb is not None:
        picture["note"] = "a 1-D embedding is not drawn"
    else:
        picture["note"] = f"no picture: the model has no {EMBEDDING}; pass --data"

    metrics: dict[str, Any] = {"knn_recall": summary["fitted"].get("knn_recall"),
                               "knn_method": summary["fitted"].get("knn_method")}
    ref_idx = None
    if darr is not None:
        t0 = time.perf_counter()
        ref_idx = sample_rows(darr.shape[0], n_sample, random_state)
        Xs = np.asarray(darr[ref_idx].compute(), dtype=np.float32)
        metrics.update(quality_metrics(Xs, emb[ref_idx],
                                       None if codes is None else codes[ref_idx],
                                       n_neighbors, random_state))
        metrics.update(n_sample=int(ref_idx.size), n_neighbors=n_neighbors)
        steps["quality metrics"] = time.perf_counter() - t0
    else:
        metrics.update(trustworthiness=NEEDS_DATA, knn_preservation=NEEDS_DATA,
                       label_accuracy=NEEDS_DATA, label_accuracy_input=NEEDS_DATA)

    query_doc = None
    if query is not None:
        query_doc = _query_report(query, query_key, query_labels, summary, emb, codes, names,
                                  picture, scatter_max, n_sample, n_neighbors, random_state,
                                  figures, steps)
    del emb

    t0 = time.perf_counter()
    if summary["loss_history"]:
        figures["loss"] = plotting.plot_loss(summary["loss_history"])
    if summary["timings"]:
        figures["timings"] = plotting.plot_timings(summary["timings"])
    steps["other figures"] = time.perf_counter() - t0

    report = {
        "report_version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_dir": model_dir,
        "data": None if data is None else {
            "source": _describe_data(data, key), "key": key,
            "n_rows": int(darr.shape[0]), "n_features": int(darr.shape[1]),
            "labels": _labels_text(labels, codes), "label_names": names},
        "summary": summary,
        "picture": picture,
        "metrics": metrics,
        "query": query_doc,
        "seeds": {"report_random_state": random_state,
                  "model_random_state": summary["params"].get("random_state")},
        "report_timings": steps,
        "figures": sorted(figures),
    }
    report = to_jsonable(report)
    report["report_timings"]["total"] = time.perf_counter() - t_start
    json_path = os.path.join(out_dir, REPORT_JSON)
    html_path = os.path.join(out_dir, REPORT_HTML)
    write_json_atomic(json_path, report)

    _write_text_atomic(html_path, render_html(report, figures))
    logger.info("report written to %s (%s)", html_path,
                ", ".join(f"{k} {v:.2f}s" for k, v in report["report_timings"].items()))
    return {**report, "paths": {"json": json_path, "html": html_path}}


def _query_report(query: Any, key: str | None, labels: Any, summary: dict[str, Any],
                  emb: np.ndarray | None, codes: np.ndarray | None, names: list[str] | None,
                  picture: dict[str, Any], scatter_max: int, n_sample: int, n_neighbors: int,
                  random_state: int, figures: dict[str, bytes], steps: dict[str, float]
                  ) -> dict[str, Any]:
    """Embed (or read) the query, draw its panel and measure it; the report's ``query``."""
    t0 = time.perf_counter()
    qemb, qdarr = _query_embedding(query, key, summary)
    steps["embed query"] = time.perf_counter() - t0
    n = qemb.shape[0]
    qcodes = qnames = None
    qrgba = None
    if labels is not None:
        qcodes, qnames = load_labels(labels, query, n)
        legend = picture.get("legend")
        ref_rgba = (plotting.label_colors(len(legend), [e["color"] for e in legend])
                    if legend else None)
        qrgba = _query_colors(qnames, names if ref_rgba is not None else None, ref_rgba,
                              load_label_colors(labels, query, len(qnames)))
    doc: dict[str, Any] = {
        "source": _describe_data(query, None if qdarr is None else key),
        "key": None if qdarr is None else key, "n_rows": int(n),
        "embedded_here": qdarr is not None, "labels": _labels_text(labels, qcodes),
        "label_names": qnames}
    if qemb.shape[1] < 2:
        doc["picture"] = {"note": "a 1-D embedding is not drawn"}
    else:
        t0 = time.perf_counter()
        doc["picture"] = _draw_query(qemb, qcodes, qnames, qrgba, emb, scatter_max,
                                     _label_title(labels), random_state, figures)
        steps["draw query"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    qm: dict[str, Any] = {}
    q_idx = sample_rows(n, n_sample, random_state)
    if qdarr is not None:
        Xq = np.asarray(qdarr[q_idx].compute(), dtype=np.float32)
        found = quality_metrics(Xq, qemb[q_idx], None, n_neighbors, random_state)
        qm.update(trustworthiness=found["trustworthiness"],
                  knn_preservation=found["knn_preservation"])
    else:
        qm.update(trustworthiness="not computed (the query is an embedding: pass its input "
                                  "rows)",
                  knn_preservation="not computed (the query is an embedding: pass its input "
                                   "rows)")
    qm.update(n_sample=int(q_idx.size), n_neighbors=n_neighbors)
    if qcodes is None:
        qm["label_transfer_accuracy"] = "not computed (pass --query-labels)"
    elif codes is None or emb is None:
        qm["label_transfer_accuracy"] = "not computed (pass --labels for the reference)"
    else:
        r_idx = sample_rows(emb.shape[0], n_sample, random_state)
        ref_names = np.asarray(names, dtype=object)
        rn = np.where(codes[r_idx] >= 0, ref_names[np.clip(codes[r_idx], 0, None)], None)
        qn_all = np.asarray(qnames, dtype=object)
        qn = np.where(qcodes[q_idx] >= 0, qn_all[np.clip(qcodes[q_idx], 0, None)], None)
        transfer = label_transfer_accuracy(emb[r_idx], rn, qemb[q_idx], qn)
        qm["label_transfer_accuracy"] = transfer["accuracy"]
        qm.update(label_transfer_scored=transfer["n_scored"],
                  label_transfer_unknown=transfer["n_unknown"])
    steps["query metrics"] = time.perf_counter() - t0
    doc["metrics"] = qm
    return doc


__all__ = ["ModelFileError", "check_query", "check_report_dir", "embed_all", "format_info",
           "hist_bins", "knn_preservation",
           "load_labels", "model_summary", "quality_metrics", "sample_rows",
           "write_report"]
