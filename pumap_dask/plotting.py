"""Pictures (need the optional ``matplotlib``): the vignette's three scatter plots and the
model report's figures: an embedding as a scatter of small markers (up to some 50,000
points) or drawn from pre-binned data (so millions of points draw in a blink), with a
legend column as wide as its wrapped labels."""

from __future__ import annotations

import io
import logging
import math
import os
import textwrap
from typing import Any, Sequence

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)

PLOT_HINT = "pip install pumap_dask[plot]"
_ROW_BATCH = 1 << 20  # rows binned at a time: bounds the histogram's temporaries
_UNLABELLED = (0.6, 0.6, 0.6, 1.0)  # points / bins without a label
_BACKGROUND = (0.78, 0.79, 0.81, 1.0)  # the reference under a query's points
LEGEND_WIDTH = 24  # characters per line of a legend label (wrapped, then shortened)


def plot_train_test(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                    test_labels: np.ndarray, out_dir: str, prefix: str = "pumap") -> list[str]:
    """Write training, held-out and overlay scatter plots as PNG; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if max(train_labels.max(), test_labels.max()) < 10 else "tab20")
    paths = []
    panels = [
        ("training set", [(train, train_labels, "o")], "train"),
        ("held-out set (predicted)", [(test, test_labels, "o")], "test"),
        ("training vs held-out", [(train, train_labels, "o"), (test, test_labels, "x")],
         "overlay"),
    ]
    for title, series, name in panels:
        fig, ax = plt.subplots(figsize=(6, 5))
        for emb, lab, marker in series:
            ax.scatter(emb[:, 0], emb[:, 1], c=cmap(lab % cmap.N), s=6 if marker == "o" else 12,
                       alpha=0.5, marker=marker, linewidths=0.8 if marker == "x" else 0)
        if name == "overlay":
            ax.scatter([], [], c="grey", marker="o", label="train")
            ax.scatter([], [], c="grey", marker="x", label="test")
            ax.legend(loc="best")
        ax.set_xlabel("pUMAP1")
        ax.set_ylabel("pUMAP2")
        ax.set_title(f"Parametric UMAP: {title}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- report figures
def bin_embedding(emb: np.ndarray, bins: int = 512, codes: np.ndarray | None = None,
                  n_labels: int = 0) -> dict[str, Any]:
    """2-D histogram of a 2-D embedding with square bins, and per-bin label counts.

    The binned area spans the 0.05-99.95% quantiles of each axis plus a 5% margin, so a
    few far outliers do not shrink the picture; points outside are counted.

    Parameters
    ----------
    emb
        (n, 2) embedding.
    bins
        Bins along the longer axis.
    codes, n_labels
        Integer labels in ``[0, n_labels)`` (-1: none) to find each bin's majority label.

    Returns
    -------
    dict
        ``counts`` (ny, nx) int64, ``majority`` (ny, nx) int (-1: no labelled point) or
        None, ``extent`` (x0, x1, y0, y1), ``n_outside`` (finite points outside the area)
        and ``n_nonfinite``.
    """
    n = emb.shape[0]
    finite = np.isfinite(emb).all(axis=1)
    x0, x1, y0, y1 = view_extent(emb)
    lo, hi = np.array([x0, y0]), np.array([x1, y1])
    width = float((hi - lo).max()) / bins
    nx, ny = (max(1, int(math.ceil((hi[i] - lo[i]) / width))) for i in (0, 1))
    x0 = (lo[0] + hi[0]) / 2 - nx * width / 2
    y0 = (lo[1] + hi[1]) / 2 - ny * width / 2
    counts = np.zeros(nx * ny, np.int64)
    labelled = codes is not None and n_labels > 0
    by_label = np.zeros(nx * ny * n_labels, np.int64) if labelled else None
    for s in range(0, n, _ROW_BATCH):
        e = emb[s:s + _ROW_BATCH]
        with np.errstate(invalid="ignore"):
            ix = np.floor((e[:, 0] - x0) / width)
            iy = np.floor((e[:, 1] - y0) / width)
            inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        flat = iy[inside].astype(np.int64) * nx + ix[inside].astype(np.int64)
        counts += np.bincount(flat, minlength=nx * ny)
        if labelled:
            c = codes[s:s + _ROW_BATCH][inside]
            ok = c >= 0
            by_label += np.bincount(flat[ok] * n_labels + c[ok], minlength=by_label.size)
    majority = None
    if labelled:
        per_bin = by_label.reshape(nx * ny, n_labels)
        majority = np.where(per_bin.sum(1) > 0, per_bin.argmax(1), -1).reshape(ny, nx)
    n_finite = int(finite.sum())
    return {"counts": counts.reshape(ny, nx), "majority": majority,
            "extent": (float(x0), float(x0 + nx * width), float(y0), float(y0 + ny * width)),
            "n_outside": n_finite - int(counts.sum()), "n_nonfinite": n - n_finite}


def view_extent(*embeddings: np.ndarray) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` that shows the finite points of the first two columns of every
    embedding given: their 0.05-99.95% quantiles (all points below 20,000) plus a 5% margin,
    so a few far outliers do not shrink the picture.

    Raises
    ------
    InputError
        When no embedding has a finite point.
    """
    parts = []
    for emb in embeddings:
        pts = np.asarray(emb)[:, :2]
        finite = np.isfinite(pts).all(axis=1)
        parts.append(pts if finite.all() else pts[finite])
    pts = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if pts.shape[0] == 0:
        raise InputError("the embedding has no finite points to draw")
    q = (0.0, 1.0) if pts.shape[0] < 20000 else (0.0005, 0.9995)
    lo, hi = np.quantile(pts, q, axis=0).astype(np.float64)
    span = np.maximum(hi - lo, 1e-6 * max(1.0, float(np.abs([lo, hi]).max())))
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def n_outside(emb: np.ndarray, extent: Sequence[float]) -> int:
    """How many finite points of ``emb`` (first two columns) lie outside ``extent``."""
    x, y = np.asarray(emb)[:, 0], np.asarray(emb)[:, 1]
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(x) & np.isfinite(y)
        inside = (x >= extent[0]) & (x <= extent[1]) & (y >= extent[2]) & (y <= extent[3])
    return int((finite & ~inside).sum())


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg back-end, or an ImportError saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"the report's figures need matplotlib: {PLOT_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 100, tight: bool = False) -> bytes:
    """Render a figure to PNG bytes (no metadata) and close it; ``tight``: the saved area
    is fitted to every label, legend and caption (nothing is cut at the figure's edge)."""
    plt = require_matplotlib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None},
                **({"bbox_inches": "tight", "pad_inches": 0.08} if tight else {}))
    plt.close(fig)
    return buf.getvalue()


def label_colors(n_labels: int, colors: Sequence[Any] | None = None) -> np.ndarray:
    """(n_labels, 4) RGBA colours: ``colors`` (e.g. an AnnData ``uns/<key>_colors``
    palette) when it gives a valid colour for every label, else a qualitative palette
    (tab10 up to 10 labels, else tab20)."""
    plt = require_matplotlib()
    from matplotlib.colors import to_rgba_array

    if colors is not None:
        given = list(colors)[:n_labels]
        if usable_palette(given, n_labels):
            return to_rgba_array(given) if given else np.zeros((0, 4))
        logger.warning("the label palette %s does not give a valid colour for each of the %d "
                       "labels: using the report's own", given[:5], n_labels)
    cmap = plt.get_cmap("tab10" if n_labels <= 10 else "tab20")
    return np.asarray([cmap(i % cmap.N) for i in range(n_labels)]).reshape(-1, 4)


def usable_palette(colors: Sequence[Any] | None, n_labels: int) -> bool:
    """True when ``colors`` gives a valid matplotlib colour for each of ``n_labels`` labels."""
    require_matplotlib()
    from matplotlib.colors import is_color_like

    return colors is not None and len(colors) >= n_labels and \
        all(is_color_like(c) for c in list(colors)[:n_labels])


def hex_colors(rgba: np.ndarray) -> list[str]:
    """``#rrggbb`` of each RGBA row (for the HTML legend)."""
    require_matplotlib()
    from matplotlib.colors import to_hex

    return [to_hex(c, keep_alpha=False) for c in np.asarray(rgba)]


def legend_label(name: Any, width: int = LEGEND_WIDTH, max_lines: int = 2) -> str:
    """A label wrapped to ``width`` characters a line; past ``max_lines`` lines it is
    shortened with an ellipsis (the report's HTML legend shows the full name)."""
    lines = textwrap.wrap(str(name), width, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:width - 1].rstrip() + "\u2026"
    return "\n".join(lines)


def _embedding_figure(plt: Any, names: Sequence[str] | None, extra_w: float = 0.0
                      ) -> tuple[Any, Any, Any]:
    """A figure for an embedding: a 6 x 6 in panel and, with ``names``, a legend column as
    wide as its wrapped labels. Returns ``(fig, ax, legend_ax or None)``."""
    if not names:
        fig, ax = plt.subplots(figsize=(6.0 + extra_w, 6.0))
        return fig, ax, None
    max_lines = 2 if len(names) <= 12 else 1
    labels = [legend_label(n, max_lines=max_lines) for n in names]
    chars = max(len(line) for lab in labels for line in lab.split("\n"))
    leg_w = 0.55 + 0.072 * chars
    fig = plt.figure(figsize=(6.0 + leg_w, 6.0))
    grid = fig.add_gridspec(1, 2, width_ratios=[6.0, leg_w], wspace=0.04)
    ax = fig.add_subplot(grid[0, 0])
    lax = fig.add_subplot(grid[0, 1])
    lax.axis("off")
    return fig, ax, lax


def _legend(lax: Any, names: Sequence[str], colors: np.ndarray, title: str,
            marker: bool = False) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    max_lines = 2 if len(names) <= 12 else 1
    if marker:
        handles = [Line2D([], [], ls="", marker="o", ms=6, mfc=colors[i], mec="none",
                          label=legend_label(n, max_lines=max_lines))
                   for i, n in enumerate(names)]
    else:
        handles = [Patch(color=colors[i], label=legend_label(n, max_lines=max_lines))
                   for i, n in enumerate(names)]
    lax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 1.0), fontsize=8,
               frameon=False, title=title, title_fontsize=9, alignment="left",
               borderaxespad=0.0, labelspacing=0.6 if max_lines > 1 else 0.4,
               handlelength=1.2)


def _finish_embedding_axes(ax: Any, extent: Sequence[float], title: str, note: str) -> None:
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("pUMAP1")
    ax.set_ylabel("pUMAP2")
    ax.set_title(title, fontsize=11, pad=18 if note else 6)
    if note:
        ax.text(0.5, 1.012, note, transform=ax.transAxes, fontsize=8, color="0.35",
                ha="center", va="bottom")


def _layout(fig: Any, lax: Any) -> None:
    """Tight layout for a lone panel; a panel with a legend column keeps its grid (the PNG
    is cropped to its content when saved, :func:`png_bytes`)."""
    if lax is None:
        fig.tight_layout()
    else:
        fig.subplots_adjust(left=0.08, right=0.99, bottom=0.08, top=0.92)


def marker_size(n: int) -> float:
    """Scatter marker area (points^2) for ``n`` points on a 6-inch panel: small markers
    for many points, so clusters do not become blots, larger ones for a few."""
    return float(np.clip(16000.0 / max(1, n), 0.4, 16.0))


def plot_scatter_embedding(emb: np.ndarray, *, codes: np.ndarray | None = None,
                           names: Sequence[str] | None = None,
                           colors: np.ndarray | None = None,
                           background: np.ndarray | None = None,
                           extent: Sequence[float] | None = None, title: str = "",
                           note: str = "", legend_title: str = "label",
                           point_color: Any = "C0", seed: int = 0) -> bytes:
    """Draw an embedding as a scatter of small markers (for up to some 50,000 points).

    Parameters
    ----------
    emb
        (n, >= 2) embedding; the first two columns are drawn.
    codes, names, colors
        Integer labels into ``names`` (-1: none, drawn grey) and their RGBA colours
        (:func:`label_colors`); a legend lists the names (wrapped, long ones shortened).
        Without codes, every point is ``point_color``.
    background
        (m, >= 2) points drawn first in light grey (the reference under a query).
    extent
        ``(x0, x1, y0, y1)`` to show (default :func:`view_extent` of all points).
    title, note
        Axes title and a small caption under it.
    legend_title
        The legend's title.
    seed
        Seeds the drawing order (shuffled, so no label always paints over another).

    Returns
    -------
    bytes
        The PNG.
    """
    plt = require_matplotlib()
    emb = np.asarray(emb)
    labelled = codes is not None and names is not None and len(names) > 0
    if extent is None:
        extent = view_extent(emb, *([] if background is None else [background]))
    fig, ax, lax = _embedding_figure(plt, list(names) if labelled else None)
    if background is not None and len(background):
        ax.scatter(background[:, 0], background[:, 1], s=marker_size(len(background)),
                   c=[_BACKGROUND], linewidths=0, rasterized=True, label="reference")
    order = np.random.default_rng(seed).permutation(emb.shape[0])
    s = marker_size(emb.shape[0])
    if background is not None and len(background):  # the reference must show between them
        s = min(s, 2.0 * marker_size(len(background)), 6.0)
    if labelled:
        codes = np.asarray(codes)[order]
        pts = emb[order]
        if colors is None:
            colors = label_colors(len(names))
        rgba = np.where((codes >= 0)[:, None], colors[np.clip(codes, 0, None)], _UNLABELLED)
        none = codes < 0
        if none.any():
            ax.scatter(pts[none, 0], pts[none, 1], s=s, c=[_UNLABELLED], linewidths=0,
                       rasterized=True)
        ax.scatter(pts[~none, 0], pts[~none, 1], s=s, c=rgba[~none], linewidths=0,
                   rasterized=True)
        _legend(lax, list(names), colors, legend_title, marker=True)
    else:
        ax.scatter(emb[order, 0], emb[order, 1], s=s, c=[point_color], linewidths=0,
                   rasterized=True)
    _finish_embedding_axes(ax, extent, title, note)
    if background is not None and not labelled:
        from matplotlib.lines import Line2D

        ax.legend(handles=[Line2D([], [], ls="", marker="o", mfc=_BACKGROUND, mec="none",
                                  label="reference"),
                           Line2D([], [], ls="", marker="o", mfc=point_color, mec="none",
                                  label="query")],
                  loc="best", fontsize=8, frameon=True, framealpha=0.8)
    _layout(fig, lax)
    return png_bytes(fig, tight=True)


def plot_binned_embedding(counts: np.ndarray, extent: Sequence[float], *,
                          majority: np.ndarray | None = None,
                          names: Sequence[str] | None = None,
                          colors: np.ndarray | None = None, title: str = "",
                          note: str = "") -> bytes:
    """Draw a 2-D histogram of an embedding as one image: log density, or majority labels.

    Parameters
    ----------
    counts
        (ny, nx) points per bin, row 0 at the bottom.
    extent
        ``(x0, x1, y0, y1)`` of the binned area.
    majority
        (ny, nx) index (into ``names``) of the most frequent label per bin, -1 where a
        bin holds no labelled point. Colours the bins by label, with alpha by density.
    names
        Label names for the legend (wrapped; long ones shortened).
    colors
        (len(names), 4) RGBA colours of the labels (default :func:`label_colors`).
    title, note
        Axes title and a small caption under it.

    Returns
    -------
    bytes
        The PNG.
    """
    plt = require_matplotlib()
    from matplotlib.colors import LogNorm

    names = list(names or []) if majority is not None else None
    fig, ax, lax = _embedding_figure(plt, names, extra_w=0.0 if names else 1.2)
    counts = np.asarray(counts)
    filled = counts > 0
    if majority is None:
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")
        img = np.ma.masked_where(~filled, counts)
        vmax = max(2, int(counts.max()))
        im = ax.imshow(img, origin="lower", extent=extent, cmap=cmap, aspect="equal",
                       norm=LogNorm(vmin=1, vmax=vmax), interpolation="nearest")
        from matplotlib.ticker import FuncFormatter, NullFormatter

        cb = fig.colorbar(im, ax=ax, shrink=0.8, label="points per bin (log scale)")
        cb.set_ticks(np.unique(np.geomspace(1, vmax, 6).round()))
        cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        cb.ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        if colors is None:
            colors = label_colors(len(names))
        rgba = np.zeros(counts.shape + (4,))
        labelled = filled & (majority >= 0)
        rgba[labelled] = colors[majority[labelled]]
        grey = filled & ~labelled
        rgba[grey] = _UNLABELLED
        dens = np.log1p(counts) / np.log1p(max(1, counts.max()))
        rgba[..., 3] = np.where(filled, 0.25 + 0.75 * dens, 0.0)
        ax.imshow(rgba, origin="lower", extent=extent, aspect="equal", interpolation="nearest")
        if lax is not None:
            _legend(lax, names, colors, "majority label")
    _finish_embedding_axes(ax, extent, title, note)
    _layout(fig, lax)
    return png_bytes(fig, tight=True)


def plot_loss(history: Sequence[float]) -> bytes:
    """Training loss per epoch, as PNG bytes."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    y = np.asarray(history, dtype=float)
    x = np.arange(1, y.size + 1)
    ax.plot(x, y, color="C0", lw=1.6, marker="o" if y.size <= 30 else None, ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Training loss", fontsize=11)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def plot_timings(timings: dict[str, float]) -> bytes:
    """Horizontal bars of per-stage wall time (seconds), as PNG bytes."""
    plt = require_matplotlib()
    stages = list(timings)
    secs = np.asarray([float(timings[s]) for s in stages])
    fig, ax = plt.subplots(figsize=(6.0, 0.9 + 0.38 * max(1, len(stages))))
    ax.barh(stages, secs, color="C2")
    ax.invert_yaxis()
    top = float(secs.max()) if secs.size else 1.0
    for i, s in enumerate(secs):
        ax.text(s + 0.01 * top, i, _seconds(s), va="center", fontsize=8)
    ax.set_xlim(0, 1.18 * top if top > 0 else 1)
    ax.set_xlabel("wall time (s)")
    ax.set_title("Fit: wall time per stage", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def _seconds(s: float) -> str:
    if s < 0.001:
        return "< 0.001 s"
    return f"{s:.3g} s" if s < 100 else f"{s:,.0f} s"
