"""Mapped training rows under a memory limit: what releasing their pages costs (issue 18).

A training rank on a node maps the node's row cache (:mod:`pumap_dask.distributed.rowcache`);
the pages it touches count in its resident memory, which a Dask worker's memory limit counts.
:class:`pumap_dask.train.MappedRows` releases them above
:data:`pumap_dask.train.MAPPED_ROWS_RELEASE_AT` of the point where the worker would be killed
(``memory_limit``). This gathers random batches of
rows from a ``.npy`` row file (``--rows``; default: a new file of ``--n`` random rows) as a
training step does, without a limit and then with one set ``--room`` GiB above the memory
the process holds before the gathers, and prints the time per gather, the releases and the
largest mapped-rows residency seen (``RssFile`` of ``/proc/self/status``, Linux).

Usage::

    python benchmarks/mapped_rows.py --rows /path/to/rows.npy --room 1.0
    python benchmarks/mapped_rows.py --n 10000000 --room 1.0
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np
import psutil
import torch

from pumap_dask import train
from pumap_dask.encoder import Encoder

logger = logging.getLogger("mapped_rows")
GIB = 2.0**30


def rss_file() -> int:
    """Bytes of file-backed pages this process has mapped in (``RssFile``)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssFile:"))


def gathers(rows: train.MappedRows, steps: int, batch: int, seed: int) -> dict:
    """``steps`` gathers of ``batch`` random rows: seconds per gather, peak ``RssFile``."""
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(len(rows), (batch,), generator=gen) for _ in range(steps)]
    peak = 0
    t0 = time.perf_counter()
    for i, b in enumerate(ids):
        rows[b]
        if i % 16 == 0:
            peak = max(peak, rss_file())
    seconds = time.perf_counter() - t0
    return {"us_per_gather": 1e6 * seconds / steps,
            "peak_rss_file_gib": max(peak, rss_file()) / GIB, "releases": rows.releases}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", help="a .npy file of float32 rows (default: written here)")
    ap.add_argument("--n", type=int, default=2_000_000, help="rows of the written file")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=1300, help="rows per gather (a 10M step's)")
    ap.add_argument("--room", type=float, default=1.0,
                    help="GiB above the current memory at which pages are released")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    path, tmp = args.rows, None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="mapped-rows-")
        path = os.path.join(tmp, "rows.npy")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.n, 50))
        rng = np.random.default_rng(0)
        for i in range(0, args.n, 500_000):
            out[i:i + 500_000] = rng.standard_normal((min(500_000, args.n - i), 50))
        del out
    try:
        X = np.load(path, mmap_mode="r")
        enc = Encoder(X.shape[1], 2, (8,), 0, "silu")
        enc.prepare(np.asarray(X[:20000]))
        mib = X.nbytes / 2**20
        free = gathers(train.MappedRows(X, enc), args.steps, args.batch, 1)
        free_again = gathers(train.MappedRows(X, enc), args.steps, args.batch, 2)
        # a limit whose release point lies `room` GiB above what the process holds now
        # (the mapping released first, so the room is for the rows)
        train.MappedRows(X, enc, memory_limit=1)._keep_under_limit()
        now = psutil.Process().memory_info().rss
        limit = int((now + args.room * GIB) / train.MAPPED_ROWS_RELEASE_AT)
        bounded = gathers(train.MappedRows(X, enc, memory_limit=limit), args.steps, args.batch, 3)
        print("| rows file | gathers x rows | limit | us per gather | releases "
              "| peak mapped GiB |")
        print("|---|---|---|---|---|---|")
        for name, r in (("none (first pass)", free), ("none (pages resident)", free_again),
                        (f"release at +{args.room:.2f} GiB", bounded)):
            print(f"| {mib:,.0f} MiB | {args.steps} x {args.batch} | {name} | "
                  f"{r['us_per_gather']:.0f} | {r['releases']} | {r['peak_rss_file_gib']:.2f} |")
    finally:
        if tmp is not None:
            os.remove(path)
            os.rmdir(tmp)


if __name__ == "__main__":
    main()
