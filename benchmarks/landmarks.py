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
held-out rows, trustworthiness (k=15) of the held-out embedding, and fit seconds. All
embeddings are the encoder's (``transform(X, refine=False)``). The functions
(:func:`split_old_new`, :func:`continue_fit`, :func:`drift_metrics`) are also used by
``benchmarks/quality.py --landmarks``.

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


DEFAULT_WEIGHTS = (0.0, 0.1, 1.0, 10.0)  # --weights: landmarks on all of A
PIN_FRACTION = 0.1  # the sampled run pins this fraction of A (umap-learn's tutorial)
PIN_WEIGHT = 1.0  # ... at this landmark_loss_weight


def split_old_new(Xtr, ytr, yte, new_classes: int = 2):
    """Training rows split into A (old classes) and B (the last ``new_classes`` classes).

    Returns ``XA, XB, XAB, yAB, te_B`` (``XAB = [XA; XB]``, ``te_B`` marks held-out rows
    of B's classes)."""
    classes = np.unique(np.concatenate([ytr, yte]))[-new_classes:]
    new = np.isin(ytr, classes)
    XA, XB = Xtr[~new], Xtr[new]
    yAB = np.concatenate([ytr[~new], ytr[new]])
    return XA, XB, np.vstack([XA, XB]), yAB, np.isin(yte, classes)


def spread(emb: np.ndarray) -> float:
    """``s = sqrt(mean per-axis variance)``: the unit of drift."""
    return float(np.sqrt(emb.var(0).mean()))


def pinned(emb_A: np.ndarray, n_B: int, fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """``landmark_positions`` for ``[A; B]``: ``emb_A`` on a ``fraction`` of A (all of A at
    1.0, else a random sample fixed by ``seed``), NaN elsewhere."""
    pos = emb_A.astype(np.float32, copy=True)
    if fraction < 1.0:
        rng = np.random.default_rng(seed)
        keep = rng.choice(len(emb_A), size=max(1, int(len(emb_A) * fraction + 1e-9)),
                          replace=False)
        pos[:] = np.nan
        pos[keep] = emb_A[keep]
    return np.vstack([pos, np.full((n_B, emb_A.shape[1]), np.nan, np.float32)])


def continue_fit(model0, XAB, emb_A, weight: float, fraction: float = 1.0, seed: int = 0,
                 **params):
    """``fit(A + B, init_model=model0)`` with ``fraction`` of A pinned at ``weight``;
    returns ``(model, seconds)``."""
    from pumap_dask import ParametricUMAP

    t0 = time.perf_counter()
    m = ParametricUMAP(**params, landmark_loss_weight=weight).fit(
        XAB, init_model=model0,
        landmark_positions=pinned(emb_A, len(XAB) - len(emb_A), fraction, seed))
    return m, time.perf_counter() - t0


def drift_metrics(model, XA, emb_A, s, XAB, yAB, Xte, yte, te_B) -> dict:
    """Drift of A (mean/median, units of ``s``), held-out 15-NN accuracy on B's held-out
    rows and on all held-out rows, held-out trustworthiness (k=15).

    Embeddings are the encoder's (``transform(refine=False)``): drift is the parametric
    map's, and the numbers do not move with ``transform``'s default."""
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    def enc(X):
        return model.transform(X, refine=False)

    drift = np.linalg.norm(enc(XA) - emb_A, axis=1) / s
    e_te = enc(Xte)
    pred = KNeighborsClassifier(15).fit(enc(XAB), yAB).predict(e_te)
    return dict(drift_mean=float(drift.mean()), drift_median=float(np.median(drift)),
                acc_B=float((pred[te_B] == yte[te_B]).mean()),
                acc_all=float((pred == yte).mean()),
                trust=float(trustworthiness(Xte, e_te, n_neighbors=15)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=["digits", "cell"])
    ap.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS))
    ap.add_argument("--new-classes", type=int, default=2)
    ap.add_argument("--cell-rows", type=int, default=6000, help="rows of --dataset cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from pumap_dask import ParametricUMAP
    from pumap_dask.datasets import train_test_split

    X, y = load(args.dataset, args.cell_rows)
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=args.seed)
    XA, XB, XAB, yAB, te_B = split_old_new(Xtr, ytr, yte, args.new_classes)
    params = dict(random_state=args.seed, device="cpu")
    print(f"{args.dataset}: A {len(XA)} rows, B {len(XB)} rows (classes "
          f"{np.unique(y)[-args.new_classes:].tolist()}), held out {len(Xte)} "
          f"({te_B.sum()} of B)")

    t0 = time.perf_counter()
    model0 = ParametricUMAP(**params).fit(XA)
    t_A = time.perf_counter() - t0
    emb_A = model0.embedding_
    s = spread(emb_A)
    rows = []

    def report(name: str, model, seconds: float) -> None:
        row = dict(run=name, **drift_metrics(model, XA, emb_A, s, XAB, yAB, Xte, yte, te_B),
                   fit_s=seconds)
        rows.append(row)
        print(f"| {name} | {row['drift_mean']:.3f} | {row['drift_median']:.3f} | "
              f"{row['acc_B']:.4f} | {row['acc_all']:.4f} | {row['trust']:.4f} | "
              f"{seconds:.1f} |", flush=True)

    print(f"model0 on A: {t_A:.1f}s, spread s = {s:.3f}")
    print("| run | drift mean (s) | drift median (s) | held-out acc B | held-out acc all | "
          "trust | fit (s) |")
    print("|---|---|---|---|---|---|---|")
    for w in args.weights:
        report(f"fit(A+B, init_model, landmarks all A, weight {w:g})",
               *continue_fit(model0, XAB, emb_A, w, **params))
    report(f"fit(A+B, init_model, landmarks {PIN_FRACTION:.0%} of A, weight {PIN_WEIGHT:g})",
           *continue_fit(model0, XAB, emb_A, PIN_WEIGHT, PIN_FRACTION, args.seed, **params))
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
