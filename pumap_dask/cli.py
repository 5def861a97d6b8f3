"""Command line for batch jobs: ``pumap-dask fit | transform | demo``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

logger = logging.getLogger("pumap_dask.cli")


EXIT_OK = 0
EXIT_FAILED = 1  # a stage failed while running
EXIT_USAGE = 2  # bad input, parameters, paths or model files (argparse uses 2 as well)
EXIT_CLUSTER = 3  # the Dask cluster could not be started or reached

# estimator parameter -> the flag that sets it, so messages name what the user typed
FLAGS = {"n_components": "--n-components", "n_neighbors": "--n-neighbors",
         "min_dist": "--min-dist", "random_state": "--random-state", "device": "--device"}


DEMO_MARKER = ".pumap-demo"


class CLIError(Exception):
    """A user-facing failure: one line on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _name_flags(message: str) -> str:
    """Add the CLI flag to a message that names an estimator parameter."""
    for name, flag in FLAGS.items():
        if message.startswith(name + " "):
            return f"{message} (flag {flag})"
    if message.split(" ", 1)[0].isidentifier():
        return f"{message} (set through --params)"
    return message


def _client(args):
    """A distributed client: the scheduler given, a LocalCluster, or None (threads)."""
    if args.scheduler == "threads":
        return None
    from distributed import Client, LocalCluster

    if args.scheduler == "local":
        try:
            # the client re-raises a task's error (reported once, on one line); the workers'
            # own "Compute Failed" tracebacks are shown only with --debug
            quiet = logging.ERROR if getattr(args, "debug", False) else logging.CRITICAL
            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                                   processes=True, dashboard_address=None, silence_logs=quiet)
        except Exception as exc:
            raise CLIError(f"cannot start a local Dask cluster ({type(exc).__name__}: {exc}); "
                           "check --workers/--threads", EXIT_CLUSTER) from exc
        client = Client(cluster)
        client._pumap_cluster = cluster  # closed with the client
        return client
    try:
        return Client(args.scheduler, timeout=f"{args.connect_timeout}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise CLIError(f"cannot reach the Dask scheduler at {args.scheduler} within "
                       f"{args.connect_timeout:g} s ({type(exc).__name__}); check --scheduler "
                       "or raise --connect-timeout", EXIT_CLUSTER) from exc


def _close(client) -> None:
    if client is None:
        return
    cluster = getattr(client, "_pumap_cluster", None)
    try:
        client.close()
        if cluster is not None:
            cluster.close()
    except Exception:  # shutting down after a failure: the failure is what matters
        logger.debug("error while closing the Dask cluster", exc_info=True)


def _cluster_args_ok(args) -> None:
    if args.scheduler not in ("local", "threads") and ":" not in args.scheduler:
        raise CLIError(f"--scheduler must be 'local', 'threads' or a scheduler address such as "
                       f"tcp://host:8786, got {args.scheduler!r}")


def _fit_params(args) -> dict:
    """The estimator parameters from the flags and --params (which wins)."""
    from .estimator import ParametricUMAP

    params = dict(n_components=args.n_components, n_neighbors=args.n_neighbors,
                  min_dist=args.min_dist, random_state=args.random_state, device=args.device,
                  verbose=not args.quiet)
    if args.params:
        try:
            extra = json.loads(args.params)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--params is not valid JSON ({exc}); e.g. "
                           "--params '{\"n_epochs\": 50}'") from None
        if not isinstance(extra, dict):
            raise CLIError(f"--params must be a JSON object of parameters, got {args.params!r}")
        valid = ParametricUMAP().get_params()
        unknown = sorted(set(extra) - set(valid))
        if unknown:
            raise CLIError(f"--params: unknown parameter(s) {unknown}; valid: {sorted(valid)}")
        params.update(extra)
    return params


def _check_model_out(path: str, input_path: str) -> None:
    """The model directory must be writable and must not replace anything but a model."""
    from .model import check_model_path

    if os.path.realpath(path) == os.path.realpath(input_path):
        raise CLIError(f"the model directory {path} is the input; choose another MODEL_DIR")
    try:
        check_model_path(path)
    except (OSError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def cmd_fit(args) -> None:
    from .estimator import ParametricUMAP
    from .io import as_dask

    params = _fit_params(args)
    model = ParametricUMAP(**params)
    try:
        model._check_params()
    except ValueError as exc:
        raise CLIError(_name_flags(str(exc))) from None
    darr = as_dask(args.input, key=args.key)  # opened and checked before any cluster starts
    if darr.shape[0] < model.n_neighbors + 1:
        raise CLIError(f"the input has {darr.shape[0]} rows; --n-neighbors "
                       f"{model.n_neighbors} needs at least {model.n_neighbors + 1}")
    _check_model_out(args.model, args.input)
    client = _client(args)
    try:
        model.fit(args.input, key=args.key)
    finally:
        _close(client)
    model.save(args.model)
    print(model)
    logger.info("model saved to %s", args.model)


def cmd_transform(args) -> None:
    from .io import as_dask, check_n_features
    from .params import device
    from .transform import model_source
    from .writers import check_output_path, transform_to_zarr, write_anndata_obsm

    if bool(args.obsm) == bool(args.out):
        raise CLIError("transform needs exactly one of --out PATH.zarr (a new Zarr array) or "
                       "--obsm NAME (into the input AnnData store)")
    try:
        device(args.device, "--device")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    source = model_source(args.model)  # checks the model directory before any work
    darr = as_dask(args.input, key=args.key)
    check_n_features(darr.shape[1], source.n_features)
    if args.out:
        check_output_path(args.out, args.input, resume=not args.overwrite)
    client = _client(args)
    try:
        if args.obsm:
            write_anndata_obsm(args.input, args.model, key=args.key, obsm_key=args.obsm,
                               resume=not args.overwrite, device=args.device)
            logger.info("wrote obsm/%s into %s", args.obsm, args.input)
        else:
            transform_to_zarr(args.input, args.model, args.out, key=args.key,
                              resume=not args.overwrite, device=args.device)
            logger.info("embedding written to %s", args.out)
    finally:
        _close(client)


def cmd_demo(args) -> None:
    """The main job end to end on synthetic data and a local Dask cluster."""
    import numpy as np
    import zarr

    from .datasets import clusters
    from .estimator import ParametricUMAP
    from .writers import transform_to_zarr

    out = os.path.abspath(args.out)
    marker = os.path.join(out, DEMO_MARKER)
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)
                               and not os.path.exists(marker)):
        raise CLIError(f"--out {out} exists and is not an earlier demo output; the demo writes "
                       "several stores there: choose a new or empty directory")
    os.makedirs(out, exist_ok=True)
    with open(marker, "w") as f:
        f.write("written by pumap-dask demo; the demo may overwrite this directory\n")
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
                               verbose=not args.quiet).fit(os.path.join(out, "train.zarr"))
        logger.info("fit in %.1fs", time.perf_counter() - t0)
        model_dir = model.save(os.path.join(out, "model"))
        emb = transform_to_zarr(os.path.join(out, "test.zarr"), model_dir,
                                os.path.join(out, "test_embedding.zarr"), resume=False)
        test_emb = emb[:]
    finally:
        _close(client)
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


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _add_cluster_args(p):
    p.add_argument("--scheduler", default="local",
                   help="'local' (LocalCluster, default), 'threads', or a scheduler address")
    p.add_argument("--workers", type=_positive_int, default=2,
                   help="LocalCluster workers (default 2)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="threads per worker (default 1)")
    p.add_argument("--connect-timeout", type=_positive_float, default=10.0,
                   help="seconds to wait for a remote scheduler (default 10)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pumap-dask", description="Parametric UMAP at scale")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings")
    ap.add_argument("--debug", action="store_true", help="print tracebacks of errors")
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier pumap-dask output instead of resuming it (never "
                        "anything pumap-dask did not write)")
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
    """Run the command line; returns the exit code (see ``EXIT_*``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import dask
    import distributed  # noqa: F401  (sets up its loggers on import; quiet them after)

    from .io import InputError
    from .model import ModelFileError

    dask.config.set({"logging.distributed": "warning"})
    for noisy in ("distributed", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if hasattr(args, "scheduler"):
            _cluster_args_ok(args)
        args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", args, 130)
    except CLIError as exc:
        return _fail(str(exc), args, exc.code)
    except (InputError, ModelFileError, FileNotFoundError) as exc:
        return _fail(str(exc), args, EXIT_USAGE)
    except Exception as exc:  # a stage failed: say which error, keep the traceback for --debug
        return _fail(f"failed: {type(exc).__name__}: {exc}", args, EXIT_FAILED)
    return EXIT_OK


def _fail(message: str, args, code: int) -> int:
    """Print one line on stderr (and the traceback with --debug); return the exit code."""
    debug = getattr(args, "debug", False)
    if debug:
        import traceback

        traceback.print_exc()
    line = " ".join(str(message).split())
    if code == EXIT_FAILED and not debug:
        line += " (--debug for the traceback)"
    print(f"pumap-dask: error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
