"""DDP training: 2 CPU ranks with Gloo, on Dask workers and under torchrun."""

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time

import dask
import numpy as np
import pytest

from pumap_dask import ParametricUMAP, pipeline
from pumap_dask.datasets import write_cell_like_zarr
from pumap_dask.distributed import ddp
from pumap_dask.distributed.cluster import kill_threshold
from pumap_dask.distributed.ddp import own_shards, train_on_dask
from pumap_dask.encoder import Encoder, encode
from pumap_dask.progress import stage

from .conftest import FAST


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A 3,000-row cell-like Zarr store (3 row chunks), its labels, and a finished
    partitioned fit's work_dir (kNN + edge shards), made on the threaded scheduler."""
    import dask
    import zarr

    tmp = tmp_path_factory.mktemp("ddp")
    path, labels = str(tmp / "x.zarr"), str(tmp / "y.zarr")
    write_cell_like_zarr(path, 3000, n_features=20, chunk_rows=1000, random_state=4,
                         labels_path=labels)
    work = str(tmp / "work")
    with dask.config.set(scheduler="threads"):
        single = ParametricUMAP(knn_method="partitioned", work_dir=work, random_state=0,
                                train_world_size=1, **FAST).fit(path)
    return path, zarr.open_array(labels, mode="r")[:], work, single


def _acc(emb, y):
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return cross_val_score(KNeighborsClassifier(15), emb, y, cv=3).mean()


def test_shard_assignment_is_a_pure_partition():
    for world in (1, 2, 3):
        mine = [own_shards(7, r, world) for r in range(world)]
        assert sorted(sum(mine, [])) == list(range(7))
        assert mine == [own_shards(7, r, world) for r in range(world)]


def test_two_ranks_on_a_local_cluster_match_one(cells, cluster_client, monkeypatch):
    from pumap_dask.distributed import ddp

    path, y, work, single = cells
    seen = {}
    real = ddp.train_on_dask

    def spy(client, *a, **k):
        seen["max_restarts"] = k["max_restarts"]
        return real(client, *a, **k)

    monkeypatch.setattr(ddp, "train_on_dask", spy)
    with cluster_client.as_current():
        import dask

        with dask.config.set(scheduler=cluster_client):
            m = ParametricUMAP(knn_method="partitioned", random_state=0, max_restarts=1,
                               train_world_size=2, **FAST).fit(path)
    assert seen["max_restarts"] == 1  # the estimator's parameter reaches the launcher
    assert m.train_world_size_ == 2 and single.train_world_size_ == 1
    a1, a2 = _acc(single.embedding_, y), _acc(m.embedding_, y)
    assert a2 > a1 - 0.02, (a1, a2)


def test_failing_ranks_restart_then_fail_clearly(cells, cluster_client):
    path, _, work, single = cells
    cfg = pipeline.train_config({**single.get_params(), **FAST}, single.n_edges_, 20, "cpu",
                                single.a_, single.b_)
    bad = dataclasses.replace(cfg, negatives="nonsense")  # every rank raises
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="failed after 2 attempt.*negatives"):
        train_on_dask(cluster_client, path, None, os.path.join(work, "graph"), bad,
                      max_restarts=1, timeout_s=20)
    assert time.perf_counter() - t0 < 60


def test_ddp_fit_logs_epoch_progress(cells, cluster_client, caplog, monkeypatch):
    """A batch log of a DDP fit shows rank 0's epochs with the loss and an ETA (read from
    its report in the work directory), not the ranks' tasks."""
    path, _, work, single = cells
    monkeypatch.setenv("PUMAP_PROGRESS", "log")
    monkeypatch.setenv("PUMAP_PROGRESS_INTERVAL", "0.2")
    caplog.set_level(logging.INFO, logger="pumap_dask")
    cfg = pipeline.train_config({**single.get_params(), **FAST, "n_epochs": 20}, single.n_edges_,
                                20, "cpu", single.a_, single.b_)
    with cluster_client.as_current(), stage("train"):  # as the pipeline runs it
        _, history, world = train_on_dask(cluster_client, path, None,
                                          os.path.join(work, "graph"), cfg, world_size=2,
                                          max_restarts=0)
    assert world == 2 and len(history) == 20
    msgs = [r.getMessage() for r in caplog.records if r.name == "pumap_dask.progress"]
    assert msgs and not [m for m in msgs if "task" in m], msgs
    line = r"train: (\d+)/20 epochs \(\d+%\), loss [\d.]+, \w+ elapsed(, ETA \w+)?"
    seen = [m for m in (re.fullmatch(line, msg) for msg in msgs) if m]
    assert [m for m in seen if 0 < int(m[1]) < 20], msgs  # epochs while training ran
    if len({m[1] for m in seen if 0 < int(m[1]) < 20}) > 1:  # two reports: a rate, an ETA
        assert [m for m in seen if m[2]], msgs
    assert msgs[-1].startswith("train: 20/20 epochs (100%), loss ") and "(done)" in msgs[-1]
    assert not os.path.exists(os.path.join(work, "train_progress.json"))  # removed after


def test_torchrun_entry_point_with_two_processes(cells, tmp_path):
    path, y, work, single = cells
    out = tmp_path / "enc.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "pumap_dask.distributed.ddp", path, work, str(out), "--n-epochs", "15",
           "--batch-size", "2048", "--min-dist", "0.1", "--random-state", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    state = torch.load(out, weights_only=True)
    enc = Encoder(20, 2, (128, 64, 32), 0)
    enc.load_state_dict(state)
    import zarr

    emb = encode(enc, zarr.open_array(path, mode="r")[:])
    assert _acc(emb, y) > _acc(single.embedding_, y) - 0.05


# --------------------------------------------------------------------------- failures
@pytest.fixture(scope="module")
def kill_cluster(cluster_client):
    """The module's LocalCluster of 2 single-threaded worker processes (conftest's
    ``cluster_client``), for the tests that kill its workers: their nannies restart them, and
    each test waits for both to be back. These tests come last in the module, after the
    ones above that use the cluster. One cluster, not a second one: starting a cluster and
    its workers' first imports of torch and pumap_dask cost 10-20 s on 2 cores."""
    return cluster_client


def _kill_worker_when(client, rank, marker, deadline_s=120.0):
    """Start a thread that SIGKILLs the process of rank ``rank``'s worker (workers sorted by
    address, as the launcher ranks them) once the file ``marker`` exists; returns an Event
    set when it did."""
    import signal
    import threading

    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    victim = pids[sorted(pids)[rank]]
    killed = threading.Event()

    def run():
        end = time.monotonic() + deadline_s
        while not os.path.exists(marker) and time.monotonic() < end:
            time.sleep(0.02)
        if os.path.exists(marker):
            os.kill(victim, signal.SIGKILL)
            killed.set()

    threading.Thread(target=run, daemon=True).start()
    return killed


def _resumed_epoch(caplog):
    import re

    hits = [int(m.group(1)) for r in caplog.records
            if (m := re.search(r"resumed from the checkpoint in .* after epoch (\d+)",
                               r.getMessage()))]
    return hits[-1] if hits else None


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(bool((sa[k] == sb[k]).all()) for k in sa)


@pytest.mark.parametrize("rank", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_worker_killed_mid_training_restarts_the_group(cells, kill_cluster, tmp_path, caplog,
                                                       rank):
    """SIGKILL of one rank's worker process after the first checkpoint: the group restarts
    on the nanny-restarted worker, resumes from the checkpoint, and ends bitwise equal to
    an uninterrupted run; within a bounded time, never a hang."""
    import logging

    caplog.set_level(logging.INFO, logger="pumap_dask")
    path, _, work, single = cells
    edge_dir = os.path.join(work, "graph")
    kill_cluster.wait_for_workers(2, timeout=60)  # back from an earlier test's kill
    cfg = pipeline.train_config({**single.get_params(), **FAST, "n_epochs": 8},
                                single.n_edges_, 20, "cpu", single.a_, single.b_)
    ref, ref_hist, _ = train_on_dask(kill_cluster, path, None, edge_dir, dataclasses.replace(
        cfg, checkpoint_dir=str(tmp_path / "ref")), timeout_s=60)
    ck = str(tmp_path / "ck")
    killed = _kill_worker_when(kill_cluster, rank, os.path.join(ck, "train.pt"))
    t0 = time.perf_counter()
    enc, hist, world = train_on_dask(kill_cluster, path, None, edge_dir,
                                     dataclasses.replace(cfg, checkpoint_dir=ck),
                                     timeout_s=60, max_restarts=1)
    elapsed = time.perf_counter() - t0
    assert killed.is_set()
    assert elapsed < 150, elapsed
    text = caplog.text
    assert "attempt 1 of 2 failed (RankLostError" in text, text[-2000:]
    assert world == 2 and len(hist) == 8
    assert (_resumed_epoch(caplog) or 0) >= 1, text[-2000:]
    assert _same_state(enc, ref), "the resumed DDP run differs from the uninterrupted one"
    assert hist == ref_hist


def test_a_restarted_host_rank_waits_for_all_its_workers_threads(cells, kill_cluster, tmp_path,
                                                                  caplog):
    """Placement "host": one rank with both workers' threads. Its worker killed, the restart
    waits for both workers to be back, so the new rank has both threads again (a 10M fit's
    restarted rank, started with one worker back, trained on one thread)."""
    import logging

    caplog.set_level(logging.INFO, logger="pumap_dask")
    path, _, work, single = cells
    cfg = pipeline.train_config({**single.get_params(), **FAST, "n_epochs": 6},
                                single.n_edges_, 20, "cpu", single.a_, single.b_)
    ck = str(tmp_path / "ck")
    killed = _kill_worker_when(kill_cluster, 0, os.path.join(ck, "train.pt"))
    enc, hist, world = train_on_dask(kill_cluster, path, None, os.path.join(work, "graph"),
                                     dataclasses.replace(cfg, checkpoint_dir=ck),
                                     timeout_s=60, max_restarts=1, placement="host")
    assert killed.is_set() and world == 1 and len(hist) == 6
    text = caplog.text
    assert "attempt 1 of 2 failed (RankLostError" in text, text[-2000:]
    assert "on 1 rank(s), rank 0 with 2 thread(s)" in text, text[-2000:]


def test_worker_killed_without_restarts_fails_clearly(cells, kill_cluster, tmp_path):
    """max_restarts=0: a killed worker gives a RuntimeError naming the lost rank, fast."""
    path, _, work, single = cells
    cfg = pipeline.train_config({**single.get_params(), **FAST, "n_epochs": 30},
                                single.n_edges_, 20, "cpu", single.a_, single.b_)
    ck = str(tmp_path / "ck")
    killed = _kill_worker_when(kill_cluster, 1, os.path.join(ck, "train.pt"))
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"failed after 1 attempt.*RankLostError: the Dask "
                                           r"worker of rank 1 .* left the cluster.*a rerun "
                                           r"with the same checkpoint directory .* resumes "
                                           r"from the last finished epoch"):
        train_on_dask(kill_cluster, path, None, os.path.join(work, "graph"),
                      dataclasses.replace(cfg, checkpoint_dir=ck), timeout_s=60,
                      max_restarts=0)
    assert killed.is_set()
    assert time.perf_counter() - t0 < 60


# Slow (about 60 s on 2 cores: three 2-rank fits and a worker restart): it proves what
# test_worker_killed_mid_training_restarts_the_group[0] proves in the default run, that a DDP
# training whose rank is killed resumes from its last checkpoint and ends bitwise equal to an
# uninterrupted one, through a rerun of the estimator's fit instead of the launcher's restart.
# Its other checks run by default too: the estimator's max_restarts reaching the launcher
# (test_two_ranks_on_a_local_cluster_match_one), the rerun hint in the error
# (test_worker_killed_without_restarts_fails_clearly), and a killed fit rerun resuming from
# its work directory (tests/test_cli_jobs.py::test_killed_fit_resumes_from_its_work_directory).
@pytest.mark.slow
def test_killed_ddp_fit_resumes_from_its_checkpoint(cells, kill_cluster, tmp_path, caplog,
                                                    monkeypatch):
    """A 2-rank fit with work_dir killed mid-training (no restarts) fails; the same fit run
    again resumes from the checkpoint (starting epoch > 0) and ends bitwise equal to an
    uninterrupted fit."""
    import logging
    import shutil

    from pumap_dask.distributed import ddp

    caplog.set_level(logging.INFO, logger="pumap_dask")
    path, y, work, _ = cells
    dirs = {}
    for name in ("ref", "run"):
        dirs[name] = str(tmp_path / name)
        shutil.copytree(work, dirs[name], ignore=shutil.ignore_patterns("train"))
    kw = dict(knn_method="partitioned", random_state=0, train_world_size=2,
              **{**FAST, "n_epochs": 8})
    kill_cluster.wait_for_workers(2, timeout=60)  # back from an earlier test's kill
    # as_current alone (no dask.config scheduler=client): a nanny restarting a killed
    # worker passes dask's config to it, and a Client object there cannot be pickled
    with kill_cluster.as_current():
        ref = ParametricUMAP(work_dir=dirs["ref"], **kw).fit(path)
        assert ref.train_world_size_ == 2
        real = ddp.train_on_dask

        def interrupted(client, *a, **k):
            assert k["max_restarts"] == 0  # the estimator's parameter reaches the launcher
            _kill_worker_when(client, 1, os.path.join(dirs["run"], "train", "train.pt"))
            return real(client, *a, **k)

        monkeypatch.setattr(ddp, "train_on_dask", interrupted)
        with pytest.raises(RuntimeError, match="failed after 1 attempt.*resumes from the last"):
            ParametricUMAP(work_dir=dirs["run"], max_restarts=0, **kw).fit(path)
        monkeypatch.setattr(ddp, "train_on_dask", real)
        kill_cluster.wait_for_workers(2, timeout=60)
        caplog.clear()
        m = ParametricUMAP(work_dir=dirs["run"], **kw).fit(path)
    assert m.train_world_size_ == 2
    assert (_resumed_epoch(caplog) or 0) >= 1, caplog.text[-2000:]
    assert abs(_acc(m.embedding_, y) - _acc(ref.embedding_, y)) < 0.01
    assert _same_state(m.encoder_, ref.encoder_)
    np.testing.assert_array_equal(m.embedding_, ref.embedding_)


def test_cpu_workers_of_one_host_train_as_one_process(cells, cluster_client):
    """The default topology: one rank per host on CPUs (DDP across hosts only), one rank
    per worker when train_world_size asks for it; the reason is given."""
    from pumap_dask.distributed import ddp

    path = cells[0]
    cluster_client.wait_for_workers(2, timeout=60)  # back from an earlier test's kill
    slots = ddp.rank_workers(cluster_client, "host")
    assert len(slots) == 1 and slots[0][1] == 2  # one host, both workers' threads
    assert [w for w, _ in ddp.rank_workers(cluster_client, "worker")] == \
        ddp.eligible_workers(cluster_client)
    with cluster_client.as_current():
        plan = pipeline._choose_plan(None, [], True, path)
        assert plan.world_size == 1 and "one host" in plan.reason
        assert plan.remote and plan.placement == "host"  # on a worker, not in the client
        assert not pipeline._choose_plan(1, [], True, path).remote
        plan = pipeline._choose_plan(2, [], True, path)
        assert plan.world_size == 2 and plan.placement == "worker"


def test_one_host_trains_on_a_worker_and_the_client_holds_no_rows(cells, cluster_client,
                                                                   monkeypatch, caplog):
    """The default plan on one host: one training process on a worker with both workers'
    threads; the client never loads the training rows or the edges, and gets back the
    encoder, the training rows' embedding (computed on the workers) and the feature
    statistics, as an in-process fit has them."""
    import dask

    path, y, _, single = cells

    def refuse(self, *a, **k):
        raise AssertionError("the client loaded what stays on the workers")

    monkeypatch.setattr(pipeline.InputHandle, "load", refuse)
    monkeypatch.setattr(pipeline.Edges, "load", refuse)
    caplog.set_level(logging.INFO, logger="pumap_dask")
    cluster_client.wait_for_workers(2, timeout=60)  # back from an earlier test's kill
    with cluster_client.as_current(), dask.config.set(scheduler=cluster_client):
        m = ParametricUMAP(knn_method="partitioned", random_state=0, **FAST).fit(path)
    assert "one process on a Dask worker" in caplog.text
    assert m.train_world_size_ == 1 and m.embedding_.shape == (3000, 2)
    np.testing.assert_allclose(m.embedding_, encode(m.encoder_, _rows(path)), atol=1e-4)
    for k in ("min", "max", "mean", "std"):
        np.testing.assert_allclose(m.feature_stats_[k], single.feature_stats_[k], rtol=1e-5,
                                   atol=1e-6)
    assert _acc(m.embedding_, y) > _acc(single.embedding_, y) - 0.03


def _rows(path):
    import zarr

    return np.asarray(zarr.open_array(path, mode="r")[:], dtype=np.float32)


def test_hosts_get_one_rank_each(cluster_client, monkeypatch):
    from pumap_dask.distributed import ddp

    two_hosts = [("tcp://10.0.0.1:1", 8), ("tcp://10.0.0.2:1", 8)]
    monkeypatch.setattr(ddp, "rank_workers",
                        lambda client, placement="worker": two_hosts if placement == "host"
                        else [])
    with cluster_client.as_current():
        plan = pipeline._choose_plan(None, [], True, "x.zarr")
    assert plan.world_size == 2 and plan.placement == "host" and "2 hosts" in plan.reason


def test_input_the_workers_cannot_reopen_trains_in_one_process(monkeypatch):
    import threading

    import dask.array as da

    assert pipeline._unreadable_by_workers("x.zarr") is None
    assert pipeline._unreadable_by_workers(np.zeros((4, 2))) == "in-memory input"
    assert pipeline._unreadable_by_workers(da.zeros((10, 3), chunks=5)) is None

    class Locked:  # like an open h5py dataset: cannot be pickled
        shape, dtype, ndim = (10, 3), np.dtype("float32"), 2
        lock = threading.Lock()

        def __getitem__(self, key):
            return np.zeros((10, 3), np.float32)[key]

    assert "cannot be sent" in pipeline._unreadable_by_workers(da.from_array(Locked(), chunks=5))
    monkeypatch.setattr(pipeline, "MAX_SHIPPED_GRAPH", 1000)
    big = da.from_array(np.ones((1000, 3), np.float32), chunks=500)
    assert "in-memory data" in pipeline._unreadable_by_workers(big)


def test_ddp_from_a_dask_array_fills_the_node_row_cache(cells, cluster_client, tmp_path,
                                                        monkeypatch, caplog):
    """Any lazy input trains as DDP: the ranks fill one node-local row cache from the
    dask array (no Zarr path needed) and remove it when training ends."""
    import logging

    import dask
    import dask.array as da

    path, y, _, single = cells
    cache = str(tmp_path / "rows")
    monkeypatch.setenv("PUMAP_ROW_CACHE", cache)
    caplog.set_level(logging.INFO, logger="pumap_dask")
    X = da.from_zarr(path) * 1.0  # a computed dask array, not a store the ranks reopen
    cluster_client.wait_for_workers(2, timeout=60)  # back from an earlier test's kill
    cluster_client.run(lambda: os.environ.update(PUMAP_ROW_CACHE=cache))
    try:
        with cluster_client.as_current(), dask.config.set(scheduler=cluster_client):
            m = ParametricUMAP(knn_method="partitioned", random_state=0, train_world_size=2,
                               **FAST).fit(X)
    finally:
        cluster_client.run(lambda: os.environ.pop("PUMAP_ROW_CACHE", None))
    assert m.train_world_size_ == 2
    assert "DDP over 2 ranks" in caplog.text
    assert os.listdir(cache) == [".pumap-rowcache"]  # written once, dropped after training
    assert _acc(m.embedding_, y) > _acc(single.embedding_, y) - 0.03


def test_mapped_rows_are_released_below_dasks_kill_point(cluster_client):
    # the trainer's release point (train.MAPPED_ROWS_RELEASE_AT of it) follows the worker's
    # own limit and Dask's terminate fraction, wherever the user set it
    assert kill_threshold(None) is None and kill_threshold(0) is None
    with dask.config.set({"distributed.worker.memory.terminate": 0.5}):
        assert kill_threshold(1000) == 500
    with dask.config.set({"distributed.worker.memory.terminate": False}):
        assert kill_threshold(1000) == 1000  # never killed by the nanny; memory is finite
    assert ddp._worker_kill_threshold() is None  # not in a worker task
    limit = 2 * 2**30  # the fixture's workers
    got = cluster_client.submit(ddp._worker_kill_threshold, pure=False).result()
    assert got == int(limit * dask.config.get("distributed.worker.memory.terminate"))
