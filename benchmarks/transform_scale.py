"""End-to-end lazy transform throughput: Zarr in -> embedding Zarr out, on a LocalCluster.

For each n (default 1M and 10M rows of 50 float32 cell-like features, written chunk by
chunk), runs ``transform_to_zarr`` on a ``LocalCluster`` of 2 single-threaded workers and
reports rows/s and the peak RSS of each worker, against the same encoder's forward pass on
an in-memory numpy block in this process (the compute limit), measured in the same run.

Usage::

    python benchmarks/transform_scale.py                       # 1M and 10M
    python benchmarks/transform_scale.py --sizes 1000000 --workdir /tmp/ts
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import threading
import time

import numpy as np


def fit_model(workdir: str, hidden_layers, n_projection: int) -> str:
    """A model with the requested architecture (quality is irrelevant here: few epochs)."""
    from pumap_dask import ParametricUMAP
    from pumap_dask.datasets import cell_like

    X, _ = cell_like(20000, 50, random_state=0)
    m = ParametricUMAP(hidden_layers=hidden_layers, n_projection=n_projection, n_epochs=3,
                       device="cpu", random_state=0).fit(X)
    return m.save(os.path.join(workdir, "model"))


def forward_limit(model_dir: str, rows: int = 500_000, threads: int = 2) -> float:
    """Rows/s of the encoder's forward pass on an in-memory block (this process)."""
    import torch

    from pumap_dask.model import load_encoder
    from pumap_dask.encoder import encode

    enc, _ = load_encoder(model_dir)
    X = np.random.default_rng(0).standard_normal((rows, enc.n_features)).astype(np.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encode(enc, X[:10000])  # warm-up
        t0 = time.perf_counter()
        encode(enc, X)
        return rows / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


def _warm(model_dir: str) -> None:
    """Import torch and load the model into the worker's cache (what a warm cluster has)."""
    from pumap_dask.transform import _get_encoder, model_source

    _get_encoder(model_source(model_dir), "cpu")


class PeakRSS:
    """Samples every worker's RSS in a background thread; keeps the maximum per worker."""

    def __init__(self, client, interval: float = 0.25) -> None:
        self.client, self.interval = client, interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                rss = self.client.run(lambda: psutil.Process().memory_info().rss)
                for w, v in rss.items():
                    self.peak[w] = max(self.peak.get(w, 0), v)
            except Exception:  # a worker restarting; keep sampling
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1_000_000, 10_000_000])
    ap.add_argument("--chunk-rows", type=int, default=250_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="1.5GiB")
    ap.add_argument("--hidden-layers", nargs="+", type=int, default=None)
    ap.add_argument("--n-projection", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/pumap_transform_scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from distributed import Client, LocalCluster

    from pumap_dask.datasets import write_cell_like_zarr
    from pumap_dask.estimator import DEFAULT_HIDDEN, DEFAULT_PROJECTION
    from pumap_dask.writers import transform_to_zarr

    hidden = tuple(args.hidden_layers or DEFAULT_HIDDEN)
    proj = DEFAULT_PROJECTION if args.n_projection is None else args.n_projection
    os.makedirs(args.workdir, exist_ok=True)
    model_dir = fit_model(args.workdir, hidden, proj)
    limit2 = forward_limit(model_dir, threads=2)
    limit1 = forward_limit(model_dir, threads=1)
    from pumap_dask.model import read_config

    spec = read_config(model_dir)["encoder"]
    print(f"encoder: {spec['n_features']} -> projection {spec['n_projection'] or 'none'} -> "
          f"{tuple(spec['hidden_layers'])} -> {spec['n_components']}")
    print(f"in-memory forward: {limit2:,.0f} rows/s (2 threads), {limit1:,.0f} rows/s "
          "(1 thread)")
    print(f"{'n':>11} {'write_data_s':>12} {'warmup_s':>8} {'transform_s':>11} {'rows/s':>11} "
          f"{'vs_limit':>8} {'peak_rss_per_worker_MiB':>24}")
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      memory_limit=args.memory_limit, dashboard_address=None) as lc, \
            Client(lc) as client:
        for n in args.sizes:
            src = os.path.join(args.workdir, f"cells_{n}.zarr")
            t0 = time.perf_counter()
            if not os.path.exists(os.path.join(src, "zarr.json")):
                write_cell_like_zarr(src, n, 50, chunk_rows=args.chunk_rows, random_state=0)
            t_data = time.perf_counter() - t0
            out = os.path.join(args.workdir, f"emb_{n}.zarr")
            client.restart()  # fresh workers: peak RSS is this n's alone
            t0 = time.perf_counter()
            client.run(_warm, model_dir)
            t_warm = time.perf_counter() - t0
            with PeakRSS(client) as mem:
                t0 = time.perf_counter()
                transform_to_zarr(src, model_dir, out, resume=False)
                dt = time.perf_counter() - t0
            peaks = ", ".join(f"{v / 2**20:.0f}" for v in sorted(mem.peak.values()))
            print(f"{n:11,d} {t_data:12.1f} {t_warm:8.1f} {dt:11.1f} {n / dt:11,.0f} "
                  f"{n / dt / limit2:8.2f} {peaks:>24}", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
