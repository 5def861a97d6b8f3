"""DDP training: 2 CPU ranks with Gloo, on Dask workers and under torchrun."""

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pumap_dask import ParametricUMAP, pipeline
from pumap_dask.datasets import write_cell_like_zarr
from pumap_dask.ddp import own_shards, train_on_dask
from pumap_dask.model import Encoder, encode

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


def test_two_ranks_on_a_local_cluster_match_one(cells, cluster_client):
    path, y, work, single = cells
    with cluster_client.as_current():
        import dask

        with dask.config.set(scheduler=cluster_client):
            m = ParametricUMAP(knn_method="partitioned", random_state=0, **FAST).fit(path)
    assert m.train_world_size_ == 2 and single.train_world_size_ == 1
    a1, a2 = _acc(single.embedding_, y), _acc(m.embedding_, y)
    assert a2 > a1 - 0.02, (a1, a2)


def test_failing_ranks_restart_then_fail_clearly(cells, cluster_client):
    path, _, work, single = cells
    cfg = pipeline.train_config({**single.get_params(), **FAST}, single.n_edges_, 20, "cpu",
                                single.a_, single.b_)
    bad = dataclasses.replace(cfg, negatives="nonsense")  # every rank raises
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="failed after 2 attempts.*negatives"):
        train_on_dask(cluster_client, path, None, os.path.join(work, "graph"), bad,
                      max_restarts=1, timeout_s=20)
    assert time.perf_counter() - t0 < 60


def test_torchrun_entry_point_with_two_processes(cells, tmp_path):
    path, y, work, single = cells
    out = tmp_path / "enc.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "pumap_dask.ddp", path, work, str(out), "--n-epochs", "15",
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
