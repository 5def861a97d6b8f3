"""Millions of cells end to end with the command line (issue 18): 1M, 3M, 10M rows.

For each size n, on trajectory-rich cell-like data
(:func:`pumap_dask.datasets.write_trajectory_like_zarr`, 50 features, written chunk by chunk
so any n fits in bounded memory):

1. the training set (rows ``0:n``) and a separate query set (rows ``n:n+q``, the same
   populations) are written to Zarr with their labels;
2. ``pumap-dask fit TRAIN MODEL --workers 2 --threads 1 --memory M --min-dist 0.5`` runs as a
   subprocess (its own 2-worker LocalCluster with a memory limit per worker);
3. ``pumap-dask transform TRAIN MODEL --out ...`` embeds the training set, and the same for
   the query set, each timed;
4. quality on labelled samples: held-out 15-NN accuracy (classifier on 20,000 training
   rows' embedding, scoring 5,000 query rows), kNN preservation
   (:func:`pumap_dask.report_metrics.knn_preservation`) of 3,000 training and 3,000 query
   rows, trustworthiness (k=15) of 3,000 query rows; the kNN recall the fit measured.

Memory: while each command runs, the command's whole process tree (client and workers) is
sampled every second: peak RSS of the client and of each worker, and PSS (which splits
shared pages, e.g. the node-local row cache, between the processes that map them).

Usage (one size per run keeps the page cache of one size out of the next)::

    python benchmarks/ten_million.py --sizes 1000000 --query 1000000 --json tm.json
    python benchmarks/ten_million.py --sizes 3000000 10000000 --memory 6GiB

Prints one table row per size (stage times from the model's ``timings_``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

logger = logging.getLogger("ten_million")


class TreeSampler:
    """Peak RSS and PSS of a process and its descendants, sampled from a thread.

    RSS every ``interval`` seconds; PSS (reading the kernel's page maps, which cost this
    harness about a sixth of a core at 10M) every ``pss_every``-th sample.
    """

    def __init__(self, pid: int, interval: float = 1.0, pss_every: int = 10) -> None:
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self._count = 0
        self.peak: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        self._count += 1
        with_pss = self._count % self.pss_every == 1 or self.pss_every <= 1
        for p in procs:
            try:
                name = "client" if p.pid == self.pid else self._role(p)
                mem = p.memory_full_info() if with_pss else p.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rec = self.peak.setdefault(name, {"rss": 0, "pss": 0})
            rec["rss"] = max(rec["rss"], int(mem.rss))
            rec["pss"] = max(rec["pss"], int(getattr(mem, "pss", 0)))

    @staticmethod
    def _role(p: psutil.Process) -> str:
        cmd = " ".join(p.cmdline())
        kind = "worker" if "spawn_main" in cmd or "multiprocessing" in cmd else "other"
        return f"{kind}-{p.pid}"

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        workers = {k: v for k, v in self.peak.items() if k.startswith("worker")}
        return {"client_rss": self.peak.get("client", {}).get("rss", 0),
                "client_pss": self.peak.get("client", {}).get("pss", 0),
                "worker_rss_max": max((v["rss"] for v in workers.values()), default=0),
                "worker_pss_max": max((v["pss"] for v in workers.values()), default=0),
                "workers": len(workers)}


def run_cli(args: list[str], log: str) -> tuple[float, dict]:
    """Run ``pumap-dask ARGS`` (stderr to ``log``); wall seconds and the tree's peaks."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "pumap_dask.cli", *args], stdout=f,
                             stderr=subprocess.STDOUT)
        with TreeSampler(p.pid) as s:
            rc = p.wait()
    if rc != 0:
        raise SystemExit(f"pumap-dask {' '.join(args)} failed ({rc}); see {log}")
    return time.perf_counter() - t0, s.summary()


def write_data(n: int, q: int, tmp: str, chunk_rows: int) -> dict:
    from pumap_dask.datasets import write_trajectory_like_zarr

    paths = {k: os.path.join(tmp, f"{k}.zarr") for k in ("train", "ytrain", "query", "yquery")}
    t0 = time.perf_counter()
    write_trajectory_like_zarr(paths["train"], n, chunk_rows=chunk_rows,
                               labels_path=paths["ytrain"])
    write_trajectory_like_zarr(paths["query"], q, chunk_rows=chunk_rows,
                               labels_path=paths["yquery"], start=n)
    logger.info("wrote %d + %d rows in %.0fs", n, q, time.perf_counter() - t0)
    return paths


def quality(paths: dict, emb_train: str, emb_query: str, seed: int = 0) -> dict:
    import zarr
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    from pumap_dask.report_metrics import knn_preservation

    rng = np.random.default_rng(seed)
    Xtr, Xq = zarr.open_array(paths["train"], mode="r"), zarr.open_array(paths["query"], mode="r")
    ytr, yq = zarr.open_array(paths["ytrain"], mode="r"), zarr.open_array(paths["yquery"], mode="r")
    Etr, Eq = zarr.open_array(emb_train, mode="r"), zarr.open_array(emb_query, mode="r")
    tr = np.sort(rng.choice(Xtr.shape[0], min(20_000, Xtr.shape[0]), replace=False))
    qs = np.sort(rng.choice(Xq.shape[0], min(5_000, Xq.shape[0]), replace=False))
    E_tr, E_q = Etr.get_orthogonal_selection((tr, slice(None))), \
        Eq.get_orthogonal_selection((qs, slice(None)))
    X_tr, X_q = Xtr.get_orthogonal_selection((tr, slice(None))), \
        Xq.get_orthogonal_selection((qs, slice(None)))
    clf = KNeighborsClassifier(15).fit(E_tr, ytr.get_orthogonal_selection(tr))
    acc_in = KNeighborsClassifier(15).fit(X_tr, ytr.get_orthogonal_selection(tr))
    yq_s = yq.get_orthogonal_selection(qs)
    return {"acc": float(clf.score(E_q, yq_s)),
            "acc_input_space": float(acc_in.score(X_q, yq_s)),
            "kp_train": float(knn_preservation(X_tr[:3000], E_tr[:3000])),
            "kp_query": float(knn_preservation(X_q[:3000], E_q[:3000])),
            "trust_query": float(trustworthiness(X_q[:3000], E_q[:3000], n_neighbors=15))}


def run_size(n: int, args) -> dict:
    import pumap_dask

    tmp = args.reuse or tempfile.mkdtemp(prefix=f"tm{n}-", dir=args.tmp)
    try:
        if args.reuse:  # a kept run's data, and its work directory: the fit resumes
            paths = {k: os.path.join(tmp, f"{k}.zarr")
                     for k in ("train", "ytrain", "query", "yquery")}
            if os.path.exists(os.path.join(tmp, "fit.log")):
                os.replace(os.path.join(tmp, "fit.log"), os.path.join(tmp, "fit-earlier.log"))
        else:
            paths = write_data(n, args.query, tmp, args.chunk_rows)
        model, work = os.path.join(tmp, "model"), os.path.join(tmp, "work")
        cluster = ["--workers", str(args.workers), "--threads", "1", "--memory", args.memory]
        fit_s, fit_mem = run_cli(["fit", paths["train"], model, "--min-dist", "0.5",
                                  "--work-dir", work, *cluster, *args.extra],
                                 os.path.join(tmp, "fit.log"))
        m = pumap_dask.load(model)
        shutil.rmtree(work, ignore_errors=True)
        emb_tr, emb_q = os.path.join(tmp, "emb_train.zarr"), os.path.join(tmp, "emb_query.zarr")
        tr_s, tr_mem = run_cli(["transform", paths["train"], model, "--out", emb_tr, *cluster],
                               os.path.join(tmp, "transform.log"))
        q_s, _ = run_cli(["transform", paths["query"], model, "--out", emb_q, *cluster],
                         os.path.join(tmp, "query.log"))
        row = {"n": n, "query": args.query, "fit_s": fit_s, **{f"fit_{k}": v
                                                              for k, v in fit_mem.items()},
               "stages": {k: round(float(v), 1)
                          for k, v in (getattr(m, "timings_", None) or {}).items()},
               "knn_recall": getattr(m, "knn_recall_", None),
               "n_epochs": getattr(m, "n_epochs_", None), "n_edges": getattr(m, "n_edges_", None),
               "train_world_size": getattr(m, "train_world_size_", None),
               "transform_s": tr_s, "transform_worker_rss_max": tr_mem["worker_rss_max"],
               "query_transform_s": q_s, **quality(paths, emb_tr, emb_q)}
        return row
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--query", type=int, default=1_000_000, help="rows of the query set")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory", default="6GiB", help="memory limit per worker")
    ap.add_argument("--chunk-rows", type=int, default=200_000)
    ap.add_argument("--tmp", default=None, help="directory for the data (default $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the data and model")
    ap.add_argument("--reuse", help="a kept run's directory (one size): its data, and its work "
                    "directory, from which the fit resumes (stage times then cover only "
                    "what was left; the earlier fit's log is kept as fit-earlier.log)")
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    ap.add_argument("extra", nargs="*", help="more `pumap-dask fit` arguments (after --)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for n in args.sizes:
        row = run_size(n, args)
        rows.append(row)
        logger.info("%s", json.dumps(row))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    gib = 2.0 ** 30
    print("| n | fit s | kNN / graph / init / train s | client RSS GiB | worker RSS / PSS GiB "
          "| transform s (train, query) | recall | acc (input space) | kp train / query "
          "| trust | epochs | ranks |")
    print("|" + "---|" * 12)
    for r in rows:
        st = r["stages"]
        print(f"| {r['n']:,} | {r['fit_s']:.0f} | {st.get('knn', 0):.0f} / {st.get('graph', 0):.0f}"
              f" / {st.get('init', 0):.0f} / {st.get('train', 0):.0f} | "
              f"{r['fit_client_rss'] / gib:.2f} | {r['fit_worker_rss_max'] / gib:.2f} / "
              f"{r['fit_worker_pss_max'] / gib:.2f} | {r['transform_s']:.0f}, "
              f"{r['query_transform_s']:.0f} | {r['knn_recall'] or float('nan'):.3f} | "
              f"{r['acc']:.3f} ({r['acc_input_space']:.3f}) | {r['kp_train']:.3f} / "
              f"{r['kp_query']:.3f} | {r['trust_query']:.3f} | {r['n_epochs']} | "
              f"{r['train_world_size']} |")


if __name__ == "__main__":
    main()
