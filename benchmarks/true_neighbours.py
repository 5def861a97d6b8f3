"""Which neighbours an embedding keeps: the noisy input's, or the noise-free rows' (issue 20).

:func:`pumap_dask.datasets.trajectory_like` adds per-feature technical noise
(:data:`~pumap_dask.datasets.TRAJ_INPUT_NOISE`) to rows mapped linearly from a latent space.
With the noise scale set to 0 the same seed gives the same rows without their noise (the
noise is drawn after the latent rows and only scaled), so each training row has two sets of
15 nearest neighbours among the training rows: in the noisy input every method fits, and in
the noise-free rows (the populations and paths themselves). For the training embeddings of
pumap_dask (defaults, in memory) and umap-learn (``min_dist=0.5``) of the same noisy rows, it
reports the share of each sampled row's neighbours kept among its 15 embedding neighbours
(all training rows searched), for both neighbour sets, and the same shares for held-out rows
placed by ``transform``. ``input`` is the noisy input itself measured against the
noise-free neighbours: how many of them the kNN graph every method starts from holds.

Example::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python \\
        benchmarks/true_neighbours.py --n 50000 --methods pumap umap
"""

from __future__ import annotations

import argparse
import logging
import time
from unittest import mock

import numpy as np

from local_structure import _neighbours, _overlap, split
from pumap_dask import ParametricUMAP, datasets

logger = logging.getLogger("true_neighbours")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=3000)
    ap.add_argument("--methods", nargs="+", default=["pumap", "umap"],
                    choices=["pumap", "umap"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)

    Xtr, _, Xte, _, s_tr, s_te, noisy_tr, noisy_te = split(args.n, args.seed, args.sample)
    with mock.patch.object(datasets, "TRAJ_INPUT_NOISE", 0.0):
        Ctr, _, Cte, _, c_tr, c_te, clean_tr, clean_te = split(args.n, args.seed, args.sample)
    assert np.array_equal(s_tr, c_tr) and np.array_equal(s_te, c_te)
    noise = float(np.sqrt(((Xtr - Ctr) ** 2).sum(1).mean() / (Ctr - Ctr.mean(0)).var(0).sum()))
    logger.info("%d training rows; noise / signal (RMS norms) %.2f", len(Xtr), noise)
    in_tr = _neighbours(Xtr, Xtr[s_tr], True)
    in_te = _neighbours(Xtr, Xte[s_te], False)
    logger.info("%-8s noisy-train %.3f clean-train %.3f noisy-held-out %.3f clean-held-out "
                "%.3f", "input", 1.0, _overlap(clean_tr, in_tr), 1.0,
                _overlap(clean_te, in_te))
    for method in args.methods:
        t0 = time.perf_counter()
        if method == "pumap":
            model = ParametricUMAP(min_dist=0.5, random_state=args.seed, device="cpu")
            E_tr = model.fit(Xtr).embedding_
        else:
            import umap

            model = umap.UMAP(min_dist=0.5, random_state=args.seed, n_jobs=1)
            E_tr = model.fit_transform(Xtr)
        fit_s = time.perf_counter() - t0
        E_te = model.transform(Xte)
        emb_tr = _neighbours(E_tr, E_tr[s_tr], True)
        emb_te = _neighbours(E_tr, E_te[s_te], False)
        logger.info("%-8s noisy-train %.3f clean-train %.3f noisy-held-out %.3f clean-held-out "
                    "%.3f fit %.1fs", method, _overlap(noisy_tr, emb_tr),
                    _overlap(clean_tr, emb_tr), _overlap(noisy_te, emb_te),
                    _overlap(clean_te, emb_te), fit_s)


if __name__ == "__main__":
    main()
