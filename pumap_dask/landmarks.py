"""Landmark positions as a training term: rows pulled towards fixed positions.

Used by continued training (:mod:`pumap_dask.continued`) and the training loop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


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
