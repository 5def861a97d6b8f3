"""Recall@k and time of the in-memory kNN back-ends on the same data (tracker issue 11).

Back-ends: ``exact`` (blockwise torch, the ground truth), ``nndescent`` (pynndescent, all
cores), ``hnsw`` (usearch since issue 19, with the default ``M``/``ef_construction``/``ef``,
index built with one thread because a ``random_state`` is given: deterministic) and
``hnsw-mt`` (built on all cores, ``random_state=None``: not deterministic).

Data: cell-like n x 50 (:func:`pumap_dask.datasets.cell_like`) and the MNIST test set
(10k x 784) when ``/work/shared/data/mnist10k`` holds it (as ``benchmarks/quality.py``).
Recall@k is measured against the exact neighbours of every row where exact search ran
(``--exact-max-n``), else on ``--recall-samples`` random rows. pynndescent's numba
compilation is paid by a warm-up call before the timings. :func:`run` and
:func:`warm_up_nndescent` also serve ``benchmarks/quality.py --knn``. Usage::

    python benchmarks/knn_backends.py --cells-n 200000 --metrics euclidean cosine \\
        --json knn_backends.json

``--hnsw-libs hnswlib usearch faiss`` compares HNSW libraries instead (issue 19: the back-end
must install from wheels): each builds one index (``M``, ``ef_construction`` and ``ef`` as
:mod:`pumap_dask.knn`'s defaults, one build and query thread) and every row queries it;
printed are build and query seconds (wall and process CPU) and recall@k against exact search
of all rows, then a Markdown table. Cosine searches the unit rows in L2, as the package does::

    OMP_NUM_THREADS=1 python benchmarks/knn_backends.py --cells-n 20000 \\
        --metrics euclidean --hnsw-libs hnswlib usearch faiss
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def datasets(args) -> dict:
    from pumap_dask.datasets import cell_like
    from quality import load_dataset

    out = {}
    if args.cells_n:
        X, _ = cell_like(args.cells_n, n_features=50, random_state=0)
        out[f"cells {args.cells_n // 1000}k x 50"] = np.ascontiguousarray(X, dtype=np.float32)
    if not args.no_mnist:
        m = load_dataset("mnist")
        if m is not None:
            out["mnist test 10k x 784"] = m[0]
        else:
            print("MNIST not found; skipped", file=sys.stderr)
    return out


def have_hnswlib() -> bool:
    """Whether the hnsw back-end's optional package (usearch since issue 19; the name is
    kept for ``benchmarks/quality.py``) is importable."""
    import importlib.util

    return importlib.util.find_spec("usearch") is not None


def warm_up_nndescent(k: int = 15) -> float:
    """Pay pynndescent's numba compilation outside the timings; returns its seconds."""
    from pumap_dask.knn import nndescent_knn

    t0 = time.perf_counter()
    nndescent_knn(np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32), k,
                  random_state=0)
    return time.perf_counter() - t0


HNSW_LIBS = ("hnswlib", "usearch", "faiss")


def hnsw_lib_search(lib: str, X: np.ndarray, k1: int, seed: int = 0) -> tuple:
    """One HNSW index of library ``lib`` over ``X`` (float32, one thread), queried by every
    row for ``k1`` neighbours with pumap_dask's default ``M``/``ef_construction``/``ef``.

    Returns ``(labels, build wall s, query wall s, build+query CPU s)``.
    """
    from pumap_dask.knn import HNSW_EF, HNSW_EF_CONSTRUCTION, HNSW_M

    n, d = X.shape
    ef = max(HNSW_EF, 2 * k1)
    c0, t0 = time.process_time(), time.perf_counter()
    if lib == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="l2", dim=d)
        index.init_index(max_elements=n, ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M,
                         random_seed=seed)
        index.add_items(X, np.arange(n), num_threads=1)
        index.set_ef(ef)
        t1 = time.perf_counter()
        labels, _ = index.knn_query(X, k=k1, num_threads=1)
    elif lib == "usearch":
        from usearch.index import Index

        index = Index(ndim=d, metric="l2sq", dtype="f32", connectivity=HNSW_M,
                      expansion_add=HNSW_EF_CONSTRUCTION, expansion_search=ef)
        index.add(np.arange(n), X, threads=1)
        t1 = time.perf_counter()
        labels = index.search(X, k1, threads=1).keys
    elif lib == "faiss":
        import faiss

        faiss.omp_set_num_threads(1)
        index = faiss.IndexHNSWFlat(d, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = ef
        index.hnsw.rng = faiss.RandomGenerator(seed)
        index.add(X)
        t1 = time.perf_counter()
        _, labels = index.search(X, k1)
    else:
        raise ValueError(f"unknown HNSW library {lib!r}; one of {HNSW_LIBS}")
    t2 = time.perf_counter()
    return np.asarray(labels, dtype=np.int64), t1 - t0, t2 - t1, time.process_time() - c0


def compare_hnsw_libs(name: str, X: np.ndarray, metric: str = "euclidean",
                      libs=HNSW_LIBS, k: int = 15) -> list[dict]:
    """Build and query time and recall@k (all rows, against exact search) of each HNSW
    library of ``libs`` on ``X``; a library that is not installed is skipped."""
    import importlib.util

    from pumap_dask.knn import exact_knn, knn_recall, normalize_rows

    exact_ind, _ = exact_knn(X, k, device="cpu", metric=metric)
    Xs = normalize_rows(X) if metric == "cosine" else np.ascontiguousarray(X, np.float32)
    n = len(X)
    rows = []
    for lib in libs:
        if importlib.util.find_spec(lib) is None:
            print(f"{lib} not installed; skipped", file=sys.stderr)
            continue
        labels, build, query, cpu = hnsw_lib_search(lib, Xs, k + 1)
        keep = labels != np.arange(n)[:, None]  # drop self (or the last when self is absent)
        keep[keep.all(axis=1), -1] = False
        ind = labels[keep].reshape(n, k)
        recall = knn_recall(ind, exact_ind)
        rows.append({"data": name, "metric": metric, "lib": lib, "n": n, "d": X.shape[1],
                     "k": k, "build_s": build, "query_s": query, "cpu_s": cpu,
                     "recall": recall})
        print(f"{name:22} {metric:9} {lib:8} build {build:7.2f}s query {query:7.2f}s "
              f"cpu {cpu:7.2f}s  recall@{k} {recall:.4f}", flush=True)
    return rows


def hnsw_table(rows: list[dict]) -> str:
    """The rows of :func:`compare_hnsw_libs` as a Markdown table."""
    k = rows[0]["k"] if rows else 15
    head = f"| data | metric | library | build s | query s | build+query s | CPU s | recall@{k} |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['metric']} | {r['lib']} | {r['build_s']:.2f} | "
                     f"{r['query_s']:.2f} | {r['build_s'] + r['query_s']:.2f} | "
                     f"{r['cpu_s']:.2f} | {r['recall']:.4f} |")
    return "\n".join(lines)


def run(name: str, X: np.ndarray, metric: str = "euclidean",
        methods=("exact", "nndescent", "hnsw", "hnsw-mt"), k: int = 15,
        exact_max_n: int = 300_000, recall_samples: int = 1000,
        prefix: str = "") -> list[dict]:
    """Time each back-end of ``methods`` on ``X`` and its recall@k against exact search
    (all rows when ``exact`` is among ``methods`` and ran, else ``recall_samples`` rows)."""
    from pumap_dask.knn import exact_knn, hnsw_knn, knn_recall, nndescent_knn, sample_recall

    n = X.shape[0]
    rows = []
    exact_ind = None
    backends = {
        "exact": lambda: exact_knn(X, k, device="cpu", metric=metric),
        "nndescent": lambda: nndescent_knn(X, k, random_state=0, metric=metric),
        "hnsw": lambda: hnsw_knn(X, k, random_state=0, metric=metric),
        "hnsw-mt": lambda: hnsw_knn(X, k, random_state=None, metric=metric),
    }
    for method in methods:
        if method == "exact" and n > exact_max_n:
            continue
        t0 = time.perf_counter()
        ind, _ = backends[method]()
        secs = time.perf_counter() - t0
        if method == "exact":
            exact_ind, recall, how = ind, 1.0, "all rows"
        elif exact_ind is not None:
            recall, how = knn_recall(ind, exact_ind), "all rows"
        else:
            recall = sample_recall(X, ind, recall_samples, device="cpu", metric=metric)
            how = f"{min(n, recall_samples)} rows"
        row = {"data": name, "metric": metric, "method": method, "n": n, "d": X.shape[1],
               "k": k, "seconds": secs, "recall": recall, "recall_on": how}
        rows.append(row)
        print(f"{prefix}{name:22} {metric:9} {method:9} {secs:8.2f}s  recall@{k} {recall:.4f} "
              f"({how})", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells-n", type=int, default=200_000)
    ap.add_argument("--no-mnist", action="store_true")
    ap.add_argument("--metrics", nargs="+", default=["euclidean", "cosine"])
    ap.add_argument("--methods", nargs="+", default=["exact", "nndescent", "hnsw", "hnsw-mt"])
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--exact-max-n", type=int, default=300_000,
                    help="largest n searched exactly (else recall is sampled)")
    ap.add_argument("--recall-samples", type=int, default=1000)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--hnsw-libs", nargs="+", choices=HNSW_LIBS,
                    help="compare these HNSW libraries (one thread) instead of the back-ends")
    args = ap.parse_args(argv)
    if args.hnsw_libs:
        rows = []
        for name, X in datasets(args).items():
            for metric in args.metrics:
                rows += compare_hnsw_libs(name, X, metric, args.hnsw_libs, args.k)
        print(hnsw_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return

    import torch

    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    if "nndescent" in args.methods:
        print(f"pynndescent warm-up (numba compilation) {warm_up_nndescent(args.k):.1f}s",
              flush=True)
    rows = []
    for name, X in datasets(args).items():
        for metric in args.metrics:
            rows += run(name, X, metric, args.methods, args.k, args.exact_max_n,
                        args.recall_samples)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
