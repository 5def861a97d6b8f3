"""Training stage: the loop that trains an encoder with the UMAP loss, in torch.

The network is :mod:`pumap_dask.encoder`'s; checkpoints are :mod:`pumap_dask.checkpoint`'s,
the DDP collectives :mod:`pumap_dask.collectives`', callbacks :mod:`pumap_dask.callbacks`'.

Positive edges are drawn in proportion to their weight on the fly (inverse-CDF sampling on
the cumulative weights), so memory is bounded by the graph, never by epochs x edges.
Negatives are uniform vertices: a pool of ``negative_pool`` vertices per step, each head
paired with ``negative_sample_rate`` of them. Every distinct point of a step is encoded
once (heads, tails and negatives share one forward pass). Neighbourhood steps on a CPU come
:data:`REPLICAS` at a time from replicas of the network on as many threads
(:mod:`pumap_dask.replicas`). On the CPU a fixed ``random_state`` gives bitwise the same
encoder from run to run at any thread count (see :mod:`pumap_dask.losses`).
"""

from __future__ import annotations

import logging
import math
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import psutil
import torch
from scipy.optimize import curve_fit
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .arrays import as_tensor, is_cupy
from .checkpoint import Checkpoint, run_fingerprint, state_digest
from .collectives import all_sum, rank_and_world
from .encoder import Encoder
from .errors import ParameterError, TrainingError
from .landmarks import LandmarkTerm
from .losses import gather_rows as _gather_rows, pair_loss, pair_loss_torch, umap_loss
from .batches import NeighbourhoodSampler
from .params import BATCHINGS, NEGATIVE_MODES, PRECISIONS
from .replicas import ReplicaSteps, can_replicate

logger = logging.getLogger(__name__)


def find_ab_params(spread: float = 1.0, min_dist: float = 0.1) -> tuple[float, float]:
    """Fit UMAP's a, b so that 1/(1 + a x^(2b)) follows the min_dist/spread target curve."""

    if spread <= 0 or min_dist < 0 or min_dist > spread:
        raise ParameterError(f"need spread > 0 and 0 <= min_dist <= spread; got spread={spread}, "
                             f"min_dist={min_dist}")

    def curve(x, a, b):
        return 1.0 / (1.0 + a * x ** (2 * b))

    xv = np.linspace(0, spread * 3, 300)
    yv = np.where(xv < min_dist, 1.0, np.exp(-(xv - min_dist) / spread))
    (a, b), _ = curve_fit(curve, xv, yv)
    return float(a), float(b)


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_encoder` (names as on the estimator).

    Beyond the estimator's parameters: ``negative_pool`` (uniform vertices drawn per step
    that the negatives come from; default ``batch_size``), ``lr_schedule`` ("linear" decay
    to 0, "cosine" or "constant"), ``init_steps`` (steps of pre-training on the initial
    layout), ``num_threads`` (torch threads; None picks by step size), ``weight_decay``
    (AdamW) and ``virtual_rate`` (virtual points on edges per positive edge; see
    :func:`_virtual_point_loss`), ``log_every`` (epochs between log lines; 0: none),
    ``negatives`` (see :data:`NEGATIVE_MODES`), ``checkpoint_dir`` and ``checkpoint_every``
    (epochs between checkpoints; see :class:`Checkpoint`), ``precision`` (see
    :data:`PRECISIONS`: ``"bf16"`` runs the network's forward pass under
    ``torch.autocast("cuda", dtype=torch.bfloat16)`` on CUDA, its last layer and the loss
    in float32; on the CPU it falls back to float32 with a warning).
    """

    n_components: int = 2
    hidden_layers: tuple = (128, 64, 32)
    n_projection: int = 0
    activation: str = "silu"
    learning_rate: float = 1e-2
    n_epochs: int = 100
    batch_size: int = 4096
    negative_sample_rate: int = 5
    negative_pool: int | None = None
    correlation_weight: float = 0.0
    a: float = 1.577
    b: float = 0.895
    lr_schedule: str = "linear"
    random_state: int | None = 42
    device: str = "cpu"
    log_every: int = 0
    init_steps: int = 200
    num_threads: int | None = None
    weight_decay: float = 0.0
    virtual_rate: float = 0.0
    negatives: str = "batch"
    batching: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    precision: str = "fp32"
    # the training rows' content (pumap_dask.inputs.InputHandle.identity): part of the
    # checkpoint fingerprint, so a checkpoint of other data is never resumed
    input_sha256: str | None = None


# Training precisions: "fp32", or "bf16" autocast of the network on CUDA.
# Default training budget (see default_epochs), in positive-edge samples (steps x batch),
# so it is the same at any batch size. From benchmarks/train_budget.py on cell-like data
# (RESULTS.md): held-out accuracy saturates near 10 epochs (about 200 positive samples per
# row) at 50k and 200k rows; small data needs a floor in samples, and large data a cap so
# time grows no faster than the kNN (the encoder generalises across rows, so per-row
# samples can fall as n grows: 900k training rows at the cap get 4 epochs). The floor and
# cap were 1,000 and 6,000 steps of 16,384 edges.
TARGET_SAMPLES = 1000 * 16384
MIN_EPOCHS = 10
MAX_SAMPLES = 6000 * 16384
# Neighbourhood batches encode about a tenth of the rows per positive sample and cost about
# a quarter of the time per sample on a CPU (benchmarks/RESULTS.md, issue 20), so their
# budget is this many times the samples: about the training time of the edge sampler's,
# and more local structure.
NEIGHBOURHOOD_SAMPLES = 4
# The cap, though, only doubles: it binds above about 240k rows (40 epochs of ~4.9M edges),
# where no curve was measured, and there it keeps the training time near half the edge
# sampler's at its cap instead of growing 4x with n (1M rows: ~200M samples).
NEIGHBOURHOOD_CAP = 2
# Where the default budget passes fewer than FEW_EPOCHS times over the graph (its cap
# binding: from about 3M rows of a k=15 graph), a fit names the sample (``fit_rows``) the
# same budget would pass over SAMPLE_EPOCHS times. At 10M rows one pass over every row gave
# held-out accuracy 0.571 in a 33-minute fit, 8 passes over a 1M-row sample 0.618 in 9
# minutes (benchmarks/RESULTS.md, issue 18); quality follows the passes, not the rows.
FEW_EPOCHS = 4
SAMPLE_EPOCHS = 8
# ``batching="auto"`` uses neighbourhoods from this many batches' worth of rows (4 x 4,096
# = 16,384 rows by default); below it an edge step's rows are most of the data.
NEIGHBOURHOOD_MIN_ROWS = 4


def default_epochs(n_edges: int, batch_size: int, batching: str = "edges") -> int:
    """Epochs (passes over the edges) when the user gives none.

    At least :data:`MIN_EPOCHS` epochs and :data:`TARGET_SAMPLES` positive-edge samples,
    but no more epochs than fit in :data:`MAX_SAMPLES` samples (and at least one). An epoch
    is ``ceil(n_edges / batch_size)`` steps of ``batch_size`` samples, so the budget in
    samples is the same at any batch size (smaller batches: more, cheaper steps).
    Neighbourhood batches (``batching="neighbourhoods"``) make a sample about 4x cheaper
    and get :data:`NEIGHBOURHOOD_SAMPLES` times the floor and target, and
    :data:`NEIGHBOURHOOD_CAP` times the cap.
    """
    scale = NEIGHBOURHOOD_SAMPLES if batching == "neighbourhoods" else 1
    per_epoch = -(-n_edges // max(1, batch_size)) * max(1, batch_size)
    epochs = max(MIN_EPOCHS * scale, -(-TARGET_SAMPLES * scale // per_epoch))
    return max(1, min(epochs, max_samples(batching) // per_epoch))


def max_samples(batching: str) -> int:
    """The default budget's cap in positive-edge samples: :data:`MAX_SAMPLES`, times
    :data:`NEIGHBOURHOOD_CAP` for neighbourhood batches."""
    return MAX_SAMPLES * (NEIGHBOURHOOD_CAP if batching == "neighbourhoods" else 1)


def sample_for_epochs(n_rows: int, n_edges: int, batching: str,
                      epochs: int = SAMPLE_EPOCHS) -> int:
    """The rows of a sample whose graph (at ``n_edges / n_rows`` edges per row) the default
    budget's cap passes over ``epochs`` times: the ``fit_rows`` a fit whose budget passes
    over all rows' graph only a few times could use instead."""
    return int(max_samples(batching) * n_rows / (max(1, epochs) * max(1, n_edges)))


# Rows a neighbourhood batch encodes per positive edge, its negatives' pool included: about
# 0.1 + 0.1 on kNN graphs of k=15 (benchmarks/RESULTS.md, issue 20).
ROWS_PER_EDGE_NEIGHBOURHOODS = 0.2
# draw and gather the next neighbourhood batch on a second thread while a step trains
PREFETCH_BATCHES = True
# Neighbourhood steps on a CPU come REPLICAS at a time from replicas of the network, side by
# side on as many threads where there are (pumap_dask.replicas; the second is one optimiser
# step stale). A constant, not the machine's core count, so a seed gives the same encoder
# at any thread count (benchmarks/RESULTS.md, issue 20).
REPLICAS = 2
# the least seconds between two reports of progress within an epoch (train_encoder's
# ``within_epoch``)
STEP_PROGRESS_S = 1.0


def resolve_batching(batching: str, correlation_weight: float = 0.0,
                     virtual_rate: float = 0.0, n_rows: int | None = None,
                     batch_size: int | None = None) -> str:
    """The batching a fit trains with.

    ``"auto"`` is ``"neighbourhoods"`` unless a loss term needs the edge sampler's pairs
    (``correlation_weight``, ``virtual_rate``) or the data is small: below
    :data:`NEIGHBOURHOOD_MIN_ROWS` batches' worth of rows an edge step encodes most rows
    anyway, each once, and gains nothing from neighbourhoods.
    """
    if batching not in BATCHINGS:
        raise ParameterError(f"batching must be one of {BATCHINGS}, got {batching!r}")
    if batching != "auto":
        return batching
    if correlation_weight or virtual_rate:
        return "edges"
    if n_rows is not None and batch_size and n_rows < NEIGHBOURHOOD_MIN_ROWS * batch_size:
        return "edges"
    return "neighbourhoods"


def batching_of(cfg: "TrainConfig", n_rows: int | None = None) -> str:
    """:func:`resolve_batching` of a configuration."""
    return resolve_batching(cfg.batching, cfg.correlation_weight, cfg.virtual_rate, n_rows,
                            cfg.batch_size)


def check_finite_loss(loss: float, epoch: int, cfg: TrainConfig) -> None:
    """Stop a diverged fit: a non-finite epoch loss means NaN or infinite weights, and a
    model trained on would embed everything as NaN.

    Raises
    ------
    TrainingError
        Naming the epoch and ``learning_rate`` (the usual cause).
    """
    if not math.isfinite(loss):
        raise TrainingError(
            f"training diverged: the loss is {loss} after epoch {epoch + 1} of {cfg.n_epochs} "
            f"(learning_rate={cfg.learning_rate:g}); lower learning_rate (e.g. "
            f"{cfg.learning_rate / 10:g}) or check the input's scale")


def sample_edges(cum: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Edge ids drawn with probability proportional to weight (inverse CDF).

    Parameters
    ----------
    cum
        Cumulative weights (float64), as ``torch.cumsum(weight)``.
    size
        Number of edges to draw.
    gen
        The trainer's random generator.
    """
    r = torch.rand(size, generator=gen, dtype=torch.float64) * cum[-1]
    return torch.searchsorted(cum, r, right=True).clamp_(max=len(cum) - 1)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x - x.mean()
    y = y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12)


def _seed_everything_local(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
    return gen


# Mapped training rows (MappedRows) count in the process's resident memory once touched,
# and a Dask worker's memory limit counts all of it: at 10M rows the 2 GB of mapped rows
# took a training worker that had run the kNN over its 6 GiB limit. Above this share of the
# bytes at which the process would be killed (a Dask worker's limit times Dask's terminate
# fraction, 0.95 by default: distributed.cluster.kill_threshold) the mapping's pages are
# released: they stay in the page cache, and the next touch is a minor fault. A last resort,
# not a budget: while it releases, a gather of 1,300 random rows of a 10M-row mapping costs
# 7.2 ms instead of 1.1 ms (benchmarks/mapped_rows.py), as the kernel maps pages back 16 at
# a time around each fault. Checked before every gather, as they refill it that fast.
MAPPED_ROWS_RELEASE_AT = 0.95


class MappedRows:
    """Training rows kept in a memory-mapped array, preprocessed when gathered.

    Stands in for the preprocessed row tensor of the trainer (``rows[ids]`` with a tensor of
    row ids): the rows stay in the (node-shared) page cache and each step copies only the
    rows it encodes. The preprocessing is element-wise (centre, scale) or a fixed
    projection, so a row's result does not depend on which other rows it is gathered with
    (up to float rounding with a projection).

    With a ``memory_limit`` (bytes at which the process would be killed: a Dask worker's
    limit times its terminate fraction), the mapping's resident pages are released whenever
    the process holds more than :data:`MAPPED_ROWS_RELEASE_AT` of it (``releases`` counts
    them); the rows read are the same either way.
    """

    device = torch.device("cpu")

    def __init__(self, X: np.ndarray, encoder: Encoder, memory_limit: int | None = None) -> None:
        self.X = X
        self.encoder = encoder
        self.shape = X.shape
        self.memory_limit = int(memory_limit) if memory_limit else None
        self.releases = 0
        # numpy.memmap's own mapping (None for a view, or where madvise is not available)
        self._map = getattr(X, "_mmap", None) if hasattr(mmap, "MADV_DONTNEED") else None
        self._process = psutil.Process() if self.memory_limit and self._map is not None else None

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        if self._process is not None:
            self._keep_under_limit()
        rows = np.asarray(self.X[ids.cpu().numpy()], dtype=np.float32)
        with torch.no_grad():
            return self.encoder.preprocess(torch.from_numpy(rows))

    def _keep_under_limit(self) -> None:
        rss = self._process.memory_info().rss
        if rss <= MAPPED_ROWS_RELEASE_AT * self.memory_limit:
            return
        self._map.madvise(mmap.MADV_DONTNEED)
        self.releases += 1
        if self.releases == 1:
            logger.info("training rows: releasing the mapped rows' pages at %.2f GiB resident "
                        "(%.0f%% of the %.2f GiB at which the worker would be killed); they "
                        "stay in the page cache",
                        rss / 2**30, 100 * MAPPED_ROWS_RELEASE_AT, self.memory_limit / 2**30)


def build_encoder(n_features: int, cfg: TrainConfig, X: np.ndarray | None = None) -> Encoder:
    """A freshly initialised encoder, seeded without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.random_state if cfg.random_state is not None else torch.seed())
        enc = Encoder(n_features, cfg.n_components, cfg.hidden_layers, cfg.n_projection,
                      cfg.activation)
    if X is not None:
        enc.prepare(X, seed=cfg.random_state or 0)
    return enc


def train_encoder(
    X: np.ndarray,
    head: np.ndarray,
    tail: np.ndarray,
    weight: np.ndarray,
    cfg: TrainConfig,
    encoder: Encoder | None = None,
    callback: Callable[[int, float], bool | None] | None = None,
    init_embedding: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None,
    landmarks: Any = None,
    from_model: bool = False,
    reconstruction: Any = None,
    threads: int | None = None,
    within_epoch: Callable[[float], None] | None = None,
    memory_limit: int | None = None,
) -> tuple[Encoder, list[float]]:
    """Train an encoder with the UMAP loss on a weighted edge list.

    Parameters
    ----------
    X
        Training data (n, d), float32, in memory.
    head, tail, weight
        Edge list of the symmetric fuzzy graph (each undirected edge appears in both
        directions, as in a symmetric sparse matrix). ``head`` may be a
        :class:`pumap_dask.batches.SortedHeads` (edges sorted by head, as row pointers).
    cfg
        Hyper-parameters.
    encoder
        Start from this encoder (default: a new one built from ``cfg``).
    callback
        Called as ``callback(epoch, mean_loss)`` after each epoch; returning True stops
        training after that epoch. Under DDP the return value of rank 0 decides, and every
        rank stops after the same epoch.
    init_embedding
        Layout the encoder is pre-trained to reproduce first: (n, n_components) for every
        row, or ``(rows, positions)`` for some rows (landmarks). None: no pre-training.
    landmarks
        :class:`pumap_dask.continued.Landmarks`: rows pinned to positions by an added loss
        term (see :mod:`pumap_dask.continued`), or None. Not supported under DDP.
    from_model
        ``encoder`` holds trained weights to continue from (continued training): the
        pre-training on ``init_embedding`` is skipped, and a checkpoint resumes only when
        it started from the same weights.
    reconstruction
        A :class:`pumap_dask.networks.ReconstructionTerm`: its decoder is trained jointly
        (its weighted loss on each step's head rows is added to the step's loss, so the
        history holds the total) and its loss per epoch is kept in its ``history``. None:
        no decoder. Not supported under DDP.
    threads
        Threads training may use (a DDP rank's share of its host); default
        ``cfg.num_threads``, else torch's. Not part of the result, which is the same on any
        number of threads.
    within_epoch
        Called during an epoch, at most every :data:`STEP_PROGRESS_S` seconds, with the
        epochs done so far as a fraction (``2.37``: a third of the way through the third),
        for progress bars: a fit of 10M rows trains one epoch of several minutes. Under
        DDP, pass it to rank 0 only.
    memory_limit
        Bytes at which this process would be killed (a Dask worker's limit times Dask's
        terminate fraction), or None. Memory-mapped rows (:class:`MappedRows`) release
        their pages when the process nears it.

    Returns
    -------
    encoder, history
        The trained encoder (on the CPU, eval mode) and the mean loss per epoch run.
    """
    before = torch.get_num_threads()
    available = int(cfg.num_threads or threads or before)
    try:
        per_step = _step_threads(cfg, X.shape[0], X.shape[1], available)
        torch.set_num_threads(per_step)
        # replicas step side by side only where a step keeps to one thread
        side_threads = available if per_step == 1 else 1
        return _train(X, head, tail, weight, cfg, encoder, callback, init_embedding,
                      landmarks, from_model, reconstruction, side_threads, within_epoch,
                      memory_limit)
    finally:
        torch.set_num_threads(before)


def _step_threads(cfg: TrainConfig, n: int, d: int, available: int) -> int:
    """Torch threads of one training step, of the ``available`` ones.

    Small steps are dominated by per-op overhead, where a second thread costs more than it
    gives, and an oversubscribed machine (Dask workers beside us) makes extra threads spin:
    measured 10x slower at batch 128 with two threads on a loaded 2-core machine. Their
    other threads run the replicas' steps side by side (:data:`REPLICAS`).
    """
    # rows encoded per step: both ends of each edge and a pool, or a neighbourhood batch's
    per_edge = (ROWS_PER_EDGE_NEIGHBOURHOODS if batching_of(cfg, n) == "neighbourhoods"
                else 2 + 1)
    rows = min(n, int(per_edge * cfg.batch_size))
    width = cfg.n_projection or d
    flops = rows * (width + sum(cfg.hidden_layers)) * max(cfg.hidden_layers or (1,))
    return available if flops > 1e8 else 1


def _train(X, head, tail, weight, cfg, encoder, callback, init_embedding, landmarks=None,
           from_model=False, reconstruction=None, side_threads=1, within_epoch=None,
           memory_limit=None):
    device = torch.device(cfg.device)
    n = X.shape[0]
    if cfg.precision not in PRECISIONS:
        raise ParameterError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if encoder is None:
        encoder = build_encoder(X.shape[1], cfg, X)
    encoder = encoder.to(device).train()
    if reconstruction is not None:
        reconstruction.to(device)
    # The fixed preprocessing (centre, project, scale) is applied once here, not per step:
    # training runs the MLP alone on the preprocessed rows. CuPy rows stay on their GPU
    # (DLPack); they are kept there when they fit, as host rows are moved there.
    on_gpu = is_cupy(X) and device.type == "cuda"
    if isinstance(X, np.memmap) and device.type == "cpu":
        # rows shared by the ranks of a node (pumap_dask.distributed.rowcache): gathered
        # and preprocessed per step, never copied whole into this process
        Xt = MappedRows(X, encoder, memory_limit)
    else:
        with torch.no_grad():
            parts = (encoder.preprocess(as_tensor(X[i:i + 65536], device))
                     for i in range(0, n, 65536))
            Xt = torch.cat([p if on_gpu else p.cpu() for p in parts])
        if device.type != "cpu" and Xt.device.type == "cpu" and Xt.numel() * 4 < (2 << 30):
            Xt = Xt.to(device)
    net = _amp_net(encoder.mlp, cfg.precision, device)
    rank, world = rank_and_world()
    n_edges_total = int(all_sum(len(head), world, torch.int64))  # each rank holds a subset
    use_hood = batching_of(cfg, n) == "neighbourhoods"
    head_t = tail_t = cum = None  # the edge sampler's arrays: neighbourhoods keep their own
    if not use_hood:
        # ids stay in their (often int32) dtype: 4 bytes per edge end, widened per batch
        head_t = torch.as_tensor(np.asarray(head))
        tail_t = torch.as_tensor(np.asarray(tail))
        cum = torch.cumsum(torch.as_tensor(weight, dtype=torch.float64), 0)
    gen = _seed_everything_local(cfg.random_state)

    B = int(min(cfg.batch_size, n_edges_total))
    R = int(cfg.negative_sample_rate)
    M = int(cfg.negative_pool or B)
    in_batch = cfg.negatives == "batch"
    if cfg.negatives not in NEGATIVE_MODES:
        raise ParameterError(f"negatives must be one of {NEGATIVE_MODES}, got {cfg.negatives!r}")
    dedupe = (2 if in_batch else 3) * B > n // 2
    # every rank runs the same number of steps; an epoch is one pass over all ranks' edges
    steps_per_epoch = max(1, math.ceil(n_edges_total / B))
    total_steps = cfg.n_epochs * steps_per_epoch
    trained = list(encoder.parameters())
    if reconstruction is not None:  # the decoder learns with the encoder, one optimiser
        trained += list(reconstruction.parameters())
    opt = torch.optim.AdamW(trained, lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay, **_adam_kwargs(device))
    if cfg.lr_schedule == "linear":
        sched = LinearDecay(opt, total_steps)
    elif cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
    elif cfg.lr_schedule == "constant":
        sched = None
    else:
        raise ParameterError(f"lr_schedule must be 'linear', 'cosine' or 'constant', "
                             f"got {cfg.lr_schedule!r}")
    if landmarks is not None and world > 1:
        raise ParameterError("landmarks are not supported with DDP training (world size "
                             f"{world}); train in one process (train_world_size=1)")
    # replicas: neighbourhood steps of the plain loss in one CPU process
    replicas = REPLICAS if (use_hood and world == 1 and device.type == "cpu"
                            and landmarks is None and reconstruction is None
                            and can_replicate(net)) else 1
    extra = None  # continued training and landmarks: a checkpoint must match them too
    if cfg.checkpoint_dir is not None and (from_model or landmarks is not None):
        extra = {"start": state_digest(encoder) if from_model else None,
                 "landmarks": landmarks.digest() if landmarks is not None else None}
    if replicas > 1:  # the steps' order, and so the result, depends on it
        extra = dict(extra or {}, replicas=replicas)
    saved: nn.Module = encoder  # what a checkpoint holds: with the decoder when one trains
    if reconstruction is not None:
        if world > 1:
            raise ParameterError("parametric_reconstruction is not supported with DDP training "
                                 f"(world size {world}); train in one process "
                                 "(train_world_size=1)")
        extra = dict(extra or {}, reconstruction=reconstruction.fingerprint())
        saved = nn.ModuleDict({"encoder": encoder, "decoder": reconstruction.decoder})
    ckpt = Checkpoint(cfg.checkpoint_dir,
                      run_fingerprint(cfg, n, X.shape[1], n_edges_total,
                                   all_sum(float(np.asarray(weight).sum(dtype=np.float64)),
                                            world), world, extra))
    start, history = ckpt.restore(saved, opt, sched, gen, rank) if ckpt.enabled else (0, [])
    encoder.start_epoch_ = start  # where this call began (> 0: resumed from a checkpoint)
    if start == 0 and init_embedding is not None and not from_model:
        pretrain_to_layout(net, Xt, init_embedding, cfg, gen)  # the same on every rank
    if world > 1:
        # Each rank samples B / world of the global batch from its own edges with its own
        # RNG stream (seed, rank); DDP averages the gradients, so a step equals a
        # single-process step of batch B at the same learning rate.

        net = DistributedDataParallel(net)
        B = max(1, B // world)
        if start == 0:
            gen = _seed_everything_local(None if cfg.random_state is None
                                         else cfg.random_state * 7919 + rank + 1)
    a, b = cfg.a, cfg.b
    lm_term = None
    if landmarks is not None and len(landmarks):
        lm_term = LandmarkTerm(landmarks, B, device)
    hood = NeighbourhoodSampler(head, tail, weight, n, B) if use_hood else None
    if hood is not None:
        logger.info("training on neighbourhood batches: %d seed rows per step for about %d "
                    "positive edges%s", hood.seeds, B,
                    f", {replicas} replicas on {min(replicas, side_threads)} thread(s)"
                    if replicas > 1 else "")
    side = None
    if replicas > 1:
        def step_loss(replica, sampler, g):
            batch = _hood_batch(Xt, sampler, R, g, device, cfg.negative_pool)
            return _neighbourhood_loss(replica, batch, a, b)[0]

        side = ReplicaSteps(net, hood, step_loss, replicas, side_threads)
    # the next neighbourhood batch is drawn and gathered on a second thread while this one
    # trains (the draw and the gather were a fifth of a step, on a core the step leaves
    # idle); only within an epoch, so the random stream at each checkpoint is unchanged.
    # Landmark terms draw from the same stream after each batch: no prefetch with them.
    ahead = hood is not None and lm_term is None and PREFETCH_BATCHES and side is None
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="pumap-batches") if ahead else None
    t0 = time.perf_counter()
    try:
        for epoch in range(start, cfg.n_epochs):
            ep_loss = 0.0
            coming = None  # the plain steps' batch drawn ahead
            tick = _StepTicker(within_epoch, epoch, steps_per_epoch)
            if side is not None:
                ep_loss = _side_by_side_epoch(side, steps_per_epoch, opt, sched, gen, tick)
            else:
                for step in range(steps_per_epoch):
                    if hood is not None:
                        batch = (coming.result() if coming is not None else
                                 _hood_batch(Xt, hood, R, gen, device, cfg.negative_pool))
                        coming = (prefetch.submit(_hood_batch, Xt, hood, R, gen, device,
                                                  cfg.negative_pool)
                                  if prefetch is not None and step + 1 < steps_per_epoch else None)
                        loss, rows, emb = _neighbourhood_loss(net, batch, a, b)
                    else:
                        loss, rows, emb = _edge_loss(net, Xt, cum, head_t, tail_t, B, R, M, n, a,
                                                     b, in_batch, dedupe, cfg, gen, device)
                    if lm_term is not None:  # landmark rows drawn last: no landmarks, same stream
                        loss = loss + lm_term(net, Xt, gen)
                    if reconstruction is not None:  # decode the step's encoded rows to raw rows
                        loss = loss + reconstruction(rows, emb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    ep_loss += float(loss.detach())
                    tick(step + 1)
            history.append(ep_loss / steps_per_epoch)
            check_finite_loss(history[-1], epoch, cfg)
            if reconstruction is not None:
                reconstruction.end_epoch()
            stop = bool(callback(epoch, history[-1])) if callback is not None else False
            if world > 1:  # rank 0 decides; every rank stops after the same epoch
                stop = all_sum(float(stop and rank == 0), world) > 0
            if cfg.log_every and (epoch + 1) % cfg.log_every == 0:
                logger.info("epoch %d/%d loss %.4f (%.1fs)", epoch + 1, cfg.n_epochs,
                            history[-1], time.perf_counter() - t0)
            if ckpt.enabled and ((epoch + 1) % cfg.checkpoint_every == 0
                                 or epoch + 1 == cfg.n_epochs or stop):
                ckpt.save(epoch + 1, saved, opt, sched, gen, history, rank, world)
            if stop:
                logger.info("training stopped by a callback after epoch %d of %d", epoch + 1,
                            cfg.n_epochs)
                break
    finally:
        if prefetch is not None:
            prefetch.shutdown(cancel_futures=True)
        if side is not None:
            side.close()
    if reconstruction is not None:
        reconstruction.decoder.cpu().eval()
    return encoder.cpu().eval(), history


class LinearDecay:
    """The learning rate decayed linearly to 0 over ``total`` steps.

    The same rates, bitwise, and the same checkpoint state (``base_lrs``, ``last_epoch``) as
    ``LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))``, whose ``step`` costs about
    250 us on a CPU (as much as the fused optimiser step itself, a twentieth of a training
    step); this one sets the rates directly.
    """

    def __init__(self, opt: torch.optim.Optimizer, total: int) -> None:
        self.opt = opt
        self.total = max(1, int(total))
        self.base_lrs = [group["lr"] for group in opt.param_groups]
        self.last_epoch = 0  # steps taken (LambdaLR's name, kept for its checkpoints)

    def step(self) -> None:
        """After an optimiser step: the rate of the next."""
        self.last_epoch += 1
        factor = max(0.0, 1.0 - self.last_epoch / self.total)
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.last_epoch = int(state["last_epoch"])


class _StepTicker:
    """Reports an epoch's progress to ``report`` (the trainer's ``within_epoch``) as
    fractional epochs, at most every :data:`STEP_PROGRESS_S` seconds; a no-op without one."""

    def __init__(self, report: Callable[[float], None] | None, epoch: int, steps: int) -> None:
        self.report, self.epoch, self.steps = report, epoch, max(1, steps)
        self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        if self.report is None or done >= self.steps:
            return  # the epoch's end is the per-epoch callback's
        now = time.monotonic()
        if now - self.last >= STEP_PROGRESS_S:
            self.last = now
            self.report(round(self.epoch + done / self.steps, 2))


def _side_by_side_epoch(side: ReplicaSteps, steps: int, opt: torch.optim.Optimizer,
                        sched: Any, gen: torch.Generator, tick: "_StepTicker") -> float:
    """One epoch of ``steps`` optimiser steps whose gradients come ``len(side)`` at a time
    from the replicas (:mod:`pumap_dask.replicas`); returns the summed loss."""
    side.start_epoch(gen)
    total = 0.0
    for first in range(0, steps, len(side)):
        for loss, grads in side.round(min(len(side), steps - first)):
            for p, g in zip(side.params, grads):
                p.grad = g
            opt.step()
            if sched is not None:
                sched.step()
            total += loss
        tick(min(steps, first + len(side)))
    return total


class _AmpNet(nn.Module):
    """The MLP with its hidden layers under bf16 autocast and its last layer in float32.

    The hidden layers' matrix products are where bf16 pays; the last layer, a few columns
    wide, stays float32 so embedding coordinates keep float32 resolution (bf16 rounds a
    coordinate near 10 to steps of 0.06, coarser than ``min_dist``). Parameters are the
    MLP's own (shared), so the encoder's state is unchanged.
    """

    def __init__(self, mlp: nn.Sequential, device_type: str) -> None:
        super().__init__()
        self.body = mlp[:-1]
        self.head = mlp[-1]
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            h = self.body(x)
        return self.head(h.float())


class _AutocastNet(nn.Module):
    """A custom network under bf16 autocast, its output cast back to float32."""

    def __init__(self, net: nn.Module, device_type: str) -> None:
        super().__init__()
        self.net = net
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.net(x)
        return out.float()


def _amp_net(mlp: nn.Sequential, precision: str, device: torch.device) -> nn.Module:
    """``mlp`` itself for float32, or wrapped for bf16 autocast on CUDA (see :class:`_AmpNet`)."""
    if precision != "bf16":
        return mlp
    if not isinstance(mlp, nn.Sequential):  # a custom network: autocast as a whole
        return _AutocastNet(mlp, device.type) if device.type == "cuda" else mlp
    if device.type != "cuda":
        logger.warning("precision='bf16' autocasts on CUDA only; training on %s in float32",
                       device)
        return mlp
    return _AmpNet(mlp, device.type)


def _edge_loss(net, Xt, cum, head_t, tail_t, B, R, M, n, a, b, in_batch, dedupe, cfg, gen,
               device):
    """UMAP loss of one edge batch: ``B`` positive edges drawn in proportion to their
    weight, both ends encoded, ``R`` negatives each (see ``TrainConfig.negatives``).

    Returns the loss, the encoded rows' ids and their embeddings (for the decoder).
    """
    e = sample_edges(cum, B, gen)
    h, t = head_t[e].long(), tail_t[e].long()
    if in_batch:
        # negatives among the step's own heads and tails: 2B rows encoded, not 3B
        ids = torch.cat([h, t])
        pick = torch.randint(2 * B, (B, R), generator=gen)
    else:
        pool = torch.randint(n, (M,), generator=gen)
        ids = torch.cat([h, t, pool])
        pick = torch.randint(M, (B, R), generator=gen) + 2 * B
    if dedupe:
        # small n: many repeated rows per step, so encode each distinct row once
        uniq, inv = torch.unique(ids, return_inverse=True)
        xb = Xt[uniq.to(Xt.device)].to(device, non_blocking=True)
        emb = net(xb)
        inv = inv.to(device)
    else:
        xb = Xt[ids.to(Xt.device)].to(device, non_blocking=True)
        emb = net(xb)
        inv = torch.arange(len(ids), device=device)
    ih, it, ineg = inv[:B], inv[B:2 * B], inv[pick.to(device)]
    if not (cfg.virtual_rate or cfg.correlation_weight):
        loss = pair_loss(emb, ih, it, ineg, None, a, b)
    else:  # the extra terms need the gathered rows and distances
        # Gathers with a deterministic backward: autograd's own backward of
        # ``emb[idx]`` (index_put_ with accumulate) is not, with several CPU threads.
        eh, et, en = _gather_rows(emb, ih), _gather_rows(emb, it), _gather_rows(emb, ineg)
        loss, d_pos, d_neg = pair_loss_torch(eh, et, en, None, a, b)
    if cfg.virtual_rate:
        loss = loss + _virtual_point_loss(net, xb, inv, eh, et, en, B, R, cfg, gen)
    if cfg.correlation_weight:
        x_h, x_t = xb[ih], xb[it]
        x_n = xb[ineg[:, 0]]
        dx = torch.cat([(x_h - x_t).norm(dim=1), (x_h - x_n).norm(dim=1)])
        de = torch.cat([d_pos.sqrt(), d_neg[:, 0].clamp_min(1e-12).sqrt()])
        loss = loss - cfg.correlation_weight * _pearson(dx, de)
    if dedupe:
        return loss, uniq, emb
    return loss, h, emb[:B]  # large n: the heads stand for the step's rows


def _hood_batch(Xt, hood: NeighbourhoodSampler, R: int, gen: torch.Generator,
                device: torch.device, pool: int | None) -> tuple:
    """One neighbourhood batch (:mod:`pumap_dask.batches`), drawn and gathered.

    Every positive edge among the batch's rows, weighted by its membership strength, each
    with ``R`` negatives drawn among ``pool`` extra rows drawn uniformly from all rows
    (None: as many as the batch has rows). The batch's own rows come from a few
    neighbourhoods, so negatives among them would repel each row from a few places only.

    Returns the rows' ids, their preprocessed inputs, and the edges' ends, negatives and
    weights on ``device``.
    """
    rows, h, t, w = hood.draw(gen)
    m = len(rows) if pool is None else int(pool)
    pick = torch.randint(m, (len(h), R), generator=gen) + len(rows)
    rows = torch.cat([rows, torch.randint(len(hood.slot), (m,), generator=gen)])
    ids = rows.to(Xt.device)
    # index_select: a third of advanced indexing's time for rows of a tensor on a CPU
    x = torch.index_select(Xt, 0, ids) if isinstance(Xt, torch.Tensor) else Xt[ids]
    x = x.to(device, non_blocking=True)
    return rows, x, h.to(device), t.to(device), pick.to(device), w.to(device)


def _neighbourhood_loss(net, batch: tuple, a: float, b: float):
    """UMAP loss of one neighbourhood batch (:func:`_hood_batch`).

    Returns the loss, the encoded rows' ids and their embeddings (for the decoder).
    """
    rows, x, h, t, pick, w = batch
    emb = net(x)
    return pair_loss(emb, h, t, pick, w, a, b), rows, emb


def _virtual_point_loss(encoder, xb, inv, eh, et, en, B, R, cfg, gen):
    """UMAP loss of virtual points drawn on sampled edges.

    A point ``v = (1 - t) x_i + t x_j`` on edge (i, j) is attracted to i with weight 1 - t and
    to j with weight t, and repelled from the edge's negatives. Training points alone leave
    the encoder free between them; virtual points teach it to place new data between its
    neighbours, as UMAP's own transform does.
    """
    V = max(1, int(B * cfg.virtual_rate))
    device = eh.device
    t = torch.rand(V, 1, generator=gen).to(device)
    xv = (1 - t) * xb[inv[:V]] + t * xb[inv[B:B + V]]
    ev = encoder(xv)
    d_i = (ev - eh[:V]).pow(2).sum(-1)
    d_j = (ev - et[:V]).pow(2).sum(-1)
    d_n = (ev.unsqueeze(1) - en[:V]).pow(2).sum(-1)
    t = t.squeeze(1)
    pos = (1 - t) * umap_loss(d_i, True, cfg.a, cfg.b) + t * umap_loss(d_j, True, cfg.a, cfg.b)
    return (pos.sum() + umap_loss(d_n, False, cfg.a, cfg.b).sum()) / (V * (1 + R))


def pretrain_to_layout(encoder: nn.Module, Xt: torch.Tensor, layout: Any,
                       cfg: TrainConfig, gen: torch.Generator) -> None:
    """Regress the encoder onto an initial layout (e.g. spectral) so UMAP training starts
    from the global arrangement rather than from a random function.

    ``layout`` is an (n, n_components) array for every row of ``Xt``, or a pair
    ``(rows, positions)`` giving positions for some rows only (landmarks).
    """
    device = next(encoder.parameters()).device
    if isinstance(layout, tuple):
        rows, positions = layout
        rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    else:
        positions, rows_t = layout, None
    target = torch.as_tensor(np.asarray(positions, dtype=np.float32))
    n = target.shape[0]
    B = min(n, 4096)
    opt = torch.optim.Adam(encoder.parameters(), lr=cfg.learning_rate, **_adam_kwargs(device))
    for _ in range(cfg.init_steps):
        idx = torch.randint(n, (B,), generator=gen)
        src = idx if rows_t is None else rows_t[idx]
        pred = encoder(Xt[src.to(Xt.device)].to(device))
        loss = (pred - target[idx].to(device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _adam_kwargs(device: torch.device) -> dict:
    """Fused Adam (one kernel for all parameters) where this torch supports it."""
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {}


