"""Progress: log lines in batch logs, silence unless at INFO, task counts and peaks per stage,
bars that draw on a terminal, epochs (with the loss and an ETA) on the train stage's bar."""

import fcntl
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time

import dask
import dask.array as da
import pytest

from pumap_dask import progress
from pumap_dask.progress import EpochReport, EpochWatch, Progress, stage, track


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


def test_training_counts_epochs_on_its_stage_bar(info_logs):
    with stage("train") as bar:
        dask.delayed(_slow)(1).compute(scheduler="threads")  # a task before training starts
        epochs = track(5, "train")
        assert epochs is bar and bar.unit == "epoch" and bar.total == 5
        for e in range(5):
            time.sleep(0.05)
            epochs.update(e + 1, postfix=f"loss {1 / (e + 1):.4f}")
        time.sleep(0.6)  # a stage sample after the epochs: tasks no longer counted
        epochs.close()
    assert bar.n == 5 and bar.total == 5
    msgs = [r.getMessage() for r in info_logs.records if r.name == "pumap_dask.progress"]
    assert msgs[-1].startswith("train: 5/5 epochs (100%), loss 0.2000") and "(done)" in msgs[-1]
    assert any(re.search(r"train: \d/5 epochs \(\d+%\), loss [\d.]+, \w+ elapsed, ETA \w+$",
                         m) for m in msgs), msgs
    assert len([m for m in msgs if m.endswith("(done)")]) == 1  # closed once (the stage: no-op)


def test_track_outside_a_stage_is_its_own_bar(info_logs):
    bar = track(3, "train")
    bar.update(3, postfix="loss 0.5")
    bar.close()
    msgs = [r.getMessage() for r in info_logs.records if r.name == "pumap_dask.progress"]
    assert msgs == [msgs[-1]] and msgs[-1].startswith("train: 3/3 epochs (100%), loss 0.5")


def test_epoch_report_and_watch(tmp_path, info_logs):
    path = str(tmp_path / "train_progress.json")
    report = EpochReport(path, "run1", 10)
    bar = Progress(10, "train", "epoch")
    watch = EpochWatch(report, bar)
    watch.poll()  # nothing written yet
    assert bar.n == 0
    report(0, 0.5)
    report(1, 0.4)  # within REPORT_EVERY_S of the last write: skipped
    watch.poll()
    assert bar.n == 1 and bar.postfix == "loss 0.5000"
    report(9, 0.25)  # the last epoch is always written
    with open(path) as fh:
        assert json.load(fh)["epoch"] == 10
    EpochWatch(EpochReport(path, "other-run", 10), other := Progress(10, "t", "epoch")).poll()
    assert other.n == 0  # another run's report is not this run's progress
    watch.poll()
    assert bar.n == 10 and bar.postfix == "loss 0.2500"
    assert os.listdir(tmp_path) == ["train_progress.json"]  # written atomically: no tmp left


def test_verbose_prints_where_logging_is_not_configured(monkeypatch):
    root = logging.getLogger("pumap_dask")
    monkeypatch.setattr(root, "propagate", False)  # as if the root logger had no handler
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    progress.show_progress()
    assert root.level == logging.INFO and len(root.handlers) == 1
    progress.show_progress()
    assert len(root.handlers) == 1  # once


_PTY_SNIPPET = textwrap.dedent("""
    import logging, sys, time
    import dask, dask.array as da
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from pumap_dask.progress import stage, track

    def slow(x):
        time.sleep(0.05)
        return x + 1

    with dask.config.set(scheduler="threads", num_workers=1):
        print("STAGE knn", flush=True)
        with stage("knn"):
            da.ones((50, 2), chunks=(1, 2)).map_blocks(slow).sum().compute()
            logging.getLogger("pumap_dask.knn").info("LOGMARK")
        print("STAGE train", flush=True)
        with stage("train"):
            bar = track(6, "train")
            for e in range(6):
                time.sleep(0.3)
                bar.update(e + 1, postfix=f"loss {1 / (e + 1):.4f}")
            bar.close()
""")


def _run_in_pty(code: str, rows: int = 0, cols: int = 0, timeout: float = 240):
    """Run ``python -c code`` on a pseudo-terminal of rows x cols (0 x 0: a terminal nobody
    sized, as under ``srun --pty``); returns [(seconds since start, bytes read)], exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PUMAP_PROGRESS", "COLUMNS", "LINES")}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave,
                            stderr=slave, env={**env, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    chunks = []
    try:
        while time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append((time.monotonic() - t0, data))
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return chunks, proc.wait()


def _first(chunks, pattern: bytes, after: float = 0.0) -> float:
    seen = b""
    for t, data in chunks:
        seen += data
        if t >= after and re.search(pattern, seen):
            return t
    raise AssertionError(f"{pattern!r} never reached the terminal: {seen[-3000:]!r}")


def test_bars_draw_on_an_unsized_terminal():
    """On a terminal that reports 0 x 0 (tqdm alone draws nothing there) each stage draws a
    moving bar within seconds of its start, and log records go above the bars."""
    chunks, code = _run_in_pty(_PTY_SNIPPET)
    out = b"".join(d for _, d in chunks)
    assert code == 0, out[-3000:]
    t_knn = _first(chunks, rb"STAGE knn")
    assert _first(chunks, rb"knn: +\d+%\|", t_knn) - t_knn < 5
    assert len(set(re.findall(rb"knn: +(\d+)%", out))) >= 2  # it moves
    t_train = _first(chunks, rb"STAGE train")
    assert _first(chunks, rb"train: +\d+%\|", t_train) - t_train < 5
    assert re.search(rb"train: +\d+%\|.*\| [1-5]/6 epochs \[00:0\d, loss [\d.]+, ETA \d+s\]",
                     out), out[-3000:]
    assert re.search(rb"6/6 epochs", out)
    assert re.search(rb"[\r\n]INFO LOGMARK\r?\n", out)  # its own line, not inside the bar's


def test_progress_within_an_epoch_reaches_the_bar(tmp_path, info_logs, monkeypatch):
    # one epoch of minutes (a 10M fit trains one) shows how far it has come, with no loss
    # until the epoch ends
    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.0)
    path = str(tmp_path / "train_progress.json")
    report = EpochReport(path, "run1", 1)
    bar = Progress(1, "train", "epoch")
    bar.adopt(1, "epoch")
    watch = EpochWatch(report, bar)
    report.within(0.37)
    watch.poll()
    assert bar.n == 0.37 and bar.postfix == ""
    time.sleep(0.15)
    bar.tick()  # the log line is due
    msgs = [r.getMessage() for r in info_logs.records if r.name == "pumap_dask.progress"]
    assert any(m.startswith("train: 0.37/1 epochs (37%)") for m in msgs), msgs
    report(0, 0.125)
    watch.poll()
    assert bar.n == 1 and isinstance(bar.n, int) and bar.postfix == "loss 0.1250"


def test_work_left_weighs_each_task_group_by_its_cost():
    # (total, done, compute seconds) per group: cheap split tasks done, heavy searches left
    assert progress.work_left([(100, 100, 10.0), (50, 10, 400.0)], threads=2) == 800.0
    assert progress.work_left([(100, 100, 10.0), (50, 0, 0.0)], threads=2) is None  # unknown
    assert progress.work_left([(50, 49, 490.0)], threads=2) == 10.0  # one task: one thread
    assert progress.work_left([(10, 10, 1.0)], threads=2) is None  # nothing left


def test_the_eta_follows_the_work_not_the_task_count(info_logs):
    bar = Progress(None, "knn", "task")
    bar.update(60, total=100)
    time.sleep(0.2)
    bar.update(90, total=100, left=600.0)  # 90% of the tasks, most of the work still to do
    assert 598 < bar.eta() <= 600
    time.sleep(0.15)
    bar.update(91, total=100)  # no estimate from the work: back to the rate of tasks
    assert bar.eta() < 60
    bar.close()
    lines = [r.getMessage() for r in info_logs.records if r.name == "pumap_dask.progress"]
    assert any(re.search(r"knn: 90/100 tasks \(90%\), \w+ elapsed, ETA (9m5\d|10m00)s", m)
               for m in lines), lines


def test_the_scheduler_reports_each_groups_compute_time(cluster_client):
    x = da.ones((40, 4), chunks=(10, 4)).map_blocks(_slow)
    kept = cluster_client.persist(x)  # kept in memory: its task group stays visible
    assert float(cluster_client.compute(kept.sum()).result()) == 320.0
    groups, mem, threads = progress._scheduler_poll(cluster_client)()
    slow = [g for name, g in groups.items() if name.startswith("_slow")]
    assert slow and slow[0][:2] == (4, 4) and slow[0][2] >= 4 * 0.02
    assert threads == 2 and mem > 10e6


def test_the_threaded_scheduler_times_each_task_group():
    local = progress._LocalTasks()
    x = da.ones((40, 4), chunks=(10, 4)).map_blocks(_slow)
    with local.callback():
        assert float(x.sum().compute(scheduler="threads")) == 320.0
    groups = local.groups()
    # the four sleeping blocks (fused with their sums by dask's optimisation) hold the time
    slow = [g for g in groups.values() if g[2] >= 4 * 0.02]
    assert len(slow) == 1 and slow[0][:2] == (4, 4)
    assert sum(g[2] for g in groups.values()) < 2 * slow[0][2]
    assert sum(g[0] for g in groups.values()) == sum(g[1] for g in groups.values()) >= 4
    with dask.config.set(scheduler="sync"):
        assert local.threads() == 1
    with dask.config.set(scheduler="threads", num_workers=3):
        assert local.threads() == 3
    # what the stage's ETA reads while a heavy group is half done: its own mean cost
    half = {**groups, "heavy": (10, 5, 50.0)}
    assert progress.work_left(half.values(), threads=1) == pytest.approx(50.0)
