"""What the default polish of ``transform`` costs, against the number of training rows.

``ParametricUMAP.transform(X)`` polishes in-memory input by default when the model was
fitted on at most ``pumap_dask.refine.AUTO_REFINE_MAX_ROWS`` (50,000) rows (issue 11).
The polish costs an exact kNN of each new row among the training rows plus
``refine_epochs`` of SGD; neither depends on how good the training embedding is, so this
script times :func:`pumap_dask.refine.refine_embedding` on real rows (cell-like data,
50 features; MNIST, 784) against a fixed random training embedding, at several training
sizes, and prints the seconds per 1,000 new rows (the encoder alone is about 1e-3 s per
1,000 rows).

Usage::

    python benchmarks/refine_cost.py                     # cell-like 14k / 50k, MNIST 7k
    python benchmarks/refine_cost.py --train 5000 50000 --new 5000
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from pumap_dask.datasets import cell_like
from pumap_dask.refine import RefineReference, refine_embedding

HERE = os.path.dirname(os.path.abspath(__file__))
logger = logging.getLogger("refine_cost")


def mnist_rows() -> np.ndarray | None:
    """The MNIST test set's 10,000 rows in [0, 1], or None when absent."""
    from quality import load_dataset  # same directory

    data = load_dataset("mnist")
    return None if data is None else data[0]


def time_polish(X: np.ndarray, n_train: int, n_new: int, epochs: int, seed: int = 0
                ) -> tuple[float, float]:
    """(seconds for the kNN, seconds for the whole polish) of ``n_new`` rows against
    ``n_train`` training rows of ``X`` (a random embedding stands in for the fitted one)."""
    from pumap_dask.knn import exact_knn

    rng = np.random.default_rng(seed)
    train, new = X[:n_train], X[n_train:n_train + n_new]
    emb = rng.normal(size=(n_train, 2)).astype(np.float32) * 5
    ref = RefineReference(np.ascontiguousarray(train), emb, 1.577, 0.895, 15)
    init = rng.normal(size=(len(new), 2)).astype(np.float32) * 5
    t0 = time.perf_counter()
    exact_knn(new, 15, Y=ref.data)
    t1 = time.perf_counter()
    refine_embedding(new, init, ref, n_epochs=epochs)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, nargs="+", default=[14_000, 50_000])
    ap.add_argument("--new", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--no-mnist", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sets = [(f"cell-like, {n} train", cell_like(n + args.new, 50, random_state=0)[0], n)
            for n in args.train]
    mnist = None if args.no_mnist else mnist_rows()
    if mnist is not None:
        sets.append(("MNIST, 7000 train", mnist, 7000))
    logger.info("%-26s %8s %10s %12s %14s", "data", "new rows", "knn s", "polish s",
                "s / 1000 rows")
    for name, X, n_train in sets:
        n_new = min(args.new, len(X) - n_train)
        knn_s, total_s = time_polish(np.asarray(X, np.float32), n_train, n_new, args.epochs)
        logger.info("%-26s %8d %10.2f %12.2f %14.3f", name, n_new, knn_s, total_s,
                    1000 * total_s / n_new)


if __name__ == "__main__":
    main()
