"""Training across processes: torch DDP on Dask workers, or under ``torchrun``/``srun``.

Every rank runs :func:`train_rank`: it joins the process group (Gloo on CPUs, NCCL when the
ranks have CUDA) with an explicit timeout, reads the training rows from the input (a Zarr
path every rank sees) and *its own* edge shards (shard ``i`` belongs to rank
``i % world_size``) from the edge store, and trains with
:func:`pumap_dask.train.train_encoder`, which under an initialised group wraps the MLP in
``DistributedDataParallel``. Each rank samples ``batch_size / world_size`` positive edges
per step in proportion to weight from its own RNG stream (seeded from the run's seed and
the rank), with negatives among its step's rows; DDP averages the gradients, so one step
equals a single-process step of ``batch_size`` edges at the same learning rate (the
learning-rate rule: the global batch is fixed, the rate is unchanged). Every rank runs the
same number of steps; for a fixed world size and seed the result is reproducible.

Launchers:

* :func:`train_on_dask`: one rank per worker of a sorted snapshot of the scheduler's
  workers; rank 0's host and a free port are chosen on rank 0's worker at run time; each
  rank is one task pinned to its worker with no retries. When a rank fails, the others
  fail at the group's timeout at the latest (at once when its process died: the broken
  connection is reported by Gloo/NCCL, and the lost worker by the scheduler, which the
  launcher watches), and the whole group is started again, after waiting for restarted
  workers to rejoin, from the last checkpoint when ``checkpoint_dir`` is set (bitwise the
  run an uninterrupted one would have been), up to ``max_restarts`` times; then a
  RuntimeError names the last failure. A rerun with the same checkpoint directory resumes.
* ``python -m pumap_dask.distributed.ddp`` under ``torchrun --nproc-per-node N`` (or ``srun``, ranks
  from ``SLURM_PROCID``/``SLURM_NTASKS``): the same :func:`train_rank`, ranks from the
  environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import dask
import numpy as np
import torch
import torch.distributed as dist

from ..arrays import reuses_freed_memory
from ..encoder import Encoder
from ..errors import ParameterError, RankLostError
from ..inputs import open_input
from ..progress import EpochReport, EpochWatch, Progress, track
from ..train import TrainConfig, build_encoder, find_ab_params, train_encoder
from ..transform import limit_threads_to_worker
from .cluster import kill_threshold, worker_memory_limit
from .edges import EdgeStore
from .rowcache import drop as drop_row_cache
from .rowcache import node_rows

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
# Seconds a group restart waits for killed workers to be back (restarted by their nanny).
RESTART_WAIT_S = 60.0
# Rank 0's epoch report, in the work directory (beside the edge store; see progress.EpochReport)
PROGRESS_FILE = "train_progress.json"


def own_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The edge shards rank ``rank`` trains on: a pure function of its arguments."""
    return [i for i in range(n_shards) if i % world_size == rank]


def _read_own_edges(edge_dir: str, rank: int, world_size: int):
    store = EdgeStore(edge_dir)
    mine = own_shards(len(store), rank, world_size)
    if not mine:
        raise ParameterError(f"the edge store has {len(store)} shards, fewer than the "
                             f"{world_size} training ranks; use at most {len(store)} ranks")
    # the heads as row pointers: neighbourhood batches need no id per edge (4 bytes each)
    return store.read_compact(mine, pointers=True)


@reuses_freed_memory
def train_rank(source: Any, key: str | None, edge_dir: str, cfg: Any,
               init: tuple[np.ndarray, np.ndarray] | None, rank: int, world_size: int,
               init_method: str, timeout_s: float = DEFAULT_TIMEOUT_S,
               threads: int | None = None,
               progress: Callable[[int, float], Any] | None = None) -> dict | None:
    """One rank of a DDP training run (runs in a Dask task or a torchrun process).

    Parameters
    ----------
    source, key
        The training input, as :func:`pumap_dask.inputs.open_input` takes it: a path every
        rank can read, a Zarr array or any dask array whose graph the workers can compute.
        When ``cfg.input_sha256`` is set the rows are read once per node into the node-local
        row cache (:func:`pumap_dask.distributed.rowcache.node_rows`) and every rank of the
        node maps that one copy; else each rank loads them.
    edge_dir
        The edge store directory (``work_dir/graph``) on a shared file system.
    cfg
        :class:`pumap_dask.train.TrainConfig`.
    init
        ``(rows, positions)`` of the initial layout, or None.
    rank, world_size, init_method
        Process-group membership (``init_method`` like ``tcp://host:port``).
    timeout_s
        Seconds a rank waits for the others (joining, and at every collective).
    threads
        Torch threads of this rank (one rank per host uses all the host's task threads);
        default: the worker's task threads.
    progress
        Called by rank 0 after each epoch as ``progress(epoch, loss)``
        (:class:`pumap_dask.progress.EpochReport`: the client's bar of epochs), and, where
        it has a ``within`` method, with the fraction of an epoch done during it.

    Returns
    -------
    dict or None
        On rank 0: ``{"state": bytes of the encoder's state_dict, "history": [...],
        "seconds": float, "start_epoch": int}`` (``start_epoch`` > 0 when training resumed
        from a checkpoint in ``cfg.checkpoint_dir``); None on the other ranks.
    """

    if threads:
        torch.set_num_threads(int(threads))
    else:
        limit_threads_to_worker()
    cuda = str(cfg.device) in ("auto",) or str(cfg.device).startswith("cuda")
    cuda = cuda and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        cfg = dataclasses.replace(cfg, device=f"cuda:{local}")
    else:
        cfg = dataclasses.replace(cfg, device="cpu")
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        t0 = time.perf_counter()
        # Each rank reads the rows itself, in this process: a compute on the cluster from
        # inside a rank's task would wait for workers whose only thread holds another rank
        # (and, after a restart, for keys of the failed attempt's lost tasks).
        with dask.config.set(scheduler="threads", num_workers=torch.get_num_threads()):
            handle = open_input(source, key)
            if cfg.input_sha256:  # one copy per node, mapped by every rank of it
                X = node_rows(handle.darr, {"rows": handle.n, "features": handle.d,
                                            "sha256": cfg.input_sha256})
            else:
                X = handle.load()
        head, tail, weight = _read_own_edges(edge_dir, rank, world_size)
        encoder = build_encoder(X.shape[1], cfg, X)  # identical on every rank
        used = threads or torch.get_num_threads()
        # the rank's threads given explicitly: torch's own count in a long-lived worker
        # process is whatever its earlier tasks' libraries left (a 10M fit trained on one)
        encoder, history = train_encoder(X, head, tail, weight, cfg, encoder,
                                         callback=progress if rank == 0 else None,
                                         init_embedding=init,
                                         threads=used,
                                         within_epoch=getattr(progress, "within", None)
                                         if rank == 0 else None,
                                         memory_limit=_worker_kill_threshold())
        if rank != 0:
            return None
        buf = io.BytesIO()
        torch.save(encoder.state_dict(), buf)
        return {"state": buf.getvalue(), "history": history,
                "seconds": time.perf_counter() - t0, "threads": int(used),
                "start_epoch": int(getattr(encoder, "start_epoch_", 0))}
    finally:
        dist.destroy_process_group()


def _worker_kill_threshold() -> int | None:
    """The bytes at which the Dask worker running this task would be killed (its memory
    limit times Dask's terminate fraction), or None (no limit, or not in a worker): the
    trainer keeps its mapped rows' pages under it."""
    return kill_threshold(worker_memory_limit())


def _free_port() -> tuple[str, int]:
    """This machine's address and a port free right now (asked for on rank 0's worker)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    host = socket.gethostname()
    try:
        host = socket.gethostbyname(host)
    except OSError:
        host = "127.0.0.1"
    return host, port


def eligible_workers(client) -> list[str]:
    """A sorted snapshot of the scheduler's worker addresses (one rank each).

    Asked of the scheduler each time: ``client.scheduler_info()`` returns a cache that the
    client's periodic refresh replaces with one holding no workers (distributed
    2026.8 at least), so it can read as an empty cluster.
    """
    info = client.sync(client.scheduler.identity, n_workers=-1)
    return sorted(info.get("workers", {}))


PLACEMENTS = ("worker", "host", "gpu")


def _hardware() -> dict:
    """This worker's CUDA device count (asked of the GPU placement only)."""
    return {"gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def rank_workers(client, placement: str = "worker") -> list[tuple[str, int | None]]:
    """The workers that hold one training rank each, and each rank's torch threads.

    ``"worker"``: every eligible worker (its own task threads). ``"host"``: one rank per
    host, on its first worker by address, using the task threads of all the host's
    workers (a CPU host trains fastest as one process with all its cores; DDP then runs
    across hosts). ``"gpu"``: every worker that sees a CUDA device (one rank per GPU, as
    ``dask-cuda`` starts one worker per GPU).
    """
    if placement not in PLACEMENTS:
        raise ParameterError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    info = client.sync(client.scheduler.identity, n_workers=-1).get("workers", {})
    addrs = sorted(info)
    if placement == "worker":
        return [(w, None) for w in addrs]
    if placement == "gpu":
        gpus = client.run(_hardware, workers=addrs) if addrs else {}
        return [(w, None) for w in addrs if gpus.get(w, {}).get("gpus", 0) > 0]
    hosts: dict[str, list[str]] = {}
    for w in addrs:
        hosts.setdefault(str(info[w].get("host", w)), []).append(w)
    return [(ws[0], sum(int(info[w].get("nthreads", 1)) for w in ws))
            for _, ws in sorted(hosts.items(), key=lambda kv: kv[1][0])]


def _await_ranks(client, futures: list, ranks: list[str], poll_s: float = 0.5,
                 on_poll: Callable[[], None] | None = None) -> dict:
    """Rank 0's result, watching every rank: a rank's error, or its worker leaving the
    cluster, fails the attempt at once (a worker's death makes Dask reschedule its task,
    which the pinning to a dead worker would leave waiting for ever). ``on_poll`` is called
    every ``poll_s`` seconds meanwhile (the bar of epochs)."""
    while True:
        alive = set(eligible_workers(client))
        lost = [f"rank {r} ({w})" for r, w in enumerate(ranks) if w not in alive]
        bad = [(r, f) for r, f in enumerate(futures) if f.status in ("error", "lost",
                                                                       "cancelled")]
        if lost:
            why = ""
            if bad and bad[0][1].status == "error":
                exc = bad[0][1].exception()
                why = f"; then rank {bad[0][0]} failed: {type(exc).__name__}: {exc}"[:600]
            raise RankLostError(f"the Dask worker of {', '.join(lost)} left the cluster during "
                           f"training (killed, out of memory, or lost){why}")
        if bad:
            r, f = bad[0]
            if f.status == "error":
                f.result()  # raises the rank's own exception
            raise RuntimeError(f"rank {r}'s task was {f.status} by the scheduler")
        if all(f.status == "finished" for f in futures):
            return futures[0].result()
        if on_poll is not None:
            on_poll()
        time.sleep(poll_s)


def _wait_for_workers(client, n: int, timeout_s: float) -> None:
    """Give restarted workers (a nanny restarts a killed one) up to ``timeout_s`` to join."""
    try:
        client.wait_for_workers(n, timeout=timeout_s)
    except (TimeoutError, OSError) as exc:
        logger.warning("%d of the %d training workers are back after %.0fs (%s)",
                       len(eligible_workers(client)), n, timeout_s, exc)


def train_on_dask(client, source: Any, key: str | None, edge_dir: str, cfg: Any,
                  init: tuple[np.ndarray, np.ndarray] | None = None, *,
                  world_size: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                  max_restarts: int = 2, rejoin_s: float = RESTART_WAIT_S,
                  placement: str = "worker"):
    """Train with one DDP rank per Dask worker; returns (encoder, history, world_size).

    Parameters
    ----------
    client
        A ``distributed.Client``.
    source, key, edge_dir, cfg, init
        As for :func:`train_rank`.
    world_size
        Ranks (default: one per placement slot, at most one per edge shard).
    placement
        Where ranks go (:func:`rank_workers`): ``"worker"`` (one per worker), ``"host"``
        (one per host, with all its task threads) or ``"gpu"`` (one per GPU worker).
    timeout_s
        Group timeout: a rank that never starts, or hangs, makes the others fail within
        it. A rank whose worker dies is noticed at once (Gloo/NCCL report the broken
        connection, and the scheduler the lost worker).
    max_restarts
        Times the whole group is started again after a failure (resuming from
        ``cfg.checkpoint_dir`` when set) before a RuntimeError naming the last failure is
        raised.
    rejoin_s
        Seconds a restart waits for the workers of the first attempt to be back (a
        nanny restarts a killed worker, under a new address); past it the group restarts
        on the workers there are (another world size: training starts over, since a
        checkpoint holds one RNG stream per rank).

    Returns
    -------
    encoder, history, world_size
        The trained encoder (CPU, eval mode), the loss per epoch (from the first epoch,
        also when resumed) and the number of ranks that finished it.
    """

    bar = track(cfg.n_epochs, "train")  # the train stage's bar counts epochs, not ranks
    try:
        return _train_attempts(client, source, key, edge_dir, cfg, init, world_size, timeout_s,
                               max_restarts, rejoin_s, placement, bar)
    finally:
        bar.close()
        try:  # rank 0's epoch report (a failed attempt's rank may still rewrite it: harmless)
            os.remove(_progress_path(edge_dir))
        except OSError:
            pass
        if cfg.input_sha256:  # the node-local row caches of this run (see rowcache)
            _drop_row_caches(client, source, key, cfg)


def _drop_row_caches(client, source: Any, key: str | None, cfg: Any) -> None:
    try:
        shape = open_input(source, key).darr.shape
        identity = {"rows": int(shape[0]), "features": int(shape[1]),
                    "sha256": cfg.input_sha256}
        client.run(drop_row_cache, identity)
    except Exception as exc:  # cleanup must not hide the training's own outcome
        logger.warning("could not remove the node-local row caches: %s", exc)


def _progress_path(edge_dir: str) -> str:
    """Where rank 0 reports its epochs: the work directory holding the edge store."""
    return os.path.join(os.path.dirname(os.path.abspath(edge_dir)), PROGRESS_FILE)


def _train_attempts(client, source, key, edge_dir, cfg, init, world_size, timeout_s,
                    max_restarts, rejoin_s, placement, bar: Progress):
    last_exc: BaseException | None = None
    target = None  # the workers of the first attempt: a restart waits for all of them
    for attempt in range(max_restarts + 1):
        if attempt and target:
            # every worker, not only the ranks': a rank of the "host" placement takes the
            # threads of its host's workers present (a 10M fit whose restarted rank started
            # before the host's other worker was back trained on one thread of two)
            _wait_for_workers(client, target, rejoin_s)
        slots = rank_workers(client, placement)
        world = min(world_size or len(slots), len(slots), len(EdgeStore(edge_dir)))
        if world < 1:
            raise RuntimeError(f"no Dask workers to train on (placement {placement!r})")
        target = target or len(eligible_workers(client))
        ranks = [w for w, _ in slots[:world]]
        threads = [t for _, t in slots[:world]]
        host, port = client.run(_free_port, workers=[ranks[0]])[ranks[0]]
        init_method = f"tcp://{host}:{port}"
        run = uuid.uuid4().hex[:8]
        report = EpochReport(_progress_path(edge_dir), run, cfg.n_epochs)
        logger.info("DDP training on %d ranks (%s), attempt %d of %d", world, init_method,
                    attempt + 1, max_restarts + 1)
        futures = [client.submit(train_rank, source, key, edge_dir, cfg, init, r, world,
                                 init_method, timeout_s, threads[r], progress=report,
                                 workers=[w],
                                 allow_other_workers=False, retries=0, pure=False,
                                 key=f"pumap-ddp-{run}-rank{r}")
                   for r, w in enumerate(ranks)]
        try:
            out = _await_ranks(client, futures, ranks, on_poll=EpochWatch(report, bar).poll)
        except Exception as exc:  # a rank failed or its worker died: restart the group
            last_exc = exc
            client.cancel(futures)
            logger.warning("DDP attempt %d of %d failed (%s: %s)%s", attempt + 1,
                           max_restarts + 1, type(exc).__name__, exc,
                           "; restarting all ranks" + (" from the last checkpoint"
                                                       if cfg.checkpoint_dir else "")
                           if attempt < max_restarts else "")
            continue
        if out.get("start_epoch"):
            logger.info("DDP training resumed from the checkpoint in %s after epoch %d",
                        cfg.checkpoint_dir, out["start_epoch"])
        logger.info("DDP training done in %.0fs on %d rank(s), rank 0 with %d thread(s)",
                    out["seconds"], world, out.get("threads", 0))
        if out["history"]:  # the last epoch (rank 0 may end before the bar's next poll)
            bar.update(len(out["history"]), postfix=f"loss {out['history'][-1]:.4f}")
        state = torch.load(io.BytesIO(out["state"]), weights_only=True)
        enc = Encoder(int(state["center"].shape[0]), cfg.n_components, cfg.hidden_layers,
                      cfg.n_projection, cfg.activation)
        enc.load_state_dict(state)
        enc.start_epoch_ = int(out.get("start_epoch", 0))
        return enc.eval(), out["history"], world
    raise RuntimeError(
        f"DDP training failed after {max_restarts + 1} attempt(s) (max_restarts="
        f"{max_restarts}); last error: {type(last_exc).__name__}: {last_exc}"
        + (f"; a rerun with the same checkpoint directory ({cfg.checkpoint_dir}) resumes "
           "from the last finished epoch" if cfg.checkpoint_dir else "")) from last_exc


# --------------------------------------------------------------------------- torchrun
def env_ranks() -> tuple[int, int]:
    """(rank, world size) from torchrun (RANK/WORLD_SIZE) or SLURM (SLURM_PROCID/NTASKS)."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    raise RuntimeError("no rank in the environment: run under torchrun (RANK, WORLD_SIZE) "
                       "or srun (SLURM_PROCID, SLURM_NTASKS)")


def main(argv: list[str] | None = None) -> int:
    """``python -m pumap_dask.distributed.ddp INPUT WORK_DIR OUT`` under torchrun/srun.

    Trains on the edge store a fit left in ``WORK_DIR/graph`` and writes the encoder's
    state_dict to ``OUT`` (rank 0).
    """

    ap = argparse.ArgumentParser(prog="python -m pumap_dask.distributed.ddp")
    ap.add_argument("input", help="training Zarr array / AnnData store (every rank reads it)")
    ap.add_argument("work_dir", help="work_dir of a fit (its graph/ holds the edge shards)")
    ap.add_argument("out", help="where rank 0 writes the encoder state_dict (.pt)")
    ap.add_argument("--key", default=None)
    ap.add_argument("--n-epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--min-dist", type=float, default=0.1)
    ap.add_argument("--random-state", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="bf16: autocast the network's forward pass on CUDA")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rank, world = env_ranks()
    if "MASTER_ADDR" in os.environ:
        init_method = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', 29500)}"
    else:  # srun without torchrun: a port derived from the job id, as Lightning does
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        host = os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
        init_method = f"tcp://{host}:{15000 + job % 20000}"
    a, b = find_ab_params(1.0, args.min_dist)
    cfg = TrainConfig(n_epochs=args.n_epochs, batch_size=args.batch_size, a=a, b=b,
                      random_state=args.random_state, device=args.device,
                      precision=args.precision,
                      checkpoint_dir=os.path.join(args.work_dir, "train-ddp"))
    out = train_rank(args.input, args.key, os.path.join(args.work_dir, "graph"), cfg, None,
                     rank, world, init_method, args.timeout)
    if out is not None:
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(out["state"])
        os.replace(tmp, args.out)
        logger.info("rank 0 wrote %s (%.1fs)", args.out, out["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
