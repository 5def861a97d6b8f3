"""The HTML of a run report: one self-contained page (inline CSS, PNG figures as data URIs,
no scripts, no external links) rendered from :func:`pumap_dask.report.write_report`'s
report and figures."""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any

from .report_format import (
    NOT_RECORDED,
    RUN_CONFIG,
    fmt_num,
    recall_text,
    run_config_shown,
    run_rows,
    samples_text,
    stage_table,
)

# --------------------------------------------------------------------------- html
_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
 background:#f5f6f8;color:#1d2430;font-size:14px;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:20px 28px 40px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:18px;margin:0 0 10px;
 border-bottom:2px solid #dfe3ea;padding-bottom:4px}
.sub{color:#5b6473;margin-bottom:16px;word-break:break-all}
section{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:16px 20px;
 margin:14px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(100px,1fr));gap:10px;
 margin:12px 0}
.card{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:10px 12px}
.card b{display:block;font-size:20px}.card span{color:#5b6473;font-size:12px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 10px;border-bottom:1px solid #edf0f4;vertical-align:top}
th{background:#f0f2f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
table.kv{width:auto;min-width:50%}table.kv td,table.kv td.num{text-align:left}
th{white-space:nowrap}td code{word-break:break-all}
td code{font-size:12px;color:#24426b}
h3{font-size:15px;margin:16px 0 6px}
img{max-width:100%;height:auto;display:block;margin:0 auto}
.muted{color:#7a8392;font-style:italic}
pre{background:#f6f8fa;border:1px solid #e4e7ec;border-radius:6px;padding:10px;
 overflow:auto;font-size:12px;max-height:420px}
.note{color:#5b6473;font-size:12px;margin-top:6px}
.legend{margin:10px 0 14px;font-size:12px}.legend .lh{color:#5b6473;margin-bottom:4px}
.legend ul{list-style:none;margin:0;padding:0;columns:3 260px;column-gap:18px}
.legend li{display:flex;align-items:baseline;gap:6px;break-inside:avoid;padding:1px 0}
.legend .sw{flex:none;width:10px;height:10px;border-radius:50%;display:inline-block;
 position:relative;top:1px}
.legend .ln{flex:1 1 auto;overflow-wrap:anywhere}
.legend .lc{flex:none;color:#7a8392;font-variant-numeric:tabular-nums}
.fig{margin:0 auto;text-align:center}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


class _Code(str):
    """A table value shown in monospace."""


def _cell(v: Any) -> str:
    if isinstance(v, _Code):
        return f"<td><code>{_e(v)}</code></td>"
    if isinstance(v, str) and v.startswith(("not computed", NOT_RECORDED, "not measured")):
        return f'<td class="muted">{_e(v)}</td>'
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f'<td class="num">{_e(fmt_num(v))}</td>'
    return f"<td>{_e(v)}</td>"


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None,
           kv: bool = False) -> str:
    """A table whose first column is a row header; ``kv``: a narrow key/value table."""
    parts = ['<table class="kv">' if kv else "<table>"]
    if head:
        parts.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        parts.append(f"<tr><th>{_e(row[0])}</th>" + "".join(_cell(v) for v in row[1:])
                     + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="muted">no {_e(alt)}</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _metric(v: Any, digits: int = 4) -> Any:
    return round(v, digits) if isinstance(v, float) else v


def _card_value(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-"


def _legend(pic: dict[str, Any], what: str) -> str:
    """The labels of a picture with their full names, colours and point counts (the
    figure's own legend wraps and shortens long names)."""
    rows = pic.get("legend")
    if not rows:
        return ""
    items = "".join(
        f'<li title="{_e(r["name"])}: {r["count"]:,} points">'
        f'<span class="sw" style="background:{_e(r["color"])}"></span>'
        f'<span class="ln">{_e(r["name"])}</span><span class="lc">{r["count"]:,}</span></li>'
        for r in rows)
    head = f"{_e(what)}: full names and points drawn"
    if pic.get("palette"):
        head += f" (colours: {_e(pic['palette'])})"
    return f'<div class="legend"><div class="lh">{head}</div><ul>{items}</ul></div>'


def _picture_note(pic: dict[str, Any], source: Any) -> str:
    view = {"scatter": "Drawn as a scatter of small markers",
            "histogram": "Drawn as a 2-D histogram"}.get(pic.get("view"), "Drawn")
    text = f"Source: {_e(source)}. {view} ({_e(pic.get('coloured_by'))}"
    if pic.get("note_text"):
        text += f"; {_e(pic['note_text'])}"
    text += ")."
    if pic.get("note"):
        text += f" {_e(pic['note'])}."
    return f'<p class="note">{text}</p>'


def _query_section(q: dict[str, Any], figures: dict[str, bytes]) -> str:
    pic, qm = q.get("picture") or {}, q.get("metrics") or {}
    sec = ["<section><h2>Query data</h2>"]
    if "query" in figures:
        sec.append('<div class="fig">' + _img(figures["query"], "query embedding") + "</div>")
        how = ("embedded by this model for the report" if q.get("embedded_here")
               else "an embedding this model's transform wrote, used as it is")
        sec.append(_picture_note(pic, f"{q['n_rows']:,} rows of {q['source']} ({how})"))
        sec.append(_legend(pic, "query labels"))
    else:
        sec.append(f'<p class="muted">{_e(pic.get("note", "no picture"))}</p>')
    rows = [("trustworthiness", _metric(qm.get("trustworthiness"))),
            ("kNN preservation", _metric(qm.get("knn_preservation"))),
            (("15-NN label transfer accuracy (reference embedding predicts the query's "
              "labels)"), _metric(qm.get("label_transfer_accuracy")))]
    sec.append(_table(rows, ("query metric", "value"), kv=True))
    detail = (f"Measured on a random sample of {qm.get('n_sample', 0):,} query rows, "
              f"n_neighbors = {qm.get('n_neighbors')}, exact neighbours within the sample.")
    if isinstance(qm.get("label_transfer_accuracy"), float):
        detail += (f" Label transfer scored {qm.get('label_transfer_scored', 0):,} query rows"
                   f" whose label the reference has ({qm.get('label_transfer_unknown', 0):,}"
                   " with other labels left out).")
    sec.append(f'<p class="note">{_e(detail)}</p></section>')
    return "".join(sec)


def render_html(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    """One self-contained HTML page of a report (figures inline as PNG data URIs)."""
    s, m, pic = report["summary"], report["metrics"], report["picture"]
    fitted, loss = s["fitted"], s["loss"]
    name = os.path.basename(s["model_dir"].rstrip(os.sep)) or s["model_dir"]
    cards = [("samples fitted", samples_text(s)),
             ("features", fmt_num(s["n_features"])), ("components", s["n_components"]),
             ("final loss", "-" if loss["final"] is None else f"{loss['final']:.4g}"),
             ("kNN recall", recall_text(fitted).replace(" kNN", "")),
             ("trustworthiness", _card_value(m.get("trustworthiness"))),
             ("kNN preservation", _card_value(m.get("knn_preservation"))),
             ("15-NN label accuracy", _card_value(m.get("label_accuracy"))),
             ("fit time", f"{sum(s['timings'].values()):.1f} s" if s["timings"] else "-")]
    body = [f"<h1>Parametric UMAP report: {_e(name)}</h1>",
            f'<div class="sub">{_e(s["model_dir"])} &middot; created {_e(report["created"])}'
            f" &middot; pumap_dask report v{report['report_version']}</div>",
            '<div class="cards">' + "".join(
                f"<div class=\"card\"><b>{_e(v)}</b><span>{_e(k)}</span></div>"
                for k, v in cards) + "</div>"]

    # embedding
    sec = ["<section><h2>Embedding</h2>"]
    if "embedding_density" in figures:
        sec.append('<div class="grid" style="grid-template-columns:1.2fr 1fr">'
                   + _img(figures["embedding"], "embedding by label")
                   + _img(figures["embedding_density"], "embedding density") + "</div>")
    elif "embedding" in figures:
        sec.append('<div class="fig">' + _img(figures["embedding"], "embedding") + "</div>")
    if "embedding" in figures:
        sec.append(_picture_note(pic, pic.get("source")))
        sec.append(_legend(pic, "labels"))
    else:
        sec.append(f'<p class="muted">{_e(pic.get("note", "no picture"))}</p>')
    sec.append("</section>")
    body += sec

    # quality
    rows = [("kNN recall (approximate vs exact kNN, at fit)", recall_text(fitted)),
            ("trustworthiness", _metric(m.get("trustworthiness"))),
            ("kNN preservation", _metric(m.get("knn_preservation"))),
            ("15-NN label accuracy on the embedding (5-fold CV)",
             _metric(m.get("label_accuracy"))),
            ("15-NN label accuracy on the input (5-fold CV)",
             _metric(m.get("label_accuracy_input")))]
    detail = ""
    if "n_sample" in m:
        detail = (f'<p class="note">Measured on a random sample of {m["n_sample"]:,} rows '
                  f'(seed {report["seeds"]["report_random_state"]}), n_neighbors = '
                  f'{m["n_neighbors"]}, exact neighbours within the sample.</p>')
    body.append("<section><h2>Quality</h2>" + _table(rows, ("metric", "value"), kv=True)
                + detail
                + "</section>")
    if report.get("query"):
        body.append(_query_section(report["query"], figures))

    # training
    stage_head, stage_rows = stage_table(s)
    peak_note = "" if s["peak_memory"] else (
        '<p class="note">Peak memory was not recorded by this fit.</p>')
    fit_rows = [("init", fitted.get("init")), ("kNN method", fitted.get("knn_method")),
                ("graph edges", fitted.get("n_edges")), ("a", fitted.get("a")),
                ("b", fitted.get("b")),
                ("train world size", fitted.get("train_world_size", NOT_RECORDED)),
                ("epochs", loss["n_epochs"]), ("final loss", loss["final"]),
                ("lowest loss", loss["min"])]
    body.append(
        "<section><h2>Training</h2><div class=\"grid\"><div>"
        + _img(figures.get("loss"), "loss curve") + "</div><div>"
        + _table(fit_rows, ("fit", "value"), kv=True) + "</div></div></section>")
    body.append(
        "<section><h2>Wall time and peak memory per stage</h2><div class=\"grid\"><div>"
        + _img(figures.get("timings"), "timings") + "</div><div>"
        + _table(stage_rows, stage_head) + peak_note
        + "</div></div></section>")

    # configuration
    params = sorted(s["params"].items())
    half = (len(params) + 1) // 2
    ptab = [_table([(k, _Code(json.dumps(v))) for k, v in part], ("parameter", "value"))
            for part in (params[:half], params[half:])]
    run_cfg = s["run_config"]
    run_html = (f'<p class="muted">{NOT_RECORDED} (no {RUN_CONFIG} in the model '
                "directory)</p>" if run_cfg is None else
                "<pre>" + _e(json.dumps(run_config_shown(run_cfg), indent=2, sort_keys=True,
                                        default=str))
                + "</pre>")
    body.append("<section><h2>Resolved configuration</h2><div class=\"grid\">"
                f"<div>{ptab[0]}</div><div>{ptab[1]}</div></div>"
                f"<h3>Run config ({RUN_CONFIG})</h3>{run_html}</section>")

    # versions and seeds
    vers = s["versions"]
    where = vers.get("recorded_by") or "recorded in the model"
    vrows = [(k, v, where) for k, v in sorted(vers["recorded"].items())]
    vrows += [(k, v, "reading environment") for k, v in
              sorted(vers["reading_environment"].items())]
    seeds = [("model random_state", report["seeds"]["model_random_state"]),
             ("report sample / CV seed", report["seeds"]["report_random_state"]),
             ("model format version", s["format_version"]),
             ("weights sha256", _Code(s["weights_sha256"]))]
    if report.get("data"):
        seeds.append(("data", report["data"]["source"]))
        if report["data"].get("labels"):
            seeds.append(("labels", report["data"]["labels"]))
    if report.get("query"):
        seeds.append(("query", report["query"]["source"]))
        if report["query"].get("labels"):
            seeds.append(("query labels", report["query"]["labels"]))
    body.append("<section><h2>Run, versions and seeds</h2>"
                + _table(run_rows(s.get("run") or {}), ("run", "value"), kv=True)
                + "<h3>Versions</h3>"
                + _table(vrows, ("package", "version", "source"), kv=True)
                + "<h3>Seeds and provenance</h3>" + _table(seeds, ("item", "value"), kv=True)
                + "</section>")
    body.append("<section><h2>Report timings</h2>" + _table(
        [(k, f"{v:.2f} s") for k, v in report["report_timings"].items()],
        ("step", "wall time"), kv=True) + "</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>pumap_dask report: {_e(name)}</title><style>{_CSS}</style></head>"
            "<body><main>" + "\n".join(body) + "</main></body></html>\n")

