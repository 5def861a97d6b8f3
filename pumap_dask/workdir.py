"""The fit's work directory: owned, locked, and never anyone else's files.

A work directory holds the kNN cache, the graph's edge shards and the training
checkpoints of one fit, so that a rerun resumes. It is ours only when it carries the
marker file :data:`WORK_MARKER`: a new or empty directory is claimed (the marker is
written), a directory that holds other files is refused, and a fit holds an exclusive lock
on it while it runs, so two fits never share one. Its artefacts record what produced them
(the input's content digest, the parameters), and each stage reuses one only when that
matches (:mod:`pumap_dask.distributed.knn_dask`, :mod:`pumap_dask.checkpoint`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Iterator

from .errors import InputError
from .writers import OutputLock

logger = logging.getLogger(__name__)

WORK_MARKER = ".pumap-work"
_NOTE = "pumap-dask work directory (kNN cache, graph shards, training checkpoints)\n"


def is_work_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a work directory pumap_dask made (it holds :data:`WORK_MARKER`)."""
    return os.path.isfile(os.path.join(os.fspath(path), WORK_MARKER))


def claim_work_dir(path: str | os.PathLike, note: str = _NOTE) -> str:
    """Make ``path`` a work directory of ours, or refuse it.

    A missing or empty directory is created and marked; one that is already ours is kept
    (its artefacts are reused where they match); anything else is refused before any work.

    Raises
    ------
    InputError
        When ``path`` is a file, or a non-empty directory pumap_dask did not make.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InputError(f"work_dir {path} exists and is not a directory; pass a new or empty "
                         "directory (CLI: --work-dir)")
    if os.path.isdir(path) and not is_work_dir(path) and os.listdir(path):
        raise InputError(f"work_dir {path} holds files pumap_dask did not write, and they are "
                         "never overwritten or deleted: pass a new or empty directory (CLI: "
                         "--work-dir)")
    os.makedirs(path, exist_ok=True)
    if not is_work_dir(path):
        tmp = os.path.join(path, WORK_MARKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(note)
        os.replace(tmp, os.path.join(path, WORK_MARKER))
    return path


@contextlib.contextmanager
def work_directory(work_dir: str | os.PathLike | None,
                   temporary: bool = True) -> Iterator[str | None]:
    """The fit's work directory for the duration of the fit.

    ``work_dir`` given: claimed (:func:`claim_work_dir`) and locked, kept afterwards. None:
    a temporary directory (``temporary``; removed after) or None.
    """
    if work_dir is not None:
        path = claim_work_dir(work_dir)
        with OutputLock(path):  # a second fit on the same directory fails at once
            yield path
        return
    if not temporary:
        yield None
        return
    tmp = tempfile.mkdtemp(prefix="pumap_dask-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
