"""Training checkpoints: what a run must match to be resumed, and the atomic file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

def run_fingerprint(cfg: Any, n: int, d: int, n_edges: int, w_sum: float,
                 world: int, extra: dict | None = None) -> str:
    """What a checkpoint must match to be resumed: configuration, data shape, world size
    (and ``extra``: the starting weights of continued training, the landmarks)."""

    fields = {k: v for k, v in vars(cfg).items()
              if k not in ("checkpoint_dir", "checkpoint_every", "log_every")}
    body = {"cfg": fields, "n": n, "d": d, "n_edges": n_edges,
            "w_sum": round(w_sum, 3), "world": world}
    if extra:
        body["extra"] = extra
    doc = json.dumps(body, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state (parameters and buffers, in order)."""

    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Checkpoint:
    """Atomic training checkpoints (encoder, optimiser, schedule, RNG, loss history).

    Written to ``<dir>/train.pt`` at epoch ends; a rerun with the same configuration and
    data resumes after the last finished epoch and ends bitwise equal to an uninterrupted
    run. A checkpoint of another configuration is ignored (and replaced).
    """

    NAME = "train.pt"

    def __init__(self, directory: str | None, fingerprint: str) -> None:
        self.enabled = directory is not None
        self.path = os.path.join(directory, self.NAME) if directory else None
        self.fingerprint = fingerprint

    def restore(self, encoder, opt, sched, gen, rank: int = 0) -> tuple[int, list[float]]:
        """Load a matching checkpoint; returns (next epoch, history) or (0, [])."""
        if not os.path.exists(self.path):
            return 0, []
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: start over, never crash
            logger.warning("ignoring unreadable training checkpoint %s (%s)", self.path, exc)
            return 0, []
        if state.get("fingerprint") != self.fingerprint:
            logger.info("training checkpoint %s is of other input or parameters; starting over",
                        self.path)
            return 0, []
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"][rank])
        logger.info("resuming training from %s after epoch %d", self.path, state["epoch"])
        return int(state["epoch"]), [float(x) for x in state["history"]]

    def save(self, epoch: int, encoder, opt, sched, gen, history: list[float], rank: int = 0,
             world: int = 1) -> None:
        """Write the checkpoint (rank 0; every rank contributes its RNG state)."""
        rngs = [gen.get_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, gen.get_state())
        if rank != 0:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        state = {"fingerprint": self.fingerprint, "epoch": epoch,
                 "encoder": encoder.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": None if sched is None else sched.state_dict(),
                 "rng": rngs, "history": list(history)}
        tmp = f"{self.path}.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, self.path)
