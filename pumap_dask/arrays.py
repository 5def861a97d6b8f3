"""Host and device arrays: CuPy detection, copies to the host, torch tensors (DLPack), and
the numba-compiled host kernels of the training loop (:func:`host_kernel`).

The one place that knows about CuPy; imported by training and projection alike, so
projection never imports training code for them.
"""

from __future__ import annotations

from typing import Any, Callable

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
