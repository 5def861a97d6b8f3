"""Transform stage: the frozen encoder mapped over row blocks, lazily.

The model reaches the workers once: as ``(path, sha256)`` for a saved model, or as one
small serialised state (a single key in the task graph) for an in-memory model. Each
worker process loads it once and caches it by hash.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from distributed import get_worker

from .arrays import as_tensor, cupy_module, is_cupy, reuses_freed_memory
from .encoder import Encoder, encode, encoder_spec, forward_batch
from .errors import InputError, ModelFileError
from .io import as_dask, check_n_features
from .model import WEIGHTS, checked_file, load_encoder, read_config
from .params import check_transform_args, resolve_device

logger = logging.getLogger(__name__)

_CACHE: dict[tuple[str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """A saved model, addressed by directory and weights hash."""

    path: str
    sha256: str
    n_features: int
    n_components: int


@dataclass(frozen=True)
class ModelBlob:
    """An in-memory model's weights and architecture, serialised once."""

    sha256: str
    spec: dict
    state: bytes
    n_features: int
    n_components: int
    # a custom network (pumap_dask.networks.CustomEncoder) travels as the module itself
    module: Any = field(default=None, compare=False, repr=False)

    def __dask_tokenize__(self):
        return ("pumap-model-blob", self.sha256)


def model_source(model: Any) -> ModelRef | ModelBlob:
    """Describe ``model`` (a fitted estimator or a saved-model path) for shipping to workers.

    A model loaded from disk travels as its path; a source built earlier is returned as is,
    so callers that need the source themselves hash or serialise the weights only once.
    """


    if isinstance(model, (ModelRef, ModelBlob)):
        return model
    loaded_from = getattr(model, "model_path_", None)
    custom = hasattr(getattr(model, "encoder_", None), "spec")
    if loaded_from and getattr(model, "model_sha256_", None) and os.path.exists(loaded_from) \
            and not custom:
        model = loaded_from  # a loaded model: ship its path, not its weights
    if isinstance(model, (str, os.PathLike)):
        doc = read_config(model)
        spec = doc["encoder"]
        checked_file(model, WEIGHTS, doc["weights_sha256"], "weights were")
        if "factory" in spec:  # workers never rebuild a network from the name in a file
            raise ModelFileError(
                f"the model at {os.fspath(model)!r} has a custom encoder (factory "
                f"{spec['factory']!r}): load it with pumap_dask.load(path, networks="
                f"{{{spec['factory']!r}: the_factory}}) and pass the loaded model (command "
                f"line: --allow-network {spec['factory']})")
        return ModelRef(os.path.abspath(os.fspath(model)), doc["weights_sha256"],
                        spec["n_features"], spec["n_components"])
    if not hasattr(model, "encoder_"):
        raise InputError("model must be a fitted ParametricUMAP or the path of a saved one; "
                         "call fit(X) first")
    return encoder_source(model.encoder_)


def encoder_source(enc: Any) -> ModelBlob:
    """A trained encoder's weights (and architecture) for shipping to workers."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in enc.state_dict().items()}, buf)
    data = buf.getvalue()
    custom = hasattr(enc, "spec")  # a custom network: shipped as the module itself
    return ModelBlob(hashlib.sha256(data).hexdigest(), {} if custom else encoder_spec(enc),
                     data, enc.n_features, enc.n_components, module=enc if custom else None)


def _get_encoder(source: ModelRef | ModelBlob, device: str):
    """Load (once per process and device) the encoder described by ``source``."""

    key = (source.sha256, device)
    enc = _CACHE.get(key)
    if enc is not None:
        return enc
    with _CACHE_LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            if isinstance(source, ModelRef):
                enc, doc = load_encoder(source.path, verify=True)
                if doc["weights_sha256"] != source.sha256:
                    raise InputError(f"the model at {source.path} changed since the graph was "
                                     "built (weights hash differs); rebuild the transform")
            elif source.module is not None:
                enc = copy.deepcopy(source.module)
            else:
                s = source.spec
                enc = Encoder(s["n_features"], s["n_components"], s["hidden_layers"],
                              s.get("n_projection", 0), s.get("activation", "leaky_relu"))
                enc.load_state_dict(torch.load(io.BytesIO(source.state), weights_only=True))
            enc = enc.to(device).eval()
            limit_threads_to_worker()
            _CACHE[key] = enc
    return enc


def limit_threads_to_worker() -> None:
    """Inside a Dask worker, use no more torch threads than the worker has task threads.

    Each worker process would otherwise start one torch thread per core, and several
    workers on one machine oversubscribe it.
    """

    try:
        nthreads = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return
    if torch.get_num_threads() > nthreads:
        torch.set_num_threads(max(1, nthreads))


@reuses_freed_memory
def transform_block(block: Any, source: ModelRef | ModelBlob, batch_size: int | None = None,
                    device: str = "auto", nan_policy: str = "raise",
                    block_info: dict | None = None) -> Any:
    """Embed one row block (runs on a worker).

    A CuPy block is embedded on its own GPU without a host round trip (DLPack both ways)
    and a CuPy block comes back; a numpy block gives a numpy block.
    """

    dev = resolve_device(device, warn=False)
    if is_cupy(block):
        return _transform_cupy_block(block, source, batch_size, dev, nan_policy, block_info)
    enc = _get_encoder(source, dev)
    block = np.asarray(block, dtype=np.float32)
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        if nan_policy == "raise":
            raise _bad_rows_error(int(bad.sum()), np.flatnonzero(bad)[:5].tolist(),
                                  block_info)
        block = np.where(bad[:, None], 0.0, block).astype(np.float32)
    out = encode(enc, block, batch_size=batch_size, device=dev)
    check_finite_output(out, bad, block_info)
    if bad.any():
        out[bad] = np.nan
    return out


def check_finite_output(out: np.ndarray, skip: np.ndarray | None = None,
                        block_info: dict | None = None) -> None:
    """A finite input row must encode to a finite embedding: otherwise the model itself is
    broken (diverged or corrupt weights), and its output must never be published.

    Raises
    ------
    ModelFileError
        Naming the first such row.
    """
    bad = ~np.isfinite(out).all(axis=1)
    if skip is not None:
        bad &= ~skip
    if bad.any():
        start = block_info[0]["array-location"][0][0] if block_info else 0
        raise ModelFileError(
            f"the model encodes {int(bad.sum())} finite input rows to NaN or infinite values "
            f"(first: row {start + int(np.flatnonzero(bad)[0])}): its weights are broken "
            "(a diverged fit or a corrupt model); refit it, with a lower learning_rate")


def _bad_rows_error(n_bad: int, first: list[int], block_info: dict | None) -> InputError:
    loc = block_info[0]["array-location"][0] if block_info else ("?", "?")
    first = [r + (loc[0] if loc[0] != "?" else 0) for r in first]
    return InputError(
        f"X has NaN or infinite values in {n_bad} rows of row block [{loc[0]}, {loc[1]}) "
        f"(first: {first}); impute them or pass nan_policy='nan' to get NaN embeddings for "
        "those rows")


def _transform_cupy_block(block: Any, source: ModelRef | ModelBlob, batch_size: int | None,
                          dev: str, nan_policy: str, block_info: dict | None) -> Any:
    """:func:`transform_block` for a CuPy block: torch reads it through DLPack (no copy)
    on its own GPU, and the embedding goes back to CuPy the same way."""

    cp = cupy_module()
    if dev == "cuda":  # "auto"/"cuda": the GPU the block lives on
        dev = f"cuda:{block.device.id}"
    enc = _get_encoder(source, dev)
    with torch.no_grad():
        x = as_tensor(block, dev)
        bad = ~torch.isfinite(x).all(dim=1)
        n_bad = int(bad.sum())
        if n_bad:
            if nan_policy == "raise":
                first = torch.nonzero(bad)[:5, 0].tolist()
                raise _bad_rows_error(n_bad, first, block_info)
            x = torch.where(bad[:, None], torch.zeros((), device=x.device), x)
        out = torch.empty((x.shape[0], enc.n_components), dtype=torch.float32,
                          device=x.device)
        batch_size = forward_batch(batch_size, x.device)
        for i in range(0, x.shape[0], batch_size):
            out[i:i + batch_size] = enc(x[i:i + batch_size]).float()
        if n_bad:
            out[bad] = float("nan")
    if out.device.type == "cpu":  # device="cpu" asked for: the only host copy
        return cp.asarray(out.numpy())
    return cp.from_dlpack(out)


def _meta_like(darr, shape: tuple, dtype) -> Any:
    """An empty block of the array type of ``darr``'s chunks (CuPy stays CuPy)."""

    if is_cupy(getattr(darr, "_meta", None)):
        return cupy_module().empty(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


def transform(X: Any, model: Any, *, key: str | None = None, batch_size: int | None = None,
              device: str = "auto", nan_policy: str = "raise", return_ood: bool = False):
    """Lazily embed ``X`` with a trained model.

    Parameters
    ----------
    X
        numpy array, dask array, ``zarr.Array``, or a path to a Zarr array / AnnData store.
    model
        A fitted :class:`~pumap_dask.ParametricUMAP`, the path of a saved model, or what
        :func:`model_source` made of either.
    key
        Array inside a Zarr group (AnnData default ``obsm/X_pca``).
    batch_size
        Rows per forward pass inside a block (default
        :func:`pumap_dask.encoder.forward_batch`: 4,096 on a CPU, 65,536 on a GPU).
    device
        ``"auto"`` uses CUDA on workers that have it, else the CPU.
    nan_policy
        ``"raise"`` (default) fails on non-finite rows naming the block; ``"nan"`` returns
        NaN embeddings for them.
    return_ood
        Also return the lazy out-of-distribution row mask (see :func:`ood_mask`).

    Returns
    -------
    dask.array.Array
        (n_samples, n_components) float32, one output block per input row block; nothing is
        computed. With ``return_ood``, a pair (embedding, mask). Chunks that are CuPy arrays
        (the RAPIDS convention) are embedded on their GPU without a host round trip and the
        result's chunks are CuPy arrays too.
    """

    check_transform_args(batch_size=batch_size, device_=device, nan_policy=nan_policy)
    source = model_source(model)
    darr = as_dask(X, key=key)
    check_n_features(darr.shape[1], source.n_features)
    src = dask.delayed(source, pure=True, traverse=False)
    emb = da.map_blocks(
        transform_block, darr, src,
        batch_size=batch_size or None, device=device, nan_policy=nan_policy,
        chunks=(darr.chunks[0], (source.n_components,)),
        dtype=np.float32, meta=_meta_like(darr, (0, 0), np.float32),
        name="pumap-transform-" + dask.base.tokenize(darr, source.sha256, batch_size, device,
                                                     nan_policy),
    )
    if return_ood:
        return emb, ood_mask(darr, model)
    return emb


def training_range(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (min, max) of the training data recorded in a model or saved model."""
    if isinstance(model, (str, os.PathLike)):
        stats = read_config(model).get("fitted", {}).get("feature_stats")
        if not stats:
            raise InputError(f"the model at {model} records no training statistics")
        return (np.asarray(stats["min"], np.float32), np.asarray(stats["max"], np.float32))
    stats = getattr(model, "feature_stats_", None)
    if stats is None:
        raise InputError("model must be fitted (it records the training data's range)")
    return stats["min"], stats["max"]


def _ood_block(block: Any, low: np.ndarray, high: np.ndarray) -> Any:
    if is_cupy(block):  # compare on the GPU
        cp = cupy_module()
        low, high = cp.asarray(low), cp.asarray(high)
    with np.errstate(invalid="ignore"):
        inside = (block >= low) & (block <= high)
    return ~inside.all(axis=1)


def ood_mask(X: Any, model: Any, *, key: str | None = None, margin: float = 0.25):
    """Lazy boolean mask of rows far outside the training data's range.

    A row is flagged when any feature lies below ``min - margin * (max - min)`` or above
    ``max + margin * (max - min)`` of the training data. The encoder extrapolates such rows
    (e.g. a batch effect), so their embedding is unreliable.

    Returns
    -------
    dask.array.Array
        (n_samples,) bool, row-aligned with X.
    """

    lo, hi = training_range(model)
    span = hi - lo
    low, high = lo - margin * span, hi + margin * span
    darr = as_dask(X, key=key)
    check_n_features(darr.shape[1], lo.shape[0])
    bounds = dask.delayed((low, high), pure=True, traverse=False)
    return da.map_blocks(lambda b, lh: _ood_block(b, *lh), darr, bounds, drop_axis=1,
                         chunks=(darr.chunks[0],), dtype=bool,
                         meta=_meta_like(darr, (0,), bool))


def report_ood(n_flagged: int, n_total: int, warn_fraction: float = 0.01) -> float:
    """Log (warn above ``warn_fraction``) the share of out-of-distribution rows."""
    frac = n_flagged / max(1, n_total)
    if n_flagged == 0:
        logger.info("all %d rows lie within the training data's range", n_total)
        return 0.0
    msg = ("%.2f%% of rows (%d of %d) lie far outside the training data's range; their "
           "embedding is an extrapolation (batch effect or different preprocessing?)")
    (logger.warning if frac > warn_fraction else logger.info)(msg, 100 * frac, n_flagged,
                                                              n_total)
    return frac


__all__ = ["ModelBlob", "ModelRef", "model_source", "ood_mask", "report_ood", "training_range",
           "transform", "transform_block"]
