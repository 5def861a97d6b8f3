"""kNN preservation at the finest scale of a large embedding (issue 18: what ``fit_rows`` costs).

The run report's kNN preservation (and ``ten_million.py``'s) looks at neighbours within a
sample of a few thousand rows: at 10M rows that is the structure at 1/3,000 of the data,
which a fit of a 200k-row sample resolves as well as one of all rows. This measures the
finest scale instead: for ``--sample`` rows, their ``--k`` exact input-space neighbours
among *all* rows (brute force in blocks of ``--block`` rows) and their ``--k`` neighbours
among all rows of each embedding (a k-d tree), and prints the share kept per embedding.

Usage::

    python benchmarks/fine_scale.py --rows DIR/train.zarr \\
        --embeddings all=DIR/run3/emb_train.zarr sample1m=DIR/fr1m/emb_train.zarr
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import zarr
from scipy.spatial import cKDTree

logger = logging.getLogger("fine_scale")


def input_neighbours(X, queries: np.ndarray, k: int, block: int) -> np.ndarray:
    """The ``k`` nearest rows of ``X`` (self excluded) of each query row id, exactly."""
    Q = np.asarray(X[np.sort(queries)], dtype=np.float32)
    order = np.argsort(np.argsort(queries))  # back to the queries' order
    Q = Q[order]
    qq = (Q.astype(np.float64) ** 2).sum(1)[:, None]
    best_d = np.full((len(Q), k + 1), np.inf)
    best_i = np.zeros((len(Q), k + 1), np.int64)
    n = X.shape[0]
    for start in range(0, n, block):
        B = np.asarray(X[start:start + block], dtype=np.float32)
        d = qq + (B.astype(np.float64) ** 2).sum(1)[None, :] - 2.0 * (Q @ B.T)
        part = np.argpartition(d, k, axis=1)[:, :k + 1]
        dd = np.take_along_axis(d, part, 1)
        cand_d = np.concatenate([best_d, dd], 1)
        cand_i = np.concatenate([best_i, part + start], 1)
        keep = np.argsort(cand_d, axis=1)[:, :k + 1]
        best_d = np.take_along_axis(cand_d, keep, 1)
        best_i = np.take_along_axis(cand_i, keep, 1)
    # drop the query itself (the nearest, at distance ~0)
    out = np.empty((len(Q), k), np.int64)
    for r, q in enumerate(queries):
        row = best_i[r][best_i[r] != q]
        out[r] = row[:k]
    return out


def kept_share(emb: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's input-space neighbours among its embedding neighbours."""
    tree = cKDTree(emb)
    _, got = tree.query(emb[queries], k=k + 1)
    shares = [len(set(g[g != q][:k]) & set(t)) / k for g, t, q in zip(got, truth, queries)]
    return float(np.mean(shares))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", required=True, help="the training rows (a Zarr array or .npy)")
    ap.add_argument("--embeddings", nargs="+", required=True, metavar="NAME=PATH",
                    help="embeddings of those rows (Zarr arrays), each named")
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--block", type=int, default=250_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    X = (np.load(args.rows, mmap_mode="r") if args.rows.endswith(".npy")
         else zarr.open_array(args.rows, mode="r"))
    rng = np.random.default_rng(args.seed)
    queries = rng.choice(X.shape[0], args.sample, replace=False)
    t0 = time.perf_counter()
    truth = input_neighbours(X, queries, args.k, args.block)
    logger.info("exact input-space neighbours of %d rows among %d in %.1fs", args.sample,
                X.shape[0], time.perf_counter() - t0)
    print(f"| embedding | kNN preservation among all {X.shape[0]:,} rows "
          f"({args.sample:,} sampled rows, k={args.k}) |")
    print("|---|---|")
    for spec in args.embeddings:
        name, path = spec.split("=", 1)
        emb = np.asarray(zarr.open_array(path, mode="r")[:], dtype=np.float64)
        t0 = time.perf_counter()
        share = kept_share(emb, queries, truth, args.k)
        logger.info("%s: %.4f (%.1fs)", name, share, time.perf_counter() - t0)
        print(f"| {name} | {share:.4f} |")


if __name__ == "__main__":
    main()
