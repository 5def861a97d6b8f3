"""Fit at scale (tracker issue 8): pumap_dask from Zarr on a LocalCluster vs umap-learn.

For each size n: trajectory-rich cell data (:func:`pumap_dask.datasets.trajectory_like`,
issue 20's harder data; ``--data cell`` for :func:`pumap_dask.datasets.cell_like`), 50
features, a random 90/10 split; the 90% is written to a Zarr array (chunks of 50,000 rows). Then, each
in a fresh Python process:

* pumap_dask: ``ParametricUMAP(min_dist=0.5, work_dir=...)`` fitted on the Zarr path with a
  ``LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="4GiB")`` as the active
  client; the held-out 10% is projected with ``transform``. Peak RSS of the client process
  and of each worker is sampled every 0.25 s.
* umap-learn: ``umap.UMAP(min_dist=0.5)`` fit on the in-memory 90%, then ``transform`` of the
  10% (only for n <= --umap-max).

Quality on a 5,000-row held-out sample: 15-NN accuracy of a classifier trained on the
embedding of a 20,000-row training sample, and trustworthiness (k=15) of the held-out
embedding; fine-scale kNN preservation (``kp_full``) of 3,000 training rows: the share of
each row's 15 input-space neighbours among *all* training rows that stay among its 15
neighbours in the training embedding. Usage::

    python benchmarks/fit_scale.py --sizes 200000
    python benchmarks/fit_scale.py --sizes 1000000 --umap-max 0
    python benchmarks/fit_scale.py --sizes 200000 --params '{"init": "spectral"}'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from knn_scale import PeakSampler  # noqa: E402  (polls the client's and workers' RSS)
from local_structure import _neighbours, _overlap  # noqa: E402  (kNN preservation)


def prepare(n: int, tmp: str, seed: int = 0, data: str = "trajectory") -> dict:
    """Write the 90% training split to Zarr; keep held-out rows and labels as .npy."""
    import zarr

    from pumap_dask.datasets import cell_like, trajectory_like

    make = trajectory_like if data == "trajectory" else cell_like
    X, y = make(n, 50, random_state=seed)[:2]
    rng = np.random.default_rng(seed)
    test = np.zeros(n, bool)
    test[rng.choice(n, size=n // 10, replace=False)] = True
    paths = {"train": os.path.join(tmp, "train.zarr"), "ytrain": os.path.join(tmp, "ytrain.npy"),
             "test": os.path.join(tmp, "test.npy"), "ytest": os.path.join(tmp, "ytest.npy"),
             "train_npy": os.path.join(tmp, "train.npy")}
    z = zarr.create_array(paths["train"], shape=(int((~test).sum()), 50), chunks=(50_000, 50),
                          dtype="float32")
    z[:] = X[~test]
    np.save(paths["train_npy"], X[~test])
    np.save(paths["ytrain"], y[~test])
    np.save(paths["test"], X[test])
    np.save(paths["ytest"], y[test])
    return paths


def child_pumap(paths: dict, out: str, params: dict, workers: int,
                landmarks: int | None) -> None:
    import logging

    import distributed

    import pumap_dask
    import pumap_dask.pipeline

    if landmarks is not None:
        pumap_dask.pipeline.N_LANDMARKS = landmarks

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  memory_limit="4GiB", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        work = os.path.join(os.path.dirname(out), "work")
        with PeakSampler(client) as peaks:
            t0 = time.perf_counter()
            m = pumap_dask.ParametricUMAP(min_dist=0.5, random_state=0, work_dir=work,
                                          verbose=True, **params).fit(paths["train"])
            fit_s = time.perf_counter() - t0
        emb_train = m.embedding_
    t0 = time.perf_counter()
    emb_test = m.transform(np.load(paths["test"]), refine=False)  # the encoder
    tr_s = time.perf_counter() - t0
    np.save(out + ".train.npy", emb_train)
    np.save(out + ".test.npy", emb_test)
    info = {"fit_s": fit_s, "transform_s": tr_s, "timings": m.timings_,
            "client_peak_gib": peaks.local_peak / 2**30,
            "worker_peak_gib": max(peaks.peaks.values(), default=0) / 2**30,
            "n_epochs": m.n_epochs_, "n_edges": m.n_edges_, "init": getattr(m, "init_", None),
            "knn_method": m.knn_method_, "knn_recall": getattr(m, "knn_recall_", None)}
    with open(out + ".json", "w") as f:
        json.dump(info, f)


def child_umap(paths: dict, out: str) -> None:
    import umap

    X = np.load(paths["train_npy"])
    t0 = time.perf_counter()
    m = umap.UMAP(min_dist=0.5, random_state=None).fit(X)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb_test = m.transform(np.load(paths["test"]))
    tr_s = time.perf_counter() - t0
    np.save(out + ".train.npy", m.embedding_.astype(np.float32))
    np.save(out + ".test.npy", emb_test.astype(np.float32))
    with open(out + ".json", "w") as f:
        json.dump({"fit_s": fit_s, "transform_s": tr_s}, f)


def quality(paths: dict, out: str, seed: int = 0) -> dict:
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(seed)
    ytr, yte = np.load(paths["ytrain"]), np.load(paths["ytest"])
    Xte = np.load(paths["test"])
    etr, ete = np.load(out + ".train.npy"), np.load(out + ".test.npy")
    tr = rng.choice(len(ytr), size=min(20_000, len(ytr)), replace=False)
    te = rng.choice(len(yte), size=min(5_000, len(yte)), replace=False)
    acc = KNeighborsClassifier(15).fit(etr[tr], ytr[tr]).score(ete[te], yte[te])
    trust = trustworthiness(Xte[te], ete[te], n_neighbors=15)
    Xtr = np.load(paths["train_npy"], mmap_mode="r")
    s = np.sort(rng.choice(len(ytr), size=min(3_000, len(ytr)), replace=False))
    kp = _overlap(_neighbours(np.asarray(Xtr), np.asarray(Xtr[s]), True),
                  _neighbours(etr, etr[s], True))
    return {"acc": float(acc), "trust": float(trust), "kp_full": float(kp)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000])
    ap.add_argument("--data", choices=("trajectory", "cell"), default="trajectory")
    ap.add_argument("--umap-max", type=int, default=300_000,
                    help="run umap-learn up to this size (0: never)")
    ap.add_argument("--params", default="{}", help="extra ParametricUMAP params as JSON")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--landmarks", type=int, default=None,
                    help="rows of the spectral init's landmark sample (pumap_dask.pipeline."
                         "N_LANDMARKS); a value >= n gives the full-graph spectral init")
    ap.add_argument("--json", help="append the rows to this JSON file")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "PATHS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, pjson, out = args.child
        paths = json.loads(pjson)
        if kind == "pumap":
            child_pumap(paths, out, json.loads(args.params), args.workers, args.landmarks)
        else:
            child_umap(paths, out)
        return
    rows = []
    for n in args.sizes:
        tmp = tempfile.mkdtemp(prefix=f"fit_scale-{n}-")
        try:
            paths = prepare(n, tmp, data=args.data)
            kinds = ["pumap"] + (["umap"] if n <= args.umap_max else [])
            for kind in kinds:
                out = os.path.join(tmp, kind)
                cmd = [sys.executable, os.path.abspath(__file__), "--params", args.params,
                       "--workers", str(args.workers), "--child", kind, json.dumps(paths), out]
                if args.landmarks is not None:
                    cmd[2:2] = ["--landmarks", str(args.landmarks)]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True)
                wall = time.perf_counter() - t0
                with open(out + ".json") as f:
                    row = json.load(f)
                row.update(quality(paths, out), n=n, method=kind, process_wall_s=wall, data=args.data,
                           params=args.params if kind == "pumap" else "",
                           landmarks=args.landmarks if kind == "pumap" else None)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n| n | method | fit (s) | held-out 15-NN acc | kNN preservation | trust | "
          "client peak GiB | worker peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['method']} | {r['fit_s']:.1f} | {r['acc']:.3f} | "
              f"{r['kp_full']:.3f} | {r['trust']:.3f} | "
              f"{r.get('client_peak_gib', float('nan')):.2f} | "
              f"{r.get('worker_peak_gib', float('nan')):.2f} |")
    if args.json:
        old = []
        if os.path.exists(args.json):
            with open(args.json) as f:
                old = json.load(f)
        with open(args.json, "w") as f:
            json.dump(old + rows, f, indent=1)


if __name__ == "__main__":
    main()
