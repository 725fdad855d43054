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
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xentd import accumulate as acc
from xentd import calibration, joins, predstats
from xentd.calibration import CalibrationStats, CalibrationWindow
from xentd.config import CalibrationConfig, LabelsConfig, LimitsConfig, WindowsConfig
from xentd.delivery import RecentBatches, SequenceTracker
from xentd.errors import Reason, ValidationError
from xentd.fold import CALIBRATION_OVERFLOW, ENTROPY_OVERFLOW, FOLDED, LOSS_OVERFLOW, fold_model
from xentd.jit import cached, kernel_array
from xentd.joins import OUTCOMES, JoinStore
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


class WindowedStats:
    """Stat vectors over every window: lifetime totals, a histogram of the per-sample value,
    time windows, exact count windows and the EWMA (see the module doc).

    One class serves each statistic a model keeps: its scored losses (with class slots)
    and the label-free entropy of its predictions. It saves and restores its own arrays
    (:meth:`save`, :meth:`load`, :meth:`check`), so :mod:`xentd.persist` walks components
    without knowing what they hold. ``count_windows=False`` leaves out the count windows,
    whose sample ring is most of a model's memory.
    """

    # Each array: the dtype kinds it may have, and whether every value must be >= 0.
    # Scores and weights are >= 0 and nothing is ever subtracted, so every sum is too.
    ARRAYS: dict[str, tuple[str, bool]] = {
        "lifetime": ("f", True),
        "hist": ("iu", True),
        "ewma": ("f", True),
        "ring": ("f", True),
        "ring_cls": ("iu", True),
        "blocks": ("f", True),
        "tw_epochs": ("iu", False),  # bucket numbers; the initial ones are far below 0
        "tw_buckets": ("f", True),
    }
    COUNTS = ("count_total",)
    TIMES = ("ewma_time",)
    # Snapshot layout keys (xentd.persist) this component depends on beyond the windows: none.
    LAYOUT: tuple[str, ...] = ()

    def __init__(
        self,
        slots: int,
        class_limit: int,
        bounds: tuple[float, ...],
        windows: WindowsConfig,
        created: float,
        *,
        count_windows: bool = True,
    ) -> None:
        self.slots = slots
        self.class_limit = class_limit
        size = acc.vector_size(slots)
        self.lifetime = np.zeros(size)
        self.bounds = np.asarray(bounds, np.float64)
        self.hist = np.zeros(len(bounds) + 1, np.int64)
        self.hist_scratch = np.zeros_like(self.hist)
        self.value_sum = 0.0  # the unweighted sum of the per-sample value (a histogram's _sum)
        # Time windows, stacked: window t's ring of buckets is tw_buckets[t], the bucket
        # numbers they hold tw_epochs[t], each bucket tw_widths[t] seconds wide.
        self.tw_widths = np.array([w.seconds / windows.buckets for w in windows.time], np.float64)
        self.tw_epochs = np.full((len(windows.time), windows.buckets), -(1 << 62), np.int64)
        self.tw_buckets = np.zeros((len(windows.time), windows.buckets, size))
        # Count windows keep a ring of per-sample values: the bulk of a model's memory.
        self.count_sizes = tuple(windows.count) if count_windows else ()
        # The row labels of window_matrix, in its order.
        self.window_labels = (*(w.label for w in windows.time), *(f"last_{k}" for k in self.count_sizes), "ewma")
        self.count_total = 0
        self.count_cap_max = max(self.count_sizes, default=0)
        self.block = acc.block_size(self.count_cap_max)
        # The current, partial block plus enough complete ones to cover the largest window;
        # like the ring, they grow with traffic up to that bound.
        self.blocks_max = self.count_cap_max // self.block + 2
        self.blocks = np.zeros((0, size))
        self.ring = np.zeros((0, 4))
        self.ring_cls = np.zeros(0, np.int32)
        self.half_life = windows.ewma_half_life_seconds
        self.ewma = np.zeros(size)
        self.ewma_time = created
        self.scratch = np.zeros(size)

    # --- persistence (the file format is xentd.persist's) -------------------------

    def save(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Copies of everything needed to rebuild this component: (scalars, arrays)."""
        scalars: dict[str, object] = {
            "loss_sum": self.value_sum,
            "count_total": self.count_total,
            "ewma_time": self.ewma_time,
        }
        arrays: dict[str, np.ndarray] = {
            "lifetime": self.lifetime.copy(),
            "hist": self.hist.copy(),
            "ewma": self.ewma.copy(),
            "ring": self.ring.copy(),
            "ring_cls": self.ring_cls.copy(),
            "blocks": self.blocks.copy(),
        }
        if self.tw_widths.size:
            arrays["tw_epochs"] = self.tw_epochs.copy()
            arrays["tw_buckets"] = self.tw_buckets.copy()
        return scalars, arrays

    @classmethod
    def check(
        cls, scalars: dict[str, object], arrays: dict[str, np.ndarray], where: str, slots: int, largest_window: int
    ) -> None:
        """Raise ValueError unless the saved values are ones a run can produce (their shapes
        against the configuration are :meth:`load`'s check)."""
        check_values(scalars, arrays, where, cls.COUNTS, cls.TIMES, cls.ARRAYS)
        number(scalars["loss_sum"], f"{where} loss_sum", non_negative=True)
        ring, ring_cls = arrays["ring"], arrays["ring_cls"]
        if ring_cls.size and ring_cls.max() >= slots:
            # The fold kernels index per-class sums with these, unchecked.
            raise ValueError(f"{where} ring_cls holds class slot {ring_cls.max()}; the model has {slots}")
        total = scalars.get("count_total", 0)
        if ring.shape[0] < min(total, largest_window):  # type: ignore[call-overload]
            raise ValueError(f"{where} count_total {total} but the ring holds {ring.shape[0]} samples")

    def load(self, scalars: dict[str, object], arrays: dict[str, np.ndarray], *, windows: bool) -> None:
        """Load what :meth:`save` produced. With ``windows=False`` (the window
        configuration changed) only the lifetime totals come back."""

        def shaped(name: str, like: np.ndarray) -> np.ndarray:
            a = arrays[name]
            if a.shape != like.shape or a.dtype != like.dtype:
                raise ValueError(f"{name}: shape {a.shape} {a.dtype}, expected {like.shape} {like.dtype}")
            return a.copy()

        self.lifetime = shaped("lifetime", self.lifetime)
        self.hist = shaped("hist", self.hist)
        self.value_sum = float(scalars["loss_sum"])  # type: ignore[arg-type]
        if not windows:
            return
        self.ewma = shaped("ewma", self.ewma)
        self.ewma_time = float(scalars["ewma_time"])  # type: ignore[arg-type]
        blocks = arrays["blocks"]
        total = int(scalars["count_total"])  # type: ignore[call-overload]
        acc.check_blocks(blocks, self.lifetime.shape[0], self.blocks_max, self.block, total)
        self.blocks = blocks.astype(np.float64)
        ring, ring_cls = arrays["ring"], arrays["ring_cls"]
        if (
            ring.ndim != 2
            or ring.shape[1] != 4
            or ring.shape[0] > self.count_cap_max
            or ring_cls.shape != (ring.shape[0],)
        ):
            raise ValueError(f"ring: shape {ring.shape}, classes {ring_cls.shape}")
        self.ring, self.ring_cls = ring.astype(np.float64), ring_cls.astype(np.int32)
        self.count_total = total
        if self.tw_widths.size:
            self.tw_epochs = shaped("tw_epochs", self.tw_epochs)
            self.tw_buckets = shaped("tw_buckets", self.tw_buckets)

    # --- folding --------------------------------------------------------------------

    def _grow_ring(self, incoming: int) -> None:
        """Room for ``incoming`` more samples in the ring and the block sums (acc.grown)."""
        end = self.count_total + incoming
        cap = acc.ring_capacity(self.ring.shape[0], end, self.count_cap_max, incoming)
        if cap > self.ring.shape[0]:
            # Below the largest window the ring has never wrapped, so the samples are in order.
            self.ring = acc.grown(self.ring, cap)
            self.ring_cls = acc.grown(self.ring_cls, cap)
        rows = acc.block_rows(self.blocks.shape[0], end, self.block, self.blocks_max, incoming)
        if rows > self.blocks.shape[0]:
            self.blocks = acc.grown(self.blocks, rows)

    def fold(
        self,
        value: np.ndarray,
        focal: np.ndarray,
        correct: np.ndarray,
        true_class: np.ndarray,
        weights: np.ndarray | None,
        now: float,
        what: str,
        *,
        check_only: bool = False,
    ) -> None:
        """Add per-sample values at time ``now`` (never earlier than the last fold's).

        Raises ValidationError(NON_FINITE), changing nothing, when the sums would overflow;
        ``what`` names the statistic in that message. ``check_only``: raise or not, and
        change nothing either way.
        """
        weighted = weights is not None
        w = weights if weights is not None else _NO_WEIGHTS
        if not check_only:
            self.reserve(value.shape[0])
        # The component's state spreads into fold_all's arguments (typed by Numba, not mypy).
        committed, value_sum, total = acc.fold_all(  # type: ignore[call-arg]
            value, focal, correct, true_class, w, weighted, *self.kernel_state(now), not check_only
        )
        if not committed:
            raise ValidationError(Reason.NON_FINITE, overflow(what))
        if not check_only:
            self.folded(value_sum, total, now)

    def reserve(self, incoming: int) -> None:
        """Room for ``incoming`` more samples (before a fold)."""
        if self.count_cap_max:
            self._grow_ring(incoming)

    def kernel_state(self, now: float) -> tuple[Any, ...]:
        """What :func:`xentd.accumulate.fold_all` takes of this component for a fold at
        ``now``, in its argument order (between the samples and ``commit``)."""
        return (
            self.class_limit,
            self.slots,
            self.bounds,
            self.lifetime,
            self.hist,
            self.scratch,
            self.hist_scratch,
            self.value_sum,
            self.tw_epochs,
            self.tw_buckets,
            self.tw_widths,
            now,
            self.ewma,
            acc.decay(now - self.ewma_time, self.half_life),
            self.ring,
            self.ring_cls,
            self.blocks,
            self.block,
            self.count_total,
            self.count_cap_max > 0,
        )

    def folded(self, value_sum: float, total: int, now: float) -> None:
        """Take the scalars a committed fold at ``now`` returned."""
        self.value_sum = value_sum
        self.count_total = total
        self.ewma_time = now

    def window_matrix(self, now: float) -> np.ndarray:
        """Every window's stat vector, one row each, in :attr:`window_labels` order.

        Cheap (a few Numba calls), so it can run under the state lock; deriving
        means from it can then happen outside. The ewma row's sample count is
        decayed to ``now``; its other entries are ratios' numerators and
        denominators, which decay alike.
        """
        times = self.tw_widths.shape[0]
        out = np.empty((times + len(self.count_sizes) + 1, self.lifetime.shape[0]))
        for i, index in enumerate(acc.bucket_numbers(now, self.tw_widths).tolist()):
            acc.time_read(self.tw_epochs[i], self.tw_buckets[i], index, out[i])
        base = times
        for k, size in enumerate(self.count_sizes):
            acc.count_read(
                self.ring, self.ring_cls, self.blocks, self.block, self.count_total, size, self.slots, out[base + k]
            )
        out[-1] = self.ewma
        out[-1, acc.N] = float(self.ewma[acc.N]) * acc.decay(now - self.ewma_time, self.half_life)
        return out


def overflow(what: str) -> str:
    """Why a fold was refused when its ``what`` (losses, entropies) would overflow."""
    return f"the batch's weighted {what} overflow float64 (the totals would become infinite)"


# What fold_model's verdicts name, in overflow()'s words.
_WHAT = {LOSS_OVERFLOW: "losses", ENTROPY_OVERFLOW: "entropies"}
_NO_VALUES = kernel_array(np.empty(0, np.float64))


# The label-free statistics of predictions reuse the loss layout with one class slot:
# "loss" is the row's entropy and "focal" its confidence (acc.SWL and acc.SWF).
_ONE_SLOT = 1


class ModelState:
    """All rolling state of one model. Mutated only by :class:`StateStore`.

    Its components: ``loss`` (the scored samples' losses, by class), ``predictions``
    (the entropy and confidence of every prediction row received, labelled or not) and
    ``calibration`` (the scored samples' reliability bins, Brier scores and target prior).
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        windows: WindowsConfig,
        limits: LimitsConfig,
        created: float,
        calibration_cfg: CalibrationConfig | None = None,
    ) -> None:
        self.name = name
        self.num_classes = num_classes
        self.class_limit = limits.class_limit
        slots = self.component_slots(num_classes, limits.class_limit)
        self.slots = slots[""]
        self.loss = WindowedStats(self.slots, limits.class_limit, limits.loss_buckets, windows, created)
        # Time windows and the EWMA only: count windows would double the model's memory.
        self.predictions = WindowedStats(
            slots["predictions"], _ONE_SLOT, limits.loss_buckets, windows, created, count_windows=False
        )
        self._calibration_args = (
            (calibration_cfg or CalibrationConfig()).bins,
            slots["calibration"],
            limits.class_limit,
            windows,
            created,
        )
        # Multiclass until the first scored sample says otherwise (see _calibration_for).
        self.calibration = CalibrationStats(*self._calibration_args, binary=False)
        self.batches = 0
        self.unnormalized_rows = 0
        # Target rows scored as sent although they are not a distribution (soft rows off 1, multi-hot rows).
        self.unnormalized_targets = 0
        # Rejected batches of this model, by reason value; only models with state get these.
        self.rejected: dict[str, int] = {}
        self.last_batch_time = created
        self.last_event_time: float | None = None
        self.clock = created  # never goes backwards, so buckets stay monotone

    @staticmethod
    def component_slots(num_classes: int, class_limit: int) -> dict[str, int]:
        """Each component's class slots, by the name :meth:`components` gives it (what a saved
        file is checked against)."""
        slots = class_slots(num_classes, class_limit)
        return {"": slots, "predictions": _ONE_SLOT, "calibration": slots}

    # Each component's class, by name: what checks a saved component (xentd.persist).
    COMPONENT_TYPES: dict[str, type[WindowedStats] | type[CalibrationStats]] = {
        "": WindowedStats,
        "predictions": WindowedStats,
        "calibration": CalibrationStats,
    }

    def components(self) -> dict[str, WindowedStats | CalibrationStats]:
        """The parts that save and restore themselves, by the name they are saved under
        (``""``: at the top level of the model's entry, as snapshots have always had it)."""
        return {"": self.loss, "predictions": self.predictions, "calibration": self.calibration}

    @property
    def window_labels(self) -> tuple[str, ...]:
        return self.loss.window_labels

    # --- persistence (the file format is xentd.persist's) -------------------------

    _SCALARS = (
        "num_classes",
        "binary",
        "batches",
        "unnormalized_rows",
        "unnormalized_targets",
        "rejected",
        "last_batch_time",
        "last_event_time",
        "clock",
    )
    COUNTS = ("num_classes", "batches", "unnormalized_rows", "unnormalized_targets")
    TIMES = ("last_batch_time", "clock")

    def export(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """The model's own scalars: (scalars, no arrays). Its components save themselves."""
        scalars = {k: getattr(self, k) for k in self._SCALARS}
        scalars["rejected"] = dict(self.rejected)
        return scalars, {}

    @classmethod
    def check_saved(cls, scalars: dict[str, Any], where: str, class_limit: int) -> None:
        """Raise ValueError unless the model's own saved scalars are ones a run can produce."""
        check_values(scalars, {}, where, cls.COUNTS, cls.TIMES, {})
        if scalars["num_classes"] < 1:
            raise ValueError(f"{where} num_classes is {scalars['num_classes']}; expected at least 1")
        if scalars["last_event_time"] is not None:
            number(scalars["last_event_time"], f"{where} last_event_time", non_negative=False)
        rejected = scalars.get("rejected") or {}
        if not isinstance(rejected, dict):
            raise ValueError(f"{where} rejected is {rejected!r}; expected reason: count")
        for reason, n in rejected.items():
            count(n, f"{where} rejected.{reason}")

    @property
    def binary(self) -> bool:
        """Whether the model's scored predictions are binary ([N] probabilities of the positive class)."""
        return self.calibration.binary

    def _calibration_for(self, binary: bool) -> None:
        """Make the calibration component fit ``binary`` predictions. Its layout depends on it
        (a binary sample's outcome is its target, a multiclass one's is top-1 correctness),
        so it is set by the first scored sample; a model that has scored samples of one form
        refuses the other (both are 2 classes, and their bins would mean different things)."""
        if binary == self.calibration.binary:
            return
        if self.calibration.lifetime[calibration.N] == 0.0 and self.calibration.count_total == 0:
            self.calibration = CalibrationStats(*self._calibration_args, binary=binary)
            return
        sent, has = ("[N] binary", "[N, 2] rows") if binary else ("[N, 2] rows", "[N] binary")
        raise ValidationError(
            Reason.CLASS_COUNT_CHANGED,
            f"the model has scored {has} predictions and this batch has {sent} predictions; "
            "their calibration bins mean different things, so send one form per model",
        )

    def restore(self, scalars: dict[str, object]) -> None:
        """Load the scalars :meth:`export` produced (before the components load theirs)."""
        # Absent from snapshots written before calibration existed: decided by the next batch.
        self._calibration_for(bool(scalars.get("binary", False)))
        for k in ("last_batch_time", "clock"):
            setattr(self, k, float(scalars[k]))  # type: ignore[arg-type]
        self.batches = int(scalars["batches"])  # type: ignore[call-overload]
        self.unnormalized_rows = int(scalars["unnormalized_rows"])  # type: ignore[call-overload]
        # Absent from snapshots written before these counters existed.
        self.unnormalized_targets = int(scalars.get("unnormalized_targets", 0))  # type: ignore[call-overload]
        rejected = scalars.get("rejected") or {}
        self.rejected = {str(k): int(v) for k, v in rejected.items()}  # type: ignore[attr-defined]
        event = scalars["last_event_time"]
        self.last_event_time = None if event is None else float(event)  # type: ignore[arg-type]

    def _advance(self, now: float) -> float:
        self.clock = max(self.clock, now)
        return self.clock

    def fold(
        self,
        scores: SampleScores,
        weights: np.ndarray | None,
        now: float,
        event_time: float | None,
        batches: int = 1,
        unnormalized_targets: int = 0,
        targets: np.ndarray | None = None,
        binary: bool = False,
        *,
        rows: tuple[int, int] | None = None,
        label_free: tuple[np.ndarray, np.ndarray] | None = None,
        unnormalized_rows: int | None = None,
    ) -> bool:
        """Add scored samples (``batches`` messages' worth, concatenated in arrival order),
        into every component at once (:func:`xentd.fold.fold_model`), or into none.

        ``rows``: fold only these rows of ``scores``, ``weights``, ``targets`` and
        ``label_free`` (a drain scores many models' rows in one call). ``label_free``: the
        rows' (entropy, confidence) (:func:`xentd.predstats.from_scores`), for rows whose
        predictions arrived with their labels. ``unnormalized_targets`` is the batches'
        count of target rows that are not a distribution (see
        :attr:`xentd.validate.Batch.unnormalized_targets`); ``unnormalized_rows`` overrides
        ``scores.unnormalized_rows``, which counts the whole call's rows: with ``rows`` and
        without it, none are counted. ``targets`` are the batch's targets and ``binary``
        whether its predictions were binary: a binary sample's outcome is its target, and
        soft targets make the calibration's target prior. Without them, the outcome is top-1
        correctness and the prior counts true classes.

        Raises ValidationError(NON_FINITE), changing nothing, when a sum would overflow.
        Returns whether any sample's class was past the class limit (folded into "other").
        """
        lo, hi = (0, scores.loss.shape[0]) if rows is None else rows
        # Binary targets are the outcomes; soft rows the prior's masses; class indices are
        # already in ``scores.true_class``.
        outcome_targets = targets if binary or (targets is not None and targets.ndim == 2) else None
        try:
            self._calibration_for(binary)
        except ValidationError as exc:
            raise ValidationError(exc.reason, f"{exc.detail} (model {self.name!r})") from None
        mode, t1, t2 = self.calibration.kernel_targets(outcome_targets)
        entropy, top = (kernel_array(a) for a in label_free) if label_free is not None else (_NO_VALUES, _NO_VALUES)
        w = _NO_WEIGHTS if weights is None else kernel_array(weights)
        # The kernels index every input by row, unchecked.
        arrays = [scores.loss, scores.focal, scores.correct, scores.true_class, scores.confidence, scores.brier]
        arrays += [a for a, used in ((w, weights is not None), (t1, mode == calibration.BINARY)) if used]
        arrays += [t2] if mode == calibration.SOFT else []
        arrays += [entropy, top] if label_free is not None else []
        if not 0 <= lo <= hi or any(a.shape[0] < hi for a in arrays):
            raise ValueError(f"rows {lo}:{hi} past an input of {min(a.shape[0] for a in arrays)} rows")
        now = self._advance(now)
        self.loss.reserve(hi - lo)
        self.calibration.reserve(hi - lo, mode == calibration.SOFT)
        verdict, value_sum, total, calibration_total, tw_used, entropy_sum, entropy_total = fold_model(
            lo,
            hi,
            scores.loss,
            scores.focal,
            scores.correct,
            scores.true_class,
            w,
            weights is not None,
            mode,
            t1,
            t2,
            scores.confidence,
            scores.brier,
            entropy,
            top,
            label_free is not None,
            self.loss.kernel_state(now),
            self.calibration.kernel_state(now),
            self.predictions.kernel_state(now),
        )
        if verdict != FOLDED:
            detail = calibration.OVERFLOW if verdict == CALIBRATION_OVERFLOW else overflow(_WHAT[verdict])
            raise ValidationError(Reason.NON_FINITE, f"{detail} (model {self.name!r})")
        self.loss.folded(value_sum, total, now)
        self.calibration.folded(calibration_total, tw_used, now)
        if label_free is not None:
            self.predictions.folded(entropy_sum, entropy_total, now)
        self.batches += batches
        if unnormalized_rows is None:
            unnormalized_rows = scores.unnormalized_rows if rows is None else 0
        self.unnormalized_rows += unnormalized_rows
        self.unnormalized_targets += unnormalized_targets
        self.last_batch_time = self.clock
        if event_time is not None:
            self.last_event_time = event_time
        return (
            self.num_classes > self.class_limit and hi > lo and int(scores.true_class[lo:hi].max()) >= self.class_limit
        )

    def fold_predictions(
        self, entropy: np.ndarray, confidence: np.ndarray, weights: np.ndarray | None, now: float
    ) -> None:
        """Add the label-free statistics of prediction rows that arrived without their labels
        (:mod:`xentd.predstats`; rows with labels go through :meth:`fold`)."""
        n = entropy.shape[0]
        try:
            self.predictions.fold(
                entropy,
                confidence,
                np.zeros(n, np.uint8),
                np.zeros(n, np.int64),
                weights,
                self._advance(now),
                "entropies",
            )
        except ValidationError as exc:
            raise ValidationError(exc.reason, f"{exc.detail} (model {self.name!r})") from None
        self.last_batch_time = self.clock  # keeps a model that only sends predictions from going idle

    def window_matrix(self, now: float) -> np.ndarray:
        return self.loss.window_matrix(max(now, self.clock))

    def windows(self, now: float) -> list[tuple[str, WindowStats]]:
        return list(zip(self.window_labels, derive_all(self.window_matrix(now), self.slots), strict=True))


# --- checks of saved values, shared by every component ----------------------------------


def check_values(
    scalars: dict[str, Any],
    arrays: dict[str, np.ndarray],
    where: str,
    counts: tuple[str, ...],
    times: tuple[str, ...],
    kinds: dict[str, tuple[str, bool]],
) -> None:
    """Raise ValueError unless a component's saved ``counts`` are counts, its ``times``
    finite, and each array named in ``kinds`` of its (dtype kinds, non-negative) kind."""
    for key in counts:
        count(scalars.get(key, 0), f"{where} {key}")
    for key in times:
        number(scalars[key], f"{where} {key}", non_negative=False)
    for key, a in arrays.items():
        if key in kinds:
            check_array(a, f"{where} {key}", *kinds[key])


def count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} is {value!r}; expected a count (an integer >= 0)")
    return value


def number(value: object, where: str, *, non_negative: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or (non_negative and value < 0):  # type: ignore[operator]
        raise ValueError(f"{where} is {value!r}; expected a finite number{' >= 0' if non_negative else ''}")


def check_array(a: np.ndarray, where: str, kinds: str, non_negative: bool) -> None:
    if a.dtype.kind not in kinds:
        raise ValueError(f"{where} has dtype {a.dtype}; expected {'a float' if kinds == 'f' else 'an integer'} type")
    if kinds == "f" and not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{where}{bad.tolist()} is {a[tuple(bad)]}; expected finite values")
    if non_negative and a.size and a.min() < 0:
        bad = np.argwhere(a < 0)[0]
        raise ValueError(f"{where}{bad.tolist()} is {a[tuple(bad)]}; expected values >= 0")


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
    predictions: PredictionSummary
    joins: JoinSummary | None  # None until the model sends a predictions-only or labels-only message
    calibration: CalibrationSummary


@dataclass(frozen=True, slots=True)
class CalibrationSummary:
    """A model's reliability bins over its lifetime, its Brier score, and the derived
    calibration figures of every window (xentd.calibration)."""

    bin_labels: tuple[str, ...]  # each bin's upper edge, as Prometheus writes le
    weight: np.ndarray  # W_b
    confidence: np.ndarray  # C_b
    outcome: np.ndarray  # O_b
    brier_weighted_sum: float
    brier_weight: float
    windows: list[tuple[str, CalibrationWindow]]


@dataclass(frozen=True, slots=True)
class PredictionSummary:
    """Label-free statistics of every prediction row a model sent (xentd.predstats)."""

    rows: float
    weight: float
    entropy_weighted_sum: float
    confidence_weighted_sum: float
    window_entropy: list[tuple[str, float]]  # (window label, mean entropy; NaN when empty)


@dataclass(frozen=True, slots=True)
class JoinSummary:
    """A model's delayed-label joins (xentd.joins)."""

    outcomes: dict[str, int]
    pending: int
    delay_bounds: np.ndarray
    delay_counts: np.ndarray  # per bucket, not cumulative; last is +Inf
    delay_sum: float


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
class PredictionColumns:
    """:class:`PredictionSummary` of every model, a row each."""

    rows: np.ndarray  # (models,)
    weight: np.ndarray
    entropy_weighted_sum: np.ndarray
    confidence_weighted_sum: np.ndarray
    window_labels: tuple[str, ...]
    window_entropy: np.ndarray  # (models, windows); NaN where a window is empty


@dataclass(frozen=True, slots=True)
class JoinColumns:
    """:class:`JoinSummary` of every model, a row each; rows where ``joined`` is False have none."""

    joined: np.ndarray  # (models,) bool
    outcomes: np.ndarray  # (models, len(OUTCOMES)) int64
    pending: np.ndarray  # (models,) int64
    delay_bounds: np.ndarray
    delay_counts: np.ndarray  # (models, buckets + 1) int64, per bucket
    delay_sum: np.ndarray  # (models,)


@dataclass(frozen=True, slots=True)
class CalibrationColumns:
    """:class:`CalibrationSummary` of every model, a row each."""

    bin_labels: tuple[str, ...]
    weight: np.ndarray  # (models, bins)
    confidence: np.ndarray
    outcome: np.ndarray
    brier_weighted_sum: np.ndarray  # (models,)
    brier_weight: np.ndarray
    window_labels: tuple[str, ...]
    windows: np.ndarray  # (models, windows, 7): CalibrationWindow's fields in order


@dataclass(frozen=True, slots=True)
class ModelColumns:
    """Every model of a snapshot, one array per figure with a row per model (row i is
    ``names[i]``): what :class:`ModelSnapshot` holds, without an object per model, so the
    exporter renders a family of every model at once. :meth:`model` builds row i's record."""

    names: list[str]
    class_limit: int
    num_classes: np.ndarray  # (models,) int64
    samples: np.ndarray  # (models,) float64, and so on for the lifetime figures
    weight: np.ndarray
    loss_weighted_sum: np.ndarray
    correct_weighted_sum: np.ndarray
    batches: np.ndarray  # int64
    unnormalized_rows: np.ndarray  # int64
    unnormalized_targets: np.ndarray  # int64
    rejected: list[dict[str, int]]
    # As the clock and the producers gave them (a float, or an int from a clock that gives ints).
    last_batch_time: list[float]
    last_event_time: list[float | None]
    # Model i's class slots are entries class_offsets[i]:class_offsets[i + 1] of these two.
    class_offsets: np.ndarray  # (models + 1,) int64
    class_weight: np.ndarray
    class_loss_weighted_sum: np.ndarray
    hist_bounds: np.ndarray
    hist_counts: np.ndarray  # (models, buckets + 1) int64, per bucket; last is +Inf
    loss_sum: np.ndarray
    window_labels: tuple[str, ...]
    windows: np.ndarray  # (models, windows, 6): WindowStats' fields in order
    predictions: PredictionColumns
    joins: JoinColumns
    calibration: CalibrationColumns

    def __len__(self) -> int:
        return len(self.names)

    def class_labels(self, i: int) -> tuple[str, ...]:
        return class_labels(int(self.num_classes[i]), self.class_limit)

    def model(self, i: int) -> ModelSnapshot:
        """Row ``i`` as a :class:`ModelSnapshot`."""
        lo, hi = self.class_offsets[i : i + 2].tolist()
        p, j, c = self.predictions, self.joins, self.calibration
        return ModelSnapshot(
            name=self.names[i],
            samples=float(self.samples[i]),
            weight=float(self.weight[i]),
            loss_weighted_sum=float(self.loss_weighted_sum[i]),
            correct_weighted_sum=float(self.correct_weighted_sum[i]),
            batches=int(self.batches[i]),
            unnormalized_rows=int(self.unnormalized_rows[i]),
            unnormalized_targets=int(self.unnormalized_targets[i]),
            rejected=self.rejected[i],
            last_batch_time=self.last_batch_time[i],
            last_event_time=self.last_event_time[i],
            class_labels=self.class_labels(i),
            class_weight=self.class_weight[lo:hi],
            class_loss_weighted_sum=self.class_loss_weighted_sum[lo:hi],
            hist_bounds=self.hist_bounds,
            hist_counts=self.hist_counts[i],
            loss_sum=float(self.loss_sum[i]),
            windows=list(zip(self.window_labels, (WindowStats(*w) for w in self.windows[i].tolist()), strict=True)),
            predictions=PredictionSummary(
                rows=float(p.rows[i]),
                weight=float(p.weight[i]),
                entropy_weighted_sum=float(p.entropy_weighted_sum[i]),
                confidence_weighted_sum=float(p.confidence_weighted_sum[i]),
                window_entropy=list(zip(p.window_labels, p.window_entropy[i].tolist(), strict=True)),
            ),
            joins=(
                JoinSummary(
                    outcomes=dict(zip(OUTCOMES, j.outcomes[i].tolist(), strict=True)),
                    pending=int(j.pending[i]),
                    delay_bounds=j.delay_bounds,
                    delay_counts=j.delay_counts[i],
                    delay_sum=float(j.delay_sum[i]),
                )
                if j.joined[i]
                else None
            ),
            calibration=CalibrationSummary(
                bin_labels=c.bin_labels,
                weight=c.weight[i],
                confidence=c.confidence[i],
                outcome=c.outcome[i],
                brier_weighted_sum=float(c.brier_weighted_sum[i]),
                brier_weight=float(c.brier_weight[i]),
                windows=list(zip(c.window_labels, (CalibrationWindow(*w) for w in c.windows[i].tolist()), strict=True)),
            ),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    table: ModelColumns
    rejected: dict[str, int]
    counters: Counters
    pending_bytes: int = 0  # what the join store holds (xentd.joins)
    pending_bytes_limit: int = 0  # labels.max_pending_bytes

    @property
    def models(self) -> list[ModelSnapshot]:
        """Every model's record (built on each call: the exporter reads :attr:`table`)."""
        return [self.table.model(i) for i in range(len(self.table))]


# Models copied per hold of the state lock by StateStore.snapshot.
SNAPSHOT_CHUNK = 256


class StateStore:
    """Every model's state plus the daemon-wide counters, behind one lock."""

    def __init__(
        self,
        windows: WindowsConfig,
        limits: LimitsConfig,
        clock: Callable[[], float],
        *,
        dedup_window: int = 0,
        labels: LabelsConfig | None = None,
        calibration_cfg: CalibrationConfig | None = None,
    ) -> None:
        self.windows_cfg = windows
        self.limits = limits
        self.calibration_cfg = calibration_cfg or CalibrationConfig()
        self.clock = clock
        self.lock = threading.Lock()
        self.models: dict[str, ModelState] = {}
        self.rejected: Counter[str] = Counter({r.value: 0 for r in Reason})
        self.counters = Counters()
        self.recent = RecentBatches(dedup_window)
        self.sequences = SequenceTracker()
        self.labels_cfg = labels or LabelsConfig()
        self.joins = JoinStore(
            self.labels_cfg.max_pending_bytes,
            self.labels_cfg.ttl_seconds,
            self.labels_cfg.delay_buckets,
            epoch=clock(),
        )

    def empty_like(self) -> StateStore:
        """An empty store of the same configuration (a restore loads into one, then :meth:`adopt`)."""
        return StateStore(
            self.windows_cfg,
            self.limits,
            self.clock,
            dedup_window=self.recent.capacity,
            labels=self.labels_cfg,
            calibration_cfg=self.calibration_cfg,
        )

    def adopt(self, other: StateStore) -> None:
        """Take ``other``'s state: its models, counts, retry window and components (lock held)."""
        self.models = other.models
        self.rejected = other.rejected
        self.counters = other.counters
        self.recent = other.recent
        self.joins = other.joins

    def components(self) -> dict[str, JoinStore]:
        """The daemon-wide parts that save and restore themselves (xentd.persist), by name."""
        return {"joins": self.joins}

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
        state = ModelState(name, num_classes, self.windows_cfg, self.limits, self.clock(), self.calibration_cfg)
        self.models[name] = state
        return state

    def evict_idle(self, now: float) -> list[str]:
        """Drop models with no batch for ``limits.model_ttl_seconds``. Call with the lock held."""
        ttl = self.limits.model_ttl_seconds
        if ttl is None:
            return []
        # A model whose predictions still wait for labels is not idle: they leave by labels.ttl.
        idle = [
            name for name, m in self.models.items() if now - m.last_batch_time > ttl and not self.joins.pending(name)
        ]
        for name in idle:
            del self.models[name]
            self.joins.drop_model(name)
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
            confidence=np.ones(2),
            brier=np.zeros(2),
        )
        weights = np.ones(2)
        weights.flags.writeable = False
        label_free = (np.ones(2), np.ones(2))
        # fold_model's signatures: float64 soft targets (also what class indices and binary
        # targets pass for them) and float32 ones.
        soft32 = kernel_array(np.full((2, 2), 0.5, np.float32))
        for w in (None, weights):
            scratch = ModelState("warmup", 2, self.windows_cfg, self.limits, self.clock(), self.calibration_cfg)
            scratch.fold(scores, w, self.clock(), None, label_free=label_free)
            scratch.fold(scores, w, self.clock(), None, targets=soft32)
            scratch.fold_predictions(scores.loss, scores.focal, w, self.clock())
            scratch.windows(self.clock())
        # A snapshot's reader and derivation (what a scrape of restored models needs).
        copies = _Copies([scratch], self.limits, self.joins.delay_bounds, self.calibration_cfg.bins)
        copies.add(scratch, float(self.clock()), self.joins)
        copies.derive()
        joins.warmup()
        predstats.warmup()
        calibration.warmup()

    def reject(self, reason: Reason, model: str | None = None) -> None:
        """Count a rejected batch. Call with the lock held. Only a model that already
        has state gets a labelled count, so bad or unknown names create no series."""
        self.rejected[reason.value] += 1
        state = self.models.get(model) if model is not None else None
        if state is not None:
            state.rejected[reason.value] = state.rejected.get(reason.value, 0) + 1

    def snapshot(self) -> Snapshot:
        """A copy of all state, consistent per model. The lock is held only to copy raw sums,
        and released every :data:`SNAPSHOT_CHUNK` models, so that a scrape of 10,000 models
        never stalls ingestion for long; means and labels are derived outside it, for all
        models of one layout at once (:class:`_Copies`). Each model's figures are copied
        whole, so a scrape never sees half a batch."""
        with self.lock:
            names = list(self.models)
            listed = list(self.models.values())
            rejected = dict(self.rejected)
            counters = self.counters.copy()
            pending_bytes = self.joins.nbytes
        # Sized by the models' layouts now, outside the lock: a model whose layout changes before
        # it is copied (its first batch says it is binary) goes where it belongs, into a stack that grows.
        copies = _Copies(listed, self.limits, self.joins.delay_bounds, self.calibration_cfg.bins)
        del listed
        for start in range(0, len(names), SNAPSHOT_CHUNK):
            with self.lock:
                now = self.clock()
                for name in names[start : start + SNAPSHOT_CHUNK]:
                    m = self.models.get(name)
                    if m is not None:  # evicted since the list was taken
                        copies.add(m, max(now, m.clock), self.joins)
        return Snapshot(
            table=copies.derive(),
            rejected=rejected,
            counters=counters,
            pending_bytes=pending_bytes,
            pending_bytes_limit=self.joins.max_bytes,
        )


# --- snapshots: reading and deriving ---------------------------------------------------
#
# A scrape reads every model. Under the lock, one jitted call per model reads each of its
# components (every window and the lifetime totals, as rows of one matrix) into a stack
# of the matrices of all models of the same layout; outside it, each stack is derived by
# one kernel call, into the columns of ModelColumns. One call per window, as
# window_matrix makes them, cost most of a scrape of 10,000 models.

# The reader calls accumulate's and calibration's kernels: their changes must make its cached build stale.
_read_jit = cached(acc.__file__, calibration.__file__)


@cached(acc.__file__, inline="always")
def _ewma_row(out, ewma, ewma_time, now, half_life):  # type: ignore[no-untyped-def]
    """The EWMA row: its sample count decayed to ``now`` (acc.decay's factor); the other
    sums are the terms of ratios, which decay alike."""
    out[:] = ewma
    out[acc.N] = ewma[acc.N] * 2.0 ** (-(now - ewma_time) / half_life)


@_read_jit
def _read_model(  # type: ignore[no-untyped-def]
    now,
    widths,
    sizes,
    half_life,
    # the loss component
    l_epochs,
    l_buckets,
    l_ring,
    l_cls,
    l_blocks,
    l_block,
    l_total,
    l_slots,
    l_ewma,
    l_ewma_time,
    l_lifetime,
    l_hist,
    # the label-free statistics (time windows and EWMA only)
    p_epochs,
    p_buckets,
    p_ewma,
    p_ewma_time,
    p_lifetime,
    # calibration
    c_epochs,
    c_rows,
    c_buckets,
    c_ring,
    c_tags,
    c_masses,
    c_blocks,
    c_block,
    c_total,
    c_bins,
    c_slots,
    c_ewma,
    c_ewma_time,
    c_lifetime,
    # where they go
    l_out,
    h_out,
    p_out,
    c_out,
    at,
):
    """Each component's ``window_matrix(now)`` with its lifetime totals as one more row, into
    ``l_out[at]``, ``p_out[at]`` and ``c_out[at]``, and the loss histogram into ``h_out[at]``.
    Every component has the store's time windows (bucket ``widths``) and EWMA ``half_life``;
    the loss and calibration components its count windows (``sizes``)."""
    times = widths.shape[0]
    out = l_out[at]
    for i in range(times):
        acc.time_read(l_epochs[i], l_buckets[i], acc.bucket_number(now, widths[i]), out[i])
    for k in range(sizes.shape[0]):
        acc.count_read(l_ring, l_cls, l_blocks, l_block, l_total, sizes[k], l_slots, out[times + k])
    _ewma_row(out[-2], l_ewma, l_ewma_time, now, half_life)
    out[-1] = l_lifetime
    h_out[at] = l_hist

    out = p_out[at]
    for i in range(times):
        acc.time_read(p_epochs[i], p_buckets[i], acc.bucket_number(now, widths[i]), out[i])
    _ewma_row(out[-2], p_ewma, p_ewma_time, now, half_life)
    out[-1] = p_lifetime

    out = c_out[at]
    for i in range(times):
        calibration._time_read(c_epochs[i], c_rows[i], c_buckets, acc.bucket_number(now, widths[i]), out[i])
    for k in range(sizes.shape[0]):
        calibration._count_read(
            c_ring, c_tags, c_masses, c_blocks, c_block, c_total, sizes[k], c_bins, c_slots, out[times + k]
        )
    _ewma_row(out[-2], c_ewma, c_ewma_time, now, half_life)
    out[-1] = c_lifetime


def _shape(s: WindowedStats | CalibrationStats) -> tuple[int, int]:
    """A component's matrix: every window, then the lifetime totals."""
    return s.tw_widths.shape[0] + len(s.count_sizes) + 2, s.lifetime.shape[0]


class _Layout:
    """The copies of the models of one layout (loss class slots; calibration bins, slots and
    binary or not), stacked in the order they are read: entry k of each is row ``rows[k]``'s."""

    __slots__ = ("loss", "hist", "predictions", "calibration", "rows")

    def __init__(self, m: ModelState, capacity: int) -> None:
        loss, pred, c = m.loss, m.predictions, m.calibration
        # What _read_model takes for granted (it writes by the loss component's windows, unchecked).
        if not (
            np.array_equal(pred.tw_widths, loss.tw_widths)
            and np.array_equal(c.tw_widths, loss.tw_widths)
            and c.count_sizes == loss.count_sizes
            and not pred.count_sizes
            and pred.half_life == loss.half_life == c.half_life
        ):
            raise AssertionError(f"model {m.name!r}: its components do not have the same windows")
        self.loss = np.empty((capacity, *_shape(m.loss)))
        self.hist = np.empty((capacity, *m.loss.hist.shape), np.int64)
        self.predictions = np.empty((capacity, *_shape(m.predictions)))
        self.calibration = np.empty((capacity, *_shape(m.calibration)))
        self.rows: list[int] = []

    def take(self, row: int) -> int:
        """Where row ``row``'s copies go."""
        k = len(self.rows)
        if k == self.loss.shape[0]:  # a model added since the count
            for name in ("loss", "hist", "predictions", "calibration"):
                a = getattr(self, name)
                setattr(self, name, np.concatenate([a, np.empty_like(a)]))
        self.rows.append(row)
        return k

    def filled(self, a: np.ndarray) -> np.ndarray:
        return a[: len(self.rows)]


def _layout(m: ModelState) -> tuple[int, int, int, bool]:
    c = m.calibration
    return m.slots, c.bins, c.slots, c.binary


class _Copies:
    """What a snapshot copies of each model, under the lock (:meth:`add`), and the
    :class:`ModelColumns` derived from it, outside (:meth:`derive`).

    The copies of models of one layout go into one :class:`_Layout`, sized for the models
    of that layout among ``models`` (those listed when the snapshot starts)."""

    def __init__(self, models: Iterable[ModelState], limits: LimitsConfig, delay_bounds: np.ndarray, bins: int) -> None:
        self.limits = limits
        self.delay_bounds = delay_bounds
        self.bins = bins
        self.labels: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self.counts = Counter(_layout(m) for m in models)
        self.layouts: dict[tuple[int, int, int, bool], _Layout] = {}
        self.scalars: list[tuple[Any, ...]] = []
        self.joins: dict[int, tuple[np.ndarray, int, np.ndarray, float]] = {}
        self.sizes: np.ndarray | None = None

    def add(self, m: ModelState, now: float, join_store: JoinStore) -> None:
        """Copy ``m``'s figures at ``now`` (the lock held)."""
        row = len(self.scalars)
        loss, pred, c = m.loss, m.predictions, m.calibration
        key = (m.slots, c.bins, c.slots, c.binary)
        layout = self.layouts.get(key)
        if layout is None:
            layout = self.layouts[key] = _Layout(m, max(self.counts[key], 1))
        if self.sizes is None:  # every model has the store's windows: the first says what they are
            self.labels = (loss.window_labels, pred.window_labels)
            self.sizes = np.array(loss.count_sizes, np.int64)
        at = layout.take(row)
        _read_model(
            now,
            loss.tw_widths,
            self.sizes,
            loss.half_life,
            loss.tw_epochs,
            loss.tw_buckets,
            loss.ring,
            loss.ring_cls,
            loss.blocks,
            loss.block,
            loss.count_total,
            loss.slots,
            loss.ewma,
            loss.ewma_time,
            loss.lifetime,
            loss.hist,
            pred.tw_epochs,
            pred.tw_buckets,
            pred.ewma,
            pred.ewma_time,
            pred.lifetime,
            c.tw_epochs,
            c.tw_rows,
            c.tw_buckets,
            c.ring,
            c.ring_tag,
            c.ring_mass,
            c.blocks,
            c.block,
            c.count_total,
            c.bins,
            c.slots,
            c.ewma,
            c.ewma_time,
            c.lifetime,
            layout.loss,
            layout.hist,
            layout.predictions,
            layout.calibration,
            at,
        )
        st = join_store.stats.get(m.name)
        if st is not None:
            self.joins[row] = (st.outcomes.copy(), join_store.pending(m.name), st.delay_counts.copy(), st.delay_sum)
        self.scalars.append(
            (
                m.name,
                m.num_classes,
                m.slots,
                loss.value_sum,
                m.batches,
                m.unnormalized_rows,
                m.unnormalized_targets,
                dict(m.rejected) if m.rejected else {},
                m.last_batch_time,
                m.last_event_time,
            )
        )

    def derive(self) -> ModelColumns:
        """Every model's figures from the copies, each stack derived by one kernel call."""
        n = len(self.scalars)
        columns = list(zip(*self.scalars, strict=True)) if n else [()] * 10
        names, num_classes, slots, loss_sum, batches, unnorm, unnorm_targets, rejected, last_batch, last_event = columns
        windows_n = len(self.labels[0])

        # Loss windows, lifetime totals and class figures; the histograms; label-free statistics.
        windows = np.empty((n, windows_n, 6))
        life = np.empty((n, acc.HEAD))
        class_offsets = np.zeros(n + 1, np.int64)
        np.cumsum(np.array(slots, np.int64), out=class_offsets[1:])
        class_weight = np.empty(int(class_offsets[-1]))
        class_loss = np.empty_like(class_weight)
        hist = np.zeros((n, len(self.limits.loss_buckets) + 1), np.int64)
        pred_n = len(self.labels[1])
        entropy = np.empty((n, pred_n))
        plife = np.empty((n, acc.HEAD))
        for key, layout in self.layouts.items():
            s = key[0]
            rows = np.array(layout.rows, np.int64)
            matrix = layout.filled(layout.loss)
            out = np.empty((matrix.shape[0] * matrix.shape[1], 6))
            acc.derive_rows(matrix.reshape(-1, matrix.shape[2]), s, out)
            windows[rows] = out.reshape(len(rows), -1, 6)[:, :windows_n]
            lifetime = matrix[:, -1]
            life[rows] = lifetime[:, : acc.HEAD]
            at = class_offsets[rows][:, None] + np.arange(s)
            class_weight[at] = lifetime[:, acc.HEAD : acc.HEAD + s]
            class_loss[at] = lifetime[:, acc.HEAD + s : acc.HEAD + 2 * s]
            hist[rows] = layout.filled(layout.hist)

            # Label-free statistics: their windows' mean entropy, and lifetime totals.
            matrix = layout.filled(layout.predictions)
            with np.errstate(invalid="ignore", divide="ignore"):
                entropy[rows] = matrix[:, :pred_n, acc.SWL] / matrix[:, :pred_n, acc.SW]
            plife[rows] = matrix[:, -1, : acc.HEAD]

        # Joins: rows of models without any are zeros, and marked so.
        joined = np.zeros(n, np.bool_)
        outcomes = np.zeros((n, len(OUTCOMES)), np.int64)
        pending = np.zeros(n, np.int64)
        delay_counts = np.zeros((n, len(self.delay_bounds) + 1), np.int64)
        delay_sum = np.zeros(n)
        for i, join in self.joins.items():
            joined[i] = True
            outcomes[i], pending[i], delay_counts[i], delay_sum[i] = join

        # Calibration, by (bins, slots, binary): NE divides the loss windows' mean cross-entropy.
        cal_windows = np.empty((n, windows_n, 7))
        bin_weight = np.empty((n, self.bins))
        bin_confidence = np.empty((n, self.bins))
        bin_outcome = np.empty((n, self.bins))
        brier = np.empty((n, 2))
        mean_loss = np.full((n, windows_n + 1), np.nan)  # the lifetime row has none
        mean_loss[:, :windows_n] = windows[:, :, 2]
        for (_, b, s, binary), layout in self.layouts.items():
            if b != self.bins:
                raise AssertionError(f"a model has {b} calibration bins, the store {self.bins}")
            rows = np.array(layout.rows, np.int64)
            matrix = layout.filled(layout.calibration)
            out = np.empty((matrix.shape[0] * matrix.shape[1], 7))
            calibration._derive_rows(matrix.reshape(-1, matrix.shape[2]), b, s, binary, mean_loss[rows].ravel(), out)
            cal_windows[rows] = out.reshape(len(rows), -1, 7)[:, :windows_n]
            lifetime = matrix[:, -1]
            bin_weight[rows] = lifetime[:, calibration.weight_index(b)]
            bin_confidence[rows] = lifetime[:, calibration.confidence_index(b)]
            bin_outcome[rows] = lifetime[:, calibration.outcome_index(b)]
            brier[rows] = lifetime[:, [calibration.SWB, calibration.SW]]

        return ModelColumns(
            names=list(names),
            class_limit=self.limits.class_limit,
            num_classes=np.array(num_classes, np.int64),
            samples=life[:, acc.N].copy(),
            weight=life[:, acc.SW].copy(),
            loss_weighted_sum=life[:, acc.SWL].copy(),
            correct_weighted_sum=life[:, acc.SWC].copy(),
            batches=np.array(batches, np.int64),
            unnormalized_rows=np.array(unnorm, np.int64),
            unnormalized_targets=np.array(unnorm_targets, np.int64),
            rejected=list(rejected),
            last_batch_time=list(last_batch),
            last_event_time=list(last_event),
            class_offsets=class_offsets,
            class_weight=class_weight,
            class_loss_weighted_sum=class_loss,
            hist_bounds=np.asarray(self.limits.loss_buckets, np.float64),
            hist_counts=hist,
            loss_sum=np.array(loss_sum, np.float64),
            window_labels=self.labels[0],
            windows=windows,
            predictions=PredictionColumns(
                rows=plife[:, acc.N].copy(),
                weight=plife[:, acc.SW].copy(),
                entropy_weighted_sum=plife[:, acc.SWL].copy(),
                confidence_weighted_sum=plife[:, acc.SWF].copy(),
                window_labels=self.labels[1],
                window_entropy=entropy,
            ),
            joins=JoinColumns(
                joined=joined,
                outcomes=outcomes,
                pending=pending,
                delay_bounds=self.delay_bounds,
                delay_counts=delay_counts,
                delay_sum=delay_sum,
            ),
            calibration=CalibrationColumns(
                bin_labels=calibration.bin_labels(self.bins),
                weight=bin_weight,
                confidence=bin_confidence,
                outcome=bin_outcome,
                brier_weighted_sum=brier[:, 0].copy(),
                brier_weight=brier[:, 1].copy(),
                window_labels=self.labels[0],
                windows=cal_windows,
            ),
        )
