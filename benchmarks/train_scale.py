"""Training throughput: one process vs DDP ranks (tracker issue 9).

Cell-like data (n x 50) is written to Zarr and fitted once on the threaded scheduler with a
``work_dir`` (kNN + edge shards). Then, each in fresh processes, training alone runs on
those shards for E epochs:

* 1 process: ``python -m pumap_dask.distributed.ddp`` under ``torchrun --nproc-per-node 1``
  (all cores);
* R ranks: the same under ``torchrun --nproc-per-node R`` (Gloo, ``OMP_NUM_THREADS`` =
  cores / R each).

Reported: positive-edge samples per second (steps x batch / training seconds of rank 0)
and the peak RSS of each rank, at two epoch counts (memory should be flat in epochs).
Usage::

    python benchmarks/train_scale.py --n 50000 --epochs 5 20 --ranks 1 2

With ``--accuracy DATASET ...`` (``mnist``: the MNIST test set in ``../shared/data``;
``cells``: cell-like data of ``--n`` rows, 50 features) it measures quality instead: a
random 90/10 split, the 90% written to Zarr and fitted twice with the same ``work_dir``
(partitioned kNN and graph built once) on a 2-worker LocalCluster, once with
``train_world_size=1`` (training in this process) and once with 2 DDP ranks (one Gloo rank
per worker), at the same epochs and batch, so the same number of positive-edge samples;
reported: 15-NN accuracy on the held-out 10% (classifier on the training embedding) and
trustworthiness, per seed::

    python benchmarks/train_scale.py --accuracy mnist cells --n 200000 --seeds 0 1
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


MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                         "data", "mnist10k")


def _load(name: str, n: int):
    import gzip

    import numpy as np

    if name == "mnist":
        def idx(path):
            with gzip.open(path, "rb") as f:
                data = f.read()
            ndim = data[3]
            shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
            return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)

        X = idx(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
        X = X.reshape(len(X), -1).astype(np.float32) / 255.0
        y = idx(os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
        return X, y
    from pumap_dask.datasets import cell_like

    return cell_like(n, 50, random_state=0)


def accuracy_main(args) -> None:
    """1 process vs 2 DDP ranks: held-out 15-NN accuracy at equal edge samples."""
    import logging

    import distributed
    import numpy as np
    import zarr
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    from pumap_dask import ParametricUMAP

    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.accuracy:
        X, y = _load(name, args.n)
        rng = np.random.default_rng(0)
        test = np.zeros(len(X), bool)
        test[rng.choice(len(X), size=len(X) // 10, replace=False)] = True
        tmp = tempfile.mkdtemp(prefix=f"train_acc-{name}-")
        try:
            path = os.path.join(tmp, "train.zarr")
            Xtr, ytr, Xte, yte = X[~test], y[~test], X[test], y[test]
            z = zarr.create_array(path, shape=Xtr.shape, dtype="float32",
                                  chunks=(max(1000, -(-len(Xtr) // 8)), Xtr.shape[1]))
            z[:] = Xtr
            tr = rng.choice(len(ytr), size=min(20_000, len(ytr)), replace=False)
            te = rng.choice(len(yte), size=min(5_000, len(yte)), replace=False)
            with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                          memory_limit="4GiB", dashboard_address=":0") as cl, \
                    distributed.Client(cl):
                for seed in args.seeds:
                    work = os.path.join(tmp, f"work-{seed}")
                    for world in (1, 2):
                        params = dict(knn_method="partitioned", work_dir=work, min_dist=0.5,
                                      random_state=seed, train_world_size=world,
                                      n_epochs=args.n_epochs, batch_size=args.batch_size)
                        t0 = time.perf_counter()
                        m = ParametricUMAP(**params).fit(path)
                        fit_s = time.perf_counter() - t0
                        ete = m.transform(Xte, refine=False)
                        acc = KNeighborsClassifier(15).fit(m.embedding_[tr], ytr[tr]).score(
                            ete[te], yte[te])
                        trust = trustworthiness(Xte[te], ete[te], n_neighbors=15)
                        steps = m.n_epochs_ * -(-m.n_edges_ // min(args.batch_size,
                                                                   m.n_edges_))
                        row = {"data": name, "n": len(X), "seed": seed,
                               "ranks": m.train_world_size_, "epochs": m.n_epochs_,
                               "steps": steps, "edge_samples": steps * min(args.batch_size,
                                                                           m.n_edges_),
                               "train_s": m.timings_.get("train"), "fit_s": fit_s,
                               "acc": float(acc), "trust": float(trust)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n| data | seed | ranks | epochs | steps | edge samples | train (s) | held-out "
          "15-NN acc | trust |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} {r['n']:,} | {r['seed']} | {r['ranks']} | {r['epochs']} | "
              f"{r['steps']} | {r['edge_samples']:,} | {r['train_s']:.1f} | {r['acc']:.3f} | "
              f"{r['trust']:.3f} |")
    for name in args.accuracy:
        for seed in args.seeds:
            pair = {r["ranks"]: r["acc"] for r in rows if r["data"] == name and
                    r["seed"] == seed}
            if 1 in pair and 2 in pair:
                print(f"{name} seed {seed}: 2 ranks - 1 process = {pair[2] - pair[1]:+.3f}")


def main() -> None:
    import dask

    from pumap_dask import ParametricUMAP
    from pumap_dask.datasets import write_cell_like_zarr, write_trajectory_like_zarr
    from pumap_dask.distributed.edges import EdgeStore

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=16384)
    ap.add_argument("--data", choices=("cell", "trajectory"), default="cell",
                    help="the throughput runs' data (cell_like or trajectory_like)")
    ap.add_argument("--accuracy", nargs="+", choices=("mnist", "cells"),
                    help="measure held-out accuracy of 1 process vs 2 DDP ranks instead")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-epochs", type=int, default=None,
                    help="epochs of the --accuracy fits (default: the estimator's)")
    args = ap.parse_args()
    if args.accuracy:
        accuracy_main(args)
        return
    tmp = tempfile.mkdtemp(prefix="train_scale-")
    try:
        path = os.path.join(tmp, "x.zarr")
        write = write_cell_like_zarr if args.data == "cell" else write_trajectory_like_zarr
        write(path, args.n, 50, chunk_rows=max(1000, args.n // 8))
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
                       "--nproc-per-node", str(ranks), "-m", "pumap_dask.distributed.ddp", path, work, out,
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
