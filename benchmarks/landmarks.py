"""Drift of old points when new data joins: continued training with landmarks (issue 11).

Data are split 70/30 into training and held-out rows (seed 0). The training rows are split
into part A (old data: every class but the last ``--new-classes``) and part B (new data:
those classes). Then:

1. ``model0`` is fitted on A; ``emb_A`` is its embedding of A.
2. ``fit(A + B, init_model=model0, landmark_positions=[emb_A; NaN])`` at each
   ``landmark_loss_weight`` (0 means continued training without a landmark pull).
3. ``fit(A + B, init_model=model0, ...)`` with landmarks on 10% of A only (umap-learn's
   tutorial pins a small sample).
4. ``model0.partial_fit(B)`` (graph of B alone, no landmarks).
5. A fresh fit on A + B, for reference (its drift is meaningless: any rotation is as good).

Reported for each: drift of A's points (``|new(A) - emb_A|``, mean and median, in units of
the spread of ``emb_A``: ``s = sqrt(mean per-axis variance)``), held-out 15-NN accuracy on
B's held-out rows (classifier trained on the new model's embedding of A + B) and on all
held-out rows, trustworthiness (k=15) of the held-out embedding, and fit seconds.

Usage::

    python benchmarks/landmarks.py                        # digits
    python benchmarks/landmarks.py --dataset cell         # cell-like data, 6000 rows
    python benchmarks/landmarks.py --dataset cell --cell-rows 2000 --weights 0 1
    python benchmarks/landmarks.py --weights 0 1 --seed 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np


def load(name: str, n_samples: int = 6000):
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data.astype(np.float32), d.target
    if name == "cell":
        from pumap_dask.datasets import cell_like

        return cell_like(n_samples, 50, random_state=0)
    raise ValueError(name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=["digits", "cell"])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0])
    ap.add_argument("--new-classes", type=int, default=2)
    ap.add_argument("--cell-rows", type=int, default=6000, help="rows of --dataset cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    from pumap_dask import ParametricUMAP
    from pumap_dask.datasets import train_test_split

    X, y = load(args.dataset, args.cell_rows)
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=args.seed)
    classes = np.unique(y)
    new = np.isin(ytr, classes[-args.new_classes:])
    XA, yA, XB, yB = Xtr[~new], ytr[~new], Xtr[new], ytr[new]
    XAB, yAB = np.vstack([XA, XB]), np.concatenate([yA, yB])
    te_B = np.isin(yte, classes[-args.new_classes:])
    params = dict(random_state=args.seed, device="cpu")
    print(f"{args.dataset}: A {len(XA)} rows, B {len(XB)} rows (classes "
          f"{classes[-args.new_classes:].tolist()}), held out {len(Xte)} ({te_B.sum()} of B)")

    t0 = time.perf_counter()
    model0 = ParametricUMAP(**params).fit(XA)
    t_A = time.perf_counter() - t0
    emb_A = model0.embedding_
    s = float(np.sqrt(emb_A.var(0).mean()))
    rows = []

    def report(name: str, model, seconds: float) -> None:
        drift = np.linalg.norm(model.transform(XA) - emb_A, axis=1) / s
        e_tr, e_te = model.transform(XAB), model.transform(Xte)
        knn = KNeighborsClassifier(15).fit(e_tr, yAB)
        acc_B = float((knn.predict(e_te[te_B]) == yte[te_B]).mean())
        acc = float((knn.predict(e_te) == yte).mean())
        trust = float(trustworthiness(Xte, e_te, n_neighbors=15))
        row = dict(run=name, drift_mean=float(drift.mean()), drift_median=float(np.median(drift)),
                   acc_B=acc_B, acc_all=acc, trust=trust, fit_s=seconds)
        rows.append(row)
        print(f"| {name} | {row['drift_mean']:.3f} | {row['drift_median']:.3f} | "
              f"{acc_B:.4f} | {acc:.4f} | {trust:.4f} | {seconds:.1f} |", flush=True)

    print(f"model0 on A: {t_A:.1f}s, spread s = {s:.3f}")
    print("| run | drift mean (s) | drift median (s) | held-out acc B | held-out acc all | "
          "trust | fit (s) |")
    print("|---|---|---|---|---|---|---|")
    nan_B = np.full((len(XB), model0.n_components), np.nan, np.float32)
    for w in args.weights:
        t0 = time.perf_counter()
        m = ParametricUMAP(**params, landmark_loss_weight=w).fit(
            XAB, init_model=model0, landmark_positions=np.vstack([emb_A, nan_B]))
        report(f"fit(A+B, init_model, landmarks all A, weight {w:g})", m,
               time.perf_counter() - t0)
    rng = np.random.default_rng(args.seed)
    some = np.full_like(emb_A, np.nan)
    pick = rng.choice(len(XA), size=max(1, len(XA) // 10), replace=False)
    some[pick] = emb_A[pick]
    t0 = time.perf_counter()
    m = ParametricUMAP(**params, landmark_loss_weight=1.0).fit(
        XAB, init_model=model0, landmark_positions=np.vstack([some, nan_B]))
    report("fit(A+B, init_model, landmarks 10% of A, weight 1)", m, time.perf_counter() - t0)
    m = copy.deepcopy(model0)  # continue a copy of model0
    t0 = time.perf_counter()
    m.partial_fit(XB)
    report("partial_fit(B), no landmarks", m, time.perf_counter() - t0)
    t0 = time.perf_counter()
    m = ParametricUMAP(**params).fit(XAB)
    report("fresh fit(A+B) (reference)", m, time.perf_counter() - t0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": args.dataset, "seed": args.seed, "spread": s, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
