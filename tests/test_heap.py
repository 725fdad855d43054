"""The daemon's heap freezer: what it freezes, and when it freezes again."""

from __future__ import annotations

import gc
import threading
import weakref

from xentd.heap import GROWTH, MIN_NEW, HeapFreezer


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freeze_collects_cycles_first_and_freezes_the_rest() -> None:
    gc.unfreeze()
    kept = _Cycle()
    garbage = _Cycle()
    gone = weakref.ref(garbage)
    del garbage
    assert gone() is not None  # a cycle: only the collector frees it
    freezer = HeapFreezer()
    freezer.freeze(0, "test")
    assert freezer.freezes == 1
    # The cycle that was garbage was collected, not frozen (a frozen cycle would live forever).
    assert gone() is None
    # The live one is frozen: out of every generation the collector walks.
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())


def test_refreezes_when_models_grow_by_a_quarter() -> None:
    freezer = HeapFreezer()
    freezer.freeze(1000, "test")
    threshold = int(1000 * GROWTH + MIN_NEW)
    freezer.maybe(threshold - 1)
    assert freezer.freezes == 1
    freezer.maybe(threshold)
    assert freezer.freezes == 2
    freezer.maybe(threshold)  # counted from the new freeze now
    assert freezer.freezes == 2
    # Fewer models (evicted) never trigger a freeze.
    freezer.maybe(10)
    assert freezer.freezes == 2


def test_first_models_trigger_a_freeze_after_start_up() -> None:
    freezer = HeapFreezer()
    freezer.freeze(0, "start-up")
    freezer.maybe(MIN_NEW - 1)
    assert freezer.freezes == 1
    freezer.maybe(MIN_NEW)
    assert freezer.freezes == 2


def test_a_freeze_asked_for_from_another_thread_runs_on_the_next_maybe() -> None:
    freezer = HeapFreezer()
    freezer.freeze(1000, "start-up")
    done = threading.Event()

    def compile_thread() -> None:
        freezer.request("multi-threaded kernels compiled")
        done.set()

    threading.Thread(target=compile_thread).start()
    assert done.wait(10)
    # Nothing froze on the other thread; the caller's next maybe() does it, once.
    assert freezer.freezes == 1
    freezer.maybe(1000)
    assert freezer.freezes == 2
    freezer.maybe(1000)
    assert freezer.freezes == 2
