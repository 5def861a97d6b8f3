"""Progress and peak memory of the long stages (kNN, graph, init, training, transform).

A progress bar (``tqdm.auto``: a terminal bar on stderr, a widget in a Jupyter notebook)
when stderr is a terminal or the code runs in a notebook, else a log line every
``PUMAP_PROGRESS_INTERVAL`` seconds (30 by default) and one at the end, which is what a batch
log needs (``PUMAP_PROGRESS=log`` or ``=bar`` forces either). Shown only when the
``pumap_dask`` logger is at INFO (``verbose=True``, or the command line without ``-q``).

:func:`stage` wraps one stage: it times it, follows the Dask tasks it runs (dask's local
callbacks on the threaded scheduler; the scheduler's task groups on a distributed cluster),
redraws its bar twice a second (a stage longer than a second always shows one, its clock
moving even while one big task runs) and samples the peak memory of this process and of the
largest worker. Training counts epochs on its stage's bar instead of tasks (:func:`track`),
in fractions within an epoch (the trainer's ``within_epoch``): the single-process trainer
through its callbacks, DDP training through the small file rank 0 rewrites after each epoch
and during one (:class:`EpochReport`, read by :class:`EpochWatch`).
While a terminal bar is drawn, log records of the console handlers are written above it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Iterator

import dask
import psutil
from dask.callbacks import Callback
from dask.system import CPU_COUNT
from dask.utils import key_split
from distributed import get_client
from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

from .io import write_json_atomic

logger = logging.getLogger("pumap_dask.progress")
_ROOT = logging.getLogger("pumap_dask")
_DONE_STATES = ("memory", "released", "erred", "forgotten")
# a stage's bar appears once the stage has run this long (short stages leave no line)
BAR_DELAY_S = 1.0
# how often a stage samples its tasks and memory, and redraws its bar
SAMPLE_S = 0.5
# the least seconds between two writes of rank 0's epoch report (and the last epoch always)
REPORT_EVERY_S = 1.0


def enabled() -> bool:
    """Whether progress is shown (the package logger is at INFO or below)."""
    return _ROOT.isEnabledFor(logging.INFO)


def _interval() -> float:
    try:
        return max(0.1, float(os.environ.get("PUMAP_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def show_progress() -> None:
    """``verbose=True``: progress at INFO, printed also where logging is not configured.

    Sets the ``pumap_dask`` logger to INFO and, when no handler would print its records
    (nothing configured, as in a fresh script or notebook), gives it one on stderr.
    """
    _ROOT.setLevel(logging.INFO)
    if not _printed(_ROOT):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        _ROOT.addHandler(handler)


def _printed(lg: logging.Logger) -> bool:
    """Whether a handler other than a NullHandler (the package's own) gets ``lg``'s records."""
    node: logging.Logger | None = lg
    while node is not None:
        if any(not isinstance(h, logging.NullHandler) for h in node.handlers):
            return True
        node = node.parent if node.propagate else None
    return False


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (its stderr is no terminal, yet shows bars)."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        return shell is not None and "IPKernelApp" in shell.config
    except (AttributeError, TypeError):  # an unusual IPython: no notebook bars
        return False


def _use_bar() -> bool:
    mode = os.environ.get("PUMAP_PROGRESS", "").lower()
    if mode in ("log", "bar"):
        return mode == "bar"
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        tty = False
    return tty or _in_notebook()


def _bar_shape() -> dict[str, int]:
    """tqdm's ``ncols``/``nrows`` where the terminal reports no size.

    A pseudo-terminal nobody sized (``srun --pty``, ``docker exec -t``, some CI runners)
    reports 0 x 0; tqdm then takes -1 rows and draws nothing at all.
    """
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):  # not a terminal (a notebook's stream)
        return {}
    if size.columns > 0 and size.lines > 0:
        return {}
    return {"ncols": size.columns if size.columns > 0 else _env_int("COLUMNS", 80),
            "nrows": size.lines if size.lines > 0 else _env_int("LINES", 24)}


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _AboveBars(logging.StreamHandler):
    """A console handler's stand-in while terminal bars are drawn: each record is written
    above the bars (``tqdm.write``) instead of into the line a bar redraws."""

    def __init__(self, orig: logging.StreamHandler) -> None:
        super().__init__(orig.stream)
        self.setLevel(orig.level)
        self.setFormatter(orig.formatter)
        self.filters = list(orig.filters)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            std_tqdm.write(self.format(record), file=self.stream)
        except (OSError, ValueError, TypeError):  # as logging's handlers: report, go on
            self.handleError(record)


# the bar of what :func:`track` counts (epochs): the ETA of :meth:`Progress.eta`, not tqdm's
_COUNT_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} {unit}s [{elapsed}{postfix}]"
# a stage that has counted nothing yet (no tasks of its own, or none seen yet): its clock
_CLOCK_FORMAT = "{desc}: running [{elapsed}]"
_bars_lock = threading.Lock()
_bars_open = 0
_swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []


def _logs_above_bars(opened: bool) -> None:
    """Count terminal bars; the first swaps the console handlers of the root and package
    loggers for :class:`_AboveBars`, the last one closed puts them back."""
    global _bars_open
    with _bars_lock:
        _bars_open += 1 if opened else -1
        if opened and _bars_open == 1:
            for lg in (logging.getLogger(), _ROOT):
                for i, h in enumerate(lg.handlers):
                    if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout):
                        lg.handlers[i] = _AboveBars(h)
                        _swapped.append((lg, h, lg.handlers[i]))
        elif not opened and _bars_open == 0:
            for lg, orig, stand_in in _swapped:
                lg.handlers = [orig if h is stand_in else h for h in lg.handlers]
            _swapped.clear()


class Progress:
    """Progress of ``total`` units: a tqdm bar on a terminal or in a notebook, periodic log
    lines (with an ETA) otherwise.

    Parameters
    ----------
    total
        Units of work (None when unknown yet; set ``total`` later).
    desc
        Name of the stage, shown first.
    unit
        Name of one unit (``"epoch"``, ``"task"``, ``"block"``).
    delay
        Seconds before the bar is drawn (a stage shorter than that leaves no bar).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *,
                 delay: float = 0.0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.active = enabled()
        self.adopted = False  # counts what :func:`track` asked for, not its stage's tasks
        self.closed = False
        self._bar: Any = None
        self._console = False  # a terminal bar (log records are written above it)
        self._lock = threading.RLock()
        self._as_bar = self.active and _use_bar()
        self._delay = delay
        self._t0 = self._last = time.monotonic()
        self._base: tuple[float, int] | None = None  # (time, n) of the first count: the ETA's
        self._t_n = self._t0  # when n last changed
        self._left: tuple[float, float] | None = None  # (seconds left, when): update's left
        if self._as_bar and delay <= 0:
            self._open_bar()

    def update(self, n: int | None = None, *, total: int | None = None,
               postfix: str = "", left: float | None = None) -> None:
        """Set the units done (``n``) and/or the total; redraw, or log when the interval
        has passed. ``left``: seconds left as estimated from the work itself (a stage's
        task groups: :func:`work_left`), which the ETA then shows instead of the rate of
        units, while it is known."""
        with self._lock:
            self._left = None if left is None else (float(left), time.monotonic())
            if total is not None:
                self.total = total
            if n is not None:
                now = time.monotonic()
                if self._base is None:
                    self._base = (now, n)
                if n != self.n:
                    self._t_n = now
                self.n = n
            self.postfix = postfix or self.postfix
            self._show()

    def tick(self) -> None:
        """Redraw the bar (its clock moves while nothing is counted), or log when due."""
        with self._lock:
            self._show()

    def adopt(self, total: int, unit: str) -> None:
        """Count ``total`` units of ``unit`` from now on (the stage's tasks no longer)."""
        with self._lock:
            self.adopted = True
            self.total, self.unit, self.n, self.postfix, self._base = total, unit, 0, "", None
            self._left = None
            self._t_n = time.monotonic()
            if self._bar is not None:
                self._bar.reset(total=total)
                self._bar.unit = unit
                self._bar.bar_format = self._format()

    def eta(self) -> float | None:
        """Seconds left: the work's own estimate when :meth:`update` was given one, else at
        the rate from the first count to the last one, less the time since the last (None
        before two counts)."""
        if self._left is not None and not self.adopted:
            left, at = self._left
            return max(0.0, left - (time.monotonic() - at))
        if not self.total or self._base is None:
            return None
        t, n = self._base
        if self.n <= n:
            return None
        left = (self.total - self.n) * (self._t_n - t) / (self.n - n)
        return max(0.0, left - (time.monotonic() - self._t_n))

    def _show(self) -> None:
        if not self.active or self.closed:
            return
        now = time.monotonic()
        if self._as_bar:
            if self._bar is None and now - self._t0 >= self._delay:
                self._open_bar()
            if self._bar is not None:
                self._draw()
            return
        if now - self._last >= _interval():
            self._last = now
            self._log()

    def _open_bar(self) -> None:
        # smoothing=0: a task bar's rate and ETA are the means since the stage started
        self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=sys.stderr,
                         leave=True, smoothing=0, bar_format=self._format(), **_bar_shape())
        self._bar.start_t -= time.monotonic() - self._t0  # the stage's clock, not the bar's
        self._console = not hasattr(self._bar, "container")  # a notebook's widget has one
        if self._console:
            _logs_above_bars(True)

    def _format(self) -> str | None:
        if self.adopted or self._left is not None:  # our ETA, not tqdm's rate of units
            return _COUNT_FORMAT
        return None if self.total else _CLOCK_FORMAT  # None: tqdm's own

    def _draw(self) -> None:
        bar = self._bar
        bar.bar_format = self._format()
        if self.total is not None and bar.total != self.total:
            bar.total = self.total
        postfix = self.postfix
        eta = (self.eta() if (self.adopted or self._left is not None)
               and self.n < (self.total or 0) else None)
        if eta is not None:  # from the first epoch on: setup and pre-training left out
            postfix = f"{postfix}, ETA {_duration(eta)}" if postfix else f"ETA {_duration(eta)}"
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.n = self.n
        bar.refresh()

    def _log(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self._t0
        if self.total or self.n:
            of = f"/{self.total}" if self.total else ""
            pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            head = f"{_count(self.n)}{of} {self.unit}s{pct}"
        else:
            head = "running"
        extra = f", {self.postfix}" if self.postfix else ""
        eta = None if final else self.eta()
        logger.info("%s: %s%s, %s elapsed%s%s", self.desc, head, extra, _duration(elapsed),
                    "" if eta is None else f", ETA {_duration(eta)}",
                    " (done)" if final else "")

    def close(self) -> None:
        """End the bar (it stays on screen), or log the last line; idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if not self.active:
                return
            if self._bar is not None:
                self._draw()
                self._bar.close()
                self._bar = None
                if self._console:
                    _logs_above_bars(False)
            elif not self._as_bar and (self.total or self.n):
                self._log(final=True)


_running = threading.local()  # per thread: the bars of the stages running, innermost last


def _count(n: float) -> float | int:
    """A count as an int when whole (``3``), else rounded to hundredths (``0.37`` epochs)."""
    n = float(n)
    return int(n) if n.is_integer() else round(n, 2)


def _stages() -> list[Progress]:
    if not hasattr(_running, "stages"):
        _running.stages = []
    return _running.stages


def track(total: int, desc: str, unit: str = "epoch") -> Progress:
    """The bar of the innermost running :func:`stage`, now counting ``total`` units of
    ``unit`` instead of its tasks (a DDP fit's bar counts epochs, not ranks); a new bar outside a
    stage. Close it when done (a stage's bar is closed again by its stage: a no-op)."""
    stages = _stages()
    bar = stages[-1] if stages else None
    if bar is None or bar.closed or bar.adopted:
        return Progress(total, desc, unit)
    bar.adopt(total, unit)
    return bar


@dataclasses.dataclass
class EpochReport:
    """Rank 0's per-epoch callback under DDP: rewrites the small JSON file ``path`` in the
    run's work directory (atomically, at most every :data:`REPORT_EVERY_S` seconds and after
    the last epoch) with the epoch, its loss and the run ``run``, for the client to read
    (:class:`EpochWatch`). Returns None: it never stops training. A failed write is logged
    once and training goes on.
    """

    path: str
    run: str
    n_epochs: int
    _last: float = dataclasses.field(default=-math.inf, repr=False)
    _failed: bool = dataclasses.field(default=False, repr=False)

    def __call__(self, epoch: int, loss: float) -> None:
        self._write(int(epoch) + 1, float(loss), force=epoch + 1 >= self.n_epochs)

    def within(self, epochs: float) -> None:
        """Progress within an epoch (the trainer's ``within_epoch``): ``epochs`` done, as a
        fraction, without a loss."""
        self._write(float(epochs), None, force=False)

    def _write(self, epochs: float, loss: float | None, force: bool) -> None:
        now = time.monotonic()
        if now - self._last < REPORT_EVERY_S and not force:
            return
        self._last = now
        try:
            write_json_atomic(self.path, {"run": self.run, "epoch": epochs,
                                          "n_epochs": int(self.n_epochs),
                                          "loss": loss, "time": time.time()})
        except OSError as exc:
            if not self._failed:
                self._failed = True
                logger.warning("cannot write the training progress to %s: %s", self.path, exc)


class EpochWatch:
    """The client's side of :class:`EpochReport`: :meth:`poll` reads the file and moves
    ``bar`` (epochs, loss; the bar's periodic log lines carry the ETA)."""

    def __init__(self, report: EpochReport, bar: Progress) -> None:
        self.report, self.bar = report, bar
        self._stamp: tuple[int, int, int] | None = None

    def poll(self) -> None:
        """Read the report when it changed; redraw the bar either way."""
        try:
            st = os.stat(self.report.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # each write is a new file
            if stamp != self._stamp:
                with open(self.report.path) as fh:
                    doc = json.load(fh)
                self._stamp = stamp
                if doc.get("run") == self.report.run:
                    loss = doc.get("loss")
                    self.bar.update(_count(doc["epoch"]),
                                    postfix="" if loss is None else f"loss {float(loss):.4f}")
                    return
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, or another run's
            pass
        self.bar.tick()


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
            try:  # seconds computing the group's finished tasks
                busy = float(tg.all_durations.get("compute", 0.0))
            except Exception:  # older schedulers
                busy = 0.0
            groups[str(name)] = (sum(states.values()),
                                 sum(states.get(s, 0) for s in done_states), busy)
        mem = threads = 0
        for ws in dask_scheduler.workers.values():
            threads += int(getattr(ws, "nthreads", 0) or 0)
            try:
                mem = max(mem, int(ws.memory.process))
            except Exception:  # older schedulers
                mem = max(mem, int(getattr(ws, "metrics", {}).get("memory", 0)))
        return groups, mem, threads

    return lambda: client.run_on_scheduler(poll)


def work_left(groups: Any, threads: int) -> float | None:
    """Seconds left for a stage's Dask tasks, from ``(total, done, compute seconds)`` per
    task group: each group's unfinished tasks at its finished ones' mean compute time,
    spread over the cluster's ``threads`` (or fewer tasks). None while a group with tasks
    left has finished none: its cost is unknown (a partitioned kNN's search tasks cost
    hundreds of its split tasks, so a count of tasks says little)."""
    work, left = 0.0, 0
    for total, done, busy in groups:
        if total <= done:
            continue
        if done <= 0 or busy <= 0:
            return None
        work += (total - done) * busy / done
        left += total - done
    return work / max(1, min(int(threads or 1), left)) if left else None


class _LocalTasks:
    """Counts and times the tasks of dask's local schedulers through its callbacks, per task
    group (a key's name without its token), as the scheduler's poll does on a cluster."""

    def __init__(self) -> None:
        self._groups: dict[str, list] = {}  # group -> [total, done, seconds]
        self._started: dict[Any, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def groups(self) -> dict[str, tuple[int, int, float]]:
        """``(total, done, seconds)`` of each task group so far (for :func:`work_left`)."""
        with self._lock:
            return {name: tuple(g) for name, g in self._groups.items()}

    @staticmethod
    def threads() -> int:
        """The local scheduler's threads: 1 for the synchronous one, else dask's
        ``num_workers`` or its pool's size."""
        if dask.config.get("scheduler", None) in ("sync", "synchronous", "single-threaded"):
            return 1
        return int(dask.config.get("num_workers", None) or CPU_COUNT)

    def callback(self):
        outer = self

        class _Count(Callback):
            def _start_state(self, dsk, state):
                keys = [*state["ready"], *state["waiting"], *state.get("running", ())]
                with outer._lock:
                    for key in keys:
                        outer._groups.setdefault(key_split(key), [0, 0, 0.0])[0] += 1

            def _pretask(self, key, dsk, state):  # called as a thread takes the task
                with outer._lock:
                    outer._started[key] = (key_split(key), time.perf_counter())

            def _posttask(self, key, result, dsk, state, worker_id):
                with outer._lock:
                    group, t0 = outer._started.pop(key, (key_split(key), None))
                    g = outer._groups.setdefault(group, [0, 0, 0.0])
                    g[1] += 1
                    if t0 is not None:
                        g[2] += time.perf_counter() - t0

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
    seen: dict[str, tuple[int, int, float]] = {}
    if client is not None:
        try:
            poll = _scheduler_poll(client)
            before = poll()[0]
            ignore = set(before)
        except Exception:  # an old or unreachable scheduler: no task progress
            logger.debug("no task progress from the scheduler", exc_info=True)
            poll = None
    bar = Progress(None, name, "task", delay=BAR_DELAY_S)
    local = _LocalTasks()
    peak = {"rss": _rss(), "worker": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            observe()

    def observe() -> None:
        peak["rss"] = max(peak["rss"], _rss())
        if poll is not None:
            try:
                groups, mem, threads = poll()
            except Exception:  # the scheduler busy or gone: the clock still moves
                bar.tick()
                return
            peak["worker"] = max(peak["worker"], mem)
            for gone in set(seen) - set(groups):  # forgotten groups finished
                seen[gone] = (seen[gone][0], seen[gone][0], seen[gone][2])
            for g, group in groups.items():
                if g not in ignore:
                    seen[g] = group
            counts = list(seen.values())
        else:
            counts, threads = list(local.groups().values()), local.threads()
        total, done = sum(c[0] for c in counts), sum(c[1] for c in counts)
        left = work_left(counts, threads)
        with bar._lock:  # once training counts epochs on it (track), tasks no longer
            if total and not bar.adopted:
                bar.update(done, total=total, left=left)
            else:
                bar.tick()

    thread = threading.Thread(target=sample, name=f"pumap-progress-{name}", daemon=True)
    t0 = time.perf_counter()
    cb = local.callback() if client is None else contextlib.nullcontext()
    _stages().append(bar)
    thread.start()
    ok = False
    try:
        with cb:
            yield bar
        ok = True
    finally:
        stop.set()
        thread.join()
        _stages().remove(bar)
        observe()  # the stage's last counts (a short stage may end between two samples)
        peak["rss"] = max(peak["rss"], _rss())
        if timings is not None:
            timings[name] = time.perf_counter() - t0
        if peaks is not None:
            peaks[name] = peak["rss"]
        if worker_peaks is not None and peak["worker"]:
            worker_peaks[name] = peak["worker"]
        if ok and bar.total and not bar.adopted:  # every task ran (some counted before it)
            bar.update(bar.total)
        bar.close()
