"""The seed vignette (bixverse.gpu's parametric UMAP) step by step, in Python.

Generates the seed's synthetic cluster data (1,500 samples, 32 features, 10 clusters),
splits it 70/30, fits a parametric UMAP on the training part on the CPU
(n_neighbors 15, min_dist 0.5, spread 1.0, batch 128, 100 epochs, seed 42), prints the model
summary, projects the held-out part through the encoder and writes the vignette's three
pictures (training set, held-out set, overlay) as PNG files.

Run: python examples/vignette.py [--out DIR]
"""

import argparse
import logging
import os

from sklearn.neighbors import KNeighborsClassifier

from pumap_dask import ParametricUMAP
from pumap_dask.datasets import clusters, train_test_split
from pumap_dask.plotting import plot_train_test


def main(out_dir: str = "vignette_out") -> None:
    os.makedirs(out_dir, exist_ok=True)
    # Generating data
    X, membership = clusters(n_samples=1500, n_features=32, n_clusters=10, random_state=42)
    train_data, test_data, train_labels, test_labels = train_test_split(
        X, membership, train_fraction=0.7, random_state=42)

    # Fitting the model
    pumap = ParametricUMAP(
        n_components=2, n_neighbors=15, min_dist=0.5, spread=1.0,
        batch_size=128, n_epochs=100, device="cpu", random_state=42,
    ).fit(train_data)
    print(pumap)

    # Predicting on new data
    test_embedding = pumap.transform(test_data)
    acc = KNeighborsClassifier(15).fit(pumap.embedding_, train_labels).score(
        test_embedding, test_labels)
    print(f"held-out 15-NN accuracy: {acc:.3f}")

    # Comparing training and held-out embeddings
    for path in plot_train_test(pumap.embedding_, train_labels, test_embedding, test_labels,
                                out_dir, prefix="vignette"):
        print(f"wrote {path}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="vignette_out")
    main(ap.parse_args().out)
