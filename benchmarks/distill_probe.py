"""Distillation towards a non-parametric layout, probed on one fit (issue 11).

The cell-like held-out miss comes from the training layout: 15-NN accuracy inside our
training embedding is below umap-learn's. This probe asks whether the encoder can learn
umap-learn's sharper layout of the same rows: it fits pumap_dask's defaults on a data set's
70% split, polishes the training embedding with umap-learn's non-parametric optimiser
(``umap.UMAP(init=embedding_, n_epochs=...)``), fine-tunes the encoder towards the polished
layout (mean squared distance, Adam), and reports for each layout the 5-fold 15-NN
accuracy inside the training embedding and the held-out accuracy of the encoder's output
and of the default polish of the held-out rows against that layout.

Needs umap-learn (a benchmark dependency, not pumap_dask's).

Usage::

    python benchmarks/distill_probe.py cells20k 0      # data set (see quality.py), seed
    python benchmarks/distill_probe.py cells20k 0 --polish-epochs 60 --distil-epochs 30
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def scores(model, layout: np.ndarray, Xtr, ytr, Xte, yte, encoder_te: np.ndarray) -> dict:
    """Training-layout 5-fold 15-NN accuracy, held-out accuracy of the encoder's output and
    of its polish against ``layout``."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from pumap_dask.refine import RefineReference, refine_embedding

    clf = KNeighborsClassifier(15).fit(layout, ytr)
    ref = RefineReference(np.ascontiguousarray(Xtr, np.float32), layout.astype(np.float32),
                          model.a_, model.b_, model.n_neighbors)
    polished = refine_embedding(Xte, encoder_te, ref)
    return {"train_cv": cross_val_score(KNeighborsClassifier(15), layout, ytr, cv=5).mean(),
            "held_out_encoder": clf.score(encoder_te, yte),
            "held_out_refined": clf.score(polished, yte)}


def distil(encoder, Xtr: np.ndarray, target: np.ndarray, epochs: int, seed: int):
    """Fine-tune ``encoder`` (in place) so that encoder(Xtr) approaches ``target``."""
    import torch

    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    X = torch.from_numpy(np.ascontiguousarray(Xtr, np.float32))
    T = torch.from_numpy(np.ascontiguousarray(target, np.float32))
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), 512):
            b = perm[i:i + 512]
            loss = ((encoder(X[b]) - T[b]) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    encoder.eval()
    with torch.no_grad():
        return encoder(X).numpy()


def main(argv=None) -> None:
    import umap

    from pumap_dask import ParametricUMAP
    from quality import load_dataset, split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("seed", type=int, nargs="?", default=0)
    ap.add_argument("--polish-epochs", type=int, default=60)
    ap.add_argument("--distil-epochs", type=int, default=30)
    args = ap.parse_args(argv)
    X, y = load_dataset(args.dataset)
    tr, te = split(len(X), args.seed)
    Xtr, Xte, ytr, yte = X[tr], X[te], y[tr], y[te]
    model = ParametricUMAP(random_state=args.seed, device="cpu").fit(Xtr)
    enc_te = model.transform(Xte, refine=False)
    rows = [("ours (encoder layout)", scores(model, model.embedding_, Xtr, ytr, Xte, yte,
                                              enc_te))]
    t0 = time.perf_counter()
    polished = umap.UMAP(init=model.embedding_.astype(np.float64), n_epochs=args.polish_epochs,
                         random_state=args.seed).fit(Xtr).embedding_.astype(np.float32)
    polish_s = time.perf_counter() - t0
    rows.append(("non-parametric polish of it", scores(model, polished, Xtr, ytr, Xte, yte,
                                                        enc_te)))
    distilled = distil(model.encoder_, Xtr, polished, args.distil_epochs, args.seed)
    enc_te2 = model.transform(Xte, refine=False)
    rows.append(("encoder distilled to it", scores(model, distilled, Xtr, ytr, Xte, yte,
                                                    enc_te2)))
    mse = float(((distilled - polished) ** 2).sum(1).mean())
    print(f"{args.dataset} seed {args.seed}: polish {polish_s:.1f} s, distillation mean "
          f"squared distance to the polished layout {mse:.3f}")
    print(f"{'layout':30} {'train 5-fold':>12} {'held-out enc':>12} {'held-out refined':>16}")
    for name, r in rows:
        print(f"{name:30} {r['train_cv']:12.4f} {r['held_out_encoder']:12.4f} "
              f"{r['held_out_refined']:16.4f}")


if __name__ == "__main__":
    main()
