"""A clock that tests set by hand (shared fixture module)."""

from __future__ import annotations


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
