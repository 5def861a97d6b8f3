"""What the content identity costs (issue 17): the per-block sha256 that keys the work
directory's artefacts and lets a resumed transform check each block it keeps.

On a 2-worker LocalCluster (1 thread each), for a cell-like Zarr input of n x 50 float32:

* transform: ``transform_to_zarr`` (which now hashes every input block in the task that
  feeds the encoder) against the same graph without the hash (``_write_block`` given a
  constant digest), and the hash pass alone;
* fit: the input stage's identity pass (one read of every block: NaN check + hash) against
  the whole fit's wall time, from the fit's own timings.

Usage::

    python benchmarks/identity_cost.py                    # n = 2M transform, 200k fit
    python benchmarks/identity_cost.py --transform-rows 10000000 --fit-rows 1000000
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time

import dask
import numpy as np
from distributed import Client, LocalCluster

import pumap_dask.writers as writers
from pumap_dask import ParametricUMAP
from pumap_dask.datasets import write_cell_like_zarr
from pumap_dask.io import as_dask, block_digests

logger = logging.getLogger("identity_cost")


def _transform(src: str, model: str, out: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    writers.transform_to_zarr(src, model, out)
    return time.perf_counter() - t0


def transform_cost(workdir: str, n: int, model: str) -> dict:
    src = os.path.join(workdir, f"x{n}.zarr")
    if not os.path.exists(src):
        write_cell_like_zarr(src, n, n_features=50, chunk_rows=100_000, random_state=1)
    out = os.path.join(workdir, "emb.zarr")
    _transform(src, model, out)  # warm the workers (torch import, model cache)
    with_hash = min(_transform(src, model, out) for _ in range(2))
    real = writers.block_digests

    def no_hash(darr, what="X", finite=True):  # the same graph, a constant digest per block
        return darr.map_blocks(lambda b: np.zeros((1, 32), np.uint8), dtype=np.uint8,
                               chunks=((1,) * len(darr.chunks[0]), (32,)),
                               meta=np.empty((0, 0), np.uint8))

    writers.block_digests = no_hash
    try:
        without = min(_transform(src, model, out) for _ in range(2))
    finally:
        writers.block_digests = real
    darr = as_dask(src)
    t0 = time.perf_counter()
    block_digests(darr, finite=False).compute()
    alone = time.perf_counter() - t0
    return {"rows": n, "transform_s": with_hash, "transform_without_hash_s": without,
            "overhead": with_hash / without - 1, "hash_pass_alone_s": alone}


def fit_cost(workdir: str, n: int) -> dict:
    src = os.path.join(workdir, f"fit{n}.zarr")
    if not os.path.exists(src):
        write_cell_like_zarr(src, n, n_features=50, chunk_rows=50_000, random_state=2)
    m = ParametricUMAP(knn_method="partitioned", random_state=0, device="cpu")
    t0 = time.perf_counter()
    m.fit(src)
    total = time.perf_counter() - t0
    ident = m.timings_.get("input", float("nan"))  # opening, checks and the identity pass
    return {"rows": n, "fit_s": total, "input_stage_s": ident, "share": ident / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transform-rows", type=int, default=2_000_000)
    ap.add_argument("--fit-rows", type=int, default=200_000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = args.workdir or tempfile.mkdtemp(prefix="identity_cost-")
    os.makedirs(workdir, exist_ok=True)
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="6GiB",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        with dask.config.set(scheduler=client):
            f = fit_cost(workdir, args.fit_rows)
            logger.info("fit %d rows: %.1f s in all, input stage (identity pass included) "
                        "%.2f s = %.1f%%", f["rows"], f["fit_s"], f["input_stage_s"],
                        100 * f["share"])
            model = ParametricUMAP(n_epochs=3, device="cpu", random_state=0).fit(
                np.random.default_rng(0).standard_normal((5000, 50)).astype(np.float32))
            path = model.save(os.path.join(workdir, "model"))
            t = transform_cost(workdir, args.transform_rows, path)
            logger.info("transform %d rows Zarr -> Zarr: %.2f s with the per-block hash, "
                        "%.2f s without (%+.1f%%); the hash pass alone %.2f s", t["rows"],
                        t["transform_s"], t["transform_without_hash_s"], 100 * t["overhead"],
                        t["hash_pass_alone_s"])
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
