"""Predictions-only and labels-only messages through the pipeline, in process: each bad one
rejected alone with its reason, order kept against full messages in the same drain, retries
and sequence numbers judged as for any message, and the totals equal a NumPy oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import naive
from xentd import wire
from xentd.config import Config, IngestConfig, LimitsConfig
from xentd.daemon import Daemon

NOW = 1_700_000_000.0


def _daemon() -> Daemon:
    d = Daemon(Config(ingest=IngestConfig(dedup_window=100), limits=LimitsConfig(max_models=20)), clock=lambda: NOW)
    d._init_backend()
    return d


def _msg(model: str, **kw: object) -> list[bytes]:
    return [bytes(f) for f in wire.encode(model, **kw)]  # type: ignore[arg-type]


def _edit(frames: list[bytes], **header: object) -> list[bytes]:
    h = json.loads(frames[0])
    for key, value in header.items():
        if key == "tensors":
            h["tensors"] = value(h["tensors"])  # type: ignore[operator]
        else:
            h[key] = value
    return [json.dumps(h).encode(), *frames[1:]]


def _rejected(d: Daemon) -> dict[str, int]:
    return {r: n for r, n in d.state.snapshot().rejected.items() if n}


def _joins(d: Daemon, model: str) -> dict[str, int]:
    m = next(m for m in d.state.snapshot().models if m.name == model)
    assert m.joins is not None
    return {k: v for k, v in m.joins.outcomes.items() if v}


P = np.full((2, 3), 1 / 3)


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        # ids of a float type, of the wrong length, or two-dimensional (and a good message: no rejection)
        (lambda: _msg("m", predictions=P, ids=np.array([0, 1], np.uint64)), None),
        (lambda: _edit(_msg("m", predictions=P, ids=np.arange(2)), tensors=_retype("ids", "FP64")), "bad_datatype"),
        (lambda: _msg("m", predictions=P, ids=np.arange(3)), "shape_mismatch"),
        (lambda: _edit(_msg("m", predictions=P, ids=np.arange(2)), tensors=_reshape("ids", [1, 2])), "shape_mismatch"),
        # UINT64 anywhere but ids
        (
            lambda: _edit(_msg("m", targets=np.arange(2), ids=np.arange(2)), tensors=_retype("targets", "UINT64")),
            "bad_datatype",
        ),
        # a labels-only message with weights; predictions-only without input; labels alone without ids
        (lambda: _weights_on_labels(), "shape_mismatch"),
        (lambda: _edit(_msg("m", predictions=P, ids=np.arange(2)), input=None), "bad_header"),
        (lambda: _edit(_msg("m", targets=np.arange(2), ids=np.arange(2)), tensors=_drop("ids"))[:2], "missing_tensor"),
        # probabilities out of range wait nowhere
        (lambda: _msg("m", predictions=P * 4, ids=np.arange(2)), "probability_out_of_range"),
    ],
)
def test_each_bad_join_message_is_rejected_alone_with_its_reason(frames: object, reason: str | None) -> None:
    d = _daemon()
    good = _msg("m", predictions=P, ids=np.array([10, 11]))
    d.handle_many([good, frames(), _msg("m", targets=np.array([0, 2]), ids=np.array([10, 11]))])  # type: ignore[operator]
    assert _rejected(d) == ({} if reason is None else {reason: 1})
    assert _joins(d, "m").get("matched") == 2  # the neighbours joined
    assert d.state.counters.messages == 3


def _retype(name: str, datatype: str) -> object:
    return lambda ts: [{**t, "datatype": datatype} if t["name"] == name else t for t in ts]


def _reshape(name: str, shape: list[int]) -> object:
    return lambda ts: [{**t, "shape": shape} if t["name"] == name else t for t in ts]


def _drop(name: str) -> object:
    return lambda ts: [t for t in ts if t["name"] != name]


def _weights_on_labels() -> list[bytes]:
    full = _msg("m", predictions=P, targets=np.arange(2), weights=np.ones(2), ids=np.arange(2))
    h = json.loads(full[0])
    keep = [i for i, t in enumerate(h["tensors"]) if t["name"] != "predictions"]
    h["tensors"] = [h["tensors"][i] for i in keep]
    h.pop("input")
    return [json.dumps(h).encode(), *[full[1 + i] for i in keep]]


def test_order_within_a_drain_is_kept_across_kinds_and_retries_and_gaps_are_judged() -> None:
    rng = np.random.default_rng(4)
    d = _daemon()
    z = rng.normal(0, 2, (6, 4))
    y = rng.integers(0, 4, 6)
    ids = np.arange(6)
    drain = [
        _msg("o", targets=y[:2], ids=ids[:2], producer="p", seq=0),  # before any prediction: unknown_model
        _msg("o", predictions=z, ids=ids, input="logits", producer="p", seq=1, batch_id="b1"),
        _msg("o", predictions=z, ids=ids, input="logits", producer="p", seq=2, batch_id="b1"),  # a retry
        _msg("o", predictions=z[:1], targets=y[:1], input="logits", producer="p", seq=3),  # full, in between
        _msg("o", targets=y[2:], ids=ids[2:], producer="p", seq=5),  # seq 4 never came
        _msg("o", targets=y[2:3], ids=ids[2:3], producer="p", seq=6),  # joined already: unmatched
    ]
    d.handle_many(drain)
    assert _joins(d, "o") == {"matched": 4, "unmatched": 1}
    assert _rejected(d) == {"unknown_model": 1}
    assert d.state.counters.duplicate_batches == 1 and d.state.counters.sequence_gaps == 1
    assert d.state.counters.messages == 6
    m = next(m for m in d.state.snapshot().models if m.name == "o")
    rows = [0, 2, 3, 4, 5]  # the full message's sample, then the four joined
    want = -naive.log_softmax(z)[rows, y[rows]].sum()
    assert m.loss_weighted_sum == pytest.approx(want, rel=1e-6)  # FP64 logits; the oracle is float64 too
    assert m.samples == 5
    # Label-free statistics count each prediction row once, when it arrives (the retry not at all).
    assert m.predictions.rows == 7


def test_a_run_of_labels_in_mixed_forms_retries_and_overflows_scores_each_pair_once() -> None:
    d = _daemon()
    ids = np.arange(6)
    p = np.full((6, 3), 1 / 3, np.float32)
    d.handle_many([_msg("m", predictions=p, ids=ids)])
    index = _msg("m", targets=np.array([0, 1]), ids=ids[:2], batch_id="L1")
    soft = _msg("m", targets=np.eye(3, dtype=np.float32)[[2, 0]], ids=ids[2:4])
    bad = _msg("m", targets=np.array([7]), ids=ids[4:5])
    d.handle_many([index, index, soft, bad])  # a retry, another form, a bad class
    assert _joins(d, "m") == {"matched": 4}
    assert d.state.counters.duplicate_batches == 1 and _rejected(d) == {"target_out_of_range": 1}
    assert d.state.counters.messages == 5  # the predictions and the four labels messages, each once
    m = next(m for m in d.state.snapshot().models if m.name == "m")
    assert m.samples == 4 and m.loss_weighted_sum == pytest.approx(4 * np.log(3), rel=1e-6)


def test_an_overflowing_pair_is_rejected_alone_and_a_full_batch_folds_both_or_neither() -> None:
    d = _daemon()
    d.handle_many([_msg("o", predictions=np.array([1e-300, 0.5]), ids=np.arange(2), weights=np.array([1e308, 1.0]))])
    d.handle_many(
        [_msg("o", targets=np.array([1.0]), ids=np.arange(1)), _msg("o", targets=np.array([1.0]), ids=np.array([1]))]
    )
    assert _rejected(d) == {"non_finite": 1} and d.state.counters.messages == 3
    m = next(m for m in d.state.snapshot().models if m.name == "o")
    assert m.samples == 1
    # An entropy sum that overflows where the losses do not (H = 1.79 nats, loss = log 2): rejected whole.
    row = np.array([[0.5] + [0.5 / 9] * 9])
    d.handle_many([_msg("f", predictions=row, targets=np.array([0]), weights=np.array([1.5e308]))])
    assert _rejected(d) == {"non_finite": 2}
    f = [m for m in d.state.snapshot().models if m.name == "f"]
    assert not f or (f[0].samples == 0 and f[0].predictions.rows == 0)


def test_a_model_with_waiting_predictions_is_not_dropped_as_idle() -> None:
    from xentd.config import LabelsConfig

    clock = [NOW]
    cfg = Config(limits=LimitsConfig(model_ttl_seconds=3600.0), labels=LabelsConfig(ttl_seconds=7 * 86_400.0))
    d = Daemon(cfg, clock=lambda: clock[0])
    d._init_backend()
    d.handle_many([_msg("m", predictions=np.full((5, 3), 1 / 3), ids=np.arange(5))])
    clock[0] += 25 * 3600  # past limits.model_ttl, within labels.ttl
    d.housekeeping(force=True)
    d.handle_many([_msg("m", targets=np.array([0, 1, 2, 0, 1]), ids=np.arange(5))])
    assert _joins(d, "m") == {"matched": 5} and not _rejected(d)


def test_a_snapshot_refused_halfway_leaves_nothing_behind() -> None:
    from xentd import persist
    from xentd.errors import SnapshotError

    d = _daemon()
    d.handle_many([_msg("m", predictions=P, targets=np.array([0, 1]), batch_id="B1")])
    d.handle_many([_msg("m", predictions=P, ids=np.arange(2))])
    image = persist.capture(d.state)
    scalars, arrays = image.components["joins"]
    damaged = {**arrays, "0.stamps": np.zeros_like(arrays["0.stamps"])}  # a waiting row with stamp 0
    fresh = _daemon()
    with pytest.raises(SnapshotError, match="stamp 0"):
        persist.restore(fresh.state, persist.Image(**{**image.__dict__, "components": {"joins": (scalars, damaged)}}))
    assert not fresh.state.models and fresh.state.counters.messages == 0 and ("m", "B1") not in fresh.state.recent
    overflowing = {**scalars, "pools": [{**scalars["pools"][0], "columns": float("inf")}]}
    with pytest.raises(SnapshotError, match="OverflowError"):
        persist.restore(
            fresh.state, persist.Image(**{**image.__dict__, "components": {"joins": (overflowing, arrays)}})
        )


@pytest.mark.parametrize("spoil", [None, "out_of_range", "other_dtype"])
def test_a_run_of_index_labels_checked_together_equals_each_checked_alone(spoil: str | None) -> None:
    # Runs of class-index labels are checked in one pass; any message that does not fit sends the
    # whole run through the message-by-message check. Both must give the same totals and counts.
    rng = np.random.default_rng(8)
    z, y = rng.normal(0, 2, (40, 5)), rng.integers(0, 5, 40)
    d = _daemon()
    d.handle_many([_msg("r", predictions=z, ids=np.arange(40), input="logits")])
    drain = [
        _msg("r", targets=y[k : k + 8], ids=np.arange(k, k + 8), producer="q", seq=k // 8) for k in range(0, 40, 8)
    ]
    drain.insert(2, drain[1])  # the same message again, without a batch_id: its ids no longer wait
    if spoil == "out_of_range":
        drain.append(_msg("r", targets=np.array([5]), ids=np.array([0]), producer="q", seq=5))
    elif spoil == "other_dtype":
        drain.append(_msg("r", targets=np.array([0], np.int32), ids=np.array([999]), producer="q", seq=5))
    d.handle_many(drain)
    assert _joins(d, "r") == {"matched": 40, "unmatched": 8 + (spoil == "other_dtype")}
    assert _rejected(d) == ({"target_out_of_range": 1} if spoil == "out_of_range" else {})
    m = next(m for m in d.state.snapshot().models if m.name == "r")
    assert m.samples == 40
    assert m.loss_weighted_sum == pytest.approx(-naive.log_softmax(z)[np.arange(40), y].sum(), rel=1e-6)
    assert d.state.counters.messages == 1 + len(drain)


def test_a_scrape_never_sees_labels_matched_before_their_pairs_are_scored() -> None:
    # A scrape runs on another thread; one taken while the joined pairs are being scored (here:
    # from inside the scoring call) must show neither the matches nor the samples yet.
    d = _daemon()
    d.handle_many([_msg("s", predictions=P, ids=np.arange(2))])
    backend = d.pipeline.backend
    seen: list[tuple[int, float]] = []

    class Scraping:
        name = "scraping"

        def score(self, batch: object, params: object) -> object:
            m = next(m for m in d.state.snapshot().models if m.name == "s")
            seen.append((m.joins.outcomes["matched"] if m.joins else 0, m.samples))
            return backend.score(batch, params)  # type: ignore[union-attr, arg-type]

    d.pipeline.backend = Scraping()  # type: ignore[assignment]
    d.handle_many([_msg("s", targets=np.array([0, 1]), ids=np.arange(2))])
    assert seen == [(0, 0.0)]
    assert _joins(d, "s") == {"matched": 2}


_NAMES = ("predictions", "targets", "weights", "ids")


@st.composite
def _join_like(draw: st.DrawFn) -> list[bytes]:
    """Messages around the join kinds: any subset of the four tensors, any datatype, shapes that
    fit or nearly fit, values that may be out of range; a few models, some ids repeated."""
    n = draw(st.integers(0, 4))
    c = draw(st.sampled_from([0, 2, 3]))
    tensors, frames = [], []
    for name in draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4, unique=True)):
        datatype = draw(st.sampled_from(sorted(wire.DATATYPES)))
        shape = draw(st.sampled_from([[n], [n, c or 2], [n + 1], []]))
        count = int(np.prod(shape)) if shape else 1
        itemsize = wire.DATATYPES[datatype].itemsize
        raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
        if datatype.startswith(("FP", "BF")) and draw(st.booleans()):
            raw = np.full(count, 0.25, wire.DATATYPES[datatype] if datatype != "BF16" else "<f4").tobytes()
            raw = raw if datatype != "BF16" else np.frombuffer(raw, "<u2")[1::2].tobytes()
        if name == "ids" and draw(st.booleans()):
            raw = np.arange(count, dtype="<i8").tobytes()[: count * itemsize]
        tensors.append({"name": name, "datatype": datatype, "shape": shape})
        frames.append(raw)
    header: dict[str, object] = {"v": 1, "model": draw(st.sampled_from(["j1", "j2"])), "tensors": tensors}
    kind = draw(st.sampled_from(["probs", "logits", None]))
    if kind is not None:
        header["input"] = kind
    if draw(st.booleans()):
        header["batch_id"] = draw(st.sampled_from(["a", "b"]))
    return [json.dumps(header).encode(), *frames]


@settings(max_examples=150, deadline=None)
@given(st.lists(_join_like(), min_size=1, max_size=12))
def test_any_mix_of_join_like_messages_is_accounted_for_and_never_an_internal_error(msgs: list[list[bytes]]) -> None:
    d = _daemon()
    seed = [_msg(m, predictions=np.full((4, 3), 1 / 3), ids=np.arange(4)) for m in ("j1", "j2")]
    d.handle_many([*seed, *msgs])
    assert d.state.counters.messages == len(msgs) + 2
    assert d.state.rejected["internal_error"] == 0
    for model in d.state.snapshot().models:
        if model.joins is not None:
            assert model.joins.pending <= 8 + 4 * len(msgs)
            assert all(v >= 0 for v in model.joins.outcomes.values())
