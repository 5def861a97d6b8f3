"""torch.distributed collectives used by the training loop (no-ops in one process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the active torch.distributed group, or (0, 1)."""

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(value: float, world: int, dtype: torch.dtype = torch.float64) -> float:
    """``value`` summed over all ranks (itself when there is one)."""
    t = torch.tensor([value], dtype=dtype)
    if world > 1:
        dist.all_reduce(t)
    return t.item()
