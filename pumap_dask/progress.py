"""Progress and peak memory of the long stages (kNN, graph, training, transform).

A progress bar (tqdm) when stderr is a terminal, else a log line every
``PUMAP_PROGRESS_INTERVAL`` seconds (30 by default) and one at the end, which is what a batch
log needs. Shown only when the ``pumap_dask`` logger is at INFO (``verbose=True``, or the
command line without ``-q``).

:func:`stage` wraps one stage: it times it, follows the Dask tasks it runs (dask's local
callbacks on the threaded scheduler; the scheduler's task groups on a distributed cluster),
and samples the peak memory of this process and of the largest worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator

import psutil
from dask.callbacks import Callback
from distributed import get_client

logger = logging.getLogger("pumap_dask.progress")
_ROOT = logging.getLogger("pumap_dask")
_DONE_STATES = ("memory", "released", "erred", "forgotten")


def enabled() -> bool:
    """Whether progress is shown (the package logger is at INFO or below)."""
    return _ROOT.isEnabledFor(logging.INFO)


def _interval() -> float:
    try:
        return max(0.1, float(os.environ.get("PUMAP_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _use_bar() -> bool:
    if os.environ.get("PUMAP_PROGRESS", "").lower() == "log":
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return sys.stderr.isatty()


class Progress:
    """Progress of ``total`` units: a tqdm bar on a terminal, periodic log lines otherwise.

    Parameters
    ----------
    total
        Units of work (None when unknown yet; set ``total`` later).
    desc
        Name of the stage, shown first.
    unit
        Name of one unit (``"epoch"``, ``"task"``, ``"block"``).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it") -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.active = enabled()
        self._bar = None
        self._t0 = self._last = time.monotonic()
        if self.active and _use_bar():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    def update(self, n: int | None = None, *, total: int | None = None,
               postfix: str = "") -> None:
        """Set the units done (``n``) and/or the total; log when the interval has passed."""
        if total is not None:
            self.total = total
        if n is not None:
            self.n = n
        self.postfix = postfix or self.postfix
        if not self.active:
            return
        if self._bar is not None:
            if total is not None:
                self._bar.total = total
            self._bar.n = self.n
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last >= _interval():
            self._last = now
            self._log()

    def _log(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self._t0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        logger.info("%s: %d%s %ss%s%s in %.0fs%s", self.desc, self.n, of, self.unit, pct, extra,
                    elapsed, " (done)" if final else "")

    def close(self) -> None:
        """End the bar, or log the last line."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._log(final=True)


def _rss() -> int:
    try:
        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or the process table unreadable
        return 0


def _distributed_client():
    try:
        return get_client()
    except (ImportError, ValueError):
        return None


def _scheduler_poll(client) -> Any:
    """A function run on the scheduler: task-group counts and the largest worker's memory.

    Defined in a closure so it travels by value (the scheduler need not import pumap_dask).
    """
    done_states = _DONE_STATES

    def poll(dask_scheduler=None):
        groups = {}
        for name, tg in dask_scheduler.task_groups.items():
            states = tg.states
            groups[str(name)] = (sum(states.values()),
                                 sum(states.get(s, 0) for s in done_states))
        mem = 0
        for ws in dask_scheduler.workers.values():
            try:
                mem = max(mem, int(ws.memory.process))
            except Exception:  # older schedulers
                mem = max(mem, int(getattr(ws, "metrics", {}).get("memory", 0)))
        return groups, mem

    return lambda: client.run_on_scheduler(poll)


class _LocalTasks:
    """Counts tasks of dask's local schedulers through its callbacks."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self._lock = threading.Lock()

    def callback(self):
        outer = self

        class _Count(Callback):
            def _start_state(self, dsk, state):
                with outer._lock:
                    outer.total += len(state["ready"]) + len(state["waiting"]) + \
                        len(state.get("running", ()))

            def _posttask(self, key, result, dsk, state, worker_id):
                with outer._lock:
                    outer.done += 1

        return _Count()


@contextlib.contextmanager
def stage(name: str, timings: dict | None = None, peaks: dict | None = None,
          worker_peaks: dict | None = None) -> Iterator[Progress]:
    """Time a stage, show the progress of its Dask tasks and record its peak memory.

    Parameters
    ----------
    name
        Stage name (the key in the dicts).
    timings, peaks, worker_peaks
        Filled with wall seconds, this process's peak RSS and the largest worker's peak
        process memory (bytes; distributed clusters only) for the stage.
    """
    client = _distributed_client()
    poll = None
    seen: dict[str, tuple[int, int]] = {}
    if client is not None:
        try:
            poll = _scheduler_poll(client)
            before, _ = poll()
            ignore = set(before)
        except Exception:  # an old or unreachable scheduler: no task progress
            logger.debug("no task progress from the scheduler", exc_info=True)
            poll = None
    bar = Progress(None, name, "task")
    local = _LocalTasks()
    peak = {"rss": _rss(), "worker": 0}
    stop = threading.Event()

    def sample() -> None:
        period = 0.5
        while not stop.wait(period):
            observe()

    def observe() -> None:
        peak["rss"] = max(peak["rss"], _rss())
        if poll is not None:
            try:
                groups, mem = poll()
            except Exception:
                return
            peak["worker"] = max(peak["worker"], mem)
            for gone in set(seen) - set(groups):  # forgotten groups finished
                seen[gone] = (seen[gone][0], seen[gone][0])
            for g, counts in groups.items():
                if g not in ignore:
                    seen[g] = counts
            total = sum(t for t, _ in seen.values())
            done = sum(d for _, d in seen.values())
        else:
            total, done = local.total, local.done
        if total:
            bar.update(done, total=total)

    thread = threading.Thread(target=sample, name=f"pumap-progress-{name}", daemon=True)
    t0 = time.perf_counter()
    cb = local.callback() if client is None else contextlib.nullcontext()
    thread.start()
    ok = False
    try:
        with cb:
            yield bar
        ok = True
    finally:
        stop.set()
        thread.join()
        observe()  # the stage's last counts (a short stage may end between two samples)
        peak["rss"] = max(peak["rss"], _rss())
        if timings is not None:
            timings[name] = time.perf_counter() - t0
        if peaks is not None:
            peaks[name] = peak["rss"]
        if worker_peaks is not None and peak["worker"]:
            worker_peaks[name] = peak["worker"]
        if bar.total:
            if ok:  # every task of the stage ran (some were counted before it started)
                bar.n = bar.total
            bar.close()
