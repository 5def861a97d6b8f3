"""Variants of ``transform(refine=True)`` on one fitted model (issue 11).

Fits pumap_dask's defaults on a data set's 70% split once, then reports held-out 15-NN
accuracy and trustworthiness of the plain encoder and of the polish with the encoder's
output or umap-learn's neighbour-mean start, for several epoch counts and step sizes.

Usage::

    python benchmarks/refine_probe.py digits 0        # data set (see quality.py), seed
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    from pumap_dask import ParametricUMAP
    from pumap_dask.knn import exact_knn
    from pumap_dask.refine import (RefineReference, memberships, optimize_new_points,
                                   refine_embedding)
    from quality import load_dataset, split

    args = sys.argv[1:] if argv is None else argv
    ds, seed = args[0], int(args[1]) if len(args) > 1 else 0
    X, y = load_dataset(ds)
    tr, te = split(len(X), seed)
    t = time.perf_counter()
    m = ParametricUMAP(random_state=seed, device="cpu").fit(X[tr])
    print(f"fit {time.perf_counter() - t:.1f}s")
    E = m.embedding_
    clf = KNeighborsClassifier(15).fit(E, y[tr])

    def rep(name, Z, dt=0.0):
        print(f"{ds} s{seed} {name:34s} acc {clf.score(Z, y[te]):.4f} "
              f"trust {trustworthiness(X[te], Z, n_neighbors=15):.4f} {dt:.2f}s", flush=True)

    Z0 = m.transform(X[te])
    rep("plain", Z0)
    ref = RefineReference(X[tr], E, m.a_, m.b_, 15)
    for ep, lr in ((10, 0.25), (30, 0.25), (100, 0.25), (30, 1.0), (100, 1.0)):
        t = time.perf_counter()
        Z = refine_embedding(X[te], Z0, ref, n_epochs=ep, learning_rate=lr)
        rep(f"encoder start ep{ep} lr{lr}", Z, time.perf_counter() - t)
    ind, dist = exact_knn(X[te], 15, Y=X[tr])
    w = memberships(dist)
    Zm = (w[:, :, None] * E[ind]).sum(1) / w.sum(1, keepdims=True)
    rep("neighbour-mean start, no SGD", Zm)
    for ep in (30, 50, 100):
        t = time.perf_counter()
        Z = optimize_new_points(Zm, E, ind, w, a=m.a_, b=m.b_, n_epochs=ep)
        rep(f"neighbour-mean start ep{ep}", Z, time.perf_counter() - t)


if __name__ == "__main__":
    main()
