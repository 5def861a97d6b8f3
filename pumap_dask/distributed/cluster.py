"""Finding the Dask cluster a job runs on, the ways HPC sites start one.

- ``local``: a :class:`distributed.LocalCluster` (``workers``, ``threads``, ``memory``);
- ``threads``: no cluster, dask's threaded scheduler;
- a scheduler address (``tcp://host:8786``);
- ``scheduler_file``: the JSON file ``dask scheduler --scheduler-file`` writes (waited for
  up to ``connect_timeout``, since batch scripts start scheduler and client together);
- ``slurm``: dask-jobqueue's ``SLURMCluster`` from the ``[slurm]`` settings (the ``hpc``
  extra); its job script can be printed without submitting anything;
- ``mpi``: dask-mpi under ``mpirun``/``srun`` (rank 0 the scheduler, rank 1 this client,
  the others workers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import uuid
from typing import Any, Iterator

import dask
import psutil
from dask.system import CPU_COUNT
from dask.utils import format_bytes, parse_bytes
from distributed import Client, LocalCluster, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker
from distributed.system import MEMORY_LIMIT

from ..errors import ClusterError

logger = logging.getLogger(__name__)

# below this a LocalCluster worker cannot even hold torch and pumap_dask (about 400 MiB on
# the CPU): it is paused or restarted by its nanny forever, so the job would never end
MIN_WORKER_MEMORY = 512 * 2**20
# how long the workers of a new LocalCluster have to connect and load the package
WORKER_START_S = 60.0
# numba's on-disk cache of compiled kernels (pynndescent marks many cache=True): a directory
# the user can write on every node, so every new worker process (each SLURM job starts cold)
# loads them instead of compiling. A NUMBA_CACHE_DIR the user set wins.
NUMBA_CACHE_ENV = "NUMBA_CACHE_DIR"


def numba_cache_dir() -> str:
    """Where numba keeps compiled kernels for pumap_dask: ``$NUMBA_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/pumap_dask/numba`` (default ``~/.cache/pumap_dask/numba``)."""
    if os.environ.get(NUMBA_CACHE_ENV):
        return os.environ[NUMBA_CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pumap_dask", "numba")


def use_numba_cache(path: str | None = None) -> str:
    """Point this process's numba cache at ``path`` (default :func:`numba_cache_dir`) unless
    ``NUMBA_CACHE_DIR`` is already set; returns the directory in use.

    Takes effect for kernels compiled or loaded afterwards (numba re-reads its environment
    when it compiles), so it must run before pynndescent is imported. numba creates the
    directory; where it cannot, it falls back to its own default locations.
    """
    if not os.environ.get(NUMBA_CACHE_ENV):
        os.environ[NUMBA_CACHE_ENV] = path or numba_cache_dir()
        numba = sys.modules.get("numba")
        if numba is not None:  # already imported: its config was read from the old env
            numba.core.config.reload_config()
    return os.environ[NUMBA_CACHE_ENV]


class NumbaCache(WorkerPlugin):
    """Sets numba's cache directory (:func:`use_numba_cache`) on every worker of a client,
    present and future (a restarted or newly scaled worker gets it too).

    Parameters
    ----------
    path
        The directory; None: each worker's own :func:`numba_cache_dir` (its home directory).
    """

    name = "pumap-dask-numba-cache"
    idempotent = True

    def __init__(self, path: str | None = None):
        self.path = path

    def setup(self, worker=None) -> None:
        use_numba_cache(self.path)


def share_numba_cache(client) -> None:
    """Register :class:`NumbaCache` on ``client``'s workers (kept by the scheduler for
    workers that join later); the client's own ``NUMBA_CACHE_DIR``, when set, is used on the
    workers too, else each worker's :func:`numba_cache_dir`."""
    client.register_plugin(NumbaCache(os.environ.get(NUMBA_CACHE_ENV) or None))


def _hpc_missing(what: str, package: str) -> ClusterError:
    return ClusterError(f"scheduler = '{what}' needs {package}: pip install 'pumap_dask[hpc]' "
                        f"(or pip install {package})")


def slurm_cluster(settings: dict[str, Any]):
    """A dask-jobqueue SLURMCluster from the ``[slurm]`` settings (not yet scaled)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise _hpc_missing("slurm", "dask-jobqueue") from None
    opts = {k: v for k, v in settings.get("slurm", {}).items() if k != "jobs"}
    opts.setdefault("cores", settings.get("threads") or 1)
    opts.setdefault("memory", "4GiB" if settings.get("memory") in (None, "auto")
                    else settings["memory"])
    try:
        return SLURMCluster(**opts)
    except (TypeError, ValueError) as exc:
        raise ClusterError(f"dask-jobqueue refused the [slurm] settings: {exc}") from None


def describe(settings: dict[str, Any]) -> str:
    """What ``connect`` would do, for ``--dry-run``: the job script for SLURM."""
    kind = settings["scheduler"]
    if settings.get("scheduler_file"):
        return f"connect to the scheduler in {settings['scheduler_file']}"
    if kind == "slurm":
        cluster = slurm_cluster(settings)
        try:
            jobs = settings.get("slurm", {}).get("jobs", 1)
            return f"submit {jobs} SLURM job(s) with this script:\n{cluster.job_script()}"
        finally:
            cluster.close()
    if kind == "local":
        check_local_memory(settings)
        return (f"start a LocalCluster of {settings['workers']} worker process(es), "
                f"{settings['threads']} thread(s) each, memory {settings['memory']}")
    if kind == "threads":
        return "run on dask's threaded scheduler in this process"
    if kind == "mpi":
        return "start the cluster with dask-mpi (run this command under mpirun or srun)"
    return f"connect to the scheduler at {kind}"


def read_scheduler_file(path: str, timeout: float) -> str:
    """The address in a scheduler file, waiting up to ``timeout`` s for it to appear."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                address = json.load(f)["address"]
            if isinstance(address, str) and address:
                return address
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):  # being written, or not a scheduler file
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if os.path.exists(path):
        raise ClusterError(f"{path} is not a Dask scheduler file (no 'address'); pass the "
                           "file that `dask scheduler --scheduler-file` writes")
    raise ClusterError(f"scheduler file {path} did not appear within {timeout:g} s; start "
                       f"`dask scheduler --scheduler-file {path}` first, or raise "
                       "--connect-timeout")


# the command line's own main module (``python -m pumap_dask.cli`` or the ``pumap-dask``
# script): worker processes started from it need nothing of it
CLI_MAIN_NAMES = ("pumap_dask.cli", "pumap-dask")


@contextlib.contextmanager
def spawned_without_cli_main() -> Iterator[None]:
    """Inside: processes spawned by ``multiprocessing`` (Dask's nannies start workers so) do
    not import this process's main module, when that is the command line's.

    A spawned child imports the parent's ``__main__`` first (by its module name or file):
    every local worker imported the whole command line (scikit-learn, the estimator, the
    report) before its first task, about a second of each worker's start on 2 cores, and
    what the worker's tasks never use. Any other main module (a user's script, whose
    functions tasks may name) is left alone.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    ours = (getattr(spec, "name", None) in CLI_MAIN_NAMES
            or (spec is None and path is not None
                and os.path.basename(path) in CLI_MAIN_NAMES))
    if not ours:
        yield
        return
    main.__spec__ = None
    if path is not None:
        del main.__file__
    try:
        yield
    finally:
        main.__spec__ = spec
        if path is not None:
            main.__file__ = path


def connect(settings: dict[str, Any], *, debug: bool = False):
    """A distributed client for the settings, or None for the threaded scheduler.

    Parameters
    ----------
    settings
        The resolved ``[cluster]`` settings (:func:`pumap_dask.config.cluster_settings`).
    debug
        Show the workers' own error logs.

    Raises
    ------
    ClusterError
        The cluster could not be started or reached.
    """
    kind = settings["scheduler"]
    timeout = float(settings["connect_timeout"])
    if settings.get("scheduler_file"):
        address = read_scheduler_file(settings["scheduler_file"], timeout)
        client = _remote(address, timeout, f"--scheduler-file {settings['scheduler_file']}")
        share_numba_cache(client)
        return client
    if kind == "threads":
        return None

    if kind == "local":
        check_local_memory(settings)  # an impossible limit fails before any process starts
        try:
            # the client re-raises a task's error (reported once, on one line); the workers'
            # own "Compute Failed" tracebacks are shown only with --debug
            quiet = logging.ERROR if debug else logging.CRITICAL
            with spawned_without_cli_main():
                cluster = LocalCluster(n_workers=settings["workers"],
                                       threads_per_worker=settings["threads"],
                                       memory_limit=settings["memory"], processes=True,
                                       dashboard_address=None, silence_logs=quiet,
                                       env={NUMBA_CACHE_ENV: numba_cache_dir()})
        except Exception as exc:
            raise ClusterError(f"cannot start a local Dask cluster ({type(exc).__name__}: "
                               f"{exc}); check --workers/--threads/--memory") from exc
        client = _owned(Client(cluster), cluster)
        try:
            check_worker_memory(client, settings, timeout=max(WORKER_START_S, timeout))
        except BaseException:
            close(client)
            raise
        return client
    if kind == "slurm":
        cluster = slurm_cluster(settings)
        cluster.scale(jobs=settings.get("slurm", {}).get("jobs", 1))
        client = _owned(Client(cluster), cluster)
        share_numba_cache(client)
        logger.info("waiting for the first SLURM worker (dashboard %s)", cluster.dashboard_link)
        client.wait_for_workers(1)
        return client
    if kind == "mpi":
        try:
            from dask_mpi import initialize
        except ImportError:
            raise ClusterError("scheduler = 'mpi' needs dask-mpi and mpi4py: pip install "
                               "'pumap_dask[mpi]' (mpi4py builds against your MPI "
                               "library)") from None
        initialize()  # only the client rank returns
        client = Client()
        share_numba_cache(client)
        return client
    client = _remote(kind, timeout, f"--scheduler {kind}")
    share_numba_cache(client)
    return client


def worker_memory(settings: dict[str, Any]) -> int:
    """The memory limit, in bytes, of each LocalCluster worker the settings start.

    ``auto`` is dask's: the worker's share of the machine's memory, its threads over the
    machine's cores.
    """
    value = settings.get("memory", "auto")
    if value in (None, "auto"):
        threads = max(1, int(settings.get("threads") or 1))
        return int(MEMORY_LIMIT * min(1.0, threads / CPU_COUNT))
    n = parse_bytes(value) if isinstance(value, str) else int(value)
    return int(min(n, MEMORY_LIMIT))


def _memory_flag(settings: dict[str, Any]) -> str:
    value = settings.get("memory", "auto")
    if value in (None, "auto"):
        return (f"--memory auto (each worker's share of {format_bytes(MEMORY_LIMIT)}: its "
                f"--threads over {CPU_COUNT} cores)")
    return f"--memory {value}"


def check_local_memory(settings: dict[str, Any]) -> None:
    """Refuse, before anything starts, a LocalCluster whose workers cannot run at all.

    Raises
    ------
    ClusterError
        When each worker would get less than :data:`MIN_WORKER_MEMORY` (naming ``--memory``).
    """
    limit = worker_memory(settings)
    if 0 < limit < MIN_WORKER_MEMORY:
        raise ClusterError(
            f"{_memory_flag(settings)}: each Dask worker gets {format_bytes(limit)}, less than "
            f"the {format_bytes(MIN_WORKER_MEMORY)} a worker needs to load torch and "
            "pumap-dask (it would be paused or restarted forever): raise --memory (e.g. "
            "--memory 4GiB)")


def worker_memory_limit(dask_worker: Any = None) -> int | None:
    """A Dask worker's memory limit in bytes: ``dask_worker``'s, or when None the worker
    running this task's; None without a limit or outside a worker."""
    if dask_worker is None:
        try:
            dask_worker = get_worker()
        except ValueError:  # not in a worker task
            return None
    limit = getattr(getattr(dask_worker, "memory_manager", None), "memory_limit", None)
    return int(limit) if limit else None


def _worker_baseline(dask_worker=None) -> tuple[int, int]:
    """(resident bytes, memory limit) of a worker once this package (and torch) is loaded:
    unpickling this function imports pumap_dask there."""
    return int(psutil.Process().memory_info().rss), worker_memory_limit(dask_worker) or 0


def _memory_fraction(key: str) -> float | None:
    """Dask's ``distributed.worker.memory.<key>`` share of a worker's limit, or None where
    it is switched off (``False``) or unset."""
    frac = dask.config.get(f"distributed.worker.memory.{key}", None)
    if isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0 < frac <= 1:
        return float(frac)
    return None


def _pause_fraction() -> float:
    return _memory_fraction("pause") or _memory_fraction("terminate") or 0.95


def kill_threshold(limit: int | None) -> int | None:
    """The bytes at which a Dask worker with memory ``limit`` is killed by its nanny: the
    limit times Dask's ``terminate`` fraction (the limit itself where that is switched off:
    the machine's memory is still finite), or None without a limit."""
    if not limit:
        return None
    return int(limit * (_memory_fraction("terminate") or 1.0))


def check_worker_memory(client, settings: dict[str, Any], timeout: float = WORKER_START_S
                        ) -> None:
    """Fail in bounded time when the workers of a new LocalCluster cannot work.

    Waits up to ``timeout`` s for the workers, then has each load pumap_dask and report its
    memory: a worker that dies doing so (its nanny kills it for exceeding the limit), or
    that already uses most of its limit (dask would pause it before it holds any data),
    can never finish a task, and the job would wait forever.

    Raises
    ------
    ClusterError
        Naming ``--memory``.
    """
    n = int(settings.get("workers") or 1)
    hint = "raise --memory (e.g. --memory 4GiB)"
    try:
        client.wait_for_workers(n, timeout=timeout)
    except (TimeoutError, OSError) as exc:
        raise ClusterError(
            f"{_memory_flag(settings)}: the {n} local Dask worker(s) did not start within "
            f"{timeout:g} s ({type(exc).__name__}; a worker over its memory limit is "
            f"restarted again and again): {hint}") from None
    results = client.run(_worker_baseline, on_error="return")
    died = sorted(w for w, r in results.items() if isinstance(r, BaseException))
    if died:
        raise ClusterError(
            f"{_memory_flag(settings)}: {len(died)} of {len(results)} Dask workers died while "
            f"loading torch and pumap-dask ({type(results[died[0]]).__name__}; killed for "
            f"exceeding its memory limit of {format_bytes(worker_memory(settings))}): {hint}")
    frac = _pause_fraction()
    for addr, (rss, limit) in sorted(results.items()):
        if limit and rss > 0.9 * frac * limit:
            need = 2 ** math.ceil(math.log2(max(2 * rss, MIN_WORKER_MEMORY)))
            raise ClusterError(
                f"{_memory_flag(settings)}: each Dask worker already uses {format_bytes(rss)} "
                f"of its {format_bytes(limit)} once torch and pumap-dask are loaded, too close "
                f"to the {frac:.0%} at which dask pauses a worker (its tasks would wait "
                f"forever): raise --memory to at least {format_bytes(need)} (e.g. --memory "
                f"{max(1, need >> 30)}GiB)")
    logger.debug("Dask workers ready: %s", {w: format_bytes(r[0]) for w, r in results.items()})


def workers_lost_error(exc: BaseException, settings: dict[str, Any] | None = None
                       ) -> ClusterError | None:
    """A :class:`ClusterError` naming ``--memory`` when ``exc`` (or what caused it) is
    distributed's ``KilledWorker``: the workers running a task kept dying (in practice:
    killed for exceeding their memory limit); None for anything else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KilledWorker):
            memory = "" if not settings else f" (now {_memory_flag(settings)})"
            task = getattr(exc, "task", None)
            return ClusterError(
                f"Dask workers kept dying while running {task or 'a task'} (the usual cause: "
                f"each exceeded its memory limit and was restarted): raise --memory{memory}, "
                "or use fewer --threads per worker or smaller input chunks")
        exc = exc.__cause__ or exc.__context__
    return None


def _owned(client, cluster):
    client._pumap_cluster = cluster  # closed with the client
    return client


def _remote(address: str, timeout: float, what: str):
    try:
        return Client(address, timeout=f"{timeout}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} ({what}) within "
                           f"{timeout:g} s ({type(exc).__name__}); check that it runs, or "
                           "raise --connect-timeout") from exc


def close(client) -> None:
    """Close a client from :func:`connect` and the cluster it started, if any."""
    if client is None:
        return
    cluster = getattr(client, "_pumap_cluster", None)
    try:
        client.close()
        if cluster is not None:
            cluster.close()
    except Exception:  # shutting down after a failure: the failure is what matters
        logger.debug("error while closing the Dask cluster", exc_info=True)


def _sees(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def check_shared_directory(client, directory: str) -> None:
    """Fail unless every worker of ``client`` sees ``directory`` as this process does.

    The kNN arrays, edge shards and checkpoints of a distributed fit are written and read
    there by the workers and the client alike, so it must be one shared file system.
    """
    if client is None:
        return
    os.makedirs(directory, exist_ok=True)
    token = uuid.uuid4().hex
    probe = os.path.join(os.path.abspath(directory), f".pumap-probe-{token}")
    with open(probe, "w") as f:
        f.write(token)
    try:
        seen = client.run(_sees, probe, token)
    finally:
        os.remove(probe)
    blind = sorted(w for w, ok in seen.items() if not ok)
    if blind:
        raise ClusterError(
            f"the work directory {directory} is not visible from {len(blind)} of {len(seen)} "
            f"Dask workers (e.g. {blind[0]}): put --work-dir on a file system shared by this "
            "machine and every worker (not /tmp or a node-local disk)")
