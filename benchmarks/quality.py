"""Quality and speed of pumap_dask against umap-learn's UMAP, in one run.

For each data set (sklearn digits, the seed's clusters, MNIST test set when present) the
rows are split 70/30; each method fits on 70% and projects the held-out 30%. Every fit runs
in a fresh Python process (so JIT compilation and imports count as a user sees them).

Reported per method: trustworthiness (k=15) of the held-out embedding, held-out 15-NN
classifier accuracy (classifier trained on the training embedding), fit and transform time.

Usage::

    python benchmarks/quality.py                      # all data sets, both methods
    python benchmarks/quality.py --datasets digits    # one data set
    python benchmarks/quality.py --seeds 0 1 2        # repeat with several seeds
    python benchmarks/quality.py --refine             # also pumap_dask transform(refine=True)
    python benchmarks/quality.py --knn-method hnsw    # pumap_dask's kNN back-end (default auto)

``--refine`` adds the row ``pumap_dask+refine``: the same fitted model (same process, same
fit) projecting the held-out rows with ``transform(X, refine=True)`` (issue 11); its
``transform_s`` is the refined transform's whole time (encoder + kNN + polish).
``cells20k`` is :func:`pumap_dask.datasets.cell_like` (20,000 rows, 50 features).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MNIST_DIR = os.path.join(HERE, "..", "..", "shared", "data", "mnist10k")


def _idx(path: str) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


def load_dataset(name: str):
    """(X float32, labels) for a data set name, or None when unavailable."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data.astype(np.float32), d.target
    if name == "clusters":
        from pumap_dask.datasets import clusters

        return clusters(1500, 32, 10, random_state=42)
    if name == "cells20k":
        from pumap_dask.datasets import cell_like

        return cell_like(20000, 50, random_state=0)
    if name == "mnist":
        img = os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")
        if not os.path.exists(img):
            return None
        X = _idx(img).reshape(10000, -1).astype(np.float32) / 255.0
        y = _idx(os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
        return X, y
    raise ValueError(name)


def split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    p = rng.permutation(n)
    k = int(0.7 * n)
    return np.sort(p[:k]), np.sort(p[k:])


def worker(method: str, dataset: str, seed: int, out: str, refine: bool = False,
           knn_method: str = "auto") -> None:
    """Runs in a fresh process: fit + transform, save embeddings and timings."""
    t_import = time.perf_counter()
    X, y = load_dataset(dataset)
    tr, te = split(len(X), seed)
    if method == "pumap_dask":
        from pumap_dask import ParametricUMAP

        model = ParametricUMAP(random_state=seed, device="cpu", knn_method=knn_method)
    else:
        import umap

        model = umap.UMAP(random_state=None)
    t0 = time.perf_counter()
    model.fit(X[tr])
    t1 = time.perf_counter()
    E_te = model.transform(X[te])
    t2 = time.perf_counter()
    extra = {}
    if refine and method == "pumap_dask":
        extra["test_refined"] = np.asarray(model.transform(X[te], refine=True))
        extra["refine_s"] = np.array(time.perf_counter() - t2)
    np.savez(out, train=np.asarray(model.embedding_), test=np.asarray(E_te),
             timing=np.array([t0 - t_import, t1 - t0, t2 - t1]), **extra)


def evaluate(dataset: str, method: str, seed: int, refine: bool = False,
             knn_method: str = "auto") -> list[dict]:
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    X, y = load_dataset(dataset)
    tr, te = split(len(X), seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.npz")
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--worker", method, dataset, str(seed), out]
                       + (["--refine"] if refine else []) + ["--knn-method", knn_method],
                       check=True)
        wall = time.perf_counter() - t
        res = dict(np.load(out))
        E_tr, E_te, timing = res["train"], res["test"], res["timing"]
    clf = KNeighborsClassifier(15).fit(E_tr, y[tr])
    rows = [{
        "dataset": dataset, "method": method, "seed": seed,
        "knn_method": knn_method if method == "pumap_dask" else None,
        "n_train": len(tr), "n_test": len(te),
        "trust_test": trustworthiness(X[te], E_te, n_neighbors=15),
        "knn_acc_test": clf.score(E_te, y[te]),
        "fit_s": float(timing[1]), "transform_s": float(timing[2]), "process_s": wall,
    }]
    if "test_refined" in res:
        E_rf = res["test_refined"]
        rows.append({**rows[0], "method": method + "+refine",
                     "trust_test": trustworthiness(X[te], E_rf, n_neighbors=15),
                     "knn_acc_test": clf.score(E_rf, y[te]),
                     "transform_s": float(res["refine_s"])})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "clusters", "mnist"])
    ap.add_argument("--methods", nargs="+", default=["pumap_dask", "umap-learn"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--refine", action="store_true",
                    help="also report pumap_dask's transform(X, refine=True) (issue 11)")
    ap.add_argument("--knn-method", default="auto",
                    help="pumap_dask's knn_method: auto, exact, nndescent or hnsw (issue 11)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, dataset, seed, out = args.worker
        worker(method, dataset, int(seed), out, refine=args.refine,
               knn_method=args.knn_method)
        return
    rows = []
    hdr = f"{'dataset':9} {'method':11} {'seed':>4} {'trust':>7} {'knn_acc':>8} " \
          f"{'fit_s':>7} {'transform_s':>11}"
    print(hdr)
    for dataset in args.datasets:
        if load_dataset(dataset) is None:
            print(f"{dataset:9} (not available, skipped)")
            continue
        for seed in args.seeds:
            for method in args.methods:
                for r in evaluate(dataset, method, seed, refine=args.refine,
                                  knn_method=args.knn_method):
                    rows.append(r)
                    print(f"{dataset:9} {r['method']:11} {seed:4d} {r['trust_test']:7.4f} "
                          f"{r['knn_acc_test']:8.4f} {r['fit_s']:7.2f} "
                          f"{r['transform_s']:11.4f}", flush=True)
    if len(args.methods) == 2:
        print("\nratios (pumap_dask / umap-learn, mean over seeds)")
        for dataset in args.datasets:
            a = [r for r in rows if r["dataset"] == dataset and r["method"] == args.methods[0]]
            b = [r for r in rows if r["dataset"] == dataset and r["method"] == args.methods[1]]
            if not a or not b:
                continue

            def m(rs, k):
                return float(np.mean([r[k] for r in rs]))

            print(f"{dataset:9} d_acc {m(a, 'knn_acc_test') - m(b, 'knn_acc_test'):+.4f} "
                  f"d_trust {m(a, 'trust_test') - m(b, 'trust_test'):+.4f} "
                  f"fit {m(a, 'fit_s') / m(b, 'fit_s'):.2f}x "
                  f"transform speed-up {m(b, 'transform_s') / m(a, 'transform_s'):.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
