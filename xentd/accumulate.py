"""Numba kernels that fold per-sample scores into rolling state.

Every statistic is a *stat vector* of float64, laid out as::

    [0]          n        samples
    [1]          sw       sum of weights
    [2]          swl      sum of weight * loss
    [3]          swc      sum of weight * correct
    [4]          swf      sum of weight * focal loss
    [5 : 5+S]             per-class sum of weights
    [5+S : 5+2S]          per-class sum of weight * loss

where S is the model's number of class slots. Sums of vectors are vectors of
sums, so one layout serves lifetime totals, time-window buckets, count windows
and the EWMA alike, and every mean is a ratio of two of its entries.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

N, SW, SWL, SWC, SWF, HEAD = 0, 1, 2, 3, 4, 5


def vector_size(slots: int) -> int:
    return HEAD + 2 * slots


@njit(cache=True)
def _slot(cls: int, class_limit: int) -> int:
    # Classes past the limit share one "other" slot, which sits at index class_limit.
    return cls if cls < class_limit else class_limit


@njit(cache=True)
def fold_batch(loss, focal, correct, tcls, weights, weighted, class_limit, slots, bounds, vec, hist):  # type: ignore[no-untyped-def]
    """Add a batch to ``vec`` and to the loss histogram; return the unweighted loss sum."""
    total = 0.0
    for i in range(loss.shape[0]):
        w = weights[i] if weighted else 1.0
        lo = loss[i]
        vec[N] += 1.0
        vec[SW] += w
        vec[SWL] += w * lo
        vec[SWC] += w * correct[i]
        vec[SWF] += w * focal[i]
        k = _slot(tcls[i], class_limit)
        vec[HEAD + k] += w
        vec[HEAD + slots + k] += w * lo
        hist[np.searchsorted(bounds, lo)] += 1
        total += lo
    return total


@njit(cache=True)
def time_add(epochs, buckets, index, vec):  # type: ignore[no-untyped-def]
    """Add ``vec`` to the bucket for bucket number ``index`` (monotone per model)."""
    s = index % epochs.shape[0]
    if epochs[s] != index:
        buckets[s, :] = 0.0
        epochs[s] = index
    buckets[s, :] += vec


@njit(cache=True)
def time_read(epochs, buckets, now_index, out):  # type: ignore[no-untyped-def]
    """Sum the buckets of the last ``B`` bucket numbers, the current one included."""
    out[:] = 0.0
    b = epochs.shape[0]
    for s in range(b):
        e = epochs[s]
        if now_index - b < e <= now_index:
            out += buckets[s, :]


@njit(cache=True)
def _add_sample(vec, sign, w, wl, wc, wf, k, slots):  # type: ignore[no-untyped-def]
    vec[N] += sign
    vec[SW] += sign * w
    vec[SWL] += sign * wl
    vec[SWC] += sign * wc
    vec[SWF] += sign * wf
    vec[HEAD + k] += sign * w
    vec[HEAD + slots + k] += sign * wl


# Count-window rings and block sums grow with traffic, up to their bound: by a quarter
# at a time from MIN_RING samples, and by at least one more batch like the one
# arriving (ring_capacity, block_rows), so that steady traffic reallocates on at most
# every other fold. A model that sends little keeps little (most of 10,000 models
# do), and a busy one ends at the bound either way. One large batch can leave the
# ring twice its size (room for the next one), never past the bound.
GROWTH = 1.25
MIN_RING = 64


def more(rows: int) -> int:
    """The next size of a growing array of ``rows`` rows."""
    return int(rows * GROWTH)


def grown(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``rows``."""
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[: a.shape[0]] = a
    return out


def ring_capacity(cap: int, end: int, cap_max: int, incoming: int = 0) -> int:
    """The sample ring's size once it holds samples up to number ``end`` (it is ``cap`` now,
    at most ``cap_max``), the last ``incoming`` of them just arriving: unchanged if they fit,
    else grown by the policy above, with room for one more batch like this one (a model
    that sends 64 samples at a time grew on nine folds of its first ten without it)."""
    if cap >= min(cap_max, end):
        return cap
    return min(cap_max, max(end + incoming, more(cap), MIN_RING))


def block_rows(rows: int, end: int, block: int, rows_max: int, incoming: int = 0) -> int:
    """The block sums' rows once samples up to number ``end`` are in (``rows`` now, at most
    ``rows_max``), grown as :func:`ring_capacity`. Until all ``rows_max`` are kept no
    block has wrapped: block b is row b."""
    if rows >= min(rows_max, (end - 1) // block + 1):
        return rows
    return min(rows_max, max((end + incoming - 1) // block + 1, more(rows)))


def check_blocks(blocks: np.ndarray, size: int, rows_max: int, block: int, total: int) -> None:
    """Raise ValueError unless saved block sums fit a component with stat vectors of ``size``
    holding ``total`` samples (snapshots written before the blocks grew hold all of them)."""
    if blocks.ndim != 2 or blocks.shape[1] != size or blocks.shape[0] > rows_max:
        raise ValueError(f"blocks: shape {blocks.shape}, expected at most ({rows_max}, {size})")
    if blocks.shape[0] < min(rows_max, -(-total // block)):
        raise ValueError(f"blocks: {blocks.shape[0]} rows for count_total {total}")


@njit(cache=True, inline="always")
def bucket_number(now, width):  # type: ignore[no-untyped-def]
    """The number of the ``width``-second time bucket that holds ``now``: Python's floor
    division, as always (Numba's float ``//`` is CPython's and NumPy's). The fold kernels
    compute it themselves: as a NumPy call per fold it cost more than the fold's arithmetic."""
    return np.int64(now // width)


@njit(cache=True)
def bucket_numbers(now, widths):  # type: ignore[no-untyped-def]
    """Each time window's bucket number at ``now``, for buckets ``widths`` seconds wide."""
    out = np.empty(widths.shape[0], np.int64)
    for t in range(widths.shape[0]):
        out[t] = bucket_number(now, widths[t])
    return out


def decay(elapsed: float, half_life: float) -> float:
    """The EWMA's factor after ``elapsed`` seconds: a weight halves every half-life."""
    return float(2.0 ** (-elapsed / half_life))


def block_size(largest_window: int) -> int:
    """Samples per block: a power of two near sqrt(K), so reads cost O(sqrt(K))."""
    return max(16, 1 << round(math.log2(max(largest_window, 1)) / 2))


@njit(cache=True, inline="always")
def ring_position(total, cap, nb, block):  # type: ignore[no-untyped-def]
    """Where sample number ``total`` goes: (ring slot, block row, offset in its block), that
    is (total % cap, (total // block) % nb, total % block)."""
    return total % cap, (total // block) % nb, total % block


@njit(cache=True, inline="always")
def next_position(pos, b, offset, cap, nb, block):  # type: ignore[no-untyped-def]
    """:func:`ring_position` of the next sample, by counting: three 64-bit divisions a
    sample were most of a small fold's time."""
    pos += 1
    if pos == cap:
        pos = 0
    offset += 1
    if offset == block:
        offset = 0
        b += 1
        if b == nb:
            b = 0
    return pos, b, offset


@njit(cache=True)
def count_push(  # type: ignore[no-untyped-def]
    loss,
    focal,
    correct,
    tcls,
    weights,
    weighted,
    class_limit,
    slots,
    ring,
    ring_cls,
    blocks,
    block,
    total,
):
    """Append a batch to the sample ring and to the block sums; return the new total.

    Sample j lands in ring slot j % len(ring) and in block j // block. Block sums
    are only ever added to, never subtracted from, so they carry no drift.
    """
    if loss.shape[0] == 0:  # nothing to place, and the ring may not exist yet
        return total
    pos, b, offset = ring_position(total, ring.shape[0], blocks.shape[0], block)
    row = blocks[b]  # the current block's sums
    for i in range(loss.shape[0]):
        if offset == 0:
            row = blocks[b]
            row[:] = 0.0
        # The block sums get what the ring keeps, from the values in hand: reading the
        # ring back after writing it made the loop about ten times slower.
        w = weights[i] if weighted else 1.0
        wl = w * loss[i]
        wc = w * correct[i]
        wf = w * focal[i]
        k = _slot(tcls[i], class_limit)
        ring[pos, 0] = w
        ring[pos, 1] = wl
        ring[pos, 2] = wc
        ring[pos, 3] = wf
        ring_cls[pos] = k
        _add_sample(row, 1.0, w, wl, wc, wf, k, slots)
        pos, b, offset = next_position(pos, b, offset, ring.shape[0], blocks.shape[0], block)
    return total + loss.shape[0]


@njit(cache=True)
def count_window(total, size, block):  # type: ignore[no-untyped-def]
    """How a count window over the last ``size`` of ``total`` samples is read: the whole
    blocks ``first`` to ``done - 1`` inside it, and the single samples of its two edges,
    as (first, done, edges); ``first >= done`` when no whole block fits."""
    start = max(0, total - size)
    first = (start + block - 1) // block  # first block that starts inside the window
    done = total // block  # blocks before this one are complete
    if first >= done:
        return first, done, ((start, total), (total, total))
    return first, done, ((start, first * block), (done * block, total))


@njit(cache=True)
def count_read(ring, ring_cls, blocks, block, total, size, slots, out):  # type: ignore[no-untyped-def]
    """Sum the last ``size`` samples: whole blocks inside the window, single samples at its edges."""
    out[:] = 0.0
    cap = ring.shape[0]
    nb = blocks.shape[0]
    first, done, edges = count_window(total, size, block)
    for b in range(first, done):
        out += blocks[b % nb]
    for lo, hi in edges:
        for m in range(lo, hi):
            p = m % cap
            _add_sample(out, 1.0, ring[p, 0], ring[p, 1], ring[p, 2], ring[p, 3], ring_cls[p], slots)


@njit(cache=True)
def fold_all(  # type: ignore[no-untyped-def]
    value,
    focal,
    correct,
    tcls,
    weights,
    weighted,
    class_limit,
    slots,
    bounds,
    lifetime,
    hist,
    vec,
    hist_scratch,
    value_sum,
    tw_epochs,
    tw_buckets,
    tw_widths,
    now,
    ewma,
    decay,
    ring,
    ring_cls,
    blocks,
    block,
    total,
    counting,
    commit,
):
    """One batch into every window at once: lifetime, histogram, time windows, EWMA and count
    windows, in one call instead of one per window (the call overhead was most of a small fold).

    Returns (committed, new value sum, new count total). Nothing changes with ``commit``
    false (a check only), nor when the batch would overflow a lifetime sum (finite inputs
    can: FP64 logits or weights near 1e308);
    scores and weights are >= 0, so every window and class sum is at most its lifetime
    total, and if those stay finite everything does.
    """
    vec[:] = 0.0
    hist_scratch[:] = 0
    new_sum = value_sum + fold_batch(
        value, focal, correct, tcls, weights, weighted, class_limit, slots, bounds, vec, hist_scratch
    )
    if not math.isfinite(new_sum):
        return False, value_sum, total
    for k in range(HEAD):
        if not math.isfinite(lifetime[k] + vec[k]):
            return False, value_sum, total
    if not commit:
        return True, value_sum, total
    lifetime += vec
    hist += hist_scratch
    for t in range(tw_widths.shape[0]):
        time_add(tw_epochs[t], tw_buckets[t], bucket_number(now, tw_widths[t]), vec)
    for k in range(ewma.shape[0]):
        ewma[k] = ewma[k] * decay + vec[k]
    if counting:
        total = count_push(
            value, focal, correct, tcls, weights, weighted, class_limit, slots, ring, ring_cls, blocks, block, total
        )
    return True, new_sum, total


@njit(cache=True)
def derive_rows(matrix, slots, out):  # type: ignore[no-untyped-def]
    """Per window row: samples, weight, mean loss, accuracy, mean focal loss, balanced loss.

    Ratios are NaN when the window holds no weight; the balanced loss averages the
    per-class means of the classes present (positive weight), NaN if none is.
    """
    nan = np.nan
    for r in range(matrix.shape[0]):
        row = matrix[r]
        sw = row[SW]
        out[r, 0] = row[N]
        out[r, 1] = sw
        if sw > 0.0:
            out[r, 2] = row[SWL] / sw
            out[r, 3] = row[SWC] / sw
            out[r, 4] = row[SWF] / sw
        else:
            out[r, 2] = nan
            out[r, 3] = nan
            out[r, 4] = nan
        total = 0.0
        present = 0
        for k in range(slots):
            cw = row[HEAD + k]
            if cw > 0.0:
                total += row[HEAD + slots + k] / cw
                present += 1
        out[r, 5] = total / present if present else nan
