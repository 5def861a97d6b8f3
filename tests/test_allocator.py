"""Numeric tasks on Dask workers keep freed memory for reuse while they run
(arrays.freed_memory_reused): glibc's thresholds are raised inside and restored after."""

import threading

import pytest

from pumap_dask import arrays


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(arrays, "_glibc", lambda: fake)
    return fake


def test_raised_inside_restored_after_with_the_workers_settings(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # what Dask's nanny sets
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)

    @arrays.reuses_freed_memory
    def work(x):
        assert libc.calls == [("mallopt", -3, 32 << 20), ("mallopt", -1, 1 << 30)]
        return x + 1

    assert work(1) == 2 and work.__name__ == "work"
    assert libc.calls[2:] == [("mallopt", -1, 65536), ("mallopt", -3, 128 * 1024), ("trim", 0)]


def test_overlapping_tasks_restore_once_when_the_last_ends(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    inside, release = threading.Barrier(2), threading.Event()

    def task():
        with arrays.freed_memory_reused():
            inside.wait(timeout=10)
            release.wait(timeout=10)

    threads = [threading.Thread(target=task) for _ in range(2)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join()
    assert [c for c in libc.calls if c[0] == "mallopt"] == [
        ("mallopt", -3, 32 << 20), ("mallopt", -1, 1 << 30),
        ("mallopt", -1, 65536), ("mallopt", -3, 1048576)]
    assert libc.calls[-1] == ("trim", 0)


def test_nothing_changes_under_glibcs_own_dynamic_thresholds(libc, monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with arrays.freed_memory_reused():
        pass
    assert libc.calls == []


def test_restored_when_the_task_fails(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with pytest.raises(ZeroDivisionError):
        with arrays.freed_memory_reused():
            1 / 0
    assert libc.calls[-1] == ("trim", 0) and ("mallopt", -1, 65536) in libc.calls


def test_the_real_allocator_runs_numeric_work(monkeypatch):
    import torch

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with arrays.freed_memory_reused():
        x = torch.randn(512, 512)
        assert torch.isfinite(x @ x).all()
