"""Calibration state (xentd.calibration) against a brute-force NumPy float64 oracle written from
the definitions of issue 14: every window's stat vector, then ECE, MCE, Brier, the Murphy
decomposition and NE, over every sample ever folded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss

from xentd import calibration as cal
from xentd.config import TimeWindow, WindowsConfig
from xentd.errors import Reason, ValidationError

WINDOWS = WindowsConfig(
    time=(TimeWindow("10s", 10.0), TimeWindow("30s", 30.0)),
    buckets=4,
    count=(5, 17, 300),
    ewma_half_life_seconds=7.0,
)
RTOL = 1e-12
T0 = 1_000_000.0


# --- the oracle: every sample kept, sums taken from the definitions --------------------


@dataclass
class Oracle:
    """Every sample folded, as the definitions describe it."""

    bins: int
    slots: int
    cols: dict[str, list[np.ndarray]] = field(default_factory=dict)
    last: float = T0  # the last fold's time, empty folds too: the EWMA's sums are decayed to it

    def add(self, now: float, **kw: np.ndarray) -> None:
        self.last = now
        for k, v in kw.items():
            self.cols.setdefault(k, []).append(np.asarray(v, np.float64))

    def col(self, k: str) -> np.ndarray:
        return np.concatenate(self.cols[k]) if k in self.cols else np.empty(0)

    def masses(self) -> np.ndarray:
        return np.concatenate(self.cols["mass"]) if "mass" in self.cols else np.empty((0, self.slots))

    def vector(self, sel: np.ndarray, decay: np.ndarray | None = None) -> np.ndarray:
        """The stat vector of the selected samples, each weight scaled by ``decay``."""
        conf, brier, out, w = (self.col(k) for k in ("conf", "brier", "outcome", "w"))
        d = np.ones_like(w) if decay is None else decay
        ww = (w * d)[sel]
        c, o = conf[sel], out[sel]
        b = np.clip(np.floor(c * self.bins), 0, self.bins - 1).astype(np.int64)
        vec = np.zeros(cal.vector_size(self.bins, self.slots))
        vec[cal.N] = d[sel].sum()
        vec[cal.SW] = ww.sum()
        vec[cal.SWB] = (ww * brier[sel]).sum()
        vec[cal.SWP] = (ww * c).sum()
        vec[cal.SWO] = (ww * o).sum()
        vec[cal.weight_index(self.bins)] = np.bincount(b, ww, self.bins)
        vec[cal.confidence_index(self.bins)] = np.bincount(b, ww * c, self.bins)
        vec[cal.outcome_index(self.bins)] = np.bincount(b, ww * o, self.bins)
        vec[cal.mass_index(self.bins, self.slots)] = (ww[:, None] * self.masses()[sel]).sum(axis=0)
        return vec

    def windows(self, now: float, windows: WindowsConfig = WINDOWS) -> np.ndarray:
        """Every window's vector in window_matrix's row order."""
        t, n = self.col("t"), len(self.col("w"))
        rows = []
        for tw in windows.time:
            width = tw.seconds / windows.buckets
            idx, now_idx = np.floor(t / width), math.floor(now / width)
            rows.append(self.vector((idx > now_idx - windows.buckets) & (idx <= now_idx)))
        for k in windows.count:
            sel = np.zeros(n, bool)
            sel[max(0, n - k) :] = True
            rows.append(self.vector(sel))
        # EWMA: sums decayed to the last fold, the sample count to ``now``.
        ewma = self.vector(np.ones(n, bool), 2.0 ** (-(self.last - t) / windows.ewma_half_life_seconds))
        ewma[cal.N] = (2.0 ** (-(now - t) / windows.ewma_half_life_seconds)).sum()
        rows.append(ewma)
        return np.array(rows)


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=what)


# --- streams of batches ----------------------------------------------------------------


def _weights(rng: np.random.Generator, n: int) -> np.ndarray | None:
    if rng.random() < 0.3:
        return None
    w = rng.random(n) * 3.0 * (rng.random(n) < 0.85)  # some exact zeros
    w.flags.writeable = False  # as from the wire
    return w


def _confidence(rng: np.random.Generator, n: int, bins: int, low: float = 0.0) -> np.ndarray:
    conf = low + (1.0 - low) * rng.random(n)
    edges = rng.random(n) < 0.2  # exactly on a bin edge, or 0 / 1
    conf[edges] = np.maximum(low, rng.integers(0, bins + 1, edges.sum()) / bins)
    return conf


def _binary_batch(
    stats: cal.CalibrationStats,
    oracle: Oracle,
    rng: np.random.Generator,
    n: int,
    now: float,
    *,
    check_only: bool = False,
) -> None:
    conf = _confidence(rng, n, stats.bins)
    t = np.where(rng.random(n) < 0.5, rng.integers(0, 2, n).astype(np.float64), rng.random(n))
    brier = (conf - t) ** 2
    w = _weights(rng, n)
    stats.fold(conf, brier, np.zeros(n, np.uint8), np.zeros(n, np.int64), t, w, now, check_only=check_only)
    if not check_only:
        oracle.add(
            now,
            conf=conf,
            brier=brier,
            outcome=t,
            w=np.ones(n) if w is None else w,
            t=np.full(n, now),
            mass=np.stack([1.0 - t, t], axis=1),
        )


def _multiclass_batch(
    stats: cal.CalibrationStats,
    oracle: Oracle,
    rng: np.random.Generator,
    n: int,
    now: float,
    classes: int,
    *,
    soft: np.dtype[np.floating] | None = None,
    check_only: bool = False,
) -> None:
    limit = stats.class_limit
    conf = _confidence(rng, n, stats.bins, 1.0 / classes)
    brier = 2.0 * rng.random(n)
    correct = (rng.random(n) < 0.6).astype(np.uint8)
    w = _weights(rng, n)
    mass = np.zeros((n, oracle.slots))
    if soft is None:
        tcls = rng.integers(0, classes, n)
        targets = None
        mass[np.arange(n), np.minimum(tcls, limit)] = 1.0
    else:
        targets = (rng.random((n, classes)) * (rng.random((n, classes)) < 0.5)).astype(soft)
        tcls = targets.argmax(axis=1).astype(np.int64)
        t64 = targets.astype(np.float64)
        for c in range(classes):
            mass[:, min(c, limit)] += t64[:, c]
    stats.fold(conf, brier, correct, tcls, targets, w, now, check_only=check_only)
    if not check_only:
        oracle.add(
            now,
            conf=conf,
            brier=brier,
            outcome=correct,
            w=np.ones(n) if w is None else w,
            t=np.full(n, now),
            mass=mass,
        )


CASES = ["binary", "index", "soft32", "soft64", "mixed"]


def _batch(
    case: str, stats: cal.CalibrationStats, oracle: Oracle, rng: np.random.Generator, n: int, now: float, **kw: bool
) -> None:
    if case == "binary":
        _binary_batch(stats, oracle, rng, n, now, **kw)
        return
    soft: dict[str, np.dtype[np.floating] | None] = {
        "index": None,
        "soft32": np.dtype(np.float32),
        "soft64": np.dtype(np.float64),
        "mixed": [None, np.dtype(np.float32), np.dtype(np.float64)][int(rng.integers(0, 3))],
    }
    _multiclass_batch(stats, oracle, rng, n, now, 7, soft=soft[case], **kw)


def _new(case: str, bins: int = 10, windows: WindowsConfig = WINDOWS) -> tuple[cal.CalibrationStats, Oracle]:
    # Multiclass: 7 classes, class limit 4, so classes 4..6 share the "other" slot 4.
    binary = case == "binary"
    slots = 2 if binary else 5
    stats = cal.CalibrationStats(bins, slots, 2 if binary else 4, windows, T0, binary=binary)
    return stats, Oracle(bins, slots)


# --- windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_window_matches_the_oracle(case: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stats, oracle = _new(case)
    now = T0
    for step in range(70):
        now += float(rng.choice([0.0, 0.4, 1.3, 2.5, 6.0, 11.0]))
        # Sizes around the block (16 here) and the windows, a few empty batches.
        n = int(rng.choice([0, 1, 3, 15, 16, 17, 40]))
        _batch(case, stats, oracle, rng, n, now)
        if step % 7 == 0 or step > 60:
            _close(stats.window_matrix(now), oracle.windows(now), f"step {step}")
        _close(stats.lifetime, oracle.vector(np.ones(len(oracle.col("w")), bool)), "lifetime")
    assert stats.count_total > 2 * max(WINDOWS.count)  # the ring and the blocks wrapped
    for later in (0.0, 3.0, 9.5, 29.0, 31.0, 200.0):  # buckets expire as time passes
        _close(stats.window_matrix(now + later), oracle.windows(now + later), f"+{later}s")
    assert stats.window_labels == ("10s", "30s", "last_5", "last_17", "last_300", "ewma")


@settings(max_examples=40, deadline=None)
@given(
    stream=st.lists(st.tuples(st.floats(0.0, 12.0), st.integers(0, 40)), min_size=1, max_size=30),
    seed=st.integers(0, 2**32 - 1),
    case=st.sampled_from(CASES),
    bins=st.sampled_from([1, 2, 10, 15]),
    query_delay=st.floats(0.0, 40.0),
)
def test_windows_match_the_oracle_on_any_stream(
    stream: list[tuple[float, int]], seed: int, case: str, bins: int, query_delay: float
) -> None:
    rng = np.random.default_rng(seed)
    stats, oracle = _new(case, bins=bins)
    now = T0 + float(rng.random()) * 100
    for dt, n in stream:
        now += dt
        _batch(case, stats, oracle, rng, n, now)
    _close(stats.window_matrix(now + query_delay), oracle.windows(now + query_delay), "windows")


@pytest.mark.parametrize("case", ["binary", "mixed"])
def test_count_windows_at_every_length_across_block_edges(case: str) -> None:
    # One sample a batch: every count total from 1 to past the largest window, so each
    # window's start and end meet every position within a block.
    windows = WindowsConfig(time=(), buckets=4, count=(1, 15, 16, 17, 33, 64), ewma_half_life_seconds=5.0)
    rng = np.random.default_rng(7)
    stats, oracle = _new(case, windows=windows)
    for i in range(150):
        _batch(case, stats, oracle, rng, 1 + (i % 3 == 0), T0 + i)
        _close(stats.window_matrix(T0 + i), oracle.windows(T0 + i, windows), f"after {i}")


def test_no_count_windows_keep_no_ring() -> None:
    windows = WindowsConfig(time=(TimeWindow("1m", 60.0),), buckets=6, count=(), ewma_half_life_seconds=5.0)
    rng = np.random.default_rng(3)
    stats, oracle = _new("mixed", windows=windows)
    for i in range(10):
        _batch("mixed", stats, oracle, rng, 20, T0 + 3 * i)
    assert stats.ring.shape[0] == stats.ring_mass.shape[0] == stats.blocks.shape[0] == 0
    _close(stats.window_matrix(T0 + 40), oracle.windows(T0 + 40, windows), "windows")


def test_memory_grows_with_traffic() -> None:
    """Bucket rows, ring, blocks and soft masses are taken as traffic needs them, never past their bounds."""
    rng = np.random.default_rng(5)
    stats, oracle = _new("index")
    assert stats.tw_buckets.shape[0] == stats.ring.shape[0] == stats.blocks.shape[0] == 0
    _batch("index", stats, oracle, rng, 10, T0)
    assert stats.tw_used == 2  # one bucket row per time window
    assert stats.ring_mass.shape[0] == 0  # no soft targets yet
    # The block of these 10 samples, and room for one more batch of 10 (acc.block_rows).
    assert stats.blocks.shape[0] == -(-20 // stats.block)
    _batch("soft64", stats, oracle, rng, 10, T0 + 1)
    assert stats.ring_mass.shape == (stats.ring.shape[0], 5)
    for i in range(200):
        _batch("index", stats, oracle, rng, 17, T0 + 2 + 0.7 * i)
    assert stats.tw_used == stats.tw_buckets.shape[0] == stats.tw_rows.size == 8
    assert stats.ring.shape[0] == stats.ring_mass.shape[0] == max(WINDOWS.count)
    assert stats.blocks.shape[0] == stats.blocks_max
    _close(stats.window_matrix(T0 + 150), oracle.windows(T0 + 150), "windows")


def test_soft_targets_first_sent_after_the_ring_wrapped() -> None:
    # The soft-mass matrix is allocated late; the index-target samples before it never read it.
    rng = np.random.default_rng(6)
    stats, oracle = _new("index")
    for i in range(25):
        _batch("index", stats, oracle, rng, 17, T0 + i)
    assert stats.count_total > max(WINDOWS.count) and stats.ring_mass.shape[0] == 0
    for i in range(25, 60):
        _batch("soft32" if i % 2 else "index", stats, oracle, rng, 17, T0 + i)
        _close(stats.window_matrix(T0 + i), oracle.windows(T0 + i), f"after {i}")


# --- derived figures -------------------------------------------------------------------


def _derived_oracle(
    oracle: Oracle, sel: np.ndarray, binary: bool, loss: np.ndarray
) -> tuple[float, float, float, float, float, float, float]:
    """ECE, MCE, Brier, REL, RES, UNC, NE of the selected samples, from the definitions."""
    nan = math.nan
    conf, brier, out, w = (oracle.col(k)[sel] for k in ("conf", "brier", "outcome", "w"))
    if w.sum() == 0:
        return (nan,) * 7
    b = np.clip(np.floor(conf * oracle.bins), 0, oracle.bins - 1).astype(np.int64)
    wb = np.array([w[b == k].sum() for k in range(oracle.bins)])
    cb = np.array([(w * conf)[b == k].sum() for k in range(oracle.bins)])
    ob = np.array([(w * out)[b == k].sum() for k in range(oracle.bins)])
    has = wb > 0
    ece = np.abs(ob - cb).sum() / wb.sum()
    mce = (np.abs(ob - cb)[has] / wb[has]).max()
    brier_score = (w * brier).sum() / w.sum()
    rel = res = unc = nan
    if binary:
        obar = ob.sum() / wb.sum()
        rel = (wb[has] * (cb[has] / wb[has] - ob[has] / wb[has]) ** 2).sum() / wb.sum()
        res = (wb[has] * (ob[has] / wb[has] - obar) ** 2).sum() / wb.sum()
        unc = obar * (1 - obar)
    mass = (w[:, None] * oracle.masses()[sel]).sum(axis=0)
    pi = mass / mass.sum()
    h = -(pi[pi > 0] * np.log(pi[pi > 0])).sum()
    ne = (w * loss[sel]).sum() / w.sum() / h if h > 0 else nan
    return ece, mce, brier_score, rel, res, unc, ne


@pytest.mark.parametrize("case", CASES)
def test_derived_figures_match_the_definitions(case: str) -> None:
    rng = np.random.default_rng(11)
    stats, oracle = _new(case, bins=15)
    now = T0
    for _ in range(40):
        now += float(rng.choice([0.0, 1.0, 4.0]))
        _batch(case, stats, oracle, rng, int(rng.integers(0, 30)), now)
    n = len(oracle.col("w"))
    loss = rng.exponential(1.0, n)  # the loss component's per-sample cross-entropy
    t = oracle.col("t")
    sels = []
    for tw in WINDOWS.time:
        width = tw.seconds / WINDOWS.buckets
        idx, now_idx = np.floor(t / width), math.floor(now / width)
        sels.append((idx > now_idx - WINDOWS.buckets) & (idx <= now_idx))
    for k in WINDOWS.count:
        sel = np.zeros(n, bool)
        sel[max(0, n - k) :] = True
        sels.append(sel)
    w = oracle.col("w")
    mean_loss = np.array([(w * loss)[s].sum() / w[s].sum() if w[s].sum() > 0 else math.nan for s in sels])
    matrix = stats.window_matrix(now)[:-1]  # the ewma row is checked through its vector above
    got = cal.derive_calibration(matrix, 15, stats.slots, stats.binary, mean_loss)
    assert len(got) == len(sels)
    for label, g, sel in zip(stats.window_labels, got, sels, strict=False):
        want = _derived_oracle(oracle, sel, stats.binary, loss)
        for name, a, b in zip(
            cal.CalibrationWindow.__slots__, (getattr(g, f) for f in cal.CalibrationWindow.__slots__), want, strict=True
        ):
            if math.isnan(b):
                assert math.isnan(a), (label, name, a)
            else:
                assert a == pytest.approx(b, rel=1e-11, abs=1e-15), (label, name, a, b)


def test_binary_brier_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    n = 500
    conf, t, w = rng.random(n), rng.integers(0, 2, n).astype(np.float64), rng.random(n)
    stats, _ = _new("binary")
    stats.fold(conf, (conf - t) ** 2, np.zeros(n, np.uint8), np.zeros(n, np.int64), t, w, T0)
    got = cal.derive_calibration(stats.window_matrix(T0), 10, 2, True, np.ones(6))
    want = brier_score_loss(t, conf, sample_weight=w)
    assert got[0].brier_score == pytest.approx(want, rel=1e-12)
    total, weight = cal.brier_sums(stats.lifetime)
    assert total / weight == pytest.approx(want, rel=1e-12)
    # A perfectly calibrated, sharp forecaster: no reliability term, resolution = uncertainty.
    perfect, _ = _new("binary")
    perfect.fold(t.copy(), np.zeros(n), np.zeros(n, np.uint8), np.zeros(n, np.int64), t, None, T0)
    p = cal.derive_calibration(perfect.window_matrix(T0), 10, 2, True, np.ones(6))[0]
    assert p.calibration_error == p.max_calibration_error == p.brier_reliability == p.brier_score == 0.0
    assert p.brier_resolution == pytest.approx(p.brier_uncertainty, rel=1e-12)


def test_undefined_figures_are_nan() -> None:
    stats, _ = _new("index")
    rows = cal.derive_calibration(stats.window_matrix(T0), 10, 5, False, np.full(6, math.nan))
    assert all(math.isnan(v) for r in rows for v in (getattr(r, f) for f in cal.CalibrationWindow.__slots__))
    # Every target in one class: H(prior) = 0, so no NE; multiclass: no Murphy decomposition.
    n = 8
    stats.fold(np.full(n, 0.9), np.full(n, 0.1), np.ones(n, np.uint8), np.full(n, 2, np.int64), None, None, T0)
    r = cal.derive_calibration(stats.window_matrix(T0), 10, 5, False, np.ones(6))[0]
    assert math.isnan(r.normalized_entropy) and math.isnan(r.brier_reliability) and math.isnan(r.brier_uncertainty)
    assert r.calibration_error == pytest.approx(0.1) and r.brier_score == pytest.approx(0.1)
    # Binary targets all 0: H(p̄) = 0.
    b, _ = _new("binary")
    b.fold(np.full(n, 0.3), np.full(n, 0.09), np.zeros(n, np.uint8), np.zeros(n, np.int64), np.zeros(n), None, T0)
    assert math.isnan(cal.derive_calibration(b.window_matrix(T0), 10, 2, True, np.ones(6))[0].normalized_entropy)


def test_out_of_range_confidence_is_clamped() -> None:
    stats, _ = _new("binary", bins=4)
    conf = np.array([-0.5, 0.0, 0.25, 0.999, 1.0, 1.5])
    stats.fold(conf, np.zeros(6), np.zeros(6, np.uint8), np.zeros(6, np.int64), np.zeros(6), None, T0)
    weight, _, _ = cal.reliability_bins(stats.lifetime, 4)
    np.testing.assert_array_equal(weight, [2.0, 1.0, 0.0, 3.0])


def test_lifetime_accessors_and_labels() -> None:
    rng = np.random.default_rng(4)
    stats, oracle = _new("binary", bins=15)
    for i in range(5):
        _batch("binary", stats, oracle, rng, 30, T0 + i)
    want = oracle.vector(np.ones(len(oracle.col("w")), bool))
    for got, sl in zip(
        cal.reliability_bins(stats.lifetime, 15),
        (cal.weight_index(15), cal.confidence_index(15), cal.outcome_index(15)),
        strict=True,
    ):
        _close(got, want[sl], "bins")
    _close(np.array(cal.brier_sums(stats.lifetime)), want[[cal.SWB, cal.SW]], "brier")
    assert cal.bin_labels(5) == ("0.2", "0.4", "0.6", "0.8", "1.0")
    labels = cal.bin_labels(15)
    assert len(labels) == 15 and labels[-1] == "1.0" and labels[2] == "0.2"
    assert [float(x) for x in labels] == [(b + 1) / 15 for b in range(15)]


# --- check_only, overflow, persistence --------------------------------------------------


def _saved_equal(
    a: tuple[dict[str, object], dict[str, np.ndarray]], b: tuple[dict[str, object], dict[str, np.ndarray]]
) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)
        assert a[1][k].dtype == b[1][k].dtype, k


@pytest.mark.parametrize("case", CASES)
def test_check_only_changes_nothing(case: str) -> None:
    rng = np.random.default_rng(8)
    stats, oracle = _new(case)
    for i in range(12):
        _batch(case, stats, oracle, rng, 25, T0 + 2 * i)
    before = stats.save()
    for i in range(5):
        _batch(case, stats, oracle, rng, 40, T0 + 30 + i, check_only=True)
    _saved_equal(stats.save(), before)
    _close(stats.window_matrix(T0 + 40), oracle.windows(T0 + 40), "windows")


@pytest.mark.parametrize("case", ["binary", "soft64"])
def test_overflow_raises_and_changes_nothing(case: str) -> None:
    rng = np.random.default_rng(9)
    stats, oracle = _new(case)
    for i in range(6):
        _batch(case, stats, oracle, rng, 30, T0 + i)
    life, matrix, total, ewma_time = (
        stats.lifetime.copy(),
        stats.window_matrix(T0 + 9),
        stats.count_total,
        stats.ewma_time,
    )
    n = 3
    huge = np.full(n, 1e308)
    targets = np.full(n, 0.5) if case == "binary" else np.full((n, 7), 0.5)
    for check_only in (True, False):
        with pytest.raises(ValidationError) as exc:
            stats.fold(
                np.full(n, 0.5),
                np.ones(n),
                np.ones(n, np.uint8),
                np.zeros(n, np.int64),
                targets,
                huge,
                T0 + 9,
                check_only=check_only,
            )
        assert exc.value.reason is Reason.NON_FINITE
    np.testing.assert_array_equal(stats.lifetime, life)
    np.testing.assert_array_equal(stats.window_matrix(T0 + 9), matrix)
    assert (stats.count_total, stats.ewma_time) == (total, ewma_time)
    _batch(case, stats, oracle, rng, 30, T0 + 10)  # and it goes on as before
    _close(stats.window_matrix(T0 + 10), oracle.windows(T0 + 10), "after")


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip(case: str) -> None:
    rng = np.random.default_rng(12)
    stats, oracle = _new(case)
    for i in range(30):
        _batch(case, stats, oracle, rng, int(rng.integers(0, 40)), T0 + 1.5 * i)
    scalars, arrays = stats.save()
    cal.CalibrationStats.check(scalars, arrays, "m", stats.slots, max(WINDOWS.count))
    copy, _ = _new(case)
    copy.load(scalars, arrays, windows=True)
    _saved_equal(copy.save(), (scalars, arrays))
    np.testing.assert_array_equal(copy.window_matrix(T0 + 50), stats.window_matrix(T0 + 50))
    # Both go on alike, and as the oracle says.
    _batch(case, stats, oracle, np.random.default_rng(99), 33, T0 + 60)
    _batch(case, copy, Oracle(stats.bins, stats.slots), np.random.default_rng(99), 33, T0 + 60)
    np.testing.assert_array_equal(copy.window_matrix(T0 + 61), stats.window_matrix(T0 + 61))
    _close(copy.window_matrix(T0 + 61), oracle.windows(T0 + 61), "after the round trip")
    # With windows=False only the lifetime totals come back.
    fresh, _ = _new(case)
    fresh.load(scalars, arrays, windows=False)
    np.testing.assert_array_equal(fresh.lifetime, arrays["lifetime"])
    assert fresh.count_total == 0 and fresh.tw_used == 0


def test_round_trip_of_a_fresh_model() -> None:
    stats, _ = _new("mixed")
    scalars, arrays = stats.save()
    cal.CalibrationStats.check(scalars, arrays, "m", 5, 300)
    copy, _ = _new("mixed")
    copy.load(scalars, arrays, windows=True)
    _saved_equal(copy.save(), (scalars, arrays))


def _saved() -> tuple[dict[str, object], dict[str, np.ndarray]]:
    rng = np.random.default_rng(13)
    stats, oracle = _new("index")
    for i in range(10):
        _batch("index", stats, oracle, rng, 20, T0 + i)
    _multiclass_batch(stats, oracle, rng, 20, T0 + 10, 7, soft=np.dtype(np.float64))  # some soft samples
    return stats.save()


def _corrupt(key: str, index: tuple[int, ...], value: float) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    scalars, arrays = _saved()
    a = arrays[key].copy()
    a[index] = value
    arrays[key] = a
    return scalars, arrays


@pytest.mark.parametrize(
    ("key", "index", "value", "match"),
    [
        ("lifetime", (3,), -1.0, ">= 0"),
        ("ewma", (0,), math.nan, "finite"),
        ("blocks", (0, 6), math.inf, "finite"),
        ("tw_buckets", (0, 1), -0.5, ">= 0"),
        ("ring", (2, 0), -2.0, ">= 0"),
        ("ring_mass", (0, 1), math.nan, "finite"),
        ("ring_tag", (0,), 2 * 5, "class slots"),  # slot 5 of 5
        ("ring_tag", (1,), -3, "class slots"),
        ("tw_rows", (0, 1), -2, "bucket row"),
    ],
)
def test_check_rejects_values_no_run_produces(key: str, index: tuple[int, ...], value: float, match: str) -> None:
    scalars, arrays = _corrupt(key, index, value)
    with pytest.raises(ValueError, match=match):
        cal.CalibrationStats.check(scalars, arrays, "m", 5, 300)


def test_check_rejects_inconsistent_counts() -> None:
    scalars, arrays = _saved()
    rows = arrays["tw_rows"].copy()
    used = np.argwhere(rows >= 0)
    rows[tuple(used[0])] = rows[tuple(used[1])]  # two positions share a bucket row
    with pytest.raises(ValueError, match="bucket row"):
        cal.CalibrationStats.check(scalars, {**arrays, "tw_rows": rows}, "m", 5, 300)
    with pytest.raises(ValueError, match="ring holds"):
        cal.CalibrationStats.check({**scalars, "count_total": 10**6}, arrays, "m", 5, 300)
    with pytest.raises(ValueError, match="count"):
        cal.CalibrationStats.check({**scalars, "count_total": -1}, arrays, "m", 5, 300)
    with pytest.raises(ValueError, match="ewma_time"):
        cal.CalibrationStats.check({**scalars, "ewma_time": math.inf}, arrays, "m", 5, 300)
    with pytest.raises(ValueError, match="ring_mass"):
        cal.CalibrationStats.check(scalars, {**arrays, "ring_mass": np.zeros((0, 5))}, "m", 5, 300)
    with pytest.raises(ValueError, match="tw_buckets"):
        cal.CalibrationStats.check(scalars, {**arrays, "tw_buckets": arrays["tw_buckets"][:-1]}, "m", 5, 300)
    with pytest.raises(ValueError, match="dtype"):
        cal.CalibrationStats.check(scalars, {**arrays, "ring_tag": arrays["ring_tag"].astype(np.float64)}, "m", 5, 300)


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("lifetime", np.zeros(3)),
        ("ewma", np.zeros(3)),
        ("blocks", np.zeros((100, 30))),
        ("ring", np.zeros((4, 4))),
        ("ring_tag", np.zeros(3, np.int32)),
        ("ring_mass", np.zeros((3, 5))),
        ("tw_epochs", np.zeros((2, 3), np.int64)),
        ("tw_rows", np.zeros((2, 3), np.int32)),
        ("tw_buckets", np.zeros((2, 3))),
    ],
)
def test_load_rejects_shapes_of_another_configuration(key: str, bad: np.ndarray) -> None:
    scalars, arrays = _saved()
    stats, _ = _new("mixed")
    with pytest.raises(ValueError):
        stats.load(scalars, {**arrays, key: bad}, windows=True)


def test_fold_refuses_inputs_of_other_lengths() -> None:
    stats, _ = _new("binary")
    n = 4
    args = [np.full(n, 0.5), np.zeros(n), np.zeros(n, np.uint8), np.zeros(n, np.int64), np.zeros(n), np.ones(n)]
    for k in range(len(args)):
        bad = list(args)
        bad[k] = bad[k][:-1]
        with pytest.raises(ValueError, match="samples|shape"):
            stats.fold(*bad, T0)
    assert stats.count_total == 0 and stats.lifetime[cal.N] == 0


def test_warmup_compiles_through_the_real_path() -> None:
    cal.warmup()
