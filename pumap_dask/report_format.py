"""Formatting shared by the text (``info``) and HTML reports.
"""

from __future__ import annotations

from typing import Any

RUN_CONFIG = "run_config.json"


NOT_RECORDED = "not recorded"


STAGE_ORDER = ("input", "knn", "graph", "load", "init", "train", "embed")


def ordered_stages(d: dict[str, Any]) -> dict[str, Any]:
    known = [s for s in STAGE_ORDER if s in d]
    return {s: d[s] for s in known + sorted(set(d) - set(known))}


def format_bytes(n: Any) -> str:
    """``1536`` -> ``"1.5 KiB"``; non-numbers are shown as they are."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # unreachable


def fmt_num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def recall_text(fitted: dict[str, Any]) -> str:
    recall = fitted.get("knn_recall")
    if recall is not None:
        return f"{recall:.4f}"
    return "1 (exact kNN)" if fitted.get("knn_method") == "exact" else "not measured"


def samples_text(summary: dict[str, Any]) -> str:
    """The rows embedded, and the sample fitted when ``fit_rows`` sampled them."""
    n, m = summary["n_samples_fit"], (summary.get("params") or {}).get("fit_rows")
    text = fmt_num(n)
    if m is not None and n is not None and m < n:
        text += f" (kNN, graph and training on a sample of {fmt_num(m)})"
    return text


def stage_table(summary: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Header and rows (stage, wall time, peak memory[, largest worker's peak]) of every
    stage any record names, plus a total row; no rows when nothing was recorded."""
    timings, peak = summary["timings"], summary["peak_memory"]
    worker = summary.get("worker_peak_memory")
    records = [r for r in (peak, worker) if r]
    stages = list(ordered_stages({**{k: 0 for r in records for k in r}, **timings}))

    def mem(record: dict[str, Any] | None, stage: str) -> str:
        if record is None:
            return NOT_RECORDED
        return format_bytes(record[stage]) if stage in record else "-"

    def top(record: dict[str, Any] | None) -> str:
        return f"{format_bytes(max(record.values()))} (max)" if record else NOT_RECORDED

    head = ("stage", "wall time", "peak memory (this process)")
    rows = [(s, f"{timings[s]:.3f} s" if s in timings else "-", mem(peak, s))
            for s in stages]
    total = ("total", f"{sum(timings.values()):.3f} s" if timings else "-", top(peak))
    if worker:
        head += ("peak memory (largest worker)",)
        rows = [r + (mem(worker, r[0]),) for r in rows]
        total += (top(worker),)
    return head, rows + [total] if rows else []


def cluster_text(recorded: Any, settings: Any) -> str:
    """The cluster a fit ran on, in words.

    Parameters
    ----------
    recorded
        What the fit recorded (``fitted["fit_record"]["cluster"]``,
        :func:`pumap_dask.state.active_cluster`), or None for a model saved before fits
        recorded it.
    settings
        The CLI's resolved ``[cluster]`` settings (``run_config.json``), or None. A
        ``scheduler_file`` takes precedence over ``scheduler``, as when the CLI connects.
    """
    rec = recorded if isinstance(recorded, dict) else {}
    cfg = settings if isinstance(settings, dict) else {}
    kind, address, n = rec.get("kind"), rec.get("address"), rec.get("n_workers")
    at = ", ".join(x for x in (address and f"scheduler {address}",
                               n is not None and f"{n} worker{'s' * (n != 1)}") if x)
    at = f" ({at})" if at else ""
    if cfg.get("scheduler_file"):
        return f"scheduler file {cfg['scheduler_file']}{at}"
    if kind == "in-process":
        return f"in-process (dask's {rec.get('scheduler', 'threads')} scheduler, no cluster)"
    if kind == "local" or (not kind and cfg.get("scheduler") == "local"):
        shape = ""
        if cfg.get("scheduler") == "local" and cfg.get("workers"):
            shape = (f", {cfg['workers']} x {cfg.get('threads', 1)} threads, memory "
                     f"{cfg.get('memory', 'auto')} each")
        return f"local cluster{shape}{at}"
    if kind == "remote scheduler":
        return f"scheduler {address}" + (f" ({n} workers)" if n is not None else "")
    if kind:
        return f"{kind}{at}"
    scheduler = cfg.get("scheduler")
    if scheduler == "threads":
        return "in-process (dask's threads scheduler, no cluster)"
    if scheduler in ("slurm", "mpi"):
        return {"slurm": "SLURM workers (dask-jobqueue)", "mpi": "dask-mpi"}[scheduler]
    if scheduler:
        return f"scheduler {scheduler}"
    return NOT_RECORDED


def run_summary(fitted: dict[str, Any], run_config: Any) -> dict[str, Any]:
    """When, where and how a model was made: the fit's own record (``fit_record``, with
    the save time) and the CLI's ``run_config.json``, which the CLI writes right after
    saving the model (its ``saved`` field; ``started`` in files of older versions, also the
    save time).

    Returns
    -------
    dict
        ``fit_started``, ``fit_finished``, ``saved``, ``host``, ``cluster`` (text,
        :func:`cluster_text`) and ``command``; None where nothing recorded it.
    """
    rec = fitted.get("fit_record")
    rec = rec if isinstance(rec, dict) else {}
    rc = run_config if isinstance(run_config, dict) and "error" not in run_config else {}
    resolved = rc.get("resolved") if isinstance(rc.get("resolved"), dict) else {}
    argv = rc.get("argv")
    cluster = cluster_text(rec.get("cluster"), resolved.get("cluster"))
    return {"fit_started": rec.get("started"), "fit_finished": rec.get("finished"),
            "saved": rec.get("saved") or rc.get("saved") or rc.get("started"),
            "host": rec.get("host") or rc.get("host"),
            "cluster": None if cluster == NOT_RECORDED else cluster,
            "command": ("pumap-dask " + " ".join(str(a) for a in argv)
                        if isinstance(argv, list) and argv else None)}


def run_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows of a :func:`run_summary` for the text and HTML reports."""
    labels = (("fit_started", "fit started"), ("fit_finished", "fit finished"),
              ("saved", "saved"), ("host", "host"),
              ("cluster", "cluster"), ("command", "command"))
    return [(label, NOT_RECORDED if run.get(key) is None else str(run[key]))
            for key, label in labels]


SHOWN_ELSEWHERE = ("started", "saved", "versions", "host")


LOCAL_ONLY = ("scheduler", "workers", "threads", "memory")


def run_config_shown(run_config: dict[str, Any]) -> dict[str, Any]:
    """``run_config.json`` without what the Run and Versions sections already show, and,
    when a scheduler file was used, without the local-cluster settings it overrode (the
    resolved ``scheduler`` keeps its default ``local`` there)."""
    out = {k: v for k, v in run_config.items() if k not in SHOWN_ELSEWHERE}
    resolved = out.get("resolved")
    cluster = resolved.get("cluster") if isinstance(resolved, dict) else None
    if isinstance(cluster, dict) and cluster.get("scheduler_file"):
        cluster = {k: v for k, v in cluster.items() if k not in LOCAL_ONLY}
        out["resolved"] = {**resolved, "cluster": cluster}
    return out
