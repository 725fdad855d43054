"""Calibration statistics per model: reliability bins, the Brier score and the target prior.

Every statistic is a *stat vector* of float64, for B bins and S class slots::

    [0]                N      samples
    [1]                SW     sum of weights
    [2]                SWB    sum of weight * brier
    [3]                SWP    sum of weight * confidence
    [4]                SWO    sum of weight * outcome
    [5 : 5+B]          W_b    per bin: sum of weights
    [5+B : 5+2B]       C_b    per bin: sum of weight * confidence
    [5+2B : 5+3B]      O_b    per bin: sum of weight * outcome
    [5+3B : 5+3B+S]    M_c    per class slot: the target prior's mass, sum of weight * t_c

A sample falls in bin ``min(floor(confidence * B), B - 1)``. Binary models have S = 2
(mass ``[w (1 - t), w t]``) and their outcome is the target t; multiclass models use the
loss component's class slots (classes past the class limit share "other") and their
outcome is ``correct``. As in :mod:`xentd.accumulate`, sums of vectors are vectors of
sums, so one layout serves lifetime totals, time windows, count windows and the EWMA,
and every figure of a window (:func:`derive_calibration`) comes from its row alone.

The windows are :class:`xentd.state.WindowedStats`'s, with memory that grows with
traffic up to the configured bound instead of being taken up front, because this vector
is several times the loss one (3B + S + 5 entries: 60 for a 10-class model, 15 bins):

- time windows: each window's ring of buckets keeps bucket numbers for every position,
  but the bucket sums live in rows of one store, handed out the first time a position is
  used. A model that sends for a few seconds holds a few rows, not windows x buckets;
- count windows: the sample ring and the block sums grow as samples arrive, up to the
  largest window. The ring keeps per sample w, confidence, brier (and t, binary), from
  which the bin, the products and the binary mass are recomputed exactly as folded;
  multiclass models add an int32 tag ``2 * slot + correct``, slot -1 for a soft-target
  sample, whose per-slot masses live in a [samples, S] matrix allocated only once a
  model sends soft multiclass targets.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client.utils import floatToGoString

from xentd import accumulate as acc
from xentd.config import TimeWindow, WindowsConfig
from xentd.errors import Reason, ValidationError
from xentd.jit import cached, kernel_array

N, SW, SWB, SWP, SWO, HEAD = 0, 1, 2, 3, 4, 5

# How a batch's targets arrive (the ``mode`` of the fold kernel): binary [N], class indices, soft [N, C].
BINARY, INDEX, SOFT = 0, 1, 2

# Ring columns: w, confidence, brier, and for binary models the target t.
_BINARY_COLUMNS, _MULTICLASS_COLUMNS = 4, 3

# Why a fold was refused, when its calibration sums would overflow.
OVERFLOW = "the batch's weighted calibration sums overflow float64 (the totals would become infinite)"

# Bucket number of a time-window position never used: no read range reaches it.
_NEVER = -(1 << 62)


# Stand-ins for absent inputs, of the types kernel_array gives the real ones (one signature each).
_NO_WEIGHTS = kernel_array(np.empty(0, np.float64))
_NO_TARGETS = kernel_array(np.empty(0, np.float64))
_NO_SOFT_TARGETS = kernel_array(np.empty((0, 0), np.float64))

# The kernels inline xentd.accumulate's class-slot rule: its changes must make their cached builds stale.
_jit = cached(acc.__file__)


def vector_size(bins: int, slots: int) -> int:
    return HEAD + 3 * bins + slots


def weight_index(bins: int) -> slice:
    return slice(HEAD, HEAD + bins)


def confidence_index(bins: int) -> slice:
    return slice(HEAD + bins, HEAD + 2 * bins)


def outcome_index(bins: int) -> slice:
    return slice(HEAD + 2 * bins, HEAD + 3 * bins)


def mass_index(bins: int, slots: int) -> slice:
    return slice(HEAD + 3 * bins, HEAD + 3 * bins + slots)


def reliability_bins(vec: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of a stat vector's per-bin (W_b, C_b, O_b): the lifetime counters' values."""
    return vec[weight_index(bins)].copy(), vec[confidence_index(bins)].copy(), vec[outcome_index(bins)].copy()


def brier_sums(vec: np.ndarray) -> tuple[float, float]:
    """A stat vector's (sum of weight * brier, sum of weights): the Brier summary's _sum and _count."""
    return float(vec[SWB]), float(vec[SW])


@functools.lru_cache(maxsize=64)
def bin_labels(bins: int) -> tuple[str, ...]:
    """Each bin's upper edge, written as Prometheus writes ``le``; the last is "1.0"."""
    return tuple(floatToGoString((b + 1) / bins) for b in range(bins))  # type: ignore[no-untyped-call]


# --- jitted kernels -------------------------------------------------------------------


@_jit
def _bin(confidence, bins):  # type: ignore[no-untyped-def]
    # min(floor(c * B), B - 1), clamped to [0, B - 1] for values off [0, 1] (NaN goes to 0).
    x = confidence * bins
    if not x >= 1.0:
        return 0
    if x >= bins:
        return bins - 1
    return int(x)


@_jit
def _add_common(vec, w, c, brier, outcome, bins):  # type: ignore[no-untyped-def]
    """Everything of one sample but the prior mass."""
    b = _bin(c, bins)
    wc = w * c
    wo = w * outcome
    vec[N] += 1.0
    vec[SW] += w
    vec[SWB] += w * brier
    vec[SWP] += wc
    vec[SWO] += wo
    vec[HEAD + b] += w
    vec[HEAD + bins + b] += wc
    vec[HEAD + 2 * bins + b] += wo


@_jit
def _add_ring(vec, ring, tags, masses, p, bins, slots):  # type: ignore[no-untyped-def]
    """Add ring sample ``p``, rebuilt from what the ring keeps (see the module doc)."""
    w = ring[p, 0]
    m = HEAD + 3 * bins
    if ring.shape[1] == _BINARY_COLUMNS:
        t = ring[p, 3]
        _add_common(vec, w, ring[p, 1], ring[p, 2], t, bins)
        vec[m] += w * (1.0 - t)
        vec[m + 1] += w * t
        return
    tag = tags[p]
    _add_common(vec, w, ring[p, 1], ring[p, 2], float(tag & 1), bins)
    slot = tag >> 1
    if slot >= 0:
        vec[m + slot] += w
    else:
        for k in range(slots):
            vec[m + k] += masses[p, k]


@_jit
def _batch(conf, brier, correct, tcls, t1, t2, mode, weights, weighted, bins, class_limit, vec):  # type: ignore[no-untyped-def]
    """Sum a batch into ``vec`` (zeroed first)."""
    vec[:] = 0.0
    m = HEAD + 3 * bins
    for i in range(conf.shape[0]):
        w = weights[i] if weighted else 1.0
        if mode == BINARY:
            t = t1[i]
            _add_common(vec, w, conf[i], brier[i], t, bins)
            vec[m] += w * (1.0 - t)
            vec[m + 1] += w * t
        else:
            _add_common(vec, w, conf[i], brier[i], float(correct[i]), bins)
            if mode == INDEX:
                vec[m + acc._slot(tcls[i], class_limit)] += w
            else:
                for c in range(t2.shape[1]):
                    vec[m + acc._slot(c, class_limit)] += w * t2[i, c]


@_jit
def _count_push(  # type: ignore[no-untyped-def]
    conf,
    brier,
    correct,
    tcls,
    t1,
    t2,
    mode,
    weights,
    weighted,
    bins,
    class_limit,
    slots,
    ring,
    tags,
    masses,
    blocks,
    block,
    total,
):
    """Append a batch to the sample ring and the block sums; return the new total.

    As :func:`xentd.accumulate.count_push`: sample j lands in ring slot j % len(ring) and
    in block j // block, and block sums are only ever added to.
    """
    if conf.shape[0] == 0:  # nothing to place, and the ring may not exist yet
        return total
    p, b, offset = acc.ring_position(total, ring.shape[0], blocks.shape[0], block)
    row = blocks[b]  # the current block's sums
    m = HEAD + 3 * bins
    for i in range(conf.shape[0]):
        if offset == 0:
            row = blocks[b]
            row[:] = 0.0
        # The block sums get what the ring keeps, bit for bit, from the values in hand (what
        # _add_ring reads back): reading the ring back after writing it made the loop about
        # ten times slower.
        w = weights[i] if weighted else 1.0
        ring[p, 0] = w
        ring[p, 1] = conf[i]
        ring[p, 2] = brier[i]
        if mode == BINARY:
            t = t1[i]
            ring[p, 3] = t
            _add_common(row, w, conf[i], brier[i], t, bins)
            row[m] += w * (1.0 - t)
            row[m + 1] += w * t
        elif mode == INDEX:
            slot = acc._slot(tcls[i], class_limit)
            tags[p] = 2 * slot + correct[i]
            _add_common(row, w, conf[i], brier[i], float(correct[i]), bins)
            row[m + slot] += w
        else:
            tags[p] = -2 + correct[i]
            masses[p, :] = 0.0
            for c in range(t2.shape[1]):
                masses[p, acc._slot(c, class_limit)] += w * t2[i, c]
            _add_common(row, w, conf[i], brier[i], float(correct[i]), bins)
            for k in range(slots):
                row[m + k] += masses[p, k]
        p, b, offset = acc.next_position(p, b, offset, ring.shape[0], blocks.shape[0], block)
    return total + conf.shape[0]


@_jit
def _count_read(ring, tags, masses, blocks, block, total, size, bins, slots, out):  # type: ignore[no-untyped-def]
    """Sum the last ``size`` samples: :func:`xentd.accumulate.count_read`'s whole blocks and edges."""
    out[:] = 0.0
    cap = ring.shape[0]
    nb = blocks.shape[0]
    first, done, edges = acc.count_window(total, size, block)
    for b in range(first, done):
        out += blocks[b % nb]
    for lo, hi in edges:
        for j in range(lo, hi):
            _add_ring(out, ring, tags, masses, j % cap, bins, slots)


@_jit
def _time_add(epochs, rows, store, used, index, vec):  # type: ignore[no-untyped-def]
    """:func:`xentd.accumulate.time_add` with the bucket sums in rows of ``store``, a row
    handed out the first time a position is used; returns the rows in use."""
    s = index % epochs.shape[0]
    r = rows[s]
    if r < 0:
        r = used
        rows[s] = r
        used += 1
        store[r, :] = 0.0
        epochs[s] = index
    elif epochs[s] != index:
        store[r, :] = 0.0
        epochs[s] = index
    store[r, :] += vec
    return used


@_jit
def _time_read(epochs, rows, store, now_index, out):  # type: ignore[no-untyped-def]
    """:func:`xentd.accumulate.time_read` over rows of ``store``."""
    out[:] = 0.0
    b = epochs.shape[0]
    for s in range(b):
        e = epochs[s]
        r = rows[s]
        if r >= 0 and now_index - b < e <= now_index:
            out += store[r, :]


@_jit
def _fold(  # type: ignore[no-untyped-def]
    conf,
    brier,
    correct,
    tcls,
    t1,
    t2,
    mode,
    weights,
    weighted,
    bins,
    class_limit,
    slots,
    lifetime,
    vec,
    tw_epochs,
    tw_rows,
    tw_store,
    tw_used,
    tw_widths,
    now,
    ewma,
    decay,
    ring,
    tags,
    masses,
    blocks,
    block,
    total,
    counting,
    commit,
):
    """One batch into every window at once (as :func:`xentd.accumulate.fold_all`).

    Returns (committed, new count total, time-window rows in use). Nothing changes with
    ``commit`` false, nor when a lifetime sum would become non-finite: every entry is a
    sum of terms >= 0, so each window's entries are at most the lifetime ones and stay
    finite when those do.
    """
    _batch(conf, brier, correct, tcls, t1, t2, mode, weights, weighted, bins, class_limit, vec)
    for k in range(vec.shape[0]):
        if not math.isfinite(lifetime[k] + vec[k]):
            return False, total, tw_used
    if not commit:
        return True, total, tw_used
    lifetime += vec
    for t in range(tw_widths.shape[0]):
        tw_used = _time_add(tw_epochs[t], tw_rows[t], tw_store, tw_used, acc.bucket_number(now, tw_widths[t]), vec)
    for k in range(ewma.shape[0]):
        ewma[k] = ewma[k] * decay + vec[k]
    if counting:
        total = _count_push(
            conf,
            brier,
            correct,
            tcls,
            t1,
            t2,
            mode,
            weights,
            weighted,
            bins,
            class_limit,
            slots,
            ring,
            tags,
            masses,
            blocks,
            block,
            total,
        )
    return True, total, tw_used


@_jit
def _entropy(mass):  # type: ignore[no-untyped-def]
    total = 0.0
    for k in range(mass.shape[0]):
        total += mass[k]
    if not total > 0.0:
        return np.nan
    h = 0.0
    for k in range(mass.shape[0]):
        if mass[k] > 0.0:
            p = mass[k] / total
            h -= p * math.log(p)
    return h


@_jit
def _derive_rows(matrix, bins, slots, binary, mean_loss, out):  # type: ignore[no-untyped-def]
    """Per row: ECE, MCE, Brier, reliability, resolution, uncertainty, NE (NaN where undefined)."""
    nan = np.nan
    m = HEAD + 3 * bins
    for r in range(matrix.shape[0]):
        row = matrix[r]
        out[r, :] = nan
        sw = 0.0
        so = 0.0
        gap = 0.0
        worst = -1.0
        for b in range(bins):
            wb = row[HEAD + b]
            ob = row[HEAD + 2 * bins + b]
            d = abs(ob - row[HEAD + bins + b])
            sw += wb
            so += ob
            gap += d
            if wb > 0.0:
                worst = max(worst, d / wb)
        if sw > 0.0:
            out[r, 0] = gap / sw
            out[r, 1] = worst
        if row[SW] > 0.0:
            out[r, 2] = row[SWB] / row[SW]
        if binary and sw > 0.0:
            obar = so / sw
            rel = 0.0
            res = 0.0
            for b in range(bins):
                wb = row[HEAD + b]
                if wb > 0.0:
                    cb = row[HEAD + bins + b] / wb
                    ob = row[HEAD + 2 * bins + b] / wb
                    rel += wb * (cb - ob) ** 2
                    res += wb * (ob - obar) ** 2
            out[r, 3] = rel / sw
            out[r, 4] = res / sw
            out[r, 5] = obar * (1.0 - obar)
        h = _entropy(row[m : m + slots])
        if h > 0.0:
            out[r, 6] = mean_loss[r] / h


# --- derived figures ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CalibrationWindow:
    """Derived calibration figures of one window; NaN where undefined: every figure of an
    empty window, the Murphy decomposition of a multiclass model, and NE while the target
    prior's entropy is 0."""

    calibration_error: float  # ECE
    max_calibration_error: float  # MCE
    brier_score: float
    brier_reliability: float
    brier_resolution: float
    brier_uncertainty: float
    normalized_entropy: float


def derive_calibration(
    matrix: np.ndarray, bins: int, slots: int, binary: bool, mean_loss: np.ndarray
) -> list[CalibrationWindow]:
    """:class:`CalibrationWindow` for every row of a (windows, stat vector) matrix;
    ``mean_loss`` is the loss component's mean cross-entropy of the same windows, row for row."""
    loss = np.ascontiguousarray(mean_loss, dtype=np.float64)
    if loss.shape != (matrix.shape[0],):
        raise ValueError(f"mean_loss has shape {loss.shape}; expected ({matrix.shape[0]},)")
    out = np.empty((matrix.shape[0], 7))
    _derive_rows(matrix, bins, slots, binary, loss, out)
    return [CalibrationWindow(*row) for row in out.tolist()]


# --- the component --------------------------------------------------------------------


class CalibrationStats:
    """Calibration stat vectors over every window: lifetime totals, time windows, exact
    count windows and the EWMA, in the windows and row order of
    :class:`xentd.state.WindowedStats`, with the same save/check/load protocol."""

    # Each array: the dtype kinds it may have, and whether every value must be >= 0.
    ARRAYS: dict[str, tuple[str, bool]] = {
        "lifetime": ("f", True),
        "ewma": ("f", True),
        "ring": ("f", True),
        "ring_tag": ("i", False),  # 2 * slot + correct; slot -1 for a soft-target sample
        "ring_mass": ("f", True),
        "blocks": ("f", True),
        "tw_epochs": ("iu", False),  # bucket numbers; unused positions hold one far below 0
        "tw_rows": ("i", False),  # the store row of each position, -1 for none yet
        "tw_buckets": ("f", True),
    }
    COUNTS = ("count_total",)
    TIMES = ("ewma_time",)
    # Snapshot layout keys (xentd.persist) this component depends on: with other bins,
    # the saved sums cannot be mapped, and the component starts empty.
    LAYOUT: tuple[str, ...] = ("calibration_bins",)

    def __init__(
        self, bins: int, slots: int, class_limit: int, windows: WindowsConfig, created: float, *, binary: bool
    ) -> None:
        if bins < 1:
            raise ValueError(f"bins is {bins}; expected at least 1")
        if binary and slots != 2:
            raise ValueError(f"a binary model has 2 class slots, not {slots}")
        self.bins = bins
        self.slots = slots
        self.class_limit = class_limit
        self.binary = binary
        size = vector_size(bins, slots)
        self.lifetime = np.zeros(size)
        self.scratch = np.zeros(size)
        times: tuple[TimeWindow, ...] = windows.time
        self.tw_widths = np.array([w.seconds / windows.buckets for w in times], np.float64)
        self.tw_epochs = np.full((len(times), windows.buckets), _NEVER, np.int64)
        self.tw_rows = np.full((len(times), windows.buckets), -1, np.int32)
        self.tw_buckets = np.zeros((0, size))  # rows handed out as positions are first used
        self.tw_used = 0
        self.count_sizes = tuple(windows.count)
        self.window_labels = (*(w.label for w in times), *(f"last_{k}" for k in self.count_sizes), "ewma")
        self.count_total = 0
        self.count_cap_max = max(self.count_sizes, default=0)
        self.block = acc.block_size(self.count_cap_max)
        # The current, partial block plus enough complete ones to cover the largest window.
        self.blocks_max = self.count_cap_max // self.block + 2
        self.blocks = np.zeros((0, size))
        self.ring = np.zeros((0, _BINARY_COLUMNS if binary else _MULTICLASS_COLUMNS))
        self.ring_tag = np.zeros(0, np.int32)
        self.ring_mass = np.zeros((0, slots))
        self.half_life = windows.ewma_half_life_seconds
        self.ewma = np.zeros(size)
        self.ewma_time = created

    # --- persistence (the file format is xentd.persist's) -------------------------

    def save(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Copies of everything needed to rebuild this component: (scalars, arrays)."""
        scalars: dict[str, object] = {"count_total": self.count_total, "ewma_time": self.ewma_time}
        arrays: dict[str, np.ndarray] = {
            "lifetime": self.lifetime.copy(),
            "ewma": self.ewma.copy(),
            "ring": self.ring.copy(),
            "ring_tag": self.ring_tag.copy(),
            "ring_mass": self.ring_mass.copy(),
            "blocks": self.blocks.copy(),
        }
        if self.tw_widths.size:
            arrays["tw_epochs"] = self.tw_epochs.copy()
            arrays["tw_rows"] = self.tw_rows.copy()
            arrays["tw_buckets"] = self.tw_buckets[: self.tw_used].copy()
        return scalars, arrays

    @classmethod
    def check(
        cls, scalars: dict[str, object], arrays: dict[str, np.ndarray], where: str, slots: int, largest_window: int
    ) -> None:
        """Raise ValueError unless the saved values are ones a run can produce (their shapes
        against the configuration are :meth:`load`'s check)."""
        # Imported here: xentd.state will hold this component, so it cannot be imported first.
        from xentd.state import check_values

        check_values(scalars, arrays, where, cls.COUNTS, cls.TIMES, cls.ARRAYS)
        ring, tags = arrays["ring"], arrays["ring_tag"]
        # The fold kernels index per-slot sums and the mass matrix with these, unchecked.
        if tags.size and (tags.min() < -2 or (tags >> 1).max() >= slots):
            raise ValueError(f"{where} ring_tag holds {tags.min()}..{tags.max()}; the model has {slots} class slots")
        if tags.size and (tags < 0).any() and arrays["ring_mass"].shape[0] != ring.shape[0]:
            raise ValueError(f"{where} ring_tag has soft-target samples but ring_mass holds no masses for them")
        total = scalars.get("count_total", 0)
        if ring.shape[0] < min(total, largest_window):  # type: ignore[call-overload]
            raise ValueError(f"{where} count_total {total} but the ring holds {ring.shape[0]} samples")
        if "tw_rows" in arrays:
            rows = arrays["tw_rows"]
            used = np.sort(rows[rows >= 0])
            if rows.min(initial=0) < -1 or not np.array_equal(used, np.arange(used.size)):
                raise ValueError(f"{where} tw_rows does not hand each bucket row to one position")
            if arrays["tw_buckets"].shape[0] != used.size:
                raise ValueError(f"{where} tw_buckets has {arrays['tw_buckets'].shape[0]} rows; {used.size} in use")

    def load(self, scalars: dict[str, object], arrays: dict[str, np.ndarray], *, windows: bool) -> None:
        """Load what :meth:`save` produced (checked by :meth:`check`). With ``windows=False``
        (the window configuration changed) only the lifetime totals come back."""

        def shaped(name: str, a: np.ndarray, shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> np.ndarray:
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"{name}: shape {a.shape} {a.dtype}, expected {shape} {dtype}")
            return a.copy()

        size = self.lifetime.shape[0]
        f64 = np.dtype(np.float64)
        self.lifetime = shaped("lifetime", arrays["lifetime"], (size,), f64)
        if not windows:
            return
        self.ewma = shaped("ewma", arrays["ewma"], (size,), f64)
        self.ewma_time = float(scalars["ewma_time"])  # type: ignore[arg-type]
        total = int(scalars["count_total"])  # type: ignore[call-overload]
        blocks = arrays["blocks"]
        acc.check_blocks(blocks, size, self.blocks_max, self.block, total)
        ring, tags, masses = arrays["ring"], arrays["ring_tag"], arrays["ring_mass"]
        cap = ring.shape[0]
        if (
            ring.shape != (cap, self.ring.shape[1])
            or cap > self.count_cap_max
            or tags.shape != ((0,) if self.binary else (cap,))
            or masses.shape not in ((0, self.slots), (cap, self.slots))
        ):
            raise ValueError(f"ring: shape {ring.shape}, tags {tags.shape}, masses {masses.shape}")
        self.blocks = blocks.astype(np.float64)
        self.ring = ring.astype(np.float64)
        self.ring_tag = tags.astype(np.int32)
        self.ring_mass = masses.astype(np.float64)
        self.count_total = total
        if self.tw_widths.size:
            shape = self.tw_epochs.shape
            self.tw_epochs = shaped("tw_epochs", arrays["tw_epochs"], shape, np.dtype(np.int64))
            rows = arrays["tw_rows"]
            if rows.shape != shape:
                raise ValueError(f"tw_rows: shape {rows.shape}, expected {shape}")
            self.tw_rows = rows.astype(np.int32)
            store = arrays["tw_buckets"]
            if store.ndim != 2 or store.shape[1] != size:
                raise ValueError(f"tw_buckets: shape {store.shape}, expected (rows, {size})")
            self.tw_buckets = store.astype(np.float64)
            self.tw_used = store.shape[0]

    # --- folding --------------------------------------------------------------------

    def reserve(self, incoming: int, soft: bool) -> None:
        """Room for a batch: ring, soft masses and blocks up to their bounds, and a store
        row for every time window (each may start a position never used)."""
        windows = self.tw_rows.shape[0]
        rows = self.tw_buckets.shape[0]
        bound = self.tw_rows.size
        if rows - self.tw_used < windows and rows < bound:
            self.tw_buckets = acc.grown(self.tw_buckets, min(bound, max(self.tw_used + windows, acc.more(rows))))
        if not self.count_cap_max:
            return
        end = self.count_total + incoming
        cap = acc.ring_capacity(self.ring.shape[0], end, self.count_cap_max, incoming)
        if cap > self.ring.shape[0]:
            # Below the largest window the ring has never wrapped, so the samples are in order.
            self.ring = acc.grown(self.ring, cap)
            if not self.binary:
                self.ring_tag = acc.grown(self.ring_tag, cap)
            if self.ring_mass.shape[0]:
                self.ring_mass = acc.grown(self.ring_mass, cap)
        if soft and self.ring_mass.shape[0] < self.ring.shape[0]:
            # Samples before this one have index targets and never read their (zero) row.
            self.ring_mass = acc.grown(self.ring_mass, self.ring.shape[0])
        rows = acc.block_rows(self.blocks.shape[0], end, self.block, self.blocks_max, incoming)
        if rows > self.blocks.shape[0]:
            self.blocks = acc.grown(self.blocks, rows)

    def kernel_targets(self, targets: np.ndarray | None) -> tuple[int, np.ndarray, np.ndarray]:
        """The fold kernel's (mode, binary targets, soft targets) for a batch's ``targets``
        (see :meth:`fold`), checked against this component's layout."""
        if self.binary:
            if targets is None or targets.ndim != 1:
                raise ValueError("a binary model's calibration needs its [N] targets")
            return BINARY, kernel_array(np.asarray(targets, np.float64)), _NO_SOFT_TARGETS
        if targets is None:
            return INDEX, _NO_TARGETS, _NO_SOFT_TARGETS
        if targets.ndim != 2:
            raise ValueError(f"soft multiclass targets are [N, C]; got shape {targets.shape}")
        # Column c folds into slot min(c, class_limit), unchecked in the kernels.
        if min(targets.shape[1] - 1, self.class_limit) >= self.slots:
            raise ValueError(f"soft targets have {targets.shape[1]} classes; the model has {self.slots} class slots")
        dtype = targets.dtype if targets.dtype in (np.float32, np.float64) else np.float64
        return SOFT, _NO_TARGETS, kernel_array(np.asarray(targets, dtype))

    def fold(
        self,
        confidence: np.ndarray,
        brier: np.ndarray,
        correct: np.ndarray,
        true_class: np.ndarray,
        targets: np.ndarray | None,
        weights: np.ndarray | None,
        now: float,
        *,
        check_only: bool = False,
    ) -> None:
        """Add per-sample confidences, Brier scores and outcomes at time ``now`` (never
        earlier than the last fold's). ``targets``: binary, the [N] float64 targets;
        multiclass, None for class-index targets or the soft [N, C] rows.

        Raises ValidationError(NON_FINITE), changing nothing, when the sums would overflow.
        ``check_only``: raise or not, and change nothing either way.
        """
        n = confidence.shape[0]
        # The kernels index every input by sample, unchecked.
        for name, a in (("brier", brier), ("correct", correct), ("true_class", true_class), ("targets", targets)):
            if a is not None and a.shape[0] != n:
                raise ValueError(f"{name} has {a.shape[0]} samples; confidence has {n}")
        if weights is not None and weights.shape != (n,):
            raise ValueError(f"weights have shape {weights.shape}; expected ({n},)")
        mode, t1, t2 = self.kernel_targets(targets)
        weighted = weights is not None
        w = kernel_array(weights) if weights is not None else _NO_WEIGHTS
        if not check_only:
            self.reserve(n, mode == SOFT)
        committed, total, tw_used = _fold(
            confidence, brier, correct, true_class, t1, t2, mode, w, weighted, *self.kernel_state(now), not check_only
        )
        if not committed:
            raise ValidationError(Reason.NON_FINITE, OVERFLOW)
        if not check_only:
            self.folded(total, tw_used, now)

    def kernel_state(self, now: float) -> tuple[Any, ...]:
        """What :func:`_fold` takes of this component for a fold at ``now``, in its
        argument order (between the samples and ``commit``)."""
        return (
            self.bins,
            self.class_limit,
            self.slots,
            self.lifetime,
            self.scratch,
            self.tw_epochs,
            self.tw_rows,
            self.tw_buckets,
            self.tw_used,
            self.tw_widths,
            now,
            self.ewma,
            acc.decay(now - self.ewma_time, self.half_life),
            self.ring,
            self.ring_tag,
            self.ring_mass,
            self.blocks,
            self.block,
            self.count_total,
            self.count_cap_max > 0,
        )

    def folded(self, total: int, tw_used: int, now: float) -> None:
        """Take the scalars a committed fold at ``now`` returned."""
        self.count_total = total
        self.tw_used = tw_used
        self.ewma_time = now

    def window_matrix(self, now: float) -> np.ndarray:
        """Every window's stat vector, one row each, in :attr:`window_labels` order; the
        ewma row's sample count is decayed to ``now`` (as WindowedStats.window_matrix)."""
        times = self.tw_widths.shape[0]
        out = np.empty((times + len(self.count_sizes) + 1, self.lifetime.shape[0]))
        for i, index in enumerate(acc.bucket_numbers(now, self.tw_widths).tolist()):
            _time_read(self.tw_epochs[i], self.tw_rows[i], self.tw_buckets, index, out[i])
        for k, size in enumerate(self.count_sizes):
            _count_read(
                self.ring,
                self.ring_tag,
                self.ring_mass,
                self.blocks,
                self.block,
                self.count_total,
                size,
                self.bins,
                self.slots,
                out[times + k],
            )
        out[-1] = self.ewma
        out[-1, N] = float(self.ewma[N]) * acc.decay(now - self.ewma_time, self.half_life)
        return out


def warmup() -> None:
    """Compile every fold signature through the real code path: binary float64 targets,
    class-index and float32/float64 soft multiclass targets, without and with weights."""
    windows = WindowsConfig(time=(TimeWindow("1s", 1.0),), buckets=2, count=(4,), ewma_half_life_seconds=1.0)
    weights = kernel_array(np.ones(2))
    conf, brier = np.full(2, 0.5), np.full(2, 0.5)
    correct, tcls = np.ones(2, np.uint8), np.zeros(2, np.int64)
    cases: list[tuple[bool, int, np.ndarray | None]] = [
        (True, 2, kernel_array(np.full(2, 0.5))),
        (False, 3, None),
        (False, 3, kernel_array(np.full((2, 3), 0.5, np.float32))),
        (False, 3, kernel_array(np.full((2, 3), 0.5, np.float64))),
    ]
    for binary, slots, targets in cases:
        for w in (None, weights):
            stats = CalibrationStats(3, slots, 2, windows, 0.0, binary=binary)
            stats.fold(conf, brier, correct, tcls, targets, w, 0.0, check_only=True)
            stats.fold(conf, brier, correct, tcls, targets, w, 0.0)
            matrix = stats.window_matrix(0.0)
            derive_calibration(matrix, stats.bins, slots, binary, np.ones(matrix.shape[0]))
