"""Keeping CPython's garbage collector off the daemon's long-lived objects.

A full (generation 2) collection walks every container object the process holds.
After start-up that is some 160,000 objects, nearly all of them Numba's and the
imported modules', none of which ever becomes garbage, and the walk took 100 to
125 ms: about once per 8,000 messages of 64 x 10, 12 to 15 us a message, more
than the raw receive of one (BENCHMARKS.md, section j). ``gc.freeze()`` moves what
exists into a generation the collector never walks; objects still go away when
their reference count drops to zero, so only garbage *cycles* among frozen
objects would stay, and freezing right after a ``gc.collect()`` leaves none.

The daemon freezes once the kernels are compiled, again after the background
compile of the multi-threaded kernels ends, and again whenever its number of
models has reached 1.25 times, plus 64, what it was at the last freeze: models
are the long-lived objects that traffic adds, and freezing at geometric steps
keeps the cost of the collections themselves, which walk only what was added,
bounded. Every freeze runs on the daemon's main thread, between drains: the
compile thread only asks for one (:meth:`HeapFreezer.request`), so that no
collection ever runs in the middle of a fold or a scrape's snapshot on another thread.
"""

from __future__ import annotations

import gc
import logging
import threading
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
        # Why another thread asked for a freeze, until the main thread does it.
        self._requested: str | None = None
        self._request_lock = threading.Lock()

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

    def request(self, why: str) -> None:
        """Ask for a freeze at the next :meth:`maybe` (safe from any thread)."""
        with self._request_lock:
            self._requested = why

    def maybe(self, models: int) -> None:
        """Freeze if another thread asked for it, or if the number of models has grown
        enough since the last freeze. Called from the main thread only."""
        with self._request_lock:
            requested, self._requested = self._requested, None
        if requested is not None:
            self.freeze(models, requested)
        elif models >= self._models * GROWTH + MIN_NEW:
            self.freeze(models, f"{models} models")
