"""Neighbourhood steps side by side on CPU threads (pumap_dask.replicas)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from pumap_dask import train
from pumap_dask.batches import NeighbourhoodSampler
from pumap_dask.encoder import encode
from pumap_dask.replicas import ReplicaSteps, can_replicate
from pumap_dask.train import TrainConfig, train_encoder

from .conftest import Killed, kill_at


def _chain_data(n: int = 3000, d: int = 8, seed: int = 0):
    """Rows along a noisy curve and each row's 6 nearest neighbours along it, as an edge
    list in both directions (a kNN-like graph with local structure to learn)."""
    rng = np.random.default_rng(seed)
    s = np.sort(rng.uniform(0, 6 * np.pi, n))
    X = np.stack([np.cos(s), np.sin(s), s / 3] + [0.05 * rng.normal(size=n)
                                                  for _ in range(d - 3)], 1)
    head = np.repeat(np.arange(n), 6)
    tail = head + np.tile([-3, -2, -1, 1, 2, 3], n)
    keep = (tail >= 0) & (tail < n)
    head, tail = head[keep], tail[keep]
    weight = np.exp(-np.abs(head - tail) / 2.0)
    return X.astype(np.float32), head, tail, weight.astype(np.float32)


CFG = dict(hidden_layers=(32, 32), n_epochs=4, batch_size=256, init_steps=0,
           random_state=0, batching="neighbourhoods")


def test_fork_draws_the_same_batches_with_its_own_scratch():
    X, head, tail, weight = _chain_data()
    hood = NeighbourhoodSampler(head, tail, weight, len(X), 256)
    twin = hood.fork()
    assert twin.slot is not hood.slot and twin.tail is hood.tail
    a = hood.draw(torch.Generator().manual_seed(3))
    b = twin.draw(torch.Generator().manual_seed(3))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert (hood.slot == -1).all() and (twin.slot == -1).all()  # scratch left clean


def test_small_steps_keep_to_one_thread_and_large_ones_use_all():
    small = TrainConfig(**CFG)
    assert train._step_threads(small, 100_000, 50, 4) == 1
    big = dataclasses.replace(small, hidden_layers=(1024, 1024), batch_size=65536)
    assert train._step_threads(big, 1_000_000, 50, 4) == 4


def test_only_networks_of_pure_modules_are_replicated():
    assert can_replicate(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.SiLU()))
    assert not can_replicate(torch.nn.Sequential(torch.nn.Linear(3, 4),
                                                 torch.nn.BatchNorm1d(4)))
    assert not can_replicate(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout()))

    class Custom(torch.nn.Module):
        def forward(self, x):
            return x

    assert not can_replicate(torch.nn.Sequential(torch.nn.Linear(3, 4), Custom()))


def test_replicas_share_the_trained_parameters():
    X, head, tail, weight = _chain_data()
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 8), torch.nn.SiLU(),
                              torch.nn.Linear(8, 2))
    hood = NeighbourhoodSampler(head, tail, weight, len(X), 128)
    Xt = torch.as_tensor(X)

    def step_loss(rep, sampler, gen):
        rows, _, _, _ = sampler.draw(gen)
        return rep(Xt[rows.long()]).pow(2).mean()

    side = ReplicaSteps(net, hood, step_loss, 2, threads=2)
    try:
        side.start_epoch(torch.Generator().manual_seed(0))
        with torch.no_grad():
            side.params[0].add_(1.0)  # an optimiser's in-place update reaches every replica
        for rep in side.nets:
            assert torch.equal(next(rep.parameters()), side.params[0])
        out = side.round(2)
        assert len(out) == 2 and all(g is not None for _, grads in out for g in grads)
        assert side.params[0].grad is None  # the trained parameters' own gradients untouched
        assert not torch.equal(out[0][1][0], out[1][1][0])  # two different batches
    finally:
        side.close()


def _fit(X, head, tail, weight, **over):
    enc, history = train_encoder(X, head, tail, weight, TrainConfig(**{**CFG, **over}))
    return encode(enc, X), history


def test_replicas_give_the_same_encoder_on_any_thread_count_and_learn(caplog, monkeypatch):
    X, head, tail, weight = _chain_data()
    with caplog.at_level(logging.INFO, logger="pumap_dask"):
        two = _fit(X, head, tail, weight, num_threads=2)
        one = _fit(X, head, tail, weight, num_threads=1)
    said = [r.getMessage() for r in caplog.records if "replicas" in r.getMessage()]
    assert any("2 replicas on 2 thread(s)" in m for m in said)
    assert any("2 replicas on 1 thread(s)" in m for m in said)
    np.testing.assert_array_equal(two[0], one[0])  # side by side or one after the other
    assert two[1] == one[1]
    monkeypatch.setattr(train, "REPLICAS", 1)  # the plain schedule, for comparison
    plain = _fit(X, head, tail, weight, num_threads=1)
    assert not np.array_equal(plain[0], two[0])
    # as good as the plain steps: the loss falls alike, neighbours along the curve stay close
    assert two[1][-1] < two[1][0]
    assert two[1][-1] == pytest.approx(plain[1][-1], rel=0.15)
    for emb, _ in (two, plain):
        near = np.linalg.norm(emb[1:] - emb[:-1], axis=1).mean()
        far = np.linalg.norm(emb[np.random.default_rng(0).permutation(len(emb))] - emb,
                             axis=1).mean()
        assert near < 0.2 * far


def test_replica_training_resumes_from_its_checkpoint_bitwise(tmp_path, monkeypatch):
    X, head, tail, weight = _chain_data()
    cfg = TrainConfig(**{**CFG, "num_threads": 2})
    full, hist = train_encoder(X, head, tail, weight, cfg)
    ck = dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "train"))

    with pytest.raises(Killed):
        train_encoder(X, head, tail, weight, ck, callback=kill_at(1))
    seen: list[int] = []
    resumed, hist2 = train_encoder(X, head, tail, weight, ck,
                                   callback=lambda e, loss: seen.append(e))
    assert seen == [1, 2, 3]
    np.testing.assert_array_equal(encode(resumed, X), encode(full, X))
    assert hist2 == hist
    # another number of replicas steps in another order: its checkpoint is not resumed
    other = dataclasses.replace(ck, checkpoint_dir=str(tmp_path / "other"))
    with pytest.raises(Killed):
        train_encoder(X, head, tail, weight, other, callback=kill_at(1))
    monkeypatch.setattr(train, "REPLICAS", 1)
    seen.clear()
    train_encoder(X, head, tail, weight, other, callback=lambda e, loss: seen.append(e))
    assert seen == [0, 1, 2, 3]


def test_linear_decay_matches_lambdalr_bitwise():
    """The trainer's linear schedule: LambdaLR's rates and checkpoint state, set directly."""
    def opt():
        return torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.0123)

    a, b = opt(), opt()
    ours = train.LinearDecay(a, 37)
    ref = torch.optim.lr_scheduler.LambdaLR(b, lambda s: max(0.0, 1.0 - s / 37))
    for _ in range(40):
        a.step()
        b.step()
        ours.step()
        ref.step()
        assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
    assert a.param_groups[0]["lr"] == 0.0
    state = ref.state_dict()  # a checkpoint written with LambdaLR resumes here
    again = train.LinearDecay(opt(), 37)
    again.load_state_dict(state)
    assert again.last_epoch == 40 and again.state_dict() == {
        "base_lrs": state["base_lrs"], "last_epoch": 40}


def test_threads_given_explicitly_win_over_torchs_count(caplog):
    """A DDP rank passes its threads: torch's count in a long-lived worker may read 1."""
    X, head, tail, weight = _chain_data()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with caplog.at_level(logging.INFO, logger="pumap_dask"):
            train_encoder(X, head, tail, weight, TrainConfig(**{**CFG, "n_epochs": 1}),
                          threads=2)
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)
    assert any("2 replicas on 2 thread(s)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("batching,threads", [("neighbourhoods", 2), ("neighbourhoods", 1),
                                              ("edges", 1)])
def test_progress_within_epochs_is_reported_as_fractions(monkeypatch, batching, threads):
    # a long epoch (one epoch of a 10M fit takes minutes) reports how far it has come:
    # side by side, one replica after the other, and on the edge sampler
    monkeypatch.setattr(train, "STEP_PROGRESS_S", 0.0)
    X, head, tail, weight = _chain_data()
    cfg = TrainConfig(**{**CFG, "batching": batching, "n_epochs": 2})
    seen, ends = [], []
    train_encoder(X, head, tail, weight, cfg, threads=threads, within_epoch=seen.append,
                  callback=lambda epoch, loss: ends.append(epoch))
    steps = -(-len(head) // cfg.batch_size)
    assert ends == [0, 1] and steps > 4
    assert seen == sorted(seen) and all(0 < f < 2 and not float(f).is_integer() for f in seen)
    assert any(f < 1 for f in seen) and any(f > 1 for f in seen)  # within both epochs
    assert len(seen) >= steps // 2  # about one per step (or per round of replicas) here
    monkeypatch.setattr(train, "STEP_PROGRESS_S", 3600.0)
    quiet = []
    train_encoder(X, head, tail, weight, cfg, threads=threads, within_epoch=quiet.append)
    assert quiet == []  # at most one report per STEP_PROGRESS_S
