"""The scikit-learn style estimator tying the stages together."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from . import knn as knn_stage
from . import pipeline
from .continued import add_landmarks, keep_landmarks, kept_landmarks, remove_landmarks
from .encoder import encode
from .errors import NotFittedError, ParameterError
from .export import export_encoder
from .io import as_dask, check_array, check_n_features, flatten_input, is_lazy
from .params import check_estimator_params, check_transform_args
from .progress import show_progress
from .reconstruction import inverse_transform
from .refine import (
    DEFAULT_REFINE_EPOCHS,
    check_refine,
    keep_training_rows,
    reference_from_model,
    refine_transform,
)
from .state import FITTED_ATTRS, STALE_ATTRS, load_estimator_state, save_estimator, set_fitted
from .transform import check_finite_output
from .transform import transform as lazy_transform

logger = logging.getLogger(__name__)

# Chosen by benchmarks/quality.py (see benchmarks/RESULTS.md).
DEFAULT_HIDDEN = (128, 64, 32)
# Chosen by benchmarks/local_structure.py on trajectory-rich data (benchmarks/RESULTS.md,
# issue 20): SiLU and 4x more, smaller steps at the same samples per edge keep more local
# structure than LeakyReLU at 16,384 edges per step, at about the same cost.
DEFAULT_ACTIVATION = "silu"
DEFAULT_BATCH = 4096
DEFAULT_PROJECTION = 64


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
        ``"auto"``, ``"exact"`` (blockwise torch), ``"nndescent"`` (NN-descent: the
        package's cached kernel or pynndescent's, whichever
        :func:`pumap_dask.knn.descent_kernel` estimates faster; options only pynndescent
        takes select it), ``"hnsw"`` (usearch, optional extra ``pumap_dask[hnsw]``) or
        ``"partitioned"`` (Dask, for chunked input; ``knn_kwds={"local_method": "hnsw"}``
        searches each partition with usearch HNSW instead of NN-descent). With ``"auto"``,
        lazy input (dask, Zarr, paths) of more than
        ``pumap_dask.distributed.knn_dask.PARTITION_THRESHOLD`` rows uses ``"partitioned"``;
        numpy input never does.
    hidden_layers
        Widths of the encoder's hidden layers (``activation`` after each).
    activation
        The activation after each hidden layer: ``"silu"`` or ``"leaky_relu"``
        (LeakyReLU(0.1), the only one before this parameter existed; models saved then load
        with it). The smooth SiLU keeps more local structure; see ``docs/results.md``.
    n_projection
        Width of a fixed PCA projection in front of the MLP (0 disables; ignored when the
        input has fewer features).
    learning_rate
        Adam's initial learning rate, decayed linearly to zero.
    n_epochs
        Passes over the edge list. ``None`` picks at least 10 epochs and about 16.4M
        positive-edge samples, at most 98M; with neighbourhood batches 4x the floor and
        target and 2x the cap
        (:func:`pumap_dask.train.default_epochs`).
    batch_size
        Positive edges per optimiser step (4096: smaller steps than before at the same
        samples per edge keep more local structure; the budget is in samples).
    negative_sample_rate
        Negatives per positive edge.
    batching
        How a step's positive edges are drawn: ``"neighbourhoods"`` trains on every graph
        edge among the rows of a few seed rows' neighbourhoods, weighted, with negatives
        from as many uniform rows (about a tenth of the encoded rows per positive sample,
        so 4x the samples in the default budget: more local structure in about the same
        time); ``"edges"`` draws each edge in proportion to its weight and encodes both
        ends (the only batching before this parameter). ``"auto"``: neighbourhoods, unless
        ``correlation_weight`` needs the edge sampler or the data has fewer than 4 batches'
        worth of rows (16,384 by default), where an edge step encodes most rows anyway. See
        :mod:`pumap_dask.batches`.
    fit_rows
        Fit a uniform sample of this many rows (seeded by ``random_state``): the kNN, the
        graph, the initial layout and training see only the sample, and every row of X is
        then embedded by the trained encoder (``embedding_`` has all rows). None (default)
        or at least ``len(X)``: every row is fitted. For data too large for the training
        budget to pass over its graph more than once or twice: at a fixed training time
        the encoder learns more from several passes over a sample's graph than from one
        over all rows' (``docs/scale.md``). Rare populations are sampled with the rest, so
        keep the sample large enough for the rarest to keep several times ``n_neighbors``
        cells in it. Not with a precomputed ``knn``/``graph`` or landmarks.
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
        Show progress: a bar per long stage (kNN, graph, init, training by epoch with its
        loss and ETA; ``tqdm.auto``, a widget in a notebook) on a terminal or in a notebook,
        else log lines at INFO (printed on stderr when logging is not configured).
    work_dir
        Directory for the distributed stages of a partitioned fit (kNN arrays and the edge
        shards); a rerun with the same directory reuses what is finished. None uses a
        temporary directory removed after the fit.
    knn_overlap
        Partitions each row joins in the partitioned kNN (its nearest k-means centroids).
    knn_kwds
        Options of the kNN back-end, e.g. ``{"M": 16, "ef_construction": 100, "ef": 64}``
        for hnsw (:func:`pumap_dask.knn.hnsw_knn`), pynndescent's arguments for nndescent,
        and ``"local_method"`` (``"nndescent"`` or ``"hnsw"``) for the partitioned kNN.
        Options of another back-end are ignored. None: the defaults.
    train_world_size
        Training processes (torch DDP; see :mod:`pumap_dask.distributed.ddp` and
        :func:`pumap_dask.pipeline.plan_training`). None: for a partitioned fit with an
        active distributed client, one rank per host on CPUs (one process with all the
        host's cores, DDP across hosts) or one per GPU worker, always on the workers, so
        the client never holds the training rows or edges; otherwise (in-memory input,
        ``callbacks`` and the other options that need this process) one process, this
        one. N > 1: N ranks, one per worker. 1: one process, this one.
    max_restarts
        DDP training (``train_world_size > 1``): how many times the group restarts from its
        last checkpoint after a rank is lost (a worker died), waiting for the worker to
        come back; 0 fails at once, naming the lost rank (:class:`pumap_dask.errors.RankLostError`).
    metric
        Input-space distance of the kNN graph: ``"euclidean"`` or ``"cosine"``
        (``1 - cos``; every kNN back-end supports both). Under cosine a zero-norm row lies
        at distance 1 from every row.
    callbacks
        None or a list of callables, each called after every training epoch as
        ``callback(epoch, loss, model)``: ``epoch`` counts from 0, ``loss`` is the epoch's
        mean loss, ``model`` the encoder being trained (a ``torch.nn.Module``; evaluate it
        under ``torch.no_grad()``, do not modify it). A callback returning True stops
        training after that epoch (all callbacks still run for it). See
        :class:`pumap_dask.train.EarlyStopping`. Not saved with the model; not allowed with
        ``train_world_size > 1``.
    target_weight
        For ``fit(X, y)`` with labels: how strongly labels shape the graph, in [0, 1]
        (umap-learn's name and rule: edges between different labels are scaled by
        ``exp(-2.5 / (1 - target_weight))``, edges to unknown labels by ``exp(-1)``).
        Ignored without ``y``.
    precision
        Training arithmetic: ``"fp32"`` (default) or ``"bf16"``, which runs the encoder's
        hidden layers under ``torch.autocast("cuda", dtype=torch.bfloat16)`` on CUDA (its
        last layer and the loss stay float32). On the CPU ``"bf16"`` logs a warning and
        trains in float32. The saved weights are float32 either way.
    landmark_loss_weight
        Weight of the landmark loss when ``fit`` is given ``landmark_positions``
        (umap-learn's name and default): the mean squared distance between the embedding of
        landmark rows and their positions is added to the UMAP loss, times this weight (see
        :mod:`pumap_dask.continued`). Ignored without landmarks.
    encoder
        None (the default MLP), a ``torch.nn.Module`` mapping (batch, n_features) (or
        (batch, *dims) for n-D input) to (batch, n_components), a factory called with the
        feature count (or the input's trailing shape) that returns one, or a
        ``"package.module:function"`` string naming such a factory (umap-learn's
        ``encoder``). A module given directly is copied, never trained in place. Saved as
        state dict + factory name: a module not built by a named factory (see
        :func:`pumap_dask.networks.build`) cannot be saved. The custom network sees the
        input as given (no centring or projection). See :mod:`pumap_dask.networks`.
    decoder
        The decoder for ``parametric_reconstruction``, in the same forms, mapping
        (batch, n_components) to the input's shape; its factory is called with the same
        argument. None: the encoder's hidden layers mirrored, linear output.
    parametric_reconstruction
        Train a decoder jointly (umap-learn's name), for :meth:`inverse_transform`. Its
        target is the raw input, so reconstructions are in input units.
    parametric_reconstruction_loss_weight
        Weight of the reconstruction loss (umap-learn's name), added to the UMAP loss of
        each step (so ``loss_history_`` holds the total).
    reconstruction_loss
        ``"mse"`` (default; the default decoder's loss is in standardised units, so the
        weight is scale-free) or ``"bce"`` (data in [0, 1]; the decoder outputs logits).
        umap-learn's ``parametric_reconstruction_loss_fcn``, as a name.
    autoencoder_loss
        As umap-learn: False (default) trains the decoder on the detached embedding, so the
        embedding is UMAP's alone; True lets the reconstruction loss shape the encoder too.

    Attributes
    ----------
    embedding_ : ndarray (n_samples, n_components)
    encoder_ : torch.nn.Module
    graph_ : scipy.sparse.csr_matrix
        The fuzzy graph, for in-memory fits only (a partitioned fit keeps its edges in
        ``work_dir/graph`` and builds no (n, n) matrix on the client; a ``fit_rows`` fit's
        graph is of its sample, and not kept).
    init_ : str
        The initial layout used: "spectral" (full graph), "landmark-spectral" (kNN graph of
        a sample of rows, above ``pumap_dask.init.N_LANDMARKS`` rows), "pca" or
        "landmark-pca" (PCA, when that graph is disconnected) or "random"; "model" when
        training continued from ``init_model`` (or in :meth:`partial_fit`).
    knn_recall_ : float
        Sampled recall@k of the kNN, set when it was measured (partitioned fits).
    loss_history_ : list of float
        Mean loss per epoch run (shorter than ``n_epochs_`` when a callback stopped early).
    n_epochs_run_ : int
        Epochs actually run (``len(loss_history_)``); ``n_epochs_`` is the number planned.
    timings_, peak_memory_, worker_peak_memory_ : dict
        Wall seconds, this process's peak RSS and the largest Dask worker's peak memory
        (bytes; distributed fits) per stage.
    n_features_in_, n_samples_fit_, a_, b_, knn_method_
    input_shape_ : tuple or None
        The trailing shape of n-D training input (e.g. (8, 8)); None for 2-D input.
    decoder_ : pumap_dask.networks.Decoder
        With ``parametric_reconstruction``: the trained decoder.
    reconstruction_history_ : list of float
        With ``parametric_reconstruction``: the mean reconstruction loss per epoch (training
        rows, in the loss's units).
    validation_reconstruction_ : list of float
        With ``fit(..., validation_data=)``: the held-out reconstruction error per epoch,
        mean squared error in input units.
    landmark_X_, landmark_positions_, landmark_idx_ : ndarray
        After :meth:`add_landmarks`: the kept rows, their positions and their ids.
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
        batch_size: int = DEFAULT_BATCH,
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
        knn_kwds: dict | None = None,
        train_world_size: int | None = None,
        max_restarts: int = 2,
        metric: str = "euclidean",
        callbacks: Sequence[Callable[..., bool | None]] | None = None,
        target_weight: float = 0.5,
        precision: str = "fp32",
        landmark_loss_weight: float = 1.0,
        encoder: Any = None,
        decoder: Any = None,
        parametric_reconstruction: bool = False,
        parametric_reconstruction_loss_weight: float = 1.0,
        reconstruction_loss: str = "mse",
        autoencoder_loss: bool = False,
        activation: str = DEFAULT_ACTIVATION,
        batching: str = "auto",
        fit_rows: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.spread = spread
        self.knn_method = knn_method
        self.hidden_layers = hidden_layers
        self.activation = activation
        self.batching = batching
        self.fit_rows = fit_rows
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
        self.knn_kwds = knn_kwds
        self.train_world_size = train_world_size
        self.max_restarts = max_restarts
        self.metric = metric
        self.callbacks = callbacks
        self.target_weight = target_weight
        self.precision = precision
        self.landmark_loss_weight = landmark_loss_weight
        self.encoder = encoder
        self.decoder = decoder
        self.parametric_reconstruction = parametric_reconstruction
        self.parametric_reconstruction_loss_weight = parametric_reconstruction_loss_weight
        self.reconstruction_loss = reconstruction_loss
        self.autoencoder_loss = autoencoder_loss

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        """Validate every parameter (see :mod:`pumap_dask.params`) before any work."""
        check_estimator_params(self)

    def _check_fitted(self) -> None:
        if not hasattr(self, "encoder_"):
            raise NotFittedError("this ParametricUMAP is not fitted yet; call fit(X) or "
                                 "pumap_dask.load(path) first")

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None, *, key: str | None = None,
            knn: tuple[np.ndarray, np.ndarray] | None = None, init_model: Any = None,
            landmark_positions: Any = None, landmarks: Any = None,
            validation_data: Any = None, graph: Any = None) -> "ParametricUMAP":
        """Fit the encoder to X (see :func:`pumap_dask.pipeline.fit` for the stages).

        Parameters
        ----------
        X
            numpy array, dask array, ``zarr.Array``, or a path to a Zarr array or AnnData
            ``.zarr`` store.
        y
            Optional labels, one per row, for a semi-supervised fit (as umap-learn's
            ``fit(X, y)``): -1 (or NaN) marks an unknown label. The labels are mixed into
            the fuzzy graph with weight ``target_weight``, in memory or on the workers for
            a partitioned fit (:func:`pumap_dask.graph.categorical_intersection`). None:
            unsupervised.
        key
            Array inside a Zarr group (default ``obsm/X_pca``, then ``X``).
        knn
            Precomputed ``(indices, distances)`` of shape (n, >= n_neighbors), self excluded.
        graph
            Precomputed fuzzy graph (umap-learn's ``graph_``, or
            :func:`pumap_dask.fuzzy_simplicial_set`'s): a symmetric ``scipy.sparse``
            (n, n) matrix with weights in (0, 1]. The kNN and graph stages are skipped and
            training samples its edges (pruned as the pipeline prunes its own graph;
            ``knn_method_`` is then ``"precomputed-graph"``). Not together with ``knn``.
        init_model
            Continue training from a fitted ``ParametricUMAP`` or the path of a saved model
            directory: its encoder's weights are the starting point (copied; ``init_model``
            is not changed), the initial layout pre-training is skipped, and its fixed
            preprocessing (centring, PCA projection, scale) is kept, so embeddings stay
            comparable with the old model's. Needs the same architecture (feature count,
            ``n_components``, ``hidden_layers``, ``n_projection``), else ValueError before
            any stage. The graph is of ``X`` alone: to keep old points in place, include
            them in ``X`` with ``landmark_positions`` (see :meth:`partial_fit`), or keep
            some with :meth:`add_landmarks` (appended to ``X`` by this fit). With
            ``parametric_reconstruction=True`` and an ``init_model`` that has a decoder, the
            decoder continues from its weights too (copied; same decoder architecture
            needed, else ValueError); without one it starts fresh.
        landmark_positions
            Array (n_samples, n_components): a position for each landmark row, NaN rows for
            the others (umap-learn's argument). Training adds ``landmark_loss_weight`` times
            the mean squared distance between the landmark rows' embedding and these
            positions (a sample of landmark rows per step). All-NaN is the same as None.
            Typical use, new data joining while old points stay put::

                new = ParametricUMAP(**old.get_params()).fit(
                    np.vstack([X_old, X_new]), init_model=old,
                    landmark_positions=np.vstack([old.embedding_,
                                                  np.full((len(X_new), 2), np.nan)]))

            One training process only: refused with ``train_world_size > 1``.
        landmarks
            Alias of ``landmark_positions``.
        validation_data
            Held-out rows (numpy, samples shaped as X's) whose reconstruction error is
            recorded after each epoch in ``validation_reconstruction_`` (umap-learn's
            ``reconstruction_validation``). Needs ``parametric_reconstruction=True``.

        Returns
        -------
        self
        """
        self._check_params()
        if landmarks is not None:
            if landmark_positions is not None:
                raise ParameterError("give landmark_positions or its alias landmarks, not both")
            landmark_positions = landmarks
        if self.verbose:  # stage bars (tqdm.auto: a notebook widget) or log lines
            show_progress()
        kept = kept_landmarks(self, init_model)  # add_landmarks' rows
        res = pipeline.fit(self.get_params(), X, key=key, knn=knn, y=y, init_model=init_model,
                           landmark_positions=landmark_positions,
                           validation_data=validation_data, graph=graph, kept=kept)
        for attr in (*FITTED_ATTRS, *STALE_ATTRS):
            self.__dict__.pop(attr, None)
        set_fitted(self, res)
        if kept is not None:
            keep_landmarks(self, kept)
        self._refine_rows = keep_training_rows(X, seed=self.random_state or 0)  # refine=True
        return self

    def fit_transform(self, X: Any, y: Any = None, **fit_params) -> np.ndarray:
        """Fit and return the training embedding."""
        return self.fit(X, y, **fit_params).embedding_

    def partial_fit(self, X: Any, y: Any = None, **fit_params) -> "ParametricUMAP":
        """Continue training this fitted model on new data.

        Builds the fuzzy graph of ``X`` alone and trains the current encoder on it with the
        UMAP loss, starting from its weights (no initial layout) and keeping its fixed
        preprocessing from the first fit, as umap-learn's ParametricUMAP does when fitted
        again. The graph is of ``X`` alone, not of the old and new data together: the
        estimator keeps at most a sample of its training rows (for ``refine``; none for
        lazy input at cluster scale), and the cost of a call then scales with the new data
        only. To keep old points in place, call :meth:`add_landmarks` on (some of) the old
        data first, pass some of them in ``X`` with their old positions as
        ``landmark_positions`` (see :meth:`fit`), or refit on both with
        ``fit(X_all, init_model=self, landmark_positions=...)``.
        Fitted attributes describe the last call (``n_samples_fit_`` is ``len(X)``,
        ``embedding_`` that of ``X``, ``loss_history_`` this call's epochs). On an unfitted
        estimator the first call is a plain :meth:`fit` (scikit-learn's convention).

        Parameters
        ----------
        X, y
            As for :meth:`fit`.
        **fit_params
            ``key``, ``knn``, ``landmark_positions`` as for :meth:`fit`.

        Returns
        -------
        self
        """
        if "init_model" in fit_params:
            raise TypeError("partial_fit continues from this model; init_model is fit's")
        if not hasattr(self, "encoder_"):
            return self.fit(X, y, **fit_params)
        return self.fit(X, y, init_model=self, **fit_params)

    def add_landmarks(self, X: Any, sample_pct: float = 0.01, sample_mode: str = "uniform",
                      landmark_loss_weight: float = 0.01, idx: Any = None) -> None:
        """Add some points from a dataset X as landmarks (umap-learn's name and signature).

        The fitted model keeps the chosen rows of ``X`` and their current positions
        (``self.transform(rows, refine=False)``, taken now). Every later fit that continues
        training, :meth:`partial_fit` ``(X_new)`` or ``fit(X_new, init_model=self)``,
        appends them to its training rows with those positions as landmark positions (merged
        with any ``landmark_positions`` given for ``X_new``'s rows), so the old points stay
        put while new data joins; ``embedding_`` and ``n_samples_fit_`` then describe
        ``X_new``'s rows only. Landmarks persist, with the same positions, through any number
        of continued fits until :meth:`remove_landmarks` (as umap-learn's); a fresh ``fit``
        (no ``init_model``) drops them with a warning. They are not saved by :meth:`save`.
        Continued fits with lazy ``X_new`` (dask, Zarr, paths) append them as one more
        block; precomputed ``knn=``/``graph=`` are refused while landmarks are kept. See
        :mod:`pumap_dask.continued`.

        Parameters
        ----------
        X
            Data the model embeds (typically its training data): numpy (2-d, or n-d as
            fitted), or lazy (dask, Zarr, a path; only the chosen rows are read).
        sample_pct
            With ``sample_mode="uniform"``: the fraction of rows kept,
            ``int(len(X) * sample_pct)`` rows drawn at random (seeded by ``random_state``).
        sample_mode
            ``"uniform"`` or ``"predetermined"`` (the rows ``idx``).
        landmark_loss_weight
            Sets the estimator's ``landmark_loss_weight`` (umap-learn's default 0.01; the
            loss here is the squared distance, see :mod:`pumap_dask.continued`).
        idx
            Row ids of ``X`` to keep, for ``sample_mode="predetermined"``.

        Raises
        ------
        NotFittedError
            On an unfitted estimator.
        ValueError
            On an unknown ``sample_mode``, ``sample_pct`` outside (0, 1] or picking no row,
            missing or out-of-range ``idx``, or a negative ``landmark_loss_weight``.

        Attributes set: ``landmark_X_`` (the kept rows, float32), ``landmark_positions_``
        ((n_landmarks, n_components) float32) and ``landmark_idx_`` (their ids in ``X``).
        """

        add_landmarks(self, X, sample_pct, sample_mode, landmark_loss_weight, idx)

    def remove_landmarks(self) -> None:
        """Forget the landmarks kept by :meth:`add_landmarks` (umap-learn's name): later
        continued fits no longer append them. ``landmark_loss_weight`` is left as it is (it
        still weighs ``landmark_positions`` given to :meth:`fit`)."""

        remove_landmarks(self)

    # ------------------------------------------------------------------ transform
    def transform(self, X: Any, *, key: str | None = None, batch_size: int | None = None,
                  refine: bool = False, refine_epochs: int | None = None,
                  training_data: Any = None):
        """Embed new data with the frozen encoder: one deterministic forward pass.

        numpy in, numpy out; dask arrays, Zarr arrays and paths give a lazy dask array (see
        :func:`pumap_dask.transform`). Every container gives the same rows the same
        embedding (to float rounding), as do a saved and loaded model,
        :func:`pumap_dask.transform` and :meth:`export_onnx`. A model fitted on n-D input
        (n, *dims) takes numpy input of that shape, or its flattened rows (n, prod(dims))
        (lazy input: rows).

        ``refine=True`` adds the opt-in, non-parametric polish: new points are placed as
        umap-learn's ``transform`` places them (exact kNN among the training rows, then
        ``refine_epochs`` epochs of UMAP SGD on the new points only, starting from the
        encoder's output, the training embedding fixed; see :mod:`pumap_dask.refine`). It
        lifts held-out accuracy on small training sets (``benchmarks/RESULTS.md``) at a cost
        per new row that grows with the number of training rows.

        Parameters
        ----------
        X
            New rows (numpy or anything numpy accepts, dask array, Zarr array or path).
        key
            Array inside a Zarr group (lazy input).
        batch_size
            Rows per forward pass of the encoder (default
            :func:`pumap_dask.encoder.forward_batch`: 4,096 on a CPU, 65,536 on a GPU).
        refine
            False (default): the encoder alone. True: polish; needs the training rows (kept
            by an in-memory fit, stored by ``save(..., include_training_data=True)``, or
            ``training_data``). Lazy input stays lazy and chunk-independent.
        refine_epochs
            SGD epochs of the polish (default 100).
        training_data
            With ``refine=True``: the rows the model was fitted on, when it holds none.

        Returns
        -------
        numpy.ndarray or dask.array.Array
            (n, n_components) float32.
        """
        self._check_fitted()
        check_transform_args(batch_size=batch_size)
        refine = check_refine(refine)
        ref = reference_from_model(self, training_data) if refine else None
        epochs = DEFAULT_REFINE_EPOCHS if refine_epochs is None else int(refine_epochs)
        if is_lazy(X):
            emb = lazy_transform(X, self, key=key, batch_size=batch_size)
            if ref is None:
                return emb
            return refine_transform(as_dask(X, key=key), emb, ref, n_epochs=epochs)
        X = check_array(flatten_input(X, getattr(self, "input_shape_", None)), what="X")
        check_n_features(X.shape[1], self.n_features_in_)
        emb = encode(self.encoder_, X, batch_size=batch_size)
        check_finite_output(emb)  # X is finite (check_array): so must its embedding be
        return emb if ref is None else refine_transform(X, emb, ref, n_epochs=epochs)

    def inverse_transform(self, Z: Any, *, batch_size: int | None = None):
        """Map embeddings back to input space with the decoder (umap-learn's name).

        Needs a model fitted with ``parametric_reconstruction=True`` (else
        :class:`NotFittedError` says so).

        Parameters
        ----------
        Z
            (n, n_components) embeddings: numpy (or anything numpy accepts), or a dask
            array.
        batch_size
            Rows per forward pass (default :func:`pumap_dask.encoder.forward_batch`).

        Returns
        -------
        numpy.ndarray or dask.array.Array
            (n, n_features), or (n, *dims) for a model fitted on n-D input, float32 in
            input units; a lazy dask array (one block per row block of ``Z``, nothing
            computed) for dask input.
        """
        self._check_fitted()
        check_transform_args(batch_size=batch_size)
        if getattr(self, "decoder_", None) is None:
            raise NotFittedError("inverse_transform needs a decoder: fit with "
                                 "parametric_reconstruction=True")

        return inverse_transform(Z, self.decoder_, self.n_components, batch_size=batch_size)

    # ------------------------------------------------------------------ export
    def export_onnx(self, path: str | os.PathLike, *, opset_version: int | None = None) -> str:
        """Export the frozen encoder to ONNX (see :mod:`pumap_dask.export`).

        The graph holds the encoder's fixed preprocessing (centring, PCA projection, scale)
        and the MLP, with a linear output layer and a dynamic batch dimension: input
        ``"X"`` (batch, n_features) float32, output ``"embedding"`` (batch, n_components).
        onnxruntime reproduces :meth:`transform` to float rounding (about 1e-6).

        Parameters
        ----------
        path
            The ``.onnx`` file to write.
        opset_version
            ONNX opset (None: torch's default).

        Returns
        -------
        str
            The absolute path written.

        Raises
        ------
        ImportError
            When the optional ``onnx`` package is missing (``pip install 'pumap_dask[onnx]'``).
        """
        self._check_fitted()

        meta = {"metric": getattr(self, "metric", "euclidean"),
                "n_neighbors": self.n_neighbors, "min_dist": self.min_dist}
        return export_encoder(self.encoder_, path, opset_version=opset_version, metadata=meta)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, include_embedding: bool = True,
             include_training_data: bool = False) -> str:
        """Save to a directory (JSON config + torch weights, no pickle); returns the path.

        Parameters
        ----------
        path
            Target directory; an existing model there is replaced atomically (anything else
            there is refused).
        include_embedding
            Also store the training embedding (``embedding_``).
        include_training_data
            Also store the training rows the fit kept (``training_data.npy``, float32; a
            fixed sample of 200,000 rows above that), so that the loaded model can
            ``transform(..., refine=True)``. Off by default: a model shared with others
            then carries no copy of the (often patient-derived) data it was fitted on.

        Returns
        -------
        str
            The absolute path of the model directory. Every file in it is checksummed, so
            :meth:`load` detects any later edit (see :mod:`pumap_dask.model`).
        """
        self._check_fitted()
        return save_estimator(path, self, include_embedding=include_embedding,
                                          include_training_data=include_training_data)

    @classmethod
    def load(cls, path: str | os.PathLike,
             networks: Mapping[str, Callable] | None = None) -> "ParametricUMAP":
        """Load a model saved by :meth:`save`.

        A model file is data: loading never imports or calls code it names. A model with a
        custom encoder or decoder records its factory's name; pass the factory itself,
        ``networks={"pkg.mod:make_encoder": make_encoder}`` (as Keras' ``custom_objects``),
        else :class:`~pumap_dask.ModelFileError` names the factory and how to pass it.

        Parameters
        ----------
        path
            The model directory.
        networks
            Factories of the model's custom networks, by the name it records.

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
        params, fitted = load_estimator_state(path, cls().get_params(), networks)
        params["hidden_layers"] = tuple(params.get("hidden_layers", DEFAULT_HIDDEN))
        m = cls(**params)
        m.__dict__.update(fitted)
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


def load(path: str | os.PathLike,
         networks: Mapping[str, Callable] | None = None) -> ParametricUMAP:
    """Load a model saved with :meth:`ParametricUMAP.save` (see there for ``networks``)."""
    return ParametricUMAP.load(path, networks)
