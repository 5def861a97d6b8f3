"""The default encoder network and the batched forward pass every projection uses.

The network (:class:`Encoder`) lives here, below training and the model files, so
projection (:mod:`pumap_dask.transform`) never imports training code.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


# the activation after each hidden layer, by name (pumap_dask.params.ACTIVATIONS)
_ACTIVATION_LAYERS = {"leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
                      "silu": lambda: nn.SiLU(inplace=True)}


class Encoder(nn.Module):
    """Input normalisation (+ optional fixed linear projection) followed by an MLP.

    The normalisation and projection are buffers, part of the saved state, so a loaded
    encoder reproduces the original exactly and transform stays one forward pass. Each
    hidden layer is followed by ``activation`` (``"leaky_relu"``: LeakyReLU(0.1), or
    ``"silu"``).
    """

    def __init__(self, n_features: int, n_components: int = 2,
                 hidden_layers: Sequence[int] = (128, 64, 32), n_projection: int = 0,
                 activation: str = "leaky_relu") -> None:
        super().__init__()
        if activation not in _ACTIVATION_LAYERS:
            raise ValueError(f"activation must be one of {tuple(_ACTIVATION_LAYERS)}, got "
                             f"{activation!r}")
        self.n_features = n_features
        self.n_components = n_components
        self.hidden_layers = tuple(int(h) for h in hidden_layers)
        self.n_projection = int(n_projection)
        self.activation = activation
        self.register_buffer("center", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(()))
        width = n_features
        if self.n_projection:
            self.register_buffer("projection", torch.zeros(n_features, self.n_projection))
            width = self.n_projection
        layers: list[nn.Module] = []
        for h in self.hidden_layers:
            layers += [nn.Linear(width, h), _ACTIVATION_LAYERS[activation]()]
            width = h
        layers.append(nn.Linear(width, n_components))
        self.mlp = nn.Sequential(*layers)

    def prepare(self, X: np.ndarray, max_rows: int = 20000, seed: int = 0) -> None:
        """Set the centring, scale and (when n_projection > 0) PCA projection from data."""
        rng = np.random.default_rng(seed)
        rows = rng.choice(X.shape[0], size=min(X.shape[0], max_rows), replace=False)
        sample = X[np.sort(rows)]
        if type(sample).__module__.split(".")[0] == "cupy":  # a GPU array: DLPack, no numpy
            S = torch.from_dlpack(sample).to("cpu", torch.float32).to(torch.float64)
        else:
            S = torch.as_tensor(np.asarray(sample, dtype=np.float32), dtype=torch.float64)
        mean = S.mean(0)
        Z = S - mean
        if self.n_projection:
            p = min(self.n_projection, *Z.shape)
            _, _, Vh = torch.linalg.svd(Z, full_matrices=False)
            P = torch.zeros(Z.shape[1], self.n_projection, dtype=torch.float64)
            P[:, :p] = Vh[:p].T
            Z = Z @ P
            self.projection.copy_(P.float())
        # one global scale keeps relative feature variances (and so distances) intact
        rms = Z.pow(2).mean().sqrt().clamp_min(1e-12)
        self.center.copy_(mean.float())
        self.scale.copy_(rms.float())

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed part: centre, project, scale (no trainable parameters)."""
        z = x - self.center
        if self.n_projection:
            z = z @ self.projection
        return z / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.preprocess(x))


# Rows per inference forward pass when the caller gives none. On a CPU, batches whose
# activations stay in cache: a 200k-row block of 50 features through the default
# (128, 64, 32) encoder on one thread took 0.34-0.35 s at 4,096 rows against 0.53-0.60 s at
# 65,536 (1,024-16,384: 0.37-0.42 s). On a GPU, large batches keep the device busy.
FORWARD_BATCH = {"cpu": 4096, "cuda": 65536}


def forward_batch(batch_size: int | None, device: str | torch.device = "cpu") -> int:
    """``batch_size``, or when None the default for ``device`` (:data:`FORWARD_BATCH`)."""
    if batch_size:
        return int(batch_size)
    return FORWARD_BATCH["cuda" if str(device).startswith("cuda") else "cpu"]


def encode(encoder: Encoder, X: np.ndarray, batch_size: int | None = None,
           device: str = "cpu") -> np.ndarray:
    """Forward pass in batches under ``inference_mode``; returns float32 (n, n_components).

    Each row's output depends only on that row: the batch size (default
    :func:`forward_batch`) changes the result only by float rounding (about 1e-6). Used by
    training, the estimator and the lazy transform.
    """
    return batched_forward(encoder, X, encoder.n_components, batch_size, device)


def batched_forward(net: nn.Module, X: np.ndarray, n_out: int, batch_size: int | None = None,
                    device: str = "cpu") -> np.ndarray:
    """``net`` (in eval mode, on ``device``) over the rows of ``X`` in batches of
    ``batch_size`` rows (default :func:`forward_batch`) under ``inference_mode``: float32
    (n, n_out) on the host."""
    batch_size = forward_batch(batch_size, device)
    dev = torch.device(device)
    net = net.to(dev).eval()
    out = np.empty((X.shape[0], n_out), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, X.shape[0], batch_size):
            xb = torch.as_tensor(np.ascontiguousarray(X[i:i + batch_size], dtype=np.float32))
            out[i:i + batch_size] = net(xb.to(dev)).float().cpu().numpy()
    return out


def encoder_spec(encoder: Encoder) -> dict[str, Any]:
    """The architecture fields needed to rebuild an encoder.

    A custom encoder (:class:`pumap_dask.networks.CustomEncoder`) gives its factory's name
    and argument instead of the MLP's layers, and raises
    :class:`pumap_dask.networks.NetworkError` when it has no factory name.
    """
    if hasattr(encoder, "spec"):
        return encoder.spec()
    return {
        "n_features": encoder.n_features,
        "n_components": encoder.n_components,
        "hidden_layers": list(encoder.hidden_layers),
        "n_projection": encoder.n_projection,
        "activation": encoder.activation,
    }
