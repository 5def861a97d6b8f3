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
    # scanpy's palette of the categorical column, one colour per category
    root.create_group("uns").create_array("cell_type_colors", data=np.array(PALETTE))
    return path


PALETTE = ["#102030", "#a0b0c0", "#ff0000", "#00aa00", "#0000ff"]


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
    # the fit recorded its versions, start and end and where it ran
    assert {"pumap_dask", "torch", "dask", "numpy", "python"} <= set(s["versions"]["recorded"])
    assert "fit" in s["versions"]["recorded_by"]
    assert s["versions"]["reading_environment"] == {}
    run = s["run"]
    assert run["fit_started"] <= run["fit_finished"] <= run["saved"]
    assert run["cluster"].startswith("in-process")  # no distributed.Client in this test
    assert run["command"] is None  # fitted from Python, no run_config.json
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
    assert re.search(r"^Run$", text, re.M)
    assert re.search(rf"^  fit started\s+{re.escape(s['run']['fit_started'])}$", text, re.M)
    assert re.search(rf"^  saved\s+{re.escape(s['run']['saved'])}$", text, re.M)
    versions = text.split("\nVersions\n")[1].split("\nRun config\n")[0]
    assert "recorded by the fit" in versions and "not recorded" not in versions
    import torch

    assert torch.__version__ in text


def test_model_without_a_fit_record_says_so(model_copy):
    # models saved before fits recorded versions, times and cluster
    _edit_config(model_copy, lambda d: d["fitted"].pop("fit_record"))
    s = model_summary(model_copy)
    assert s["versions"]["recorded"] == {} and s["versions"]["recorded_by"] is None
    assert {"pumap_dask", "torch", "dask", "numpy"} <= set(s["versions"]["reading_environment"])
    text = format_info(s)
    assert re.search(r"^  fit started\s+not recorded$", text, re.M)
    assert "at fit time: not recorded" in text and "reading environment" in text


def test_info_reads_versions_save_time_and_cluster_from_run_config(model_copy):
    # what the CLI writes: run_config.json right after the save ("started" is that time)
    _edit_config(model_copy, lambda d: d["fitted"].pop("fit_record"))
    json.dump({"command": "fit", "argv": ["fit", "in.zarr", "m", "--scheduler-file", "s.json"],
               "started": "2026-01-02T03:04:05+0000", "host": "node7",
               "versions": {"pumap_dask": "9.9.9", "torch": "1.0"},
               "resolved": {"cluster": {"scheduler": "local", "scheduler_file": "/sh/s.json",
                                        "workers": 2, "threads": 1, "memory": "auto"}}},
              open(os.path.join(model_copy, "run_config.json"), "w"))
    s = model_summary(model_copy)
    assert s["versions"]["recorded"] == {"pumap_dask": "9.9.9", "torch": "1.0"}
    assert "run_config.json" in s["versions"]["recorded_by"]
    assert s["run"]["saved"] == "2026-01-02T03:04:05+0000" and s["run"]["host"] == "node7"
    assert s["run"]["cluster"] == "scheduler file /sh/s.json"
    assert s["run"]["command"] == "pumap-dask fit in.zarr m --scheduler-file s.json"
    text = format_info(s)
    assert re.search(r"^  saved\s+2026-01-02T03:04:05\+0000$", text, re.M)
    assert re.search(r"^  fit started\s+not recorded$", text, re.M)
    assert '"started"' not in text  # the save time is never called the start
    assert re.search(r"^  cluster\s+scheduler file /sh/s.json$", text, re.M)
    assert '"scheduler": "local"' not in text  # the default a scheduler file overrode
    versions = text.split("\nVersions\n")[1].split("\nRun config\n")[0]
    assert "9.9.9" in versions and "not recorded" not in versions.split("reading")[0]


def test_cluster_text_names_the_cluster_used():
    from pumap_dask.report_format import cluster_text

    remote = {"kind": "remote scheduler", "address": "tcp://10.0.0.1:8786", "n_workers": 4}
    assert cluster_text(remote, {"scheduler": "local", "scheduler_file": "/s.json"}) == \
        "scheduler file /s.json (scheduler tcp://10.0.0.1:8786, 4 workers)"
    assert cluster_text(remote, None) == "scheduler tcp://10.0.0.1:8786 (4 workers)"
    local = {"kind": "local", "address": "tcp://127.0.0.1:1", "n_workers": 2}
    assert cluster_text(local, {"scheduler": "local", "workers": 2, "threads": 3,
                                "memory": "4GiB"}) == ("local cluster, 2 x 3 threads, memory "
                                                       "4GiB each (scheduler "
                                                       "tcp://127.0.0.1:1, 2 workers)")
    assert cluster_text({"kind": "in-process", "scheduler": "threads"}, None).startswith(
        "in-process")
    assert cluster_text(None, {"scheduler": "threads"}).startswith("in-process")
    assert cluster_text(None, None) == "not recorded"


def test_fit_record_names_a_distributed_client():
    distributed = pytest.importorskip("distributed")
    from pumap_dask.state import active_cluster, fit_record

    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                            dashboard_address=":0") as client:
        rec = fit_record({"knn": 1.5, "train": 2.0})
        assert rec["cluster"] == {"kind": "local", "address": client.scheduler.address,
                                  "n_workers": 1}
    assert rec["wall_s"] == 3.5 and rec["started"] < rec["finished"]
    assert active_cluster()["kind"] == "in-process"


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
    assert doc["picture"]["n_points"] == N and doc["picture"]["view"] == "scatter"
    assert doc["picture"]["coloured_by"] == "one colour" and doc["query"] is None
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
    assert rep["picture"]["coloured_by"] == "label" and rep["picture"]["view"] == "scatter"
    assert rep["picture"]["n_labels"] == K
    assert [e["count"] for e in rep["picture"]["legend"]] == np.bincount(y).tolist()
    page = open(tmp_path / "report.html").read()
    assert "kNN preservation</span>" in page  # a card beside the accuracy's
    assert "15-NN label accuracy</span>" in page
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
    # the store's own palette (uns/cell_type_colors), in the categories' order
    assert [e["color"] for e in rep["picture"]["legend"]] == PALETTE
    assert "cell_type colours of the AnnData store" in rep["picture"]["palette"]
    page = open(tmp_path / "report.html").read()
    assert "obs/cell_type" in page
    # plain obs arrays have no palette in AnnData: the report's own
    rep = write_report(model_copy, tmp_path, data=anndata_store, labels="obs/batch",
                       n_sample=300)
    assert rep["picture"]["palette"] == "tab10/tab20"


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")
def test_report_with_anndata_written_by_anndata(model_copy, data, tmp_path):
    ad = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    X, y = data
    adata = ad.AnnData(X=np.zeros((N, 1), np.float32),
                       obs=pd.DataFrame({"cell_type": pd.Categorical(
                           [f"c{v}" for v in y])}, index=[str(i) for i in range(N)]))
    adata.obsm["X_pca"] = X
    adata.uns["cell_type_colors"] = np.array(PALETTE, dtype=object)
    store = str(tmp_path / "a.zarr")
    adata.write_zarr(store)
    rep = write_report(model_copy, tmp_path / "out", data=store, labels="obs/cell_type",
                       n_sample=300)
    assert rep["data"]["label_names"] == [f"c{i}" for i in range(K)]
    assert [e["color"] for e in rep["picture"]["legend"]] == PALETTE


def test_labels_from_npy_file(model_copy, zarr_array, data, tmp_path):
    _, y = data
    path = str(tmp_path / "labels.npy")
    np.save(path, y)
    rep = write_report(model_copy, tmp_path, data=zarr_array, labels=path, n_sample=300)
    assert rep["data"]["label_names"] == [str(i) for i in range(K)]


def test_many_labels_are_not_coloured(model_copy, zarr_array, tmp_path):
    labels = np.arange(N) % 40
    rep = write_report(model_copy, tmp_path, data=zarr_array, labels=labels, n_sample=300)
    assert rep["picture"]["coloured_by"] == "one colour"
    assert rep["picture"]["n_labels"] == 40 and "legend" not in rep["picture"]
    # above scatter_max: the histogram's density
    rep = write_report(model_copy, tmp_path, data=zarr_array, labels=labels, n_sample=300,
                       scatter_max=100)
    assert rep["picture"]["coloured_by"] == "density" and rep["picture"]["view"] == "histogram"


def test_many_points_are_a_histogram_whose_bins_grow_with_n(model_copy, zarr_array, data,
                                                            tmp_path):
    from pumap_dask.report import hist_bins

    _, y = data
    assert hist_bins(5000, 512) == 64  # not 282 x 189 bins for 5k points (speckled)
    assert hist_bins(400_000, 512) == 316 and hist_bins(10 ** 8, 512) == 512
    assert hist_bins(10 ** 6, 32) == 32
    rep = write_report(model_copy, tmp_path, data=zarr_array, labels=y, n_sample=300,
                       scatter_max=100)
    pic = rep["picture"]
    assert pic["view"] == "histogram" and pic["coloured_by"] == "majority label per bin"
    assert max(pic["bins"]) == 64 and len(pic["legend"]) == K
    assert rep["figures"] == ["embedding", "embedding_density", "loss", "timings"]


def test_long_labels_are_wrapped_in_the_figure_and_whole_in_the_page(model_copy, zarr_array,
                                                                      data, tmp_path):
    from pumap_dask.plotting import LEGEND_WIDTH, legend_label

    long = "CD14-positive, CD16-negative classical monocyte of the peripheral blood"
    short = legend_label(long)
    assert short.count("\n") == 1 and short.endswith("\u2026")
    assert all(len(line) <= LEGEND_WIDTH for line in short.split("\n"))
    assert legend_label("B cell") == "B cell"
    _, y = data
    names = np.array([long, "B cell", "natural killer cell", "platelet", "erythrocyte"])
    write_report(model_copy, tmp_path, data=zarr_array, labels=names[y], n_sample=300)
    page = open(tmp_path / "report.html").read()
    assert f'<span class="ln">{long}</span>' in page and f'title="{long}: ' in page


def test_query_panel_and_metrics(model_copy, zarr_array, data, tmp_path):
    X, y = data
    qpath = str(tmp_path / "q.zarr")
    zarr.create_array(qpath, shape=(200, D), chunks=(100, D), dtype="float32")[:] = X[:200]
    qlab = str(tmp_path / "qlab.npy")
    np.save(qlab, y[:200])
    rep = write_report(model_copy, tmp_path / "out", data=zarr_array, labels=y, query=qpath,
                       query_labels=qlab, n_sample=300)
    q = rep["query"]
    assert "query" in rep["figures"] and q["n_rows"] == 200 and q["embedded_here"]
    assert q["picture"]["reference_drawn"] == N and q["picture"]["coloured_by"] == "label"
    # a label the reference has keeps the reference's colour
    assert [e["color"] for e in q["picture"]["legend"]] == \
        [e["color"] for e in rep["picture"]["legend"]]
    assert isinstance(q["metrics"]["trustworthiness"], float)
    assert isinstance(q["metrics"]["knn_preservation"], float)
    assert q["metrics"]["label_transfer_accuracy"] >= 0.9  # the training rows themselves
    page = open(tmp_path / "out" / "report.html").read()
    assert "<h2>Query data</h2>" in page and page.count("data:image/png;base64,") == 4


def test_query_that_is_a_transform_output(model_copy, data, tmp_path):
    from pumap_dask.writers import transform_to_zarr

    X, _ = data
    out = str(tmp_path / "emb.zarr")
    transform_to_zarr(X[:150], model_copy, out)
    rep = write_report(model_copy, tmp_path / "rep", query=out)
    q = rep["query"]
    assert not q["embedded_here"] and q["n_rows"] == 150
    assert q["metrics"]["trustworthiness"].startswith("not computed")
    assert q["metrics"]["label_transfer_accuracy"] == "not computed (pass --query-labels)"
    # an embedding another model wrote is refused
    _edit_config(model_copy, lambda d: d.__setitem__("weights_sha256", "0" * 64))
    with pytest.raises(ModelFileError):  # (the edited model itself no longer verifies)
        write_report(model_copy, tmp_path / "rep", query=out)


def test_query_errors(model_copy, tmp_path):
    from pumap_dask.errors import ParameterError

    with pytest.raises(ParameterError, match="query_labels needs query"):
        write_report(model_copy, tmp_path, query_labels="obs/x")
    with pytest.raises(ValueError, match="expecting 16 features"):
        write_report(model_copy, tmp_path, query=np.zeros((20, 3), np.float32))


def test_report_cli_with_query(model_copy, zarr_array, tmp_path, capsys):
    from pumap_dask.cli import main

    code = main(["report", model_copy, "--query", zarr_array, "--out", str(tmp_path / "r"),
                 "--sample", "200", "-q"])
    assert code == 0, capsys.readouterr().err
    doc = json.load(open(tmp_path / "r" / "report.json"))
    assert doc["query"]["n_rows"] == N and "query" in doc["figures"]
    assert main(["report", model_copy, "--query-labels", "obs/x", "-q"]) == 2
    assert "--query-labels" in capsys.readouterr().err


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
                 n_sample=300, query=anndata_store, query_labels="obs/cell_type")
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
