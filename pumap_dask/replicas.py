"""Neighbourhood steps on several CPU threads at once: replicas of the network in one process.

A neighbourhood step encodes about a thousand rows, too few for torch's own threads (a
second intra-op thread gave nothing, ``benchmarks/RESULTS.md``), and DDP over Gloo on one
host is slower than one process (0.72x on the 2-core machine: an all-reduce of the MLP's
gradients alone took 1.9 ms, a third of a step). Here each of ``K`` replicas is a copy of the network whose
parameters are *views of the trained ones* (the same storage, their own gradients); each
draws its own neighbourhood batch and runs the forward pass, the loss and the backward pass
on one core, on a thread of its own where there are threads; torch and the numba kernels
release the GIL, so the threads run side by side.

The optimiser then takes the ``K`` steps in thread order, one per gradient. All ``K``
gradients of a round are computed at the parameters of the round's start, so each but the
first is one to ``K - 1`` optimiser steps stale (a pipelined step, as in asynchronous data
parallelism but in a fixed order): the number of steps, the samples per step and the
learning-rate schedule are those of one thread. The result is bitwise the same for a seed
and ``K`` on any number of threads, one included (each replica draws from its own
generator, seeded from the trainer's at each epoch start, so a checkpoint at an epoch end
resumes the same run); ``K`` is part of what a checkpoint must match.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from .batches import NeighbourhoodSampler


# modules whose forward pass is a pure function of their parameters and input
_PURE = (nn.Sequential, nn.Linear, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU,
         nn.ELU, nn.Tanh, nn.Sigmoid, nn.Softplus)


def can_replicate(net: nn.Module) -> bool:
    """Whether ``net`` can run as replicas: built of pure modules only (the package's MLPs).

    A buffer (batch norm's running statistics) would be updated by each replica on its own
    copy, dropout would draw from torch's global generator on several threads at once, and a
    custom module may hold state of its own; such networks train one step at a time.
    """
    return (all(type(m) in _PURE for m in net.modules())
            and not any(True for _ in net.buffers()))


class ReplicaSteps:
    """``K`` replicas of ``net`` stepping on up to ``K`` threads (see the module's docstring).

    Parameters
    ----------
    net
        The trained network (its parameters are the ones the optimiser updates).
    hood
        The neighbourhood sampler; each replica draws with its own scratch copy of it.
    step_loss
        ``step_loss(replica, hood, gen)``: one step's loss on a batch the replica draws
        with ``gen`` (the trainer's neighbourhood step).
    replicas
        ``K`` >= 2.
    threads
        Threads the replicas' steps run on (at most ``K``; 1: one after the other in the
        calling thread, with the same result).
    """

    def __init__(self, net: nn.Module, hood: NeighbourhoodSampler,
                 step_loss: Callable[[nn.Module, NeighbourhoodSampler, torch.Generator],
                                     torch.Tensor],
                 replicas: int, threads: int = 1) -> None:
        if replicas < 2:
            raise ValueError(f"replicas must be at least 2, got {replicas}")
        self.params = list(net.parameters())
        self.nets = []
        for _ in range(replicas):
            rep = copy.deepcopy(net)
            for mine, shared in zip(rep.parameters(), self.params):
                mine.data = shared.data  # the same storage: the optimiser's updates show
            self.nets.append(rep)
        self.hoods = [hood] + [hood.fork() for _ in range(replicas - 1)]
        self.step_loss = step_loss
        self.gens: list[torch.Generator] = []
        self.threads = max(1, min(int(threads), replicas))
        self.pool = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="pumap-replica")
                     if self.threads > 1 else None)

    def __len__(self) -> int:
        return len(self.nets)

    def start_epoch(self, gen: torch.Generator) -> None:
        """Seed each replica's generator from the trainer's (so an epoch's batches follow
        from the trainer's stream alone, which a checkpoint holds)."""
        seeds = torch.randint(2**62, (len(self.nets),), generator=gen).tolist()
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def _one(self, k: int, worker: bool = False) -> tuple[float, list[torch.Tensor | None]]:
        if worker:
            torch.set_num_threads(1)  # a side thread's ops stay on its own core
        rep = self.nets[k]
        for p in rep.parameters():
            p.grad = None
        loss = self.step_loss(rep, self.hoods[k], self.gens[k])
        loss.backward()
        return float(loss.detach()), [p.grad for p in rep.parameters()]

    def round(self, k: int) -> list[tuple[float, list[torch.Tensor | None]]]:
        """The losses and gradients of ``k`` <= K steps computed side by side at the
        current parameters, in replica order."""
        if self.pool is None:
            return [self._one(i) for i in range(k)]
        # replica i on thread i % threads: the calling thread takes replica 0 and its turns
        threads = self.threads
        futures = {i: self.pool.submit(self._side, i, threads, k)
                   for i in range(1, min(threads, k))}
        mine = {i: self._one(i) for i in range(0, k, threads)}
        for i, f in futures.items():
            mine.update(f.result())
        return [mine[i] for i in range(k)]

    def _side(self, first: int, stride: int, k: int) -> dict:
        return {i: self._one(i, worker=True) for i in range(first, k, stride)}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
