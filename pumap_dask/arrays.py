"""Host and device arrays: CuPy detection, copies to the host, torch tensors (DLPack), the
numba-compiled host kernels of the training loop (:func:`host_kernel`), and the host
allocator's settings for numeric work inside Dask workers (:func:`reuses_freed_memory`).

The one place that knows about CuPy; imported by training and projection alike, so
projection never imports training code for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from typing import Any, Callable, Iterator

import numpy as np
import torch

_HOST_KERNELS: dict[Callable, Callable] = {}


def host_kernel(fn: Callable, reassociate: bool = False) -> Callable:
    """``fn`` compiled by numba (nopython, GIL released), once per process.

    Compiled on first use and cached on disk (``cache=True``), so importing the package
    never pays numba's import (0.6 s; numba is required, through pynndescent) or a compile.
    ``reassociate`` lets floating-point sums be reordered (and so vectorised); infinities
    and NaNs keep their meaning. A function is compiled with the options of its first call.
    """
    if fn not in _HOST_KERNELS:
        import numba

        fastmath = {"reassoc", "contract"} if reassociate else False
        _HOST_KERNELS[fn] = numba.njit(cache=True, nogil=True, fastmath=fastmath)(fn)
    return _HOST_KERNELS[fn]


# glibc's mallopt parameters, its defaults, and what numeric work inside a worker uses: freed
# blocks up to MMAP_MAX are kept in the heap for reuse instead of being returned to the OS
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_MMAP_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit systems
_TRIM_WHILE_COMPUTING = 1 << 30
_ALLOC_LOCK = threading.Lock()
_ALLOC_USERS = 0


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _fixed_thresholds() -> tuple[int, int] | None:
    """(trim, mmap) thresholds this process was started with, or None when glibc's dynamic
    defaults apply (then nothing needs changing)."""
    trim, mmap = os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if trim is None and mmap is None:
        return None
    try:
        return (int(trim) if trim is not None else _GLIBC_DEFAULT_THRESHOLD,
                int(mmap) if mmap is not None else _GLIBC_DEFAULT_THRESHOLD)
    except ValueError:
        return None


@contextlib.contextmanager
def freed_memory_reused() -> Iterator[None]:
    """Inside: glibc keeps freed blocks (up to 32 MiB each) for reuse; after: the process's
    own settings return and the free memory goes back to the OS.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which fixes glibc's
    thresholds: every temporary above 128 KiB is then mapped and unmapped by the kernel on
    each use. Loops that allocate such temporaries again and again ran slower in a worker
    than in a plain process: tiled exact kNN 1.9x (``benchmarks/worker_allocator.py``,
    ``benchmarks/RESULTS.md``, issue 18; training steps of the default size were not
    affected). Where the process runs with glibc's dynamic defaults, or not on glibc, this
    does nothing.
    """
    global _ALLOC_USERS
    fixed, libc = _fixed_thresholds(), _glibc()
    if fixed is None or libc is None:
        yield
        return
    with _ALLOC_LOCK:
        _ALLOC_USERS += 1
        if _ALLOC_USERS == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_WHILE_COMPUTING)
    try:
        yield
    finally:
        with _ALLOC_LOCK:
            _ALLOC_USERS -= 1
            if _ALLOC_USERS == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, fixed[0])
                libc.mallopt(_M_MMAP_THRESHOLD, fixed[1])
                libc.malloc_trim(0)


def reuses_freed_memory(fn: Callable) -> Callable:
    """``fn`` run inside :func:`freed_memory_reused` (for tasks that run on Dask workers)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with freed_memory_reused():
            return fn(*args, **kwargs)

    return wrapper


def sample_ids(n: int, m: int, seed: int) -> np.ndarray:
    """The sorted ids of a uniform sample of ``m`` of ``n`` rows, fixed by ``seed``: the
    training rows kept for refine, and the rows a ``fit_rows`` fit is fitted on."""
    return np.sort(np.random.default_rng(seed).choice(n, m, replace=False))


def is_cupy(x: Any) -> bool:
    """Whether ``x`` is a CuPy array (checked by type, without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


def to_host(block: Any) -> np.ndarray:
    """A CuPy array (or block) as a numpy array in host memory; numpy passes through."""
    return block.get() if is_cupy(block) else np.asarray(block)


def as_tensor(x: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows as a float32 torch tensor on ``device``.

    A CuPy array is handed over through DLPack (``torch.from_dlpack``, zero copy, no host
    round trip) and stays on its GPU unless ``device`` is the CPU; anything else goes
    through numpy.
    """
    device = torch.device(device)
    if is_cupy(x):  # a host copy only when asked for by a CPU device
        return torch.from_dlpack(x).to(device=device, dtype=torch.float32).contiguous()
    t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    return t.to(device) if device.type != "cpu" else t


def cupy_module():
    """The cupy module (only ever imported for CuPy data, so never where it is absent)."""
    import cupy

    return cupy
