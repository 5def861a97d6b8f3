"""Command line for batch jobs: ``pumap-dask fit | transform | demo``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

logger = logging.getLogger("pumap_dask.cli")


def _client(args):
    """A distributed client: the scheduler given, a LocalCluster, or None (threads)."""
    if args.scheduler == "threads":
        return None
    from distributed import Client, LocalCluster

    if args.scheduler == "local":
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                               processes=True, dashboard_address=None)
        return Client(cluster)
    return Client(args.scheduler)


def _add_cluster_args(p):
    p.add_argument("--scheduler", default="local",
                   help="'local' (LocalCluster, default), 'threads', or a scheduler address")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default 2)")
    p.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")


def cmd_fit(args) -> None:
    from .estimator import ParametricUMAP

    params = dict(n_components=args.n_components, n_neighbors=args.n_neighbors,
                  min_dist=args.min_dist, random_state=args.random_state, device=args.device,
                  verbose=True)
    params.update(json.loads(args.params) if args.params else {})  # --params wins
    model = ParametricUMAP(**params)
    client = _client(args)
    try:
        model.fit(args.input, key=args.key)
    finally:
        if client is not None:
            client.close()
    model.save(args.model)
    print(model)
    logger.info("model saved to %s", args.model)


def cmd_transform(args) -> None:
    from .writers import transform_to_zarr, write_anndata_obsm

    client = _client(args)
    try:
        if args.obsm:
            write_anndata_obsm(args.input, args.model, key=args.key, obsm_key=args.obsm,
                               resume=not args.overwrite, device=args.device)
            logger.info("wrote obsm/%s into %s", args.obsm, args.input)
        else:
            if not args.out:
                raise SystemExit("transform needs --out PATH.zarr or --obsm NAME")
            transform_to_zarr(args.input, args.model, args.out, key=args.key,
                              resume=not args.overwrite, device=args.device)
            logger.info("embedding written to %s", args.out)
    finally:
        if client is not None:
            client.close()


def cmd_demo(args) -> None:
    """The main job end to end on synthetic data and a local Dask cluster."""
    import numpy as np
    import zarr

    from .datasets import clusters
    from .estimator import ParametricUMAP
    from .writers import transform_to_zarr

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    X, labels = clusters(args.n_samples, 32, 10, random_state=args.random_state)
    rng = np.random.default_rng(args.random_state)
    order = rng.permutation(len(X))
    n_train = int(0.7 * len(X))
    tr, te = np.sort(order[:n_train]), np.sort(order[n_train:])
    for name, rows in (("train", tr), ("test", te)):
        z = zarr.create_array(os.path.join(out, f"{name}.zarr"), shape=(len(rows), 32),
                              chunks=(256, 32), dtype="float32", overwrite=True)
        z[:] = X[rows]
    client = _client(args)
    try:
        t0 = time.perf_counter()
        model = ParametricUMAP(min_dist=0.5, random_state=args.random_state, device="cpu",
                               verbose=True).fit(os.path.join(out, "train.zarr"))
        logger.info("fit in %.1fs", time.perf_counter() - t0)
        model_dir = model.save(os.path.join(out, "model"))
        emb = transform_to_zarr(os.path.join(out, "test.zarr"), model_dir,
                                os.path.join(out, "test_embedding.zarr"), resume=False)
        test_emb = emb[:]
    finally:
        if client is not None:
            client.close()
    print(model)
    from sklearn.neighbors import KNeighborsClassifier

    acc = KNeighborsClassifier(15).fit(model.embedding_, labels[tr]).score(test_emb, labels[te])
    print(f"held-out 15-NN accuracy: {acc:.3f}")
    try:
        from .plotting import plot_train_test

        for path in plot_train_test(model.embedding_, labels[tr], test_emb, labels[te], out):
            print(f"wrote {path}")
    except ImportError:
        logger.info("matplotlib not installed; skipping pictures")
    print(f"outputs in {out}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pumap-dask", description="Parametric UMAP at scale")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a model on a Zarr array / AnnData store")
    p.add_argument("input", help="Zarr array path or AnnData .zarr store")
    p.add_argument("model", help="output model directory")
    p.add_argument("--key", default=None, help="array inside the store (default obsm/X_pca)")
    p.add_argument("--n-components", type=int, default=2)
    p.add_argument("--n-neighbors", type=int, default=15)
    p.add_argument("--min-dist", type=float, default=0.1)
    p.add_argument("--random-state", type=int, default=42)
    p.add_argument("--device", default="auto")
    p.add_argument("--params", help="more ParametricUMAP parameters as JSON")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("transform", help="embed a Zarr array / AnnData store lazily")
    p.add_argument("input")
    p.add_argument("model", help="saved model directory")
    p.add_argument("--out", help="output Zarr array path")
    p.add_argument("--obsm", help="write into this obsm key of the AnnData store instead")
    p.add_argument("--key", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="do not resume; start over")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("demo", help="the seed vignette on a local Dask cluster")
    p.add_argument("--out", default="pumap_demo")
    p.add_argument("--n-samples", type=int, default=1500)
    p.add_argument("--random-state", type=int, default=42)
    _add_cluster_args(p)
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import dask
    import distributed  # noqa: F401  (sets up its loggers on import; quiet them after)

    dask.config.set({"logging.distributed": "warning"})
    for noisy in ("distributed", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
