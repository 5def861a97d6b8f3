"""The UMAP pair loss: the CPU kernel against the torch expression it replaces."""

import numpy as np
import pytest
import torch

from pumap_dask.losses import gather_rows, pair_loss, pair_loss_torch
from pumap_dask.train import find_ab_params


def _pairs(seed: int, E: int = 3000, R: int = 5, n: int = 700, d: int = 2):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g) * 3
    h = torch.randint(n // 2, (E,), generator=g)
    t = torch.randint(n // 2, (E,), generator=g)
    pick = torch.randint(n, (E, R), generator=g)
    emb[1] = emb[0]  # a pair at distance 0: clamped, no gradient
    h[0], t[0] = 0, 1
    pick[3, 0] = h[3]  # a negative that is its own head
    return emb, h, t, pick, torch.rand(E, generator=g) + 0.05


def _loss_and_grad(fn, emb, *args):
    x = emb.clone().requires_grad_()
    loss = fn(x, *args)
    (2.5 * loss).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("d", [2, 3])
def test_kernel_matches_torch(weighted, d):
    a, b = find_ab_params(1.0, 0.1)
    emb, h, t, pick, w = _pairs(0, d=d)
    w = w if weighted else None

    def reference(x, h, t, pick, w):
        return pair_loss_torch(gather_rows(x, h), gather_rows(x, t), gather_rows(x, pick),
                               w, a, b)[0]

    loss, grad = _loss_and_grad(lambda x, *r: pair_loss(x, *r, a, b), emb, h, t, pick, w)
    ref_loss, ref_grad = _loss_and_grad(reference, emb, h, t, pick, w)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    np.testing.assert_allclose(grad.numpy(), ref_grad.numpy(), rtol=1e-4,
                               atol=1e-6 * ref_grad.abs().max().item())
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_kernel_is_repeatable_and_thread_count_free():
    emb, h, t, pick, w = _pairs(1)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(_loss_and_grad(lambda x, *r: pair_loss(x, *r, 1.6, 0.9),
                                       emb, h, t, pick, w))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_float64_and_other_devices_take_the_torch_path():
    emb, h, t, pick, w = _pairs(2)
    loss64, grad64 = _loss_and_grad(lambda x, *r: pair_loss(x, *r, 1.6, 0.9),
                                    emb.double(), h, t, pick, w.double())
    loss32, grad32 = _loss_and_grad(lambda x, *r: pair_loss(x, *r, 1.6, 0.9),
                                    emb, h, t, pick, w)
    assert grad64.dtype == torch.float64
    assert loss64.item() == pytest.approx(loss32.item(), rel=1e-5)
