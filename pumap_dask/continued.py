"""Continued training and landmarks.

Continued training (``fit(X, init_model=...)``, ``partial_fit(X_new)``) starts the UMAP
training from a fitted encoder's weights instead of a fresh network pre-trained on an
initial layout. The encoder's fixed preprocessing (centring, PCA projection, scale) is
kept as fitted the first time, so embeddings made before and after stay comparable.

Landmarks pin some rows to given positions: the training loss gains

.. math::

    w \\cdot \\frac{1}{L} \\sum_{i=1}^{L} \\lVert f(x_{r_i}) - p_{r_i} \\rVert^2

per optimiser step, where ``w`` is ``landmark_loss_weight`` and ``r_1 .. r_L`` are
``L = min(batch_size, n_landmarks)`` landmark rows drawn uniformly with replacement by the
training RNG (so a fixed ``random_state`` gives the same draws). umap-learn's default
landmark loss is the Euclidean distance; the squared distance used here pulls far-off
landmarks harder and is smooth at zero.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .model import Encoder


@dataclass
class Landmarks:
    """Landmark rows of the training data, their target positions and the loss weight.

    Attributes
    ----------
    rows
        Row ids (int64, sorted) into the training data.
    positions
        float32 (len(rows), n_components) target positions.
    weight
        ``landmark_loss_weight``.
    """

    rows: np.ndarray
    positions: np.ndarray
    weight: float

    def __len__(self) -> int:
        return int(len(self.rows))

    def digest(self) -> str:
        """sha256 of rows, positions and weight (for checkpoint fingerprints)."""
        import hashlib

        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.positions, dtype=np.float32).tobytes())
        h.update(repr(float(self.weight)).encode())
        return h.hexdigest()


class LandmarkTerm:
    """The landmark loss of one training run (see the module docstring).

    Parameters
    ----------
    landmarks
        The landmarks.
    batch_size
        Positive edges per step; at most this many landmark rows are drawn per step.
    device
        The training device (positions are moved there once).
    """

    def __init__(self, landmarks: Landmarks, batch_size: int, device: torch.device) -> None:
        self.rows = torch.as_tensor(landmarks.rows, dtype=torch.int64)
        self.positions = torch.as_tensor(landmarks.positions, dtype=torch.float32).to(device)
        self.weight = float(landmarks.weight)
        self.size = int(min(batch_size, len(landmarks)))
        self.device = device

    def __call__(self, net: torch.nn.Module, Xt: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
        """Weighted mean squared distance of sampled landmark rows to their positions."""
        pick = torch.randint(len(self.rows), (self.size,), generator=gen)
        xb = Xt[self.rows[pick].to(Xt.device)].to(self.device, non_blocking=True)
        d2 = (net(xb) - self.positions[pick.to(self.device)]).pow(2).sum(-1)
        return self.weight * d2.mean()


def landmark_distances(embedding: np.ndarray, landmarks: Landmarks) -> np.ndarray:
    """Euclidean distance of each landmark row's embedding to its position."""
    return np.linalg.norm(embedding[landmarks.rows] - landmarks.positions, axis=1)


def resolve_init_model(init_model: Any) -> Encoder:
    """A private copy of the encoder of a fitted estimator or of a saved model directory.

    Parameters
    ----------
    init_model
        A fitted :class:`~pumap_dask.ParametricUMAP` (anything with an ``encoder_``) or the
        path of a model directory saved by :meth:`~pumap_dask.ParametricUMAP.save`.

    Returns
    -------
    Encoder
        A deep copy (training it leaves ``init_model`` unchanged), in eval mode on the CPU.

    Raises
    ------
    ValueError
        When ``init_model`` is neither, or is an estimator that is not fitted.
    ModelFileError
        When the saved model is missing, incomplete or corrupt.
    """
    if isinstance(init_model, (str, os.PathLike)):
        from .model import load_encoder

        encoder, _ = load_encoder(init_model)  # checksummed and validated
        return encoder
    if _is_encoder(init_model):
        return copy.deepcopy(init_model).cpu().eval()
    encoder = getattr(init_model, "encoder_", None)
    if _is_encoder(encoder):
        return copy.deepcopy(encoder).cpu().eval()
    if hasattr(init_model, "get_params"):
        raise ValueError("init_model is not fitted; fit it (or load a saved model) first")
    raise ValueError("init_model must be a fitted ParametricUMAP or the path of a saved "
                     f"model directory, got {type(init_model).__name__}")


def _is_encoder(obj: Any) -> bool:
    """The default MLP encoder, or a custom network wrapped by :mod:`pumap_dask.networks`."""
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "n_features") \
        and hasattr(obj, "n_components")


def check_architecture(encoder: Any, n_features: int, params: dict) -> None:
    """Fail unless ``encoder`` has the architecture a fit with ``params`` of data with
    ``n_features`` columns would build (feature count, n_components, hidden layers and
    input projection width; for a custom network, feature count and n_components, and the
    estimator must be given a custom ``encoder`` too).

    Raises
    ------
    ValueError
        Naming each difference and how to resolve it.
    """
    if encoder.n_features != n_features:  # worded as sklearn's feature-count check
        raise ValueError(f"X has {n_features} features, but init_model is expecting "
                         f"{encoder.n_features} features as input (n_features: the number it "
                         "was fitted on); continued training needs the same features")
    custom_init = not isinstance(encoder, Encoder)
    custom_here = params.get("encoder") is not None
    if custom_init != custom_here:
        which = ("a custom encoder network" if custom_init else "the default MLP encoder")
        raise ValueError(f"init_model has {which} but this estimator "
                         f"{'does not' if custom_init else 'does'} set encoder=; continued "
                         "training needs the same architecture: use ParametricUMAP("
                         "**old.get_params())")
    if custom_init:
        want = {"n_features": n_features, "n_components": int(params["n_components"])}
        have = {"n_features": encoder.n_features, "n_components": encoder.n_components}
        diff = [f"{k}: init_model {have[k]} vs {want[k]}" for k in want if have[k] != want[k]]
        if diff:
            raise ValueError("init_model's encoder does not match this fit (" + "; ".join(diff)
                             + "); continued training needs the same architecture")
        return
    n_proj = params["n_projection"] if 0 < params["n_projection"] < n_features else 0
    want = {"n_features": n_features, "n_components": int(params["n_components"]),
            "hidden_layers": tuple(int(h) for h in params["hidden_layers"]),
            "n_projection": int(n_proj)}
    have = {"n_features": encoder.n_features, "n_components": encoder.n_components,
            "hidden_layers": tuple(encoder.hidden_layers),
            "n_projection": encoder.n_projection}
    diff = [f"{k}: init_model {have[k]} vs {want[k]}" for k in want if have[k] != want[k]]
    if diff:
        raise ValueError("init_model's encoder does not match this fit ("
                         + "; ".join(diff) + "); continued training needs the same "
                         "architecture: give this estimator init_model's n_components, "
                         "hidden_layers and n_projection (e.g. ParametricUMAP(**"
                         "old.get_params())) and data with the same features")
