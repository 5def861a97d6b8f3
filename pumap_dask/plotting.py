"""Pictures (need the optional ``matplotlib``): the vignette's three scatter plots and the
model report's figures, drawn from pre-binned data so millions of points draw in a blink."""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np

from .errors import InputError

PLOT_HINT = "pip install pumap_dask[plot]"
_ROW_BATCH = 1 << 20  # rows binned at a time: bounds the histogram's temporaries


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
    pts = emb[finite] if not finite.all() else emb
    if pts.shape[0] == 0:
        raise InputError("the embedding has no finite points to draw")
    q = (0.0, 1.0) if pts.shape[0] < 20000 else (0.0005, 0.9995)
    lo, hi = np.quantile(pts, q, axis=0).astype(np.float64)
    span = np.maximum(hi - lo, 1e-6 * max(1.0, float(np.abs([lo, hi]).max())))
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
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


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg back-end, or an ImportError saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"the report's figures need matplotlib: {PLOT_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes (no metadata) and close it."""
    plt = require_matplotlib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def label_colors(n_labels: int) -> np.ndarray:
    """(n_labels, 4) RGBA colours of a qualitative palette (tab10 up to 10, else tab20)."""
    plt = require_matplotlib()
    cmap = plt.get_cmap("tab10" if n_labels <= 10 else "tab20")
    return np.asarray([cmap(i % cmap.N) for i in range(n_labels)])


def plot_binned_embedding(counts: np.ndarray, extent: Sequence[float], *,
                          majority: np.ndarray | None = None,
                          names: Sequence[str] | None = None, title: str = "",
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
        Label names for the legend.
    title, note
        Axes title and a small caption under it.

    Returns
    -------
    bytes
        The PNG.
    """
    plt = require_matplotlib()
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(7.6 if majority is not None else 7.0, 6.0))
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
        names = list(names or [])
        colors = label_colors(len(names))
        rgba = np.zeros(counts.shape + (4,))
        labelled = filled & (majority >= 0)
        rgba[labelled] = colors[majority[labelled]]
        grey = filled & ~labelled
        rgba[grey] = (0.6, 0.6, 0.6, 1.0)
        dens = np.log1p(counts) / np.log1p(max(1, counts.max()))
        rgba[..., 3] = np.where(filled, 0.25 + 0.75 * dens, 0.0)
        ax.imshow(rgba, origin="lower", extent=extent, aspect="equal", interpolation="nearest")
        handles = [Patch(color=colors[i], label=str(n)) for i, n in enumerate(names)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False, title="majority label", title_fontsize=8)
    ax.set_xlabel("pUMAP1")
    ax.set_ylabel("pUMAP2")
    ax.set_title(title, fontsize=11)
    if note:
        ax.text(0.0, -0.13, note, transform=ax.transAxes, fontsize=8, color="0.35",
                va="top")
    fig.tight_layout()
    return png_bytes(fig)


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
