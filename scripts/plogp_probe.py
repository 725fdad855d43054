"""Why the probabilities kernels slowed down with the fused entropy: the cost of sum p log p.

Usage:
    .venv/bin/python scripts/plogp_probe.py [--values 4194304]

The kernels sum ``cpu._plogp`` over each row in a strictly compiled loop
(``_entropy_sum``): without fast-math, LLVM may not reorder the sum, so the loop
stays scalar and every value pays a scalar ``log64``. This probe times that loop
against the same values mapped into a buffer (an elementwise loop, which
vectorises without reordering anything) and summed by a fast-math reduction, on
uniform float32 probabilities, and prints the relative difference of the two sums.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from numba import njit

from xentd.kernels.cpu import _plogp


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

    strict = float(_strict(x))
    both = mapped()
    cases: list[tuple[str, Callable[[], float]]] = [
        ("strict reduction (the kernels today)", lambda: float(_strict(x))),
        ("map + fast-math sum", mapped),
    ]
    for name, f in cases:
        print(f"{name}: {_best(f) / x.size * 1e9:.2f} ns a value")
    print(f"relative difference of the sums: {abs(strict - both) / abs(strict):.2e}")


if __name__ == "__main__":
    main()
