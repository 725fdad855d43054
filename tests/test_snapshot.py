"""StateStore.snapshot: every model read by one jitted call and derived by layout equals each
component read and derived on its own (window_matrix, derive_all, derive_calibration)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.clock import FakeClock
from tests.conftest import random_scores
from xentd import accumulate as acc
from xentd import calibration, state
from xentd.config import LimitsConfig, WindowsConfig
from xentd.kernels import SampleScores
from xentd.state import ModelState, StateStore, derive_all


def _store() -> StateStore:
    """Models of several layouts (class slots, "other", binary, soft targets), folded over
    two hours so that windows differ and the EWMAs decay, some idle since."""
    clock = FakeClock(1_700_000_000.0)
    s = StateStore(WindowsConfig(), LimitsConfig(class_limit=6), clock)
    rng = np.random.default_rng(5)
    layouts = {"three": 3, "ten": 10, "six": 6, "three-b": 3, "one-class": 1}
    for step in range(40):
        for name, classes in layouts.items():
            if step > 30 and name == "six":
                continue  # idle for the last part: its short windows empty out
            m = s.model(name, classes)
            n = int(rng.integers(1, 300))
            weights = rng.uniform(0.0, 2.0, n) if name != "three" else None
            targets = None
            if name == "three-b":  # soft targets: the calibration prior counts their masses
                targets = rng.dirichlet(np.ones(classes), n)
            m.fold(random_scores(rng, n, classes), weights, clock(), clock() - 1.0, targets=targets)
            m.fold_predictions(rng.uniform(0, 2, 5), rng.uniform(0, 1, 5), None, clock())
        ctr = s.model("ctr", 2)
        p = rng.uniform(0.01, 0.99, 50)
        t = rng.uniform(0.0, 1.0, 50)
        scores = random_scores(rng, 50, 2)
        scores = SampleScores(
            loss=scores.loss,
            focal=scores.focal,
            correct=scores.correct,
            true_class=(t > 0.5).astype(np.int64),
            unnormalized_rows=0,
            confidence=p,
            brier=(p - t) ** 2,
        )
        ctr.fold(scores, None, clock(), None, targets=t, binary=True)
        clock.t += float(rng.uniform(1.0, 400.0))
    s.model("new", 4)  # no traffic yet
    clock.t += 37.5
    return s


def _same(got: Any, want: Any, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all(), (what, got[~same], want[~same])


def _expected(m: ModelState, now: float) -> dict[str, Any]:
    """One model's figures, each component read and derived on its own."""
    now = max(now, m.clock)
    windows = derive_all(m.loss.window_matrix(now), m.slots)
    pred = m.predictions.window_matrix(now)
    c = m.calibration
    loss_means = np.array([w.cross_entropy for w in windows])
    cal = calibration.derive_calibration(c.window_matrix(now), c.bins, c.slots, c.binary, loss_means)
    weight, confidence, outcome = calibration.reliability_bins(c.lifetime, c.bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = pred[:, acc.SWL] / pred[:, acc.SW]
    s = m.slots
    return {
        "windows": [[getattr(w, f) for f in state.WindowStats.__slots__] for w in windows],
        "calibration windows": [[getattr(w, f) for f in calibration.CalibrationWindow.__slots__] for w in cal],
        "entropy": entropy,
        "lifetime": m.loss.lifetime[: acc.HEAD],
        "classes": np.concatenate([m.loss.lifetime[acc.HEAD : acc.HEAD + s], m.loss.lifetime[acc.HEAD + s :]]),
        "predictions": m.predictions.lifetime[: acc.HEAD],
        "hist": m.loss.hist,
        "bins": np.stack([weight, confidence, outcome]),
        "brier": calibration.brier_sums(c.lifetime),
    }


def _got(t: state.ModelColumns, i: int) -> dict[str, Any]:
    lo, hi = t.class_offsets[i : i + 2]
    c, p = t.calibration, t.predictions
    return {
        "windows": t.windows[i],
        "calibration windows": c.windows[i],
        "entropy": p.window_entropy[i],
        "lifetime": [t.samples[i], t.weight[i], t.loss_weighted_sum[i], t.correct_weighted_sum[i], np.nan],
        "classes": np.concatenate([t.class_weight[lo:hi], t.class_loss_weighted_sum[lo:hi]]),
        "predictions": [p.rows[i], p.weight[i], p.entropy_weighted_sum[i], np.nan, p.confidence_weighted_sum[i]],
        "hist": t.hist_counts[i],
        "bins": np.stack([c.weight[i], c.confidence[i], c.outcome[i]]),
        "brier": (c.brier_weighted_sum[i], c.brier_weight[i]),
    }


def test_snapshot_columns_equal_each_component_read_on_its_own() -> None:
    s = _store()
    snap = s.snapshot()
    t = snap.table
    assert t.names == list(s.models)
    for i, (name, m) in enumerate(s.models.items()):
        want = _expected(m, s.clock())
        want["lifetime"] = [*want["lifetime"][: acc.SWF], np.nan]  # the loss' focal sum is not exported
        want["predictions"] = [*want["predictions"][: acc.SWC], np.nan, want["predictions"][acc.SWF]]
        for key, got in _got(t, i).items():
            _same(got, want[key], f"{name}: {key}")
        assert t.class_labels(i) == state.class_labels(m.num_classes, m.class_limit)
        assert (t.batches[i], t.last_batch_time[i], t.last_event_time[i]) == (
            m.batches,
            m.last_batch_time,
            m.last_event_time,
        )


def test_the_ewma_decays_as_window_matrix_decays_it() -> None:
    """The reader decays the EWMA's sample count in the kernel; window_matrix does it in Python."""
    s = _store()
    for extra in (0.0, 1.0, 299.9, 12345.678):
        s.clock.t += extra  # type: ignore[attr-defined]
        t = s.snapshot().table
        for i, m in enumerate(s.models.values()):
            now = max(s.clock(), m.clock)
            assert t.windows[i, -1, 0] == m.loss.window_matrix(now)[-1, acc.N]


def test_the_records_are_the_columns_row_by_row() -> None:
    snap = _store().snapshot()
    t = snap.table
    for i, m in enumerate(snap.models):
        assert m.name == t.names[i]
        assert [w for w, _ in m.windows] == list(t.window_labels)
        _same([[getattr(s, f) for f in state.WindowStats.__slots__] for _, s in m.windows], t.windows[i], m.name)
        _same([h for _, h in m.predictions.window_entropy], t.predictions.window_entropy[i], m.name)
        assert (m.samples, m.batches, m.class_labels) == (t.samples[i], t.batches[i], t.class_labels(i))
        assert m.joins is None


def test_a_model_replaced_mid_snapshot_is_copied_as_it_is_then(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is released between chunks: a model evicted and re-created with another class
    count in between is read in its new layout (the layouts were counted at the start: two
    models of a layout not counted make its stack grow)."""
    s = _store()
    monkeypatch.setattr(state, "SNAPSHOT_CHUNK", 2)
    clock = s.clock
    calls = 0

    def replacing() -> float:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second chunk: replace a model the first has not read yet, and another
            for name, classes in (("three-b", 5), ("ctr", 5)):
                del s.models[name]
                s.model(name, classes).fold(
                    random_scores(np.random.default_rng(calls), 9, classes), None, clock(), None
                )
        return clock()

    s.clock = replacing
    listed = list(s.models)
    snap = s.snapshot()
    assert snap.table.names == listed  # in the order the snapshot listed them
    for name, classes in (("three-b", 5), ("ctr", 5)):
        i = snap.table.names.index(name)
        assert snap.table.num_classes[i] == classes
        want = _expected(s.models[name], clock())
        _same(snap.table.windows[i], want["windows"], name)
        _same(snap.table.calibration.windows[i], want["calibration windows"], name)


def test_each_hold_of_the_lock_covers_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _store()
    monkeypatch.setattr(state, "SNAPSHOT_CHUNK", 3)
    holds: list[int] = []

    class Counting:
        def __enter__(self) -> None:
            holds.append(0)

        def __exit__(self, *exc: object) -> None:
            pass

    s.lock = Counting()  # type: ignore[assignment]
    s.snapshot()
    assert len(holds) == 1 + -(-len(s.models) // 3)  # the listing, then a hold per chunk
