"""The join store against a plain-dict oracle: rows, outcomes, TTL, budget and save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xentd.errors import SnapshotError
from xentd.joins import OUTCOMES, TICK, JoinStore, PoolKey, TakeResult

BUCKETS = (1.0, 10.0, 100.0)
KEY10 = PoolKey(kind=1, datatype="FP32", columns=10, weighted=True)
KEYB = PoolKey(kind=0, datatype="FP64", columns=0, weighted=False)


def _take(store: JoinStore, model: str, ids: np.ndarray, now: float) -> TakeResult:
    """A join as the daemon makes one: take the rows, then count the outcomes."""
    result = store.take(model, ids, now)
    store.record(model, result)
    return result


def _store(max_bytes: int = 1 << 30, ttl: float = 3600.0) -> JoinStore:
    return JoinStore(max_bytes, ttl, BUCKETS, epoch=1_000.0)


def _ticks(t: float) -> int:
    return int((t - 1_000.0) / TICK)


def _expired(arrived: float, now: float, ttl: float) -> bool:
    # The store's rule, in its 10 ms ticks: older than the TTL.
    return _ticks(now) - _ticks(arrived) > math.ceil(ttl / TICK)


class Oracle:
    """What the store must hold: model -> id -> (row bytes, weight, arrival time)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.waiting: dict[str, dict[int, tuple[bytes, float, float]]] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def _c(self, model: str) -> dict[str, int]:
        return self.counts.setdefault(model, dict.fromkeys(OUTCOMES, 0))

    def put(self, model: str, ids: np.ndarray, rows: np.ndarray, weights: np.ndarray, now: float) -> None:
        waiting = self.waiting.setdefault(model, {})
        self._c(model)
        for i, key in enumerate(ids.tolist()):
            if key in waiting:
                self._c(model)["duplicate"] += 1
            else:
                waiting[key] = (rows[i].tobytes(), float(weights[i]), now)

    def take(self, model: str, ids: np.ndarray, now: float) -> list[tuple[int, bytes, float, float]]:
        waiting = self.waiting.setdefault(model, {})
        out = []
        for r, key in enumerate(ids.tolist()):
            entry = waiting.pop(key, None)
            if entry is None:
                self._c(model)["unmatched"] += 1
            elif _expired(entry[2], now, self.ttl):
                self._c(model)["expired"] += 1
            else:
                self._c(model)["matched"] += 1
                out.append((r, entry[0], entry[1], now - entry[2]))
        return out


def test_rows_and_outcomes_equal_a_dict_oracle_across_random_traffic() -> None:
    rng = np.random.default_rng(7)
    store, oracle = _store(ttl=50.0), Oracle(50.0)
    now = 2_000.0
    models = ["a", "b"]
    for _ in range(300):
        now += float(rng.uniform(0, 3))
        model = models[int(rng.integers(2))]
        n = int(rng.integers(1, 40))
        # Ids from a small range (collisions, duplicates, misses), some above 2**63.
        ids = rng.integers(0, 300, n).astype(np.uint64) + np.uint64(2**63 - 150)
        if rng.random() < 0.5:
            rows = rng.random((n, 10)).astype(np.float32)
            weights = rng.random(n)
            store.put(model, KEY10, ids, rows, weights, now)
            oracle.put(model, ids, rows, weights, now)
        else:
            got = _take(store, model, ids, now)
            want = oracle.take(model, ids, now)
            pairs = sorted(
                (int(r), j.predictions[k].tobytes(), float(j.weights[k]), float(j.delays[k]))  # type: ignore[index]
                for j in got.joined
                for k, r in enumerate(j.label_rows)
            )
            assert [p[:3] for p in pairs] == [w[:3] for w in want]
            for p, w in zip(pairs, want, strict=True):
                assert abs(p[3] - w[3]) <= 0.02
        if rng.random() < 0.1:
            store.expire(now)
            for m, waiting in oracle.waiting.items():
                for key in [k for k, e in waiting.items() if _expired(e[2], now, 50.0)]:
                    del waiting[key]
                    oracle._c(m)["expired"] += 1
    for model in models:
        assert store.pending(model) == len(oracle.waiting.get(model, {}))
        stats = store.stats[model]
        assert {o: stats.count(o) for o in OUTCOMES} == oracle.counts[model]


def test_int64_and_uint64_spellings_of_an_id_are_one_id() -> None:
    store = _store()
    store.put("m", KEYB, np.array([2**64 - 1], np.uint64), np.array([0.25]), None, 2_000.0)
    got = _take(store, "m", np.array([-1], np.int64).view(np.uint64), 2_001.0)
    assert got.unmatched == 0 and got.joined[0].predictions.tolist() == [0.25]
    assert got.joined[0].weights is None and got.joined[0].delays.tolist() == pytest.approx([1.0])


def test_an_id_waits_once_per_model_whatever_the_layout() -> None:
    store = _store()
    store.put("m", KEYB, np.array([5], np.uint64), np.array([0.5]), None, 2_000.0)
    other = PoolKey(kind=0, datatype="FP32", columns=0, weighted=False)
    result = store.put("m", other, np.array([5, 6], np.uint64), np.array([0.1, 0.2], np.float32), None, 2_000.0)
    assert (result.waiting, result.duplicate) == (1, 1)
    assert store.put("n", KEYB, np.array([5], np.uint64), np.array([0.5]), None, 2_000.0).waiting == 1


def test_budget_holds_and_the_oldest_rows_go_first() -> None:
    budget = 64 * 1024
    store = _store(max_bytes=budget)
    now = 2_000.0
    sent = 0
    arrival: dict[tuple[str, int], float] = {}
    for step in range(200):
        now += 0.5
        model = "ab"[step % 2]
        ids = np.arange(sent, sent + 25, dtype=np.uint64)
        sent += 25
        store.put(model, KEY10, ids, np.ones((25, 10), np.float32), np.ones(25), now)
        for k in ids.tolist():
            arrival[(model, k)] = now
        assert store.nbytes <= budget
    evicted = sum(store.stats[m].count("evicted") for m in "ab")
    waiting = store.pending("a") + store.pending("b")
    assert evicted > 0 and waiting + evicted == sent
    # Every row still waiting arrived no earlier than every row evicted.
    left = {(m, k) for m in "ab" for p in store.pools[m].values() for k, s in zip(p.ids, p.stamps, strict=True) if s}
    gone = [t for key, t in arrival.items() if (key[0], int(key[1])) not in {(m, int(k)) for m, k in left}]
    kept = [arrival[(m, int(k))] for m, k in left]
    assert max(gone) <= min(kept)
    # What a waiting row costs, all overheads included, at a store filled to its budget.
    assert store.nbytes / waiting <= 1.3 * (40 + 8 + 16)


def test_a_batch_larger_than_the_budget_keeps_its_newest_rows() -> None:
    store = _store(max_bytes=4096)
    result = store.put("m", KEYB, np.arange(1000, dtype=np.uint64), np.full(1000, 0.5), None, 2_000.0)
    assert 0 < result.waiting < 1000 and store.nbytes <= 4096
    assert store.stats["m"].count("evicted") == 1000 - result.waiting
    assert _take(store, "m", np.array([999], np.uint64), 2_001.0).unmatched == 0


def test_expiry_counts_and_gives_memory_back() -> None:
    store = _store(ttl=10.0)
    store.put("m", KEY10, np.arange(1000, dtype=np.uint64), np.ones((1000, 10), np.float32), np.ones(1000), 2_000.0)
    full = store.nbytes
    assert store.expire(2_005.0) == {}
    assert store.expire(2_011.0) == {"m": 1000}
    assert store.pending("m") == 0 and store.nbytes < full
    assert _take(store, "m", np.arange(3, dtype=np.uint64), 2_012.0).unmatched == 3


def test_save_load_round_trip_keeps_rows_stamps_and_counts() -> None:
    store = _store(ttl=100.0)
    rows = np.arange(50, dtype=np.float32).reshape(5, 10)
    store.put("m", KEY10, np.arange(5, dtype=np.uint64), rows, np.arange(5.0), 2_000.0)
    _take(store, "m", np.array([1, 77], np.uint64), 2_030.0)
    scalars, arrays = store.save()
    again = _store(ttl=100.0)
    again.load(scalars, arrays, {"m"})
    assert again.pending("m") == 4 and again.stats["m"].count("unmatched") == 1
    got = _take(again, "m", np.array([3], np.uint64), 2_050.0)
    assert got.joined[0].predictions.tolist() == [rows[3].tolist()]
    assert got.joined[0].weights.tolist() == [3.0]  # type: ignore[union-attr]
    assert got.joined[0].delays.tolist() == pytest.approx([50.0])
    # The TTL keeps counting from the original arrival.
    assert _take(again, "m", np.array([0], np.uint64), 2_101.0).expired == 1


def test_load_refuses_damaged_contents_and_changes_nothing() -> None:
    store = _store()
    store.put("m", KEYB, np.arange(3, dtype=np.uint64), np.full(3, 0.5), None, 2_000.0)
    scalars, arrays = store.save()
    arrays["0.stamps"] = np.zeros(3, np.uint32)
    fresh = _store()
    with pytest.raises(SnapshotError, match="stamp 0"):
        fresh.load(scalars, arrays, {"m"})
    assert fresh.pending("m") == 0 and fresh.nbytes == 0


def test_churn_leaves_no_lost_rows_and_bounded_tables() -> None:
    # Rows joining out of order leave tombstones; the table must keep finding the rows past
    # them, reuse them, and rebuild without growing while the number waiting stays level.
    rng = np.random.default_rng(9)
    store = _store()
    store.put("m", KEYB, np.arange(5000, dtype=np.uint64), np.full(5000, 0.5), None, 2_000.0)
    waiting: set[int] = set(range(5000))
    next_id = 5000
    sizes = []
    for _ in range(200):
        new = np.arange(next_id, next_id + 500, dtype=np.uint64)
        next_id += 500
        store.put("m", KEYB, new, np.full(500, 0.5), None, 2_000.0)
        waiting.update(new.tolist())
        leave = rng.choice(sorted(waiting), 500, replace=False).astype(np.uint64)
        got = _take(store, "m", leave, 2_001.0)
        assert got.unmatched == 0 and sum(len(j.label_rows) for j in got.joined) == 500
        waiting.difference_update(leave.tolist())
        sizes.append(store.nbytes)
    assert store.pending("m") == len(waiting) == 5000
    assert max(sizes[50:]) <= 2 * min(sizes[50:])
    assert _take(store, "m", np.array(sorted(waiting), np.uint64), 2_002.0).unmatched == 0


def test_a_full_budget_with_tombstones_never_runs_out_of_free_slots() -> None:
    # A small pool of tombstones, a budget that older rows of other models fill: the pool must be
    # rebuilt without its tombstones, or probes (which stop only at a free slot) would never end.
    key = PoolKey(0, "FP64", 0, False)  # 20 bytes a slot
    store = JoinStore(9 * 16 * 20, 3600.0, BUCKETS, epoch=0.0)
    t = 10.0
    for r in range(3):
        for m in range(8):
            t += 0.05
            store.put(f"o{m}", key, np.array([1000 * m + r], np.uint64), np.array([0.5]), None, t)
    ids = np.arange(12, dtype=np.uint64)
    store.put("t", key, ids, np.full(12, 0.5), None, t + 1)
    _take(store, "t", ids[:11], t + 1.1)
    store.put("t", key, np.arange(100, 113, dtype=np.uint64), np.full(13, 0.5), None, t + 1.2)
    pool = store.pools["t"][key]
    assert np.count_nonzero(pool.stamps == 0) >= 1 and store.nbytes <= store.max_bytes
    assert _take(store, "t", np.array([999_999], np.uint64), t + 1.3).unmatched == 1


def test_stamps_survive_a_jump_of_years_and_expire() -> None:
    # A snapshot restored after a long shutdown, or a wall clock jump: past 2**32 ticks.
    store = JoinStore(1 << 20, 3600.0, BUCKETS, epoch=1_000.0)
    store.put("m", KEYB, np.array([1], np.uint64), np.array([0.5]), None, 2_000.0)
    later = 2_000.0 + 600 * 86_400
    assert store.expire(later) == {"m": 1}
    store.put("m", KEYB, np.array([2], np.uint64), np.array([0.5]), None, later)
    assert _take(store, "m", np.array([2], np.uint64), later + 5).joined[0].delays.tolist() == pytest.approx([5.0])


def test_a_clock_set_back_makes_no_negative_delay() -> None:
    store = _store()
    store.put("m", KEYB, np.array([1], np.uint64), np.array([0.5]), None, 3_000.0)
    got = _take(store, "m", np.array([1], np.uint64), 2_000.0)
    assert got.joined[0].delays.tolist() == [0.0] and store.stats["m"].delay_sum == 0.0
    store.load(*store.save(), {"m"})  # and the snapshot stays loadable


def test_eviction_sizes_its_age_buckets_from_the_rows_that_wait() -> None:
    # A row joined long ago must not stretch the age buckets until one eviction empties the store.
    store = JoinStore(64 * 1024, 7 * 86_400.0, BUCKETS, epoch=0.0)
    store.put("m", KEYB, np.array([10**9], np.uint64), np.array([0.5]), None, 1.0)
    _take(store, "m", np.array([10**9], np.uint64), 2.0)
    now, sent = 6 * 86_400.0, 0
    while store.stats_for("m").count("evicted") == 0:
        store.put("m", KEYB, np.arange(sent, sent + 100, dtype=np.uint64), np.full(100, 0.5), None, now)
        sent, now = sent + 100, now + 1.0
    assert store.pending("m") > 0.5 * (sent - 100)
