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

import dataclasses
import functools
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from xentd import accumulate as acc
from xentd.config import LimitsConfig, WindowsConfig
from xentd.delivery import RecentBatches, SequenceTracker
from xentd.errors import Reason, ValidationError
from xentd.kernels import SampleScores

_NO_WEIGHTS = np.empty(0, np.float64)
_NO_WEIGHTS.flags.writeable = False


def class_slots(num_classes: int, class_limit: int) -> int:
    return num_classes if num_classes <= class_limit else class_limit + 1


@functools.lru_cache(maxsize=256)
def class_labels(num_classes: int, class_limit: int) -> tuple[str, ...]:
    labels = [str(c) for c in range(min(num_classes, class_limit))]
    if num_classes > class_limit:
        labels.append("other")
    return tuple(labels)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Derived values of one window. Ratios are NaN when the window holds no weight."""

    samples: float
    weight: float
    cross_entropy: float
    accuracy: float
    focal_loss: float
    balanced_cross_entropy: float


def derive_all(matrix: np.ndarray, slots: int) -> list[WindowStats]:
    """:class:`WindowStats` for every row of a (windows, stat vector) matrix."""
    out = np.empty((matrix.shape[0], 6))
    acc.derive_rows(matrix, slots, out)
    return [WindowStats(*row) for row in out.tolist()]


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

    def __init__(
        self, name: str, num_classes: int, windows: WindowsConfig, limits: LimitsConfig, created: float
    ) -> None:
        self.name = name
        self.num_classes = num_classes
        self.class_limit = limits.class_limit
        self.slots = class_slots(num_classes, limits.class_limit)
        size = acc.vector_size(self.slots)
        self.lifetime = np.zeros(size)
        self.bounds = np.asarray(limits.loss_buckets, np.float64)
        self.hist = np.zeros(len(limits.loss_buckets) + 1, np.int64)
        self.hist_scratch = np.zeros_like(self.hist)
        self.loss_sum = 0.0
        self.batches = 0
        self.unnormalized_rows = 0
        # Target rows scored as sent although they are not a distribution (soft rows off 1, multi-hot rows).
        self.unnormalized_targets = 0
        # Rejected batches of this model, by reason value; only models with state get these.
        self.rejected: dict[str, int] = {}
        self.last_batch_time = created
        self.last_event_time: float | None = None
        self.clock = created  # never goes backwards, so buckets stay monotone
        self.time_windows = [_TimeWindow(w.label, w.seconds, windows.buckets, size) for w in windows.time]
        self.count_sizes = tuple(windows.count)
        # The row labels of window_matrix, in its order.
        self.window_labels = (*(w.label for w in windows.time), *(f"last_{k}" for k in windows.count), "ewma")
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

    # --- persistence (the file format is xentd.persist's) -------------------------

    _SCALARS = (
        "num_classes",
        "loss_sum",
        "batches",
        "unnormalized_rows",
        "unnormalized_targets",
        "rejected",
        "last_batch_time",
        "last_event_time",
        "clock",
        "count_total",
        "ewma_time",
    )

    def export(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Copies of everything needed to rebuild this state: (scalars, arrays)."""
        scalars = {k: getattr(self, k) for k in self._SCALARS}
        scalars["rejected"] = dict(self.rejected)
        arrays: dict[str, np.ndarray] = {
            "lifetime": self.lifetime.copy(),
            "hist": self.hist.copy(),
            "ewma": self.ewma.copy(),
            "ring": self.ring.copy(),
            "ring_cls": self.ring_cls.copy(),
            "blocks": self.blocks.copy(),
        }
        if self.time_windows:
            arrays["tw_epochs"] = np.stack([tw.epochs for tw in self.time_windows])
            arrays["tw_buckets"] = np.stack([tw.buckets for tw in self.time_windows])
        return scalars, arrays

    def restore(self, scalars: dict[str, object], arrays: dict[str, np.ndarray], *, windows: bool) -> None:
        """Load what :meth:`export` produced. With ``windows=False`` (the window
        configuration changed) only the lifetime totals come back."""

        def shaped(name: str, like: np.ndarray) -> np.ndarray:
            a = arrays[name]
            if a.shape != like.shape or a.dtype != like.dtype:
                raise ValueError(f"{name}: shape {a.shape} {a.dtype}, expected {like.shape} {like.dtype}")
            return a.copy()

        self.lifetime = shaped("lifetime", self.lifetime)
        self.hist = shaped("hist", self.hist)
        for k in ("loss_sum", "last_batch_time", "clock"):
            setattr(self, k, float(scalars[k]))  # type: ignore[arg-type]
        self.batches = int(scalars["batches"])  # type: ignore[call-overload]
        self.unnormalized_rows = int(scalars["unnormalized_rows"])  # type: ignore[call-overload]
        # Absent from snapshots written before these counters existed.
        self.unnormalized_targets = int(scalars.get("unnormalized_targets", 0))  # type: ignore[call-overload]
        rejected = scalars.get("rejected") or {}
        self.rejected = {str(k): int(v) for k, v in rejected.items()}  # type: ignore[attr-defined]
        event = scalars["last_event_time"]
        self.last_event_time = None if event is None else float(event)  # type: ignore[arg-type]
        if not windows:
            return
        self.ewma = shaped("ewma", self.ewma)
        self.ewma_time = float(scalars["ewma_time"])  # type: ignore[arg-type]
        self.blocks = shaped("blocks", self.blocks)
        ring, ring_cls = arrays["ring"], arrays["ring_cls"]
        if (
            ring.ndim != 2
            or ring.shape[1] != 4
            or ring.shape[0] > self.count_cap_max
            or ring_cls.shape != (ring.shape[0],)
        ):
            raise ValueError(f"ring: shape {ring.shape}, classes {ring_cls.shape}")
        self.ring, self.ring_cls = ring.astype(np.float64), ring_cls.astype(np.int32)
        self.count_total = int(scalars["count_total"])  # type: ignore[call-overload]
        if self.time_windows:
            epochs = shaped("tw_epochs", np.stack([tw.epochs for tw in self.time_windows]))
            buckets = shaped("tw_buckets", np.stack([tw.buckets for tw in self.time_windows]))
            for i, tw in enumerate(self.time_windows):
                tw.epochs, tw.buckets = epochs[i].copy(), buckets[i].copy()

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

    def fold(
        self,
        scores: SampleScores,
        weights: np.ndarray | None,
        now: float,
        event_time: float | None,
        batches: int = 1,
        unnormalized_targets: int = 0,
    ) -> bool:
        """Add scored samples (``batches`` messages' worth, concatenated in arrival order).

        ``unnormalized_targets`` is the batches' count of target rows that are not a
        distribution (see :attr:`xentd.validate.Batch.unnormalized_targets`).

        Returns whether any sample's class was past the class limit (folded into "other").
        """
        weighted = weights is not None
        w = weights if weights is not None else _NO_WEIGHTS
        vec = self.scratch
        vec[:] = 0.0
        hist = self.hist_scratch
        hist[:] = 0
        loss_sum = self.loss_sum + acc.fold_batch(
            scores.loss,
            scores.focal,
            scores.correct,
            scores.true_class,
            w,
            weighted,
            self.class_limit,
            self.slots,
            self.bounds,
            vec,
            hist,
        )
        with np.errstate(over="ignore", invalid="ignore"):
            lifetime = self.lifetime + vec
        # Finite inputs can still overflow float64 (FP64 logits near 1e308, weights
        # near 1e308). Scores and weights are >= 0, so every window and class sum is
        # at most its lifetime total: if those stay finite, everything does.
        if not (np.isfinite(lifetime[: acc.HEAD]).all() and np.isfinite(loss_sum)):
            raise ValidationError(
                Reason.NON_FINITE,
                f"the batch's weighted losses overflow float64 (model {self.name!r} totals would become infinite)",
            )
        self.clock = max(self.clock, now)
        now = self.clock
        self.loss_sum = loss_sum
        self.hist += hist
        self.lifetime = lifetime
        for tw in self.time_windows:
            acc.time_add(tw.epochs, tw.buckets, tw.index(now), vec)
        decay = 2.0 ** (-(now - self.ewma_time) / self.half_life)
        self.ewma *= decay
        self.ewma += vec
        self.ewma_time = now
        if self.count_cap_max:
            self._grow_ring(scores.loss.shape[0])
            self.count_total = acc.count_push(
                scores.loss,
                scores.focal,
                scores.correct,
                scores.true_class,
                w,
                weighted,
                self.class_limit,
                self.slots,
                self.ring,
                self.ring_cls,
                self.blocks,
                self.block,
                self.count_total,
            )
        self.batches += batches
        self.unnormalized_rows += scores.unnormalized_rows
        self.unnormalized_targets += unnormalized_targets
        self.last_batch_time = now
        if event_time is not None:
            self.last_event_time = event_time
        return (
            self.num_classes > self.class_limit
            and scores.true_class.shape[0] > 0
            and int(scores.true_class.max()) >= self.class_limit
        )

    def window_matrix(self, now: float) -> np.ndarray:
        """Every window's stat vector, one row each, in :attr:`window_labels` order.

        Cheap (a few Numba calls), so it can run under the state lock; deriving
        means from it can then happen outside. The ewma row's sample count is
        decayed to ``now``; its other entries are ratios' numerators and
        denominators, which decay alike.
        """
        now = max(now, self.clock)
        out = np.empty((len(self.time_windows) + len(self.count_sizes) + 1, self.lifetime.shape[0]))
        for i, tw in enumerate(self.time_windows):
            acc.time_read(tw.epochs, tw.buckets, tw.index(now), out[i])
        base = len(self.time_windows)
        for k, size in enumerate(self.count_sizes):
            acc.count_read(
                self.ring, self.ring_cls, self.blocks, self.block, self.count_total, size, self.slots, out[base + k]
            )
        out[-1] = self.ewma
        out[-1, acc.N] = float(self.ewma[acc.N]) * 2.0 ** (-(now - self.ewma_time) / self.half_life)
        return out

    def windows(self, now: float) -> list[tuple[str, WindowStats]]:
        return list(zip(self.window_labels, derive_all(self.window_matrix(now), self.slots), strict=True))


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    name: str
    samples: float
    weight: float
    loss_weighted_sum: float
    correct_weighted_sum: float
    batches: int
    unnormalized_rows: int
    unnormalized_targets: int
    rejected: dict[str, int]  # reason value -> rejected batches of this model
    last_batch_time: float
    last_event_time: float | None
    class_labels: tuple[str, ...]
    class_weight: np.ndarray
    class_loss_weighted_sum: np.ndarray
    hist_bounds: np.ndarray
    hist_counts: np.ndarray  # per bucket, not cumulative; last is +Inf
    loss_sum: float
    windows: list[tuple[str, WindowStats]]


LIMITS = ("max_models", "allowed_models", "class_limit")


@dataclass
class Counters:
    """Daemon-wide counts and gauges. Persisted counts survive restarts; the rest describe this process."""

    messages: int = 0
    duplicate_batches: int = 0
    # Well-formed batches of zero rows: counted, otherwise ignored (docs/protocol.md).
    empty_batches: int = 0
    sequence_gaps: int = 0
    models_evicted: int = 0
    limit_hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LIMITS, 0))
    # This process only:
    ingest_disconnects: int = 0
    ingest_auth_failures: int = 0
    snapshots_written: int = 0
    snapshot_failures: int = 0
    last_snapshot_time: float | None = None
    last_snapshot_seconds: float | None = None
    last_snapshot_bytes: int | None = None
    restored_models: int = 0

    PERSISTED = ("messages", "duplicate_batches", "empty_batches", "sequence_gaps", "models_evicted", "limit_hits")

    def copy(self) -> Counters:
        return dataclasses.replace(self, limit_hits=dict(self.limit_hits))


@dataclass(frozen=True, slots=True)
class Snapshot:
    models: list[ModelSnapshot]
    rejected: dict[str, int]
    counters: Counters


class StateStore:
    """Every model's state plus the daemon-wide counters, behind one lock."""

    def __init__(
        self, windows: WindowsConfig, limits: LimitsConfig, clock: Callable[[], float], *, dedup_window: int = 0
    ) -> None:
        self.windows_cfg = windows
        self.limits = limits
        self.clock = clock
        self.lock = threading.Lock()
        self.models: dict[str, ModelState] = {}
        self.rejected: Counter[str] = Counter({r.value: 0 for r in Reason})
        self.counters = Counters()
        self.recent = RecentBatches(dedup_window)
        self.sequences = SequenceTracker()

    def model(self, name: str, num_classes: int) -> ModelState:
        """The model's state, created on first sight. Call with the lock held."""
        state = self.models.get(name)
        if state is None:
            if not self.limits.admits(name):
                self.counters.limit_hits["allowed_models"] += 1
                raise ValidationError(
                    Reason.MODEL_NOT_ALLOWED,
                    f"model {name!r} is not in limits.allowed_models and does not match limits.model_pattern",
                )
            if len(self.models) >= self.limits.max_models:
                self.counters.limit_hits["max_models"] += 1
                raise ValidationError(
                    Reason.TOO_MANY_MODELS, f"model {name!r} would exceed limits.max_models={self.limits.max_models}"
                )
            state = self.add_model(name, num_classes)
        elif state.num_classes != num_classes:
            raise ValidationError(
                Reason.CLASS_COUNT_CHANGED, f"model {name!r} has {state.num_classes} classes, batch has {num_classes}"
            )
        return state

    def add_model(self, name: str, num_classes: int) -> ModelState:
        """A new, empty model, without the admission checks of :meth:`model` (restores use it)."""
        state = ModelState(name, num_classes, self.windows_cfg, self.limits, self.clock())
        self.models[name] = state
        return state

    def evict_idle(self, now: float) -> list[str]:
        """Drop models with no batch for ``limits.model_ttl_seconds``. Call with the lock held."""
        ttl = self.limits.model_ttl_seconds
        if ttl is None:
            return []
        idle = [name for name, m in self.models.items() if now - m.last_batch_time > ttl]
        for name in idle:
            del self.models[name]
        self.counters.models_evicted += len(idle)
        return idle

    def warmup(self) -> None:
        """Compile the fold kernels through the real code path, on a throwaway model."""
        scores = SampleScores(
            loss=np.ones(2),
            focal=np.ones(2),
            correct=np.ones(2, np.uint8),
            true_class=np.zeros(2, np.int64),
            unnormalized_rows=0,
        )
        weights = np.ones(2)
        weights.flags.writeable = False
        for w in (None, weights):
            scratch = ModelState("warmup", 2, self.windows_cfg, self.limits, self.clock())
            scratch.fold(scores, w, self.clock(), None)
            scratch.windows(self.clock())

    def reject(self, reason: Reason, model: str | None = None) -> None:
        """Count a rejected batch. Call with the lock held. Only a model that already
        has state gets a labelled count, so bad or unknown names create no series."""
        self.rejected[reason.value] += 1
        state = self.models.get(model) if model is not None else None
        if state is not None:
            state.rejected[reason.value] = state.rejected.get(reason.value, 0) + 1

    def snapshot(self) -> Snapshot:
        """A consistent copy of all state. The lock is held only to copy raw sums;
        means and labels are derived after it is released, so scrapes of many
        models do not stall ingestion."""
        with self.lock:
            now = self.clock()
            raw = [
                (
                    m.name,
                    m.num_classes,
                    m.class_limit,
                    m.slots,
                    m.lifetime.copy(),
                    m.hist.copy(),
                    m.bounds,
                    m.loss_sum,
                    m.batches,
                    m.unnormalized_rows,
                    m.unnormalized_targets,
                    dict(m.rejected),
                    m.last_batch_time,
                    m.last_event_time,
                    m.window_labels,
                    m.window_matrix(now),
                )
                for m in self.models.values()
            ]
            rejected = dict(self.rejected)
            counters = self.counters.copy()
        models = []
        for (
            name,
            num_classes,
            class_limit,
            s,
            life,
            hist,
            bounds,
            loss_sum,
            batches,
            unnorm,
            unnorm_targets,
            model_rejected,
            last_batch,
            last_event,
            labels,
            matrix,
        ) in raw:
            models.append(
                ModelSnapshot(
                    name=name,
                    samples=float(life[acc.N]),
                    weight=float(life[acc.SW]),
                    loss_weighted_sum=float(life[acc.SWL]),
                    correct_weighted_sum=float(life[acc.SWC]),
                    batches=batches,
                    unnormalized_rows=unnorm,
                    unnormalized_targets=unnorm_targets,
                    rejected=model_rejected,
                    last_batch_time=last_batch,
                    last_event_time=last_event,
                    class_labels=class_labels(num_classes, class_limit),
                    class_weight=life[acc.HEAD : acc.HEAD + s],
                    class_loss_weighted_sum=life[acc.HEAD + s : acc.HEAD + 2 * s],
                    hist_bounds=bounds,
                    hist_counts=hist,
                    loss_sum=loss_sum,
                    windows=list(zip(labels, derive_all(matrix, s), strict=True)),
                )
            )
        return Snapshot(models=models, rejected=rejected, counters=counters)
