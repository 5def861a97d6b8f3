import json
import os

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

import pumap_dask
from pumap_dask import InputError, ModelFileError, NotFittedError, ParametricUMAP

from .conftest import FAST


def _acc(model, blobs):
    Xtr, Xte, ytr, yte = blobs
    clf = KNeighborsClassifier(15).fit(model.embedding_, ytr)
    return clf.score(model.transform(Xte), yte)


def test_fit_transform_quality(fitted, blobs):
    Xtr, Xte = blobs[0], blobs[1]
    assert fitted.embedding_.shape == (len(Xtr), 2)
    assert fitted.embedding_.dtype == np.float32
    out = fitted.transform(Xte)
    assert out.shape == (len(Xte), 2) and np.isfinite(out).all()
    assert _acc(fitted, blobs) >= 0.95
    assert len(fitted.loss_history_) == fitted.n_epochs_
    assert fitted.loss_history_[-1] < fitted.loss_history_[0]


def test_same_seed_identical_different_seed_differs(blobs):
    Xtr = blobs[0]
    a = ParametricUMAP(random_state=7, **FAST).fit_transform(Xtr)
    b = ParametricUMAP(random_state=7, **FAST).fit_transform(Xtr)
    c = ParametricUMAP(random_state=8, **FAST).fit_transform(Xtr)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_random_state_reaches_knn(blobs, monkeypatch):
    seen = {}
    import pumap_dask.knn as knn

    # The spy answers with the exact kNN: the first NN-descent call compiles its numba
    # kernels (pynndescent's about a minute on 2 busy cores, in every process), which made
    # this test take 58 s for a check of one argument. test_nndescent_fit runs the search.
    def spy(X, k, *, random_state=None, **kw):
        seen["random_state"] = random_state
        return knn.exact_knn(X, k, device="cpu")

    monkeypatch.setattr(knn, "nndescent_knn", spy)
    monkeypatch.setattr(knn, "descent_knn", spy)
    ParametricUMAP(random_state=11, knn_method="nndescent", **FAST).fit(blobs[0])
    assert seen["random_state"] == 11


def test_transform_independent_of_batch_size(fitted, blobs):
    Xte = blobs[1]
    a = fitted.transform(Xte, batch_size=7)
    b = fitted.transform(Xte, batch_size=100000)
    assert np.abs(a - b).max() <= 1e-5
    np.testing.assert_array_equal(fitted.transform(Xte), fitted.transform(Xte))


def test_save_load_roundtrip(fitted, blobs, tmp_path):
    path = fitted.save(tmp_path / "model")
    # no copy of the training data unless asked for
    assert sorted(os.listdir(path)) == ["config.json", "embedding.npy", "weights.pt"]
    m = pumap_dask.load(path)
    np.testing.assert_array_equal(m.transform(blobs[1]), fitted.transform(blobs[1]))
    with pytest.raises(pumap_dask.InputError, match="include_training_data=True"):
        m.transform(blobs[1], refine=True)  # no rows stored: the polish says how to get them
    full = pumap_dask.load(fitted.save(tmp_path / "full", include_training_data=True))
    assert "training_data.npy" in os.listdir(full.model_path_)
    # the stored rows let the loaded model polish as this one does
    np.testing.assert_array_equal(full.transform(blobs[1], refine=True),
                                  fitted.transform(blobs[1], refine=True))
    np.testing.assert_array_equal(full.transform(blobs[1]), fitted.transform(blobs[1]))
    np.testing.assert_array_equal(m.embedding_, fitted.embedding_)
    assert m.get_params() == fitted.get_params()
    assert m.loss_history_ == pytest.approx(fitted.loss_history_)
    assert str(m) == str(fitted)


def test_save_overwrites_atomically(fitted, tmp_path):
    path = tmp_path / "model"
    fitted.save(path)
    fitted.save(path)
    assert not [p for p in os.listdir(tmp_path) if p != "model"]


def test_load_errors(fitted, tmp_path):
    with pytest.raises(ModelFileError, match="no saved model"):
        pumap_dask.load(tmp_path / "missing")
    path = fitted.save(tmp_path / "m")
    with open(os.path.join(path, "weights.pt"), "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    with pytest.raises(ModelFileError, match="sha256"):
        pumap_dask.load(path)
    path = fitted.save(tmp_path / "m2")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelFileError, match="corrupt"):
        pumap_dask.load(path)
    path = fitted.save(tmp_path / "m3")
    os.remove(os.path.join(path, "weights.pt"))
    with pytest.raises(ModelFileError, match="incomplete"):
        pumap_dask.load(path)


def test_weights_are_not_pickle(fitted, tmp_path):
    import torch

    path = fitted.save(tmp_path / "m")
    state = torch.load(os.path.join(path, "weights.pt"), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["params"]["n_neighbors"] == 15


def test_summary_lines(fitted, blobs):
    text = str(fitted)
    n, d = blobs[0].shape
    assert text.splitlines()[0] == "Parametric UMAP Model"
    assert f"Samples: {n} | Features: {d} | Embedding dims: 2" in text
    assert "k: 15 | min_dist: 0.100 | spread: 1.0 | knn: exact" in text
    assert "ParametricUMAP(" in repr(ParametricUMAP(n_neighbors=5))


@pytest.mark.parametrize(
    "X, match",
    [
        (np.array([[0.0, np.nan]] * 30), "NaN"),
        (np.array([[0.0, np.inf]] * 30), "NaN or infinite"),
        (np.zeros(30), "2-D"),
        # n-D numpy input (n, *dims) is accepted (tests/test_networks.py); its rows are
        # checked once flattened
        (np.zeros((30, 0, 2)), "0 feature"),
        (np.array([["a", "b"]] * 30), "not numeric"),
        (np.zeros((10, 3)), "n_neighbors=15 needs at least 16"),
    ],
)
def test_bad_input_errors(X, match):
    with pytest.raises(InputError, match=match):
        ParametricUMAP(**FAST).fit(X)


def test_transform_errors(fitted):
    with pytest.raises(InputError, match="X has 7 features, but ParametricUMAP is expecting 16 features"):
        fitted.transform(np.zeros((4, 7), np.float32))
    with pytest.raises(NotFittedError, match="not fitted"):
        ParametricUMAP().transform(np.zeros((4, 7)))
    with pytest.raises(InputError, match="NaN"):
        fitted.transform(np.full((2, 16), np.nan))


@pytest.mark.parametrize("param, value", [("n_neighbors", 0), ("knn_method", "annoy"),
                                          ("set_op_mix_ratio", 2.0), ("min_dist", 5.0),
                                          ("init", "umap"), ("learning_rate", -1.0)])
def test_bad_params(blobs, param, value):
    with pytest.raises(ValueError):
        ParametricUMAP(**{**FAST, param: value}).fit(blobs[0])


def test_duplicates_and_constant_features():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 5)).astype(np.float32)
    X = np.vstack([X, X, X])          # every point three times
    X[:, 2] = 3.0                     # a constant feature
    m = ParametricUMAP(n_neighbors=5, **FAST).fit(X)
    assert np.isfinite(m.embedding_).all()


def test_precomputed_knn(blobs):
    from pumap_dask.knn import exact_knn

    Xtr = blobs[0]
    knn = exact_knn(Xtr, 20)
    a = ParametricUMAP(random_state=1, **FAST).fit(Xtr, knn=knn)
    b = ParametricUMAP(random_state=1, **FAST).fit(Xtr)
    assert a.knn_method_ == "precomputed"
    np.testing.assert_array_equal(a.embedding_, b.embedding_)


@pytest.mark.parametrize("init", ["pca", "random"])
def test_init_and_correlation_loss(blobs, init):
    m = ParametricUMAP(init=init, correlation_weight=0.5, random_state=0, **FAST).fit(blobs[0])
    assert _acc(m, blobs) > 0.9


def test_nndescent_fit(blobs):
    m = ParametricUMAP(knn_method="nndescent", **FAST).fit(blobs[0])
    assert m.knn_method_ == "nndescent"
    assert _acc(m, blobs) > 0.9


def test_fit_from_dask_and_zarr(blobs, tmp_path):
    import dask.array as da
    import zarr

    Xtr = blobs[0]
    ref = ParametricUMAP(random_state=2, **FAST).fit(Xtr).embedding_
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=Xtr.shape, chunks=(100, 16),
                          dtype="float32")
    z[:] = Xtr
    for X in (da.from_array(Xtr, chunks=(64, 8)), z, str(tmp_path / "x.zarr")):
        emb = ParametricUMAP(random_state=2, **FAST).fit(X).embedding_
        np.testing.assert_array_equal(emb, ref)


def test_find_ab_params():
    a, b = pumap_dask.find_ab_params(1.0, 0.5)
    assert a == pytest.approx(0.583, abs=2e-3)
    assert b == pytest.approx(1.334, abs=2e-3)


def test_object_array_of_numbers_and_strings():
    X = np.random.default_rng(0).normal(size=(40, 3)).astype(object)
    ParametricUMAP(n_neighbors=5, **FAST).fit(X)
    with pytest.raises(InputError, match="non-numeric"):
        ParametricUMAP(n_neighbors=5, **FAST).fit(np.array([["a", 1.0]] * 40, dtype=object))


def test_sklearn_estimator_checks():
    """scikit-learn's own estimator checks, on a tiny configuration."""
    from sklearn.utils.estimator_checks import check_estimator

    est = ParametricUMAP(n_neighbors=5, n_epochs=2, batch_size=256, hidden_layers=(8,),
                         device="cpu")
    results = check_estimator(est, on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:300]) for r in results
              if r["status"] == "failed"]
    assert not failed


def test_partitioned_fit_needs_shared_work_dir_with_remote_workers(monkeypatch):
    import distributed

    from pumap_dask.distributed import ddp
    from pumap_dask.pipeline import require_local_workers

    monkeypatch.setattr(distributed, "get_client", lambda: object())
    monkeypatch.setattr(ddp, "eligible_workers",
                        lambda client: ["tcp://10.9.9.9:40000", "tcp://127.0.0.1:40001"])
    with pytest.raises(InputError, match="pass work_dir= on a file system shared"):
        require_local_workers()
