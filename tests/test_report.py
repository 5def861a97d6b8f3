"""The model report: ``model_summary``/``format_info`` (``pumap-dask info``) and
``write_report`` (``report.json`` + a self-contained ``report.html``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from pumap_dask import ParametricUMAP
from pumap_dask.datasets import clusters
from pumap_dask.model import CONFIG
from pumap_dask.errors import ModelFileError

pytest.importorskip("matplotlib")
zarr = pytest.importorskip("zarr")

from pumap_dask.report import NEEDS_DATA, format_info, model_summary, write_report
from pumap_dask.report_metrics import knn_preservation, load_labels, sample_rows

N, D, K = 600, 16, 5


@pytest.fixture(scope="module")
def data():
    return clusters(N, D, K, random_state=0)


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory):
    """A small model saved with its embedding (shared: treat as read-only)."""
    X, _ = data
    est = ParametricUMAP(n_epochs=10, batch_size=1024, hidden_layers=(16,), device="cpu",
                         random_state=7).fit(X)
    return est.save(str(tmp_path_factory.mktemp("report") / "model"))


@pytest.fixture
def model_copy(model_dir, tmp_path):
    path = str(tmp_path / "model")
    shutil.copytree(model_dir, path)
    return path


def _edit_config(model_dir: str, edit) -> None:
    """Change a saved model's config.json as a newer/older fit would have written it
    (checksum updated, so the model stays valid)."""
    from pumap_dask.model import config_sha256

    path = os.path.join(model_dir, CONFIG)
    doc = json.load(open(path))
    edit(doc)
    doc["config_sha256"] = config_sha256(doc)
    json.dump(doc, open(path, "w"))


@pytest.fixture(scope="module")
def zarr_array(data, tmp_path_factory):
    X, _ = data
    path = str(tmp_path_factory.mktemp("zarr") / "X.zarr")
    arr = zarr.create_array(path, shape=X.shape, chunks=(128, D), dtype="float32")
    arr[:] = X
    return path


@pytest.fixture(scope="module")
def anndata_store(data, tmp_path_factory):
    """An AnnData-layout Zarr store: obsm/X_pca, a categorical obs/cell_type (codes +
    categories, as AnnData encodes it) and a plain obs/batch array."""
    X, y = data
    path = str(tmp_path_factory.mktemp("adata") / "cells.zarr")
    root = zarr.open_group(path, mode="w", zarr_format=2)  # what AnnData writes today
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    obsm = root.create_group("obsm")
    obsm.create_array("X_pca", data=X, chunks=(200, D))
    obs = root.create_group("obs")
    cat = obs.create_group("cell_type")
    cat.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0",
                      "ordered": False})
    names = np.array([f"type_{chr(65 + i)}" for i in range(K)])
    cat.create_array("codes", data=y.astype(np.int8))
    cat.create_array("categories", data=names)
    obs.create_array("batch", data=(np.arange(N) % 3).astype(np.int64))
    return path


def test_model_summary_reads_the_fit(model_dir):
    cfg = json.load(open(os.path.join(model_dir, CONFIG)))
    s = model_summary(model_dir)
    assert s["format_version"] == cfg["format_version"] == 2
    assert (s["n_samples_fit"], s["n_features"], s["n_components"]) == (N, D, 2)
    assert s["params"]["random_state"] == 7
    assert s["fitted"]["n_edges"] == cfg["fitted"]["n_edges"]
    assert s["fitted"]["knn_method"] == cfg["fitted"]["knn_method"]
    assert s["timings"] == pytest.approx(cfg["fitted"]["timings"])
    assert list(s["timings"])[:2] == ["input", "knn"]  # pipeline order, not alphabetical
    assert s["peak_memory"] == (cfg["fitted"].get("peak_memory") or None)
    assert s["loss"]["n_epochs"] == 10
    assert s["loss"]["final"] == pytest.approx(cfg["fitted"]["loss_history"][-1])
    # the model records no versions: the reading environment's are shown, labelled so
    assert s["versions"]["recorded"] == {}
    assert {"pumap_dask", "torch", "dask", "numpy"} <= set(s["versions"]["reading_environment"])
    assert s["run_config"] is None and s["has_embedding"]


def test_format_info_shows_the_numbers(model_dir):
    s = model_summary(model_dir)
    text = format_info(s)
    for section in ("Model", "Parameters", "Fit", "Versions", "Run config"):
        assert re.search(rf"^{section}$", text, re.M), section
    assert re.search(r"samples fitted\s+600$", text, re.M)
    assert re.search(r"features\s+16$", text, re.M)
    assert f"{s['fitted']['n_edges']:,}" in text
    assert f"final loss {s['loss']['final']:.4g}" in text
    assert re.search(rf"^  train\s+{s['timings']['train']:.3f} s ", text, re.M)
    assert "reading environment" in text
    import torch

    assert torch.__version__ in text


def test_peak_memory_is_optional(model_copy, tmp_path):
    # models saved before peak-memory tracking have no such key
    _edit_config(model_copy, lambda d: [d["fitted"].pop(k, None) for k in
                                        ("peak_memory", "worker_peak_memory")])
    s = model_summary(model_copy)
    assert s["peak_memory"] is None and s["worker_peak_memory"] is None
    assert re.search(rf"^  train\s+{s['timings']['train']:.3f} s\s+not recorded$",
                     format_info(s), re.M)
    write_report(model_copy, tmp_path)
    assert "Peak memory was not recorded" in open(tmp_path / "report.html").read()


def test_summary_with_peak_memory_versions_and_run_config(model_copy):
    # what other parts of the fit and the CLI add to a model: written as they would be
    def edit(doc):
        doc["fitted"]["peak_memory"] = {"knn": 3 * 2 ** 30, "train": 512 * 2 ** 20}
        doc["fitted"]["worker_peak_memory"] = {"knn": 5 * 2 ** 30}
        doc["versions"] = {"pumap_dask": "9.9.9", "torch": "1.0"}

    _edit_config(model_copy, edit)
    json.dump({"input": "cells.zarr", "scheduler": "local", "workers": 4},
              open(os.path.join(model_copy, "run_config.json"), "w"))
    s = model_summary(model_copy)
    assert s["peak_memory"] == {"knn": 3 * 2 ** 30, "train": 512 * 2 ** 20}
    assert s["versions"]["recorded"]["pumap_dask"] == "9.9.9"
    assert "pumap_dask" not in s["versions"]["reading_environment"]
    assert s["run_config"]["workers"] == 4
    text = format_info(s)
    assert re.search(r"knn\s+\d+\.\d{3} s\s+3\.0 GiB\s+5\.0 GiB$", text, re.M)
    assert re.search(r"train\s+\d+\.\d{3} s\s+512\.0 MiB\s+-$", text, re.M)
    assert re.search(r"total\s+\d+\.\d{3} s\s+3\.0 GiB \(max\)\s+5\.0 GiB \(max\)$",
                     text, re.M)
    assert "9.9.9" in text and '"scheduler": "local"' in text
    rep = write_report(model_copy)
    page = open(rep["paths"]["html"]).read()
    assert "3.0 GiB" in page and "cells.zarr" in page


def test_report_without_data(model_copy, tmp_path):
    out = tmp_path / "out"
    rep = write_report(model_copy, out)
    doc = json.load(open(out / "report.json"))
    assert {"summary", "picture", "metrics", "seeds", "figures"} <= set(doc)
    assert doc["figures"] == ["embedding", "loss", "timings"]
    assert doc["picture"]["n_points"] == N and doc["picture"]["coloured_by"] == "density"
    for key in ("trustworthiness", "knn_preservation", "label_accuracy"):
        assert doc["metrics"][key] == NEEDS_DATA
    assert doc["seeds"] == {"report_random_state": 0, "model_random_state": 7}
    page = open(out / "report.html").read()
    assert page.count("data:image/png;base64,") == 3
    assert "not computed (pass --data)" in page
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<script" not in page and "<link" not in page
    assert rep["paths"]["html"] == str(out / "report.html")
    assert sorted(os.listdir(out)) == ["report.html", "report.json"]  # no temp files left


def test_report_default_out_dir_is_the_model(model_copy):
    write_report(model_copy)
    assert {"report.json", "report.html"} <= set(os.listdir(model_copy))


def test_report_with_zarr_data_matches_sklearn(model_copy, zarr_array, data, tmp_path):
    from sklearn.manifold import trustworthiness

    from pumap_dask.transform import transform

    X, y = data
    rep = write_report(model_copy, tmp_path, data=zarr_array, labels=y, n_neighbors=10)
    m = json.load(open(tmp_path / "report.json"))["metrics"]
    assert m["n_sample"] == N  # n_sample 5000 > 600 rows: every row
    E = transform(X, model_copy).compute()
    assert m["trustworthiness"] == pytest.approx(trustworthiness(X, E, n_neighbors=10),
                                                 abs=1e-6)
    assert m["knn_preservation"] == pytest.approx(knn_preservation(X, E, 10), abs=1e-6)
    assert 0.9 <= m["label_accuracy"] <= 1.0  # 5 well-separated clusters
    assert rep["picture"]["coloured_by"] == "majority label per bin"
    assert rep["picture"]["n_labels"] == K
    assert rep["data"]["n_rows"] == N


def test_knn_preservation_against_brute_force():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    assert knn_preservation(X, X[:, :5], 7) == pytest.approx(1.0)
    E = rng.normal(size=(200, 2))

    def nn(A):
        d = ((A[:, None] - A[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1)[:, :7]

    a, b = nn(X), nn(E)
    expected = np.mean([len(set(a[i]) & set(b[i])) / 7 for i in range(200)])
    assert knn_preservation(X, E, 7) == pytest.approx(expected)


def test_report_samples_rows_with_the_seed(model_copy, zarr_array, data, tmp_path):
    from sklearn.manifold import trustworthiness

    from pumap_dask.transform import transform

    X, _ = data
    rep = write_report(model_copy, tmp_path, data=zarr_array, n_sample=200, random_state=5)
    idx = sample_rows(N, 200, 5)
    assert idx.size == 200 and np.all(np.diff(idx) > 0)
    assert not np.array_equal(idx, sample_rows(N, 200, 6))
    E = transform(X[idx], model_copy).compute()
    assert rep["metrics"]["n_sample"] == 200
    assert rep["metrics"]["trustworthiness"] == pytest.approx(
        trustworthiness(X[idx], E, n_neighbors=15), abs=1e-6)
    assert rep["metrics"]["label_accuracy"] == "not computed (pass --labels)"


def test_bin_embedding_counts_and_majority_labels():
    from pumap_dask.plotting import bin_embedding

    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (15000, 2))
    b = rng.normal(20, 1, (15000, 2))
    emb = np.vstack([a, b, [[1e6, 1e6]]]).astype(np.float32)  # one far outlier
    codes = np.r_[np.zeros(15000), np.ones(15000), [-1]].astype(np.int32)
    out = bin_embedding(emb, 64, codes, 2)
    x0, x1, y0, y1 = out["extent"]
    assert x1 < 100 and y1 < 100  # the outlier does not stretch the picture
    assert out["counts"].sum() + out["n_outside"] == emb.shape[0]
    assert 1 <= out["n_outside"] < 100
    assert x1 - x0 == pytest.approx((y1 - y0) * out["counts"].shape[1] / out["counts"].shape[0])
    ny, nx = out["counts"].shape
    width = (x1 - x0) / nx

    def majority_at(x, y):
        return out["majority"][int((y - y0) // width), int((x - x0) // width)]

    assert majority_at(0, 0) == 0 and majority_at(20, 20) == 1
    assert (out["majority"][out["counts"] == 0] == -1).all()


def test_labels_from_anndata_store(anndata_store, data):
    _, y = data
    codes, names = load_labels("obs/cell_type", anndata_store, N)
    assert names == [f"type_{c}" for c in "ABCDE"]
    np.testing.assert_array_equal(codes, y)
    codes, names = load_labels("obs/batch", anndata_store, N)
    assert names == ["0", "1", "2"] and codes[:4].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="no labels 'obs/missing'.*cell_type"):
        load_labels("obs/missing", anndata_store, N)
    codes, names = load_labels(np.array(["b", None, "a"], dtype=object), None, 3)
    assert names == ["None", "a", "b"] and codes.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="600 rows"):
        load_labels(np.zeros(10), None, N)


def test_report_with_anndata_store_and_categorical_labels(model_copy, anndata_store, data,
                                                          tmp_path):
    rep = write_report(model_copy, tmp_path, data=anndata_store, key="obsm/X_pca",
                       labels="obs/cell_type", n_sample=300)
    assert rep["data"]["label_names"] == [f"type_{c}" for c in "ABCDE"]
    assert rep["picture"]["n_labels"] == K
    assert isinstance(rep["metrics"]["label_accuracy"], float)
    page = open(tmp_path / "report.html").read()
    assert "obs/cell_type" in page


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")
def test_report_with_anndata_written_by_anndata(model_copy, data, tmp_path):
    ad = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    X, y = data
    adata = ad.AnnData(X=np.zeros((N, 1), np.float32),
                       obs=pd.DataFrame({"cell_type": pd.Categorical(
                           [f"c{v}" for v in y])}, index=[str(i) for i in range(N)]))
    adata.obsm["X_pca"] = X
    store = str(tmp_path / "a.zarr")
    adata.write_zarr(store)
    rep = write_report(model_copy, tmp_path / "out", data=store, labels="obs/cell_type",
                       n_sample=300)
    assert rep["data"]["label_names"] == [f"c{i}" for i in range(K)]


def test_labels_from_npy_file(model_copy, zarr_array, data, tmp_path):
    _, y = data
    path = str(tmp_path / "labels.npy")
    np.save(path, y)
    rep = write_report(model_copy, tmp_path, data=zarr_array, labels=path, n_sample=300)
    assert rep["data"]["label_names"] == [str(i) for i in range(K)]


def test_many_labels_fall_back_to_density(model_copy, zarr_array, tmp_path):
    labels = np.arange(N) % 40
    rep = write_report(model_copy, tmp_path, data=zarr_array, labels=labels, n_sample=300)
    assert rep["picture"]["coloured_by"] == "density"
    assert rep["picture"]["n_labels"] == 40


def test_wrong_feature_count_fails_before_work(model_copy, tmp_path):
    with pytest.raises(ValueError, match="expecting 16 features"):
        write_report(model_copy, tmp_path, data=np.zeros((50, 3), np.float32))
    assert not os.path.exists(tmp_path / "report.json")


@pytest.mark.parametrize("damage", ["no_weights", "edited_config", "no_dir"])
def test_broken_model_raises_model_file_error(model_copy, damage, tmp_path):
    if damage == "no_weights":
        os.remove(os.path.join(model_copy, "weights.pt"))
    elif damage == "edited_config":
        path = os.path.join(model_copy, CONFIG)
        doc = json.load(open(path))
        doc["fitted"]["n_edges"] += 1
        json.dump(doc, open(path, "w"))
    else:
        model_copy = str(tmp_path / "nowhere")
    with pytest.raises(ModelFileError):
        model_summary(model_copy)
    with pytest.raises(ModelFileError):
        write_report(model_copy, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "report.html")


def test_missing_matplotlib_says_what_to_install(model_copy, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install pumap_dask\[plot\]"):
        write_report(model_copy)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="needs chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(model_copy, anndata_store, tmp_path):
    import matplotlib.image as mpimg

    write_report(model_copy, tmp_path, data=anndata_store, labels="obs/cell_type",
                 n_sample=300)
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,2000",
                    (tmp_path / "report.html").as_uri()],
                   check=True, timeout=90, capture_output=True)
    img = mpimg.imread(str(shot))
    assert img.shape[:2] == (2000, 1280)
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std(axis=0).max() > 0.05  # not a blank page
    # the embedding figure's colours made it onto the page (not only grey text on white)
    saturation = rgb.max(axis=1) - rgb.min(axis=1)
    assert (saturation > 0.3).mean() > 0.001
