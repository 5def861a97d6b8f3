"""Quality and speed of pumap_dask against umap-learn's UMAP, in one run.

For each data set (sklearn digits, the seed's clusters, MNIST test set when present) the
rows are split 70/30; each method fits on 70% and projects the held-out 30%. Every fit runs
in a fresh Python process (so JIT compilation and imports count as a user sees them).

Reported per method: trustworthiness (k=15) of the held-out embedding, held-out 15-NN
classifier accuracy (classifier trained on the training embedding), kNN preservation
(:func:`pumap_dask.report_metrics.knn_preservation`: the share of each row's 15
input-space neighbours among its 15 embedding neighbours, on a seeded sample of
``--kp-sample`` rows, the same rows for every method) of the training embedding
(``kp_train``) and of the transformed held-out rows (``kp_test``), fit and transform time.
pumap_dask gives two rows from the same fitted model (same process, same fit), each with
its own transform time: ``pumap_dask`` is ``transform(X)`` (the estimator's default, the
encoder) and ``pumap_dask (encoder)`` is ``transform(X, refine=False)`` (the same, kept
as a row for older result files).

Usage::

    python benchmarks/quality.py                      # all data sets, both methods
    python benchmarks/quality.py --datasets digits    # one data set
    python benchmarks/quality.py --seeds 0 1 2        # repeat with several seeds
    python benchmarks/quality.py --refine             # also pumap_dask transform(refine=True)
    python benchmarks/quality.py --knn-method hnsw    # pumap_dask's kNN back-end (default auto)
    python benchmarks/quality.py --landmarks          # also landmark drift (landmarks.py)
    python benchmarks/quality.py --knn                # also kNN recall/time (knn_backends.py)
    python benchmarks/quality.py --datasets digits --seeds 0 --landmarks --knn --json q.json

``--refine`` adds the row ``pumap_dask+refine``: the same fitted model projecting the
held-out rows with ``transform(X, refine=True)`` (issue 11), only when that differs from
the default ``transform(X)`` (it does not where the default already refines); its
``transform_s`` is the refined transform's whole time (encoder + kNN + polish).

``--landmarks`` (per data set and seed, in this process): the training rows are split into
A (every class but the last two) and B (those two); a model fitted on A is continued on
A + B (``init_model``) with ``--landmark-fraction`` (default 10%) of A pinned to its
embedding at each ``--landmark-weights`` (default 0, i.e. no pull, and 0.1). Reported:
drift of A's rows (mean/median, in units of the spread ``s`` of A's first embedding) and
held-out 15-NN accuracy on B's held-out rows and on all held-out rows (encoder embeddings;
functions of ``benchmarks/landmarks.py``).

``--knn`` (per data set, the first seed's training rows, in this process): time and
recall@15 (against exact search on ``--recall-samples`` rows) of ``nndescent`` and ``hnsw``
(``benchmarks/knn_backends.py``; hnsw is skipped with a note when hnswlib is missing).

Last, one line per data set against the targets (means over seeds): ``PASS`` when the
default ``pumap_dask`` transform's held-out accuracy >= umap-learn's transform's and its
trustworthiness >= umap-learn's - 0.01, else ``MISS``.
``cells20k`` is :func:`pumap_dask.datasets.cell_like` (20,000 rows, 50 features);
``traj20k`` is :func:`pumap_dask.datasets.trajectory_like` (20,000 rows, 50 features:
24 populations and differentiation paths labelled by origin, issue 20).
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
sys.path.insert(0, HERE)  # landmarks.py and knn_backends.py
ACC_TARGET = 0.0  # default pumap_dask held-out acc - umap-learn's must be >= this
TRUST_TOL = 0.01  # ... and its trustworthiness at most this below umap-learn's
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
    if name == "traj20k":
        from pumap_dask.datasets import trajectory_like

        return trajectory_like(20000, 50, random_state=0)
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
           knn_method: str = "auto", params: str = "{}") -> None:
    """Runs in a fresh process: fit + transform, save embeddings and timings. ``params``:
    more pumap_dask parameters, as JSON."""
    t_import = time.perf_counter()
    X, y = load_dataset(dataset)
    tr, te = split(len(X), seed)
    if method == "pumap_dask":
        from pumap_dask import ParametricUMAP

        model = ParametricUMAP(random_state=seed, device="cpu", knn_method=knn_method,
                               **json.loads(params))
    else:
        import umap

        model = umap.UMAP(random_state=None)
    t0 = time.perf_counter()
    model.fit(X[tr])
    t1 = time.perf_counter()
    E_te = np.asarray(model.transform(X[te]))  # the default transform
    t2 = time.perf_counter()
    extra = {}
    if method == "pumap_dask":
        for name, kw in [("encoder", {"refine": False})] + (
                [("refined", {"refine": True})] if refine else []):
            t = time.perf_counter()
            E = np.asarray(model.transform(X[te], **kw))
            secs = time.perf_counter() - t
            if name == "refined" and np.array_equal(E, E_te):
                print("pumap_dask transform(refine=True) equals the default transform: "
                      "no pumap_dask+refine row", flush=True)
                continue
            extra[f"test_{name}"], extra[f"{name}_s"] = E, np.array(secs)
    np.savez(out, train=np.asarray(model.embedding_), test=np.asarray(E_te),
             timing=np.array([t0 - t_import, t1 - t0, t2 - t1]), **extra)


def kp_sample(n: int, size: int, seed: int) -> np.ndarray:
    """The rows (sorted, seeded) whose kNN preservation is measured: every method scores
    the same rows."""
    rng = np.random.default_rng([seed, n, 0xC0])
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


def evaluate(dataset: str, method: str, seed: int, refine: bool = False,
             knn_method: str = "auto", kp_rows: int = 3000,
             params: str = "{}") -> list[dict]:
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    from pumap_dask.report_metrics import knn_preservation

    X, y = load_dataset(dataset)
    tr, te = split(len(X), seed)
    s_tr, s_te = kp_sample(len(tr), kp_rows, seed), kp_sample(len(te), kp_rows, seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.npz")
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--worker", method, dataset, str(seed), out]
                       + (["--refine"] if refine else []) + ["--knn-method", knn_method]
                       + ["--params", params],
                       check=True)
        wall = time.perf_counter() - t
        res = dict(np.load(out))
        E_tr, E_te, timing = res["train"], res["test"], res["timing"]
    clf = KNeighborsClassifier(15).fit(E_tr, y[tr])
    base = {"kind": "quality", "dataset": dataset, "seed": seed,
            "knn_method": knn_method if method == "pumap_dask" else None,
            "n_train": len(tr), "n_test": len(te), "fit_s": float(timing[1]),
            "process_s": wall,
            "kp_train": knn_preservation(X[tr][s_tr], E_tr[s_tr], 15)}
    rows = []
    for name, E, secs in [(method, E_te, timing[2])] + [
            (method + suffix, res[f"test_{key}"], res[f"{key}_s"])
            for key, suffix in [("encoder", " (encoder)"), ("refined", "+refine")]
            if f"test_{key}" in res]:
        rows.append({**base, "method": name,
                     "trust_test": float(trustworthiness(X[te], E, n_neighbors=15)),
                     "knn_acc_test": float(clf.score(E, y[te])),
                     "kp_test": knn_preservation(X[te][s_te], E[s_te], 15),
                     "transform_s": float(secs)})
    return rows


def landmark_rows(dataset: str, seed: int, weights, fraction: float) -> list[dict]:
    """benchmarks/landmarks.py's drift experiment on this data set's 70% training rows
    (A: all classes but the last two, B: those), scored on its 30% held-out rows."""
    import landmarks as lm

    from pumap_dask import ParametricUMAP

    X, y = load_dataset(dataset)
    tr, te = split(len(X), seed)
    XA, XB, XAB, yAB, te_B = lm.split_old_new(X[tr], y[tr], y[te])
    params = dict(random_state=seed, device="cpu")
    t0 = time.perf_counter()
    model0 = ParametricUMAP(**params).fit(XA)
    fit_A = time.perf_counter() - t0
    emb_A = model0.embedding_
    s = lm.spread(emb_A)
    rows = []
    for w in weights:
        model, secs = lm.continue_fit(model0, XAB, emb_A, w, fraction, seed, **params)
        rows.append({"kind": "landmarks", "dataset": dataset, "seed": seed,
                     "run": f"{fraction:.0%} of A pinned, weight {w:g}", "weight": w,
                     "fraction": fraction, "n_A": len(XA), "n_B": len(XB), "spread": s,
                     "fit_A_s": fit_A, "fit_s": secs,
                     **lm.drift_metrics(model, XA, emb_A, s, XAB, yAB, X[te], y[te], te_B)})
    return rows


def knn_rows(dataset: str, seed: int, recall_samples: int) -> list[dict]:
    """nndescent and hnsw (when hnswlib is installed) on the training rows: seconds and
    recall@15 against exact search on ``recall_samples`` rows (knn_backends.py)."""
    import knn_backends as kb

    X, _ = load_dataset(dataset)
    tr, _ = split(len(X), seed)
    methods = ["nndescent"]
    if kb.have_hnswlib():
        methods.append("hnsw")
    else:
        print(f"{dataset:9} hnsw skipped: hnswlib is not installed", flush=True)
    rows = kb.run(dataset, np.ascontiguousarray(X[tr], dtype=np.float32), "euclidean",
                  methods, k=15, exact_max_n=0, recall_samples=recall_samples)
    return [{"kind": "knn", "dataset": dataset, "seed": seed, **r} for r in rows]


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def target_line(dataset: str, rows: list[dict], ours: str, theirs: str) -> str | None:
    """PASS/MISS of the default transform against umap-learn's (means over seeds)."""
    a = [r for r in rows if r["dataset"] == dataset and r["method"] == ours]
    b = [r for r in rows if r["dataset"] == dataset and r["method"] == theirs]
    if not a or not b:
        return None
    d_acc = mean(a, "knn_acc_test") - mean(b, "knn_acc_test")
    d_trust = mean(a, "trust_test") - mean(b, "trust_test")
    ok_acc, ok_trust = d_acc >= ACC_TARGET, d_trust >= -TRUST_TOL
    return (f"{dataset:9} {'PASS' if ok_acc and ok_trust else 'MISS'}  "
            f"acc {mean(a, 'knn_acc_test'):.4f} vs {mean(b, 'knn_acc_test'):.4f} "
            f"({d_acc:+.4f}, {'ok' if ok_acc else 'below'})  "
            f"trust {mean(a, 'trust_test'):.4f} vs {mean(b, 'trust_test'):.4f} "
            f"({d_trust:+.4f}, {'ok' if ok_trust else f'more than {TRUST_TOL} below'})  "
            f"[{len(a)} seed(s)]")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "clusters", "mnist", "traj20k"])
    ap.add_argument("--methods", nargs="+", default=["pumap_dask", "umap-learn"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--refine", action="store_true",
                    help="also report pumap_dask's transform(X, refine=True) (issue 11)")
    ap.add_argument("--knn-method", default="auto",
                    help="pumap_dask's knn_method: auto, exact, nndescent or hnsw (issue 11)")
    ap.add_argument("--landmarks", action="store_true",
                    help="also the landmark drift experiment of benchmarks/landmarks.py")
    ap.add_argument("--landmark-weights", type=float, nargs="+", default=[0.0, 0.1],
                    help="landmark_loss_weight values of --landmarks (0: no pull)")
    ap.add_argument("--landmark-fraction", type=float, default=None,
                    help="fraction of A pinned by --landmarks (default landmarks.py's, 0.1)")
    ap.add_argument("--knn", action="store_true",
                    help="also kNN recall@15 and time of nndescent and hnsw")
    ap.add_argument("--recall-samples", type=int, default=1000,
                    help="rows whose exact neighbours score --knn's recall")
    ap.add_argument("--kp-sample", type=int, default=3000,
                    help="rows whose kNN preservation is measured (training and held out)")
    ap.add_argument("--params", default="{}",
                    help="more pumap_dask parameters as JSON, e.g. '{\"n_epochs\": 100}'")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, dataset, seed, out = args.worker
        worker(method, dataset, int(seed), out, refine=args.refine,
               knn_method=args.knn_method, params=args.params)
        return
    datasets = [d for d in args.datasets if load_dataset(d) is not None]
    for d in args.datasets:
        if d not in datasets:
            print(f"{d:9} (not available, skipped)")
    rows = []
    print(f"{'dataset':9} {'method':20} {'seed':>4} {'trust':>7} {'knn_acc':>8} "
          f"{'kp_train':>8} {'kp_test':>7} {'fit_s':>7} {'transform_s':>11}")
    for dataset in datasets:
        for seed in args.seeds:
            for method in args.methods:
                for r in evaluate(dataset, method, seed, refine=args.refine,
                                  knn_method=args.knn_method, kp_rows=args.kp_sample,
                                  params=args.params):
                    rows.append(r)
                    print(f"{dataset:9} {r['method']:20} {seed:4d} {r['trust_test']:7.4f} "
                          f"{r['knn_acc_test']:8.4f} {r['kp_train']:8.4f} {r['kp_test']:7.4f} "
                          f"{r['fit_s']:7.2f} {r['transform_s']:11.4f}", flush=True)
    if args.landmarks:
        import landmarks as lm

        fraction = lm.PIN_FRACTION if args.landmark_fraction is None else args.landmark_fraction
        print("\nlandmark drift: fit on A, continue on A+B (init_model); drift of A in units "
              "of s; held-out 15-NN acc")
        print(f"{'dataset':9} {'run':28} {'seed':>4} {'drift_mean':>10} {'drift_med':>9} "
              f"{'acc_B':>7} {'acc_all':>7} {'fit_s':>7}")
        for dataset in datasets:
            for seed in args.seeds:
                for r in landmark_rows(dataset, seed, args.landmark_weights, fraction):
                    rows.append(r)
                    print(f"{dataset:9} {r['run']:28} {seed:4d} {r['drift_mean']:10.3f} "
                          f"{r['drift_median']:9.3f} {r['acc_B']:7.4f} {r['acc_all']:7.4f} "
                          f"{r['fit_s']:7.2f}", flush=True)
    if args.knn:
        import knn_backends as kb

        print(f"\nkNN back-ends on the training rows (k=15, recall against exact on "
              f"{args.recall_samples} rows; numba warm-up {kb.warm_up_nndescent(15):.1f}s "
              "not counted)")
        for dataset in datasets:
            rows += knn_rows(dataset, args.seeds[0], args.recall_samples)
    if len(args.methods) == 2:
        ours, theirs = args.methods
        print(f"\nratios ({ours} / {theirs}, mean over seeds)")
        for dataset in datasets:
            a = [r for r in rows if r["dataset"] == dataset and r.get("method") == ours
                 and r["kind"] == "quality"]
            b = [r for r in rows if r["dataset"] == dataset and r.get("method") == theirs
                 and r["kind"] == "quality"]
            if not a or not b:
                continue
            print(f"{dataset:9} d_acc {mean(a, 'knn_acc_test') - mean(b, 'knn_acc_test'):+.4f} "
                  f"d_trust {mean(a, 'trust_test') - mean(b, 'trust_test'):+.4f} "
                  f"d_kp_train {mean(a, 'kp_train') - mean(b, 'kp_train'):+.4f} "
                  f"d_kp_test {mean(a, 'kp_test') - mean(b, 'kp_test'):+.4f} "
                  f"fit {mean(a, 'fit_s') / mean(b, 'fit_s'):.2f}x "
                  f"transform speed-up {mean(b, 'transform_s') / mean(a, 'transform_s'):.0f}x")
    lines = [target_line(d, [r for r in rows if r["kind"] == "quality"],
                         "pumap_dask", "umap-learn") for d in datasets]
    if any(lines):
        print(f"\ntargets: default pumap_dask transform vs umap-learn transform, held-out "
              f"acc >= umap-learn's, trust >= umap-learn's - {TRUST_TOL}")
        for line in lines:
            if line:
                print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
