"""Bitwise determinism of training on the CPU with several torch threads.

With two or more threads, autograd's backward of advanced indexing (``emb[idx]``, i.e.
``index_put_(accumulate=True)``) adds repeated rows' gradients with atomic float adds in a
varying order once it has at least 32768 elements to add, so two fits with the same seed
drifted apart. The steps here are sized past that threshold (batch x negatives x 2 >= 32768).
"""

import numpy as np
import pytest
import torch

from pumap_dask import ParametricUMAP
from pumap_dask.train import TrainConfig, train_encoder
from pumap_dask.encoder import encode

from .conftest import FAST


@pytest.fixture
def two_threads():
    """Run the test body with two torch threads, restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _random_graph(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A symmetric random k-neighbour edge list (both directions) with weights in (0, 1]."""
    rng = np.random.default_rng(seed)
    head = np.repeat(np.arange(n), k)
    tail = (head + rng.integers(1, n, n * k)) % n
    weight = rng.uniform(0.1, 1.0, n * k)
    return (np.concatenate([head, tail]), np.concatenate([tail, head]),
            np.concatenate([weight, weight]))


def test_gather_rows_matches_indexing_and_is_repeatable(two_threads):
    from pumap_dask.train import _gather_rows

    gen = torch.Generator().manual_seed(0)
    src = torch.randn(1000, 2, generator=gen)
    index = torch.randint(1000, (8192, 5), generator=gen)
    upstream = torch.randn(8192, 5, 2, generator=gen)

    def grad_of(gather):
        x = src.clone().requires_grad_()
        out = gather(x, index)
        out.backward(upstream)
        return out.detach(), x.grad

    out, grad = grad_of(_gather_rows)
    ref_out, ref_grad = grad_of(lambda x, i: x[i])
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)
    for _ in range(5):
        assert torch.equal(grad_of(_gather_rows)[1], grad)


def test_train_encoder_same_seed_identical_with_two_threads():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 16)).astype(np.float32)
    head, tail, weight = _random_graph(len(X), 5, seed=1)
    init = rng.normal(size=(len(X), 2)).astype(np.float32)
    cfg = dict(hidden_layers=(32, 32), n_epochs=3, batch_size=4096, init_steps=10,
               random_state=0, num_threads=2)
    runs = []
    for _ in range(2):
        encoder, history = train_encoder(X, head, tail, weight, TrainConfig(**cfg),
                                         init_embedding=init)
        runs.append((encode(encoder, X), history))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_estimator_same_seed_identical_with_two_threads(blobs, monkeypatch):
    import pumap_dask.train as train

    # force two training threads however the estimator builds its TrainConfig
    monkeypatch.setattr(train, "_step_threads", lambda cfg, n, d, available: 2)
    params = {**FAST, "batch_size": 4096, "random_state": 5}
    a = ParametricUMAP(**params).fit(blobs[0])
    b = ParametricUMAP(**params).fit(blobs[0])
    assert a.n_epochs_ == b.n_epochs_
    assert np.array_equal(a.embedding_, b.embedding_)
