"""Progress: log lines in batch logs, silence unless at INFO, task counts and peaks per stage."""

import logging
import time

import dask
import dask.array as da
import pytest

from pumap_dask import progress
from pumap_dask.progress import Progress, stage


@pytest.fixture()
def info_logs(caplog, monkeypatch):
    monkeypatch.setenv("PUMAP_PROGRESS_INTERVAL", "0.1")
    monkeypatch.setenv("PUMAP_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="pumap_dask")
    return caplog


def test_log_lines_when_not_a_terminal(info_logs):
    bar = Progress(10, "train", "epoch")
    for i in range(10):
        time.sleep(0.03)
        bar.update(i + 1, postfix=f"loss {1 / (i + 1):.3f}")
    bar.close()
    lines = [r.getMessage() for r in info_logs.records if r.name == "pumap_dask.progress"]
    assert 2 <= len(lines) <= 6, lines  # periodic, not one per update
    assert lines[-1].startswith("train: 10/10 epochs (100%), loss 0.100")
    assert lines[-1].endswith("(done)")


def test_silent_below_info(caplog, monkeypatch):
    monkeypatch.setenv("PUMAP_PROGRESS_INTERVAL", "0.1")
    caplog.set_level(logging.WARNING, logger="pumap_dask")
    bar = Progress(3, "knn", "task")
    assert not bar.active
    bar.update(3)
    bar.close()
    assert not [r for r in caplog.records if r.name == "pumap_dask.progress"]


def test_tqdm_bar_on_a_terminal(info_logs, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setenv("PUMAP_PROGRESS", "")
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    bar = Progress(4, "transform", "block")
    assert bar._bar is not None
    bar.update(4)
    bar.close()


def _slow(x):
    time.sleep(0.02)
    return x + 1


def test_stage_counts_tasks_and_records_time_and_memory(info_logs, scheduler):
    timings, peaks, wpeaks = {}, {}, {}
    x = da.ones((400, 4), chunks=(10, 4)).map_blocks(_slow)
    with stage("graph", timings, peaks, wpeaks) as bar:
        if scheduler is None:
            total = float(x.sum().compute())
        else:
            kept = scheduler.persist(x)  # kept in memory: its task group stays visible
            total = float(kept.sum().compute())
    assert total == 3200.0
    assert timings["graph"] > 0 and peaks["graph"] > 50e6
    assert bar.total and bar.total >= 40 and bar.n == bar.total
    if scheduler is not None:
        assert wpeaks.get("graph", 0) > 10e6  # the largest worker's process memory
    msgs = [r.getMessage() for r in info_logs.records if r.name == "pumap_dask.progress"]
    assert msgs and msgs[-1].startswith("graph: ") and msgs[-1].endswith("(done)")


def test_failed_stage_still_records_and_raises(info_logs):
    timings = {}
    with pytest.raises(ZeroDivisionError):
        with stage("knn", timings):
            dask.delayed(lambda: 1 / 0)().compute(scheduler="threads")
    assert "knn" in timings
