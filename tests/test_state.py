"""Rolling state against a brute-force recomputation over every sample ever seen."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import naive
from tests.clock import FakeClock
from xentd import accumulate as acc
from xentd.config import LimitsConfig, TimeWindow, WindowsConfig
from xentd.errors import Reason, ValidationError
from xentd.kernels import SampleScores
from xentd.state import StateStore, WindowStats

WINDOWS = WindowsConfig(
    time=(TimeWindow("10s", 10.0), TimeWindow("30s", 30.0)),
    buckets=4,
    count=(5, 17, 300),
    ewma_half_life_seconds=7.0,
)
BOUNDS = (0.1, 1.0, 5.0)


def _store(classes_limit: int, clock: FakeClock, max_models: int = 10) -> StateStore:
    return StateStore(
        WINDOWS, LimitsConfig(max_models=max_models, class_limit=classes_limit, loss_buckets=BOUNDS), clock
    )


def _expected(
    sel: np.ndarray,
    loss: np.ndarray,
    focal: np.ndarray,
    correct: np.ndarray,
    slot: np.ndarray,
    w: np.ndarray,
    decay: np.ndarray | None = None,
) -> WindowStats:
    d = np.ones_like(loss) if decay is None else decay
    ww = (w * d)[sel]
    sw = ww.sum()
    nan = math.nan
    return WindowStats(
        samples=float(d[sel].sum()),
        weight=float(sw),
        cross_entropy=float((ww * loss[sel]).sum() / sw) if sw > 0 else nan,
        accuracy=float((ww * correct[sel]).sum() / sw) if sw > 0 else nan,
        focal_loss=float((ww * focal[sel]).sum() / sw) if sw > 0 else nan,
        balanced_cross_entropy=naive.balanced(loss[sel], slot[sel], ww) if sel.any() else nan,
    )


def _close(got: WindowStats, want: WindowStats, label: str) -> None:
    for name in WindowStats.__slots__:
        a, b = getattr(got, name), getattr(want, name)
        if math.isnan(b):
            assert math.isnan(a), (label, name, a)
        else:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-9), (label, name, a, b)


batches = st.lists(
    st.tuples(st.floats(0.0, 12.0), st.integers(0, 40), st.booleans()),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(
    stream=batches,
    seed=st.integers(0, 2**32 - 1),
    classes=st.sampled_from([2, 3, 6]),
    class_limit=st.sampled_from([2, 4, 100]),
    query_delay=st.floats(0.0, 40.0),
)
def test_windows_match_brute_force(
    stream: list[tuple[float, int, bool]], seed: int, classes: int, class_limit: int, query_delay: float
) -> None:
    rng = np.random.default_rng(seed)
    clock = FakeClock(1_000_000.0 + rng.random() * 100)
    store = _store(class_limit, clock)
    model = store.model("m", classes)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("loss", "focal", "correct", "cls", "w", "t")}
    for dt, n, weighted in stream:
        clock.t += dt
        loss = rng.exponential(1.0, n) * (rng.random(n) < 0.9)
        scores = SampleScores(
            loss=loss,
            focal=loss * rng.random(n),
            correct=(rng.random(n) < 0.6).astype(np.uint8),
            true_class=rng.integers(0, classes, n),
            unnormalized_rows=0,
            confidence=np.full(len(loss), 0.75),
            brier=np.full(len(loss), 0.25),
        )
        weights = rng.random(n) * 2 * (rng.random(n) < 0.9) if weighted else None
        model.fold(scores, weights, clock.t, None)
        for k, v in (
            ("loss", scores.loss),
            ("focal", scores.focal),
            ("correct", scores.correct),
            ("cls", scores.true_class),
            ("w", np.ones(n) if weights is None else weights),
            ("t", np.full(n, clock.t)),
        ):
            cols[k].append(np.asarray(v, np.float64))
    loss, focal, correct, cls, w, t = (np.concatenate(cols[k]) for k in ("loss", "focal", "correct", "cls", "w", "t"))
    slot = np.minimum(cls, class_limit) if classes > class_limit else cls
    last_batch = clock.t
    clock.t += query_delay
    now = clock.t
    got = dict(model.windows(now))

    for tw in WINDOWS.time:
        width = tw.seconds / WINDOWS.buckets
        idx, now_idx = np.floor(t / width), math.floor(now / width)
        sel = (idx > now_idx - WINDOWS.buckets) & (idx <= now_idx)
        _close(got[tw.label], _expected(sel, loss, focal, correct, slot, w), tw.label)
    for k in WINDOWS.count:
        sel = np.zeros(len(loss), bool)
        sel[max(0, len(loss) - k) :] = True
        _close(got[f"last_{k}"], _expected(sel, loss, focal, correct, slot, w), f"last_{k}")
    # EWMA: ratios use weights decayed to the last batch; samples decay to the query time.
    decay = 2.0 ** (-(last_batch - t) / WINDOWS.ewma_half_life_seconds)
    want = _expected(np.ones(len(loss), bool), loss, focal, correct, slot, w, decay)
    want_samples = float((2.0 ** (-(now - t) / WINDOWS.ewma_half_life_seconds)).sum())
    got_ewma = got["ewma"]
    assert got_ewma.samples == pytest.approx(want_samples, rel=1e-9, abs=1e-12)
    _close(
        WindowStats(want_samples, *[getattr(got_ewma, f) for f in WindowStats.__slots__[1:]]),
        WindowStats(want_samples, *[getattr(want, f) for f in WindowStats.__slots__[1:]]),
        "ewma",
    )

    snap = store.snapshot().models[0]
    assert snap.samples == len(loss)
    assert snap.weight == pytest.approx(w.sum(), rel=1e-12)
    assert snap.loss_weighted_sum == pytest.approx((w * loss).sum(), rel=1e-12, abs=1e-12)
    assert snap.batches == len(stream)
    np.testing.assert_array_equal(
        snap.hist_counts, np.bincount(np.searchsorted(BOUNDS, loss), minlength=len(BOUNDS) + 1)
    )
    assert snap.loss_sum == pytest.approx(loss.sum(), rel=1e-12, abs=1e-12)
    for s, label in enumerate(snap.class_labels):
        sel = slot == s
        assert label == ("other" if classes > class_limit and s == class_limit else str(s))
        assert snap.class_weight[s] == pytest.approx(w[sel].sum(), rel=1e-12, abs=1e-12)
        assert snap.class_loss_weighted_sum[s] == pytest.approx((w * loss)[sel].sum(), rel=1e-12, abs=1e-12)


def test_count_windows_stay_exact_over_long_streams() -> None:
    """Block sums are only added to, so an outlier leaving the window leaves no residue."""
    clock = FakeClock(0.0)
    model = _store(100, clock).model("m", 2)
    rng = np.random.default_rng(0)
    all_loss = []
    for _ in range(400):
        n = int(rng.integers(1, 200))
        # Mixed magnitudes are what make add-and-subtract drift.
        loss = np.where(rng.random(n) < 0.01, 1e6, rng.random(n) * 1e-3)
        model.fold(
            SampleScores(loss, loss, np.zeros(n, np.uint8), np.zeros(n, np.int64), 0, np.ones(n), np.zeros(n)),
            None,
            0.0,
            None,
        )
        all_loss.append(loss)
    loss = np.concatenate(all_loss)
    got = dict(model.windows(0.0))
    for k in WINDOWS.count:
        assert got[f"last_{k}"].cross_entropy == pytest.approx(loss[-k:].mean(), rel=1e-12)
    assert model.loss.ring.shape[0] == max(WINDOWS.count)  # memory stops at the largest window


def test_clock_going_backwards_does_not_corrupt_windows() -> None:
    clock = FakeClock(1000.0)
    model = _store(100, clock).model("m", 2)
    one = SampleScores(np.ones(1), np.ones(1), np.ones(1, np.uint8), np.zeros(1, np.int64), 0, np.ones(1), np.zeros(1))
    model.fold(one, None, 1000.0, None)
    model.fold(one, None, 900.0, None)  # NTP step back: counted as "now"
    got = dict(model.windows(1000.0))
    assert got["10s"].samples == 2 and got["last_5"].samples == 2


def test_model_cap_and_class_count_are_enforced() -> None:
    store = _store(100, FakeClock(0.0), max_models=2)
    store.model("a", 3)
    store.model("b", 2)
    with pytest.raises(ValidationError) as info:
        store.model("c", 2)
    assert info.value.reason is Reason.TOO_MANY_MODELS
    with pytest.raises(ValidationError) as info:
        store.model("a", 4)
    assert info.value.reason is Reason.CLASS_COUNT_CHANGED
    assert store.model("a", 3) is store.models["a"]


def test_fold_counts_unnormalized_targets_and_the_snapshot_carries_them() -> None:
    store = _store(100, FakeClock(0.0))
    model = store.model("m", 2)
    one = SampleScores(np.ones(2), np.ones(2), np.ones(2, np.uint8), np.zeros(2, np.int64), 1, np.ones(2), np.zeros(2))
    model.fold(one, None, 0.0, None, unnormalized_targets=2)
    model.fold(one, None, 0.0, None)
    (snap,) = store.snapshot().models
    assert (snap.unnormalized_targets, snap.unnormalized_rows, snap.batches) == (2, 2, 2)


def test_bucket_numbers_are_python_floor_division() -> None:
    """The fold kernels number time buckets themselves; the numbers must be NumPy's (and
    Python's) floor division, at bucket edges too, or reads would miss what folds wrote."""
    rng = np.random.default_rng(3)
    widths = np.array([1.0, 5.0, 60.0, 0.1, 1 / 3, 7 / 60, 1440.0])
    edges = np.arange(200_000) * (1 / 3) + 1.7e9
    for now in np.concatenate([rng.uniform(0, 2e9, 20_000), edges[::97], np.arange(-50, 50, 0.1)]):
        assert acc.bucket_numbers(float(now), widths).tolist() == np.floor_divide(now, widths).astype(np.int64).tolist()


def _saved(model: object) -> list[np.ndarray]:
    """Every array and scalar a model's components save, flattened for an exact comparison."""
    out: list[np.ndarray] = []
    for component in model.components().values():  # type: ignore[attr-defined]
        scalars, arrays = component.save()
        out += [np.asarray(v, np.float64) for _, v in sorted(scalars.items())]
        out += [a for _, a in sorted(arrays.items())]
    return out


def _scored(rng: np.random.Generator, n: int, classes: int) -> SampleScores:
    return SampleScores(
        loss=rng.exponential(1.0, n),
        focal=rng.exponential(0.5, n),
        correct=rng.integers(0, 2, n).astype(np.uint8),
        true_class=rng.integers(0, classes, n),
        unnormalized_rows=0,
        confidence=rng.uniform(0.1, 1.0, n),
        brier=rng.uniform(0.0, 2.0, n),
    )


@pytest.mark.parametrize("weighted", [False, True])
def test_folding_rows_of_a_shared_batch_equals_folding_them_alone(weighted: bool) -> None:
    """A drain folds each model's rows out of one scored batch (rows=, label_free=); every saved
    value must equal folding that model's rows as their own batch and their entropies apart."""
    rng = np.random.default_rng(11)
    clock = FakeClock(1000.0)
    shared, alone = _store(4, clock), _store(4, clock)
    n = 90
    scores = _scored(rng, n, 6)
    weights = rng.uniform(0.5, 2.0, n) if weighted else None
    entropy, top = rng.uniform(0, 2, n), rng.uniform(0.2, 1, n)
    for k, (lo, hi) in enumerate([(0, 30), (30, 31), (31, 90), (90, 90)]):
        clock.t += 1.5
        a, b = shared.model(f"m{k}", 6), alone.model(f"m{k}", 6)
        a.fold(scores, weights, clock.t, None, rows=(lo, hi), label_free=(entropy, top))
        part = SampleScores(
            *(getattr(scores, f)[lo:hi] for f in ("loss", "focal", "correct", "true_class")),
            unnormalized_rows=0,
            confidence=scores.confidence[lo:hi],
            brier=scores.brier[lo:hi],
        )
        w = None if weights is None else weights[lo:hi]
        b.fold(part, w, clock.t, None)
        b.fold_predictions(entropy[lo:hi], top[lo:hi], w, clock.t)
        for x, y in zip(_saved(a), _saved(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("spoiler", ["loss", "calibration", "entropy"])
def test_a_fold_that_would_overflow_changes_no_component(spoiler: str) -> None:
    """All or nothing across the components: whichever would overflow, none changes."""
    rng = np.random.default_rng(5)
    clock = FakeClock(50.0)
    model = _store(4, clock).model("m", 3)
    n = 8
    model.fold(_scored(rng, n, 3), None, clock.t, None, label_free=(np.ones(n), np.ones(n)))
    before = _saved(model)
    scores = _scored(rng, n, 3)
    weights = np.full(n, 1e300)  # losses of 1e10 overflow; Brier scores <= 2 and entropies <= 40 do not
    entropy = np.ones(n)
    if spoiler == "loss":
        scores.loss[:] = 1e10
    elif spoiler == "calibration":
        weights = np.full(n, 1.7e308)  # n of these overflow any sum, losses kept small
        scores.loss[:] = 0.0
        scores.focal[:] = 0.0
    else:
        entropy = np.full(n, 1e10)
    with pytest.raises(ValidationError) as info:
        clock.t += 1.0
        model.fold(scores, weights, clock.t, None, label_free=(entropy, np.ones(n)))
    assert info.value.reason is Reason.NON_FINITE
    assert "'m'" in info.value.detail
    assert {"loss": "losses", "calibration": "calibration sums", "entropy": "entropies"}[spoiler] in info.value.detail
    for x, y in zip(before, _saved(model), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("full", ["calibration", "predictions"])
def test_a_lifetime_sum_at_the_edge_of_float64_refuses_the_fold_with_no_huge_weight(full: str) -> None:
    """Weights below fold.HUGE cannot overflow a batch's calibration or entropy sums, but a
    lifetime sum already near float64's largest value can: the fold checks first, and
    changes nothing (the loss included) instead of folding the losses alone."""
    rng = np.random.default_rng(8)
    clock = FakeClock(50.0)
    model = _store(4, clock).model("m", 3)
    n = 64
    model.fold(_scored(rng, n, 3), None, clock.t, None, label_free=(np.ones(n), np.ones(n)))
    getattr(model, full).lifetime[:] = np.finfo(np.float64).max
    before = _saved(model)
    scores = _scored(rng, n, 3)
    scores.brier[:] = 2.0
    scores.confidence[:] = 1.0
    weights = np.full(n, 1e290)  # n x 2 x 1e290 is past half an ulp of float64's maximum
    with pytest.raises(ValidationError) as info:
        clock.t += 1.0
        model.fold(scores, weights, clock.t, None, label_free=(np.full(n, 2.0), np.ones(n)))
    assert info.value.reason is Reason.NON_FINITE
    assert {"calibration": "calibration sums", "predictions": "entropies"}[full] in info.value.detail
    for x, y in zip(before, _saved(model), strict=True):
        np.testing.assert_array_equal(x, y)


def test_rows_of_a_shared_batch_count_no_unnormalized_rows_unless_told() -> None:
    """scores.unnormalized_rows counts the whole call's rows, not one model's."""
    rng = np.random.default_rng(3)
    model = _store(4, FakeClock(0.0)).model("m", 3)
    scores = _scored(rng, 6, 3)
    scores = SampleScores(**{**{f: getattr(scores, f) for f in scores.__dataclass_fields__}, "unnormalized_rows": 5})
    model.fold(scores, None, 0.0, None, rows=(0, 3))
    assert model.unnormalized_rows == 0
    model.fold(scores, None, 0.0, None, rows=(3, 6), unnormalized_rows=2)
    assert model.unnormalized_rows == 2
    model.fold(scores, None, 0.0, None)
    assert model.unnormalized_rows == 7


def test_fold_refuses_rows_past_its_inputs() -> None:
    rng = np.random.default_rng(1)
    model = _store(4, FakeClock(0.0)).model("m", 3)
    scores = _scored(rng, 5, 3)
    with pytest.raises(ValueError, match="rows 0:6"):
        model.fold(scores, None, 0.0, None, rows=(0, 6))
    with pytest.raises(ValueError, match="rows 2:4"):
        model.fold(scores, None, 0.0, None, rows=(2, 4), label_free=(np.ones(3), np.ones(3)))


def test_a_young_model_grows_its_ring_on_at_most_every_other_fold() -> None:
    """Growing makes room for one more batch like the last: a model sending 64 samples at a
    time reallocates its ring on at most half its folds, never past the largest window."""
    rng = np.random.default_rng(2)
    model = _store(4, FakeClock(0.0)).model("m", 3)
    rings: list[np.ndarray] = []  # kept alive, so that no two arrays share an id()
    blocks: list[np.ndarray] = []
    folds = max(WINDOWS.count) // 64 + 3
    for k in range(folds):
        model.fold(_scored(rng, 64, 3), None, float(k), None)
        rings.append(model.loss.ring)
        blocks.append(model.loss.blocks)
        assert model.loss.ring.shape[0] <= max(WINDOWS.count)
        assert model.loss.ring.shape[0] >= min(model.loss.count_total, max(WINDOWS.count))
    assert 1 < len({id(a) for a in rings}) <= folds // 2 + 1
    assert 1 < len({id(a) for a in blocks}) <= folds // 2 + 1
