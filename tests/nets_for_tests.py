"""Small importable network factories for tests/test_networks.py (saved by name)."""

from __future__ import annotations

import torch
from torch import nn


def make_encoder(n_features: int, n_components: int = 2) -> nn.Module:
    """A small MLP encoder for 2-D input."""
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, n_components))


def make_decoder(n_features: int, n_components: int = 2) -> nn.Module:
    """A small MLP decoder back to ``n_features`` (input units)."""
    return nn.Sequential(nn.Linear(n_components, 32), nn.ReLU(), nn.Linear(32, n_features))


class _ConvEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int], n_components: int = 2) -> None:
        super().__init__()
        h, w = shape
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Linear(8 * ((h + 1) // 2) * ((w + 1) // 2), n_components)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 3, f"the conv encoder expects (batch, h, w), got {tuple(x.shape)}"
        z = self.conv(x.unsqueeze(1) / 16.0)  # digits pixels are 0..16
        return self.head(z.flatten(1))


def make_conv_encoder(shape: tuple[int, int]) -> nn.Module:
    """A small conv encoder for images (batch, h, w)."""
    return _ConvEncoder(tuple(shape))


def make_image_decoder(shape: tuple[int, int]) -> nn.Module:
    """Embedding -> (batch, h, w) images."""
    h, w = shape
    return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, h * w),
                         nn.Unflatten(1, (h, w)))
