"""The fitted estimator's state: the one list of fitted attributes and its persistence.

:data:`FITTED_ATTRS` maps each fitted attribute to its key in the model's ``fitted``
block and to the :class:`pumap_dask.pipeline.FitResult` field it comes from, plus
``fit_record_``: when the fit ran, on which versions and cluster (:func:`fit_record`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
from importlib import metadata
from typing import Any, Mapping

import dask
import distributed
import numpy as np

from .encoder import encoder_spec
from .io import to_jsonable
from .model import load_decoder, load_embedding, load_encoder, save_model
from .refine import training_rows_for_save

logger = logging.getLogger(__name__)
# The fitted attributes: each is ``<field>_`` for a field of
# :class:`pumap_dask.pipeline.FitResult`. FITTED_ATTRS maps the saved ones to their key in the
# model's "fitted" block (the field name); the others live in their own files or not at all.
SAVED_FIELDS = ("a", "b", "n_features_in", "n_samples_fit", "n_epochs", "knn_method", "n_edges",
                "loss_history", "feature_stats", "timings", "knn_recall", "init",
                "train_world_size", "peak_memory", "worker_peak_memory", "input_shape",
                "reconstruction_history", "validation_reconstruction", "input_identity")
# what the fit itself records beside the FitResult (start and end time, versions, cluster):
# fitted attribute ``fit_record_``, saved as ``fitted["fit_record"]`` (see :func:`fit_record`)
RECORD_FIELDS = ("fit_record",)
FITTED_ATTRS = {f"{name}_": name for name in SAVED_FIELDS + RECORD_FIELDS}
# packages whose versions a fit records (python's too)
VERSION_PACKAGES = ("pumap_dask", "torch", "dask", "distributed", "numpy", "scikit-learn",
                    "zarr")
# fitted attributes not in config.json: weights, embedding and decoder are files; the graph
# and the kept training rows are not saved
UNSAVED_ATTRS = ("encoder_", "embedding_", "decoder_", "graph_", "n_epochs_run_")
# attributes a fit or load sets that describe a saved copy or a cache (cleared by a new fit)
STALE_ATTRS = ("model_path_", "model_sha256_", "_refine_reference", "_training_data_sha256",
               "_refine_rows", *UNSAVED_ATTRS)


def set_fitted(est: Any, res: Any) -> None:
    """Copy a :class:`pumap_dask.pipeline.FitResult` onto ``est``: field ``f`` becomes
    ``f_`` (fields that are None are left unset); ``n_epochs_run_`` is the epochs trained."""
    for f in dataclasses.fields(res):
        value = getattr(res, f.name)
        if value is not None:
            setattr(est, f.name + "_", value)
    est.n_epochs_run_ = res.n_epochs_run
    est.fit_record_ = fit_record(res.timings)


def package_versions(names: tuple[str, ...] = VERSION_PACKAGES) -> dict[str, str]:
    """``{"python": ..., package: version}`` of this environment (``"not installed"`` for a
    package it lacks)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def active_cluster() -> dict[str, Any]:
    """Where this process's Dask work runs now: the default ``distributed.Client``'s
    scheduler (``kind`` ``"local"`` for a LocalCluster this process started, the cluster
    class's name for another one it started, ``"remote scheduler"`` for one it connected
    to), else dask's in-process scheduler."""
    try:
        client = distributed.default_client()
    except ValueError:
        client = None
    if client is None:
        name = dask.config.get("scheduler", None) or "threads"
        return {"kind": "in-process", "scheduler": str(name)}
    cluster = getattr(client, "cluster", None)
    if cluster is None:
        kind = "remote scheduler"
    elif type(cluster).__name__ == "LocalCluster":
        kind = "local"
    else:
        kind = type(cluster).__name__
    out: dict[str, Any] = {"kind": kind, "address": None, "n_workers": None}
    try:
        out["address"] = str(client.scheduler.address)
        out["n_workers"] = len(client.scheduler_info().get("workers", {}))
    except Exception:  # a closing or unreachable scheduler: the kind is still worth keeping
        logger.debug("could not ask the scheduler for its address and workers",
                     exc_info=True)
    return out


def _now(t: datetime.datetime | None = None) -> str:
    t = t or datetime.datetime.now(datetime.timezone.utc)
    return t.isoformat(timespec="seconds")


def fit_record(timings: Mapping[str, float] | None = None) -> dict[str, Any]:
    """What a fit records about itself when it ends (saved as ``fitted["fit_record"]``).

    Parameters
    ----------
    timings
        The fit's wall time per stage; the stages run one after the other from the fit's
        first line, so their sum is the fit's wall time.

    Returns
    -------
    dict
        ``started`` and ``finished`` (ISO 8601, UTC; ``started`` is ``finished`` minus the
        stages' wall time; :func:`save_estimator` adds ``saved``), ``wall_s``, ``host``,
        ``versions`` (:func:`package_versions`) and ``cluster`` (:func:`active_cluster`).
    """
    finished = datetime.datetime.now(datetime.timezone.utc)
    wall = float(sum((timings or {}).values()))
    started = finished - datetime.timedelta(seconds=wall)
    return {"started": started.isoformat(timespec="seconds"),
            "finished": _now(finished),
            "wall_s": round(wall, 3), "host": platform.node(),
            "versions": package_versions(), "cluster": active_cluster()}


# estimator parameters left out of config.json
UNSAVED_PARAMS = ("callbacks",)


def save_estimator(path: str | os.PathLike, est: Any, *, include_embedding: bool = True,
                   include_training_data: bool = False) -> str:
    """Save a fitted :class:`~pumap_dask.ParametricUMAP` as a model directory.

    Parameters
    ----------
    path
        Target directory (see :func:`save_model`).
    est
        The fitted estimator.
    include_embedding
        Also store ``est.embedding_``.
    include_training_data
        Also store the training rows kept for ``transform(..., refine=True)`` (see
        :func:`pumap_dask.refine.stored_reference`; needs ``include_embedding``).

    Returns
    -------
    str
        The model directory.
    """
    # callbacks are arbitrary Python objects, never saved (a loaded model has none)
    raw = {k: v for k, v in est.get_params().items() if k not in UNSAVED_PARAMS}
    decoder = getattr(est, "decoder_", None)
    spec = encoder_spec(est.encoder_)  # a custom network without a factory name fails here,
    if decoder is not None:            # before anything is written
        decoder.spec()
    # custom networks are saved as their factory's name (the trained weights are the files)
    raw["encoder"] = spec.get("factory")
    raw["decoder"] = None if decoder is None else decoder.spec().get("factory")
    params = to_jsonable(raw, float32=True)
    fitted = {key: to_jsonable(getattr(est, attr, None), float32=True)
              for attr, key in FITTED_ATTRS.items()}
    fitted["loss_history"] = [float(x) for x in fitted["loss_history"]]
    if isinstance(fitted.get("fit_record"), dict):  # this save's time beside the fit's
        fitted["fit_record"] = {**fitted["fit_record"], "saved": _now()}
    embedding = est.embedding_ if include_embedding else None
    training_data = None
    if include_training_data:
        embedding, training_data = training_rows_for_save(est, embedding)
    return save_model(path, est.encoder_, {"params": params, "fitted": fitted}, embedding,
                      decoder=decoder, training_data=training_data)


def load_estimator_state(path: str | os.PathLike, valid_params: dict,
                         networks: Mapping[str, Any] | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Constructor parameters and fitted attributes of a saved estimator.

    Parameters
    ----------
    path
        The model directory.
    valid_params
        The estimator's parameter names (others are ignored with a warning).
    networks
        Factories of custom networks by the name the model records
        (:func:`pumap_dask.model.rebuild_network`).

    Returns
    -------
    params, attributes
        ``attributes`` holds ``encoder_``, the fitted ``*_`` attributes, ``embedding_`` when
        saved, ``model_path_`` and ``model_sha256_``.
    """
    encoder, doc = load_encoder(path, networks=networks)  # config verified and validated
    params = dict(doc["params"])
    unknown = sorted(set(params) - set(valid_params))
    if unknown:
        logger.warning("ignoring parameters %s of the model at %s (saved by another "
                       "pumap_dask version?)", unknown, path)
    params = {k: v for k, v in params.items() if k in valid_params}
    if "activation" in valid_params and hasattr(encoder, "activation"):
        params["activation"] = encoder.activation  # older models: LeakyReLU, not recorded
    f = doc["fitted"]
    attrs: dict[str, Any] = {"encoder_": encoder}
    for attr, key in FITTED_ATTRS.items():
        if f.get(key) is not None:
            attrs[attr] = f[key]
    attrs["loss_history_"] = list(f["loss_history"])
    attrs["feature_stats_"] = {k: np.asarray(v, dtype=np.float32)
                               for k, v in f["feature_stats"].items()}
    attrs["timings_"] = dict(f.get("timings") or {})
    emb = load_embedding(path, doc)
    if emb is not None:
        attrs["embedding_"] = emb
    dec = load_decoder(path, doc, networks=networks)
    if dec is not None:
        attrs["decoder_"] = dec
    if attrs.get("input_shape_") is not None:
        attrs["input_shape_"] = tuple(attrs["input_shape_"])
    attrs["n_epochs_run_"] = len(attrs["loss_history_"])
    attrs["model_path_"] = os.path.abspath(os.fspath(path))
    attrs["model_sha256_"] = doc["weights_sha256"]
    # the directory stores training rows (read by pumap_dask.refine when a transform polishes)
    attrs["_training_data_sha256"] = doc.get("training_data_sha256")
    return params, attrs
