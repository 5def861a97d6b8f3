"""Fitting a sample: passes, width, and continuing on every row (issue 20), in memory.

On :func:`pumap_dask.datasets.trajectory_like` (``--n`` rows, 90% training / 10% held out,
``min_dist=0.5``, one seed), fits ``ParametricUMAP(fit_rows=--fit-rows, **--params)`` on
the training rows, then optionally continues training on **every** training row
(``fit(X, init_model=...)``) for each of ``--continue-epochs`` in turn (cumulative), and
scores each model as :mod:`benchmarks.local_structure` does (``kp_train``, ``kp_full``,
``kp_test``, ``kp_tfull``, ``acc``, ``trust``; see its docstring). ``t`` is the cumulative
fit time (each continued fit builds its own kNN of every row).

Example (the runs of RESULTS.md, "Fitting a sample with more passes")::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python \\
        benchmarks/sample_passes.py --n 200000 --fit-rows 20000 --params '{"n_epochs": 300}'
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python \\
        benchmarks/sample_passes.py --n 200000 --fit-rows 20000 --continue-epochs 10 10
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from local_structure import metrics, split
from pumap_dask import ParametricUMAP

logger = logging.getLogger("sample_passes")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200000)
    ap.add_argument("--fit-rows", type=int, default=20000)
    ap.add_argument("--params", default="{}", help="more ParametricUMAP params as JSON")
    ap.add_argument("--continue-epochs", type=int, nargs="*", default=[],
                    help="then continue on every training row for these many epochs, in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=3000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    extra = json.loads(args.params)

    Xtr, ytr, Xte, yte, s_tr, s_te, in_tr, in_te = split(args.n, args.seed, args.sample)

    def report(name: str, model: ParametricUMAP, seconds: float) -> None:
        r = metrics(Xtr, ytr, Xte, yte, model.transform(Xtr), model.transform(Xte),
                    s_tr, s_te, in_tr, in_te)
        logger.info("%-40s kp_train %.3f kp_full %.3f kp_test %.3f kp_tfull %.3f acc %.3f "
                    "trust %.3f t %.1f", name, r["kp_train"], r["kp_full"], r["kp_test"],
                    r["kp_test_full"], r["acc"], r["trust"], seconds)

    common = dict(min_dist=0.5, random_state=args.seed, device="cpu")
    t0 = time.perf_counter()
    model = ParametricUMAP(fit_rows=args.fit_rows, **common, **extra).fit(Xtr)
    spent = time.perf_counter() - t0
    report(f"fit_rows={args.fit_rows} {args.params}", model, spent)
    done = 0
    for epochs in args.continue_epochs:
        t0 = time.perf_counter()
        model = ParametricUMAP(n_epochs=epochs, **common).fit(Xtr, init_model=model)
        spent += time.perf_counter() - t0
        done += epochs
        report(f"  then every row, {done} epochs", model, spent)


if __name__ == "__main__":
    main()
