"""What xentd can tell about delivery: retried batches and lost messages.

- :class:`RecentBatches` remembers the last ``capacity`` (model, batch_id) pairs
  scored. At-least-once producers resend a batch when unsure it arrived; a
  resent batch whose pair is still remembered is a duplicate and is not scored
  again. The window is part of the state snapshot, so this holds across restarts.
- :class:`SequenceTracker` follows each producer's ``seq`` numbers and counts
  the gaps: messages that left the producer and never arrived (PUB/SUB drops
  them by design when a subscriber falls behind).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class RecentBatches:
    """A bounded, insertion-ordered set of (model, batch_id) pairs."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._seen

    def add(self, key: tuple[str, str]) -> None:
        if self.capacity == 0:
            return
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def items(self) -> list[tuple[str, str]]:
        """Oldest first, as :meth:`restore` takes them."""
        return list(self._seen)

    def restore(self, keys: Iterable[tuple[str, str]]) -> None:
        for key in keys:
            self.add(key)


class SequenceTracker:
    """The last sequence number seen from each producer (at most ``capacity`` producers)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._last: OrderedDict[str, int] = OrderedDict()
        self.gaps = 0
        self.resets = 0

    def __len__(self) -> int:
        return len(self._last)

    def observe(self, producer: str, seq: int) -> int:
        """Record ``seq`` from ``producer``; return how many messages went missing before it.

        A number at or below the last one means the producer restarted (its
        counter began again) or a message arrived out of order; either way the
        stream is followed from there, and nothing is counted as lost.
        """
        last = self._last.pop(producer, None)
        self._last[producer] = seq
        if len(self._last) > self.capacity:
            self._last.popitem(last=False)
        if last is None:
            return 0
        if seq <= last:
            self.resets += 1
            return 0
        missing = seq - last - 1
        self.gaps += missing
        return missing
