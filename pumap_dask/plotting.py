"""The vignette's three pictures (needs the optional ``matplotlib``)."""

from __future__ import annotations

import os

import numpy as np


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
