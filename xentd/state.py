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
from collections.abc import Callable
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
from xentd.jit import kernel_array
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
class Snapshot:
    models: list[ModelSnapshot]
    rejected: dict[str, int]
    counters: Counters
    pending_bytes: int = 0  # what the join store holds (xentd.joins)
    pending_bytes_limit: int = 0  # labels.max_pending_bytes


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
        never stalls ingestion for long; means and labels are derived outside it. Each
        model's figures are copied whole, so a scrape never sees half a batch."""
        with self.lock:
            names = list(self.models)
            rejected = dict(self.rejected)
            counters = self.counters.copy()
            pending_bytes = self.joins.nbytes
        raw = []
        for start in range(0, len(names), SNAPSHOT_CHUNK):
            with self.lock:
                now = self.clock()
                for name in names[start : start + SNAPSHOT_CHUNK]:
                    m = self.models.get(name)
                    if m is not None:  # evicted since the list was taken
                        raw.append(self._copy_model(m, now))
        models = [self._derive(*r) for r in raw]
        return Snapshot(
            models=models,
            rejected=rejected,
            counters=counters,
            pending_bytes=pending_bytes,
            pending_bytes_limit=self.joins.max_bytes,
        )

    def _copy_model(self, m: ModelState, now: float) -> tuple[Any, ...]:
        """What a snapshot needs of one model, copied (call with the lock held)."""
        join = None
        if m.name in self.joins.stats:
            st = self.joins.stats[m.name]
            join = (st.outcomes.copy(), self.joins.pending(m.name), st.delay_counts.copy(), st.delay_sum)
        now = max(now, m.clock)
        return (
            m,
            m.num_classes,
            m.loss.lifetime.copy(),
            m.loss.hist.copy(),
            m.loss.value_sum,
            m.batches,
            m.unnormalized_rows,
            m.unnormalized_targets,
            dict(m.rejected),
            m.last_batch_time,
            m.last_event_time,
            m.loss.window_matrix(now),
            m.predictions.lifetime.copy(),
            m.predictions.window_matrix(now),
            join,
            # The component itself too: a model's first scored batch may replace it (binary
            # or not) before the copy is derived, outside the lock.
            m.calibration,
            m.calibration.lifetime.copy(),
            m.calibration.window_matrix(now),
        )

    def _derive(
        self,
        m: ModelState,
        num_classes: int,
        life: np.ndarray,
        hist: np.ndarray,
        loss_sum: float,
        batches: int,
        unnorm: int,
        unnorm_targets: int,
        model_rejected: dict[str, int],
        last_batch: float,
        last_event: float | None,
        matrix: np.ndarray,
        pred_life: np.ndarray,
        pred_matrix: np.ndarray,
        join: tuple[np.ndarray, int, np.ndarray, float] | None,
        cal: CalibrationStats,
        cal_life: np.ndarray,
        cal_matrix: np.ndarray,
    ) -> ModelSnapshot:
        s = m.slots
        windows = derive_all(matrix, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            entropy = pred_matrix[:, acc.SWL] / pred_matrix[:, acc.SW]
        joins = None
        if join is not None:
            outcomes, pending, delay_counts, delay_sum = join
            joins = JoinSummary(
                outcomes=dict(zip(OUTCOMES, outcomes.tolist(), strict=True)),
                pending=pending,
                delay_bounds=self.joins.delay_bounds,
                delay_counts=delay_counts,
                delay_sum=delay_sum,
            )
        return ModelSnapshot(
            name=m.name,
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
            class_labels=class_labels(num_classes, m.class_limit),
            class_weight=life[acc.HEAD : acc.HEAD + s],
            class_loss_weighted_sum=life[acc.HEAD + s : acc.HEAD + 2 * s],
            hist_bounds=m.loss.bounds,
            hist_counts=hist,
            loss_sum=loss_sum,
            windows=list(zip(m.window_labels, windows, strict=True)),
            predictions=PredictionSummary(
                rows=float(pred_life[acc.N]),
                weight=float(pred_life[acc.SW]),
                entropy_weighted_sum=float(pred_life[acc.SWL]),
                confidence_weighted_sum=float(pred_life[acc.SWF]),
                window_entropy=list(zip(m.predictions.window_labels, entropy.tolist(), strict=True)),
            ),
            joins=joins,
            calibration=self._calibration(cal, cal_life, cal_matrix, [w.cross_entropy for w in windows]),
        )

    @staticmethod
    def _calibration(
        c: CalibrationStats, life: np.ndarray, matrix: np.ndarray, mean_loss: list[float]
    ) -> CalibrationSummary:
        """``mean_loss``: the loss windows' mean cross-entropy, row for row (NE's numerator)."""
        weight, confidence, outcome = calibration.reliability_bins(life, c.bins)
        brier_sum, brier_weight = calibration.brier_sums(life)
        return CalibrationSummary(
            bin_labels=calibration.bin_labels(c.bins),
            weight=weight,
            confidence=confidence,
            outcome=outcome,
            brier_weighted_sum=brier_sum,
            brier_weight=brier_weight,
            windows=list(
                zip(
                    c.window_labels,
                    calibration.derive_calibration(matrix, c.bins, c.slots, c.binary, np.array(mean_loss)),
                    strict=True,
                )
            ),
        )
