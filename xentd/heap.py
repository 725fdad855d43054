"""Keeping CPython's garbage collector off the daemon's long-lived objects.

A full (generation 2) collection walks every container object the process holds.
After start-up that is some 160,000 objects, nearly all of them Numba's and the
imported modules', none of which ever becomes garbage, and the walk took 100 to
125 ms: about once per 8,000 messages of 64 x 10, 12 to 15 us a message, more
than the raw receive of one (BENCHMARKS.md, section j). ``gc.freeze()`` moves what
exists into a generation the collector never walks; objects still go away when
their reference count drops to zero, so only garbage *cycles* among frozen
objects would stay, and freezing right after a ``gc.collect()`` leaves none.

The daemon freezes once the kernels are compiled, again when the background
compile of the multi-threaded kernels ends, and again whenever its number of
models has grown by a quarter since the last freeze: models are the long-lived
objects that traffic adds, and freezing at geometric steps keeps the cost of
the collections themselves, which walk only what was added, bounded.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("xentd")

# Re-freeze when the model count reaches GROWTH times, plus MIN_NEW, what it was at the last freeze.
GROWTH = 1.25
MIN_NEW = 64


class HeapFreezer:
    """When to collect and freeze (see the module doc); called from the daemon's lifecycle."""

    def __init__(self) -> None:
        self._models = 0
        self.freezes = 0

    def freeze(self, models: int, why: str) -> None:
        """Collect what is garbage now, then freeze the rest."""
        started = time.monotonic()
        gc.collect()
        gc.freeze()
        self._models = models
        self.freezes += 1
        log.debug(
            "froze %d objects out of the garbage collector's walks (%s) in %.0f ms",
            gc.get_freeze_count(),
            why,
            (time.monotonic() - started) * 1e3,
        )

    def maybe(self, models: int) -> None:
        """Freeze again if the number of models has grown enough since the last freeze."""
        if models >= self._models * GROWTH + MIN_NEW:
            self.freeze(models, f"{models} models")
