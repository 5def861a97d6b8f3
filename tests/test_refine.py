"""transform(X, refine=True): UMAP-style polish of new points (issue 11, pumap_dask.refine)."""

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from pumap_dask import InputError, ParametricUMAP, load
from pumap_dask.refine import (RefineReference, keep_training_rows, optimize_new_points,
                               refine_embedding, sample_ids, stored_reference)

from .conftest import FAST


@pytest.fixture(scope="module")
def digits_fit(digits):
    X, y = digits
    rng = np.random.default_rng(0)
    p = rng.permutation(len(X))
    tr, te = np.sort(p[:1200]), np.sort(p[1200:])
    model = ParametricUMAP(random_state=0, **FAST).fit(X[tr])
    return model, X[tr], y[tr], X[te], y[te]


def _acc(model, ytr, Z, yte):
    return KNeighborsClassifier(15).fit(model.embedding_, ytr).score(Z, yte)


def test_refine_improves_heldout_accuracy(digits_fit):
    model, Xtr, ytr, Xte, yte = digits_fit
    plain = model.transform(Xte, refine=False)
    refined = model.transform(Xte, refine=True)
    assert refined.shape == plain.shape and refined.dtype == np.float32
    a0, a1 = _acc(model, ytr, plain, yte), _acc(model, ytr, refined, yte)
    assert a1 >= a0 + 0.01, (a0, a1)
    assert a1 >= 0.93
    # the default is the encoder alone: the polish is opt-in
    np.testing.assert_array_equal(model.transform(Xte), plain)


def test_default_transform_is_the_encoder_for_every_container(digits_fit):
    model, Xtr, _, Xte, _ = digits_fit
    plain = model.transform(Xte[:40], refine=False)
    np.testing.assert_array_equal(model.transform(Xte[:40]), plain)
    assert not np.array_equal(model.transform(Xte[:40], refine=True), plain)
    with dask.config.set(scheduler="threads"):
        lazy = model.transform(da.from_array(Xte[:40], chunks=20)).compute()
    np.testing.assert_array_equal(lazy, plain)
    for bad in ("auto", "yes", 1):
        with pytest.raises(ValueError, match="refine must be True"):
            model.transform(Xte[:5], refine=bad)


def test_training_rows_keep_their_training_position(digits_fit):
    """As umap-learn's transform of the training data: a row equal to a training row keeps
    the encoder's output (scikit-learn's fit_transform == fit().transform check)."""
    model, Xtr, _, Xte, _ = digits_fit
    mixed = np.concatenate([Xtr[:30], Xte[:30]])
    out = model.transform(mixed, refine=True)
    np.testing.assert_array_equal(out[:30], model.transform(Xtr[:30], refine=False))
    np.testing.assert_allclose(out[:30], model.embedding_[:30], atol=1e-4)
    assert not np.array_equal(out[30:], model.transform(Xte[:30], refine=False))


def test_refine_dask_equals_numpy_stays_lazy_and_chunk_independent(digits_fit):
    model, _, _, Xte, _ = digits_fit
    Xte = Xte[:200]
    ref = model.transform(Xte, refine=True, refine_epochs=20)
    calls = []

    def block(b):
        if len(b):  # dask probes the function with an empty block for meta
            calls.append(len(b))
        return b

    outs = []
    for chunks in (50, 77):
        darr = da.from_array(Xte, chunks=(chunks, -1)).map_blocks(block, dtype=np.float32)
        lazy = model.transform(darr, refine=True, refine_epochs=20)
        assert isinstance(lazy, da.Array) and not calls  # nothing computed yet
        assert lazy.shape == (200, 2) and lazy.chunks[0] == darr.chunks[0]
        with dask.config.set(scheduler="threads"):
            outs.append(lazy.compute())
        assert calls
        calls.clear()
    for out in outs:
        np.testing.assert_allclose(out, ref, atol=1e-4)


def test_refine_needs_training_rows(digits_fit, tmp_path):
    model, Xtr, _, Xte, _ = digits_fit
    bare = load(model.save(tmp_path / "bare", include_training_data=False))
    with pytest.raises(InputError, match="include_training_data=True"):
        bare.transform(Xte[:5], refine=True)
    # the rows can be given explicitly, but must be the fitted ones
    with pytest.raises(InputError, match="rows"):
        bare.transform(Xte[:5], refine=True, training_data=Xtr[:10])
    np.testing.assert_allclose(
        bare.transform(Xte[:20], refine=True, training_data=Xtr, refine_epochs=10),
        model.transform(Xte[:20], refine=True, refine_epochs=10), atol=1e-5)
    lazy_fit = ParametricUMAP(random_state=0, **FAST).fit(da.from_array(Xtr, chunks=400))
    with pytest.raises(InputError, match="training rows"):
        lazy_fit.transform(Xte[:5], refine=True)
    with pytest.raises(InputError, match="training rows"):
        lazy_fit.save(tmp_path / "x", include_training_data=True)


def test_saved_training_data_round_trip(digits_fit, tmp_path):
    model, Xtr, _, Xte, _ = digits_fit
    path = model.save(tmp_path / "m", include_training_data=True)
    assert stored_reference(model.save(tmp_path / "plain", include_training_data=False)) is None
    assert stored_reference(model.save(tmp_path / "default")) is None  # opt-in only
    loaded = load(path)
    np.testing.assert_allclose(loaded.transform(Xte[:30], refine=True, refine_epochs=10),
                               model.transform(Xte[:30], refine=True, refine_epochs=10),
                               atol=1e-5)


def test_training_row_sample_is_reproducible():
    X = np.arange(60, dtype=np.float32).reshape(30, 2)
    rows, ids = keep_training_rows(X, max_rows=10, seed=4)
    assert rows.shape == (10, 2) and ids.shape == (10,)
    np.testing.assert_array_equal(ids, sample_ids(30, 10, 4))
    np.testing.assert_array_equal(rows, X[ids])
    assert keep_training_rows(X, max_rows=30)[1] is None
    assert keep_training_rows(da.from_array(X)) is None


def test_optimize_pulls_points_to_their_neighbours():
    rng = np.random.default_rng(0)
    E = np.concatenate([rng.normal(0, 0.3, (50, 2)), rng.normal(10, 0.3, (50, 2))])
    E = E.astype(np.float32)
    init = np.array([[5.0, 5.0], [-3.0, 2.0]], np.float32)
    ind = np.array([np.arange(50, 65), np.arange(0, 15)])
    w = np.ones((2, 15), np.float32)
    out = optimize_new_points(init, E, ind, w, a=1.58, b=0.9, n_epochs=50)
    assert np.linalg.norm(out[0] - 10) < 2.0 and np.linalg.norm(out[1]) < 2.0
    np.testing.assert_array_equal(optimize_new_points(init, E, ind, w, a=1.58, b=0.9,
                                                      n_epochs=0), init)
    # a row's result does not depend on the other rows in its block
    one = optimize_new_points(init[1:], E, ind[1:], w[1:], a=1.58, b=0.9, n_epochs=50,
                              row_ids=np.array([1]))
    np.testing.assert_allclose(one[0], out[1], atol=1e-6)


def test_non_finite_rows_are_left_alone():
    ref = RefineReference(np.eye(20, 3, dtype=np.float32), np.zeros((20, 2), np.float32),
                          1.58, 0.9, 5)
    init = np.array([[np.nan, np.nan], [1.0, 1.0]], np.float32)
    out = refine_embedding(np.ones((2, 3), np.float32), init, ref, n_epochs=5)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
