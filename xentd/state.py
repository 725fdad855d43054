"""Rolling statistics per model, and the consistent snapshot the exporter reads.

For each model xentd keeps:

- lifetime totals (a stat vector, see :mod:`xentd.accumulate`) and a loss histogram;
- time windows: a ring of ``buckets`` buckets per window. A read covers the
  current bucket and the ``buckets - 1`` before it, so it spans between
  ``W - W/buckets`` and ``W`` of history: exact to one bucket width;
- count windows over the last K samples, exact: a ring of per-sample values that
  grows with traffic up to the largest K and never beyond, plus sums over blocks
  of ~sqrt(K) samples. A read adds the whole blocks inside the window and the
  single samples at its edges. Nothing is ever subtracted, so nothing drifts;
- an EWMA with a time half-life: both sums decay by 2^(-dt/half_life).

Memory per model is bounded by the config, not by traffic. All updates happen
under :attr:`StateStore.lock`; :meth:`StateStore.snapshot` copies everything out
under the same lock, so a scrape never sees half a batch.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from xentd import accumulate as acc
from xentd.config import LimitsConfig, WindowsConfig
from xentd.errors import Reason, ValidationError
from xentd.kernels import SampleScores

_NO_WEIGHTS = np.empty(0, np.float64)
_NO_WEIGHTS.flags.writeable = False


def class_slots(num_classes: int, class_limit: int) -> int:
    return num_classes if num_classes <= class_limit else class_limit + 1


def class_labels(num_classes: int, class_limit: int) -> list[str]:
    labels = [str(c) for c in range(min(num_classes, class_limit))]
    if num_classes > class_limit:
        labels.append("other")
    return labels


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Derived values of one window. Ratios are NaN when the window holds no weight."""

    samples: float
    weight: float
    cross_entropy: float
    accuracy: float
    focal_loss: float
    balanced_cross_entropy: float


def derive(vec: np.ndarray, slots: int, samples: float | None = None) -> WindowStats:
    sw = float(vec[acc.SW])
    cw = vec[acc.HEAD: acc.HEAD + slots]
    cwl = vec[acc.HEAD + slots: acc.HEAD + 2 * slots]
    present = cw > 0.0
    if sw > 0.0:
        ce, accuracy, focal = vec[acc.SWL] / sw, vec[acc.SWC] / sw, vec[acc.SWF] / sw
    else:
        ce = accuracy = focal = math.nan
    balanced = float(np.mean(cwl[present] / cw[present])) if present.any() else math.nan
    return WindowStats(
        samples=float(vec[acc.N]) if samples is None else samples, weight=sw,
        cross_entropy=float(ce), accuracy=float(accuracy), focal_loss=float(focal),
        balanced_cross_entropy=balanced,
    )


class _TimeWindow:
    __slots__ = ("label", "width", "epochs", "buckets")

    def __init__(self, label: str, seconds: float, buckets: int, size: int) -> None:
        self.label = label
        self.width = seconds / buckets
        self.epochs = np.full(buckets, -(1 << 62), np.int64)
        self.buckets = np.zeros((buckets, size), np.float64)

    def index(self, now: float) -> int:
        return int(now // self.width)


class ModelState:
    """All rolling state of one model. Mutated only by :class:`StateStore`."""

    def __init__(self, name: str, num_classes: int, windows: WindowsConfig, limits: LimitsConfig,
                 created: float) -> None:
        self.name = name
        self.num_classes = num_classes
        self.class_limit = limits.class_limit
        self.slots = class_slots(num_classes, limits.class_limit)
        size = acc.vector_size(self.slots)
        self.lifetime = np.zeros(size)
        self.bounds = np.asarray(limits.loss_buckets, np.float64)
        self.hist = np.zeros(len(limits.loss_buckets) + 1, np.int64)
        self.loss_sum = 0.0
        self.batches = 0
        self.unnormalized_rows = 0
        self.last_batch_time = created
        self.last_event_time: float | None = None
        self.clock = created  # never goes backwards, so buckets stay monotone
        self.time_windows = [_TimeWindow(w.label, w.seconds, windows.buckets, size) for w in windows.time]
        self.count_sizes = tuple(windows.count)
        self.count_total = 0
        self.count_cap_max = max(windows.count, default=0)
        self.block = acc.block_size(self.count_cap_max)
        # The current, partial block plus enough complete ones to cover the largest window.
        self.blocks = np.zeros((self.count_cap_max // self.block + 2, size))
        self.ring = np.zeros((0, 4))
        self.ring_cls = np.zeros(0, np.int32)
        self.half_life = windows.ewma_half_life_seconds
        self.ewma = np.zeros(size)
        self.ewma_time = created
        self.scratch = np.zeros(size)

    def _grow_ring(self, incoming: int) -> None:
        needed = min(self.count_cap_max, self.count_total + incoming)
        cap = self.ring.shape[0]
        if cap >= needed:
            return
        # Below the largest window the ring has never wrapped, so the samples are in order.
        new_cap = min(self.count_cap_max, max(needed, 2 * cap, 256))
        ring = np.zeros((new_cap, 4))
        ring_cls = np.zeros(new_cap, np.int32)
        ring[:cap] = self.ring
        ring_cls[:cap] = self.ring_cls
        self.ring, self.ring_cls = ring, ring_cls

    def fold(self, scores: SampleScores, weights: np.ndarray | None, now: float,
             event_time: float | None, batches: int = 1) -> None:
        """Add scored samples (``batches`` messages' worth, concatenated in arrival order)."""
        self.clock = max(self.clock, now)
        now = self.clock
        weighted = weights is not None
        w = weights if weights is not None else _NO_WEIGHTS
        vec = self.scratch
        vec[:] = 0.0
        self.loss_sum += acc.fold_batch(scores.loss, scores.focal, scores.correct, scores.true_class, w,
                                        weighted, self.class_limit, self.slots, self.bounds, vec, self.hist)
        self.lifetime += vec
        for tw in self.time_windows:
            acc.time_add(tw.epochs, tw.buckets, tw.index(now), vec)
        decay = 2.0 ** (-(now - self.ewma_time) / self.half_life)
        self.ewma *= decay
        self.ewma += vec
        self.ewma_time = now
        if self.count_cap_max:
            self._grow_ring(scores.loss.shape[0])
            self.count_total = acc.count_push(
                scores.loss, scores.focal, scores.correct, scores.true_class, w, weighted,
                self.class_limit, self.slots, self.ring, self.ring_cls, self.blocks, self.block,
                self.count_total)
        self.batches += batches
        self.unnormalized_rows += scores.unnormalized_rows
        self.last_batch_time = now
        if event_time is not None:
            self.last_event_time = event_time

    def windows(self, now: float) -> list[tuple[str, WindowStats]]:
        now = max(now, self.clock)
        out: list[tuple[str, WindowStats]] = []
        buf = np.zeros_like(self.lifetime)
        for tw in self.time_windows:
            acc.time_read(tw.epochs, tw.buckets, tw.index(now), buf)
            out.append((tw.label, derive(buf, self.slots)))
        for size in self.count_sizes:
            acc.count_read(self.ring, self.ring_cls, self.blocks, self.block, self.count_total, size,
                           self.slots, buf)
            out.append((f"last_{size}", derive(buf, self.slots)))
        decayed_n = float(self.ewma[acc.N]) * 2.0 ** (-(now - self.ewma_time) / self.half_life)
        out.append(("ewma", derive(self.ewma, self.slots, samples=decayed_n)))
        return out


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    name: str
    samples: float
    weight: float
    loss_weighted_sum: float
    correct_weighted_sum: float
    batches: int
    unnormalized_rows: int
    last_batch_time: float
    last_event_time: float | None
    class_labels: list[str]
    class_weight: np.ndarray
    class_loss_weighted_sum: np.ndarray
    hist_bounds: np.ndarray
    hist_counts: np.ndarray  # per bucket, not cumulative; last is +Inf
    loss_sum: float
    windows: list[tuple[str, WindowStats]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    models: list[ModelSnapshot]
    rejected: dict[str, int]
    messages: int


class StateStore:
    """Every model's state plus the daemon-wide counters, behind one lock."""

    def __init__(self, windows: WindowsConfig, limits: LimitsConfig,
                 clock: Callable[[], float]) -> None:
        self.windows_cfg = windows
        self.limits = limits
        self.clock = clock
        self.lock = threading.Lock()
        self.models: dict[str, ModelState] = {}
        self.rejected: Counter[str] = Counter({r.value: 0 for r in Reason})
        self.messages = 0

    def model(self, name: str, num_classes: int) -> ModelState:
        """The model's state, created on first sight. Call with the lock held."""
        state = self.models.get(name)
        if state is None:
            if len(self.models) >= self.limits.max_models:
                raise ValidationError(Reason.TOO_MANY_MODELS,
                                      f"model {name!r} would exceed limits.max_models={self.limits.max_models}")
            state = ModelState(name, num_classes, self.windows_cfg, self.limits, self.clock())
            self.models[name] = state
        elif state.num_classes != num_classes:
            raise ValidationError(Reason.CLASS_COUNT_CHANGED,
                                  f"model {name!r} has {state.num_classes} classes, batch has {num_classes}")
        return state

    def warmup(self) -> None:
        """Compile the fold kernels through the real code path, on a throwaway model."""
        scores = SampleScores(loss=np.ones(2), focal=np.ones(2), correct=np.ones(2, np.uint8),
                              true_class=np.zeros(2, np.int64), unnormalized_rows=0)
        weights = np.ones(2)
        weights.flags.writeable = False
        for w in (None, weights):
            scratch = ModelState("warmup", 2, self.windows_cfg, self.limits, self.clock())
            scratch.fold(scores, w, self.clock(), None)
            scratch.windows(self.clock())

    def reject(self, reason: Reason) -> None:
        self.rejected[reason.value] += 1

    def snapshot(self) -> Snapshot:
        with self.lock:
            now = self.clock()
            models = []
            for m in self.models.values():
                s = m.slots
                models.append(ModelSnapshot(
                    name=m.name, samples=float(m.lifetime[acc.N]), weight=float(m.lifetime[acc.SW]),
                    loss_weighted_sum=float(m.lifetime[acc.SWL]),
                    correct_weighted_sum=float(m.lifetime[acc.SWC]),
                    batches=m.batches, unnormalized_rows=m.unnormalized_rows,
                    last_batch_time=m.last_batch_time, last_event_time=m.last_event_time,
                    class_labels=class_labels(m.num_classes, m.class_limit),
                    class_weight=m.lifetime[acc.HEAD: acc.HEAD + s].copy(),
                    class_loss_weighted_sum=m.lifetime[acc.HEAD + s: acc.HEAD + 2 * s].copy(),
                    hist_bounds=m.bounds, hist_counts=m.hist.copy(), loss_sum=m.loss_sum,
                    windows=m.windows(now),
                ))
            return Snapshot(models=models, rejected=dict(self.rejected), messages=self.messages)
