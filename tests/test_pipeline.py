"""The fit pipeline's stages: typed results, bounded initial layout, weighted edge sampling."""

import numpy as np
import pytest

from pumap_dask import ParametricUMAP, inputs, pipeline
from pumap_dask.datasets import clusters
from pumap_dask.init import landmark_rows

from .conftest import FAST, Killed, kill_at

PARAMS = {**ParametricUMAP(random_state=0).get_params(), "device": "cpu"}


def test_stages_hand_typed_results(blobs):
    X = blobs[0]
    handle = pipeline.open_input(X)
    assert (handle.n, handle.d) == X.shape and not handle.lazy
    nb = pipeline.run_knn(handle, PARAMS, "cpu")
    assert nb.indices.shape == (len(X), 15) and nb.method == "exact"
    edges = pipeline.run_graph(nb, PARAMS)
    assert 0 < len(edges) <= edges.graph.nnz and edges.n_vertices == len(X)  # pruned
    layout = pipeline.run_init(handle, edges, PARAMS, "cpu")
    assert layout.method in ("spectral", "pca") and layout.positions.shape == (len(X), 2)
    assert np.array_equal(layout.rows, np.arange(len(X)))


def test_landmark_layout_above_the_threshold(monkeypatch, blobs):
    """Above N_LANDMARKS rows the layout covers a sample only, and the fit still separates
    the clusters as well as the full-graph layout does."""
    X, Xte, y, yte = blobs
    from sklearn.neighbors import KNeighborsClassifier

    full = ParametricUMAP(random_state=0, **FAST).fit(X)
    monkeypatch.setattr(pipeline, "N_LANDMARKS", 200)
    m = ParametricUMAP(random_state=0, **FAST).fit(X)
    assert full.init_ in ("spectral", "pca") and m.init_ == f"landmark-{full.init_}"
    for model in (full, m):
        acc = KNeighborsClassifier(15).fit(model.embedding_, y).score(model.transform(Xte), yte)
        assert acc > 0.95
    handle = pipeline.open_input(X)
    lay = pipeline.run_init(handle, pipeline.Edges(*[np.zeros(1)] * 3, len(X)), PARAMS, "cpu")
    assert lay.positions.shape == (200, 2) and len(np.unique(lay.rows)) == 200


def test_seed_reaches_the_landmarks_and_the_layout():
    a, b = landmark_rows(10_000, 100, random_state=1), landmark_rows(10_000, 100, random_state=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, landmark_rows(10_000, 100, random_state=2))
    X, _ = clusters(400, 8, 4, random_state=0)
    handle = pipeline.open_input(X)
    edges = pipeline.run_graph(pipeline.run_knn(handle, PARAMS, "cpu"), PARAMS)
    p1 = pipeline.run_init(handle, edges, PARAMS, "cpu").positions
    p2 = pipeline.run_init(handle, edges, PARAMS, "cpu").positions
    np.testing.assert_array_equal(p1, p2)


def test_edges_are_sampled_in_proportion_to_weight():
    """The trainer's positive edges follow the weights (inverse-CDF sampling)."""
    import torch

    from pumap_dask.train import sample_edges

    weight = np.array([1.0, 3.0, 0.0, 6.0], np.float32)
    cum = torch.cumsum(torch.as_tensor(weight, dtype=torch.float64), 0)
    gen = torch.Generator().manual_seed(0)
    e = sample_edges(cum, 200_000, gen)
    freq = np.bincount(e.numpy(), minlength=4) / 200_000
    np.testing.assert_allclose(freq, weight / weight.sum(), atol=0.005)
    assert freq[2] == 0


def test_train_budget_grows_with_edges():
    from pumap_dask.train import default_epochs

    small, large = default_epochs(10_000, 16384), default_epochs(10_000_000, 16384)
    assert small * 10_000 < large * 10_000_000  # more edge samples for more edges
    assert large >= 1 and small >= 1
    # the budget is in samples: a smaller batch runs more steps, not fewer samples
    for n_edges in (50_000, 1_000_000, 25_000_000):
        e16, e4 = default_epochs(n_edges, 16384), default_epochs(n_edges, 4096)
        s16, s4 = e16 * -(-n_edges // 16384) * 16384, e4 * -(-n_edges // 4096) * 4096
        assert 0.75 < s4 / s16 < 1.34, (n_edges, e16, e4)


@pytest.mark.parametrize("negatives", ["batch", "pool"])
def test_negative_modes_train(blobs, negatives):
    from sklearn.neighbors import KNeighborsClassifier

    X, Xte, y, yte = blobs
    m = ParametricUMAP(random_state=0, **FAST)
    m.fit(X)
    handle = pipeline.open_input(X)
    edges = pipeline.run_graph(pipeline.run_knn(handle, PARAMS, "cpu"), PARAMS)
    import dataclasses

    cfg = pipeline.train_config({**PARAMS, **FAST}, len(edges), X.shape[1], "cpu", m.a_, m.b_)
    cfg = dataclasses.replace(cfg, negatives=negatives)
    trained = pipeline.run_train(X, edges, None, cfg)
    from pumap_dask.encoder import encode

    acc = KNeighborsClassifier(15).fit(encode(trained.encoder, X), y).score(
        encode(trained.encoder, Xte), yte)
    assert acc > 0.9


def test_training_memory_budget_fails_before_any_stage(monkeypatch):
    import time

    import dask.array as da

    from pumap_dask.errors import InputError

    X = da.random.random((2_000_000, 50), chunks=(100_000, 50)).astype(np.float32)
    monkeypatch.setattr(inputs, "TRAIN_MEMORY_BUDGET", 100 << 20)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="training memory budget"):
        ParametricUMAP().fit(X)
    assert time.perf_counter() - t0 < 2


def test_training_resumes_from_its_checkpoint_bitwise(blobs, tmp_path):
    """A training run killed after some epochs, rerun, ends equal to an uninterrupted one."""
    import dataclasses

    from pumap_dask.encoder import encode
    from pumap_dask.train import train_encoder

    X = blobs[0]
    handle = pipeline.open_input(X)
    edges = pipeline.run_graph(pipeline.run_knn(handle, PARAMS, "cpu"), PARAMS)
    layout = pipeline.run_init(handle, edges, PARAMS, "cpu")
    cfg = pipeline.train_config({**PARAMS, **FAST, "n_epochs": 6}, len(edges), X.shape[1],
                                "cpu", 1.58, 0.9)
    init = (layout.rows, layout.positions)
    full, hist = train_encoder(X, edges.head, edges.tail, edges.weight, cfg,
                               init_embedding=init)
    ck = dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "train"))
    with pytest.raises(Killed):
        train_encoder(X, edges.head, edges.tail, edges.weight, ck, callback=kill_at(2),
                      init_embedding=init)
    seen = []
    resumed, hist2 = train_encoder(X, edges.head, edges.tail, edges.weight, ck,
                                   callback=lambda e, loss: seen.append(e),
                                   init_embedding=init)
    assert seen == [2, 3, 4, 5]  # epochs 0 and 1 came from the checkpoint
    np.testing.assert_array_equal(encode(resumed, X), encode(full, X))
    assert hist2 == hist
    # a finished checkpoint makes a rerun free; another configuration starts over
    again, _ = train_encoder(X, edges.head, edges.tail, edges.weight, ck, init_embedding=init,
                             callback=lambda e, loss: seen.append(("again", e)))
    assert not any(isinstance(s, tuple) for s in seen)
    np.testing.assert_array_equal(encode(again, X), encode(full, X))
    other = dataclasses.replace(ck, learning_rate=0.02)
    train_encoder(X, edges.head, edges.tail, edges.weight, other, init_embedding=init,
                  callback=lambda e, loss: seen.append(("other", e)))
    assert ("other", 0) in seen
