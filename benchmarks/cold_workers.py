"""The first kNN on fresh Dask workers against the second one (tracker issue 19, cold workers).

Starts a LocalCluster through :func:`pumap_dask.distributed.cluster.connect` (``--workers``
processes of one thread each; their ``NUMBA_CACHE_DIR`` is ``--cache-dir``, else
:func:`~pumap_dask.distributed.cluster.numba_cache_dir`), then runs the partitioned kNN of
``--rows`` x ``--features`` cell-like rows twice (5k rows: one partition, searched by
pynndescent on one worker). Printed: cluster start, optional warm-up (``--warm-up``: a
200-row pynndescent kNN on every worker at once), first and second kNN, each as wall
seconds and the CPU seconds all workers spent; and the ``.nbi`` files in the cache
directory before and after. Run it twice with the same ``--cache-dir`` (the first time on an
empty directory): the second run shows what numba's disk cache saves. ``--local-exact-work``
sets :data:`pumap_dask.distributed.knn_dask.LOCAL_EXACT_WORK` on the workers (e.g. 2e9:
this partition is searched exactly, no numba). Usage::

    OMP_NUM_THREADS=1 python benchmarks/cold_workers.py --cache-dir /tmp/numba-cold
    OMP_NUM_THREADS=1 python benchmarks/cold_workers.py --cache-dir /tmp/numba-cold
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np


def _cpu() -> float:
    return time.process_time()


def _warm_knn() -> float:
    """A tiny pynndescent kNN on this worker (numba compiles here); returns its seconds."""
    from pumap_dask.distributed import knn_dask
    from pumap_dask.knn import nndescent_knn

    t0 = time.perf_counter()
    X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    nndescent_knn(X, 15, random_state=0, n_jobs=1, **knn_dask.LOCAL_NNDESCENT)
    return time.perf_counter() - t0


def _set_exact_work(value: float) -> None:
    from pumap_dask.distributed import knn_dask

    knn_dask.LOCAL_EXACT_WORK = value


def _cache_files(path: str) -> int:
    return len(glob.glob(os.path.join(path, "**", "*.nbi"), recursive=True))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--features", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", help="the workers' NUMBA_CACHE_DIR (default: pumap_dask's)")
    ap.add_argument("--warm-up", action="store_true",
                    help="compile pynndescent on every worker before the first kNN")
    ap.add_argument("--local-exact-work", type=float,
                    help="knn_dask.LOCAL_EXACT_WORK on the workers (exact search below it)")
    args = ap.parse_args(argv)

    import dask.array as da

    from pumap_dask.datasets import cell_like
    from pumap_dask.distributed import cluster, knn_dask

    if args.cache_dir:
        os.environ["NUMBA_CACHE_DIR"] = args.cache_dir
    cache = cluster.numba_cache_dir()
    before = _cache_files(cache)
    X, _ = cell_like(args.rows, n_features=args.features, random_state=0)
    dX = da.from_array(np.asarray(X, dtype=np.float32), chunks=(max(1, args.rows // 2), -1))

    t0 = time.perf_counter()
    client = cluster.connect({"scheduler": "local", "workers": args.workers, "threads": 1,
                              "memory": "3GiB", "connect_timeout": 120})
    parts = [f"cluster start {time.perf_counter() - t0:.1f}s"]
    print(f"  {parts[-1]}", flush=True)
    try:
        if args.local_exact_work is not None:
            client.run(_set_exact_work, args.local_exact_work)
        workers = sorted(client.scheduler_info()["workers"])

        def timed(label, fn):
            c0 = sum(client.run(_cpu).values())
            t = time.perf_counter()
            fn()
            wall = time.perf_counter() - t
            cpu = sum(client.run(_cpu).values()) - c0
            parts.append(f"{label} {wall:.1f}s (worker CPU {cpu:.1f}s)")
            print(f"  {parts[-1]}", flush=True)

        if args.warm_up:
            timed("warm-up", lambda: client.gather(
                [client.submit(_warm_knn, pure=False, workers=[w], allow_other_workers=False)
                 for w in workers]))

        def knn():
            res = knn_dask.nearest_neighbors(dX, 15, "partitioned", client=client,
                                             recall_samples=0, random_state=0)
            client.compute(list(res), sync=True)

        timed("first kNN", knn)
        timed("second kNN", knn)
    finally:
        cluster.close(client)
    print(f"{args.rows} x {args.features}, {args.workers} workers x 1 thread, NUMBA_CACHE_DIR "
          f"{cache} ({before} -> {_cache_files(cache)} cached kernels): " + ", ".join(parts),
          flush=True)


if __name__ == "__main__":
    main()
