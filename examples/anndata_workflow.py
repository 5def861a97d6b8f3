"""AnnData workflow: fit on one `.zarr` store's obsm/X_pca, project a second store lazily.

1. Writes two AnnData `.zarr` stores of synthetic cell-like PCA scores (a reference and a
   query sample) with `obs["population"]`.
2. Fits a parametric UMAP on the reference store's `obsm/X_pca` (read through Zarr).
3. Projects the query store lazily (a dask array; nothing is loaded until written) and
   writes `obsm/X_pumap` into both stores without rewriting anything else.
4. Plots both embeddings, coloured by population.

Run: python examples/anndata_workflow.py [--out DIR] [--n-cells N]
Needs the optional extras: pip install -e ".[anndata,plot]"
"""

import argparse
import logging
import os
import warnings

import anndata
import numpy as np

import pumap_dask
from pumap_dask.datasets import cell_like
from pumap_dask.writers import write_anndata_obsm


def make_store(path: str, X: np.ndarray, labels: np.ndarray) -> None:
    adata = anndata.AnnData(obs={"population": labels.astype(str)})
    adata.obsm["X_pca"] = X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's zarr v2 notice
        adata.write_zarr(path, chunks=(5000, X.shape[1]))


def main(out: str, n_cells: int) -> None:
    os.makedirs(out, exist_ok=True)
    X, labels = cell_like(2 * n_cells, n_features=50, random_state=0)
    ref_path, query_path = os.path.join(out, "reference.zarr"), os.path.join(out, "query.zarr")
    make_store(ref_path, X[:n_cells], labels[:n_cells])
    make_store(query_path, X[n_cells:], labels[n_cells:])

    model = pumap_dask.ParametricUMAP(random_state=0, verbose=True).fit(ref_path)  # obsm/X_pca
    print(model)
    model_dir = model.save(os.path.join(out, "model"))

    lazy = pumap_dask.transform(query_path, model_dir)   # lazy dask array
    print(f"lazy query embedding: {lazy.shape} {lazy.dtype}, {lazy.numblocks[0]} blocks")
    for store in (ref_path, query_path):
        write_anndata_obsm(store, model_dir)   # obsm["X_pumap"], rest untouched

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
    for ax, store, title in zip(axes, (ref_path, query_path), ("reference (fit)", "query")):
        adata = anndata.read_zarr(store)
        codes = adata.obs["population"].astype("category").cat.codes.to_numpy()
        emb = adata.obsm["X_pumap"]
        ax.scatter(emb[:, 0], emb[:, 1], c=codes, cmap="tab20", s=2, alpha=0.5)
        ax.set_title(f"{title}: {adata.n_obs} cells")
        ax.set_xlabel("pUMAP1")
    axes[0].set_ylabel("pUMAP2")
    fig.tight_layout()
    path = os.path.join(out, "anndata_workflow.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="anndata_out")
    ap.add_argument("--n-cells", type=int, default=20000)
    a = ap.parse_args()
    main(a.out, a.n_cells)
