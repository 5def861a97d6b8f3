"""How much training the encoder needs as n grows (tracker issue 8), and what a step costs.

For each size n: cell-like data (50 features), a random 90/10 split, then the kNN, graph
and initial layout of the 90% once (:mod:`pumap_dask.pipeline` stages, in memory). Each
training configuration then trains a fresh encoder on the same graph and layout and is
scored on the held-out 10%: 15-NN accuracy (classifier on a 20,000-row sample of the
training embedding, 5,000 held-out rows) and trustworthiness (k=15).

Configurations are JSON objects of :class:`pumap_dask.train.TrainConfig` fields over the
defaults, plus ``epochs`` (passes over the edges). Usage::

    python benchmarks/train_budget.py --sizes 50000 200000 \\
        --configs '[{"epochs": 5}, {"epochs": 10}, {"epochs": 20}]'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

BASE = {"min_dist": 0.5, "spread": 1.0, "n_neighbors": 15, "knn_method": "auto",
        "set_op_mix_ratio": 1.0, "local_connectivity": 1.0, "tolerance": 1e-5,
        "init": "spectral", "random_state": 0, "knn_overlap": 2, "device": "cpu",
        "n_components": 2, "hidden_layers": (128, 64, 32), "n_projection": 64,
        "learning_rate": 1e-2, "n_epochs": None, "batch_size": 16384,
        "negative_sample_rate": 5, "correlation_weight": 0.0}


def score(etr, ytr, ete, yte, Xte, seed=0):
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(seed)
    tr = rng.choice(len(ytr), size=min(20_000, len(ytr)), replace=False)
    te = rng.choice(len(yte), size=min(5_000, len(yte)), replace=False)
    acc = KNeighborsClassifier(15).fit(etr[tr], ytr[tr]).score(ete[te], yte[te])
    return float(acc), float(trustworthiness(Xte[te], ete[te], n_neighbors=15))


def main() -> None:
    from pumap_dask import pipeline
    from pumap_dask.datasets import cell_like
    from pumap_dask.encoder import encode
    from pumap_dask.train import find_ab_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000])
    ap.add_argument("--configs", default='[{}]', help="JSON list of TrainConfig overrides")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()
    configs = json.loads(args.configs)
    rows = []
    for n in args.sizes:
        X, y = cell_like(n, 50, random_state=0)
        rng = np.random.default_rng(0)
        test = np.zeros(n, bool)
        test[rng.choice(n, size=n // 10, replace=False)] = True
        Xtr, ytr, Xte, yte = X[~test], y[~test], X[test], y[test]
        t0 = time.perf_counter()
        handle = pipeline.open_input(Xtr)
        nb = pipeline.run_knn(handle, BASE, "cpu")
        edges = pipeline.run_graph(nb, BASE)
        t_graph = time.perf_counter() - t0
        t0 = time.perf_counter()
        layout = pipeline.run_init(handle, edges, BASE, "cpu")
        t_init = time.perf_counter() - t0
        a, b = find_ab_params(1.0, 0.5)
        print(f"n={n}: {len(edges)} edges, kNN+graph {t_graph:.1f}s, init ({layout.method}) "
              f"{t_init:.1f}s", flush=True)
        for conf in configs:
            conf = dict(conf)
            epochs = conf.pop("epochs", None)
            cfg = pipeline.train_config(BASE, len(edges), Xtr.shape[1], "cpu", a, b)
            cfg = dataclasses.replace(cfg, **conf)
            if epochs is not None:
                cfg = dataclasses.replace(cfg, n_epochs=int(epochs))
            t0 = time.perf_counter()
            trained = pipeline.run_train(Xtr, edges, layout, cfg)
            t_train = time.perf_counter() - t0
            steps = cfg.n_epochs * -(-len(edges) // cfg.batch_size)
            acc, trust = score(encode(trained.encoder, Xtr), ytr,
                               encode(trained.encoder, Xte), yte, Xte)
            row = {"n": n, "config": conf, "epochs": cfg.n_epochs, "steps": steps,
                   "edge_samples_per_row": steps * cfg.batch_size / len(Xtr),
                   "train_s": t_train, "s_per_step": t_train / steps, "acc": acc,
                   "trust": trust}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
