"""Training throughput: one process vs DDP ranks (tracker issue 9).

Cell-like data (n x 50) is written to Zarr and fitted once on the threaded scheduler with a
``work_dir`` (kNN + edge shards). Then, each in fresh processes, training alone runs on
those shards for E epochs:

* 1 process: ``python -m pumap_dask.ddp`` under ``torchrun --nproc-per-node 1``
  (all cores);
* R ranks: the same under ``torchrun --nproc-per-node R`` (Gloo, ``OMP_NUM_THREADS`` =
  cores / R each).

Reported: positive-edge samples per second (steps x batch / training seconds of rank 0)
and the peak RSS of each rank, at two epoch counts (memory should be flat in epochs).
Usage::

    python benchmarks/train_scale.py --n 50000 --epochs 5 20 --ranks 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time


def _peak_rss_of_children(proc, stop, peaks):
    import psutil

    parent = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            for c in parent.children(recursive=True):
                try:
                    peaks[c.pid] = max(peaks.get(c.pid, 0), c.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            break
        time.sleep(0.2)


def main() -> None:
    import dask

    from pumap_dask import ParametricUMAP
    from pumap_dask.datasets import write_cell_like_zarr
    from pumap_dask.edges import EdgeStore

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=16384)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="train_scale-")
    try:
        path = os.path.join(tmp, "x.zarr")
        write_cell_like_zarr(path, args.n, 50, chunk_rows=max(1000, args.n // 8))
        work = os.path.join(tmp, "work")
        with dask.config.set(scheduler="threads"):
            ParametricUMAP(knn_method="partitioned", work_dir=work, n_epochs=1,
                           train_world_size=1, device="cpu").fit(path)
        n_edges = EdgeStore(os.path.join(work, "graph")).n_edges
        cores = os.cpu_count() or 1
        rows = []
        for epochs in args.epochs:
            for ranks in args.ranks:
                shutil.rmtree(os.path.join(work, "train-ddp"), ignore_errors=True)
                out = os.path.join(tmp, f"enc-{ranks}-{epochs}.pt")
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(ranks), "-m", "pumap_dask.ddp", path, work, out,
                       "--n-epochs", str(epochs), "--batch-size", str(args.batch_size),
                       "--device", "cpu"]
                proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
                stop, peaks = threading.Event(), {}
                th = threading.Thread(target=_peak_rss_of_children, args=(proc, stop, peaks))
                th.start()
                _, err = proc.communicate()
                stop.set()
                th.join()
                if proc.returncode:
                    raise RuntimeError(err[-2000:])
                secs = float(err.split("rank 0 wrote")[1].split("(")[1].split("s)")[0])
                steps = epochs * -(-n_edges // args.batch_size)
                row = {"n": args.n, "ranks": ranks, "epochs": epochs, "steps": steps,
                       "train_s": secs, "samples_per_s": steps * args.batch_size / secs,
                       "peak_rss_gib": sorted(p / 2**30 for p in peaks.values())[-ranks:]}
                rows.append(row)
                print(json.dumps(row), flush=True)
        print("\n| ranks | epochs | steps | train (s) | samples/s | peak RSS per rank (GiB) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['ranks']} | {r['epochs']} | {r['steps']} | {r['train_s']:.1f} | "
                  f"{r['samples_per_s']:,.0f} | "
                  f"{', '.join(f'{p:.2f}' for p in r['peak_rss_gib'])} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
