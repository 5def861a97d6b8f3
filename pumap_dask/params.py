"""Parameter validation: every public entry point checks its arguments here, up front.

Each check runs in microseconds and before any cluster starts or stage runs, so a bad value
fails at once with a message that names the parameter and its allowed range, never after
the kNN of a large job.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .errors import ParameterError

DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("raise", "nan")
ZARR_FORMATS = (2, 3)
PRECISIONS = ("fp32", "bf16")
# The default encoder's activation after each hidden layer; models saved before it was a
# parameter used "leaky_relu" (LeakyReLU(0.1)).
ACTIVATIONS = ("leaky_relu", "silu")
# How a step's positive edges are drawn (pumap_dask.batches): "edges", each in proportion to
# its weight, both ends encoded; "neighbourhoods", every edge among the rows of a few
# seeds' graph neighbourhoods, weighted (several positive edges per encoded row); "auto"
# (pumap_dask.train.resolve_batching) neighbourhoods unless a loss term needs edges.
BATCHINGS = ("auto", "edges", "neighbourhoods")


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as int when it is an integer >= ``minimum``, else raise ParameterError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        rng = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ParameterError(f"{name} must be {rng}, got {value!r}")
    return int(value)


def optional_positive_int(name: str, value: Any) -> int | None:
    """None, or a positive integer."""
    return None if value is None else positive_int(name, value)


def real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as float when it is a finite real number within the given bounds.

    Parameters
    ----------
    name
        Parameter name, for the message.
    value
        The value to check.
    low, high
        Bounds (None: unbounded on that side).
    low_open, high_open
        Whether the bound itself is excluded.
    """
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    allowed = f"{left}{lo}, {hi}{right}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{name} must be a number in {allowed}, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ParameterError(f"{name} must be a finite number in {allowed}, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ParameterError(f"{name} must lie in {allowed}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ParameterError(f"{name} must lie in {allowed}, got {value!r}")
    return v


def choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` when it is one of ``allowed``, else a ValueError listing them."""
    allowed = tuple(allowed)
    try:
        ok = not isinstance(value, bool) and any(value == a for a in allowed)
    except (TypeError, ValueError):  # e.g. an array compared elementwise
        ok = False
    if not ok or isinstance(value, float):
        raise ParameterError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def device(value: Any, name: str = "device") -> str:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if isinstance(value, str) and (value in DEVICES or (
            value.startswith("cuda:") and value[5:].isdigit())):
        return value
    raise ParameterError(f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


def resolve_device(value: str = "auto", *, warn: bool = True) -> str:
    """Map ``"auto" | "cpu" | "cuda[:N]"`` to the torch device to use here, falling back to
    the CPU (with a warning when ``warn``) where CUDA is absent."""

    device(value)
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value.startswith("cuda") and not torch.cuda.is_available():
        if warn:
            logging.getLogger(__name__).warning(
                "device=%r requested but CUDA is not available; using the CPU", value)
        return "cpu"
    return value


def random_state(value: Any) -> int | None:
    """None or a non-negative integer seed."""
    if value is None:
        return None
    return positive_int("random_state", value, minimum=0)


def layers(name: str, value: Any) -> tuple[int, ...]:
    """A non-empty sequence of positive layer widths."""
    try:
        widths = tuple(value)
    except TypeError:
        raise ParameterError(f"{name} must be a non-empty sequence of positive integers, e.g. "
                             f"(128, 64, 32), got {value!r}") from None
    if not widths:
        raise ParameterError(f"{name} must hold at least one hidden layer width, e.g. "
                             "(128, 64, 32); "
                             "got an empty sequence")
    for w in widths:
        positive_int(f"each width in {name}", w)
    return tuple(int(w) for w in widths)


def min_dist_spread(min_dist: Any, spread: Any) -> tuple[float, float]:
    """``spread`` > 0 and ``0 <= min_dist <= spread``, both finite."""
    s = real("spread", spread, low=0.0, low_open=True)
    m = real("min_dist", min_dist, low=0.0)
    if m > s:
        raise ParameterError(f"min_dist must not exceed spread (min_dist={min_dist!r}, "
                             f"spread={spread!r}); lower min_dist or raise spread")
    return m, s


def work_dir(value: Any, name: str = "work_dir") -> str | None:
    """None, or a path that is (or can become) a writable directory."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ParameterError(f"{name} must be a directory path or None, got {value!r}")
    path = os.path.abspath(os.fspath(value))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ParameterError(f"{name}={os.fspath(value)!r} exists and is not a directory")
    writable_location(path, name)
    return path


def writable_location(path: str, name: str) -> None:
    """Fail when ``path`` (existing or to be created) cannot be written by this process."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.isfile(probe) and probe != path:
        raise ParameterError(f"{name}={path!r} cannot be created: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ParameterError(f"{name}={path!r} is not writable (no write permission on "
                             f"{probe!r}); choose another location")


def knn_kwds(value: Any, name: str = "knn_kwds", *, local_method: bool = True) -> dict:
    """None or a dict of kNN back-end options with string keys; returns a dict.

    Known options are checked: ``M``, ``ef_construction``, ``ef``, ``n_trees``,
    ``n_iters``, ``max_candidates``, ``block_size`` (positive integers) and, when
    ``local_method``, ``local_method`` (``"nndescent"`` or ``"hnsw"``, the partitioned
    back-end's per-partition search).
    """
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ParameterError(f"{name} must be None or a dict with string keys, e.g. "
                             f"{{'M': 16, 'ef': 64}}, got {value!r}"[:200])
    for k, v in value.items():
        if k in ("M", "ef_construction", "ef", "n_trees", "n_iters", "max_candidates",
                 "block_size"):
            positive_int(f"{name}[{k!r}]", v, minimum=2 if k == "M" else 1)
        elif k == "local_method":
            if not local_method:
                raise ParameterError(f"{name} cannot hold 'local_method'; pass local_method= "
                                     "instead")
            choice(f"{name}['local_method']", v, ("nndescent", "hnsw"))
    return dict(value)


def check_graph_params(set_op_mix_ratio: Any, local_connectivity: Any, tolerance: Any) -> None:
    """Validate the fuzzy-graph parameters shared by the graph stages and the estimator."""
    real("local_connectivity", local_connectivity, low=0.0)
    real("set_op_mix_ratio", set_op_mix_ratio, low=0.0, high=1.0)
    real("tolerance", tolerance, low=0.0, low_open=True)


def check_estimator_params(est: Any) -> None:
    """Validate every constructor parameter of a :class:`~pumap_dask.ParametricUMAP`.

    Raises
    ------
    ValueError
        Naming the first bad parameter and its allowed values.
    """

    for name in ("n_components", "n_neighbors", "batch_size", "negative_sample_rate"):
        positive_int(name, getattr(est, name))
    optional_positive_int("n_epochs", est.n_epochs)
    positive_int("n_projection", est.n_projection, minimum=0)
    positive_int("knn_overlap", est.knn_overlap)
    optional_positive_int("train_world_size", est.train_world_size)
    optional_positive_int("fit_rows", getattr(est, "fit_rows", None))
    positive_int("max_restarts", getattr(est, "max_restarts", 2), minimum=0)
    min_dist_spread(est.min_dist, est.spread)
    real("learning_rate", est.learning_rate, low=0.0, low_open=True)
    check_graph_params(est.set_op_mix_ratio, est.local_connectivity, est.tolerance)
    real("correlation_weight", est.correlation_weight, low=0.0)
    real("target_weight", getattr(est, "target_weight", 0.5), low=0.0, high=1.0)
    choice("knn_method", est.knn_method, KNN_METHODS)
    choice("metric", getattr(est, "metric", "euclidean"), METRICS)
    knn_kwds(getattr(est, "knn_kwds", None))
    choice("init", est.init, INIT_METHODS)
    layers("hidden_layers", est.hidden_layers)
    choice("activation", getattr(est, "activation", "leaky_relu"), ACTIVATIONS)
    device(est.device)
    random_state(est.random_state)
    if not isinstance(est.verbose, (bool, numbers.Integral)):
        raise ParameterError(f"verbose must be True or False, got {est.verbose!r}")
    work_dir(est.work_dir)
    callbacks(getattr(est, "callbacks", None))
    choice("precision", getattr(est, "precision", "fp32"), PRECISIONS)
    choice("batching", getattr(est, "batching", "auto"), BATCHINGS)

    check_network_params(est)  # encoder, decoder, parametric_reconstruction and its loss
    real("landmark_loss_weight", getattr(est, "landmark_loss_weight", 1.0), low=0.0)
    refuse_ddp(est.train_world_size, single_process_reasons(est.get_params()))


def refuse_ddp(train_world_size: Any, reasons: list[str]) -> None:
    """Refuse an explicit ``train_world_size > 1`` when options keep training in one process."""
    if train_world_size is not None and train_world_size > 1 and reasons:
        raise ParameterError(
            f"train_world_size={train_world_size} cannot be used with "
            f"{' and '.join(reasons)}: these train in one process (DDP ranks run on the Dask "
            "workers without them); use train_world_size=1 (or None, which trains in one "
            "process for these options)")


def single_process_reasons(params: dict, *, landmarks: bool = False,
                           init_model: bool = False) -> list[str]:
    """The options of a fit that make it train in this process (never DDP), by name.

    Callbacks run where training runs; custom networks and a decoder are built here;
    landmarks and continued training need this process's state. Empty when DDP is allowed.
    The one place this rule lives: :func:`check_estimator_params` refuses an explicit
    ``train_world_size > 1`` with these, :func:`pumap_dask.pipeline.plan_training` decides.
    """
    reasons = []
    if params.get("callbacks"):
        reasons.append("callbacks")
    if params.get("encoder") is not None or params.get("decoder") is not None:
        reasons.append("custom networks")
    if params.get("parametric_reconstruction"):
        reasons.append("parametric_reconstruction=True")
    if landmarks:
        reasons.append("landmark positions")
    if init_model:
        reasons.append("init_model (continued training)")
    return reasons


def callbacks(value: Any) -> list:
    """None, or a list/tuple of callables ``callback(epoch, loss, model)``.

    Callbacks run in the training process only (see :func:`single_process_reasons`).
    """
    if value is None:
        return []
    if callable(value) or not isinstance(value, (list, tuple)):
        raise ParameterError("callbacks must be None or a list of callables "
                             "callback(epoch, loss, model) -> bool | None, got "
                             f"{type(value).__name__} {value!r}"[:200])
    for i, cb in enumerate(value):
        if not callable(cb):
            raise ParameterError(f"callbacks[{i}] must be callable as callback(epoch, loss, "
                                 "model), "
                                 f"got {cb!r}"[:200])
    return list(value)


def landmark_positions(value: Any, n_samples: int, n_components: int,
                       name: str = "landmark_positions"):
    """Validate landmark positions for a fit of ``n_samples`` rows.

    ``value`` is None or an array-like of shape (n_samples, n_components): a finite
    position for each landmark row, NaN in every coordinate of the other rows.

    Returns
    -------
    tuple of ndarray or None
        ``(rows, positions)``: the landmark rows (sorted int64 ids) and their float32
        positions, or None when ``value`` is None or holds no landmark (all NaN).

    Raises
    ------
    ValueError
        On a wrong shape, a non-numeric value, an infinite coordinate, or a row that is
        NaN in some coordinates only.
    """
    if value is None:
        return None

    if hasattr(value, "compute"):  # a dask array: positions are (n, n_components), small
        value = value.compute()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a numeric array of shape ({n_samples}, "
                             f"{n_components}) (NaN rows for points without a landmark), got "
                             f"{type(value).__name__}") from None
    if arr.shape != (n_samples, n_components):
        raise ParameterError(f"{name} must have shape ({n_samples}, {n_components}): one row per "
                             f"row of X, one column per embedding dimension (NaN rows for points "
                             f"without a landmark); got shape {arr.shape}")
    nan = np.isnan(arr)
    partial = nan.any(1) & ~nan.all(1)
    if partial.any():
        raise ParameterError(f"{name} row {int(np.flatnonzero(partial)[0])} is NaN in some "
                             "coordinates only; a row is either a full position or all NaN")
    if np.isinf(arr).any():
        raise ParameterError(f"{name} must be finite (or NaN for rows without a landmark); row "
                             f"{int(np.flatnonzero(np.isinf(arr).any(1))[0])} is infinite")
    rows = np.flatnonzero(~nan.any(1)).astype(np.int64)
    if len(rows) == 0:
        return None
    return rows, arr[rows].astype(np.float32)


def check_transform_args(*, batch_size: Any = None, device_: Any = "auto",
                         nan_policy: Any = "raise") -> None:
    """Validate the shared arguments of the transform entry points."""
    optional_positive_int("batch_size", batch_size)
    device(device_)
    choice("nan_policy", nan_policy, NAN_POLICIES)


def check_writer_args(*, chunk_rows: Any = None, zarr_format: Any = 3,
                      sharded: Any = False) -> None:
    """Validate the arguments of :func:`pumap_dask.writers.transform_to_zarr`."""
    optional_positive_int("chunk_rows", chunk_rows)
    choice("zarr_format", zarr_format, ZARR_FORMATS)
    if sharded and zarr_format != 3:
        raise ParameterError("sharded=True needs zarr_format=3 (Zarr v2 has no shards)")


RECONSTRUCTION_LOSSES = ("mse", "bce")


def check_network_param(name: str, value: Any) -> None:
    """None, a ``torch.nn.Module``, a callable factory or a ``"module:function"`` string."""
    if value is None or isinstance(value, nn.Module) or callable(value):
        return
    if isinstance(value, str):
        if ":" not in value and "." not in value:
            raise ParameterError(f"{name} must name an importable factory as "
                                 f"'package.module:function', got {value!r}")
        return
    raise ParameterError(f"{name} must be None, a torch.nn.Module, a factory callable or a "
                         f"'package.module:function' string, got {type(value).__name__}")


def check_network_params(est: Any) -> None:
    """Validate the estimator's network and reconstruction parameters (fast, no work)."""

    check_network_param("encoder", getattr(est, "encoder", None))
    check_network_param("decoder", getattr(est, "decoder", None))
    recon = getattr(est, "parametric_reconstruction", False)
    if not isinstance(recon, (bool, np.bool_)):
        raise ParameterError(f"parametric_reconstruction must be True or False, got {recon!r}")
    if not isinstance(getattr(est, "autoencoder_loss", False), (bool, np.bool_)):
        raise ParameterError("autoencoder_loss must be True or False, got "
                             f"{getattr(est, 'autoencoder_loss', None)!r}")
    real("parametric_reconstruction_loss_weight",
         getattr(est, "parametric_reconstruction_loss_weight", 1.0), low=0.0)
    choice("reconstruction_loss", getattr(est, "reconstruction_loss", "mse"),
           RECONSTRUCTION_LOSSES)


KNN_METHODS = ("auto", "exact", "nndescent", "hnsw", "partitioned")


METRICS = ("euclidean", "cosine")


# the search run inside each partition of the partitioned back-end
LOCAL_METHODS = ("nndescent", "hnsw")


INIT_METHODS = ("spectral", "pca", "random")


# "batch": negatives drawn from the step's own heads and tails (2B rows encoded per step);
# "pool": from ``negative_pool`` extra uniform rows (3B rows).
NEGATIVE_MODES = ("batch", "pool")

