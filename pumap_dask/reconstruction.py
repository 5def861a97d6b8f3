"""Parametric reconstruction: the decoder's training term, its error, ``inverse_transform``.

The decoder networks themselves live in :mod:`pumap_dask.networks`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from torch import nn

from .checkpoint import state_digest
from .encoder import batched_forward
from .errors import InputError, NetworkError
from .io import check_array
from .networks import _DECODERS, CustomEncoder, Decoder, build_custom_encoder, build_decoder

logger = logging.getLogger(__name__)
class ReconstructionTerm:
    """The reconstruction part of the training loss (used by :func:`pumap_dask.train._train`).

    Parameters
    ----------
    decoder
        The decoder to train.
    X
        Raw training rows (n, n_features), the reconstruction targets.
    weight
        ``parametric_reconstruction_loss_weight``.
    autoencoder_loss
        Let the reconstruction gradient reach the encoder (else the embedding is detached).
    """

    def __init__(self, decoder: Decoder, X: np.ndarray, weight: float = 1.0,
                 autoencoder_loss: bool = False) -> None:
        self.decoder = decoder
        self.X = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32))
        self.weight = float(weight)
        self.autoencoder_loss = bool(autoencoder_loss)
        self.history: list[float] = []
        self._sum, self._steps = 0.0, 0
        self.start: str | None = None  # digest of init_model's decoder (continued training)

    def to(self, device: torch.device) -> "ReconstructionTerm":
        self.device = torch.device(device)
        self.decoder.to(self.device).train()
        if self.device.type != "cpu" and self.X.numel() * 4 < (2 << 30):
            self.X = self.X.to(self.device)
        return self

    def parameters(self):
        return self.decoder.parameters()

    def fingerprint(self) -> str:
        """What a training checkpoint must also match when the decoder is trained."""
        doc = f"{self.weight}|{self.autoencoder_loss}|{self.decoder.loss}|{self.decoder}"
        if self.start is not None:  # continued from init_model's decoder
            doc += f"|{self.start}"
        return hashlib.sha256(doc.encode()).hexdigest()

    def __call__(self, rows: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Weighted loss of decoding ``emb`` (the embeddings of training rows ``rows``)."""
        z = emb.float() if self.autoencoder_loss else emb.detach().float()
        x = self.X[rows.to(self.X.device)].to(z.device, non_blocking=True)
        loss = self.decoder.reconstruction_loss(z, x)
        self._sum += float(loss.detach())
        self._steps += 1
        return self.weight * loss

    def end_epoch(self) -> None:
        self.history.append(self._sum / max(1, self._steps))
        self._sum, self._steps = 0.0, 0


def reconstruction_error(encoder: nn.Module, decoder: Decoder, X: np.ndarray,
                         batch_size: int = 8192) -> float:
    """Mean squared error, in input units, of ``decoder(encoder(X))`` against ``X`` (rows).

    The networks are evaluated in eval mode under ``no_grad`` on their own device, and
    left in the mode they were in.
    """
    device = next(decoder.parameters()).device
    modes = (encoder.training, decoder.training)
    encoder.eval()
    decoder.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, X.shape[0], batch_size):
                xb = torch.as_tensor(np.ascontiguousarray(X[i:i + batch_size],
                                                          dtype=np.float32)).to(device)
                rec = decoder(encoder(xb).float())
                total += float(((rec - xb) ** 2).sum(dtype=torch.float64))
                count += xb.numel()
    finally:
        encoder.train(modes[0])
        decoder.train(modes[1])
    return total / max(1, count)


def decode(decoder: Decoder, Z: np.ndarray, batch_size: int | None = None,
           device: str = "cpu") -> np.ndarray:
    """Decoder forward pass in batches: (n, n_components) -> (n, n_features) float32."""

    return batched_forward(decoder, Z, decoder.n_features, batch_size, device)


def _decoder_blob(decoder: Decoder) -> tuple[str, bytes]:
    """(sha256, serialised module) of a decoder, shipped once to the workers."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in decoder.state_dict().items()}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest(), buf.getvalue()


def _inverse_block(block: np.ndarray, source: tuple, batch_size: int | None) -> np.ndarray:
    """Decode one block of embedding rows (runs on a worker; decoder cached by hash)."""
    sha, module = source
    dec = _DECODERS.get(sha)
    if dec is None:
        dec = _DECODERS[sha] = copy.deepcopy(module).cpu().eval()
    return decode(dec, np.asarray(block, dtype=np.float32), batch_size=batch_size)


def inverse_transform(Z: Any, decoder: Decoder, n_components: int,
                      batch_size: int | None = None) -> Any:
    """Map embeddings back to input space with a trained decoder.

    Parameters
    ----------
    Z
        (n, n_components) embeddings: numpy (or anything numpy accepts), or a dask array.
    decoder
        The trained :class:`Decoder`.
    n_components
        The embedding dimension, checked against ``Z``.
    batch_size
        Rows per forward pass.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        (n, *input_shape) float32; lazy (one block per row block of ``Z``) for dask input.
    """

    shape = decoder.input_shape
    if type(Z).__module__.startswith("dask"):
        if Z.ndim != 2 or Z.shape[1] != n_components:
            raise InputError(f"Z must have shape (n, {n_components}), got {Z.shape}")
        Z = Z.rechunk({1: -1}).astype(np.float32)
        sha, _ = _decoder_blob(decoder)
        src = dask.delayed((sha, decoder.cpu()), pure=True, traverse=False)
        out = da.map_blocks(_inverse_block, Z, src, batch_size=batch_size or None,
                            chunks=(Z.chunks[0], (decoder.n_features,)), dtype=np.float32,
                            meta=np.empty((0, 0), np.float32),
                            name="pumap-inverse-" + dask.base.tokenize(Z, sha, batch_size))
        return out if len(shape) == 1 else out.reshape((Z.shape[0], *shape))
    Z = check_array(Z, what="Z")
    if Z.shape[1] != n_components:
        raise InputError(f"Z has {Z.shape[1]} columns, but the embedding has {n_components} "
                         "dimensions")
    out = decode(decoder, Z, batch_size=batch_size)
    return out if len(shape) == 1 else out.reshape(Z.shape[0], *shape)


def build_for_fit(params: dict, input_shape: tuple[int, ...], cfg: Any, X: np.ndarray,
                  init_decoder: Decoder | None = None
                  ) -> tuple[CustomEncoder | None, ReconstructionTerm | None]:
    """The custom encoder (None: the default MLP) and the reconstruction term (None: no
    decoder) of a fit, from the estimator's parameters.

    Parameters
    ----------
    params
        The estimator's ``get_params()``.
    input_shape
        The trailing shape of the input rows ((n_features,) for 2-D input).
    cfg
        The :class:`pumap_dask.train.TrainConfig` of the fit.
    X
        The raw training rows (n, n_features): the reconstruction targets.
    init_decoder
        Continued training (:mod:`pumap_dask.continued`): a trained decoder of the same
        architecture to start from (copied, its centre and scale kept) instead of a fresh
        one.
    """
    seed = params.get("random_state")
    encoder = None
    if params.get("encoder") is not None:
        encoder = build_custom_encoder(params["encoder"], input_shape, cfg.n_components, seed)
    recon = None
    if params.get("parametric_reconstruction"):
        if init_decoder is not None:  # continued training: init_model's decoder
            decoder = copy.deepcopy(init_decoder)
        else:
            decoder = build_decoder(params.get("decoder"), input_shape, cfg.n_components,
                                    params.get("reconstruction_loss", "mse"),
                                    tuple(cfg.hidden_layers), X, seed)
        if decoder.loss == "bce" and (X.min() < 0 or X.max() > 1):
            raise NetworkError("reconstruction_loss='bce' needs data in [0, 1]; the input "
                               f"spans [{X.min():g}, {X.max():g}]: rescale it or use 'mse'")
        recon = ReconstructionTerm(decoder, X,
                                   params.get("parametric_reconstruction_loss_weight", 1.0),
                                   params.get("autoencoder_loss", False))
        if init_decoder is not None:  # a checkpoint must match the starting weights too

            recon.start = state_digest(decoder)
        recon.validation = []
    elif params.get("decoder") is not None:
        logger.warning("decoder= is ignored without parametric_reconstruction=True")
    return encoder, recon


def check_validation(data: Any, input_shape: tuple[int, ...]) -> np.ndarray:
    """``validation_data`` as float32 rows, checked against the training input's shape."""

    arr = np.asarray(data.compute() if hasattr(data, "compute") else data)
    if arr.ndim != len(input_shape) + 1 or tuple(arr.shape[1:]) != tuple(input_shape):
        raise InputError(f"validation_data has shape {arr.shape}, but X has samples of shape "
                         f"{tuple(input_shape)}")
    return check_array(arr.reshape(arr.shape[0], -1), what="validation_data")
