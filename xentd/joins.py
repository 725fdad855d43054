"""Predictions that wait for their labels, joined by id: bounded, compact, with every outcome counted.

A predictions-only message leaves each row here under (model, id) until a
labels-only message names the id (docs/protocol.md, "Delayed labels"). The store
keeps rows as they arrived, in their wire datatype, so a joined pair is scored
exactly as if it had been sent together.

Layout. Each model has one :class:`Pool` per layout (input kind, wire datatype,
class count, weighted or not). A pool is an open-addressing hash table with
linear probing, stored column-wise: ``ids`` (uint64), ``stamps`` (uint32 arrival
ticks of :data:`TICK` seconds since the store's epoch; 0 marks a free slot), the
row bytes and, for weighted pools, the float64 weight. No Python object exists
per row. A row that leaves marks its slot as a tombstone (:data:`TOMB`), which
probes pass over and inserts reuse; rows and tombstones together stay under
:data:`MAX_LOAD`, past which the table is rebuilt (larger only when the rows need
it). The load stays between :data:`MIN_LOAD` and :data:`MAX_LOAD`: a waiting row
costs (row bytes + 12, + 8 with a weight) / load.

Outcomes. A label whose id waits is ``matched`` (the row leaves the store); one
whose id does not wait is ``unmatched``; a second prediction for a waiting id is a
``duplicate`` and the first is kept; a row older than ``labels.ttl`` is
``expired`` (by :meth:`JoinStore.expire`, or when its label comes too late); and
when the pools' bytes would pass ``labels.max_pending_bytes`` the oldest rows of
any model are ``evicted`` first.

All methods are called with the state lock held; the tables are mutated in
place by Numba kernels and never shared outside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from xentd.errors import SnapshotError
from xentd.wire import DATATYPES, FLOAT_DATATYPES

TICK = 0.01  # seconds per stamp tick: label delays resolve to 10 ms
MAX_LOAD = 0.92  # a pool grows before it is fuller than this ...
GROW_LOAD = 0.8  # ... to this load, and shrinks back to it when a sweep leaves it below MIN_LOAD
MIN_LOAD = 0.5
MIN_CAPACITY = 16
# Stamps are uint32 ticks: 497 days. The epoch moves forward long before they run out.
_REBASE_AT = 3_500_000_000
# The stamp of a slot whose row left (a tombstone): probes pass over it, inserts reuse it.
TOMB = np.uint32(0xFFFFFFFF)

# Per-row outcomes written by the kernels.
NOT_FOUND, MATCHED, EXPIRED, WAITING, DUPLICATE = 0, 1, 2, 3, 4
OUTCOMES = ("matched", "unmatched", "duplicate", "expired", "evicted")


# --- the table kernels ---------------------------------------------------------------


@njit(cache=True, inline="always")
def _home(key, cap):  # type: ignore[no-untyped-def]
    # splitmix64's finalizer: ids are often sequential, and a plain modulo would cluster them.
    z = key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z % np.uint64(cap))


@njit(cache=True)
def _find(ids, stamps, key):  # type: ignore[no-untyped-def]
    cap = ids.shape[0]
    i = _home(key, cap)
    while stamps[i] != 0:
        if ids[i] == key and stamps[i] != TOMB:
            return i
        i += 1
        if i == cap:
            i = 0
    return -1


@njit(cache=True)
def _put_many(ids, stamps, rows, weights, weighted, new_ids, new_rows, new_weights, new_stamps, status):  # type: ignore[no-untyped-def]
    """Insert rows in order; a key already present keeps its first row. Returns (inserted,
    tombstones reused). The caller has made room: free slots never run out."""
    cap = ids.shape[0]
    added = 0
    reused = 0
    for r in range(new_ids.shape[0]):
        key = new_ids[r]
        i = _home(key, cap)
        free = -1
        status[r] = WAITING
        while stamps[i] != 0:  # the whole run: the key may sit past a tombstone
            if stamps[i] == TOMB:
                if free < 0:
                    free = i
            elif ids[i] == key:
                status[r] = DUPLICATE
                break
            i += 1
            if i == cap:
                i = 0
        if status[r] == WAITING:
            if free >= 0:
                i = free
                reused += 1
            ids[i] = key
            stamps[i] = new_stamps[r]
            rows[i, :] = new_rows[r, :]
            if weighted:
                weights[i] = new_weights[r]
            added += 1
    return added, reused


@njit(cache=True)
def _contains_many(ids, stamps, keys, found):  # type: ignore[no-untyped-def]
    for r in range(keys.shape[0]):
        if _find(ids, stamps, keys[r]) >= 0:
            found[r] = True


@njit(cache=True)
def _take_many(  # type: ignore[no-untyped-def]
    ids, stamps, rows, weights, weighted, keys, pending, expire_before, out_rows, out_weights, out_stamps, status
):
    """For each key still ``pending`` (status NOT_FOUND): take its row out (MATCHED, copied to the
    outputs in key order) or drop it as EXPIRED when it arrived before ``expire_before``.
    Returns (matched, removed); a removed row leaves a tombstone."""
    m = 0
    removed = 0
    for r in range(keys.shape[0]):
        if not pending[r] or status[r] != NOT_FOUND:
            continue
        i = _find(ids, stamps, keys[r])
        if i < 0:
            continue
        if stamps[i] < expire_before:
            status[r] = EXPIRED
        else:
            status[r] = MATCHED
            out_rows[m, :] = rows[i, :]
            if weighted:
                out_weights[m] = weights[i]
            out_stamps[m] = stamps[i]
            m += 1
        stamps[i] = TOMB
        removed += 1
    return m, removed


@njit(cache=True)
def _sweep(stamps, before):  # type: ignore[no-untyped-def]
    """Remove every row stamped before ``before``; return (removed, the oldest stamp left or 0)."""
    removed = 0
    oldest = np.uint32(0)
    for i in range(stamps.shape[0]):
        s = stamps[i]
        if s == 0 or s == TOMB:
            continue
        if s < before:
            stamps[i] = TOMB
            removed += 1
        elif oldest == 0 or s < oldest:
            oldest = s
    return removed, oldest


@njit(cache=True)
def _rehash(ids, stamps, rows, weights, weighted, new_ids, new_stamps, new_rows, new_weights):  # type: ignore[no-untyped-def]
    cap = new_ids.shape[0]
    for i in range(ids.shape[0]):
        if stamps[i] == 0 or stamps[i] == TOMB:
            continue
        j = _home(ids[i], cap)
        while new_stamps[j] != 0:
            j += 1
            if j == cap:
                j = 0
        new_ids[j] = ids[i]
        new_stamps[j] = stamps[i]
        new_rows[j, :] = rows[i, :]
        if weighted:
            new_weights[j] = weights[i]


@njit(cache=True)
def _live_range(stamps):  # type: ignore[no-untyped-def]
    """(oldest, newest) live stamp, or (0, 0) when none is live."""
    lo = np.uint32(0)
    hi = np.uint32(0)
    for i in range(stamps.shape[0]):
        s = stamps[i]
        if s != 0 and s != TOMB:
            if lo == 0 or s < lo:
                lo = s
            if s > hi:
                hi = s
    return lo, hi


@njit(cache=True)
def _stamp_bytes(stamps, first, width, slot_bytes, out):  # type: ignore[no-untyped-def]
    """Add ``slot_bytes`` per entry to its age bucket: bucket b holds stamps in [first + b*width, +width)."""
    last = out.shape[0] - 1
    for i in range(stamps.shape[0]):
        s = stamps[i]
        if s != 0 and s != TOMB:
            b = (np.int64(s) - first) // width
            out[min(max(b, 0), last)] += slot_bytes


@njit(cache=True)
def _compact(ids, stamps, rows, weights, weighted, out_ids, out_stamps, out_rows, out_weights):  # type: ignore[no-untyped-def]
    m = 0
    for i in range(ids.shape[0]):
        if stamps[i] != 0 and stamps[i] != TOMB:
            out_ids[m] = ids[i]
            out_stamps[m] = stamps[i]
            out_rows[m, :] = rows[i, :]
            if weighted:
                out_weights[m] = weights[i]
            m += 1


@njit(cache=True)
def _rebase(stamps, delta):  # type: ignore[no-untyped-def]
    """Move live stamps ``delta`` (int64, may exceed 32 bits) ticks back; older ones become 1
    (they are past the TTL, and the next sweep expires them)."""
    for i in range(stamps.shape[0]):
        s = stamps[i]
        if s != 0 and s != TOMB:
            moved = np.int64(s) - delta
            stamps[i] = moved if moved > 1 else 1


# --- pools ------------------------------------------------------------------------------


class PoolKey(NamedTuple):
    """What the rows of one pool share: enough to score them as the message that carried them."""

    kind: int  # xentd.validate.InputKind
    datatype: str  # the predictions' wire datatype
    columns: int  # C, or 0 for binary [N] predictions
    weighted: bool


class Pool:
    """One model's waiting rows of one layout (see the module doc)."""

    __slots__ = (
        "key",
        "dtype",
        "row_bytes",
        "slot_bytes",
        "ids",
        "stamps",
        "rows",
        "weights",
        "count",
        "tombs",
        "oldest",
    )

    def __init__(self, key: PoolKey, dtype: np.dtype[Any], capacity: int = 0) -> None:
        self.key = key
        self.dtype = dtype
        self.row_bytes = dtype.itemsize * max(key.columns, 1)
        # What one slot costs: the row, its id, its stamp and (weighted) its weight.
        self.slot_bytes = self.row_bytes + 12 + (8 if key.weighted else 0)
        self.count = 0
        self.tombs = 0  # slots whose row left: probes pass over them until the next rebuild
        self.oldest = 0  # a lower bound of the oldest stamp (0: none waiting)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self.ids = np.zeros(capacity, np.uint64)
        self.stamps = np.zeros(capacity, np.uint32)
        self.rows = np.zeros((capacity, self.row_bytes), np.uint8)
        self.weights = np.zeros(capacity if self.key.weighted else 0, np.float64)

    @property
    def capacity(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        return self.capacity * self.slot_bytes

    def resize(self, capacity: int) -> None:
        old = (self.ids, self.stamps, self.rows, self.weights)
        self._allocate(capacity)
        if self.count:
            _rehash(*old[:3], old[3], self.key.weighted, self.ids, self.stamps, self.rows, self.weights)
        self.tombs = 0

    def fitted_capacity(self, count: int) -> int:
        """The capacity that holds ``count`` rows at :data:`GROW_LOAD` (0 for none)."""
        return 0 if count == 0 else max(MIN_CAPACITY, math.ceil(count / GROW_LOAD))

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
        return self.ids, self.stamps, self.rows, self.weights, self.key.weighted


@dataclass(frozen=True, slots=True)
class Joined:
    """The rows of one pool that a labels message matched, in the order of its labels."""

    key: PoolKey
    label_rows: np.ndarray  # int64: which rows of the labels message they pair with
    predictions: np.ndarray  # wire datatype, [M] or [M, C]
    weights: np.ndarray | None  # float64 [M]
    delays: np.ndarray  # float64 seconds: label arrival minus prediction arrival


@dataclass(frozen=True, slots=True)
class TakeResult:
    joined: list[Joined]
    unmatched: int
    expired: int


@dataclass(frozen=True, slots=True)
class PutResult:
    waiting: int  # rows stored
    duplicate: int  # rows whose id was already waiting (the first is kept)
    evicted: dict[str, int]  # model -> rows evicted to make room (this model's own included)


class JoinStats:
    """One model's join outcomes (in :data:`OUTCOMES` order) and its label delays, as a histogram."""

    __slots__ = ("outcomes", "delay_counts", "delay_sum")

    def __init__(self, buckets: int) -> None:
        self.outcomes = np.zeros(len(OUTCOMES), np.int64)
        self.delay_counts = np.zeros(buckets + 1, np.int64)  # per bucket, not cumulative; last is +Inf
        self.delay_sum = 0.0

    def add(self, outcome: str, n: int) -> None:
        self.outcomes[OUTCOMES.index(outcome)] += n

    def count(self, outcome: str) -> int:
        return int(self.outcomes[OUTCOMES.index(outcome)])


class JoinStore:
    """Every model's waiting predictions, within one byte budget, and each model's join outcomes
    (see the module doc)."""

    def __init__(self, max_bytes: int, ttl_seconds: float, delay_buckets: tuple[float, ...], epoch: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_ticks = max(1, math.ceil(ttl_seconds / TICK))
        self.delay_bounds = np.asarray(delay_buckets, np.float64)
        self.epoch = epoch  # wall-clock seconds of stamp 0; saved, so the TTL counts across restarts
        self.pools: dict[str, dict[PoolKey, Pool]] = {}
        self.stats: dict[str, JoinStats] = {}
        self.nbytes = 0

    def stats_for(self, model: str) -> JoinStats:
        stats = self.stats.get(model)
        if stats is None:
            stats = self.stats[model] = JoinStats(len(self.delay_bounds))
        return stats

    def _count_evicted(self, evicted: dict[str, int]) -> None:
        for model, n in evicted.items():
            self.stats_for(model).add("evicted", n)

    # --- time ---------------------------------------------------------------------

    def stamp(self, now: float) -> int:
        """Ticks since the epoch, at least 1 (a clock set back never makes a stamp 0 or negative)."""
        ticks = int((now - self.epoch) / TICK) + 1
        if ticks > _REBASE_AT:
            # Rows older than the TTL land on stamp 1, well before the new TTL edge, and expire.
            self._rebase(ticks - self.ttl_ticks - 1000)
            ticks = int((now - self.epoch) / TICK) + 1
        return max(1, ticks)

    def _rebase(self, delta: int) -> None:
        for pool in self._all_pools():
            _rebase(pool.stamps, np.int64(delta))
            pool.oldest = max(1, pool.oldest - delta) if pool.oldest else 0
        self.epoch += delta * TICK

    # --- predictions in ---------------------------------------------------------------

    def put(
        self,
        model: str,
        key: PoolKey,
        ids: np.ndarray,
        rows: np.ndarray,
        weights: np.ndarray | None,
        now: float,
    ) -> PutResult:
        """Store rows (``rows``: the wire tensor, [N] or [N, C]) under their ids, in order."""
        n = int(ids.shape[0])
        self.stats_for(model)  # every outcome is exported from the model's first predictions-only message
        pools = self.pools.setdefault(model, {})
        pool = pools.get(key)
        if pool is None:
            pool = pools[key] = Pool(key, rows.dtype)
        raw = np.ascontiguousarray(rows).view(np.uint8).reshape(n, pool.row_bytes)
        keys = np.ascontiguousarray(ids, np.uint64)
        waits_elsewhere = np.zeros(n, np.bool_)
        for other in pools.values():  # an id waits once per model, whatever the layout
            if other is not pool and other.count:
                _contains_many(other.ids, other.stamps, keys, waits_elsewhere)
        fresh = ~waits_elsewhere
        incoming = int(fresh.sum())
        evicted: dict[str, int] = {}
        if pool.count + pool.tombs + incoming > pool.capacity * MAX_LOAD:
            evicted = self._grow(pool, incoming)
            room = max(0, int(pool.capacity * MAX_LOAD) - pool.count - pool.tombs)
            if room < incoming:
                # More rows than the whole budget holds: the newest that fit stay, the older are evicted.
                idx = np.flatnonzero(fresh)
                fresh[idx[: incoming - room]] = False
                evicted[model] = evicted.get(model, 0) + incoming - room
        sel = np.flatnonzero(fresh)
        status = np.empty(len(sel), np.uint8)
        stamps = np.full(len(sel), self.stamp(now), np.uint32)
        w = np.empty(0) if weights is None else weights[sel]
        added, reused = _put_many(*pool.table(), keys[sel], raw[sel], w, stamps, status)
        pool.count += int(added)
        pool.tombs -= int(reused)
        if added and not pool.oldest:
            pool.oldest = int(stamps[0])
        duplicate = int(waits_elsewhere.sum()) + int(np.count_nonzero(status == DUPLICATE))
        self.stats_for(model).add("duplicate", duplicate)
        self._count_evicted(evicted)
        return PutResult(waiting=added, duplicate=duplicate, evicted=evicted)

    def _grow(self, pool: Pool, incoming: int) -> dict[str, int]:
        """Make room in ``pool`` for ``incoming`` more rows within the budget, evicting the oldest
        rows of any pool (its own included) when it must; return model -> rows evicted."""
        evicted: dict[str, int] = {}
        for _ in range(8):
            need = pool.count + incoming
            if need + pool.tombs <= pool.capacity * MAX_LOAD:
                return evicted  # evicting its own old rows made the room
            if need <= pool.capacity * GROW_LOAD:
                self._resize(pool, pool.capacity)  # the tombstones fill it: rebuild it without them
                return evicted
            target = pool.fitted_capacity(need)
            extra = target * pool.slot_bytes - pool.nbytes
            if self.nbytes + extra <= self.max_bytes:
                self._resize(pool, target)
                return evicted
            if not self._evict(extra, evicted):
                break
        # Nothing older is left: the pool gets what the budget allows, rebuilt without its
        # tombstones (free slots must never run out: probes stop only at one).
        room = (self.max_bytes - self.nbytes + pool.nbytes) // pool.slot_bytes
        if room > pool.capacity or pool.tombs:
            self._resize(pool, max(int(room), pool.capacity))
        return evicted

    def _resize(self, pool: Pool, capacity: int) -> None:
        before = pool.nbytes
        pool.resize(capacity)
        self.nbytes += pool.nbytes - before

    def _evict(self, extra: int, evicted: dict[str, int]) -> bool:
        """Drop the oldest rows of all pools, so that ``extra`` more bytes (and a sixteenth of the
        budget, so that this does not run on every message) fit once the pools are shrunk to
        their rows; add the counts to ``evicted``. False if nothing was waiting."""
        pools = [(model, p) for model, ps in self.pools.items() for p in ps.values() if p.count]
        if not pools:
            return False
        live = sum(p.count * p.slot_bytes for _, p in pools)
        # Shrunk to GROW_LOAD, the rows left must fit in the budget less the room wanted.
        keep = GROW_LOAD * (self.max_bytes - extra - self.max_bytes // 16)
        free = max(1.0, live - keep)
        # The true range, not pool.oldest (a lower bound that joins never raise): a stale bound
        # would widen the age buckets until one eviction emptied most of the store.
        ranges = [_live_range(p.stamps) for _, p in pools]
        first = min(int(lo) for lo, _ in ranges)
        last = max(int(hi) for _, hi in ranges)
        buckets = 4096
        width = max(1, (last - first + buckets) // buckets)
        by_age = np.zeros(buckets, np.float64)
        for _, p in pools:
            _stamp_bytes(p.stamps, first, width, p.slot_bytes, by_age)
        reach = int(np.searchsorted(np.cumsum(by_age), free))
        before = first + (reach + 1) * width  # every row stamped before this goes
        for model, p in pools:
            removed = self._sweep_pool(p, before, shrink_below=GROW_LOAD)
            if removed:
                evicted[model] = evicted.get(model, 0) + removed
        return True

    def _sweep_pool(self, pool: Pool, before: int, shrink_below: float = MIN_LOAD) -> int:
        removed, oldest = _sweep(pool.stamps, np.uint32(min(max(before, 0), 0xFFFFFFFE)))
        pool.count -= int(removed)
        pool.tombs += int(removed)
        pool.oldest = int(oldest)
        self._shrink(pool, shrink_below)
        return int(removed)

    def _shrink(self, pool: Pool, below: float) -> None:
        """Give memory back once a pool's load falls under ``below``."""
        fitted = pool.fitted_capacity(pool.count)
        if pool.count < pool.capacity * below and fitted < pool.capacity:
            self._resize(pool, fitted)

    # --- labels in --------------------------------------------------------------------

    def take(self, model: str, ids: np.ndarray, now: float) -> TakeResult:
        """Join labels to waiting rows: each id is matched, expired or unmatched, in order.
        The outcomes are counted by :meth:`record`."""
        n = int(ids.shape[0])
        keys = np.ascontiguousarray(ids, np.uint64)
        status = np.zeros(n, np.uint8)
        pending = np.ones(n, np.bool_)
        stamp = self.stamp(now)
        expire_before = np.uint32(max(0, stamp - self.ttl_ticks))
        joined: list[Joined] = []
        for key, pool in list(self.pools.get(model, {}).items()):
            if not pool.count:
                continue
            out_rows = np.empty((n, pool.row_bytes), np.uint8)
            out_w = np.empty(n if key.weighted else 0, np.float64)
            out_stamps = np.empty(n, np.uint32)
            before = status.copy()
            m, removed = _take_many(*pool.table(), keys, pending, expire_before, out_rows, out_w, out_stamps, status)
            changed = status != before
            pool.count -= int(removed)
            pool.tombs += int(removed)
            if m:
                label_rows = np.flatnonzero(changed & (status == MATCHED))
                shape = (m, key.columns) if key.columns else (m,)
                joined.append(
                    Joined(
                        key=key,
                        label_rows=label_rows,
                        predictions=out_rows[:m].view(pool.dtype).reshape(shape),
                        weights=out_w[:m] if key.weighted else None,
                        # A wall clock set back between the two arrivals makes no negative delay.
                        delays=np.maximum(stamp - out_stamps[:m].astype(np.float64), 0.0) * TICK,
                    )
                )
            self._shrink(pool, MIN_LOAD)
            pending &= status == NOT_FOUND
        expired = int(np.count_nonzero(status == EXPIRED))
        matched = int(np.count_nonzero(status == MATCHED))
        self.stats_for(model)  # the model's outcome series exist from here on
        return TakeResult(joined=joined, unmatched=n - matched - expired, expired=expired)

    def record(self, model: str, result: TakeResult) -> None:
        """Count what :meth:`take` returned. The daemon calls it under the state lock in the same
        hold that folds the joined pairs, so that no scrape sees labels matched but not scored."""
        stats = self.stats_for(model)
        stats.add("matched", sum(len(j.label_rows) for j in result.joined))
        stats.add("expired", result.expired)
        stats.add("unmatched", result.unmatched)
        for j in result.joined:
            np.add.at(stats.delay_counts, np.searchsorted(self.delay_bounds, j.delays), 1)
            stats.delay_sum += float(j.delays.sum())

    # --- housekeeping -------------------------------------------------------------------

    def expire(self, now: float) -> dict[str, int]:
        """Drop the rows older than the TTL; return model -> rows expired."""
        before = self.stamp(now) - self.ttl_ticks
        expired: dict[str, int] = {}
        for model, pools in self.pools.items():
            for pool in pools.values():
                if pool.count and pool.oldest < before:
                    removed = self._sweep_pool(pool, before)
                    if removed:
                        expired[model] = expired.get(model, 0) + removed
        for model, n in expired.items():
            self.stats_for(model).add("expired", n)
        return expired

    def drop_model(self, model: str) -> int:
        """Forget a model's rows (the model itself was evicted); return how many there were."""
        pools = self.pools.pop(model, {})
        self.stats.pop(model, None)
        for pool in pools.values():
            self.nbytes -= pool.nbytes
        return sum(p.count for p in pools.values())

    def pending(self, model: str) -> int:
        return sum(p.count for p in self.pools.get(model, {}).values())

    def _all_pools(self) -> Iterator[Pool]:
        for pools in self.pools.values():
            yield from pools.values()

    # --- persistence (xentd.persist walks the store's components) ----------------------

    def save(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """The waiting rows, compacted, and every model's outcomes: (scalars, arrays)."""
        entries: list[dict[str, object]] = []
        arrays: dict[str, np.ndarray] = {}
        for model, pools in self.pools.items():
            for key, pool in pools.items():
                if not pool.count:
                    continue
                i = len(entries)
                entries.append({"model": model, **key._asdict()})
                ids = np.empty(pool.count, np.uint64)
                stamps = np.empty(pool.count, np.uint32)
                rows = np.empty((pool.count, pool.row_bytes), np.uint8)
                weights = np.empty(pool.count if key.weighted else 0, np.float64)
                _compact(*pool.table(), ids, stamps, rows, weights)
                arrays.update({f"{i}.ids": ids, f"{i}.stamps": stamps, f"{i}.rows": rows, f"{i}.weights": weights})
        stats = [
            {
                "model": model,
                "outcomes": st.outcomes.tolist(),
                "delay_counts": st.delay_counts.tolist(),
                "delay_sum": st.delay_sum,
            }
            for model, st in self.stats.items()
        ]
        scalars = {"epoch": self.epoch, "delay_buckets": self.delay_bounds.tolist(), "pools": entries, "stats": stats}
        return scalars, arrays

    def load(self, scalars: dict[str, Any], arrays: dict[str, np.ndarray], models: set[str]) -> None:
        """Restore what :meth:`save` wrote, for the ``models`` that came back, into an empty store.
        Raises SnapshotError, changing nothing, when a value is not one a run can write. Rows past
        the budget (it may have shrunk) are evicted, oldest first."""
        epoch = scalars.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int | float) or not math.isfinite(epoch):
            raise SnapshotError(f"joins.epoch is {epoch!r}; expected a finite number")
        same_buckets = scalars.get("delay_buckets") == self.delay_bounds.tolist()
        stats: dict[str, JoinStats] = {}
        for entry in scalars.get("stats", []):
            model = str(entry["model"])
            st = JoinStats(len(self.delay_bounds))
            outcomes = entry["outcomes"]
            counts = entry["delay_counts"] if same_buckets else [0] * (len(self.delay_bounds) + 1)
            delay_sum = entry["delay_sum"] if same_buckets else 0.0
            for what, values in (("outcomes", outcomes), ("delay_counts", counts)):
                if len(values) != len(getattr(st, what)) or not all(_is_count(v) for v in values):
                    raise SnapshotError(f"joins: model {model!r}: {what} {values!r:.80}; expected counts")
            if isinstance(delay_sum, bool) or not isinstance(delay_sum, int | float) or not 0 <= delay_sum < math.inf:
                raise SnapshotError(f"joins: model {model!r}: delay_sum {delay_sum!r}; expected a finite sum >= 0")
            st.outcomes[:] = outcomes
            st.delay_counts[:] = counts
            st.delay_sum = float(delay_sum)
            if model in models:
                stats[model] = st
        loaded: list[tuple[str, Pool, tuple[np.ndarray, ...]]] = []
        for i, entry in enumerate(scalars.get("pools", [])):
            where = f"joins pool {i}:"
            try:
                key = PoolKey(
                    int(entry["kind"]), str(entry["datatype"]), int(entry["columns"]), bool(entry["weighted"])
                )
                model = str(entry["model"])
                ids, stamps, rows, weights = (arrays[f"{i}.{k}"] for k in ("ids", "stamps", "rows", "weights"))
            except (KeyError, TypeError, ValueError) as exc:
                raise SnapshotError(f"{where} {type(exc).__name__}: {exc}") from None
            if key.datatype not in FLOAT_DATATYPES or key.kind not in (0, 1, 2) or key.columns < 0 or key.columns == 1:
                raise SnapshotError(f"{where} layout {tuple(key)} is not one a prediction can have")
            pool = Pool(key, DATATYPES[key.datatype])
            n = ids.shape[0]
            expected = {
                "ids": (ids, (n,), np.uint64),
                "stamps": (stamps, (n,), np.uint32),
                "rows": (rows, (n, pool.row_bytes), np.uint8),
                "weights": (weights, (n if key.weighted else 0,), np.float64),
            }
            for name, (a, shape, dtype) in expected.items():
                if a.shape != shape or a.dtype != dtype:
                    got, want = f"{a.dtype}{list(a.shape)}", f"{np.dtype(dtype)}{list(shape)}"
                    raise SnapshotError(f"{where} {name} is {got}; expected {want}")
            if n and (stamps.min() == 0 or stamps.max() >= TOMB):
                raise SnapshotError(f"{where} a waiting row has stamp {stamps.min() or stamps.max()}")
            if key.weighted and n and not (np.isfinite(weights).all() and weights.min() >= 0):
                raise SnapshotError(f"{where} a weight is negative or not finite")
            if len(np.unique(ids)) != n:
                raise SnapshotError(f"{where} an id waits twice")
            if any(m == model and p.key == key for m, p, _ in loaded):
                raise SnapshotError(f"{where} model {model!r} has this layout twice")
            if model in models and n:
                loaded.append((model, pool, (ids, rows, weights, stamps)))
        self.epoch = float(epoch)
        self.stats = stats
        for model, pool, (ids, rows, weights, stamps) in loaded:
            self.pools.setdefault(model, {})[pool.key] = pool
            self.stats_for(model)
            self._resize(pool, pool.fitted_capacity(len(ids)))
            status = np.empty(len(ids), np.uint8)
            pool.count = int(_put_many(*pool.table(), ids, rows, weights, stamps, status)[0])
            pool.oldest = int(stamps.min())
        if self.nbytes > self.max_bytes:
            evicted: dict[str, int] = {}
            self._evict(0, evicted)
            self._count_evicted(evicted)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def warmup() -> None:
    """Compile every table kernel through the real code paths, on a throwaway store."""
    store = JoinStore(4096, 1.0, (1.0,), epoch=0.0)
    for weighted in (False, True):
        key = PoolKey(0, "FP32", 0, weighted)
        ids = np.arange(300, dtype=np.uint64)
        weights = np.ones(300) if weighted else None
        store.put("w", key, ids, np.full(300, 0.5, np.float32), weights, 10.0)  # grows, then evicts
        store.record("w", store.take("w", ids[-5:], 10.5))
        JoinStore(4096, 1.0, (1.0,), epoch=0.0).load(*store.save(), {"w"})
        store.expire(20.0)
