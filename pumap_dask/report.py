"""Report stage: what a saved model is (``pumap-dask info``) and how good it is
(``pumap-dask report``).

:func:`model_summary` reads a model directory through :mod:`pumap_dask.model`'s verified
readers; :func:`format_info` turns the summary into text. :func:`write_report` adds the
figures and quality metrics (:mod:`pumap_dask.report_metrics`) and writes ``report.json``
and one self-contained ``report.html`` (figures are PNG data URIs; no external CSS, JS or
images).

With data, every row is embedded block by block through the lazy transform (only the
n x 2 embedding is held), binned into a 2-D histogram (drawn as one image, so millions of
points draw in about a second), and quality is measured on a seeded random sample:
trustworthiness, kNN preservation and, with labels, cross-validated 15-NN accuracy.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import time
import uuid
from importlib import metadata
from typing import Any

import dask
import numpy as np

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
    stage_table,
)
from .report_html import render_html
from .report_metrics import knn_preservation, load_labels, quality_metrics, sample_rows
from .transform import transform

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_VERSION = 1
MAX_LEGEND_LABELS = 20
NEEDS_DATA = "not computed (pass --data)"
VERSION_PACKAGES = ("pumap_dask", "torch", "dask", "numpy")


# --------------------------------------------------------------------------- summary
def _env_versions(names: tuple[str, ...] = VERSION_PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


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
        min), ``loss_history``, ``versions`` (``recorded`` by the model and, for packages
        it lacks, the ``reading_environment``), ``run_config`` (``run_config.json``, or
        None), ``has_embedding`` and ``weights_sha256``.

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
    recorded = doc.get("versions") or fitted.get("versions") or {}
    if not isinstance(recorded, dict):
        recorded = {"recorded": str(recorded)}
    env = {k: v for k, v in _env_versions().items() if k not in recorded}
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
        "versions": {"recorded": dict(recorded), "reading_environment": env},
        "run_config": _read_run_config(path),
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
        memory), Versions and Run config.
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
        ("samples fitted", fmt_num(summary["n_samples_fit"])),
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
    lines += ["", "Versions"]
    versions = summary["versions"]
    rec = versions["recorded"]
    lines.append("  recorded in the model:" + ("" if rec else f" {NOT_RECORDED}"))
    lines += _kv(sorted(rec.items()), "    ")
    if versions["reading_environment"]:
        lines.append("  reading environment (not recorded in the model):")
        lines += _kv(sorted(versions["reading_environment"].items()), "    ")
    lines += ["", "Run config"]
    if summary["run_config"] is None:
        lines.append(f"  {NOT_RECORDED} (no {RUN_CONFIG})")
    else:
        text = json.dumps(summary["run_config"], indent=2, sort_keys=True, default=str)
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


def _draw_embedding(emb: np.ndarray, codes: np.ndarray | None, names: list[str] | None,
                    bins: int, figures: dict[str, bytes]) -> dict[str, Any]:
    """Bin the embedding once and draw it: by majority label (up to MAX_LEGEND_LABELS
    labels) beside the density, else the density alone. Adds the PNGs to ``figures`` and
    returns what the picture shows."""

    n = emb.shape[0]
    n_lab = len(names) if names is not None else 0
    colour = codes is not None and 0 < n_lab <= MAX_LEGEND_LABELS
    # fewer bins for few points, so each point shows as more than a pixel
    n_bins = int(min(bins, max(100, 4 * math.sqrt(n))))
    binned = plotting.bin_embedding(emb[:, :2], n_bins, codes if colour else None,
                                    n_lab if colour else 0)
    ny, nx = binned["counts"].shape
    note = f"{n:,} points in {nx} x {ny} bins"
    if binned["n_outside"]:
        note += f"; {binned['n_outside']:,} outliers outside the drawn area"
    if codes is not None and not colour:
        note += f"; {n_lab} labels (more than {MAX_LEGEND_LABELS}): density shown"
    density = plotting.plot_binned_embedding(binned["counts"], binned["extent"],
                                             title="Embedding: density", note=note)
    if colour:
        figures["embedding"] = plotting.plot_binned_embedding(
            binned["counts"], binned["extent"], majority=binned["majority"], names=names,
            title="Embedding: majority label per bin", note=note)
        figures["embedding_density"] = density
    else:
        figures["embedding"] = density
    out = {"n_points": int(n), "coloured_by": "majority label per bin" if colour
           else "density", "bins": [nx, ny], "extent": binned["extent"],
           "n_outside": binned["n_outside"], "n_nonfinite": binned["n_nonfinite"],
           "n_labels": n_lab if codes is not None else None}
    if emb.shape[1] > 2:
        out["note"] = f"first 2 of {emb.shape[1]} components drawn"
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


def write_report(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 data: Any = None, key: str | None = None, labels: Any = None,
                 n_sample: int = 5000, n_neighbors: int = 15, random_state: int = 0,
                 bins: int = 512) -> dict[str, Any]:
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
        (e.g. ``"obs/cell_type"``; AnnData categoricals are decoded). Colours each bin of
        the picture by its majority label (up to 20 labels) and adds the 15-NN accuracy.
    n_sample
        Rows sampled (seeded by ``random_state``) for the quality metrics.
    n_neighbors
        Neighbourhood size of trustworthiness and kNN preservation.
    random_state
        Seed of the sample and of the cross-validation folds.
    bins
        Histogram bins along the picture's longer axis.

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
        For data or labels that do not fit the model, or an ``out_dir`` that is a file or
        holds report files pumap_dask did not write (:func:`check_report_dir`).
    """

    plotting.require_matplotlib()  # fail before any expensive work
    for name, value, least in (("n_sample", n_sample, 2), ("n_neighbors", n_neighbors, 1),
                               ("bins", bins, 8)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
                or value < least:
            raise ParameterError(f"{name} must be an integer >= {least}, got {value!r}")
    t_start = time.perf_counter()
    out_dir = check_report_dir(out_dir if out_dir is not None else model_dir)
    summary = model_summary(model_dir)
    model_dir = summary["model_dir"]
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the report directory {out_dir} ({exc.strerror}): "
                         "pass a writable out_dir (CLI: --out DIR)") from None
    steps: dict[str, float] = {}
    figures: dict[str, bytes] = {}
    codes, names = None, None

    darr = None
    if data is not None:
        darr = as_dask(data, key=key)
        check_n_features(darr.shape[1], summary["n_features"])
        if labels is not None:
            codes, names = load_labels(labels, data, darr.shape[0])
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
        picture.update(_draw_embedding(emb, codes, names, bins, figures))
        steps["draw embedding"] = time.perf_counter() - t0
    elif emb is not None:
        picture["note"] = "a 1-D embedding is not drawn"
    else:
        picture["note"] = f"no picture: the model has no {EMBEDDING}; pass --data"

    metrics: dict[str, Any] = {"knn_recall": summary["fitted"].get("knn_recall"),
                               "knn_method": summary["fitted"].get("knn_method")}
    if darr is not None:
        t0 = time.perf_counter()
        idx = sample_rows(darr.shape[0], n_sample, random_state)
        Xs = np.asarray(darr[idx].compute(), dtype=np.float32)
        metrics.update(quality_metrics(Xs, emb[idx], None if codes is None else codes[idx],
                                       n_neighbors, random_state))
        metrics.update(n_sample=int(idx.size), n_neighbors=n_neighbors)
        steps["quality metrics"] = time.perf_counter() - t0
    else:
        metrics.update(trustworthiness=NEEDS_DATA, knn_preservation=NEEDS_DATA,
                       label_accuracy=NEEDS_DATA, label_accuracy_input=NEEDS_DATA)
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
            "labels": None if labels is None else (
                os.fspath(labels) if isinstance(labels, (str, os.PathLike))
                else f"array of {len(codes)}"),
            "label_names": names},
        "summary": summary,
        "picture": picture,
        "metrics": metrics,
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


__all__ = ["ModelFileError", "check_report_dir", "embed_all", "format_info", "knn_preservation",
           "load_labels", "model_summary", "quality_metrics", "sample_rows",
           "write_report"]
