"""Per-epoch callbacks and early stopping."""

import math

import numpy as np
import pytest
import torch
from sklearn.base import clone

from pumap_dask import EarlyStopping, ParametricUMAP, load
from pumap_dask.train import TrainConfig, train_encoder

from .conftest import FAST


def _feed(cb, losses):
    """Epochs after which ``cb`` asked to stop (None: never)."""
    for epoch, loss in enumerate(losses):
        if cb(epoch, loss, None):
            return epoch
    return None


def test_early_stopping_rule():
    # steadily improving by 1% per epoch: never stops
    assert _feed(EarlyStopping(patience=2, min_delta=1e-3), 10 * 0.99 ** np.arange(100)) is None
    # improving, then flat: stops `patience` epochs after the best one
    es = EarlyStopping(patience=3, min_delta=1e-3)
    losses = [1.0, 0.9, 0.8, 0.8, 0.7999, 0.80001, 0.9]
    assert _feed(es, losses) == 5
    assert es.best_ == 0.8 and es.best_epoch_ == 2 and es.stopped_epoch_ == 5
    # the delta is relative: a 0.05% decrease is no improvement at min_delta=1e-3 ...
    assert _feed(EarlyStopping(patience=2), [100.0, 99.95, 99.9, 99.85]) == 2
    # ... but is one at min_delta=0
    assert _feed(EarlyStopping(patience=2, min_delta=0.0), [100.0, 99.95, 99.9, 99.85]) is None
    # a non-finite loss stops at once; a new fit (epoch 0) starts afresh
    assert _feed(es, [1.0, math.nan]) == 1
    assert _feed(es, [1.0, 0.5, 0.25]) is None and es.stopped_epoch_ is None
    for bad in (dict(patience=0), dict(min_delta=-1.0), dict(patience=1.5)):
        with pytest.raises(ValueError):
            EarlyStopping(**bad)


def test_early_stopping_on_a_plateau(blobs):
    X = blobs[0]
    kw = {**FAST, "n_epochs": 40, "init": "random", "random_state": 0}
    # a learning rate this small leaves the encoder (and the mean loss) where it started:
    # no epoch improves on the first, so training stops after 1 + patience epochs
    flat = EarlyStopping(patience=3, min_delta=1e-2)
    m = ParametricUMAP(callbacks=[flat], learning_rate=1e-9, **kw).fit(X)
    assert m.n_epochs_ == 40
    assert m.n_epochs_run_ == 4 and len(m.loss_history_) == 4
    assert flat.best_epoch_ == 0 and flat.stopped_epoch_ == 3
    # a learning rate that trains: no stop while the loss falls, then a stop on the plateau
    learn = EarlyStopping(patience=3, min_delta=1e-2)
    m2 = ParametricUMAP(callbacks=[learn], **kw).fit(X)
    assert learn.best_epoch_ >= 3 and learn.best_ < 0.5 * m2.loss_history_[0]
    assert m2.n_epochs_run_ == learn.best_epoch_ + 1 + 3 < 40
    # a patience beyond the budget never stops
    never = EarlyStopping(patience=40)
    m3 = ParametricUMAP(callbacks=[never], **kw).fit(X)
    assert m3.n_epochs_run_ == 40 and never.stopped_epoch_ is None


def test_user_callback_sees_epochs_and_can_stop(blobs):
    X = blobs[0]
    seen = []

    def spy(epoch, loss, model):
        assert isinstance(model, torch.nn.Module)
        with torch.no_grad():
            out = model(torch.as_tensor(X[:5]))
        seen.append((epoch, loss, tuple(out.shape)))

    def stop_after_4(epoch, loss, model):
        return epoch == 3

    m = ParametricUMAP(random_state=0, callbacks=[spy, stop_after_4], **FAST).fit(X)
    assert [s[0] for s in seen] == [0, 1, 2, 3]  # increasing, every callback ran
    assert all(s[2] == (5, 2) for s in seen)
    np.testing.assert_allclose([s[1] for s in seen], m.loss_history_)
    assert m.n_epochs_run_ == 4 and m.n_epochs_ == FAST["n_epochs"]
    assert np.isfinite(m.embedding_).all()


def test_callbacks_leave_training_unchanged(blobs):
    X = blobs[0][:200]
    plain = ParametricUMAP(random_state=1, **FAST).fit(X)
    watched = ParametricUMAP(random_state=1, callbacks=[lambda e, l, m: None], **FAST).fit(X)
    np.testing.assert_array_equal(plain.embedding_, watched.embedding_)


def test_clone_params_and_save(blobs, tmp_path):
    es = EarlyStopping(patience=2)
    m = ParametricUMAP(callbacks=[es], **FAST)
    assert m.get_params()["callbacks"] == [es]
    c = clone(m)
    assert c.get_params()["callbacks"][0].patience == 2
    m.fit(blobs[0][:200])
    path = m.save(tmp_path / "m")  # callbacks are not saved (not JSON)
    loaded = load(path)
    assert loaded.callbacks is None
    assert loaded.n_epochs_run_ == m.n_epochs_run_ == len(loaded.loss_history_)


def test_callbacks_validated():
    X = np.zeros((30, 3), np.float32)
    with pytest.raises(ValueError, match="callbacks must be None or a list"):
        ParametricUMAP(callbacks=EarlyStopping()).fit(X)
    with pytest.raises(ValueError, match=r"callbacks\[1\] must be callable"):
        ParametricUMAP(callbacks=[EarlyStopping(), 3]).fit(X)
    with pytest.raises(ValueError, match="train_world_size=2"):
        ParametricUMAP(callbacks=[EarlyStopping()], train_world_size=2).fit(X)


def test_train_encoder_callback_return_stops():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 4)).astype(np.float32)
    head = np.repeat(np.arange(100), 3)
    tail = (head + rng.integers(1, 100, size=300)) % 100
    cfg = TrainConfig(hidden_layers=(8,), n_epochs=10, batch_size=64, init_steps=0,
                      num_threads=1)
    epochs = []
    _, hist = train_encoder(X, head, tail, np.ones(300, np.float32), cfg,
                            callback=lambda e, loss: epochs.append(e) or e == 1)
    assert epochs == [0, 1] and len(hist) == 2
