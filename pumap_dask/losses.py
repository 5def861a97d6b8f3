"""The UMAP loss: the cross-entropy of an embedding's pairs, in torch and as a CPU kernel.

A training step's loss is over a few thousand positive pairs, each with
``negative_sample_rate`` negatives: tens of thousands of 2-D distances. Written as torch
operations that is some fifteen small tensor operations forward and as many backward, each
over a tensor of a few tens of thousands of entries, and on a CPU they cost more than the
encoder's own forward and backward pass (benchmarks/RESULTS.md, "The loss as one CPU
kernel"). :func:`pair_loss` computes the loss and its gradient with respect to the
embedding in two sequential numba passes over the pairs on the CPU (so bitwise repeatable
at any thread count) around torch's vectorised transcendental functions, and with torch
operations elsewhere (CUDA), the two checked equal in
``tests/test_losses.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .arrays import host_kernel

# below this squared distance a pair's distance is clamped (log of 0); its gradient is 0
MIN_D2 = 1e-10


def umap_loss(d2: torch.Tensor, positive: bool, a: float, b: float) -> torch.Tensor:
    """Cross-entropy of q = 1/(1 + a d^(2b)) against 1 (positive) or 0 (negative).

    Written with softplus on s = log(a) + b log(d^2) for numerical stability.
    """
    s = math.log(a) + b * torch.log(d2.clamp_min(MIN_D2))
    return nn.functional.softplus(s) if positive else nn.functional.softplus(-s)


class _GatherRows(torch.autograd.Function):
    """``src[index]`` along the first axis, with a backward that is deterministic on the CPU.

    Autograd's backward of advanced indexing, ``index_put_(..., accumulate=True)``, adds the
    gradients of repeated rows with concurrent (atomic) float adds when torch runs several
    CPU threads, so their order, and the rounding of the sum, changes from run to run. Here
    the backward is ``index_add_``, which on the CPU adds in index order whatever the
    thread count (documented nondeterministic on CUDA only) and measured as fast.
    """

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = index.reshape(-1)
        ctx.save_for_backward(flat)
        ctx.src_shape = src.shape
        return src.index_select(0, flat).view(*index.shape, *src.shape[1:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (flat,) = ctx.saved_tensors
        rows = grad.reshape(flat.shape[0], *ctx.src_shape[1:])
        return grad.new_zeros(ctx.src_shape).index_add_(0, flat, rows), None


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``src`` at an integer ``index`` of any shape, as ``src[index]``.

    Parameters
    ----------
    src
        Tensor (n, ...) to gather from.
    index
        Integer tensor of row numbers in ``[0, n)``.

    Returns
    -------
    torch.Tensor
        ``index.shape + src.shape[1:]``; its gradient reaches ``src`` bitwise the same from
        run to run on the CPU, whatever the number of torch threads.
    """
    return _GatherRows.apply(src, index)


def pair_loss_torch(eh: torch.Tensor, et: torch.Tensor, en: torch.Tensor, w: torch.Tensor | None,
                    a: float, b: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted mean UMAP loss of positive pairs ``(eh, et)`` and negatives ``en``.

    Parameters
    ----------
    eh, et
        (E, d) embeddings of each positive pair's ends.
    en
        (E, R, d) embeddings of each pair's ``R`` negatives (repelled from ``eh``).
    w
        (E,) pair weights, or None for equal weights.

    Returns
    -------
    tuple
        The loss (sum of ``w`` times each pair's positive and negative terms, over
        ``sum(w) (1 + R)``) and the squared distances ``d_pos`` (E,) and ``d_neg`` (E, R).
    """
    d_pos = (eh - et).pow(2).sum(-1)
    d_neg = (eh.unsqueeze(1) - en).pow(2).sum(-1)
    per_edge = umap_loss(d_pos, True, a, b) + umap_loss(d_neg, False, a, b).sum(-1)
    R = en.shape[1]
    if w is None:
        return per_edge.sum() / (len(per_edge) * (1 + R)), d_pos, d_neg
    return (w * per_edge).sum() / (w.sum().clamp_min(1e-12) * (1 + R)), d_pos, d_neg


def _pair_distances(emb, h, t, pick, out):  # pragma: no cover - compiled by numba
    """Squared distances of each positive pair (column 0) and its negatives (1..R)."""
    R = pick.shape[1]
    for e in range(h.shape[0]):
        i = h[e]
        for r in range(R + 1):
            j = t[e] if r == 0 else pick[e, r - 1]
            d2 = np.float32(0.0)
            for k in range(emb.shape[1]):
                diff = emb[i, k] - emb[j, k]
                d2 += diff * diff
            out[e, r] = d2


def _pair_gradient(emb, h, t, pick, w, d2, s, p, l1p, b, grad):  # pragma: no cover - numba
    """The loss of the pairs and its gradient (added into ``grad``), in pair order (so the
    same at any thread count).

    For each pair, from its squared distance ``d2``, ``s = log(a) + b log(d2)``,
    ``p = exp(s)`` and ``l1p = log1p(p)``: a positive pair's loss is ``softplus(s) = l1p``
    with derivative ``p / (1 + p)`` in ``s``, a negative's ``softplus(-s) = l1p - s`` with
    derivative ``-1 / (1 + p)``; ``ds / d(d2) = b / d2``, 0 where ``d2`` is clamped.
    """
    R = pick.shape[1]
    wsum = 0.0
    for e in range(h.shape[0]):
        wsum += w[e]
    scale = 1.0 / (max(wsum, 1e-12) * (1 + R))
    loss = 0.0
    for e in range(h.shape[0]):
        i = h[e]
        we = w[e] * scale
        for r in range(R + 1):
            j = t[e] if r == 0 else pick[e, r - 1]
            if r == 0:
                loss += we * l1p[e, r]
                dl = p[e, r] / (1.0 + p[e, r])
            else:
                loss += we * (l1p[e, r] - s[e, r])
                dl = -1.0 / (1.0 + p[e, r])
            if d2[e, r] > MIN_D2:
                c = np.float32(2.0 * we * b * dl / d2[e, r])
                for k in range(emb.shape[1]):
                    g = c * (emb[i, k] - emb[j, k])
                    grad[i, k] += g
                    grad[j, k] -= g
    return loss


class _PairLoss(torch.autograd.Function):
    """:func:`pair_loss_torch` of rows of ``emb``, its gradient computed in the forward.

    Two numba passes over the pairs (the distances; the loss and its gradient) around
    torch's vectorised log, exp and log1p of all pairs at once (numba's scalar ones cost
    several times more).
    """

    @staticmethod
    def forward(ctx, emb, h, t, pick, w, a, b):
        distances, gradient = host_kernel(_pair_distances), host_kernel(_pair_gradient)
        e = emb.detach().contiguous().numpy()
        h, t, pick = h.numpy(), t.numpy(), pick.numpy()
        d2 = torch.empty((len(h), pick.shape[1] + 1), dtype=torch.float32)
        distances(e, h, t, pick, d2.numpy())
        s = torch.log(d2.clamp_min(MIN_D2)).mul_(b).add_(math.log(a))
        p = torch.exp(s)
        grad = np.zeros(e.shape, dtype=np.float32)
        loss = gradient(e, h, t, pick, w.numpy(), d2.numpy(), s.numpy(), p.numpy(),
                        torch.log1p(p).numpy(), float(b), grad)
        ctx.save_for_backward(torch.from_numpy(grad))
        return emb.new_tensor(loss)

    @staticmethod
    def backward(ctx, go):
        (grad,) = ctx.saved_tensors
        return grad * go, None, None, None, None, None, None


def pair_loss(emb: torch.Tensor, h: torch.Tensor, t: torch.Tensor, pick: torch.Tensor,
              w: torch.Tensor | None, a: float, b: float) -> torch.Tensor:
    """The UMAP loss of pairs of rows of one step's embedding.

    Parameters
    ----------
    emb
        (n, d) embeddings of the step's encoded rows.
    h, t
        (E,) integer row numbers in ``emb`` of each positive pair's ends.
    pick
        (E, R) row numbers of each pair's negatives, repelled from ``h``.
    w
        (E,) pair weights, or None for equal weights.
    a, b
        The curve's parameters (:func:`pumap_dask.train.find_ab_params`).

    Returns
    -------
    torch.Tensor
        The scalar loss of :func:`pair_loss_torch`. On the CPU it and its gradient come
        from numba kernels, bitwise the same at any thread count; elsewhere from torch.
    """
    if emb.device.type == "cpu" and emb.dtype == torch.float32:
        ww = (torch.ones(len(h), dtype=torch.float32) if w is None
              else w.to(torch.float32).contiguous())
        return _PairLoss.apply(emb, h.long().contiguous(), t.long().contiguous(),
                               pick.long().contiguous(), ww, a, b)
    loss, _, _ = pair_loss_torch(gather_rows(emb, h), gather_rows(emb, t),
                                 gather_rows(emb, pick), w, a, b)
    return loss
