"""The cost of the entropy's sum p log p in the probabilities kernels, a value at a time.

Usage:
    .venv/bin/python scripts/plogp_probe.py [--values 4194304]

Until 2026-12-08 the kernels summed ``cpu._plogp`` over each row in a strictly
compiled loop: without fast-math, LLVM may not reorder the sum, so the loop
stayed scalar and every value paid a scalar ``log64``. This probe times that
loop against the same values mapped into a buffer (an elementwise loop, which
vectorises without reordering anything) and summed by a fast-math reduction,
with ``log64`` and with the float32 ``log32`` that float32 rows take now (mapped
a block of ``cpu.BLOCK`` at a time, as ``cpu._plogp_sum`` does), on uniform
float32 probabilities, and prints the relative difference of each sum from the
strict one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from numba import njit

from xentd.kernels.cpu import BLOCK, _plogp, _plogp_sum


@njit(error_model="numpy")
def _strict(x):  # type: ignore[no-untyped-def]
    t = 0.0
    for j in range(x.shape[0]):
        t += _plogp(np.float64(x[j]))
    return t


@njit(error_model="numpy")
def _mapped(x, out):  # type: ignore[no-untyped-def]
    for j in range(x.shape[0]):
        out[j] = _plogp(np.float64(x[j]))


@njit(fastmath=True)
def _fast_sum(a):  # type: ignore[no-untyped-def]
    t = 0.0
    for j in range(a.shape[0]):
        t += a[j]
    return t


@njit(error_model="numpy")
def _blocked32(x, scratch):  # type: ignore[no-untyped-def]
    return _plogp_sum(x, scratch)


def _best(f: Callable[[], float], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=1 << 22)
    args = parser.parse_args()
    x = np.random.default_rng(0).random(args.values).astype(np.float32)
    out = np.empty(x.size)

    def mapped() -> float:
        _mapped(x, out)
        return float(_fast_sum(out))

    scratch = np.empty(BLOCK, np.float32)
    strict = float(_strict(x))
    cases: list[tuple[str, Callable[[], float]]] = [
        ("strict reduction, log64 (the kernels until 2026-12-08)", lambda: float(_strict(x))),
        ("map + fast-math sum, log64", mapped),
        ("map by blocks + fast-math sum, log32 (float32 rows now)", lambda: float(_blocked32(x, scratch))),
    ]
    for name, f in cases:
        total = f()
        print(
            f"{name}: {_best(f) / x.size * 1e9:.2f} ns a value,"
            f" sum off the strict one by {abs(total - strict) / abs(strict):.2e}"
        )


if __name__ == "__main__":
    main()
