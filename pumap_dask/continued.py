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

Kept landmarks (umap-learn's ``add_landmarks`` / ``remove_landmarks``):
:func:`add_landmarks` keeps some rows of a dataset the estimator has embedded, with their
current positions (``transform(rows, refine=False)``, taken once, when they are added). Every
later fit that continues training (``partial_fit(X_new)``, ``fit(X_new, init_model=...)``)
appends the kept rows to its training rows with those positions as landmark positions
(:func:`append_kept_landmarks`), so the old points stay put while the new data joins; the
appended rows are dropped from the result (:func:`drop_kept_rows`), so ``embedding_`` and
``n_samples_fit_`` describe ``X_new`` alone. The landmarks persist, with the same target
positions, through any number of continued fits until :func:`remove_landmarks` (as
umap-learn keeps them); a fresh fit (no ``init_model``) replaces the embedding they pin and
drops them with a warning. They are not saved with the model (``save``); pass their
positions as ``landmark_positions`` (CLI: ``--landmarks``) instead.

Continued training carries the decoder too: with ``parametric_reconstruction=True``, the
decoder of ``init_model`` (when it has one) is the starting point (:func:`resolve_init_decoder`,
:func:`check_decoder`) instead of a fresh one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import torch

from .encoder import Encoder
from .errors import InputError, ParameterError
from .inputs import check_labels
from .io import as_dask, is_lazy
from .model import load_decoder, load_encoder, read_config
from .networks import build_decoder
from .params import choice, real
from .params import landmark_positions as check_positions

logger = logging.getLogger(__name__)

# add_landmarks' sample modes (umap-learn's names)
SAMPLE_MODES = ("uniform", "predetermined")
# the estimator attributes holding kept landmarks (see add_landmarks)
KEPT_ATTRS = ("landmark_X_", "landmark_positions_", "landmark_idx_")


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
        encoder, _ = load_encoder(init_model)  # checksummed and validated
        return encoder
    if _is_encoder(init_model):
        return copy.deepcopy(init_model).cpu().eval()
    encoder = getattr(init_model, "encoder_", None)
    if _is_encoder(encoder):
        return copy.deepcopy(encoder).cpu().eval()
    if hasattr(init_model, "get_params"):
        raise ParameterError("init_model is not fitted; fit it (or load a saved model) first")
    raise ParameterError("init_model must be a fitted ParametricUMAP or the path of a saved "
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
        raise ParameterError(f"X has {n_features} features, but init_model is expecting "
                             f"{encoder.n_features} features as input (n_features: the number it "
                             "was fitted on); continued training needs the same features")
    custom_init = not isinstance(encoder, Encoder)
    custom_here = params.get("encoder") is not None
    if custom_init != custom_here:
        which = ("a custom encoder network" if custom_init else "the default MLP encoder")
        raise ParameterError(f"init_model has {which} but this estimator "
                             f"{'does not' if custom_init else 'does'} set encoder=; continued "
                             "training needs the same architecture: use ParametricUMAP("
                             "**old.get_params())")
    if custom_init:
        want = {"n_features": n_features, "n_components": int(params["n_components"])}
        have = {"n_features": encoder.n_features, "n_components": encoder.n_components}
        diff = [f"{k}: init_model {have[k]} vs {want[k]}" for k in want if have[k] != want[k]]
        if diff:
            raise ParameterError("init_model's encoder does not match this fit (" + "; ".join(diff)
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
        raise ParameterError("init_model's encoder does not match this fit ("
                             + "; ".join(diff) + "); continued training needs the same "
                             "architecture: give this estimator init_model's n_components, "
                             "hidden_layers and n_projection (e.g. ParametricUMAP(**"
                             "old.get_params())) and data with the same features")


# --------------------------------------------------------------------------- decoder
def resolve_init_decoder(init_model: Any) -> Any:
    """A private copy of the decoder of ``init_model`` (see :func:`resolve_init_model`),
    or None when it has none (fitted without ``parametric_reconstruction``).

    Raises
    ------
    ModelFileError
        When a saved model's ``decoder.pt`` is missing, modified or does not fit its config.
    """
    if isinstance(init_model, (str, os.PathLike)):
        path = os.fspath(init_model)
        return load_decoder(path, read_config(path))  # checksummed and validated
    decoder = getattr(init_model, "decoder_", None)
    return None if decoder is None else copy.deepcopy(decoder).cpu().eval()


def check_decoder(decoder: Any, params: dict, input_shape: tuple[int, ...]) -> None:
    """Fail unless ``decoder`` (init_model's) has the architecture a fit with ``params`` of
    rows shaped ``input_shape`` would build: reconstruction loss, n_components, input shape
    and every weight's shape (the default decoder mirrors ``hidden_layers``).

    Raises
    ------
    ValueError
        Naming each difference and how to resolve it.
    """

    fresh = build_decoder(params.get("decoder"), tuple(input_shape), int(params["n_components"]),
                          params.get("reconstruction_loss", "mse"),
                          tuple(params["hidden_layers"]), None, params.get("random_state"))
    want = {"reconstruction_loss": fresh.loss, "n_components": fresh.n_components,
            "input_shape": fresh.input_shape, "custom": fresh.hidden_layers is None}
    have = {"reconstruction_loss": decoder.loss, "n_components": decoder.n_components,
            "input_shape": decoder.input_shape, "custom": decoder.hidden_layers is None}
    diff = [f"{k}: init_model {have[k]} vs {want[k]}" for k in want if have[k] != want[k]]
    if not diff:
        shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
        for k, v in fresh.state_dict().items():
            if shapes.get(k) != tuple(v.shape):
                diff.append(f"weight {k}: init_model {shapes.get(k)} vs {tuple(v.shape)}")
        diff += [f"weight {k}: init_model {shapes[k]} vs none"
                 for k in shapes if k not in fresh.state_dict()]
    if diff:
        raise ParameterError(
            "init_model's decoder does not match this fit (" + "; ".join(diff[:4])
            + "); continued training starts from init_model's decoder, so it needs the same "
            "decoder architecture: give this estimator init_model's decoder, "
            "reconstruction_loss and hidden_layers (e.g. ParametricUMAP(**old.get_params())), "
            "or fit with parametric_reconstruction=False")


# --------------------------------------------------------------------------- kept landmarks
@dataclass
class KeptLandmarks:
    """Rows kept by :func:`add_landmarks` and their target positions.

    Attributes
    ----------
    X
        The kept rows (float32; the sample shape of the data they came from).
    positions
        float32 (len(X), n_components): where the model embedded them when they were added.
    idx
        Their row ids in the data given to :func:`add_landmarks`.
    """

    X: np.ndarray
    positions: np.ndarray
    idx: np.ndarray

    def __len__(self) -> int:
        return int(len(self.X))


def sample_landmark_rows(n: int, sample_pct: Any = 0.01, sample_mode: str = "uniform",
                         idx: Any = None, random_state: int | None = None) -> np.ndarray:
    """The row ids :func:`add_landmarks` keeps (sorted int64, unique).

    ``"uniform"``: ``int(n * sample_pct)`` rows drawn without replacement, seeded by
    ``random_state``; ``"predetermined"``: ``idx`` (``sample_pct`` is then ignored).

    Raises
    ------
    ValueError
        On an unknown ``sample_mode``, ``sample_pct`` outside (0, 1] or picking no row, a
        missing ``idx`` in ``"predetermined"`` mode, or ids that are not integers in
        ``[0, n)``, repeat or are empty.
    """

    choice("sample_mode", sample_mode, SAMPLE_MODES)
    if sample_mode == "uniform":
        pct = real("sample_pct", sample_pct, low=0.0, high=1.0, low_open=True)
        k = int(n * pct)
        if k == 0:
            raise ParameterError(f"sample_pct={pct:g} of {n} rows picks no landmark row; raise "
                                 f"sample_pct to at least {1 / n:.3g}, or choose the rows with "
                                 "sample_mode='predetermined', idx=[...]")
        rng = np.random.default_rng(random_state)
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    if idx is None:
        raise ParameterError("sample_mode='predetermined' needs idx: the ids of the rows of X to "
                             "keep as landmarks (or use sample_mode='uniform' with sample_pct)")
    ids = np.asarray(idx)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ParameterError("idx must be a non-empty 1-d sequence of integer row ids, got "
                             f"{ids.dtype} array of shape {ids.shape}")
    bad = (ids < 0) | (ids >= n)
    if bad.any():
        raise ParameterError(f"idx holds row id {int(ids[bad][0])}, outside [0, {n}) (X has {n} "
                             "rows)")
    ids = np.sort(ids.astype(np.int64))
    if (np.diff(ids) == 0).any():
        raise ParameterError(f"idx holds row id {int(ids[:-1][np.diff(ids) == 0][0])} more than "
                             "once; give each landmark row once")
    return ids


def add_landmarks(est: Any, X: Any, sample_pct: float = 0.01, sample_mode: str = "uniform",
                  landmark_loss_weight: float = 0.01, idx: Any = None) -> None:
    """Keep some rows of ``X`` as landmarks of the fitted estimator ``est`` (see
    :meth:`pumap_dask.ParametricUMAP.add_landmarks` and the module docstring).

    Sets ``est.landmark_X_``, ``est.landmark_positions_`` (``est.transform(rows,
    refine=False)``), ``est.landmark_idx_`` and ``est.landmark_loss_weight``; replaces
    landmarks kept before.
    """

    est._check_fitted()  # NotFittedError, saying to fit first
    weight = real("landmark_loss_weight", landmark_loss_weight, low=0.0)
    if is_lazy(X):
        darr = as_dask(X)
        ids = sample_landmark_rows(int(darr.shape[0]), sample_pct, sample_mode, idx,
                                   est.random_state)
        rows = np.asarray(darr[ids].compute(), dtype=np.float32)
    else:
        X = np.asarray(X)
        if X.ndim < 2:
            raise ParameterError(f"X must hold samples as rows (2-d or more), got shape {X.shape}")
        ids = sample_landmark_rows(len(X), sample_pct, sample_mode, idx, est.random_state)
        rows = np.ascontiguousarray(X[ids], dtype=np.float32)
    positions = np.asarray(est.transform(rows, refine=False), dtype=np.float32)
    est.landmark_X_, est.landmark_positions_, est.landmark_idx_ = rows, positions, ids
    est.landmark_loss_weight = weight
    logger.info("kept %d landmark rows (weight %g): continued fits keep them at their current "
                "positions until remove_landmarks()", len(ids), weight)


def remove_landmarks(est: Any) -> None:
    """Forget the landmarks kept by :func:`add_landmarks` (nothing to do when none are)."""
    for attr in KEPT_ATTRS:
        est.__dict__.pop(attr, None)


def kept_landmarks(est: Any, init_model: Any) -> KeptLandmarks | None:
    """The landmarks a fit of ``est`` appends to its training rows: ``est``'s own kept
    landmarks or, when it has none, those of an estimator given as ``init_model``; None
    for a fresh fit (no ``init_model``), which drops ``est``'s with a warning."""
    def of(model: Any) -> KeptLandmarks | None:
        if isinstance(model, (str, os.PathLike)) or getattr(model, "landmark_X_", None) is None:
            return None
        return KeptLandmarks(model.landmark_X_, model.landmark_positions_, model.landmark_idx_)

    own = of(est)
    if init_model is None:
        if own is not None:
            logger.warning("fit without init_model starts afresh: dropping the %d landmarks "
                           "kept by add_landmarks (they pin positions of the embedding this "
                           "fit replaces); use partial_fit(X) or fit(X, init_model=...) to "
                           "keep them", len(own))
            remove_landmarks(est)
        return None
    return own if own is not None else of(init_model)


def keep_landmarks(est: Any, kept: KeptLandmarks) -> None:
    """Set ``kept`` as ``est``'s kept landmarks (after a fit that used them)."""
    est.landmark_X_, est.landmark_positions_, est.landmark_idx_ = kept.X, kept.positions, \
        kept.idx


def append_kept_landmarks(kept: KeptLandmarks, X: Any, y: Any, landmark_positions: Any, *,
                          key: str | None, n_components: int, knn: Any = None,
                          graph: Any = None) -> tuple[Any, Any, np.ndarray, int]:
    """The training rows, labels and landmark positions of a fit with kept landmarks.

    Parameters
    ----------
    kept
        The kept landmarks.
    X, y, landmark_positions, key
        As given to ``fit`` (``landmark_positions`` for the rows of ``X``, or None).
    n_components
        The fit's embedding dimension.
    knn, graph
        As given to ``fit``: precomputed neighbours cover ``X``'s rows only, so they are
        refused.

    Returns
    -------
    X_fit, y_fit, positions, n
        ``X`` with the kept rows appended (numpy for numpy ``X``, a dask array for lazy
        ``X``), the labels with the kept rows unknown (None without ``y``), the merged
        landmark positions ((n + len(kept), n_components), NaN for rows without one) and
        ``n``, the number of rows of ``X``.

    Raises
    ------
    InputError
        With ``knn``/``graph``, or labels that cannot mark rows unknown.
    ValueError
        When ``X``'s features or ``n_components`` differ from the kept landmarks', or on bad
        ``landmark_positions`` (see :func:`pumap_dask.params.landmark_positions`).
    """

    for what, val in (("knn", knn), ("graph", graph)):
        if val is not None:
            raise InputError(f"{what}= covers the rows of X only, but this fit appends the "
                             f"{len(kept)} landmark rows kept by add_landmarks; call "
                             "remove_landmarks() first (and pass landmark_positions for X's "
                             "rows instead), or fit without a precomputed " + what)
    if kept.positions.shape[1] != n_components:
        raise ParameterError(f"the landmarks kept by add_landmarks have {kept.positions.shape[1]} "
                             f"dimensions but this fit has n_components={n_components}; call "
                             "remove_landmarks() or keep n_components")
    width = int(np.prod(kept.X.shape[1:]))
    if is_lazy(X):
        darr = as_dask(X, key=key)
        if darr.shape[1] != width:
            raise ParameterError(f"X has {darr.shape[1]} features, but the landmarks kept by "
                                 f"add_landmarks have {width}; call remove_landmarks() first")
        rows = kept.X.reshape(len(kept), width)
        X_fit = da.concatenate([darr, da.from_array(rows, chunks=rows.shape)], axis=0)
    else:
        X = np.asarray(X)
        if X.ndim < 2 or int(np.prod(X.shape[1:])) != width:
            raise ParameterError(f"X has samples of shape {X.shape[1:]}, but the landmarks kept by "
                                 f"add_landmarks have {kept.X.shape[1:]}; call remove_landmarks() "
                                 "first")
        X_fit = np.concatenate([X, kept.X.reshape((len(kept),) + X.shape[1:])], axis=0)
    n = int(X_fit.shape[0]) - len(kept)
    positions = np.full((n + len(kept), n_components), np.nan, dtype=np.float32)
    given = check_positions(landmark_positions, n, n_components)
    if given is not None:
        positions[given[0]] = given[1]
    positions[n:] = kept.positions
    y_fit = None
    if y is not None:
        y = check_labels(y, n)  # the fit's own check, on X's rows
        if y.dtype.kind not in "iubf":
            raise InputError(f"labels of dtype {y.dtype} cannot mark the {len(kept)} kept "
                             "landmark rows unknown: use integer labels with -1 for unknown, "
                             "or call remove_landmarks() first")
        fill = np.nan if y.dtype.kind == "f" else -1
        y_fit = np.concatenate([y, np.full(len(kept), fill, dtype=np.result_type(y, np.int8))])
    logger.info("appending %d kept landmark rows to the %d training rows", len(kept), n)
    return X_fit, y_fit, positions, n


def drop_kept_rows(res: Any, n: int) -> Any:
    """The :class:`pumap_dask.pipeline.FitResult` of the first ``n`` training rows (those of
    ``X``; the appended landmark rows dropped from the embedding and the graph)."""
    graph = None if res.graph is None else res.graph[:n][:, :n].tocsr()
    return dataclasses.replace(res, embedding=res.embedding[:n], n_samples_fit=n, graph=graph)
