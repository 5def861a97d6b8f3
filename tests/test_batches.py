"""Neighbourhood batches (pumap_dask.batches): every graph edge among the batch's rows, with
its weight, and about the wanted number of edges per step."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.manifold import trustworthiness

from pumap_dask.batches import NeighbourhoodSampler
from pumap_dask.encoder import encode
from pumap_dask.errors import ParameterError
from pumap_dask.graph import fuzzy_simplicial_set, graph_to_edges
from pumap_dask.knn import exact_knn
from pumap_dask.train import (MAX_SAMPLES, MIN_EPOCHS, NEIGHBOURHOOD_CAP, NEIGHBOURHOOD_SAMPLES,
                              TrainConfig, batching_of, default_epochs, train_encoder)


def _digits_edges():
    X = load_digits().data.astype(np.float32)
    idx, dist = exact_knn(X, 15)
    G = fuzzy_simplicial_set(idx, dist)
    return X, G, graph_to_edges(G)


def test_a_batch_holds_every_edge_among_its_rows_with_its_weight():
    X, G, (head, tail, weight) = _digits_edges()
    gen = torch.Generator().manual_seed(0)
    s = NeighbourhoodSampler(head, tail, weight, len(X), 2000)
    for _ in range(5):
        rows, h, t, w = s.draw(gen)
        rows = rows.numpy()
        assert len(np.unique(rows)) == len(rows)
        sub = G.tocsr()[rows][:, rows].tocoo()
        want = {(int(i), int(j)): float(v) for i, j, v in zip(sub.row, sub.col, sub.data)}
        got = {(int(i), int(j)): float(v) for i, j, v in zip(h, t, w)}
        assert got.keys() == want.keys()
        assert all(abs(got[e] - want[e]) < 1e-6 for e in want)
    assert (s.slot == -1).all()  # the row map is left clean between draws


def test_the_seeds_are_sized_for_the_wanted_edges_and_the_draws_repeat():
    X, _, (head, tail, weight) = _digits_edges()
    s = NeighbourhoodSampler(head, tail, weight, len(X), 3000)
    sizes = [len(s.draw(torch.Generator().manual_seed(i))[1]) for i in range(20)]
    assert 0.6 * 3000 < np.mean(sizes) < 1.5 * 3000
    rows_per_edge = np.mean([len(s.draw(torch.Generator().manual_seed(i))[0])
                             for i in range(20)]) / np.mean(sizes)
    assert rows_per_edge < 0.35  # several positive edges per encoded row (edges: 2 rows each)
    a = s.draw(torch.Generator().manual_seed(7))
    b = s.draw(torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_heads_as_row_pointers_draw_the_same_batches():
    # sorted heads as CSR row pointers (no id per edge) sample exactly as the ids do, and
    # an unsorted edge list is sorted first
    from pumap_dask.batches import SortedHeads, is_sorted

    X, G, (head, tail, weight) = _digits_edges()
    ptr = SortedHeads(G.indptr)
    assert len(ptr) == len(head) and np.array_equal(np.asarray(ptr), head)
    draws = []
    for h in (head, ptr):
        s = NeighbourhoodSampler(h, tail, weight, len(X), 2000)
        assert np.array_equal(s.indptr, G.indptr)
        draws.append(s.draw(torch.Generator().manual_seed(5)))
    for a, b in zip(*draws):
        assert torch.equal(a, b)
    flip = np.random.default_rng(0).permutation(len(head))
    s = NeighbourhoodSampler(head[flip], tail[flip], weight[flip], len(X), 2000)
    assert np.array_equal(s.indptr, G.indptr) and is_sorted(head) and not is_sorted(head[flip])
    assert np.array_equal(np.sort(s.tail[:G.indptr[1]]), np.sort(G.indices[:G.indptr[1]]))


def test_the_sorted_check_reads_slice_by_slice(monkeypatch):
    from pumap_dask import batches

    monkeypatch.setattr(batches, "SORTED_CHECK_SLICE", 7)
    a = np.arange(50)
    assert batches.is_sorted(a) and batches.is_sorted(a[:1]) and batches.is_sorted(a[:0])
    for i in (6, 7, 13, 14, 48):  # a fall inside a slice and across slices' borders
        b = a.copy()
        b[i + 1] = b[i] - 1
        assert not batches.is_sorted(b)


def test_rows_without_edges_are_never_seeds():
    head = np.array([0, 1, 5, 6]); tail = np.array([1, 0, 6, 5])
    w = np.ones(4, np.float32)
    s = NeighbourhoodSampler(head, tail, w, 10, 4)
    for i in range(10):
        rows, h, t, _ = s.draw(torch.Generator().manual_seed(i))
        assert set(rows.tolist()) <= {0, 1, 5, 6}
        assert len(h) >= 2


def test_training_on_neighbourhood_batches_embeds_digits_and_repeats():
    X, _, (head, tail, weight) = _digits_edges()
    cfg = TrainConfig(hidden_layers=(64, 32), n_epochs=20, batch_size=2048, init_steps=0,
                      random_state=0, batching="neighbourhoods", num_threads=2)
    runs = [train_encoder(X, head, tail, weight, cfg) for _ in range(2)]
    E = [encode(enc, X) for enc, _ in runs]
    np.testing.assert_array_equal(E[0], E[1])
    assert runs[0][1] == runs[1][1]
    assert runs[0][1][-1] < runs[0][1][0]  # the loss falls
    assert trustworthiness(X, E[0], n_neighbors=15) > 0.9


def test_the_next_batch_drawn_ahead_trains_exactly_as_drawn_in_turn(monkeypatch, tmp_path):
    # the prefetch thread draws from the same random stream in the same order, and never
    # across an epoch's end: the weights, the losses and a resumed checkpoint all match
    from pumap_dask import train as train_mod

    X, _, (head, tail, weight) = _digits_edges()
    cfg = TrainConfig(hidden_layers=(32,), n_epochs=3, batch_size=1024, init_steps=0,
                      random_state=3, batching="neighbourhoods", num_threads=1)

    def run(ahead, **kw):
        monkeypatch.setattr(train_mod, "PREFETCH_BATCHES", ahead)
        enc, hist = train_encoder(X, head, tail, weight, TrainConfig(**{**cfg.__dict__, **kw}))
        return encode(enc, X), hist

    E_on, h_on = run(True)
    E_off, h_off = run(False)
    np.testing.assert_array_equal(E_on, E_off)
    assert h_on == h_off
    # nothing is drawn past an epoch's end: a checkpoint holds the same random state
    states = []
    for ahead in (True, False):
        ckpt = tmp_path / f"ckpt-{ahead}"
        run(ahead, checkpoint_dir=str(ckpt))
        states.append(torch.load(ckpt / "train.pt", weights_only=True)["rng"][0])
    assert torch.equal(states[0], states[1])


def test_auto_batching_and_bad_values():


    assert batching_of(TrainConfig(batching="auto")) == "neighbourhoods"
    assert batching_of(TrainConfig(batching="auto", correlation_weight=0.1)) == "edges"
    assert batching_of(TrainConfig(batching="auto", virtual_rate=0.5)) == "edges"
    assert batching_of(TrainConfig(batching="edges")) == "edges"
    # small data: an edge step encodes most rows anyway
    assert batching_of(TrainConfig(batching="auto", batch_size=4096), 10_000) == "edges"
    assert batching_of(TrainConfig(batching="auto", batch_size=4096), 20_000) == "neighbourhoods"
    assert batching_of(TrainConfig(batching="neighbourhoods"), 100) == "neighbourhoods"
    with pytest.raises(ParameterError, match="batching must be one of"):
        batching_of(TrainConfig(batching="rows"))


def test_the_neighbourhood_budget_is_4x_the_floor_and_2x_the_cap():
    # 4M edges (about 200k rows): the floor, 4x the edge sampler's 10 epochs
    assert default_epochs(4_000_000, 4096, "neighbourhoods") == MIN_EPOCHS * NEIGHBOURHOOD_SAMPLES
    assert default_epochs(4_000_000, 4096, "edges") == MIN_EPOCHS
    # 1M edges (about 50k rows): the target, 4x the edge sampler's 16.4M samples
    assert default_epochs(1_000_000, 4096, "neighbourhoods") == 66
    assert default_epochs(1_000_000, 4096, "edges") == 17
    big = 25_000_000  # about 1M rows: the cap binds
    per_epoch = -(-big // 4096) * 4096
    hood = default_epochs(big, 4096, "neighbourhoods")
    assert hood * per_epoch <= MAX_SAMPLES * NEIGHBOURHOOD_CAP < (hood + 1) * per_epoch
    assert default_epochs(big, 4096, "edges") * per_epoch <= MAX_SAMPLES
