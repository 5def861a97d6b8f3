"""Training rows held once per node: a node-local, memory-mapped row cache.

Every training rank needs random access to all training rows. Loading them into each
rank's memory costs ``ranks x rows`` per node; instead the first rank of a node to ask
writes the rows once into a ``.npy`` file in a node-local directory, and every rank on the
node maps that file read-only (:func:`numpy.load` with ``mmap_mode``): the pages live once,
in the page cache, shared by the ranks (their PSS splits them), and the memory budget
counts a node, not a rank.

The cache is filled from any dask array (a Zarr store, ``da.from_array`` of an HDF5 file,
...), block by block with the local threaded scheduler, in bounded memory. It records what
produced it: the file name carries the input's content identity
(:meth:`pumap_dask.inputs.InputHandle.identity`), a sidecar JSON holds it, and while the
file is written the content digest is recomputed from the rows actually read; a mismatch
(the input changed since the fit read it) is an error and nothing is published. The file
is written under a temporary name and moved in atomically; a ``.lock`` file (created
exclusively) lets one rank write while the others wait, and a lock left by a dead process
on this host is taken over. The cache directory is ours: it is created with a marker file,
and a directory without the marker is never written into.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from typing import Any

import dask
import numpy as np

from ..errors import ClusterError, InputError
from ..io import block_sha256, content_sha256

logger = logging.getLogger(__name__)

CACHE_MARKER = ".pumap-rowcache"
CACHE_ENV = "PUMAP_ROW_CACHE"
FORMAT_VERSION = 1
POLL_S = 0.2


def default_cache_root() -> str:
    """The node-local cache directory: ``$PUMAP_ROW_CACHE``, else
    ``<tmp>/pumap_dask-rows-<uid>`` (``tempfile.gettempdir()``, which honours ``TMPDIR``:
    on HPC nodes point it at node-local scratch)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return env
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"pumap_dask-rows-{uid}")


def _owned_dir(root: str) -> str:
    """Create (or reuse) the cache directory; refuse one we did not create."""
    marker = os.path.join(root, CACHE_MARKER)
    if os.path.isdir(root):
        if not os.path.exists(marker):
            if os.listdir(root):
                raise ClusterError(
                    f"the row cache directory {root} exists and was not created by "
                    f"pumap_dask (no {CACHE_MARKER} marker); pumap_dask never writes into "
                    f"it: set {CACHE_ENV} to a node-local directory of its own")
            _write_marker(marker)
        return root
    os.makedirs(root, mode=0o700, exist_ok=True)
    _write_marker(marker)
    return root


def _write_marker(marker: str) -> None:
    with open(marker, "w") as f:
        f.write("pumap_dask node-local training-row cache; files here are safe to delete "
                "when no fit runs\n")


def cache_path(root: str, identity: dict) -> str:
    """The cache file of an input with this identity (``{"rows", "features", "sha256"}``)."""
    return os.path.join(root, f"rows-{identity['sha256'][:32]}-"
                              f"{int(identity['rows'])}x{int(identity['features'])}.npy")


def _sidecar(path: str) -> str:
    return path + ".json"


def _matches(path: str, identity: dict) -> bool:
    """A published cache file for exactly this input."""
    try:
        with open(_sidecar(path)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    want = {"rows": int(identity["rows"]), "features": int(identity["features"]),
            "sha256": identity["sha256"], "dtype": "float32", "version": FORMAT_VERSION}
    return os.path.exists(path) and all(meta.get(k) == v for k, v in want.items())


def _lock_is_stale(lock: str) -> bool:
    """A lock of a process on this host that no longer runs."""
    try:
        with open(lock) as f:
            host, pid = f.read().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _fill(darr: Any, path: str, identity: dict) -> None:
    """Write the rows of ``darr`` to ``path`` (atomically) and check their content digest."""
    n, d = int(darr.shape[0]), int(darr.shape[1])
    darr = darr.rechunk({1: -1}) if len(darr.chunks[1]) > 1 else darr
    tmp = f"{path}.tmp-{os.getpid()}"
    t0 = time.perf_counter()
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
    try:
        digests = []
        start = 0
        with dask.config.set(scheduler="threads"):
            for i, rows in enumerate(darr.chunks[0]):
                block = np.asarray(darr.blocks[i].compute(), dtype=np.float32)
                if not np.isfinite(block).all():
                    raise InputError(f"X: rows {start}-{start + rows - 1} hold NaN or infinite "
                                     "values (the input changed since the fit checked it)")
                out[start:start + rows] = block
                digests.append(np.frombuffer(bytes.fromhex(block_sha256(block)), np.uint8))
                start += rows
        out.flush()
        sha = content_sha256(np.stack(digests), (n, d), darr.chunks[0])
        if sha != identity["sha256"]:
            raise InputError(
                "the training input changed while the fit ran: its rows' content digest is "
                f"{sha[:16]}..., the fit started from {identity['sha256'][:16]}...; rerun the "
                "fit on an input nothing writes to")
        del out
        os.replace(tmp, path)
        meta = {"rows": n, "features": d, "sha256": sha, "dtype": "float32",
                "version": FORMAT_VERSION, "written_by": f"{socket.gethostname()}:{os.getpid()}"}
        side_tmp = f"{_sidecar(path)}.tmp-{os.getpid()}"
        with open(side_tmp, "w") as f:
            json.dump(meta, f)
        os.replace(side_tmp, _sidecar(path))
    except BaseException:
        for p in (tmp, f"{_sidecar(path)}.tmp-{os.getpid()}"):
            if os.path.exists(p):
                os.remove(p)
        raise
    logger.info("row cache: wrote %d x %d rows to %s in %.1fs", n, d, path,
                time.perf_counter() - t0)


def node_rows(darr: Any, identity: dict, root: str | None = None,
              timeout_s: float = 3600.0) -> np.memmap:
    """The training rows as a read-only memory map of this node's cache, written once.

    Parameters
    ----------
    darr
        The training rows, any 2-d dask array (read here, in this process, only when this
        node's cache has no file for ``identity`` yet).
    identity
        The input's identity, ``{"rows", "features", "sha256"}`` as
        :meth:`pumap_dask.inputs.InputHandle.identity` gives it.
    root
        The cache directory (default :func:`default_cache_root`).
    timeout_s
        Seconds to wait for another rank of this node that is writing the file.

    Returns
    -------
    numpy.memmap
        (rows, features) float32, read-only.

    Raises
    ------
    InputError
        When the rows read do not match ``identity`` (the input changed).
    ClusterError
        When the cache directory is not ours, or another writer does not finish in time.
    """
    root = _owned_dir(root or default_cache_root())
    path = cache_path(root, identity)
    lock = path + ".lock"
    deadline = time.monotonic() + timeout_s
    reused = _matches(path, identity)
    while not _matches(path, identity):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if _lock_is_stale(lock):
                logger.warning("row cache: taking over %s, left by a process that died", lock)
                os.remove(lock)
                continue
            if time.monotonic() > deadline:
                raise ClusterError(f"row cache: another process has held {lock} for more than "
                                   f"{timeout_s:.0f}s; remove it if no fit runs") from None
            time.sleep(POLL_S)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}")
            if not _matches(path, identity):  # published while we took the lock
                _fill(darr, path, identity)
        finally:
            os.remove(lock)
    if reused:
        logger.info("row cache: reusing %s", path)
    return np.load(path, mmap_mode="r")


def drop(identity: dict, root: str | None = None) -> bool:
    """Remove this input's cache file from this node (after training); True if removed."""
    root = root or default_cache_root()
    if not os.path.exists(os.path.join(root, CACHE_MARKER)):
        return False
    path = cache_path(root, identity)
    removed = False
    for p in (_sidecar(path), path):  # the sidecar first: a half-removed file never matches
        try:
            os.remove(p)
            removed = True
        except FileNotFoundError:
            pass
    return removed
