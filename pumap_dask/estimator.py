"""The scikit-learn style estimator tying the stages together."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin

from . import graph as graph_stage
from . import knn as knn_stage
from . import model as model_stage
from .init import initial_layout
from .io import InputError, as_dask, check_array, check_n_features, checked_finite, is_lazy
from .params import check_estimator_params, check_transform_args
from .train import TrainConfig, build_encoder, encode, find_ab_params, train_encoder

logger = logging.getLogger(__name__)

# Chosen by benchmarks/quality.py (see benchmarks/RESULTS.md).
DEFAULT_HIDDEN = (128, 64, 32)
DEFAULT_PROJECTION = 64
# The total number of optimiser steps is what buys quality; an epoch (one pass over the
# edges) is few steps for large batches, so the default epoch count targets a step count.
TARGET_STEPS = 1000


class NotFittedError(RuntimeError, AttributeError):
    """The model must be fitted (or loaded) before this call."""


class ParametricUMAP(TransformerMixin, BaseEstimator):
    """Parametric UMAP: an MLP encoder trained with the UMAP loss on a fuzzy kNN graph.

    Parameters
    ----------
    n_components
        Embedding dimension (seed: ``n_dim``).
    n_neighbors
        Neighbours per point, not counting the point itself (seed: ``k``).
    min_dist, spread
        Shape of the low-dimensional similarity curve, fitted to a and b.
    knn_method
        ``"auto"``, ``"exact"`` (blockwise torch), ``"nndescent"`` (pynndescent) or
        ``"partitioned"`` (Dask, for chunked input). With ``"auto"``, lazy input (dask,
        Zarr, paths) of more than ``pumap_dask.partition.PARTITION_THRESHOLD`` rows uses
        ``"partitioned"``; numpy input never does.
    hidden_layers
        Widths of the encoder's hidden layers (LeakyReLU(0.1) after each).
    n_projection
        Width of a fixed PCA projection in front of the MLP (0 disables; ignored when the
        input has fewer features).
    learning_rate
        Adam's initial learning rate, decayed linearly to zero.
    n_epochs
        Passes over the edge list. ``None`` picks enough epochs for about 1000 optimiser
        steps (at least 10 epochs).
    batch_size
        Positive edges per optimiser step.
    negative_sample_rate
        Negatives per positive edge.
    local_connectivity, set_op_mix_ratio, tolerance
        Graph construction (seed: ``local_connectivity``, ``mix_weight``, ``bandwidth``).
    correlation_weight
        Weight of the optional loss term -corr(input distances, embedding distances)
        (seed: ``corr_weight``).
    init
        Layout the encoder is pre-trained to reproduce before UMAP training:
        ``"spectral"`` (of the fuzzy graph; PCA when the graph is disconnected), ``"pca"``
        or ``"random"`` (no pre-training).
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (seed: ``use_gpu``).
    random_state
        Seed reaching every stage (seed: ``seed``). None for a random run.
    verbose
        Log progress at INFO level.
    work_dir
        Directory for the distributed stages of a partitioned fit (kNN arrays and the edge
        shards); a rerun with the same directory reuses what is finished. None uses a
        temporary directory removed after the fit.
    knn_overlap
        Partitions each row joins in the partitioned kNN (its nearest k-means centroids).

    Attributes
    ----------
    embedding_ : ndarray (n_samples, n_components)
    encoder_ : torch.nn.Module
    graph_ : scipy.sparse.csr_matrix
        The fuzzy graph (after a partitioned fit: the pruned graph rebuilt from the edges).
    knn_recall_ : float
        Sampled recall@k of the kNN, set when it was measured (partitioned fits).
    loss_history_ : list of float
    n_features_in_, n_samples_fit_, a_, b_, knn_method_, timings_
    """

    def __init__(
        self,
        n_components: int = 2,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        spread: float = 1.0,
        knn_method: str = "auto",
        hidden_layers: Sequence[int] = DEFAULT_HIDDEN,
        n_projection: int = DEFAULT_PROJECTION,
        learning_rate: float = 1e-2,
        n_epochs: int | None = None,
        batch_size: int = 16384,
        negative_sample_rate: int = 5,
        local_connectivity: float = 1.0,
        set_op_mix_ratio: float = 1.0,
        tolerance: float = 1e-5,
        correlation_weight: float = 0.0,
        init: str = "spectral",
        device: str = "auto",
        random_state: int | None = 42,
        verbose: bool = False,
        work_dir: str | None = None,
        knn_overlap: int = 2,
    ) -> None:
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.spread = spread
        self.knn_method = knn_method
        self.hidden_layers = hidden_layers
        self.n_projection = n_projection
        self.learning_rate = learning_rate
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.negative_sample_rate = negative_sample_rate
        self.local_connectivity = local_connectivity
        self.set_op_mix_ratio = set_op_mix_ratio
        self.tolerance = tolerance
        self.correlation_weight = correlation_weight
        self.init = init
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.work_dir = work_dir
        self.knn_overlap = knn_overlap

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        """Validate every parameter (see :mod:`pumap_dask.params`) before any work."""
        check_estimator_params(self)

    def _check_fitted(self) -> None:
        if not hasattr(self, "encoder_"):
            raise NotFittedError("this ParametricUMAP is not fitted yet; call fit(X) or "
                                 "pumap_dask.load(path) first")

    def _load_training_data(self, X: Any, key: str | None) -> np.ndarray:
        if is_lazy(X):
            darr = checked_finite(as_dask(X, key=key))
            logger.info("loading %s x %s input into memory for single-machine fit", *darr.shape)
            X = darr.compute()
        return check_array(X, what="X", min_samples=1)

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None, *, key: str | None = None,
            knn: tuple[np.ndarray, np.ndarray] | None = None) -> "ParametricUMAP":
        """Fit the encoder to X.

        Parameters
        ----------
        X
            numpy array, dask array, ``zarr.Array``, or a path to a Zarr array or AnnData
            ``.zarr`` store.
        y
            Ignored.
        key
            Array inside a Zarr group (default ``obsm/X_pca``, then ``X``).
        knn
            Precomputed ``(indices, distances)`` of shape (n, >= n_neighbors), self excluded.

        Returns
        -------
        self
        """
        self._check_params()
        if self.verbose:
            logging.getLogger("pumap_dask").setLevel(logging.INFO)
        for stale in ("model_path_", "model_sha256_", "knn_recall_"):
            self.__dict__.pop(stale, None)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        edges = None
        if is_lazy(X):
            n_rows = as_dask(X, key=key).shape[0]
            _check_enough_rows(n_rows, self.n_neighbors)
        if knn is None and is_lazy(X) and self._lazy_method(X, key) == "partitioned":
            edges = self._partitioned_graph(X, key, timings)
            t0 = time.perf_counter()
        X = self._load_training_data(X, key)
        n, d = X.shape
        _check_enough_rows(n, self.n_neighbors)
        device = knn_stage.resolve_device(self.device)
        timings["input"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if edges is not None:
            method = "partitioned"
        elif knn is not None:
            ind, dist = knn_stage.check_precomputed(knn, n, self.n_neighbors)
            method = "precomputed"
        else:
            method = self.knn_method
            if method == "auto":
                method = knn_stage.choose_method(n, d, device)
            if method == "partitioned":
                method = "nndescent"  # in-memory input: one partition
            ind, dist = knn_stage.nearest_neighbors_numpy(
                X, self.n_neighbors, method, random_state=self.random_state, device=device)
        if edges is not None:
            self.graph_, (head, tail, weight) = edges
        else:
            timings["knn"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.graph_ = graph_stage.fuzzy_simplicial_set(
                ind, dist, set_op_mix_ratio=self.set_op_mix_ratio,
                local_connectivity=self.local_connectivity, tolerance=self.tolerance)
            head, tail, weight = graph_stage.graph_to_edges(self.graph_, n_epochs=200)
            timings["graph"] = time.perf_counter() - t0
        if len(head) == 0:
            raise InputError("the kNN graph has no edges (all points identical?); the data "
                             "needs some spread to embed")

        t0 = time.perf_counter()
        self.a_, self.b_ = find_ab_params(self.spread, self.min_dist)
        cfg = self._train_config(len(head), d, device)
        encoder = build_encoder(d, cfg, X)
        layout = initial_layout(self.init, X, self.graph_, self.n_components,
                                random_state=self.random_state)
        timings["init"] = time.perf_counter() - t0
        cb = None
        if self.verbose:
            log_every = max(1, cfg.n_epochs // 10)

            def cb(epoch, loss):
                if (epoch + 1) % log_every == 0:
                    logger.info("epoch %d/%d loss %.4f", epoch + 1, cfg.n_epochs, loss)
        self.encoder_, self.loss_history_ = train_encoder(X, head, tail, weight, cfg, encoder, cb,
                                                            init_embedding=layout)
        timings["train"] = time.perf_counter() - t0 - timings["init"]

        self.embedding_ = encode(self.encoder_, X)
        self.n_features_in_ = d
        self.n_samples_fit_ = n
        self.n_epochs_ = cfg.n_epochs
        self.knn_method_ = method
        self.n_edges_ = int(len(head))
        self.feature_stats_ = _feature_stats(X)
        self.timings_ = timings
        logger.info("fitted %d x %d: %s", n, d,
                    ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
        return self

    def _lazy_method(self, X: Any, key: str | None) -> str:
        from .partition import resolve_method

        shape = as_dask(X, key=key).shape
        return resolve_method(self.knn_method, X, shape[0], shape[1],
                              knn_stage.resolve_device(self.device))

    def _partitioned_graph(self, X: Any, key: str | None, timings: dict) -> tuple:
        """Partitioned kNN and distributed graph; returns (pruned graph, edges)."""
        import shutil
        import tempfile

        from .graph_dask import build_edge_store
        from .partition import nearest_neighbors

        if self.work_dir is None:
            _require_local_workers()
        work_dir = self.work_dir or tempfile.mkdtemp(prefix="pumap_dask-")
        try:
            t0 = time.perf_counter()
            res = nearest_neighbors(X, self.n_neighbors, "partitioned", overlap=self.knn_overlap,
                                    random_state=self.random_state, device=self.device,
                                    key=key, work_dir=work_dir)
            timings["knn"] = time.perf_counter() - t0
            if res.recall is not None:
                self.knn_recall_ = float(res.recall)
            t0 = time.perf_counter()
            store = build_edge_store(res.indices, res.distances, work_dir,
                                     set_op_mix_ratio=self.set_op_mix_ratio,
                                     local_connectivity=self.local_connectivity,
                                     tolerance=self.tolerance, n_epochs=200)
            edges = store.read()
            n = res.indices.shape[0]
            graph = sp.csr_matrix((edges[2], (edges[0], edges[1])), shape=(n, n))
            timings["graph"] = time.perf_counter() - t0
        finally:
            if self.work_dir is None:
                shutil.rmtree(work_dir, ignore_errors=True)
        return graph, edges

    def _train_config(self, n_edges: int, n_features: int, device: str) -> TrainConfig:
        batch = min(self.batch_size, n_edges)
        n_epochs = self.n_epochs
        if n_epochs is None:
            steps_per_epoch = -(-n_edges // batch)
            n_epochs = max(10, -(-TARGET_STEPS // steps_per_epoch))
        n_proj = self.n_projection if 0 < self.n_projection < n_features else 0
        return TrainConfig(
            n_components=self.n_components, hidden_layers=tuple(self.hidden_layers),
            n_projection=n_proj, learning_rate=self.learning_rate, n_epochs=n_epochs,
            batch_size=batch, negative_sample_rate=self.negative_sample_rate,
            correlation_weight=self.correlation_weight, a=self.a_, b=self.b_,
            random_state=self.random_state, device=device,
        )

    def fit_transform(self, X: Any, y: Any = None, **fit_params) -> np.ndarray:
        """Fit and return the training embedding."""
        return self.fit(X, y, **fit_params).embedding_

    # ------------------------------------------------------------------ transform
    def transform(self, X: Any, *, key: str | None = None, batch_size: int = 65536):
        """Embed new data with the frozen encoder.

        numpy in, numpy out; dask arrays, Zarr arrays and paths give a lazy dask array
        (see :func:`pumap_dask.transform`).
        """
        self._check_fitted()
        check_transform_args(batch_size=batch_size)
        if is_lazy(X):
            from .transform import transform as lazy_transform

            return lazy_transform(X, self, key=key, batch_size=batch_size)
        X = check_array(X, what="X")
        check_n_features(X.shape[1], self.n_features_in_)
        return encode(self.encoder_, X, batch_size=batch_size)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, include_embedding: bool = True) -> str:
        """Save to a directory (JSON config + torch weights, no pickle); returns the path.

        Parameters
        ----------
        path
            Target directory; an existing model there is replaced atomically.
        include_embedding
            Also store the training embedding (``embedding_``).

        Returns
        -------
        str
            The absolute path of the model directory. Every file in it is checksummed, so
            :meth:`load` detects any later edit (see :mod:`pumap_dask.model`).
        """
        self._check_fitted()
        params = _jsonable(self.get_params())
        params["hidden_layers"] = [int(h) for h in self.hidden_layers]
        config = {
            "params": params,
            "fitted": {
                "a": float(self.a_), "b": float(self.b_),
                "n_features_in": int(self.n_features_in_),
                "n_samples_fit": int(self.n_samples_fit_), "n_epochs": int(self.n_epochs_),
                "knn_method": self.knn_method_, "n_edges": int(self.n_edges_),
                "loss_history": list(map(float, self.loss_history_)),
                "feature_stats": {k: np.asarray(v, dtype=np.float32).tolist()
                                  for k, v in self.feature_stats_.items()},
                "timings": {k: float(v) for k, v in self.timings_.items()},
                "knn_recall": getattr(self, "knn_recall_", None),
            },
        }
        return model_stage.save_model(
            path, self.encoder_, config, self.embedding_ if include_embedding else None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ParametricUMAP":
        """Load a model saved by :meth:`save`.

        Parameters
        ----------
        path
            The model directory.

        Returns
        -------
        ParametricUMAP
            Fitted, with ``model_path_`` and ``model_sha256_`` (the weights' hash) set.

        Raises
        ------
        ModelFileError
            When the directory is missing, incomplete, of an unreadable format version, or
            any of its files was modified or corrupted since it was saved.
        """
        encoder, doc = model_stage.load_encoder(path)  # config verified and validated
        params = dict(doc["params"])
        params["hidden_layers"] = tuple(params.get("hidden_layers", DEFAULT_HIDDEN))
        valid = cls().get_params()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            logger.warning("ignoring parameters %s of the model at %s (saved by another "
                           "pumap_dask version?)", unknown, path)
        m = cls(**{k: v for k, v in params.items() if k in valid})
        f = doc["fitted"]
        m.encoder_ = encoder
        m.a_, m.b_ = f["a"], f["b"]
        m.n_features_in_ = f["n_features_in"]
        m.n_samples_fit_ = f["n_samples_fit"]
        m.n_epochs_ = f["n_epochs"]
        m.knn_method_ = f["knn_method"]
        m.n_edges_ = f["n_edges"]
        m.loss_history_ = list(f["loss_history"])
        m.feature_stats_ = {k: np.asarray(v, dtype=np.float32)
                            for k, v in f["feature_stats"].items()}
        m.timings_ = dict(f.get("timings") or {})
        if f.get("knn_recall") is not None:
            m.knn_recall_ = f["knn_recall"]
        emb = model_stage.load_embedding(path, doc)
        if emb is not None:
            m.embedding_ = emb
        m.model_path_ = os.path.abspath(os.fspath(path))
        m.model_sha256_ = doc["weights_sha256"]
        return m

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """The seed's two summary lines."""
        self._check_fitted()
        return (
            "Parametric UMAP Model\n"
            f"  Samples: {self.n_samples_fit_} | Features: {self.n_features_in_} | "
            f"Embedding dims: {self.n_components}\n"
            f"  k: {self.n_neighbors} | min_dist: {self.min_dist:.3f} | "
            f"spread: {self.spread:.1f} | knn: {self.knn_method_}"
        )

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        if hasattr(self, "encoder_"):
            return self.summary()
        return super().__repr__(N_CHAR_MAX)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = knn_stage.resolve_device(self.device) != "cpu"
        tags.transformer_tags.preserves_dtype = ["float32"]  # embeddings are always float32
        return tags


def _check_enough_rows(n: int, n_neighbors: int) -> None:
    if n < n_neighbors + 1:
        raise InputError(f"X has {n} samples but n_neighbors={n_neighbors} needs at least "
                         f"{n_neighbors + 1}; lower n_neighbors or add samples")


def _require_local_workers() -> None:
    """A temporary work_dir lives on this machine: refuse when workers run elsewhere."""
    import socket

    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        return
    hosts = {addr.split("://")[-1].rsplit(":", 1)[0]
             for addr in client.scheduler_info().get("workers", {})}
    local = {"127.0.0.1", "localhost", socket.gethostname()}
    try:
        local.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    remote = hosts - local
    if remote:
        raise InputError(
            f"Dask workers run on other machines ({sorted(remote)[:3]}); a partitioned fit "
            "writes kNN and graph shards that every worker must see: pass work_dir= on a "
            "file system shared by the client and all workers")


def _feature_stats(X: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "min": X.min(0), "max": X.max(0),
        "mean": X.mean(0, dtype=np.float64).astype(np.float32),
        "std": X.std(0, dtype=np.float64).astype(np.float32),
    }


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def load(path: str | os.PathLike) -> ParametricUMAP:
    """Load a model saved with :meth:`ParametricUMAP.save`."""
    return ParametricUMAP.load(path)
