"""Continued training (fit(init_model=), partial_fit) and landmarks (issue 11)."""

import numpy as np
import pytest
import torch

from pumap_dask import ParametricUMAP, pipeline
from pumap_dask.landmarks import Landmarks
from pumap_dask.continued import check_architecture, resolve_init_model
from pumap_dask.params import landmark_positions
from pumap_dask.train import TrainConfig, train_encoder

from .conftest import FAST


def _state(model):
    return {k: v.clone() for k, v in model.encoder_.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def no_stage(monkeypatch):
    """Make the first stage fail loudly: a check that passes it ran too late."""
    def boom(*a, **k):
        raise AssertionError("a stage ran before the arguments were checked")

    monkeypatch.setattr(pipeline, "run_knn", boom)


# ------------------------------------------------------------------ init_model
def test_init_model_from_estimator(blobs, fitted):
    before = _state(fitted)
    fresh = ParametricUMAP(random_state=5, **FAST).fit(blobs[0])
    cont = ParametricUMAP(random_state=5, **FAST).fit(blobs[0], init_model=fitted)
    assert cont.init_ == "model"
    # starts from a trained encoder: the first epoch's loss is already low
    assert cont.loss_history_[0] < fresh.loss_history_[0]
    assert cont.loss_history_[0] < fitted.loss_history_[0]
    assert _same_state(before, _state(fitted))  # init_model itself is not trained
    assert cont.encoder_ is not fitted.encoder_
    # the fixed preprocessing is the old model's
    for name in ("center", "scale", "projection"):
        if hasattr(fitted.encoder_, name):
            assert torch.equal(getattr(cont.encoder_, name), getattr(fitted.encoder_, name))


def test_init_model_from_saved_path(blobs, fitted, tmp_path):
    path = fitted.save(tmp_path / "m")
    from_path = ParametricUMAP(random_state=5, **FAST).fit(blobs[0], init_model=path)
    from_est = ParametricUMAP(random_state=5, **FAST).fit(blobs[0], init_model=fitted)
    assert from_path.init_ == "model"
    # the same starting weights give the same result, bitwise on the CPU
    np.testing.assert_array_equal(from_path.embedding_, from_est.embedding_)
    assert from_path.loss_history_ == from_est.loss_history_


def test_init_model_architecture_mismatch(blobs, fitted, no_stage):
    X = blobs[0]
    with pytest.raises(ValueError, match="hidden_layers"):
        ParametricUMAP(**{**FAST, "hidden_layers": (16, 16)}).fit(X, init_model=fitted)
    with pytest.raises(ValueError, match="n_components"):
        ParametricUMAP(n_components=3, **FAST).fit(X, init_model=fitted)
    with pytest.raises(ValueError, match="n_features"):
        ParametricUMAP(**FAST).fit(X[:, :8], init_model=fitted)


def test_init_model_bad_values(blobs, tmp_path, no_stage):
    from pumap_dask import ModelFileError

    X = blobs[0]
    with pytest.raises(ValueError, match="not fitted"):
        ParametricUMAP(**FAST).fit(X, init_model=ParametricUMAP())
    with pytest.raises(ValueError, match="init_model must be"):
        ParametricUMAP(**FAST).fit(X, init_model=42)
    with pytest.raises(ModelFileError):
        ParametricUMAP(**FAST).fit(X, init_model=tmp_path / "nothing")
    with pytest.raises(ValueError, match="train_world_size"):
        ParametricUMAP(train_world_size=2, **FAST).fit(X, init_model=tmp_path)


def test_check_architecture_projection(fitted):
    enc = resolve_init_model(fitted)
    params = {**fitted.get_params(), "n_projection": 8}  # 8 < 16 features: a projection
    with pytest.raises(ValueError, match="n_projection"):
        check_architecture(enc, enc.n_features, params)
    check_architecture(enc, enc.n_features, fitted.get_params())  # passes


# ------------------------------------------------------------------ partial_fit
def test_partial_fit_changes_model(blobs, fitted):
    X_new = blobs[1]  # the held-out rows
    m = ParametricUMAP(random_state=3, **FAST).fit(blobs[0])
    before = _state(m)
    ret = m.partial_fit(X_new)
    assert ret is m and m.init_ == "model"
    after = _state(m)
    assert not torch.equal(before["mlp.0.weight"], after["mlp.0.weight"])
    assert torch.equal(before["center"], after["center"])  # preprocessing kept
    assert torch.equal(before["scale"], after["scale"])
    assert m.n_samples_fit_ == len(X_new)
    assert m.embedding_.shape == (len(X_new), 2)
    assert m.n_epochs_run_ == len(m.loss_history_) == FAST["n_epochs"]
    np.testing.assert_allclose(m.transform(X_new, refine=False), m.embedding_, atol=1e-5)


def test_partial_fit_unfitted_is_fit_then_checks_features(blobs, fitted):
    m = ParametricUMAP(random_state=3, **FAST).partial_fit(blobs[0])
    np.testing.assert_array_equal(m.embedding_, fitted.embedding_)  # a plain fit
    assert m.init_ == fitted.init_
    with pytest.raises(ValueError, match="X has 8 features, but init_model is expecting 16"):
        m.partial_fit(blobs[1][:, :8])


# ------------------------------------------------------------------ landmarks
def _targets(fitted, n, k=100, shift=3.0):
    pos = np.full((n, 2), np.nan, np.float32)
    pos[:k] = fitted.embedding_[:k] + shift  # away from where the encoder puts them
    return pos


def test_landmarks_pin_points(blobs, fitted):
    X = blobs[0]
    pos = _targets(fitted, len(X))
    dist = {}
    for w in (0.0, 10.0):
        m = ParametricUMAP(random_state=5, landmark_loss_weight=w, **FAST)
        m.fit(X, init_model=fitted, landmark_positions=pos)
        dist[w] = np.linalg.norm(m.embedding_[:100] - pos[:100], axis=1)
    spread = fitted.embedding_.std(0).mean()
    assert np.median(dist[10.0]) < 0.1 * spread
    assert np.median(dist[10.0]) < 0.2 * np.median(dist[0.0])


def test_landmarks_deterministic_and_alias(blobs, fitted):
    X = blobs[0]
    pos = _targets(fitted, len(X), k=50)
    a = ParametricUMAP(random_state=5, **FAST).fit(X, init_model=fitted,
                                                   landmark_positions=pos)
    b = ParametricUMAP(random_state=5, **FAST).fit(X, init_model=fitted, landmarks=pos)
    np.testing.assert_array_equal(a.embedding_, b.embedding_)


def test_nan_landmarks_equal_no_landmarks(blobs):
    X = blobs[0]
    nan = np.full((len(X), 2), np.nan)
    a = ParametricUMAP(random_state=5, **FAST).fit(X)
    b = ParametricUMAP(random_state=5, **FAST).fit(X, landmark_positions=nan)
    np.testing.assert_array_equal(a.embedding_, b.embedding_)
    assert a.loss_history_ == b.loss_history_


def test_landmarks_bad_values_fail_before_any_stage(blobs, no_stage):
    X = blobs[0]
    n = len(X)
    m = ParametricUMAP(**FAST)
    with pytest.raises(ValueError, match=r"shape \(%d, 2\)" % n):
        m.fit(X, landmark_positions=np.zeros((n - 1, 2)))
    with pytest.raises(ValueError, match="shape"):
        m.fit(X, landmark_positions=np.zeros((n, 3)))
    partial = np.full((n, 2), np.nan)
    partial[4, 0] = 1.0
    with pytest.raises(ValueError, match="row 4 is NaN in some"):
        m.fit(X, landmark_positions=partial)
    inf = np.full((n, 2), np.nan)
    inf[7] = [np.inf, 0]
    with pytest.raises(ValueError, match="row 7 is infinite"):
        m.fit(X, landmark_positions=inf)
    with pytest.raises(ValueError, match="numeric"):
        m.fit(X, landmark_positions=[["a", "b"]] * n)
    with pytest.raises(ValueError, match="not both"):
        m.fit(X, landmark_positions=np.zeros((n, 2)), landmarks=np.zeros((n, 2)))
    with pytest.raises(ValueError, match="landmark_loss_weight"):
        ParametricUMAP(landmark_loss_weight=-1.0, **FAST).fit(X)
    with pytest.raises(ValueError, match="landmark_loss_weight"):
        ParametricUMAP(landmark_loss_weight=float("nan"), **FAST).fit(X)
    with pytest.raises(ValueError, match="train_world_size"):
        ParametricUMAP(train_world_size=2, **FAST).fit(X, landmark_positions=np.zeros((n, 2)))


def test_landmark_positions_validator():
    assert landmark_positions(None, 5, 2) is None
    assert landmark_positions(np.full((5, 2), np.nan), 5, 2) is None
    pos = np.full((5, 2), np.nan)
    pos[[1, 3]] = [[1, 2], [3, 4]]
    rows, p = landmark_positions(pos, 5, 2)
    np.testing.assert_array_equal(rows, [1, 3])
    assert p.dtype == np.float32 and p.tolist() == [[1, 2], [3, 4]]


def test_landmark_weight_saved(fitted, tmp_path):
    m = ParametricUMAP(landmark_loss_weight=0.25, random_state=3, **FAST)
    m.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    loaded = ParametricUMAP.load(m.save(tmp_path / "m"))
    assert loaded.landmark_loss_weight == 0.25


def test_checkpoint_not_resumed_across_start_points(fitted, blobs, tmp_path):
    """A checkpoint of a fresh run is not resumed by continued training (nor one of other
    landmarks), as the starting weights differ."""
    X = blobs[0]
    graph = fitted.graph_.tocoo()
    cfg = TrainConfig(n_epochs=2, batch_size=1024, hidden_layers=(32, 32),
                      checkpoint_dir=str(tmp_path), init_steps=0)
    train_encoder(X, graph.row, graph.col, graph.data, cfg)
    enc, _ = train_encoder(X, graph.row, graph.col, graph.data, cfg)
    assert enc.start_epoch_ == 2  # same configuration: resumed (nothing left to run)
    start = resolve_init_model(fitted)
    enc, hist = train_encoder(X, graph.row, graph.col, graph.data, cfg, start,
                              from_model=True)
    assert enc.start_epoch_ == 0 and len(hist) == 2
    lm = Landmarks(np.arange(10), np.zeros((10, 2), np.float32), 1.0)
    enc, hist = train_encoder(X, graph.row, graph.col, graph.data, cfg,
                              resolve_init_model(fitted), from_model=True, landmarks=lm)
    assert enc.start_epoch_ == 0


def test_init_model_with_custom_encoder(blobs):
    """Continued training of a custom network (pumap_dask.networks), by factory name."""
    if "encoder" not in ParametricUMAP().get_params():
        pytest.skip("custom networks not available")
    X = blobs[0]
    kw = {**FAST, "encoder": "tests.nets_for_tests:make_encoder"}
    old = ParametricUMAP(random_state=3, **kw).fit(X)
    cont = ParametricUMAP(random_state=5, **kw).fit(X, init_model=old)
    assert cont.init_ == "model" and cont.loss_history_[0] < old.loss_history_[0]
    with pytest.raises(ValueError, match="custom encoder"):
        ParametricUMAP(**FAST).fit(X, init_model=old)


# ------------------------------------------------------------------ add_landmarks
def _drift_data():
    """New data from another distribution: continued training on it moves old points."""
    from pumap_dask.datasets import clusters

    return clusters(n_samples=400, n_features=16, n_clusters=5, random_state=7)[0]


def test_add_landmarks_keeps_old_points_in_place(blobs, fitted):
    import copy

    A, B = blobs[0], _drift_data()
    spread = fitted.embedding_.std(0).mean()
    drift = {}
    for keep in (True, False):  # the kept rows' ids first, for both runs
        m = copy.deepcopy(fitted)
        if keep:
            assert m.add_landmarks(A, sample_pct=0.2) is None
            assert m.landmark_loss_weight == 0.01  # umap-learn's default, set on the model
            ids = m.landmark_idx_
            assert len(ids) == int(0.2 * len(A)) and m.landmark_X_.shape == (len(ids), 16)
            np.testing.assert_allclose(m.landmark_positions_,
                                       fitted.transform(A[ids], refine=False), atol=1e-6)
        before = m.transform(A[ids], refine=False)
        m.partial_fit(B)
        # the result describes B alone, the appended landmark rows dropped
        assert m.n_samples_fit_ == len(B) and m.embedding_.shape == (len(B), 2)
        assert m.graph_.shape == (len(B), len(B))
        np.testing.assert_allclose(m.transform(B, refine=False), m.embedding_, atol=1e-5)
        drift[keep] = np.median(np.linalg.norm(m.transform(A[ids], refine=False) - before,
                                               axis=1)) / spread
        if keep:  # landmarks persist through continued fits until remove_landmarks()
            assert m.landmark_X_ is not None and len(m.landmark_idx_) == len(ids)
            m.remove_landmarks()
            assert not hasattr(m, "landmark_X_")
            m.remove_landmarks()  # nothing kept: no error
    assert drift[True] < 0.3 * drift[False], drift


def test_add_landmarks_predetermined_merge_and_fresh_fit(blobs, fitted, caplog):
    import copy

    A, B = blobs[0], blobs[1]
    m = copy.deepcopy(fitted)
    m.add_landmarks(A, sample_mode="predetermined", idx=[5, 1, 9], landmark_loss_weight=0.5)
    assert m.landmark_idx_.tolist() == [1, 5, 9] and m.landmark_loss_weight == 0.5
    # landmark_positions for B's rows are merged with the kept ones
    pos = np.full((len(B), 2), np.nan, np.float32)
    pos[:3] = 0.0
    m.fit(B, init_model=m, landmark_positions=pos, y=np.zeros(len(B), int))
    assert m.embedding_.shape == (len(B), 2) and m.init_ == "model"
    with pytest.raises(ValueError, match=r"shape \(%d, 2\)" % len(B)):
        m.partial_fit(B, landmark_positions=np.zeros((len(B) + 3, 2)))
    with pytest.raises(ValueError, match="remove_landmarks"):
        m.partial_fit(B, knn=(np.zeros((len(B), 15), int), np.zeros((len(B), 15))))
    # a fresh fit starts afresh: the landmarks are dropped, with a warning
    caplog.set_level("WARNING", logger="pumap_dask")
    m.fit(B)
    assert "dropping the 3 landmarks" in caplog.text and not hasattr(m, "landmark_X_")


def test_add_landmarks_lazy_input(blobs, fitted):
    import copy

    import dask.array as da

    A, B = blobs[0], blobs[1]
    m = copy.deepcopy(fitted)
    m.add_landmarks(da.from_array(A, chunks=(100, 16)), sample_pct=0.1)
    np.testing.assert_array_equal(m.landmark_X_, A[m.landmark_idx_])
    m.partial_fit(da.from_array(B, chunks=(50, 16)))  # the kept rows: one more block
    assert m.n_samples_fit_ == len(B) and m.embedding_.shape == (len(B), 2)


def test_add_landmarks_errors(blobs, fitted):
    import copy

    from pumap_dask.errors import NotFittedError

    A = blobs[0]
    with pytest.raises(NotFittedError, match="not fitted"):
        ParametricUMAP(**FAST).add_landmarks(A)
    m = copy.deepcopy(fitted)
    for kw, needle in (({"sample_pct": 0.0}, "sample_pct"), ({"sample_pct": 1.5}, "sample_pct"),
                       ({"sample_pct": 1e-4}, "picks no landmark row"),
                       ({"sample_mode": "predefined"}, "sample_mode must be one of"),
                       ({"sample_mode": "predetermined"}, "needs idx"),
                       ({"sample_mode": "predetermined", "idx": [0, len(A)]}, "outside"),
                       ({"sample_mode": "predetermined", "idx": [1, 1]}, "more than once"),
                       ({"sample_mode": "predetermined", "idx": [0.5]}, "integer row ids"),
                       ({"landmark_loss_weight": -1}, "landmark_loss_weight")):
        with pytest.raises(ValueError, match=needle):
            m.add_landmarks(A, **kw)
    assert not hasattr(m, "landmark_X_")  # nothing kept after a failed call
    with pytest.raises(ValueError, match="features"):
        m.add_landmarks(A[:, :8])


# ------------------------------------------------------------------ decoder carried over
RECON = dict(FAST, parametric_reconstruction=True)


@pytest.fixture(scope="module")
def recon_old(blobs):
    """A small model fitted with a decoder (shared, treat as read-only)."""
    return ParametricUMAP(random_state=3, **RECON).fit(blobs[0])


def test_continued_training_carries_the_decoder(blobs, recon_old, tmp_path):
    import copy

    from pumap_dask.reconstruction import reconstruction_error

    X = blobs[0]
    old = copy.deepcopy(recon_old)
    start = {k: v.clone() for k, v in old.decoder_.state_dict().items()}
    # a negligible learning rate: the decoder's weights stay where they started
    tiny = dict(RECON, n_epochs=1, learning_rate=1e-9)
    cont = ParametricUMAP(random_state=5, **tiny).fit(X, init_model=old)
    assert cont.decoder_ is not old.decoder_
    for k, v in cont.decoder_.state_dict().items():
        torch.testing.assert_close(v, start[k], atol=1e-5, rtol=0)
    assert _same_state(start, old.decoder_.state_dict())  # init_model's decoder not trained
    fresh = ParametricUMAP(random_state=5, **tiny).fit(X, init_model=resolve_init_model(old))
    err = {name: reconstruction_error(m.encoder_, m.decoder_, X)
           for name, m in (("old", old), ("cont", cont), ("fresh", fresh))}
    assert err["cont"] < 1.05 * err["old"] and err["cont"] < 0.5 * err["fresh"], err
    # from a saved model directory: the same starting decoder, bitwise the same result
    path = old.save(tmp_path / "m")
    from_path = ParametricUMAP(random_state=5, **tiny).fit(X, init_model=path)
    assert _same_state(from_path.decoder_.state_dict(), cont.decoder_.state_dict())
    # partial_fit carries it too
    old.partial_fit(blobs[1])
    assert old.decoder_ is not None and len(old.reconstruction_history_) == FAST["n_epochs"]


def test_decoder_architecture_mismatch(blobs, recon_old, no_stage):
    X = blobs[0]
    with pytest.raises(ValueError, match="init_model's decoder does not match.*"
                                         "reconstruction_loss"):
        ParametricUMAP(**dict(RECON, reconstruction_loss="bce")).fit(X, init_model=recon_old)
    with pytest.raises(ValueError, match="parametric_reconstruction=False"):
        ParametricUMAP(**dict(RECON, decoder="tests.nets_for_tests:make_decoder")).fit(
            X, init_model=recon_old)
