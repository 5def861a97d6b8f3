"""Numeric work inside a Dask worker with and without ``arrays.freed_memory_reused``
(issue 18: training and kNN tasks ran 1.6-2.3x slower on workers than in a plain process).

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which fixes glibc's
thresholds, so every temporary above 128 KiB is mapped and unmapped on each use. On a
``LocalCluster(n_workers=1, threads_per_worker=1)`` this times, in the worker:

* ``exact``: exact 16-NN of 1000 query rows against 200k x 50 rows (the recall sampling's
  per-block task);
* ``train``: 200 Adam steps of a 50-256-256-2 MLP on 3,300 rows (a training step's size);

each plainly and inside ``freed_memory_reused``, alternating, best of ``--repeats``, and the
same in this process (glibc's dynamic defaults) for reference. Usage::

    python benchmarks/worker_allocator.py --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np


def _exact(X, Q):
    from pumap_dask.knn import exact_knn

    exact_knn(Q, 16, Y=X, device="cpu", exclude_self=False)


def _train(steps: int = 200):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(50, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    opt = torch.optim.Adam(net.parameters())
    x = torch.randn(3300, 50)
    for _ in range(steps):
        loss = net(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def timed(kind: str, reuse: bool, X=None, Q=None) -> float:
    import torch

    from pumap_dask.arrays import freed_memory_reused

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if reuse:
        with freed_memory_reused():
            _exact(X, Q) if kind == "exact" else _train()
    else:
        _exact(X, Q) if kind == "exact" else _train()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, force=True)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    from distributed import Client, LocalCluster

    from pumap_dask.datasets import trajectory_like

    X, _ = trajectory_like(200_000, random_state=0)
    X = X.astype(np.float32)
    Q = X[::200][:1000]
    rows = []
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                      memory_limit="6GiB") as lc, Client(lc) as client:
        Xf, Qf = client.scatter(X), client.scatter(Q)
        for kind in ("exact", "train"):
            best = {}
            for _ in range(args.repeats):
                for reuse in (False, True):
                    s = client.submit(timed, kind, reuse, Xf, Qf, pure=False).result()
                    best[reuse] = min(best.get(reuse, np.inf), s)
            here = min(timed(kind, False, X, Q) for _ in range(args.repeats))
            rows.append((kind, best[False], best[True], here))
    print("| work | worker, plain (s) | worker, freed_memory_reused (s) | ratio | "
          "plain process (s) |")
    print("|---|---|---|---|---|")
    for kind, plain, reused, here in rows:
        print(f"| {kind} | {plain:.2f} | {reused:.2f} | {plain / reused:.2f}x | {here:.2f} |")


if __name__ == "__main__":
    main()
