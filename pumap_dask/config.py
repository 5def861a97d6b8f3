"""Job configuration: a TOML (or YAML) file for scheduled jobs, merged with the command line.

A job file has one table per command and one for the cluster::

    log_level = "info"

    [fit]
    input = "cells.zarr"          # the positional INPUT
    model = "model_dir"           # the positional MODEL_DIR
    key = "obsm/X_pca"
    work_dir = "model_dir.work"   # kNN, graph shards and training checkpoints: a rerun resumes
    init_model = "old_model_dir"  # continue training from a saved model (--init-model)
    landmarks = "positions.npy"   # (rows, n_components) positions, NaN rows: none (--landmarks)
    landmark_loss_weight = 1.0
    n_neighbors = 30              # any ParametricUMAP parameter
    min_dist = 0.3

    [transform]
    input = "new_cells.zarr"
    model = "model_dir"
    out = "emb.zarr"              # or obsm = "X_pumap"

    [report]                      # what the pipeline scripts pass to `pumap-dask report`
    data = "sample.zarr"          # --data: rows to embed and score (all of them are embedded)
    labels = "obs/cell_type"      # --labels: an array inside data, or a .npy file

    [cluster]
    scheduler = "local"           # local | threads | slurm | mpi | tcp://host:port
    scheduler_file = "sched.json" # the file `dask scheduler --scheduler-file` writes
    workers = 4
    threads = 1
    memory = "8GiB"

    [slurm]                       # dask-jobqueue's SLURMCluster, with scheduler = "slurm"
    jobs = 4
    cores = 8
    memory = "32GiB"
    walltime = "02:00:00"

Precedence: built-in defaults (with ``init_model``: its saved parameters) < the file <
``--params`` < named flags. Unknown keys and bad
values fail before any work starts, naming the file, the table and the key.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import dask
import numpy
import torch
from dask.utils import parse_bytes

from . import params as checks
from ._version import __version__
from .errors import ConfigError, ParameterError
from .estimator import ParametricUMAP

LOG_LEVELS = ("debug", "info", "warning", "error")
SCHEDULER_KINDS = ("local", "threads", "slurm", "mpi")

# [cluster]: key -> (default, checker(name, value) -> value)
CLUSTER_KEYS: dict[str, tuple[Any, Any]] = {
    "scheduler": ("local", lambda n, v: scheduler_name(n, v)),
    "scheduler_file": (None, lambda n, v: _optional_str(n, v)),
    "workers": (2, checks.positive_int),
    "threads": (1, checks.positive_int),
    "memory": ("auto", lambda n, v: memory_size(n, v)),
    "connect_timeout": (10.0, lambda n, v: checks.real(n, v, low=0, low_open=True)),
}

# [slurm]: passed to dask_jobqueue.SLURMCluster (``jobs`` is how many jobs to start)
SLURM_KEYS: dict[str, Any] = {
    "jobs": checks.positive_int,
    "cores": checks.positive_int,
    "processes": checks.positive_int,
    "memory": lambda n, v: memory_size(n, v),
    "walltime": lambda n, v: _str(n, v),
    "queue": lambda n, v: _str(n, v),
    "account": lambda n, v: _str(n, v),
    "interface": lambda n, v: _str(n, v),
    "local_directory": lambda n, v: _str(n, v),
    "log_directory": lambda n, v: _str(n, v),
    "python": lambda n, v: _str(n, v),
    "job_extra_directives": lambda n, v: _str_list(n, v),
    "job_script_prologue": lambda n, v: _str_list(n, v),
    "worker_extra_args": lambda n, v: _str_list(n, v),
}

# per-command keys beside the estimator's parameters
FIT_KEYS = ("input", "model", "key", "params", "init_model", "landmarks")
TRANSFORM_KEYS: dict[str, Any] = {
    "input": lambda n, v: _str(n, v),
    "model": lambda n, v: _str(n, v),
    "out": lambda n, v: _optional_str(n, v),
    "obsm": lambda n, v: _optional_str(n, v),
    "key": lambda n, v: _optional_str(n, v),
    "device": lambda n, v: checks.device(v, n),
    "nan_policy": lambda n, v: checks.choice(n, v, checks.NAN_POLICIES),
    "overwrite": lambda n, v: _bool(n, v),
}
# [report]: what the pipeline scripts pass to ``pumap-dask report`` (its flags)
REPORT_KEYS: dict[str, Any] = {
    "data": lambda n, v: _str(n, v),
    "key": lambda n, v: _str(n, v),
    "labels": lambda n, v: _str(n, v),
    "out": lambda n, v: _str(n, v),
    "sample": checks.positive_int,
}
TOP_KEYS = ("log_level", "fit", "transform", "report", "cluster", "slurm")


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ParameterError(f"{name} must be a non-empty string, got {v!r}")
    return v


def _optional_str(name: str, v: Any) -> str | None:
    return None if v is None else _str(name, v)


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ParameterError(f"{name} must be true or false, got {v!r}")
    return v


def _str_list(name: str, v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ParameterError(f"{name} must be a list of strings, got {v!r}")
    return v


def memory_size(name: str, v: Any) -> str | int:
    """'auto', a byte count, or a size such as '8GiB' (as dask parses it)."""
    if v == "auto":
        return v

    try:
        if isinstance(v, bool):
            raise ValueError
        n = parse_bytes(v) if isinstance(v, str) else int(v)
    except (ValueError, TypeError):
        raise ParameterError(f"{name} must be 'auto' or a size such as '8GiB', got {v!r}") from None
    if n <= 0:
        raise ParameterError(f"{name} must be a positive size such as '8GiB', got {v!r}")
    return v


def scheduler_name(name: str, v: Any) -> str:
    """``local``, ``threads``, ``slurm``, ``mpi`` or a scheduler address."""
    if isinstance(v, str) and (v in SCHEDULER_KINDS or "://" in v or ":" in v):
        return v
    raise ParameterError(f"{name} must be one of {SCHEDULER_KINDS} or a scheduler address such as "
                         f"tcp://host:8786, got {v!r}")


def read_file(path: str) -> dict[str, Any]:
    """Parse a job file: TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: YAML job files need PyYAML (pip install pyyaml), "
                                  "or write the job file in TOML") from None
            with open(path) as f:
                doc = yaml.safe_load(f) or {}
        elif ext == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        else:
            raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"{path} is not valid {ext[1:].upper()}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold tables such as [fit] and [cluster], got "
                          f"{type(doc).__name__}")
    check_file(doc, path)
    return doc


def estimator_params() -> dict[str, Any]:
    """The estimator's parameter names and defaults."""

    return ParametricUMAP().get_params()


def table_keys() -> dict[str, set[str]]:
    """The keys each table of a job file takes."""

    return {"fit": set(FIT_KEYS) | set(estimator_params()),
            "transform": set(TRANSFORM_KEYS), "report": set(REPORT_KEYS),
            "cluster": set(CLUSTER_KEYS), "slurm": set(SLURM_KEYS)}


def _belongs(keys: list[str], allowed: dict[str, set[str]], here: str | None = None) -> str:
    """'; n_neighbors belongs in the [fit] table' for keys that another table takes."""
    hints = []
    for key in keys:
        tables = [f"[{t}]" for t, names in allowed.items() if key in names and t != here]
        if tables:
            either = " or ".join(filter(None, (", ".join(tables[:-1]), tables[-1])))
            hints.append(f"{key} belongs in the {either} table")
    return "; " + "; ".join(hints) if hints else ""


def check_file(doc: dict[str, Any], path: str) -> None:
    """Refuse unknown tables and keys and values of the wrong kind, naming each."""
    allowed = table_keys()
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} at the top level"
                          f"{_belongs(unknown, allowed)}; allowed at the top level: "
                          f"{list(TOP_KEYS)}")
    if "log_level" in doc:
        _check(path, "", "log_level", lambda n, v: checks.choice(n, v, LOG_LEVELS),
               doc["log_level"])
    for table, keys in allowed.items():
        block = doc.get(table, {})
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: [{table}] must be a table of key = value, got "
                              f"{block!r}")
        bad = sorted(set(block) - keys)
        if bad:
            raise ConfigError(f"{path}: unknown key(s) {bad} in [{table}]"
                              f"{_belongs(bad, allowed, table)}; allowed: {sorted(keys)}")
    for k, v in doc.get("cluster", {}).items():
        _check(path, "cluster", k, CLUSTER_KEYS[k][1], v)
    for k, v in doc.get("slurm", {}).items():
        _check(path, "slurm", k, SLURM_KEYS[k], v)
    for k, v in doc.get("transform", {}).items():
        _check(path, "transform", k, TRANSFORM_KEYS[k], v)
    for k, v in doc.get("report", {}).items():
        _check(path, "report", k, REPORT_KEYS[k], v)
    fit = doc.get("fit", {})
    for k in ("input", "model", "key", "init_model", "landmarks"):
        if k in fit:
            _check(path, "fit", k, _str, fit[k])
    if "params" in fit:
        raise ConfigError(f"{path}: put estimator parameters directly in [fit] "
                          "(e.g. n_neighbors = 30), not under params")
    est = {k: v for k, v in fit.items() if k not in FIT_KEYS}
    if "hidden_layers" in est and isinstance(est["hidden_layers"], list):
        est["hidden_layers"] = tuple(est["hidden_layers"])
    if est:
        check_estimator(est, where=f"{path} [fit]")


def job_value(doc: dict[str, Any], name: str, path: str) -> Any:
    """The value of ``name`` (``log_level`` or ``TABLE.KEY``, e.g. ``fit.model``) in a job
    file read by :func:`read_file`.

    Parameters
    ----------
    doc
        The parsed job file.
    name
        A top-level key or ``TABLE.KEY``.
    path
        The job file, for the message.

    Returns
    -------
    Any
        The value, or None when the file does not set it.

    Raises
    ------
    ConfigError
        When ``name`` is not a key a job file takes (a typo in a script), naming the keys of
        that table.
    """
    allowed = table_keys()
    table, _, key = name.rpartition(".")
    if not table:
        if name in allowed:
            raise ConfigError(f"{name} is a table of {path}; name one of its keys as "
                              f"{name}.KEY: {sorted(allowed[name])}")
        if name not in TOP_KEYS:
            raise ConfigError(f"{name} is not a key of a job file; name TABLE.KEY (e.g. "
                              f"fit.model) or one of the top-level keys ['log_level']"
                              f"{_belongs([name], allowed)}")
        return doc.get(name)
    if table not in allowed:
        raise ConfigError(f"{name}: [{table}] is not a table of a job file; the tables are "
                          f"{sorted(allowed)}")
    if key not in allowed[table]:
        raise ConfigError(f"{name}: [{table}] takes no key {key!r}"
                          f"{_belongs([key], allowed, table)}; it takes "
                          f"{sorted(allowed[table])}")
    return doc.get(table, {}).get(key)


def _check(path: str, table: str, key: str, checker: Any, value: Any) -> Any:
    where = f"[{table}] " if table else ""
    try:
        return checker(key, value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {where}{exc}") from None


def check_estimator(params: dict[str, Any], where: str) -> None:
    """Validate estimator parameters as the estimator does, naming where they came from."""

    try:
        ParametricUMAP(**params)._check_params()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def cluster_settings(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults < the file's [cluster] < the flags given (``None`` means not given)."""
    out = {k: default for k, (default, _) in CLUSTER_KEYS.items()}
    out.update(doc.get("cluster", {}))
    out.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in out.items():
        if v is not None:
            _check("the command line", "cluster", k, CLUSTER_KEYS[k][1], v)
    out["slurm"] = dict(doc.get("slurm", {}))
    return out


def run_record(command: str, resolved: dict[str, Any], config_path: str | None,
               argv: list[str]) -> dict[str, Any]:
    """The resolved job, as written beside the results (``run_config.json``)."""

    return {
        "command": command,
        "config_file": os.path.abspath(config_path) if config_path else None,
        "argv": list(argv),
        "resolved": resolved,
        "host": platform.node(),
        # written right after the model is saved: the save time (the fit records its own
        # start and end in the model, pumap_dask.state)
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"pumap_dask": __version__, "python": platform.python_version(),
                     "numpy": numpy.__version__, "dask": dask.__version__,
                     "torch": torch.__version__},
    }
