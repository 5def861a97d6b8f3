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
