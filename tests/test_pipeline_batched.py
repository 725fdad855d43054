"""The batched hot path: a drain checked per layout in one pass, scored across models, folded per model.

Each test compares a drain handled at once (``handle_many``) with an independent
reference: the same messages handled one at a time (``handle``, which checks each
message with validate() and scores it alone), or the float64 NumPy oracle in
tests/naive.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import naive
from tests.conftest import LIMITS, softmax
from xentd import wire
from xentd.config import Config, EngineConfig, IngestConfig, LimitsConfig, WindowsConfig
from xentd.daemon import Daemon
from xentd.errors import Reason, RejectedBatch
from xentd.kernels import ScoringParams
from xentd.kernels.cpu import CpuBackend
from xentd.pipeline import BATCH_MIN
from xentd.validate import check_many, fast_layout, flagged_segments, validate

NOW = 1_700_000_000.0
_BACKEND = CpuBackend()  # hypothesis reruns a test many times: one backend, not a fixture per run


def _daemon(**engine: int) -> Daemon:
    cfg = Config(
        engine=EngineConfig(**engine),
        ingest=IngestConfig(dedup_window=1000),
        limits=LimitsConfig(max_models=100),
        windows=WindowsConfig(count=(50, 1000)),
    )
    d = Daemon(cfg, clock=lambda: NOW)
    d._init_backend()
    return d


def _frames(model: str, pred: np.ndarray, targets: np.ndarray, **kw: object) -> list[bytes]:
    return [bytes(f) for f in wire.encode(model, pred, targets, **kw)]  # type: ignore[arg-type]


def _logits(rng: np.random.Generator, n: int, c: int = 10) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(0, 2, (n, c)).astype(np.float32), rng.integers(0, c, n)


def _state(d: Daemon, reference: bool = False) -> list[tuple[object, ...]]:
    """Everything a snapshot holds; sums as ``pytest.approx`` on the reference side
    (grouping changes their order of addition, nothing else)."""

    def close(x: object) -> object:
        return pytest.approx(x, rel=1e-12, nan_ok=True) if reference else x

    snap = d.state.snapshot()
    rows: list[tuple[object, ...]] = []
    for m in sorted(snap.models, key=lambda m: m.name):
        rows.append(
            (
                m.name,
                m.samples,
                close(m.weight),
                close(m.loss_weighted_sum),
                close(m.loss_sum),
                m.correct_weighted_sum,
                m.batches,
                m.unnormalized_rows,
                m.unnormalized_targets,
                m.last_event_time,
                close(m.class_weight.tolist()),
                close(m.class_loss_weighted_sum.tolist()),
                m.hist_counts.tolist(),
                [(label, close(dataclasses.astuple(w))) for label, w in m.windows],
                sorted(m.rejected.items()),
            )
        )
    c = snap.counters
    return [rows, sorted(snap.rejected.items()), c.messages, c.duplicate_batches, c.sequence_gaps, c.limit_hits]


def _one_by_one(stream: list[list[bytes]], **engine: int) -> Daemon:
    d = _daemon(**engine)
    for frames in stream:
        d.handle(frames)
    return d


def _bad_messages(rng: np.random.Generator) -> dict[Reason, list[bytes]]:
    x, y = _logits(rng, 64)
    nan = x.copy()
    nan[5, 3] = np.nan
    probs = softmax(x.astype(np.float64))
    probs[0, 0] = 1.5
    w = rng.random(64)
    w[7] = -1.0
    return {
        Reason.NON_FINITE: _frames("a", nan, y, input="logits"),
        Reason.TARGET_OUT_OF_RANGE: _frames("a", x, np.where(np.arange(64) == 9, 10, y), input="logits"),
        Reason.NEGATIVE_WEIGHT: _frames("a", x, y, input="logits", weights=w),
        Reason.PROBABILITY_OUT_OF_RANGE: _frames("a", probs, y),
    }


def test_a_bad_message_in_a_drain_is_rejected_alone_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    bad = _bad_messages(rng)
    good: list[tuple[str, np.ndarray, np.ndarray]] = []
    stream: list[list[bytes]] = []
    for i in range(40):
        model = "ab"[i % 2]
        x, y = _logits(rng, 64)
        good.append((model, x, y))
        stream.append(_frames(model, x, y, input="logits"))
        if i % 10 == 3:
            stream.append(bad[list(bad)[i // 10]])
    d = _daemon()
    with caplog.at_level(logging.WARNING, logger="xentd"):
        d.handle_many(stream)
    snap = d.state.snapshot()
    for reason, frames in bad.items():
        assert snap.rejected[reason.value] == 1
        # The words of validate() for that message alone.
        with pytest.raises(RejectedBatch) as alone:
            validate(wire.decode(frames, **LIMITS))
        assert alone.value.reason is reason
        assert any(alone.value.detail in r.getMessage() for r in caplog.records), alone.value.detail
    assert sum(snap.rejected.values()) == len(bad)
    assert snap.models[0].rejected == {r.value: 1 for r in bad}  # model "a" already existed each time
    # The neighbours are scored exactly: the float64 oracle, model by model.
    for m in snap.models:
        xs = np.concatenate([x for model, x, _ in good if model == m.name])
        ys = np.concatenate([y for model, _, y in good if model == m.name])
        ref = naive.multiclass(xs, ys, naive.LOGITS, eps=float(np.finfo(np.float32).eps))
        assert m.samples == len(ys)
        assert m.batches == 20
        # FP32 logits: the kernel sums in float32 blocks (tests/test_kernels_cpu.py FAST_F32).
        assert m.loss_weighted_sum == pytest.approx(ref.loss.sum(), rel=5e-6)
        assert m.correct_weighted_sum == ref.correct.sum()
    assert _state(d) == _state(_one_by_one(stream), reference=True)


@pytest.mark.parametrize("models", [1, 3, 50])
def test_a_drain_equals_one_message_at_a_time(models: int) -> None:
    """Layout changes, large batches, class-count changes, garbage and every kind of tensor, mixed."""
    rng = np.random.default_rng(models)
    stream: list[list[bytes]] = []
    for i in range(150):
        model = f"m{i % models}"
        n = int(rng.choice([1, 5, 64, 300]))
        x, y = _logits(rng, n, 4)
        pick = int(rng.integers(0, 8))
        if pick == 0:
            frames = _frames(model, x, y, input="logits", ts=float(i))
        elif pick == 1:  # soft targets, some rows not a distribution (counted)
            t = np.eye(4)[y] * np.where(rng.random(n) < 0.3, 0.5, 1.0)[:, None]
            frames = _frames(model, softmax(x).astype(np.float16), t, weights=rng.random(n))
        elif pick == 2:
            frames = _frames(model, np.log(softmax(x.astype(np.float64))), y.astype(np.uint8), input="log_probs")
        elif pick == 3:
            frames = _frames(model, wire.BF16.from_float32(x), y.astype(np.int32), input="logits")
        elif pick == 4:  # probabilities whose rows do not sum to 1 (counted by the kernel)
            frames = _frames(model, softmax(x) * 0.9, y)
        elif pick == 5:  # 3 classes for a model that has 4: class_count_changed, unless it is new
            frames = _frames(model, x[:, :3], np.minimum(y, 2), input="logits")
        elif pick == 6:
            frames = _frames(model, x, y, input="logits", batch_id=f"id{i % 7}")  # duplicates
        else:
            frames = _frames(model, x[:, 0], (y > 1).astype(np.uint8), input="logits", weights=rng.random(n))
        stream.append(frames)
        if i % 13 == 0:
            stream.append([b"garbage"])
    # 300 x 4 is past this group size: those batches go one at a time, after what came before.
    d = _daemon(group_max_elements=1000)
    d.handle_many(stream)
    assert _state(d) == _state(_one_by_one(stream, group_max_elements=1000), reference=True)


def test_every_model_sees_its_samples_in_arrival_order() -> None:
    """The count window over the last 50 samples depends on order: it must match one at a time."""
    rng = np.random.default_rng(7)
    stream = []
    for i in range(60):
        x, y = _logits(rng, int(rng.integers(1, 30)), 4)
        kind = "logits" if i % 9 else "log_probs"  # a layout change splits a model's run
        pred = x if kind == "logits" else np.log(softmax(x.astype(np.float64))).astype(np.float32)
        stream.append(_frames(f"m{i % 3}", pred, y, input=kind))
    d = _daemon(group_max_elements=60)  # some batches are past it
    d.handle_many(stream)
    assert _state(d) == _state(_one_by_one(stream, group_max_elements=60), reference=True)


def test_sequence_numbers_are_judged_in_arrival_order() -> None:
    stream = []
    for seq in [0, 1, 2, 5, 3, 4, 9, 10, 0, 1]:  # gaps 2 and 4, two restarts
        stream.append(_frames("m", np.full((2, 2), 0.5), np.zeros(2, np.int64), producer="p", seq=seq))
    stream.insert(4, [b"{}"])  # refused before its seq is known
    stream.insert(
        6,
        _frames("m", np.full((2, 2), np.nan), np.zeros(2, np.int64), producer="q", seq=7),
    )
    d = _daemon()
    d.handle_many(stream)
    one = _one_by_one(stream)
    assert d.state.counters.sequence_gaps == one.state.counters.sequence_gaps == 2 + 4
    assert d.state.sequences.resets == one.state.sequences.resets


def test_duplicates_inside_one_drain_first_occurrence_wins() -> None:
    rng = np.random.default_rng(3)
    x1, y1 = _logits(rng, 64)
    x2, y2 = _logits(rng, 64)
    first = _frames("m", x1, y1, input="logits", batch_id="b")
    copy = _frames("m", x2, y2, input="logits", batch_id="b")  # same id, other data
    other_model = _frames("n", x2, y2, input="logits", batch_id="b")  # ids are per model
    d = _daemon()
    d.handle_many([first, copy, other_model, copy, first])
    snap = d.state.snapshot()
    assert snap.counters.duplicate_batches == 3
    assert snap.counters.messages == 5
    m = next(m for m in snap.models if m.name == "m")
    ref = naive.multiclass(x1, y1, naive.LOGITS, eps=float(np.finfo(np.float32).eps))
    assert m.batches == 1
    assert m.loss_weighted_sum == pytest.approx(ref.loss.sum(), rel=5e-6)


def test_a_rejected_copy_does_not_keep_its_retry_from_being_scored() -> None:
    rng = np.random.default_rng(4)
    x, y = _logits(rng, 8)
    broken = x.copy()
    broken[0, 0] = np.inf
    stream = [_frames("m", x, y, input="logits")] * 2
    stream += [_frames("m", broken, y, input="logits", batch_id="b"), _frames("m", x, y, input="logits", batch_id="b")]
    d = _daemon()
    d.handle_many(stream)
    snap = d.state.snapshot()
    assert snap.rejected[Reason.NON_FINITE.value] == 1
    assert snap.counters.duplicate_batches == 0
    assert snap.models[0].batches == 3


@pytest.mark.parametrize("drain", [1, 2 * BATCH_MIN])
def test_a_flagged_batch_creates_no_model_and_leaves_its_id_to_the_retry(drain: int) -> None:
    """The kernel checks the values as it scores, before the batch is admitted: a batch it
    flags is rejected with validate()'s reason, creates no model, and its batch_id stays free."""
    rng = np.random.default_rng(12)
    x, y = _logits(rng, 64)
    broken = x.copy()
    broken[17, 2] = np.nan
    bad = _frames("new", broken, y, input="logits", batch_id="b")
    fixed = _frames("new", x, y, input="logits", batch_id="b")
    filler = [_frames("other", *_logits(rng, 64), input="logits") for _ in range(drain - 1)]
    d = _daemon()
    d.handle_many([*filler, bad])
    snap = d.state.snapshot()
    assert {r: n for r, n in snap.rejected.items() if n} == {Reason.NON_FINITE.value: 1}
    assert "new" not in {m.name for m in snap.models}
    d.handle_many([*filler, fixed])
    snap = d.state.snapshot()
    assert snap.counters.duplicate_batches == 0
    model = next(m for m in snap.models if m.name == "new")
    ref = naive.multiclass(x, y, naive.LOGITS, eps=float(np.finfo(np.float32).eps))
    assert model.batches == 1
    assert model.loss_weighted_sum == pytest.approx(ref.loss.sum(), rel=5e-6)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_16_bit_predictions_widened_by_the_kernel_score_as_their_values(datatype: str, kind: str) -> None:
    """FP16 and BF16 predictions reach the kernel as their wire bits, batched or alone: every
    model's totals equal the float64 oracle on the exactly widened values."""
    rng = np.random.default_rng(13)
    stream: list[list[bytes]] = []
    sent: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"m0": [], "m1": []}
    for i in range(12):
        x, y = _logits(rng, int(rng.choice([8, 64, 400])), 6)
        values = x if kind == "logits" else softmax(x.astype(np.float64)).astype(np.float32)
        if datatype == "FP16":
            pred = values.astype(np.float16)
            widened = pred.astype(np.float32)
        else:
            pred = wire.BF16.from_float32(values)
            widened = (pred.bits.astype(np.uint32) << 16).view(np.float32)
        model = f"m{i % 2}"
        sent[model].append((widened, y))
        stream.append(_frames(model, pred, y, input=kind))
    d = _daemon(group_max_elements=1000)  # the 400-row batches go alone
    d.handle_many(stream)
    snap = d.state.snapshot()
    assert sum(snap.rejected.values()) == 0
    eps = {"FP16": float(np.finfo(np.float16).eps), "BF16": 2.0**-7}[datatype]
    for m in snap.models:
        xs = np.concatenate([x for x, _ in sent[m.name]])
        ys = np.concatenate([y for _, y in sent[m.name]])
        ref = naive.multiclass(xs, ys, naive.LOGITS if kind == "logits" else naive.PROBS, eps=eps)
        assert m.samples == len(ys)
        assert m.loss_weighted_sum == pytest.approx(ref.loss.sum(), rel=5e-6)
        assert m.correct_weighted_sum == ref.correct.sum()


def test_an_overflowing_message_spoils_only_itself() -> None:
    """Finite FP64 logits near 1e308 overflow the totals; the rest of the model's run is kept."""
    rng = np.random.default_rng(5)
    stream = []
    for i in range(8):
        x = rng.normal(0, 2, (16, 4))
        if i == 5:
            x[:, 0] = 1e308
            x[:, 1] = -1e308
        stream.append(_frames(f"m{i % 2}", x, np.ones(16, np.int64), input="logits"))
    d = _daemon()
    d.handle_many(stream)
    snap = d.state.snapshot()
    assert snap.rejected[Reason.NON_FINITE.value] == 1
    assert {m.name: m.batches for m in snap.models} == {"m0": 4, "m1": 3}
    assert _state(d) == _state(_one_by_one(stream), reference=True)


def test_short_drains_go_one_message_at_a_time() -> None:
    rng = np.random.default_rng(6)
    stream = [_frames("m", *_logits(rng, 4), input="logits") for _ in range(BATCH_MIN - 1)]
    d = _daemon()
    d.handle_many(stream)
    assert d.state.snapshot().models[0].batches == BATCH_MIN - 1


# --- the batched check against validate(), message by message ------------------------------

_FLOATS = st.sampled_from([0.0, 0.5, 1.0, -0.5, 2.0, -1e-30, 1e30, math.nan, math.inf, -math.inf])


@st.composite
def _messages(draw: st.DrawFn) -> list[bytes]:
    kind = draw(st.sampled_from(["probs", "logits", "log_probs"]))
    binary = draw(st.booleans())
    n = draw(st.integers(1, 4))
    c = 3
    shape = (n,) if binary else (n, c)
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    pred = np.full(shape, 0.25 if kind == "probs" else -0.5)
    for _ in range(draw(st.integers(0, 2))):
        pred.flat[draw(st.integers(0, pred.size - 1))] = draw(_FLOATS)
    soft = not binary and draw(st.booleans())
    if soft:
        targets = np.full(shape, 1.0 / c, draw(st.sampled_from([np.float32, np.float64, np.uint8])))
        if draw(st.booleans()):
            targets.flat[draw(st.integers(0, targets.size - 1))] = draw(_FLOATS) if targets.dtype.kind == "f" else 3
    else:
        targets = np.array(
            draw(st.lists(st.integers(-1, c), min_size=n, max_size=n)),
            draw(st.sampled_from([np.int8, np.int32, np.int64])),
        )
    weights = None
    if draw(st.booleans()):
        weights = np.ones(n)
        weights[draw(st.integers(0, n - 1))] = draw(_FLOATS)
    with np.errstate(invalid="ignore", over="ignore"):
        return _frames("m", pred.astype(dtype), targets, input=kind, weights=weights)


@settings(max_examples=150, deadline=None)
@given(st.lists(_messages(), min_size=1, max_size=6))
def test_the_batched_check_flags_exactly_what_validate_rejects(messages: list[list[bytes]]) -> None:
    """A layout's messages concatenated (check_many: weights) and scored in one kernel call
    that flags bad values: a message is flagged exactly when validate() rejects it alone."""
    backend = _BACKEND
    unpacked = [wire.unpack(m, **LIMITS) for m in messages]
    groups: dict[object, list[int]] = {}
    for i, u in enumerate(unpacked):
        layout = fast_layout(u.header)
        if layout is not None:
            groups.setdefault(layout.key, []).append(i)
    for key, members in groups.items():
        layouts = [fast_layout(unpacked[i].header) for i in members]
        segs = check_many(
            key,  # type: ignore[arg-type]
            [unpacked[i].buffers[f.predictions] for i, f in zip(members, layouts, strict=True)],  # type: ignore[union-attr]
            [unpacked[i].buffers[f.targets] for i, f in zip(members, layouts, strict=True)],  # type: ignore[union-attr]
            None if key[5] is None else [unpacked[i].buffers[f.weights] for i, f in zip(members, layouts, strict=True)],  # type: ignore[index, union-attr]
            [f.rows for f in layouts],  # type: ignore[union-attr]
            [None] * len(members),
        )
        whole = segs.batch("m", [(0, segs.starts[-1])])
        scores = backend.score(whole, ScoringParams(1e-7, 2.0, 1e-3))
        assert scores.invalid is not None
        flagged = flagged_segments(scores.invalid, segs.starts)
        for s, i in enumerate(members):
            bad = segs.bad[s] or flagged[s]
            try:
                batch = validate(unpacked[i].message(), kernel_checks=True)
                validate(unpacked[i].message())
            except RejectedBatch:
                assert bad
                continue
            assert not bad
            # The arrays a good message contributes are the ones validate() gives the kernels.
            own = segs.batch("m", [(segs.starts[s], segs.starts[s + 1])])
            for name in ("predictions", "targets", "weights"):
                a, b = getattr(own, name), getattr(batch, name)
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape
                    np.testing.assert_array_equal(a, b)
            assert own.target_kind is batch.target_kind
            assert segs.unnormalized[s] == batch.unnormalized_targets
