"""Writers: lazy embeddings to Zarr (resumable) and to AnnData ``obsm``.

Each dask block of the embedding is written to one chunk-aligned region (so no two tasks
touch the same Zarr chunk or shard), then a marker file records the block as finished. A
rerun with ``resume=True`` computes only the blocks without a marker, so a job killed
halfway loses nothing already written and the final array equals an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Mapping
from typing import Any

import dask
import numpy as np
import zarr

from ._version import __version__
from .errors import InputError
from .io import as_dask, block_digests, open_zarr, path_within, to_jsonable
from .model import read_config
from .params import check_transform_args, check_writer_args
from .progress import stage
from .transform import model_source, ood_mask, report_ood, transform

logger = logging.getLogger(__name__)

DONE_DIR = ".pumap_done"
ANNDATA_OBSM_KEY = "X_pumap"
OWNER_KEY = "pumap_dask"  # attribute that marks an array as written by us
# the keys of every uns record of embed's, also those written before records named their owner
_RECORD_KEYS = {"params", "use_rep", "n_epochs", "knn_method", "a", "b", "model_dir", "version"}
LOCK_SUFFIX = ".pumap-lock"
# a lock file is written right after it is created: one that names no writer for longer
# was left by a job that crashed in between (or was damaged) and is taken over
GARBLED_LOCK_GRACE_S = 5.0


def _regular_rows(darr, chunk_rows: int | None):
    """Rechunk rows to equal blocks (the last may be shorter), as Zarr chunks require."""
    rows = darr.chunks[0]
    target = int(chunk_rows or max(rows))
    regular = all(r == target for r in rows[:-1]) and rows[-1] <= target
    return darr if regular else darr.rechunk({0: target})


def _done_path(out_path: str, i: int) -> str:
    return os.path.join(out_path, DONE_DIR, str(i))


def _write_block(emb: np.ndarray, ood: np.ndarray, digest: np.ndarray, out_path: str,
                 start: int, i: int) -> tuple[int, int]:
    """Write one block's embedding at rows [start, start+len) and mark it finished.

    The marker records the input block's content digest (from the same read that fed the
    encoder), so a resumed transform keeps this block only for the same input rows.
    Returns the block's counts of NaN rows and out-of-distribution rows.
    """
    z = zarr.open_array(out_path, mode="r+")
    z[start:start + emb.shape[0]] = emb
    marker = _done_path(out_path, i)
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rows": int(emb.shape[0]), "input_sha256": bytes(digest.ravel()).hex()}, f)
    os.replace(tmp, marker)
    return int(np.isnan(emb[:, 0]).sum()), int(ood.sum())


def _marker_digest(out_path: str, i: int) -> str | None:
    """The input digest a block's marker records (None: unreadable, or written before
    markers recorded one)."""
    try:
        with open(_done_path(out_path, i)) as f:
            return json.load(f).get("input_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _check_kept_blocks(digests, kept: list[int], starts: np.ndarray, rows: tuple,
                       out_path: str) -> None:
    """Refuse to resume when a finished block was computed from other input rows."""
    if not kept:
        return
    found = dask.compute(*[digests[i] for i in kept])
    for i, dig in zip(kept, found):
        if _marker_digest(out_path, i) != bytes(np.asarray(dig).ravel()).hex():
            lo, hi = int(starts[i]), int(starts[i]) + int(rows[i])
            raise InputError(
                f"{out_path} was made from other input: its finished block {i} (rows {lo} to "
                f"{hi}) does not match those rows of this input; pass resume=False (CLI: "
                "--overwrite) to replace it, or choose another output path")


def _node_kind(path: str) -> str | None:
    """``"array"`` or ``"group"`` for a Zarr (v2 or v3) node directory, else None."""
    zj = os.path.join(path, "zarr.json")
    if os.path.isfile(zj):
        try:
            with open(zj) as f:
                kind = json.load(f).get("node_type")
        except (OSError, ValueError, AttributeError):
            return "group"  # unreadable metadata: treat as foreign, never as ours
        return kind if kind in ("array", "group") else "group"
    if os.path.isfile(os.path.join(path, ".zarray")):
        return "array"
    if os.path.isfile(os.path.join(path, ".zgroup")):
        return "group"
    return None


def _node_attrs(path: str) -> dict:
    """The attributes of a Zarr node directory, read from its metadata files."""
    try:
        if os.path.isfile(os.path.join(path, "zarr.json")):
            with open(os.path.join(path, "zarr.json")) as f:
                attrs = json.load(f).get("attributes", {})
        elif os.path.isfile(os.path.join(path, ".zattrs")):
            with open(os.path.join(path, ".zattrs")) as f:
                attrs = json.load(f)
        else:
            attrs = {}
    except (OSError, ValueError, AttributeError):
        return {}
    return attrs if isinstance(attrs, dict) else {}


def is_pumap_output(path: str | os.PathLike) -> bool:
    """True when ``path`` is a Zarr array written by :func:`transform_to_zarr`."""
    path = os.fspath(path)
    return _node_kind(path) == "array" and isinstance(_node_attrs(path).get(OWNER_KEY), dict)


def _input_root(X: Any) -> str | None:
    """The local directory holding the input, when it has one."""
    if isinstance(X, (str, os.PathLike)):
        return os.path.realpath(os.fspath(X))
    root = getattr(getattr(X, "store", None), "root", None)
    if root is not None:
        return os.path.realpath(os.path.join(os.fspath(root), getattr(X, "path", "") or ""))
    return None


def check_output_path(out_path: str | os.PathLike, X: Any = None, *, resume: bool = True,
                      store: str | None = None) -> str:
    """Refuse an output location that would overwrite or corrupt data pumap_dask did not write.

    Parameters
    ----------
    out_path
        The output array's directory.
    X
        The input (a path or a Zarr array is compared with ``out_path``).
    resume
        Whether an existing pumap output is to be resumed (else it is replaced).
    store
        The AnnData store an ``obsm`` write goes into (the only Zarr group an output may
        live inside).

    Returns
    -------
    str
        ``"new"`` (nothing there), ``"resume"`` or ``"replace"`` (an existing pumap output).

    Raises
    ------
    InputError
        With a message that says what is at the path and what to do instead (a symbolic
        link is followed only to resume the pumap_dask output it points to).
    """
    given = os.path.abspath(os.fspath(out_path))
    if os.path.islink(given) and not (resume and is_pumap_output(given)):
        target = os.path.realpath(given)
        raise InputError(f"the output {given} is a symbolic link (to {target}); pumap_dask never "
                         f"replaces a link or deletes through one: pass the target {target} "
                         "itself (with --overwrite to replace an earlier output there) or "
                         "another output path")
    out = os.path.realpath(given)
    src = _input_root(X)
    if src is not None and (path_within(out, src) or path_within(src, out)):
        raise InputError(f"the output {out} is the input {src} or overlaps it; writing there "
                         "would destroy the input: choose an output path outside the input")
    parent = os.path.dirname(out)
    while parent and parent != os.path.dirname(parent):
        if store is not None and path_within(parent, store):
            break
        kind = _node_kind(parent)
        if kind is not None:
            hint = (" (an AnnData store: write into it with write_anndata_obsm, CLI: --obsm NAME)"
                    if _is_anndata(parent) else "")
            raise InputError(f"the output {out} lies inside the Zarr {kind} {parent}{hint}; "
                             "choose an output path outside it")
        parent = os.path.dirname(parent)
    if not os.path.exists(out):
        return "new"
    if not os.path.isdir(out):
        raise InputError(f"the output {out} exists and is a file; choose another path")
    if is_pumap_output(out):
        return "resume" if resume else "replace"
    kind = _node_kind(out)
    if kind is not None and _is_anndata(out):
        raise InputError(f"the output {out} is an AnnData store; write the embedding into it "
                         "with write_anndata_obsm (CLI: --obsm NAME), never over it")
    if kind is not None:
        raise InputError(f"the output {out} is a Zarr {kind} not written by pumap_dask; it is "
                         "never overwritten: choose another output path (or remove it yourself)")
    if os.listdir(out):
        raise InputError(f"the output {out} is a non-empty directory not written by "
                         "pumap_dask; its files are never deleted: choose another output path")
    return "new"


def _is_anndata(path: str) -> bool:
    return "encoding-type" in _node_attrs(path) and _node_kind(path) == "group"


class OutputLock:
    """An exclusive lock file beside an output, so two writers never interleave.

    The lock is ``<parent>/.<name>.pumap-lock``, created with ``O_EXCL``; it records the
    owner's host and pid. A lock left by a process that died on this host is taken over, and
    so is one that names no writer (garbled, e.g. by a crash between its creation and its
    first write) once it is :data:`GARBLED_LOCK_GRACE_S` old; one this user cannot read is
    refused with a message, never waited for.
    """

    def __init__(self, out_path: str) -> None:
        parent, name = os.path.split(os.path.realpath(out_path))
        self.path = os.path.join(parent, f".{name}{LOCK_SUFFIX}")
        self.held = False

    def _read(self) -> tuple[dict, str | None]:
        """(owner, None) for a lock naming its writer; ({}, why) when the file is gone
        (``"gone"``), cannot be read (``"unreadable"``) or names no writer (``"garbled"``)."""
        try:
            with open(self.path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}, "gone"
        except OSError:
            return {}, "unreadable"
        except ValueError:
            return {}, "garbled"
        if isinstance(doc, dict) and isinstance(doc.get("host"), str) \
                and isinstance(doc.get("pid"), int) and not isinstance(doc.get("pid"), bool):
            return doc, None
        return {}, "garbled"

    def _owner(self) -> dict:
        return self._read()[0]

    def _what(self) -> str:
        return os.path.join(os.path.dirname(self.path),
                            os.path.basename(self.path)[1:-len(LOCK_SUFFIX)])

    def _take_over_garbled(self, deadline: float) -> None:
        """A lock that names no writer: wait out the instant between its creation and its
        first write, then take it over (a crash left it), so it never blocks for good."""
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return
        if age < GARBLED_LOCK_GRACE_S and time.monotonic() < deadline:
            time.sleep(0.1)
            return
        logger.warning("the lock %s names no writer (garbled, %.0f s old; left by a job that "
                       "crashed while taking it): taking it over", self.path, age)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise InputError(f"the lock {self.path} names no writer and cannot be removed "
                             f"({exc.strerror}): delete it yourself if no job writes "
                             f"{self._what()}") from None

    def acquire(self) -> "OutputLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        deadline = time.monotonic() + GARBLED_LOCK_GRACE_S + 5.0
        while time.monotonic() < deadline + 1.0:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner, why = self._read()
                if why == "gone":
                    continue
                if why == "unreadable":  # e.g. another user's lock: never taken over
                    raise InputError(
                        f"the lock {self.path} cannot be read (another user's job may be "
                        f"writing {self._what()}); wait for that job, or delete the lock if no "
                        "job runs") from None
                if why == "garbled":
                    self._take_over_garbled(deadline)
                    continue
                if owner.get("host") == me["host"] and not _pid_alive(owner.get("pid")):
                    logger.warning("taking over the lock %s left by process %s, which is gone",
                                   self.path, owner.get("pid"))
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                since = owner.get("since")
                since = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
                         if isinstance(since, (int, float)) and since > 0 else "")
                raise InputError(
                    f"another writer (pid {owner['pid']} on {owner['host']}{since}) is writing "
                    f"{self._what()}; wait for it to finish, or if that job is dead, delete "
                    f"{self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise InputError(f"could not take the lock {self.path}; delete it if no job runs")

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_or_create(out_path: str, shape: tuple, chunk_rows: int, n_components: int,
                    attrs: dict, state: str, sharded: bool, zarr_format: int):
    if state == "resume":
        z = zarr.open_array(out_path, mode="r+")
        old = dict(z.attrs).get(OWNER_KEY, {})
        same = (tuple(z.shape) == shape and old.get("model_sha256") == attrs["model_sha256"]
                and old.get("block_rows") == chunk_rows)
        if same:
            return z
        raise InputError(
            f"{out_path} holds a different transform (shape {z.shape}, model "
            f"{str(old.get('model_sha256', '?'))[:12]}, block rows {old.get('block_rows')}); "
            "pass resume=False (CLI: --overwrite) to replace it, or choose another output path")
    if state == "replace":
        logger.info("replacing the earlier pumap_dask output %s", out_path)
        shutil.rmtree(out_path)
    kwargs: dict[str, Any] = dict(shape=shape, dtype="float32", fill_value=np.nan,
                                  zarr_format=zarr_format)
    if sharded and zarr_format == 3:
        # one shard per dask block keeps every write aligned to whole shards
        inner = max(1, chunk_rows // 16)
        while chunk_rows % inner:
            inner -= 1
        kwargs.update(chunks=(inner, n_components), shards=(chunk_rows, n_components))
    else:
        kwargs.update(chunks=(chunk_rows, n_components))
    z = zarr.create_array(out_path, overwrite=os.path.exists(out_path), **kwargs)
    z.attrs[OWNER_KEY] = attrs
    return z


def transform_to_zarr(
    X: Any,
    model: Any,
    out_path: str | os.PathLike,
    *,
    key: str | None = None,
    resume: bool = True,
    chunk_rows: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    nan_policy: str = "raise",
    sharded: bool = False,
    zarr_format: int = 3,
    _store: str | None = None,
) -> "zarr.Array":  # noqa: F821
    """Embed ``X`` block by block into a Zarr array, resumably.

    The output is owned: it carries a ``pumap_dask`` attribute, only such an array is ever
    resumed or replaced, and an output equal to or overlapping the input, inside a Zarr
    group, or over a foreign Zarr node or a non-empty directory is refused before any work.
    A lock file beside the output makes a second concurrent writer fail at once.

    Parameters
    ----------
    X, model, key, batch_size, device, nan_policy
        As for :func:`pumap_dask.transform`.
    out_path
        Directory of the output Zarr array (n_samples, n_components), float32.
    resume
        Reuse an existing output made by the same model and blocking, computing only blocks
        not yet recorded as finished. ``False`` replaces an earlier pumap_dask output (and
        nothing else).
    chunk_rows
        Rows per block and output chunk (default: the input's row chunk size).
    sharded
        Write a Zarr v3 sharded array with one shard per block (writes stay shard-aligned).
    zarr_format
        2 or 3.

    Returns
    -------
    zarr.Array
        The finished output array.
    """
    check_writer_args(chunk_rows=chunk_rows, zarr_format=zarr_format, sharded=sharded)
    check_transform_args(batch_size=batch_size, device_=device, nan_policy=nan_policy)
    out_path = os.path.abspath(os.fspath(out_path))
    darr = _regular_rows(as_dask(X, key=key), chunk_rows)
    check_output_path(out_path, X, resume=resume, store=_store)
    source = model_source(model)
    emb = transform(darr, source, batch_size=batch_size, device=device, nan_policy=nan_policy)
    with OutputLock(out_path):
        # decided again under the lock: another writer may have finished in between
        state = check_output_path(out_path, X, resume=resume, store=_store)
        return _write_all(darr, emb, model, source, out_path, state, sharded, zarr_format)


def _write_all(darr, emb, model, source, out_path: str, state: str, sharded: bool,
               zarr_format: int):
    rows = darr.chunks[0]
    block_rows = rows[0]
    attrs = {"model_sha256": source.sha256, "block_rows": block_rows,
             "n_blocks": len(rows), "complete": False}
    z = _open_or_create(out_path, (darr.shape[0], source.n_components), block_rows,
                        source.n_components, attrs, state, sharded, zarr_format)
    os.makedirs(os.path.join(out_path, DONE_DIR), exist_ok=True)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    todo = [i for i in range(len(rows)) if not os.path.exists(_done_path(out_path, i))]
    # the embedding, the range check and the input digests read each input block once:
    # unoptimised graphs keep the shared read tasks (an optimised graph per array fuses
    # the read into each, and every block was read and decompressed three times)
    digests = block_digests(darr, finite=False).to_delayed(optimize_graph=False).ravel()
    kept = sorted(set(range(len(rows))) - set(todo))
    _check_kept_blocks(digests, kept, starts, rows, out_path)  # reads only the kept blocks
    logger.info("transform_to_zarr %s: %d of %d blocks to compute (%d already done)",
                out_path, len(todo), len(rows), len(rows) - len(todo))
    t0 = time.perf_counter()
    blocks = emb.to_delayed(optimize_graph=False).ravel()
    ood = ood_mask(darr, model).to_delayed(optimize_graph=False).ravel()
    tasks = [dask.delayed(_write_block, pure=False)(blocks[i], ood[i], digests[i], out_path,
                                                    int(starts[i]), i)
             for i in todo]
    with stage("transform"):  # progress of the blocks' tasks (at INFO)
        counts = dask.compute(*tasks) if tasks else []
    n_nan = sum(c[0] for c in counts)
    if counts:
        report_ood(sum(c[1] for c in counts), sum(rows[i] for i in todo))
    if n_nan:
        logger.warning("%d rows had non-finite input and got NaN embeddings", n_nan)
    missing = [i for i in range(len(rows)) if not os.path.exists(_done_path(out_path, i))]
    if missing:
        raise RuntimeError(f"{out_path}: {len(missing)} of {len(rows)} blocks have no "
                           f"completion marker (first: {missing[:5]}); rerun to finish them")
    attrs = dict(z.attrs[OWNER_KEY])
    attrs["complete"] = True
    z.attrs[OWNER_KEY] = attrs
    dt = time.perf_counter() - t0
    logger.info("transform_to_zarr wrote %d rows in %.1fs (%.0f rows/s)",
                sum(rows[i] for i in todo), dt, sum(rows[i] for i in todo) / max(dt, 1e-9))
    return zarr.open_array(out_path, mode="r")


def write_anndata_obsm(
    store: str | os.PathLike,
    model: Any,
    *,
    key: str | None = None,
    obsm_key: str = ANNDATA_OBSM_KEY,
    resume: bool = True,
    uns_record: Mapping[str, Any] | None = None,
    _replace_uns: bool = False,
    **kwargs,
) -> "zarr.Array":  # noqa: F821
    """Embed an AnnData ``.zarr`` store's data and write it to ``obsm[obsm_key]`` in place.

    Only the new array and its ``uns`` record are written; the rest of the store is
    untouched. The array carries AnnData's encoding attributes so ``anndata.read_zarr``
    sees it as ``obsm[obsm_key]``. The record goes to ``uns[uns_name(obsm_key)]`` (named as
    scanpy names its own, ``X_pumap`` -> ``uns["pumap"]``); an entry there that pumap_dask
    did not write is refused before any work.

    Parameters
    ----------
    store
        Path of the AnnData ``.zarr`` store.
    model
        Fitted estimator or saved-model path.
    key
        Input array inside the store (default ``obsm/X_pca``, then ``X``).
    obsm_key
        Name of the embedding in ``obsm``.
    resume, kwargs
        As for :func:`transform_to_zarr`.
    uns_record
        The record to store in ``uns`` (default: :func:`transform_record`, the model's
        path, ``n_components`` and parameters).

    Returns
    -------
    zarr.Array
        The ``obsm`` array, read-only.
    """

    store = os.path.abspath(os.fspath(store))
    if not isinstance(obsm_key, str) or not obsm_key or "/" in obsm_key or \
            obsm_key.startswith("."):
        raise InputError(f"obsm_key must be a plain name such as 'X_pumap', got {obsm_key!r}")
    if _node_kind(store) != "group":
        raise InputError(f"{store} is not an AnnData .zarr store (no Zarr group there); "
                         "write a plain Zarr array with transform_to_zarr (CLI: --out) instead")
    out_path = os.path.join(store, "obsm", obsm_key)
    if os.path.exists(out_path) and not is_pumap_output(out_path):
        raise InputError(f"obsm[{obsm_key!r}] already exists in {store} and was not written by "
                         "pumap_dask; it is never overwritten: pick another obsm_key (CLI: "
                         "--obsm NAME) or delete it yourself")
    src = open_zarr(store, key=key)
    root = zarr.open_group(store, mode="r")
    n_obs = _anndata_n_obs(root)
    if n_obs is not None and src.shape[0] != n_obs:
        raise InputError(f"input array has {src.shape[0]} rows but the store has {n_obs} obs")
    fmt = root.metadata.zarr_format
    check_output_path(out_path, src, resume=resume, store=store)
    name = uns_name(obsm_key)
    check_store_uns(store, name, replace_foreign=_replace_uns)
    if uns_record is None:
        uns_record = transform_record(model, key=getattr(src, "path", None) or key or "",
                                      obsm_key=obsm_key)
    _require_group(store, "obsm")
    if resume and os.path.exists(out_path):  # in place and complete: verified, not redone
        transform_to_zarr(src, model, out_path, resume=True, zarr_format=fmt, _store=store,
                          **kwargs)
    else:
        # written beside the store under a hidden name, moved in only when complete: an
        # interrupted write never leaves a readable partial obsm array (and its lock lives
        # outside the AnnData groups)
        partial = _partial_obsm_path(store, obsm_key)
        transform_to_zarr(src, model, partial, resume=resume, zarr_format=fmt, **kwargs)
        arr = zarr.open_array(partial, mode="r+")
        arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        with OutputLock(out_path):
            _move_into_place(partial, out_path)
    write_store_uns(store, name, uns_record, replace_foreign=_replace_uns)  # consolidates
    logger.info("wrote obsm/%s and uns/%s into %s", obsm_key, name, store)
    return zarr.open_array(out_path, mode="r")


# ------------------------------------------------------------------ uns records
def uns_name(obsm_key: str) -> str:
    """The ``uns`` name of the record of ``obsm[obsm_key]``, as scanpy names its own.

    Parameters
    ----------
    obsm_key
        The ``obsm`` key of an embedding.

    Returns
    -------
    str
        ``obsm_key`` without its ``X_`` prefix (``"X_pumap"`` -> ``"pumap"``, ``"X_foo"``
        -> ``"foo"``); a key without that prefix is the name itself.
    """
    return obsm_key[2:] if obsm_key.startswith("X_") and len(obsm_key) > 2 else obsm_key


def is_our_record(record: Any) -> bool:
    """True when an ``uns`` value is a record pumap_dask wrote (``embed`` or ``transform``;
    also one written before records named their owner)."""
    if not isinstance(record, Mapping):
        return False
    return record.get("written_by") == OWNER_KEY or _RECORD_KEYS <= set(record)


def storable(value: Any) -> Any:
    """``value`` in types AnnData writes to ``.h5ad`` and ``.zarr`` alike.

    Parameters
    ----------
    value
        A parameter value or a dict of them (nested dicts are kept).

    Returns
    -------
    Any
        Numbers, strings and bools as they are; lists and tuples of numbers, strings or
        bools as numpy arrays, other lists as their JSON text; other objects as ``str``.
        None (also a non-finite float) has no stored form: it is returned as None and
        dropped from dicts.
    """
    return _storable(to_jsonable(value))


def _storable(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: _storable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None}
    if not isinstance(value, list):
        return value
    for kind, dtype in ((bool, bool), (int, np.int64), ((int, float), np.float64), (str, str)):
        if value and all(isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
                         for v in value):
            return np.asarray(value, dtype=dtype)
    return json.dumps(value)  # empty, nested or mixed: its JSON text


def transform_record(model: Any, *, key: str = "", obsm_key: str = ANNDATA_OBSM_KEY
                     ) -> dict[str, Any]:
    """The ``uns`` record of an embedding written by :func:`write_anndata_obsm`.

    Parameters
    ----------
    model
        The fitted estimator or saved-model path that made the embedding.
    key
        The input array inside the store.
    obsm_key
        The ``obsm`` key of the embedding.

    Returns
    -------
    dict
        ``model`` (the saved model's directory, ``""`` for an unsaved one),
        ``n_components``, ``params`` (a dict, with the fitted ``a`` and ``b`` as
        ``sc.tl.umap`` records them), ``use_rep``, ``version``, ``written_by`` and
        ``obsm_keys``, in types AnnData stores.
    """
    source = model_source(model)
    path = getattr(source, "path", "")
    if hasattr(model, "get_params"):
        params = {k: v for k, v in model.get_params().items()
                  if k not in ("verbose", "work_dir", "callbacks")}
        params.update(a=getattr(model, "a_", None), b=getattr(model, "b_", None))
    else:
        doc = read_config(path)
        params = {k: v for k, v in doc["params"].items() if k not in ("verbose", "work_dir")}
        params.update(a=doc["fitted"]["a"], b=doc["fitted"]["b"])
    return storable({"model": path, "model_sha256": source.sha256,
                     "n_components": int(source.n_components), "params": params,
                     "use_rep": key.removeprefix("obsm/"), "version": __version__,
                     "written_by": OWNER_KEY, "obsm_keys": [obsm_key]})


def anndata_elem_io() -> tuple[Any, Any]:
    """anndata's ``(read_elem, write_elem)``; ``(None, None)`` without anndata."""
    try:
        from anndata.io import read_elem, write_elem
    except ImportError:
        try:
            from anndata.experimental import read_elem, write_elem
        except ImportError:
            return None, None
    return read_elem, write_elem


def read_store_uns(store: str, name: str) -> Any:
    """The ``uns/<name>`` entry of an AnnData ``.zarr`` store: None when absent, its value
    when it can be read, else False (something that is not a record)."""
    try:
        root = zarr.open_group(store, mode="r", use_consolidated=False)
        node = root["uns"][name] if "uns" in root and name in root["uns"] else None
    except (KeyError, ValueError, TypeError, OSError):
        return None
    if node is None:
        return None
    fallback = node.attrs.get(OWNER_KEY) if isinstance(node, zarr.Group) else None
    if isinstance(fallback, Mapping):  # written without anndata: attributes of a group
        return fallback
    read_elem = anndata_elem_io()[0]
    if read_elem is not None:
        try:
            return read_elem(node)
        except Exception:  # not an element anndata can read: not ours
            return False
    if isinstance(node, zarr.Group):  # without anndata: judge by the entry names
        return dict.fromkeys(node.keys(), "")
    return False


def check_store_uns(store: str, name: str, *, replace_foreign: bool = False) -> None:
    """Refuse an ``uns/<name>`` entry of a store that pumap_dask did not write.

    Parameters
    ----------
    store
        Path of the AnnData ``.zarr`` store.
    name
        The ``uns`` entry (see :func:`uns_name`).
    replace_foreign
        Allow replacing an entry pumap_dask did not write (``embed(..., overwrite=True)``).

    Raises
    ------
    InputError
        When the entry exists and is not pumap_dask's record.
    """
    record = read_store_uns(store, name)
    if record is not None and not is_our_record(record) and not replace_foreign:
        raise InputError(f"uns/{name} in {store} exists and was not written by pumap_dask; it "
                         "is never replaced: move it away first, or write the embedding under "
                         "another obsm key (its record goes to uns/<key without 'X_'>)")


def write_store_uns(store: str, name: str, record: Mapping[str, Any], *,
                    replace_foreign: bool = False) -> None:
    """Write ``record`` to ``uns/<name>`` of an AnnData ``.zarr`` store.

    The entry is written beside the store under a hidden name and moved in complete
    (replacing an earlier record of pumap_dask's), so readers see the old record or the
    new one, never a partial one.

    Parameters
    ----------
    store, name, replace_foreign
        As for :func:`check_store_uns` (which refuses a foreign entry here too).
    record
        A dict of values AnnData can store (see :func:`storable`).
    """
    check_store_uns(store, name, replace_foreign=replace_foreign)
    fmt = zarr.open_group(store, mode="r", use_consolidated=False).metadata.zarr_format
    _require_group(store, "uns")
    parent, base = os.path.split(store.rstrip(os.sep))
    partial = os.path.join(parent, f".{base}.uns-{name}.partial")
    if os.path.exists(partial):  # left by an interrupted write
        shutil.rmtree(partial)
    holder = zarr.open_group(partial, mode="w", zarr_format=fmt)
    write_elem = anndata_elem_io()[1]
    if write_elem is not None:
        write_elem(holder, name, dict(record))
    else:  # without anndata: the record as attributes of a plain group
        holder.create_group(name).attrs.update({
            "encoding-type": "dict", "encoding-version": "0.1.0",
            OWNER_KEY: to_jsonable(dict(record))})
    final = os.path.join(store, "uns", name)
    with OutputLock(final):
        _move_into_place(os.path.join(partial, name), final)
    shutil.rmtree(partial, ignore_errors=True)
    _drop_consolidated(store)


def _require_group(store: str, name: str) -> None:
    """Create the AnnData dict group ``name`` (``obsm``, ``uns``) of a store if absent."""
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    if name not in root:
        root.create_group(name).attrs.update({"encoding-type": "dict",
                                              "encoding-version": "0.1.0"})


def _partial_obsm_path(store: str, obsm_key: str) -> str:
    """Where an ``obsm`` array is written until it is complete: beside the store."""
    parent, name = os.path.split(store.rstrip(os.sep))
    return os.path.join(parent, f".{name}.obsm-{obsm_key}.partial")


def _move_into_place(partial: str, final: str) -> None:
    """Replace ``final`` (absent, or an earlier pumap_dask output) by the complete
    ``partial`` array with renames, so readers see the old array or the new one."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(partial, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _anndata_n_obs(root) -> int | None:
    try:
        obs = root["obs"]
        idx = obs.attrs.get("_index", "_index")
        return int(obs[idx].shape[0])
    except Exception:  # not an AnnData layout we know; skip the check
        return None


def _drop_consolidated(store: str) -> None:
    """Refresh consolidated metadata (if present) so readers see the new array."""

    for name in (".zmetadata",):
        if os.path.exists(os.path.join(store, name)):
            zarr.consolidate_metadata(store)
            return
    zj = os.path.join(store, "zarr.json")
    if os.path.exists(zj):
        with open(zj) as f:
            meta = json.load(f)
        if meta.get("consolidated_metadata"):
            zarr.consolidate_metadata(store)
