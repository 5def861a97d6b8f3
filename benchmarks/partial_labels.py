"""Partial labels (issue 19): do labels on some rows help, or hurt, the unlabelled rows?

For each method, seed and fraction of labels known, one semi-supervised fit on all rows
(``fit(X, y)`` with ``y = -1`` on the unlabelled rows) against the same method's
unsupervised fit (``fit(X)``, same seed). The labelled rows are the first ``f * n`` of a
seeded permutation, so the rows known at 10% are known at 50% and 90% too; ``odd`` labels
every other row whatever the seed (the issue's ``y[::2] = -1``).

The measure: 15-NN accuracy of the unlabelled rows in the training embedding, two ways
(:func:`unlabelled_accuracy`): ``labelled`` voters, a 15-NN classifier of the labelled
rows' embedding and labels predicting the unlabelled rows (the issue's measure), and
``all`` voters, each unlabelled row's 15 nearest other rows voting with their true labels.
The unsupervised fit is scored on the same rows with the same voters. Partial labels
should never lower either.

Methods: ``pumap`` (in-memory fit), ``pumap-partitioned`` (``knn_method="partitioned"``
on a 2-worker ``distributed.LocalCluster``, labels mixed in on the workers), ``umap``
(umap-learn's ``UMAP``, its default epochs unless ``--umap-epochs``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/partial_labels.py --data digits --epochs 20
    OMP_NUM_THREADS=1 python benchmarks/partial_labels.py --data digits \
        --methods pumap pumap-partitioned umap --fractions 0.1 0.5 0.9 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/partial_labels.py --data mnist --methods pumap

Prints one line per fit as it goes, then a markdown table: method x fraction known x
voters, means over seeds of the unsupervised and the semi-supervised accuracy, their
difference and the worst seed's difference. ``--json`` keeps the fits; ``--tables
a.json b.json ...`` prints one table of several runs (e.g. one run per method or seed,
each a few minutes). ``--label-mix 1.0`` measures umap-learn's symmetrisation of the
labelled graph (the fuzzy union, pumap_dask's rule before issue 19).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
K = 15
VOTERS = ("labelled", "all")


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(X float32, labels) of ``digits`` or ``mnist`` (the 10k MNIST test set)."""
    from quality import load_dataset

    data = load_dataset(name)
    if data is None:
        raise SystemExit(f"data set {name} is not available")
    return data


def fraction_arg(text: str) -> float | str:
    """A fraction known (``0.5``) or ``odd`` (every other row known, whatever the seed)."""
    return text if text == "odd" else float(text)


def fraction_name(fraction: float | str) -> str:
    return "50% (y[::2] = -1)" if fraction == "odd" else f"{fraction:.0%}"


def known_mask(n: int, fraction: float | str, seed: int) -> np.ndarray:
    """Rows whose labels are known: the first ``fraction * n`` of a seeded permutation, or
    for ``"odd"`` the rows of odd index (the issue's ``y[::2] = -1``)."""
    if fraction == "odd":
        return np.arange(n) % 2 == 1
    order = np.random.default_rng(seed).permutation(n)
    known = np.zeros(n, dtype=bool)
    known[order[:round(fraction * n)]] = True
    return known


def unlabelled_accuracy(emb: np.ndarray, y: np.ndarray, known: np.ndarray, k: int = K,
                        voters: str = "labelled") -> float:
    """15-NN accuracy of the unlabelled rows in a training embedding.

    ``voters="labelled"``: a 15-NN classifier of the labelled rows (their labels) predicts
    the unlabelled rows (the issue's measure: can the labels be carried to the other rows?).
    ``voters="all"``: each unlabelled row's 15 nearest other rows, labelled or not, vote
    with their true labels (are the unlabelled rows among their own class?).
    """
    from sklearn.neighbors import NearestNeighbors

    rows = np.flatnonzero(~known)
    ref = np.flatnonzero(known) if voters == "labelled" else np.arange(len(y))
    extra = 0 if voters == "labelled" else 1  # a row is not its own neighbour
    _, ind = NearestNeighbors(n_neighbors=k + extra).fit(emb[ref]).kneighbors(emb[rows])
    ind = ref[ind]
    votes = np.zeros((len(rows), int(y.max()) + 1))
    for j in range(k + extra):
        other = ind[:, j] != rows
        np.add.at(votes, (np.flatnonzero(other), y[ind[other, j]]), 1.0)
    return float((votes.argmax(1) == y[rows]).mean())


def fit_embedding(method: str, X: np.ndarray, y: np.ndarray | None, seed: int,
                  epochs: int | None, umap_epochs: int | None, work: str) -> np.ndarray:
    """The training embedding of one fit."""
    if method == "umap":
        import umap

        model = umap.UMAP(random_state=seed, n_epochs=umap_epochs)
        return model.fit_transform(X, y)
    from pumap_dask import ParametricUMAP

    if method == "pumap":
        model = ParametricUMAP(random_state=seed, n_epochs=epochs, device="cpu")
        return model.fit(X, y).embedding_
    if method == "pumap-partitioned":
        import dask.array as da

        Xd = da.from_array(X, chunks=(-(-len(X) // 4), -1))
        model = ParametricUMAP(random_state=seed, n_epochs=epochs, device="cpu",
                               knn_method="partitioned", work_dir=tempfile.mkdtemp(dir=work),
                               train_world_size=1)
        return np.asarray(model.fit(Xd, y).embedding_)
    raise ValueError(method)


def set_label_mix(mix: float | None) -> None:
    """Use another symmetrisation of the labelled graph (1.0: umap-learn's fuzzy union, the
    rule before issue 19; the in-memory graph and the partitioned fit's edge shards)."""
    if mix is None:
        return
    from pumap_dask import graph
    from pumap_dask.distributed import graph_dask

    graph.LABEL_SET_OP_MIX = graph_dask.LABEL_SET_OP_MIX = mix


def run(args: argparse.Namespace, X: np.ndarray, y: np.ndarray) -> list[dict]:
    """Every fit of the run: one result per method, seed and fraction known."""
    client = None
    if "pumap-partitioned" in args.methods:
        import distributed

        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", memory_limit="3GiB")
        client = distributed.Client(cluster)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for method in args.methods:
            name = method if args.label_mix is None or method == "umap" else (
                f"{method} (mix {args.label_mix:g})")
            for seed in args.seeds:
                t0 = time.perf_counter()
                base = fit_embedding(method, X, None, seed, args.epochs, args.umap_epochs, work)
                print(f"{name} seed {seed} unsupervised fit {time.perf_counter() - t0:.0f}s",
                      flush=True)
                for f in args.fractions:
                    known = known_mask(len(X), f, seed)
                    t0 = time.perf_counter()
                    emb = fit_embedding(method, X, np.where(known, y, -1), seed, args.epochs,
                                        args.umap_epochs, work)
                    r = {"data": args.data, "method": name, "known": f, "seed": seed,
                         "epochs": args.epochs, "fit_s": time.perf_counter() - t0}
                    for voters in VOTERS:
                        r[f"unsup_{voters}"] = unlabelled_accuracy(base, y, known, voters=voters)
                        r[f"semi_{voters}"] = unlabelled_accuracy(emb, y, known, voters=voters)
                    rows.append(r)
                    print(f"  known {fraction_name(f)}: " + ", ".join(
                        f"{v} voters: unsup {r[f'unsup_{v}']:.4f} semi {r[f'semi_{v}']:.4f}"
                        for v in VOTERS) + f" ({r['fit_s']:.0f}s)", flush=True)
    if client is not None:
        client.close()
        cluster.close()
    return rows


def table(rows: list[dict]) -> None:
    """Markdown table: means over seeds per data set, method, fraction known and voters."""
    print(f"{K}-NN accuracy of the unlabelled rows, means over seeds\n")
    print("| data | method | known | voters | seeds | unsupervised | semi-supervised | diff "
          "| worst seed diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = list(dict.fromkeys((r["data"], r["method"], r["known"]) for r in rows))
    for data, method, f in keys:
        sel = [r for r in rows if (r["data"], r["method"], r["known"]) == (data, method, f)]
        for v in VOTERS:
            u = np.mean([r[f"unsup_{v}"] for r in sel])
            s = np.mean([r[f"semi_{v}"] for r in sel])
            worst = min(r[f"semi_{v}"] - r[f"unsup_{v}"] for r in sel)
            print(f"| {data} | {method} | {fraction_name(f)} | {v} | {len(sel)} | {u:.4f} | {s:.4f} "
                  f"| {s - u:+.4f} | {worst:+.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--methods", nargs="+", default=["pumap", "pumap-partitioned", "umap"])
    ap.add_argument("--fractions", nargs="+", type=fraction_arg, default=[0.1, 0.5, 0.9],
                    help="fractions of rows labelled; 'odd': every other row (y[::2] = -1)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="pumap_dask n_epochs (default: "
                    "the estimator's)")
    ap.add_argument("--umap-epochs", type=int, default=None, help="umap-learn n_epochs")
    ap.add_argument("--label-mix", type=float, default=None,
                    help="pumap_dask.graph.LABEL_SET_OP_MIX for this run (1.0: umap-learn's "
                    "fuzzy union, the rule before issue 19)")
    ap.add_argument("--json", default=None, help="also write the per-fit results here")
    ap.add_argument("--tables", nargs="+", default=None, metavar="JSON",
                    help="no fits: print the table of earlier runs' --json files")
    args = ap.parse_args()
    if args.tables:
        rows = []
        for path in args.tables:
            with open(path) as fh:
                rows += json.load(fh)
        table(rows)
        return
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    set_label_mix(args.label_mix)
    X, y = load(args.data)
    rows = run(args, X, y)
    print(f"\n{args.data}, {len(X)} rows, pumap_dask n_epochs={args.epochs or 'default'}, "
          f"umap-learn n_epochs={args.umap_epochs or 'default'}, seeds {args.seeds}")
    table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
