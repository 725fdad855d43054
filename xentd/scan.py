"""One-pass validation scans: min, max and a count of non-finite values.

:mod:`xentd.validate` needs the range of every float tensor and whether it holds
NaN or Inf; for FP16 and BF16 it also needs the values widened to float32 for
the kernels. These Numba kernels do both in a single pass at memory speed,
instead of NumPy's separate ``astype``, ``min`` and ``max`` passes.

Widening is exact: FP16 through LLVM's half-to-float extension (the F16C
instruction vcvtph2ps on x86), BF16 as the top half of a float32.

Min and max skip non-finite values (they are counted instead), so the
``llvm.maxnum``/``llvm.minnum`` calls, which carry fast-math flags to be
vectorised, never see a NaN or an infinity.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from xentd.jit import FINITE_MAX, bits_to_float32, finite_range, half_bits_to_float32, kernel_array, serial_and_parallel

# Arrays smaller than this are scanned on one thread: starting the pool costs more.
PARALLEL_MIN = 1 << 16
CHUNK = 1 << 14


def _scan(x):  # type: ignore[no-untyped-def]
    """(min, max, count of NaN/Inf) of a 1-D float array.

    Min and max are only meaningful when the count is 0; non-finite values are
    masked to 0 before they reach them.
    """
    n = x.shape[0]
    chunks = (n + CHUNK - 1) // CHUNK
    los = np.empty(chunks, np.float64)
    his = np.empty(chunks, np.float64)
    bads = np.empty(chunks, np.int64)
    for k in prange(chunks):
        lo, hi, bad = finite_range(x, k * CHUNK, min(n, (k + 1) * CHUNK))
        los[k] = lo
        his[k] = hi
        bads[k] = bad
    lo = FINITE_MAX
    hi = -FINITE_MAX
    for k in range(chunks):
        lo = min(lo, los[k])
        hi = max(hi, his[k])
    return lo, hi, bads.sum()


def _widen(bits, out, half):  # type: ignore[no-untyped-def]
    """Widen FP16 (half=True) or BF16 bit patterns into ``out``."""
    for j in prange(bits.shape[0]):
        out[j] = half_bits_to_float32(bits[j]) if half else bits_to_float32(np.int32(bits[j]) << np.int32(16))


_scan_serial, _scan_parallel = serial_and_parallel(_scan)
_widen_serial, _widen_parallel = serial_and_parallel(_widen)


def scan(x: np.ndarray) -> tuple[float, float, int]:
    """(min, max, NaN/Inf count) of a float32 or float64 array of any shape (C-contiguous)."""
    flat = kernel_array(x.reshape(-1))
    if flat.size == 0:
        return 0.0, 0.0, 0
    lo, hi, bad = (_scan_serial if flat.size < PARALLEL_MIN else _scan_parallel)(flat)
    return float(lo), float(hi), int(bad)


def widen(bits: np.ndarray, out: np.ndarray, *, half: bool) -> tuple[float, float, int]:
    """Widen FP16 (half=True) or BF16 bit patterns into ``out`` (float32, same size,
    C-contiguous) and return its (min, max, NaN/Inf count).

    ``out`` is the caller's, so that a long-running caller can reuse one buffer:
    first-touching a fresh 64 MB array costs more than widening into it.
    """
    if bits.size == 0:
        return 0.0, 0.0, 0
    widen_bits(bits, out, half=half)
    return scan(out)


def widen_bits(bits: np.ndarray, out: np.ndarray, *, half: bool) -> None:
    """Widen FP16 (half=True) or BF16 bit patterns into ``out`` (float32, same size,
    C-contiguous), without the scan: for values something else checks."""
    flat_bits = kernel_array(bits.reshape(-1))
    if flat_bits.size:
        (_widen_serial if flat_bits.size < PARALLEL_MIN else _widen_parallel)(flat_bits, out.reshape(-1), half)


def warmup() -> None:
    """Compile every scan signature validation uses, serial and parallel."""
    for build in (_scan_serial, _scan_parallel):
        for dtype in (np.float32, np.float64):
            build(kernel_array(np.zeros(2, dtype)))
    for widen_build in (_widen_serial, _widen_parallel):
        for half in (True, False):
            widen_build(kernel_array(np.zeros(2, np.uint16)), np.empty(2, np.float32), half)
