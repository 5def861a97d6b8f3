"""Training-configuration sweep on a fixed kNN graph (the experiments behind the defaults).

Builds the exact kNN, the fuzzy graph and the spectral layout of a data set's 70% split
once, then trains one encoder per configuration and reports held-out 15-NN accuracy and
trustworthiness (and the training set's trustworthiness, to separate optimisation from
generalisation).

Usage::

    python benchmarks/sweep.py mnist '{}' '{"learning_rate": 0.03}' '{"init": "random"}'

Each configuration is a JSON object of ``pumap_dask.train.TrainConfig`` fields overriding
the defaults below, plus ``"init": "spectral" | "pca" | "random"``.
"""

from __future__ import annotations

import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BASE = dict(n_epochs=100, batch_size=16384, n_projection=64, hidden_layers=[128, 64, 32],
            learning_rate=0.01)


def main(argv=None) -> None:
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    from pumap_dask.graph import fuzzy_simplicial_set, graph_to_edges
    from pumap_dask import pipeline
    from pumap_dask.knn import exact_knn
    from pumap_dask.train import TrainConfig, find_ab_params, train_encoder
    from pumap_dask.encoder import encode
    from quality import load_dataset, split

    args = sys.argv[1:] if argv is None else argv
    dataset, configs = args[0], args[1:] or ["{}"]
    X, y = load_dataset(dataset)
    tr, te = split(len(X), 0)
    ind, dist = exact_knn(X[tr], 15)
    graph = fuzzy_simplicial_set(ind, dist)
    head, tail, weight = graph_to_edges(graph, 200)
    a, b = find_ab_params(1.0, 0.1)
    layouts = {}
    for text in configs:
        kw = {**BASE, **json.loads(text)}
        init = kw.pop("init", "spectral")
        if init not in layouts:
            lay = pipeline.run_init(
                pipeline.open_input(X[tr]), pipeline.Edges(head, tail, weight, len(tr), graph),
                {"init": init, "n_components": 2, "random_state": 0, "n_neighbors": 15,
                 "set_op_mix_ratio": 1.0, "local_connectivity": 1.0}, "cpu")
            layouts[init] = None if lay is None else (lay.rows, lay.positions)
        t0 = time.perf_counter()
        enc, _ = train_encoder(X[tr], head, tail, weight, TrainConfig(a=a, b=b, **kw),
                               init_embedding=layouts[init])
        dt = time.perf_counter() - t0
        e_tr, e_te = encode(enc, X[tr]), encode(enc, X[te])
        acc = KNeighborsClassifier(15).fit(e_tr, y[tr]).score(e_te, y[te])
        print(f"{text:50s} acc {acc:.4f} trust {trustworthiness(X[te], e_te, n_neighbors=15):.4f}"
              f" train-trust {trustworthiness(X[tr][:3000], e_tr[:3000], n_neighbors=15):.4f}"
              f" train {dt:.1f}s", flush=True)


if __name__ == "__main__":
    main()
