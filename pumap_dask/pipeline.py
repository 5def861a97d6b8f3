"""The fit pipeline: the stages in order, each handing a typed result to the next.

::

    open_input  -> InputHandle     validated lazily, opened once
    run_knn     -> Neighbors       in memory, or partitioned on the Dask workers
    run_graph   -> Edges           fuzzy graph as a weighted edge list (edge shards for
                                   partitioned fits; no (n, n) matrix on the client)
    run_init    -> Layout          spectral layout of the graph (small n) or of landmarks
    run_train   -> Trained         the encoder trained on the edges
    fit         -> FitResult       all of the above plus the embedding and timings

The estimator and the command line are thin faces over :func:`fit`: parameters arrive
validated (:mod:`pumap_dask.params`), the work directory of the distributed stages is managed
here. A partitioned fit with a Dask client trains on the workers (:class:`TrainPlan`) and
gathers only the (n, n_components) embedding; training in this process gathers the training
matrix (within :data:`TRAIN_MEMORY_BUDGET`) and the edge list too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import dask
import distributed
import numpy as np
import scipy.sparse as sp

from . import graph as graph_stage
from . import knn as knn_stage
from .continued import (
    KeptLandmarks,
    append_kept_landmarks,
    check_architecture,
    check_decoder,
    drop_kept_rows,
    resolve_init_decoder,
    resolve_init_model,
)
from .distributed import ddp
from .distributed.graph_dask import build_edge_store
from .distributed.knn_dask import nearest_neighbors, resolve_method
from .encoder import encode
from .errors import InputError, ParameterError
from .init import N_LANDMARKS, landmark_layout, landmark_rows, pca_layout, spectral_layout
from .inputs import InputHandle, RowSample, check_labels, check_sizes, identities, open_input
from .io import is_lazy
from .landmarks import Landmarks
from .params import landmark_positions as check_landmarks
from .params import refuse_ddp, single_process_reasons
from .progress import stage, track
from .reconstruction import build_for_fit, check_validation, reconstruction_error
from .train import (FEW_EPOCHS, SAMPLE_EPOCHS, TrainConfig, build_encoder, default_epochs,
                    find_ab_params, resolve_batching, sample_for_epochs, train_encoder)
from .transform import encoder_source, transform
from .workdir import work_directory

logger = logging.getLogger(__name__)

# Edges below max(w) / PRUNE_EPOCHS are dropped, as umap-learn prunes for 200 epochs.
PRUNE_EPOCHS = 200


# --------------------------------------------------------------------------- results


@dataclass
class Neighbors:
    """kNN of every row, self excluded: numpy, or dask arrays for partitioned fits."""

    indices: Any
    distances: Any
    method: str
    recall: float | None = None


@dataclass
class Edges:
    """The pruned symmetric fuzzy graph as an edge list (both directions of each edge).

    ``graph`` is the CSR matrix when the graph was built in memory (small fits), else None.
    A partitioned fit's edges stay in their ``store`` (``head``, ``tail`` and ``weight``
    None) until :meth:`load`: training on the workers reads them there, not here.
    """

    head: np.ndarray | None
    tail: np.ndarray | None
    weight: np.ndarray | None
    n_vertices: int
    graph: sp.csr_matrix | None = None
    store: Any = None  # a partitioned fit's EdgeStore; the arrays stay on disk until load()

    def __len__(self) -> int:
        return int(len(self.head)) if self.head is not None else int(self.store.n_edges)

    def load(self) -> "Edges":
        """These edges with their arrays in memory (12 bytes per edge, read from the store
        when a partitioned fit trains in this process)."""
        if self.head is not None:
            return self
        return Edges(*self.store.read_compact(), self.n_vertices, self.graph, self.store)


@dataclass
class Layout:
    """Target positions for ``rows`` that the encoder is pre-trained to reproduce."""

    rows: np.ndarray
    positions: np.ndarray
    method: str


@dataclass
class Trained:
    """The trained encoder and its loss per epoch."""

    encoder: Any
    loss_history: list
    config: TrainConfig


@dataclass
class FitResult:
    """Everything a fit produced.

    Each field ``f`` becomes the estimator's fitted attribute ``f_`` (see
    :data:`pumap_dask.state.FITTED_ATTRS`, which also names the fields saved in a model's
    config); fields that are None are left unset.
    """

    encoder: Any
    loss_history: list
    n_epochs: int
    embedding: np.ndarray
    feature_stats: dict
    n_samples_fit: int
    n_features_in: int
    knn_method: str
    knn_recall: float | None
    n_edges: int
    a: float
    b: float
    init: str
    graph: sp.csr_matrix | None
    train_world_size: int = 1
    timings: dict = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)
    worker_peak_memory: dict = field(default_factory=dict)
    decoder: Any = None  # parametric_reconstruction (see pumap_dask.reconstruction)
    input_shape: tuple | None = None
    reconstruction_history: list | None = None
    validation_reconstruction: list | None = None
    input_identity: dict | None = None  # rows, features and content sha256 of X

    @property
    def n_epochs_run(self) -> int:
        """Epochs actually trained (fewer than ``n_epochs`` when a callback stopped it)."""
        return len(self.loss_history)


@dataclass(frozen=True)
class TrainPlan:
    """Where training runs: in this process, in one process on a Dask worker, or as DDP
    over ``world_size`` Dask workers.

    Decided once per fit by :func:`plan_training`, logged with its ``reason``, and
    recorded as ``train_world_size_``. With a ``client`` training runs on its workers
    (:func:`pumap_dask.distributed.ddp.train_on_dask`, one rank per ``placement`` slot),
    so this process never holds the training rows or edges.
    """

    world_size: int
    reason: str
    client: Any = None
    placement: str = "worker"  # where DDP ranks go (pumap_dask.distributed.ddp.rank_workers)

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def remote(self) -> bool:
        """Training runs on the Dask workers (one rank or several), not in this process."""
        return self.client is not None


# --------------------------------------------------------------------------- stages


def knn_plan(handle: InputHandle, params: dict, device: str) -> str:
    """The kNN method a fit of ``handle`` will use (resolves ``"auto"``)."""

    method = params["knn_method"]
    if handle.lazy:
        method = resolve_method(method, handle.source, handle.n, handle.d, device)
    elif method == "auto":
        method = knn_stage.choose_method(handle.n, handle.d, device)
    if method == "partitioned" and not handle.lazy:
        # in-memory input: one partition, searched with the partitions' local method
        method = (params.get("knn_kwds") or {}).get("local_method", "nndescent")
    return method


def run_knn(handle: InputHandle, params: dict, device: str, *, work_dir: str | None = None,
            knn: tuple | None = None, method: str | None = None,
            content: str | None = None) -> Neighbors:
    """The kNN stage: precomputed, in memory, or partitioned across the Dask workers.

    ``method`` is :func:`knn_plan`'s answer when the caller has it already; ``content``
    the input's digest (:meth:`InputHandle.identity`), which keys the work directory's
    kNN cache.
    """
    k = params["n_neighbors"]
    if knn is not None:
        ind, dist = knn_stage.check_precomputed(knn, handle.n, k)
        return Neighbors(ind, dist, "precomputed")
    method = method or knn_plan(handle, params, device)
    kwds = dict(params.get("knn_kwds") or {})
    local_method = kwds.pop("local_method", "nndescent")
    if method == "partitioned":
        res = nearest_neighbors(handle.source, k, "partitioned", overlap=params["knn_overlap"],
                                random_state=params["random_state"], device=params["device"],
                                key=handle.key, work_dir=work_dir,
                                metric=params.get("metric", "euclidean"),
                                local_method=local_method, method_kwds=kwds or None,
                                content=content)
        return Neighbors(res.indices, res.distances, "partitioned",
                         None if res.recall is None else float(res.recall))
    X = handle.load()
    ind, dist = knn_stage.nearest_neighbors_numpy(X, k, method,
                                                  random_state=params["random_state"],
                                                  device=device,
                                                  metric=params.get("metric", "euclidean"),
                                                  **kwds)
    return Neighbors(ind, dist, method)


def run_graph(neighbors: Neighbors, params: dict, *, work_dir: str | None = None,
              y: np.ndarray | None = None) -> Edges:
    """The graph stage: in memory for numpy kNN, edge shards on the workers otherwise.

    Labels ``y`` (checked by :func:`check_labels`) are mixed in with
    ``params["target_weight"]``: by :func:`apply_labels` in memory, on the workers before the
    shards are pruned for a partitioned fit (the same edges and weights).
    """
    graph_kw = dict(set_op_mix_ratio=params["set_op_mix_ratio"],
                    local_connectivity=params["local_connectivity"],
                    tolerance=params["tolerance"])
    if neighbors.method == "partitioned":
        store = build_edge_store(neighbors.indices, neighbors.distances, work_dir,
                                 n_epochs=PRUNE_EPOCHS, y=y,
                                 target_weight=params.get("target_weight", 0.5), **graph_kw)
        edges = Edges(None, None, None, store.n_vertices, store=store)
    else:
        graph = graph_stage.fuzzy_simplicial_set(neighbors.indices, neighbors.distances,
                                                 **graph_kw)
        head, tail, weight = graph_stage.graph_to_edges(graph, n_epochs=PRUNE_EPOCHS)
        edges = Edges(head, tail, weight, graph.shape[0], graph)
        if y is not None:
            edges = apply_labels(edges, y, params.get("target_weight", 0.5))
    if len(edges) == 0:
        raise InputError("the kNN graph has no edges (all points identical?); the data "
                         "needs some spread to embed")
    return edges


def precomputed_edges(graph: sp.csr_matrix) -> Edges:
    """Edges of a validated precomputed graph
    (:func:`pumap_dask.graph.check_precomputed_graph`), pruned as :func:`run_graph` prunes."""
    head, tail, weight = graph_stage.graph_to_edges(graph, n_epochs=PRUNE_EPOCHS)
    logger.info("precomputed graph: %d x %d, %d edges kept of %d", *graph.shape, len(head),
                graph.nnz)
    return Edges(head, tail, weight, graph.shape[0], graph)


def apply_labels(edges: Edges, y: np.ndarray, target_weight: float) -> Edges:
    """The in-memory graph with labels mixed in
    (:func:`pumap_dask.graph.categorical_intersection`: umap-learn's label distances for
    ``target_weight``, edges between unlabelled rows kept), pruned again.

    Partitioned fits mix the labels in on the workers instead
    (:func:`pumap_dask.distributed.graph_dask.build_edge_store` with ``y``), through
    :func:`run_graph`.
    """
    if edges.graph is None:
        raise ParameterError("apply_labels needs the in-memory graph; a partitioned fit mixes the "
                             "labels into its edge shards: pass y to run_graph")
    graph = graph_stage.categorical_intersection(edges.graph, y, target_weight)
    head, tail, weight = graph_stage.graph_to_edges(graph, n_epochs=PRUNE_EPOCHS)
    n_known = int((graph_stage.label_codes(y) >= 0).sum())
    logger.info("labels mixed into the graph (target_weight %.2f, %d of %d rows labelled): "
                "%d edges kept of %d", target_weight, n_known, len(y), len(head), len(edges))
    return Edges(head, tail, weight, graph.shape[0], graph)


def run_init(handle: InputHandle, edges: Edges, params: dict, device: str) -> Layout | None:
    """The initial layout: spectral of the full graph up to :data:`N_LANDMARKS` rows, else of a
    kNN graph among that many sampled rows (landmarks); PCA when the graph is disconnected."""
    method = params["init"]
    n, seed = handle.n, params["random_state"]
    if method == "random":
        return None
    rows = landmark_rows(n, N_LANDMARKS, seed)
    if method == "spectral" and edges.graph is not None and len(rows) == n:
        pos = spectral_layout(edges.graph, params["n_components"], seed)
        if pos is not None:
            return Layout(rows, pos, "spectral")
        return Layout(rows, pca_layout(handle.load(), params["n_components"],
                                       random_state=seed), "pca")
    sample = handle.rows(rows)
    if method == "spectral":
        pos, how = landmark_layout(sample, params["n_components"], params["n_neighbors"],
                                   random_state=seed, device=device,
                                   set_op_mix_ratio=params["set_op_mix_ratio"],
                                   local_connectivity=params["local_connectivity"],
                                   metric=params.get("metric", "euclidean"))
        return Layout(rows, pos, how if len(rows) == n else f"landmark-{how}")
    return Layout(rows, pca_layout(sample, params["n_components"], random_state=seed), "pca")


def train_config(params: dict, n_edges: int, n_features: int, device: str, a: float,
                 b: float, n_rows: int | None = None) -> TrainConfig:
    """The trainer's configuration from the estimator's parameters (``n_rows``: the
    training rows, which ``batching="auto"`` looks at)."""

    batch = min(params["batch_size"], n_edges)
    batching = resolve_batching(params.get("batching", "auto"), params["correlation_weight"],
                                n_rows=n_rows, batch_size=batch)
    n_epochs = params["n_epochs"] or default_epochs(n_edges, batch, batching)
    n_proj = params["n_projection"] if 0 < params["n_projection"] < n_features else 0
    return TrainConfig(
        n_components=params["n_components"], hidden_layers=tuple(params["hidden_layers"]),
        activation=params.get("activation", "leaky_relu"), n_projection=n_proj,
        learning_rate=params["learning_rate"], n_epochs=n_epochs,
        batch_size=batch, negative_sample_rate=params["negative_sample_rate"],
        correlation_weight=params["correlation_weight"], a=a, b=b,
        random_state=params["random_state"], device=device,
        precision=params.get("precision", "fp32"), batching=batching,
    )


def run_train(X: np.ndarray, edges: Edges, layout: Layout | None, cfg: TrainConfig,
              verbose: bool = False, callbacks: list | None = None, *,
              encoder: Any = None, landmarks: Any = None, network: Any = None,
              reconstruction: Any = None, validation: np.ndarray | None = None) -> Trained:
    """The training stage: build the encoder from the data, pre-train it on the layout,
    then train it with the UMAP loss on the edges.

    ``callbacks`` (the estimator's) are called after each epoch as
    ``callback(epoch, loss, encoder)``; any returning True stops training after that epoch.
    ``encoder``: a trained encoder to continue from (its preprocessing kept, no
    pre-training); ``landmarks``: a :class:`pumap_dask.continued.Landmarks` (see
    :mod:`pumap_dask.continued`). ``network``: a fresh custom encoder to train instead
    of the default MLP; ``reconstruction``: a
    :class:`pumap_dask.networks.ReconstructionTerm` (its decoder trained jointly), with
    ``validation`` rows whose reconstruction error is appended to its ``validation`` list
    after each epoch (see :mod:`pumap_dask.networks`).
    """
    from_model = encoder is not None
    if encoder is None:
        encoder = network if network is not None else build_encoder(X.shape[1], cfg, X)
    # the train stage's bar counts epochs (with the loss and an ETA; shown at INFO)
    bar = track(cfg.n_epochs, "train") if verbose else None

    def cb(epoch, loss):
        bar.update(epoch + 1, postfix=f"loss {loss:.4f}")

    user_cbs = list(callbacks or ())
    model = encoder  # the module train_encoder trains in place

    def epoch_end(epoch, loss):
        if verbose:
            cb(epoch, loss)
        if validation is not None and reconstruction is not None:
            reconstruction.validation.append(
                reconstruction_error(model, reconstruction.decoder, validation))
        stops = [bool(c(epoch, loss, model)) for c in user_cbs]  # every callback runs
        return any(stops)

    init = None if layout is None else (layout.rows, layout.positions)
    try:
        encoder, history = train_encoder(X, edges.head, edges.tail, edges.weight, cfg, encoder,
                                         epoch_end if verbose or user_cbs
                                         or validation is not None else None,
                                         init_embedding=init, landmarks=landmarks,
                                         from_model=from_model, reconstruction=reconstruction,
                                         within_epoch=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    return Trained(encoder, history, cfg)


def feature_stats(X: Any) -> dict[str, np.ndarray]:
    """Per-feature min, max, mean and std of the training data (float32); a dask array's
    are computed where its blocks are (one pass)."""
    parts = (X.min(0), X.max(0), X.mean(0, dtype=np.float64), X.std(0, dtype=np.float64))
    if is_lazy(X):
        parts = dask.compute(*parts)
    return dict(zip(("min", "max", "mean", "std"),
                    (np.asarray(p).astype(np.float32) for p in parts)))


def embed_training_rows(encoder: Any, rows: np.ndarray | InputHandle
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The training rows' embedding and :func:`feature_stats`: in this process for
    in-memory rows, else the encoder mapped over the input's blocks where they are
    (:func:`pumap_dask.transform.transform`) and only the (n, n_components) result
    gathered here."""
    if isinstance(rows, InputHandle):
        darr = rows.darr.astype(np.float32)
        return (np.asarray(transform(darr, encoder_source(encoder)).compute()),
                feature_stats(darr))
    return encode(encoder, rows), feature_stats(rows)


# --------------------------------------------------------------------------- driver
def fit(params: dict, X: Any, *, key: str | None = None, knn: tuple | None = None,
        y: Any = None, init_model: Any = None, landmark_positions: Any = None,
        validation_data: Any = None, graph: Any = None,
        kept: KeptLandmarks | None = None) -> FitResult:
    """Run every stage of a fit; ``params`` are a validated estimator's ``get_params()``.

    Parameters
    ----------
    params
        The estimator's parameters (validated by :mod:`pumap_dask.params`).
    X
        numpy array, dask array, ``zarr.Array`` or a path to a Zarr array / AnnData store.
    key
        Array inside a Zarr group.
    knn
        Precomputed ``(indices, distances)``, self excluded.
    graph
        Precomputed fuzzy graph: a symmetric ``scipy.sparse`` (n, n) matrix, weights in
        (0, 1] (see :func:`pumap_dask.graph.check_precomputed_graph`). The kNN and graph
        stages are skipped; its edges are pruned as the pipeline prunes its own graph
        (:data:`PRUNE_EPOCHS`). Not together with ``knn``.
    y
        Labels for a semi-supervised fit (-1: unknown; see :func:`apply_labels`), mixed
        into the in-memory graph, the edge shards of a partitioned fit, or a precomputed
        graph.
    init_model
        Continue training (see :mod:`pumap_dask.continued`): a fitted estimator, a trained
        :class:`pumap_dask.encoder.Encoder` or the path of a saved model. Its encoder is
        copied, its architecture must match, the initial layout is skipped (``init``
        "model") and its preprocessing is kept. With ``params["parametric_reconstruction"]``
        its decoder (when it has one) is continued too (copied; same architecture).
    kept
        Landmarks kept by ``add_landmarks`` (:func:`pumap_dask.continued.kept_landmarks`):
        their rows are appended to ``X`` with their positions as landmark positions, and
        dropped again from the result (``embedding`` and ``n_samples_fit`` describe X's rows).
    landmark_positions
        (n, n_components) positions, NaN for rows without a landmark (see
        :func:`pumap_dask.params.landmark_positions`), pulled with weight
        ``params["landmark_loss_weight"]``. One training process only (no DDP).
    validation_data
        Held-out rows (numpy, same sample shape as X) whose reconstruction error (mean
        squared error in input units) is recorded after each epoch; needs
        ``params["parametric_reconstruction"]`` (see :mod:`pumap_dask.networks`).
    """
    timings: dict[str, float] = {}
    peaks: dict[str, int] = {}  # this process's peak RSS per stage
    wpeaks: dict[str, int] = {}  # the largest worker's peak per stage (distributed)

    def timed(name: str):
        return stage(name, timings, peaks, wpeaks)

    t0 = time.perf_counter()
    check_train_world(params, landmarks=landmark_positions is not None or kept is not None,
                      init_model=init_model is not None)
    init_encoder = init_decoder = None
    if init_model is not None:
        init_encoder = resolve_init_model(init_model)
        if params.get("parametric_reconstruction"):
            init_decoder = resolve_init_decoder(init_model)
    n_new = None
    if kept is not None:
        X, y, landmark_positions, n_new = append_kept_landmarks(
            kept, X, y, landmark_positions, key=key, n_components=params["n_components"],
            knn=knn, graph=graph)
        key = None
    handle = open_input(X, key)
    check_sizes(handle, params["n_neighbors"])
    input_shape = handle.input_shape or (handle.d,)
    fit_rows = sampled_rows(params, handle.n, knn=knn, graph=graph,
                            landmarks=("kept landmarks (add_landmarks)" if kept is not None
                                       else "landmark_positions=" if landmark_positions
                                       is not None else None))
    validation = None
    if validation_data is not None:
        if not params.get("parametric_reconstruction"):
            raise InputError("validation_data measures the reconstruction error: it needs "
                             "parametric_reconstruction=True")
        validation = check_validation(validation_data, input_shape)
    landmarks = None
    if init_encoder is not None:
        check_architecture(init_encoder, handle.d, params)
    if init_decoder is not None:
        check_decoder(init_decoder, params, input_shape)
    if landmark_positions is not None:
        lm = check_landmarks(landmark_positions, handle.n, params["n_components"])
        if lm is not None:
            landmarks = Landmarks(lm[0], lm[1], params.get("landmark_loss_weight", 1.0))
    device = knn_stage.resolve_device(params["device"])
    a, b = find_ab_params(params["spread"], params["min_dist"])
    if graph is not None:
        if knn is not None:
            raise InputError("pass either knn= (a precomputed kNN) or graph= (a precomputed "
                             "fuzzy graph), not both")
        graph = graph_stage.check_precomputed_graph(graph, handle.n)
    if y is not None:
        y = check_labels(y, handle.n)
    whole = handle  # every row is embedded; the stages below fit `handle`
    if fit_rows is not None:
        handle, ids = whole.sample(fit_rows, params.get("random_state") or 0)
        y = None if y is None else y[ids]
        logger.info("fit_rows: fitting a uniform sample of %d of the %d rows (kNN, graph, "
                    "layout and training); every row is embedded by the encoder",
                    fit_rows, whole.n)
    method = None if knn is not None or graph is not None else knn_plan(handle, params, device)
    partitioned = method == "partitioned"
    plan = plan_training(params, partitioned=partitioned, source=handle.opener()[0],
                         landmarks=landmarks is not None, init_model=init_encoder is not None,
                         device=device)
    if not plan.remote:  # this process will hold the rows: fail now, not after the kNN
        handle.check_budget()
    # one read: NaN check and content digests (of every row and of the fitted ones, which a
    # sample reads from the same blocks), before the kNN
    identity, fitted = identities([whole, handle])
    content = fitted["sha256"]
    timings["input"] = time.perf_counter() - t0
    if partitioned and not params.get("work_dir"):
        require_local_workers()  # a temporary work directory lives on this machine
    with work_directory(params.get("work_dir"), temporary=partitioned) as wdir:
        if graph is not None:  # precomputed fuzzy graph: no kNN, no graph stage
            neighbors = Neighbors(None, None, "precomputed-graph")
        else:
            with timed("knn"):
                neighbors = run_knn(handle, params, device, work_dir=wdir, knn=knn,
                                    method=method, content=content)
        with timed("graph"):
            edges = (run_graph(neighbors, params, work_dir=wdir, y=y) if graph is None
                     else precomputed_edges(graph))
            if y is not None and graph is not None:  # run_graph mixed in its own labels
                edges = apply_labels(edges, y, params.get("target_weight", 0.5))
        knn_method, knn_recall = neighbors.method, neighbors.recall
        del neighbors  # the kNN arrays are not needed past the graph
        Xtr = None
        if not plan.remote:  # training on the workers: the rows and edges stay there
            with timed("load"):
                Xtr = handle.load()
                edges = edges.load()
        with timed("init"):  # continued training starts from the given encoder instead
            layout = None if init_encoder is not None else run_init(handle, edges, params,
                                                                    device)
        with timed("train"):
            cfg = train_config(params, len(edges), handle.d, device, a, b, handle.n)
            cfg = dataclasses.replace(cfg, input_sha256=content)
            if params["n_epochs"] is None and fit_rows is None and cfg.n_epochs < FEW_EPOCHS:
                logger.info(
                    "training: the default budget passes %d time(s) over the %d edges of "
                    "%d rows; fit_rows=%d would pass %d times over a sample's graph in the "
                    "same time, which kept more local structure at 10M rows (docs/scale.md, "
                    "'Fitting a sample')", cfg.n_epochs, len(edges), handle.n,
                    sample_for_epochs(handle.n, len(edges), cfg.batching), SAMPLE_EPOCHS)
            if params.get("work_dir"):  # checkpoints beside the kNN and graph: a rerun resumes
                cfg = dataclasses.replace(cfg, checkpoint_dir=os.path.join(wdir, "train"))
            network = recon = None
            if Xtr is not None:  # custom networks and decoders train in this process
                network, recon = build_for_fit(params, input_shape, cfg, Xtr,
                                               init_decoder=init_decoder)
            world = plan.world_size
            if plan.remote:
                init = None if layout is None else (layout.rows, layout.positions)
                encoder, history, world = ddp.train_on_dask(
                    plan.client, *handle.opener(), os.path.join(wdir, "graph"), cfg,
                    init, world_size=world, max_restarts=int(params.get("max_restarts", 2)),
                    placement=plan.placement)
                trained = Trained(encoder, history, cfg)
            else:
                trained = run_train(Xtr, edges, layout, cfg, verbose=bool(params.get("verbose")),
                                    callbacks=params.get("callbacks"), encoder=init_encoder,
                                    landmarks=landmarks, network=network,
                                    reconstruction=recon, validation=validation)

    with timed("embed"):  # on the workers when the rows are there
        rows = Xtr if fit_rows is None else whole.data  # the embedded rows, where in memory
        embedding, stats = embed_training_rows(trained.encoder, whole if rows is None else rows)
    logger.info("fitted %d x %d: %s", whole.n, whole.d,
                ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    res = FitResult(encoder=trained.encoder, loss_history=list(trained.loss_history),
                    n_epochs=cfg.n_epochs, embedding=embedding, feature_stats=stats,
                    n_samples_fit=whole.n, n_features_in=whole.d,
                    knn_method=knn_method, knn_recall=knn_recall, n_edges=len(edges),
                    a=a, b=b,
                    init=("model" if init_encoder is not None else
                          "random" if layout is None else layout.method),
                    graph=None if fit_rows else edges.graph,
                    train_world_size=world, timings=timings, peak_memory=peaks,
                    worker_peak_memory=wpeaks,
                    decoder=None if recon is None else recon.decoder,
                    input_shape=handle.input_shape,
                    reconstruction_history=None if recon is None else recon.history,
                    validation_reconstruction=(None if validation is None
                                               else recon.validation),
                    input_identity=identity)
    return res if n_new is None else drop_kept_rows(res, n_new)


def plan_training(params: dict, *, partitioned: bool, source: Any, landmarks: bool = False,
                  init_model: bool = False, device: str = "cpu") -> TrainPlan:
    """Decide, once, whether a fit trains in this process or on the Dask workers, and
    where its ranks go.

    Training on the workers needs a partitioned fit of lazy input the workers can read (a
    Zarr array or path, or a dask array whose graph can be sent to them), an active
    ``distributed.Client`` and none of the options that train in this process only
    (:func:`pumap_dask.params.single_process_reasons`). The topology follows the hardware:
    one rank per GPU worker when training runs on CUDA; on CPUs one rank per *host* using
    all its cores, so DDP runs across hosts only (on one host, one process with all its
    cores is faster than DDP over its workers: Gloo's all-reduce each step costs more than
    it parallelises; ``benchmarks/RESULTS.md``). A single rank (one host, or one GPU
    worker) still runs on a worker: the client then never holds the training rows or
    edges, which is what keeps it small at 10M rows. ``train_world_size=1`` forces one
    process, this one;
    an explicit ``train_world_size=N > 1`` asks for N ranks, one per worker; when it cannot
    be honoured it is an error if an option forbids it, else a warning.

    Raises
    ------
    ParameterError
        ``train_world_size > 1`` with landmarks, ``init_model``, callbacks or custom networks.
    InputError
        ``train_world_size > 1`` without an active ``distributed.Client``.
    """
    wanted = params.get("train_world_size")
    reasons = check_train_world(params, landmarks=landmarks, init_model=init_model)
    plan = _choose_plan(wanted, reasons, partitioned, source, device)
    logger.info("training plan: %s (%s)",
                f"DDP over {plan.world_size} ranks, one per {plan.placement}" if plan.ddp
                else "one process on a Dask worker" if plan.remote else "in this process",
                plan.reason)
    return plan


def sampled_rows(params: dict, n: int, *, knn: Any = None, graph: Any = None,
                 landmarks: str | None = None) -> int | None:
    """How many rows a ``fit_rows`` fit samples, or None to fit every row.

    ``params["fit_rows"]`` below ``n`` fits a seeded uniform sample of that many rows (kNN,
    graph, layout and training) and embeds every row with the encoder; at least ``n`` (or
    None) fits them all.

    ``landmarks`` names where the fit's landmarks come from (None: it has none).

    Raises
    ------
    InputError
        With a precomputed ``knn``/``graph`` or landmarks, which are given for every row,
        or a sample too small for ``n_neighbors``.
    """
    m = params.get("fit_rows")
    if m is None or m >= n:
        if m is not None:
            logger.info("fit_rows=%d: X has %d rows, all of them fitted", m, n)
        return None
    if landmarks is not None and knn is None and graph is None:
        remedy = ("remove_landmarks() first" if landmarks.startswith("kept") else
                  f"pass X's sample with its own {landmarks}")
        raise InputError(f"fit_rows={m} fits a sample of X's {n} rows, but {landmarks} pin "
                         f"rows of the fit: fit all rows (fit_rows=None), or {remedy}")
    given = [name for name, on in (("knn", knn is not None), ("graph", graph is not None))
             if on]
    if given:
        raise InputError(f"fit_rows={m} fits a sample of X's {n} rows, but {given[0]}= is "
                         "given for every row: fit all rows (fit_rows=None), or pass X's "
                         f"sample with its own {given[0]}")
    if m < params["n_neighbors"] + 1:
        raise InputError(f"fit_rows={m} is too few rows for n_neighbors="
                         f"{params['n_neighbors']}: fit at least {params['n_neighbors'] + 1} "
                         "rows (or None: all of them)")
    return int(m)


def check_train_world(params: dict, *, landmarks: bool = False,
                      init_model: bool = False) -> list[str]:
    """The options that keep this fit in one process
    (:func:`pumap_dask.params.single_process_reasons`); refuses an explicit
    ``train_world_size > 1`` with any of them, before any work."""
    reasons = single_process_reasons(params, landmarks=landmarks, init_model=init_model)
    refuse_ddp(params.get("train_world_size"), reasons)
    return reasons


# the serialised graph of a dask array input above which DDP ranks are not sent it (it
# holds in-memory data, which every rank would receive a copy of)
MAX_SHIPPED_GRAPH = 64 << 20


def _unreadable_by_workers(source: Any) -> str | None:
    """Why the workers cannot reopen this input (None: they can)."""
    if isinstance(source, RowSample):  # a sample: its input's rows, drawn where opened
        return _unreadable_by_workers(source.source)
    if isinstance(source, (str, os.PathLike)) or type(source).__module__.startswith("zarr"):
        return None
    if not is_lazy(source):
        return "in-memory input"
    try:
        size = len(cloudpickle.dumps(source))
    except Exception as exc:  # e.g. an open h5py file inside the graph
        return (f"a dask array whose graph cannot be sent to the workers "
                f"({type(exc).__name__}: {str(exc)[:80]}; build it from file paths, e.g. dask.delayed readers, or "
                "write it to Zarr)")
    if size > MAX_SHIPPED_GRAPH:
        return (f"a dask array holding {size / 2**20:.0f} MiB of in-memory data (every rank "
                "would receive a copy; write it to Zarr)")
    return None


def _choose_plan(wanted: int | None, reasons: list[str], partitioned: bool,
                 source: Any, device: str = "cpu") -> TrainPlan:
    if wanted == 1:
        return TrainPlan(1, "train_world_size=1")
    if reasons:
        return TrainPlan(1, " and ".join(reasons) + " given")
    why = "an in-memory kNN" if not partitioned else _unreadable_by_workers(source)
    if why:
        if wanted:
            logger.warning("train_world_size=%d ignored: DDP training needs a partitioned fit "
                           "of input the workers can read (%s); training in one process",
                           wanted, why)
        return TrainPlan(1, why)
    try:
        client = distributed.get_client()
    except ValueError:
        if wanted:
            raise InputError(f"train_world_size={wanted} needs an active distributed.Client "
                             "(DDP runs one rank per Dask worker)") from None
        return TrainPlan(1, "no distributed.Client")
    n_workers = len(ddp.eligible_workers(client))
    if wanted:
        world = min(wanted, n_workers)
        if world < 2:
            return TrainPlan(1, f"{n_workers} eligible Dask worker")
        return TrainPlan(world, f"train_world_size={wanted}, {n_workers} eligible Dask "
                                "workers", client, "worker")
    placement = "gpu" if device != "cpu" and ddp.rank_workers(client, "gpu") else "host"
    slots = ddp.rank_workers(client, placement)
    if not slots:
        return TrainPlan(1, "no Dask workers")
    if len(slots) == 1:  # one rank, on a worker: the rows and edges never reach the client
        why = ("one GPU worker" if placement == "gpu" else
               f"{n_workers} CPU worker(s) on one host: one process with all their "
               f"{slots[0][1]} threads trains faster than DDP over them; it runs on "
               f"{slots[0][0]}, so the client holds neither rows nor edges")
        return TrainPlan(1, why, client, placement)
    return TrainPlan(len(slots), f"{len(slots)} "
                     f"{'GPU workers' if placement == 'gpu' else 'hosts'}", client, placement)


def require_local_workers() -> None:
    """A temporary work_dir lives on this machine: refuse when workers run elsewhere."""
    try:
        client = distributed.get_client()
    except ValueError:
        return

    hosts = {addr.split("://")[-1].rsplit(":", 1)[0] for addr in ddp.eligible_workers(client)}
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
