"""Scale benchmark of the partitioned kNN + distributed graph (tracker issue 3).

For each size n it writes cell-like Zarr data (n x 50 float32, see
:func:`pumap_dask.datasets.write_cell_like_zarr`), then in the same run:

* ours: :func:`pumap_dask.nearest_neighbors` (method "partitioned") on a
  ``LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="4GiB")`` reading the Zarr
  array, followed by :func:`pumap_dask.distributed.graph_dask.build_edge_store`;
* pynndescent in one process on the in-memory array (:func:`pumap_dask.knn.nndescent_knn`,
  all cores).

Recall@k of both is measured on the same 1000 random rows against exact neighbours.
Peak memory per worker is the largest RSS seen by a sampler polling the workers every
0.25 s. Usage::

    python benchmarks/knn_scale.py --sizes 100000 300000 1000000

``--data trajectory`` uses :func:`pumap_dask.datasets.write_trajectory_like_zarr` (the fit
benchmarks' data) instead. ``--as-fit`` runs our kNN as a fit runs it (issue 18: the fit's kNN
stage against this standalone one): with a work directory (the kNN stored to Zarr and reopened)
and the fit's recall sampling, and reports the parts (``search_s``, ``store_s``, ``recall_s``)::

    python benchmarks/knn_scale.py --sizes 1000000 --data trajectory --as-fit --skip-pynndescent
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakSampler:
    """Polls the RSS of every worker (and this process) from a background thread."""

    def __init__(self, client, interval: float = 0.25) -> None:
        self.client, self.interval = client, interval
        self.peaks: dict[str, int] = {}
        self.local_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for w, v in self.client.run(_rss).items():
                    self.peaks[w] = max(self.peaks.get(w, 0), v)
            except Exception:
                pass
            self.local_peak = max(self.local_peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def exact_for_rows(X: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    from pumap_dask.knn import exact_knn

    ind, dist = exact_knn(X[rows], k + 1, Y=X, device="cpu", exclude_self=False)
    dist[ind == rows[:, None]] = np.inf
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ind, order, 1)


def run_size(n: int, args, client, data_dir: str) -> dict:
    import zarr

    from pumap_dask.datasets import write_cell_like_zarr, write_trajectory_like_zarr
    from pumap_dask.distributed.graph_dask import build_edge_store
    from pumap_dask.knn import knn_recall, nndescent_knn
    from pumap_dask.distributed.knn_dask import nearest_neighbors

    k = args.k
    path = os.path.join(data_dir, f"{args.data}_{n}x{args.n_features}.zarr")
    t0 = time.perf_counter()
    if not (os.path.exists(path) and zarr.open_array(path).shape == (n, args.n_features)):
        write = write_cell_like_zarr if args.data == "cell" else write_trajectory_like_zarr
        write(path, n, n_features=args.n_features, chunk_rows=args.chunk_rows, random_state=0)
    t_write = time.perf_counter() - t0
    rows = np.sort(np.random.default_rng(123).choice(n, size=min(n, args.recall_samples),
                                                     replace=False))
    out = {"n": n, "write_s": t_write}

    # ours ----------------------------------------------------------------------------
    work = tempfile.mkdtemp(prefix="knn_scale_", dir=data_dir)
    client.run(lambda: __import__("gc").collect())
    with PeakSampler(client) as sampler:
        t0 = time.perf_counter()
        res = nearest_neighbors(path, k, "partitioned", client=client,
                                recall_samples=args.recall_samples if args.as_fit else 0,
                                random_state=0, partition_rows=args.partition_rows,
                                work_dir=os.path.join(work, "fit") if args.as_fit else None)
        ind, dist = res
        out["ours_knn_s"] = time.perf_counter() - t0
        if args.as_fit:  # the search and its store to Zarr, then the recall sampling
            out["search_store_s"] = res.timings.get("knn")
            out["recall_s"] = res.timings.get("recall")
            out["fit_recall"] = res.recall
        t0 = time.perf_counter()
        store = build_edge_store(ind, dist, work, client=client)
        out["ours_graph_s"] = time.perf_counter() - t0
        approx = ind[rows].compute()
    out["n_partitions"] = res.n_partitions
    out["worker_peak_rss_gib"] = max(sampler.peaks.values()) / 2**30 if sampler.peaks else None
    out["n_edges"] = store.n_edges
    out["edge_store_mib"] = store.nbytes_on_disk() / 2**20
    del ind, dist, res  # releases the persisted results on the workers

    # pynndescent, one process --------------------------------------------------------
    t0 = time.perf_counter()
    X = zarr.open_array(path)[:]
    out["load_s"] = time.perf_counter() - t0
    if not args.skip_pynndescent:
        t0 = time.perf_counter()
        p_ind, _ = nndescent_knn(X, k, random_state=0, n_jobs=-1)
        out["pynndescent_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = exact_for_rows(X, rows, k)
    out["exact_sample_s"] = time.perf_counter() - t0
    out["ours_recall"] = knn_recall(approx, exact)
    if not args.skip_pynndescent:
        out["pynndescent_recall"] = knn_recall(p_ind[rows], exact)
    shutil.rmtree(work, ignore_errors=True)
    return out


def warm_up(client, k: int) -> None:
    """Compile pynndescent's numba code in the workers and here (not timed)."""
    from pumap_dask.datasets import cell_like
    from pumap_dask.knn import exact_knn, nndescent_knn

    X, _ = cell_like(30_000, random_state=9)

    def compile_here():
        nndescent_knn(X[:20_000], k, random_state=0, n_jobs=1)
        exact_knn(X[:500], k, device="cpu")  # imports torch

    client.run(compile_here)
    nndescent_knn(X, k, random_state=0, n_jobs=-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--n-features", type=int, default=50)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--chunk-rows", type=int, default=100_000)
    p.add_argument("--partition-rows", type=int, default=None)
    p.add_argument("--recall-samples", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="4GiB")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pumap_knn_scale"))
    p.add_argument("--skip-pynndescent", action="store_true")
    p.add_argument("--data", choices=("cell", "trajectory"), default="cell")
    p.add_argument("--as-fit", action="store_true",
                   help="our kNN with a work directory and the fit's recall sampling")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    import logging

    import distributed

    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.data_dir, exist_ok=True)
    results = []
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                  memory_limit=args.memory_limit,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        warm_up(client, args.k)
        for n in args.sizes:
            r = run_size(n, args, client, args.data_dir)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)

    hdr = ("| n | ours kNN (s) | ours graph (s) | pynndescent (s) | recall@k ours | "
           "recall@k pynndescent | partitions | peak RSS/worker (GiB) | edges | "
           "edge store (MiB) |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in results:
        print(f"| {r['n']:,} | {r['ours_knn_s']:.1f} | {r['ours_graph_s']:.1f} | "
              f"{r.get('pynndescent_s', float('nan')):.1f} | {r['ours_recall']:.4f} | "
              f"{r.get('pynndescent_recall', float('nan')):.4f} | {r['n_partitions']} | "
              f"{r['worker_peak_rss_gib']:.2f} | {r['n_edges']:,} | {r['edge_store_mib']:.1f} |")
    by_n = {r["n"]: r for r in results}
    if 100_000 in by_n and 1_000_000 in by_n:
        g = by_n[1_000_000]["ours_knn_s"] / by_n[100_000]["ours_knn_s"]
        print(f"\nkNN time growth 100k -> 1M: {g:.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
