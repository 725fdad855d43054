"""How xentd builds its Numba kernels: a serial and a parallel build of one function.

Small inputs go to the serial build, because starting the thread pool costs
more than the work (~6 us against ~0.4 us for a plain call, measured on the
dev machine); large ones go to the ``parallel=True`` build, whose ``prange``
loops split across cores.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit


def _twin(f: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of ``f`` under another qualname.

    Numba's on-disk cache is keyed by qualname, and a serial and a parallel
    dispatcher of one function share an index: the parallel one then loads the
    serial build from cache. A distinct qualname gives each its own entry.
    """
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    return g


def kernel_array(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, aligned, read-only view of ``a``, copying only when it is not
    already contiguous and aligned.

    Numba compiles one specialisation per array type, and read-only (a frame's
    buffer) and writeable (a conversion) arrays are different types. Every array
    handed to a kernel goes through here, so each dtype has one signature, the
    one warm-up compiles.
    """
    if not (a.flags.c_contiguous and a.flags.aligned):
        a = np.ascontiguousarray(a).copy()
    view = a.view()
    view.flags.writeable = False
    return view


def serial_and_parallel(f: Callable[..., Any]) -> tuple[Any, Any]:
    """(serial build, parallel build) of ``f``, both cached on disk.

    Both use ``error_model="numpy"``: a float division then has no
    zero-divisor check (which raises in Python's model), and loops that divide
    can vectorise. Kernels never divide by zero (validated inputs), and
    inlined helpers compile under their caller's error model.
    """
    return (
        njit(cache=True, error_model="numpy")(f),
        njit(cache=True, parallel=True, error_model="numpy")(_twin(f, "__parallel")),
    )
