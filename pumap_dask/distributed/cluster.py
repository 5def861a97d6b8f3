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

import json
import logging
import os
import time
import uuid
from typing import Any

from distributed import Client, LocalCluster

from ..errors import ClusterError

logger = logging.getLogger(__name__)


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
        return _remote(address, timeout, f"--scheduler-file {settings['scheduler_file']}")
    if kind == "threads":
        return None

    if kind == "local":
        try:
            # the client re-raises a task's error (reported once, on one line); the workers'
            # own "Compute Failed" tracebacks are shown only with --debug
            quiet = logging.ERROR if debug else logging.CRITICAL
            cluster = LocalCluster(n_workers=settings["workers"],
                                   threads_per_worker=settings["threads"],
                                   memory_limit=settings["memory"], processes=True,
                                   dashboard_address=None, silence_logs=quiet)
        except Exception as exc:
            raise ClusterError(f"cannot start a local Dask cluster ({type(exc).__name__}: "
                               f"{exc}); check --workers/--threads/--memory") from exc
        return _owned(Client(cluster), cluster)
    if kind == "slurm":
        cluster = slurm_cluster(settings)
        cluster.scale(jobs=settings.get("slurm", {}).get("jobs", 1))
        client = _owned(Client(cluster), cluster)
        logger.info("waiting for the first SLURM worker (dashboard %s)", cluster.dashboard_link)
        client.wait_for_workers(1)
        return client
    if kind == "mpi":
        try:
            from dask_mpi import initialize
        except ImportError:
            raise ClusterError("scheduler = 'mpi' needs dask-mpi and mpi4py: pip install "
                               "'pumap_dask[mpi]' (mpi4py builds against your MPI library)") from None
        initialize()  # only the client rank returns
        return Client()
    return _remote(kind, timeout, f"--scheduler {kind}")


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
