"""Command line for batch jobs: ``pumap-dask fit | transform | info | report | export |
demo | check-job | job-get``.

Every command checks its input, parameters, paths and job file before any cluster starts,
prints one line on stderr when it fails and exits with a code a scheduler can act on
(``EXIT_*``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from typing import Any

import dask
import distributed  # noqa: F401 (sets up its loggers on import; quiet them after)
import numpy as np
import zarr
from sklearn.neighbors import KNeighborsClassifier

from .config import (
    FIT_KEYS,
    cluster_settings,
    job_value,
    memory_size,
    read_file,
    run_record,
    scheduler_name,
)
from .continued import check_architecture
from .datasets import clusters
from .distributed.cluster import (
    check_shared_directory,
    close,
    connect,
    describe,
    workers_lost_error,
)
from .errors import (
    EXIT_CLUSTER,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ClusterError,
    ConfigError,
    InputError,
    ModelFileError,
    exit_code,
)
from .estimator import ParametricUMAP, load
from .export import check_export_path
from .inputs import check_sizes, open_input
from .io import as_dask, check_n_features, path_within, to_jsonable, write_json_atomic
from .model import check_model_path, load_encoder, read_config
from .networks import factories_by_name
from .params import device, landmark_positions
from .plotting import plot_train_test
from .report import check_query, check_report_dir, format_info, model_summary, write_report
from .report_metrics import load_labels
from .transform import model_source
from .workdir import claim_work_dir, is_work_dir
from .writers import (
    OutputLock,
    check_output_path,
    check_store_uns,
    transform_to_zarr,
    uns_name,
    write_anndata_obsm,
)

logger = logging.getLogger("pumap_dask.cli")


# estimator parameter -> the flag that sets it, so messages name what the user typed
FLAGS = {"n_components": "--n-components", "n_neighbors": "--n-neighbors",
         "min_dist": "--min-dist", "random_state": "--random-state", "device": "--device",
         "landmark_loss_weight": "--landmark-loss-weight", "fit_rows": "--fit-rows"}
# saved parameters of an --init-model that do not become this fit's defaults
NOT_INHERITED = ("work_dir", "verbose", "callbacks")


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
    """A distributed client for the resolved cluster settings, or None (threads)."""

    try:
        return connect(args.cluster, debug=getattr(args, "debug", False))
    except ClusterError as exc:
        raise CLIError(str(exc), EXIT_CLUSTER) from exc


def _close(client) -> None:
    close(client)


CLUSTER_FLAGS = {"scheduler": "--scheduler", "scheduler_file": "--scheduler-file",
                 "workers": "--workers", "threads": "--threads", "memory": "--memory",
                 "connect_timeout": "--connect-timeout"}


def _resolve_cluster(args, doc: dict) -> None:
    """``args.cluster``: defaults < the job file's [cluster] < the flags given."""

    given = {k: getattr(args, k, None) for k in CLUSTER_FLAGS}
    try:
        args.cluster = cluster_settings(doc, given)
    except ConfigError as exc:
        msg = str(exc)
        for key, flag in CLUSTER_FLAGS.items():
            msg = msg.replace(f"[cluster] {key} ", f"{flag} ({key}) ")
        raise CLIError(msg) from None


def _read_config(args) -> dict:
    if not getattr(args, "config", None):
        return {}
    if getattr(args, "job_doc", None) is not None:  # already read for the log level
        return args.job_doc
    try:
        return read_file(args.config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


def _fit_params(args, table: dict | None = None) -> dict:
    """Estimator parameters: the job file's [fit] < --params < named flags."""

    params = {k: v for k, v in (table or {}).items() if k not in FIT_KEYS}
    if isinstance(params.get("hidden_layers"), list):
        params["hidden_layers"] = tuple(params["hidden_layers"])
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
    for name in (*FLAGS, "work_dir"):
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    params["verbose"] = logging.getLogger("pumap_dask").isEnabledFor(logging.INFO)
    return params


def _init_model_defaults(path: str | None) -> dict:
    """The saved parameters of ``--init-model`` (the fit's defaults, below the job file),
    after checking that it is a readable saved model; {} without one."""
    if path is None:
        return {}

    if not os.path.isdir(path):
        raise CLIError(f"--init-model {path}: no saved model there; pass the MODEL_DIR of an "
                       "earlier `pumap-dask fit`")
    try:
        doc = read_config(path)
    except ModelFileError as exc:
        raise CLIError(f"--init-model {path}: {exc}") from None
    valid = ParametricUMAP().get_params()
    return {k: v for k, v in doc["params"].items() if k in valid and k not in NOT_INHERITED}


def _check_init_model(path: str, n_features: int, params: dict,
                      networks: dict | None = None) -> None:
    """The saved encoder of ``--init-model`` must fit the input and parameters."""

    try:
        encoder, _ = load_encoder(path, networks=networks)
        check_architecture(encoder, n_features, params)
    except (ModelFileError, ValueError) as exc:
        raise CLIError(f"--init-model {path}: {exc}") from None


def _read_landmarks(path: str, n_rows: int, n_components: int):
    """The ``--landmarks`` positions: a .npy (n_rows, n_components) array, NaN rows for
    points without a landmark."""

    want = f"a .npy file of ({n_rows}, {n_components}) positions (NaN rows for points " \
           "without a landmark)"
    if not os.path.isfile(path):
        raise CLIError(f"--landmarks {path}: no such file; pass {want}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CLIError(f"--landmarks {path} is not a readable .npy array ({exc}); pass "
                       f"{want}") from None
    try:
        landmark_positions(arr, n_rows, n_components, name=f"--landmarks {path}")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return arr


def _check_model_out(path: str, input_path: str) -> None:
    """The model directory must be writable and must not replace anything but a model."""

    if os.path.realpath(path) == os.path.realpath(input_path):
        raise CLIError(f"the model directory {path} is the input; choose another MODEL_DIR")
    try:
        check_model_path(path)
    except (OSError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _check_work_dir_apart(work_dir: str | None, model: str) -> None:
    """An explicit work directory must lie outside MODEL_DIR (and MODEL_DIR outside it): the
    save replaces the model directory, and the fit fills the work directory."""
    if work_dir and (path_within(work_dir, model) or path_within(model, work_dir)):
        raise CLIError(f"--work-dir {work_dir} overlaps the model directory {model}: the save "
                       "replaces MODEL_DIR; pass a --work-dir outside it (or leave --work-dir "
                       "out: MODEL_DIR.work)")


def _positionals(args, table: dict, names: tuple[str, ...]) -> None:
    """Fill positional arguments (and --key) left out from the job file's table."""
    for name in names:
        if getattr(args, name, None) is None:
            setattr(args, name, table.get(name))
        if getattr(args, name) is None:
            where = f" or {name} = ... in [{args.command}] of {args.config}" if args.config \
                else f" (or {name} = ... in the [{args.command}] table of a --config file)"
            raise CLIError(f"{args.command} needs {name.upper()}{where}")
    if getattr(args, "key", None) is None:
        args.key = table.get("key")


def _work_dir(args, params: dict) -> tuple[str, bool]:
    """The fit's work directory (kNN, graph shards, training checkpoints) and whether this
    command makes it (then it is removed after success unless --keep-work); checked, not
    yet made (see ``_claim_work_dir``).

    Given (flag or job file): used as is and never removed. Otherwise ``MODEL_DIR.work``, so
    a killed job rerun with the same command resumes the finished stages.
    """
    given = params.get("work_dir")
    path = os.path.abspath(given or args.model.rstrip("/\\") + ".work")
    if os.path.lexists(path) and not is_work_dir(path):
        if not given:
            raise CLIError(f"{path} exists and is not a pumap-dask work directory; pass "
                           "--work-dir PATH (on a file system every worker sees)")
        if not os.path.isdir(path) or os.listdir(path):
            raise CLIError(f"--work-dir {given} exists and holds files pumap-dask did not "
                           "write (they are never overwritten or deleted): pass a new or "
                           "empty directory")
    return (given, False) if given else (path, True)


def _claim_work_dir(path: str, owned: bool, params: dict) -> None:
    """Make the default work directory (a given one is claimed by the fit itself)."""
    if owned:
        claim_work_dir(path, "pumap-dask fit work directory; removed after a successful fit\n")
        params["work_dir"] = path


def _dry_run(args, resolved: dict) -> None:
    if getattr(args, "check_only", False):  # check-job: checked; print and describe nothing
        return
    print(json.dumps(resolved, indent=2, default=str))
    try:
        print(describe(args.cluster))
    except ClusterError as exc:
        raise CLIError(str(exc), EXIT_CLUSTER) from None


def _write_run_record(model_dir: str, args, resolved: dict) -> None:
    doc = run_record(args.command, to_jsonable(resolved), args.config, sys.argv[1:])
    write_json_atomic(os.path.join(model_dir, "run_config.json"), doc)


def cmd_fit(args) -> None:
    doc = _read_config(args)
    table = dict(doc.get("fit", {}))
    _positionals(args, table, ("input", "model"))
    for name in ("init_model", "landmarks"):  # flag > the job file's [fit]
        if getattr(args, name) is None:
            setattr(args, name, table.get(name))
    _resolve_cluster(args, doc)
    params = _fit_params(args, {**_init_model_defaults(args.init_model), **table})
    model = ParametricUMAP(**params)
    try:
        model._check_params()
    except (ValueError, TypeError) as exc:
        raise CLIError(_name_flags(str(exc))) from None
    handle = open_input(args.input, args.key)  # opened and checked before any cluster starts
    try:
        check_sizes(handle, model.n_neighbors)
    except InputError as exc:
        raise CLIError(f"{exc} (flag --n-neighbors)") from None
    darr = handle.darr
    args.n_features = darr.shape[1]  # check-job compares the [transform] input with it
    init_model = None
    if args.init_model:
        nets = _allowed_networks(args)
        _check_init_model(args.init_model, darr.shape[1], model.get_params(), nets)
        init_model = load(args.init_model, networks=nets) if nets else args.init_model
    positions = None
    if args.landmarks:
        positions = _read_landmarks(args.landmarks, darr.shape[0], model.n_components)
    _check_model_out(args.model, args.input)
    _check_work_dir_apart(params.get("work_dir"), args.model)
    work_dir, owned = _work_dir(args, params)  # owned by us or new: checked before any work
    resolved = {"input": args.input, "model": args.model, "key": args.key,
                "init_model": args.init_model, "landmarks": args.landmarks,
                "params": {k: v for k, v in model.get_params().items()
                           if k not in ("verbose", "callbacks")},
                "cluster": args.cluster}
    if args.dry_run:
        _dry_run(args, resolved)
        return
    with OutputLock(args.model):  # one fit per model directory: a second fails at once
        client = _client(args)
        try:
            _claim_work_dir(work_dir, owned, params)
            model.set_params(work_dir=work_dir)
            resolved["params"]["work_dir"] = work_dir
            logger.info("work directory %s (a rerun of this command resumes from it)",
                        work_dir)
            try:
                check_shared_directory(client, work_dir)
            except ClusterError as exc:
                raise CLIError(str(exc), EXIT_CLUSTER) from None
            model.fit(args.input, key=args.key, init_model=init_model,
                      landmark_positions=positions)
        finally:
            _close(client)
        model.save(args.model)
        _write_run_record(args.model, args, resolved)
        if owned and not args.keep_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(model)
    logger.info("model saved to %s", args.model)


def cmd_transform(args) -> None:
    doc = _read_config(args)
    table = dict(doc.get("transform", {}))
    _positionals(args, table, ("input", "model"))
    for name in ("out", "obsm", "device", "nan_policy"):
        if getattr(args, name) is None:
            setattr(args, name, table.get(name))
    args.device = args.device or "auto"
    args.nan_policy = args.nan_policy or "raise"
    args.overwrite = args.overwrite or bool(table.get("overwrite", False))
    _resolve_cluster(args, doc)
    if bool(args.obsm) == bool(args.out):
        raise CLIError("transform needs exactly one of --out PATH.zarr (a new Zarr array) or "
                       "--obsm NAME (into the input AnnData store)")
    try:
        device(args.device, "--device")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    n_features = getattr(args, "model_features", None)  # check-job: the job's fit makes it
    if n_features is None:
        model = _saved_model(args, args.model)
        n_features = model_source(model).n_features  # checks the model before any work
    darr = as_dask(args.input, key=args.key)
    check_n_features(darr.shape[1], n_features)
    if args.out:
        check_output_path(args.out, args.input, resume=not args.overwrite)
    else:  # its uns record (uns[NAME without 'X_']) must be ours too, before any cluster
        check_store_uns(os.path.abspath(args.input), uns_name(args.obsm))
    if args.dry_run:
        _dry_run(args, {"input": args.input, "model": args.model, "key": args.key,
                        "out": args.out, "obsm": args.obsm, "device": args.device,
                        "nan_policy": args.nan_policy, "overwrite": args.overwrite,
                        "cluster": args.cluster})
        return
    client = _client(args)
    try:
        if args.obsm:
            write_anndata_obsm(args.input, model, key=args.key, obsm_key=args.obsm,
                               resume=not args.overwrite, device=args.device,
                               nan_policy=args.nan_policy)
            logger.info("wrote obsm/%s and uns/%s into %s", args.obsm, uns_name(args.obsm),
                        args.input)
        else:
            transform_to_zarr(args.input, model, args.out, key=args.key,
                              resume=not args.overwrite, device=args.device,
                              nan_policy=args.nan_policy)
            logger.info("embedding written to %s", args.out)
    except InputError as exc:  # the library names its keyword; say the flag
        raise CLIError(str(exc).replace("pass nan_policy='nan'", "pass --nan-policy nan")
                       ) from None
    finally:
        _close(client)


def cmd_info(args) -> None:
    print(format_info(model_summary(args.model)))


def cmd_export(args) -> None:
    try:
        check_export_path(args.out, overwrite=args.overwrite)  # owned: before any work
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    model = _saved_model(args, args.model)
    model = load(model) if isinstance(model, str) else model
    try:
        path = model.export_onnx(args.out)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {path}")


def _check_report(out: str, data: str | None, key: str | None, labels: str | None):
    """The report's checks before any work; returns the --data array (lazy) or None."""
    check_report_dir(out)  # a file, or a report we did not write: refused
    labels_file = bool(labels) and os.path.isfile(labels)
    if labels and not data and not labels_file and not labels.endswith(".npy"):
        raise CLIError("--labels KEY names an array inside --data; pass --data INPUT too "
                       "(or --labels FILE.npy)")
    darr = as_dask(data, key=key) if data else None
    if labels:  # missing, unreadable or not one per row: fails now, not after the work
        load_labels(labels, data, None if darr is None else darr.shape[0])
    return darr


def cmd_report(args) -> None:
    _check_report(args.out or args.model, args.data, args.key, args.labels)
    query_key = args.query_key or args.key
    if args.query_labels and not args.query:
        raise CLIError("--query-labels names the labels of --query rows; pass --query DATA "
                       "too")
    if args.query:  # readable, labels found: fails now, not after the reference's work
        check_query(args.query, query_key)
        if args.query_labels:
            load_labels(args.query_labels, args.query, None)
    doc = write_report(args.model, args.out, data=args.data, key=args.key,
                       labels=args.labels, query=args.query, query_key=query_key,
                       query_labels=args.query_labels, n_sample=args.sample)
    out = args.out or args.model
    print(f"wrote {os.path.join(out, 'report.html')} and {os.path.join(out, 'report.json')}")
    logger.debug("report: %s", sorted(doc))


def _job_args(command: str, args, doc: dict) -> argparse.Namespace:
    """``command``'s arguments from the job file ``doc`` alone (as the pipeline scripts run
    it), checked only: its dry run neither prints nor describes the cluster."""
    sub = build_parser().parse_args([command, "--config", args.config, "--dry-run"])
    sub.check_only, sub.job_doc = True, doc
    sub.allow_network, sub.debug = getattr(args, "allow_network", None), args.debug
    return sub


def _same_path(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and \
        os.path.realpath(a) == os.path.realpath(b)


def cmd_check_job(args) -> None:
    """Check a whole job file as ``fit``, ``transform`` and the pipelines' ``report`` would
    (keys, values, inputs, output ownership), starting no cluster and writing nothing."""
    doc = _read_config(args)
    fit, transform, report = (doc.get(t) for t in ("fit", "transform", "report"))
    if fit is None and transform is None:
        raise CLIError(f"{args.config} has neither a [fit] nor a [transform] table: nothing "
                       "to run")
    done, n_features = [], None
    if fit is not None:
        fargs = _job_args("fit", args, doc)
        cmd_fit(fargs)
        n_features = fargs.n_features
        done.append(f"fit {fargs.input} -> {fargs.model}")
    if transform is not None:
        targs = _job_args("transform", args, doc)
        if fit is not None and _same_path(transform.get("model"), fit.get("model")):
            targs.model_features = n_features  # made by this job's fit
        cmd_transform(targs)
        done.append(f"transform {targs.input} -> "
                    f"{targs.out or f'{targs.input} obsm/{targs.obsm}'}")
    if report is not None:
        model = (fit or {}).get("model") or (transform or {}).get("model")
        data = _check_report(report.get("out") or model, report.get("data"),
                             report.get("key"), report.get("labels"))
        if data is not None and n_features is not None:
            check_n_features(data.shape[1], n_features)
        done.append(f"report of {model}" + (f" on {report['data']}" if data is not None else ""))
    print(f"{args.config}: ok ({'; '.join(done)})")


def cmd_job_get(args) -> None:
    """Print the values of job-file keys, one a line (strings as they are, others as JSON),
    for scripts: ``model=$(pumap-dask job-get job.toml fit.model)``."""
    doc = _read_config(args)
    for name in args.keys:
        value = job_value(doc, name, args.config)
        if value is None and args.default is None:
            table, _, key = name.rpartition(".")
            where = f"in the [{table}] table" if table else "at the top level"
            raise CLIError(f"{args.config} does not set {name}: add {key} = ... {where}, or "
                           "pass --default VALUE")
        value = args.default if value is None else value
        print(value if isinstance(value, str) else json.dumps(value))


def cmd_demo(args) -> None:
    """The main job end to end on synthetic data and a local Dask cluster."""

    out = os.path.abspath(args.out)
    marker = os.path.join(out, DEMO_MARKER)
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)
                               and not os.path.exists(marker)):
        raise CLIError(f"--out {out} exists and is not an earlier demo output; the demo writes "
                       "several stores there: choose a new or empty directory")
    os.makedirs(out, exist_ok=True)
    with open(marker, "w") as f:
        f.write("written by pumap-dask demo; the demo may overwrite this directory\n")
    _resolve_cluster(args, {})
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
                               verbose=_verbose()).fit(os.path.join(out, "train.zarr"))
        logger.info("fit in %.1fs", time.perf_counter() - t0)
        model_dir = model.save(os.path.join(out, "model"))
        emb = transform_to_zarr(os.path.join(out, "test.zarr"), model_dir,
                                os.path.join(out, "test_embedding.zarr"), resume=False)
        test_emb = emb[:]
    finally:
        _close(client)
    print(model)

    acc = KNeighborsClassifier(15).fit(model.embedding_, labels[tr]).score(test_emb, labels[te])
    print(f"held-out 15-NN accuracy: {acc:.3f}")
    try:
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


def _verbose() -> bool:
    return logging.getLogger("pumap_dask").isEnabledFor(logging.INFO)


def _scheduler(text: str) -> str:
    try:
        return scheduler_name("--scheduler", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory(text: str) -> str:
    try:
        return memory_size("--memory", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_cluster_args(p, *, config: bool = True) -> None:
    g = p.add_argument_group("cluster (flags override the job file's [cluster] table)")
    g.add_argument("--scheduler", type=_scheduler, default=None,
                   help="'local' (LocalCluster, default), 'threads', 'slurm' (dask-jobqueue, "
                        "[slurm] table of --config), 'mpi' (dask-mpi) or a scheduler address")
    g.add_argument("--scheduler-file", default=None,
                   help="connect to the scheduler that `dask scheduler --scheduler-file "
                        "FILE` started (waits up to --connect-timeout for the file)")
    g.add_argument("--workers", type=_positive_int, default=None,
                   help="LocalCluster workers (default 2)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="threads per worker (default 1)")
    g.add_argument("--memory", type=_memory, default=None,
                   help="memory limit per LocalCluster worker, e.g. 8GiB (default auto)")
    g.add_argument("--connect-timeout", type=_positive_float, default=None,
                   help="seconds to wait for a remote scheduler (default 10)")
    if config:
        p.add_argument("--config", default=None,
                       help="job file (TOML, or YAML with PyYAML): [fit]/[transform], "
                            "[cluster], [slurm] tables; flags override it")
        p.add_argument("--dry-run", action="store_true",
                       help="check everything, print the resolved job (and the SLURM job "
                            "script) and exit without running")


def _add_global_args(p: argparse.ArgumentParser, default) -> None:
    """-q, --log-level, --debug; ``default`` SUPPRESS on the commands, so the value given
    before the command is kept when the command's parser does not see the flag."""
    unset = {} if default is None else {"default": default}
    p.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings (--log-level warning)", **unset)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="log level (default info; the job file's log_level)",
                   **({"default": None} if default is None else unset))
    p.add_argument("--debug", action="store_true", help="print tracebacks of errors", **unset)
    p.add_argument("--allow-network", action="append", metavar="PKG.MOD:FACTORY",
                   help="import and allow this custom network factory for the saved models "
                        "the command loads (a model file never runs code by itself); "
                        "repeatable",
                   **({"default": []} if default is None else unset))


def _allowed_networks(args) -> dict:
    """The custom network factories ``--allow-network`` names, imported (the user's
    consent: a model file never makes the command import anything)."""
    try:
        return factories_by_name(getattr(args, "allow_network", None) or [])
    except ImportError as exc:
        raise CLIError(f"--allow-network: {exc}") from None


def _saved_model(args, path: str) -> Any:
    """A saved model for the command: its path, or, with ``--allow-network``, the model
    loaded with those factories."""
    nets = _allowed_networks(args)
    return load(path, networks=nets) if nets else path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pumap-dask", description="Parametric UMAP at scale",
        epilog="exit codes: 0 success, 1 a stage failed, 2 bad input/config/model, "
               "3 cluster not reachable, 130 interrupted")
    _add_global_args(ap, None)
    sub = ap.add_subparsers(dest="command", required=True)
    # the global options are accepted after the command too (pumap-dask fit ... -q)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_args(common, argparse.SUPPRESS)
    real_add = sub.add_parser
    sub.add_parser = lambda *a, **k: real_add(*a, parents=[common], **k)

    p = sub.add_parser("fit", help="fit a model on a Zarr array / AnnData store")
    p.add_argument("input", nargs="?", help="Zarr array path or AnnData .zarr store")
    p.add_argument("model", nargs="?", help="output model directory")
    p.add_argument("--key", default=None, help="array inside the store (default obsm/X_pca)")
    p.add_argument("--n-components", type=int, default=None)
    p.add_argument("--n-neighbors", type=int, default=None)
    p.add_argument("--min-dist", type=float, default=None)
    p.add_argument("--random-state", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--fit-rows", type=_positive_int, default=None, metavar="N",
                   help="fit a uniform sample of N rows (kNN, graph, training), then embed "
                        "every row with the encoder (default: fit all rows)")
    p.add_argument("--params", help="more ParametricUMAP parameters as JSON")
    p.add_argument("--work-dir", default=None,
                   help="kNN, graph shards and training checkpoints, on a file system every "
                        "worker sees; a rerun resumes from it (default MODEL_DIR.work, "
                        "removed after success)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the default work directory after success")
    p.add_argument("--init-model", default=None, metavar="MODEL_DIR",
                   help="continue training from this saved model (its weights, and its "
                        "saved parameters as this fit's defaults)")
    p.add_argument("--landmarks", default=None, metavar="PATH",
                   help=".npy file of (rows, n_components) positions that pin rows of the "
                        "input (NaN rows: no landmark)")
    p.add_argument("--landmark-loss-weight", type=float, default=None, metavar="W",
                   help="weight of the landmark loss (default 1.0)")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("transform", help="embed a Zarr array / AnnData store lazily")
    p.add_argument("input", nargs="?")
    p.add_argument("model", nargs="?", help="saved model directory")
    p.add_argument("--out", help="output Zarr array path")
    p.add_argument("--obsm", help="write into this obsm key of the AnnData store instead")
    p.add_argument("--key", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--nan-policy", choices=("raise", "nan"), default=None,
                   help="rows with NaN or infinite values: 'raise' (default) fails naming "
                        "them, 'nan' gives them NaN embeddings")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier pumap-dask output instead of resuming it (never "
                        "anything pumap-dask did not write)")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("info", help="summary, parameters, versions and timings of a model")
    p.add_argument("model", help="saved model directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("report", help="report.json + a self-contained report.html")
    p.add_argument("model", help="saved model directory")
    p.add_argument("--data", help="input to embed and score (Zarr array / AnnData store)")
    p.add_argument("--key", default=None, help="array inside --data (default obsm/X_pca)")
    p.add_argument("--labels", help="labels: an array inside --data (e.g. obs/cell_type) "
                   "or a .npy file")
    p.add_argument("--query", metavar="DATA",
                   help="new rows shown in their own panel over the reference: input rows "
                        "(Zarr array / AnnData store, embedded by the model) or the Zarr "
                        "array `pumap-dask transform --out` wrote with this model")
    p.add_argument("--query-key", default=None,
                   help="array inside --query (default: --key)")
    p.add_argument("--query-labels", metavar="LABELS",
                   help="labels of the query rows: an array inside --query or a .npy file")
    p.add_argument("--out", help="directory for the report (default MODEL_DIR)")
    p.add_argument("--sample", type=_positive_int, default=5000,
                   help="rows sampled for trustworthiness and kNN preservation (default 5000)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="the frozen encoder as ONNX (linear output)")
    p.add_argument("model", help="saved model directory")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier pumap-dask export (never another file)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check-job", help="check a whole job file (keys, values, inputs, "
                       "output ownership) and start nothing: run it before the cluster")
    p.add_argument("config", metavar="JOB", help="job file (TOML, or YAML with PyYAML)")
    p.set_defaults(func=cmd_check_job)

    p = sub.add_parser("job-get", help="print values of a job file, one a line (for scripts)")
    p.add_argument("config", metavar="JOB", help="job file (TOML, or YAML with PyYAML)")
    p.add_argument("keys", nargs="+", metavar="NAME",
                   help="TABLE.KEY (e.g. fit.model, report.labels) or log_level")
    p.add_argument("--default", default=None, metavar="VALUE",
                   help="printed for a key the file does not set (default: fail, exit 2)")
    p.set_defaults(func=cmd_job_get)

    p = sub.add_parser("demo", help="the seed vignette on a local Dask cluster")
    p.add_argument("--out", default="pumap_demo")
    p.add_argument("--n-samples", type=int, default=1500)
    p.add_argument("--random-state", type=int, default=42)
    _add_cluster_args(p, config=False)
    p.set_defaults(func=cmd_demo)
    return ap


def _log_level(args) -> int:
    """--log-level, else -q, else the job file's log_level, else INFO."""
    name = args.log_level
    if name is None and args.quiet:
        name = "warning"
    if name is None and getattr(args, "config", None):
        try:
            args.job_doc = read_file(args.config)
            name = args.job_doc.get("log_level")
        except Exception:  # reported by the command itself
            name = None
    return getattr(logging, (name or "info").upper())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see ``EXIT_*``)."""
    args = build_parser().parse_args(argv)
    level = _log_level(args)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pumap_dask").setLevel(level)
    dask.config.set({"logging.distributed": "warning"})
    for noisy in ("distributed", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        args.func(args)
    except CLIError as exc:
        return _fail(str(exc), args, exc.code)
    except (Exception, KeyboardInterrupt) as exc:  # the code from pumap_dask.errors' one table
        lost = workers_lost_error(exc, getattr(args, "cluster", None))
        if lost is not None:  # workers killed again and again (out of memory): the cluster
            return _fail(str(lost), args, EXIT_CLUSTER)
        code = exit_code(exc)
        if code == EXIT_INTERRUPTED:
            return _fail("interrupted", args, code)
        if code == EXIT_FAILED:  # a stage failed: say which error (traceback with --debug)
            return _fail(f"failed: {type(exc).__name__}: {exc}", args, code)
        return _fail(str(exc), args, code)
    return EXIT_OK


def _fail(message: str, args, code: int) -> int:
    """Print one line on stderr (and the traceback with --debug); return the exit code."""
    debug = getattr(args, "debug", False)
    if debug:
        traceback.print_exc()
    line = " ".join(str(message).split())
    if code == EXIT_FAILED and not debug:
        line += " (--debug for the traceback)"
    print(f"pumap-dask: error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
