"""Model stage: save and load a trained encoder without pickle.

A saved model is a directory::

    model/
      config.json     parameters, encoder architecture, metadata, sha256 of the weights
      weights.pt      the encoder's state_dict (tensors only; loaded with weights_only=True)
      embedding.npy   the training embedding (optional; loaded with allow_pickle=False)

The directory is written to a temporary sibling and renamed into place, so a crash never
leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

from .train import Encoder

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "weights.pt"
EMBEDDING = "embedding.npy"


class ModelFileError(OSError):
    """A saved model directory is missing, incomplete or corrupt."""


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encoder_spec(encoder: Encoder) -> dict[str, Any]:
    """The architecture fields needed to rebuild an encoder."""
    return {
        "n_features": encoder.n_features,
        "n_components": encoder.n_components,
        "hidden_layers": list(encoder.hidden_layers),
        "n_projection": encoder.n_projection,
    }


def save_model(path: str | os.PathLike, encoder: Encoder, config: dict[str, Any],
               embedding: np.ndarray | None = None, overwrite: bool = True) -> str:
    """Write a model directory atomically; returns its path.

    Parameters
    ----------
    path
        Target directory.
    encoder
        The trained encoder.
    config
        JSON-serialisable parameters and metadata.
    embedding
        Training embedding to store beside the weights.
    overwrite
        Replace an existing directory at ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-pumap-", dir=parent)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        torch.save(state, os.path.join(tmp, WEIGHTS))
        doc = dict(config)
        doc["format_version"] = FORMAT_VERSION
        doc["encoder"] = encoder_spec(encoder)
        doc["weights_sha256"] = file_sha256(os.path.join(tmp, WEIGHTS))
        if embedding is not None:
            np.save(os.path.join(tmp, EMBEDDING), np.asarray(embedding), allow_pickle=False)
            doc["embedding_sha256"] = file_sha256(os.path.join(tmp, EMBEDDING))
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
        if os.path.exists(path):
            old = path + ".old-" + os.path.basename(tmp)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check a model directory's config.json."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelFileError(f"no saved model at {path!r} (expected a directory written by "
                             "ParametricUMAP.save)")
    cfg_path = os.path.join(path, CONFIG)
    try:
        with open(cfg_path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ModelFileError(f"{path!r} has no {CONFIG}; it is not a saved model or the save "
                             "was interrupted") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{cfg_path} is corrupt ({exc}); re-save the model") from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path!r} has format_version {doc.get('format_version')!r}; this "
                             f"pumap_dask reads version {FORMAT_VERSION}")
    for key in ("encoder", "weights_sha256"):
        if key not in doc:
            raise ModelFileError(f"{cfg_path} lacks {key!r}; the model directory is corrupt")
    return doc


def load_encoder(path: str | os.PathLike, verify: bool = True) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the encoder of a saved model and check its weights against the stored hash.

    Returns
    -------
    encoder, config
    """
    path = os.fspath(path)
    doc = read_config(path)
    wpath = os.path.join(path, WEIGHTS)
    if not os.path.exists(wpath):
        raise ModelFileError(f"{path!r} has no {WEIGHTS}; the model directory is incomplete")
    if verify and file_sha256(wpath) != doc["weights_sha256"]:
        raise ModelFileError(f"{wpath} does not match the sha256 recorded in {CONFIG}; the "
                             "file is corrupt or was modified")
    spec = doc["encoder"]
    enc = Encoder(spec["n_features"], spec["n_components"], spec["hidden_layers"],
                  spec.get("n_projection", 0))
    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
        enc.load_state_dict(state)
    except Exception as exc:
        raise ModelFileError(f"cannot load weights from {wpath}: {exc}") from exc
    return enc.eval(), doc


def load_embedding(path: str | os.PathLike, doc: dict[str, Any]) -> np.ndarray | None:
    """The stored training embedding, or None if the model was saved without it."""
    epath = os.path.join(os.fspath(path), EMBEDDING)
    if "embedding_sha256" not in doc:
        return None
    if not os.path.exists(epath) or file_sha256(epath) != doc["embedding_sha256"]:
        raise ModelFileError(f"{epath} is missing or does not match its recorded sha256")
    return np.load(epath, allow_pickle=False)
