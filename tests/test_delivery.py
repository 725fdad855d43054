"""Retried batches are scored once; lost messages are counted from producers' sequence numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xentd import wire
from xentd.config import Config, IngestConfig
from xentd.daemon import Daemon
from xentd.delivery import RecentBatches, SequenceTracker
from xentd.errors import DecodeError, Reason


def _msg(
    model: str = "m", batch_id: str | None = None, seq: int | None = None, n: int = 3, producer: str = "p1"
) -> list[bytes]:
    p = np.full((n, 2), 0.5)
    frames = wire.encode(
        model, p, np.zeros(n, np.int64), batch_id=batch_id, producer=producer if seq is not None else None, seq=seq
    )
    return [bytes(f) for f in frames]


def _daemon(dedup_window: int = 100) -> Daemon:
    d = Daemon(Config(ingest=IngestConfig(dedup_window=dedup_window)))
    d._init_backend()
    return d


def test_recent_batches_forget_the_oldest() -> None:
    r = RecentBatches(2)
    for key in [("m", "a"), ("m", "b"), ("m", "c")]:
        r.add(key)
    assert ("m", "a") not in r and ("m", "b") in r and ("m", "c") in r
    assert r.items() == [("m", "b"), ("m", "c")]
    off = RecentBatches(0)
    off.add(("m", "a"))
    assert len(off) == 0


def test_a_retried_batch_is_scored_once() -> None:
    d = _daemon()
    d.handle_many([_msg(batch_id="b1"), _msg(batch_id="b1"), _msg(batch_id="b2")])  # one drain
    d.handle(_msg(batch_id="b1"))  # a later drain
    d.handle(_msg(model="other", batch_id="b1"))  # ids are per model
    snap = d.state.snapshot()
    counts = {m.name: (m.batches, m.samples) for m in snap.models}
    assert counts == {"m": (2, 6.0), "other": (1, 3.0)}
    assert snap.counters.duplicate_batches == 2
    assert snap.counters.messages == 5


def test_a_rejected_batch_can_be_retried_under_its_id() -> None:
    d = _daemon()
    bad = wire.encode("m", np.full((2, 2), 0.5), np.array([0, 5]), batch_id="b1")
    d.handle([bytes(f) for f in bad])
    d.handle(_msg(batch_id="b1"))
    (m,) = d.state.snapshot().models
    assert m.batches == 1 and d.state.counters.duplicate_batches == 0


def test_dedup_window_bounds_memory_and_zero_turns_it_off() -> None:
    d = _daemon(dedup_window=2)
    for i in range(5):
        d.handle(_msg(batch_id=f"b{i}"))
    assert len(d.state.recent) == 2
    d.handle(_msg(batch_id="b0"))  # forgotten: scored again
    assert d.state.counters.duplicate_batches == 0
    off = _daemon(dedup_window=0)
    off.handle(_msg(batch_id="x"))
    off.handle(_msg(batch_id="x"))
    assert off.state.snapshot().models[0].batches == 2


def test_sequence_tracker_counts_gaps_not_restarts() -> None:
    t = SequenceTracker(capacity=2)
    assert [t.observe("a", s) for s in (0, 1, 2, 5, 6)] == [0, 0, 0, 2, 0]
    assert t.observe("a", 0) == 0 and t.resets == 1  # the producer restarted
    assert t.observe("a", 1) == 0
    t.observe("b", 10)
    t.observe("c", 0)  # "a" is the least recently seen: forgotten
    assert len(t) == 2 and t.observe("a", 50) == 0
    assert t.gaps == 2


def test_sequence_gaps_through_the_daemon() -> None:
    d = _daemon()
    refused = wire.encode("m", np.full((1, 2), 0.5), np.array([7]), producer="p1", seq=2)
    d.handle_many(
        [_msg(seq=0), _msg(seq=1), [bytes(f) for f in refused], _msg(seq=3), _msg(seq=9), _msg(seq=10, producer="p2")]
    )
    # seq 2 arrived (and was refused for its label): not a gap. 4..8 never arrived.
    assert d.state.counters.sequence_gaps == 5
    assert d.state.snapshot().counters.sequence_gaps == 5


def test_producer_and_seq_are_checked_on_the_wire() -> None:
    header = {
        "v": 1,
        "model": "m",
        "input": "probs",
        "tensors": [
            {"name": "predictions", "datatype": "FP64", "shape": [1, 2]},
            {"name": "targets", "datatype": "INT64", "shape": [1]},
        ],
    }
    data = [np.full(2, 0.5).tobytes(), np.zeros(1, np.int64).tobytes()]
    for extra in (
        {"seq": 1},
        {"producer": "p"},
        {"producer": "p", "seq": -1},
        {"producer": "a b", "seq": 1},
        {"producer": "p", "seq": True},
        {"producer": "p", "seq": 2**63},
    ):
        with pytest.raises(DecodeError) as info:
            wire.decode(
                [json.dumps({**header, **extra}).encode(), *data], max_message_bytes=1 << 20, max_header_bytes=1 << 16
            )
        assert info.value.reason is Reason.BAD_HEADER
    msg = wire.decode(
        [json.dumps({**header, "producer": "p", "seq": 4}).encode(), *data],
        max_message_bytes=1 << 20,
        max_header_bytes=1 << 16,
    )
    assert (msg.producer, msg.seq) == ("p", 4)


def _raw(header: dict, *data: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *data]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda h: h["tensors"][0].update(datatype="FP8"),  # unknown_datatype
        lambda h: h["tensors"][0].update(shape=[3, -2]),  # bad_shape
        lambda h: h["tensors"][0].update(shape=[4, 2]),  # size_mismatch
        lambda h: h.update(ts=-5),  # bad_header
    ],
)
def test_a_message_refused_while_decoding_still_records_its_seq(spoil: object) -> None:
    d = _daemon()
    header = json.loads(_msg(seq=1)[0])
    spoil(header)  # type: ignore[operator]
    refused = [json.dumps(header).encode(), *_msg(seq=1)[1:]]
    d.handle_many([_msg(seq=0), refused, _msg(seq=2)])
    assert d.state.counters.sequence_gaps == 0
    assert sum(d.state.rejected.values()) == 1
    d.handle(_msg(seq=5))  # 3 and 4 never arrived
    assert d.state.counters.sequence_gaps == 2


def test_an_empty_batch_is_counted_and_otherwise_ignored() -> None:
    d = _daemon()
    empty = [bytes(f) for f in wire.encode("m", np.zeros((0, 5)), np.zeros(0, np.int64), batch_id="e")]
    d.handle_many([empty, empty])
    assert not d.state.models and d.state.counters.messages == 2
    assert d.state.counters.duplicate_batches == 0 and not any(d.state.rejected.values())
    d.handle(_msg())  # [3, 2]: the empty [0, 5] batch fixed nothing
    (m,) = d.state.snapshot().models
    assert (m.name, m.class_labels, m.batches) == ("m", ("0", "1"), 1)
    d.handle(empty)  # nor is it checked against the model's classes
    assert d.state.counters.messages == 4 and not any(d.state.rejected.values())
    assert d.state.snapshot().models[0].batches == 1
    bad_empty = wire.encode("m", np.zeros((0, 5)), np.zeros((0, 4)))  # still validated
    d.handle([bytes(f) for f in bad_empty])
    assert d.state.rejected[Reason.SHAPE_MISMATCH.value] == 1


def test_an_empty_batch_id_is_no_batch_id() -> None:
    d = _daemon()
    header = json.loads(_msg()[0])
    header["batch_id"] = ""
    d.handle_many([_raw(header, *_msg()[1:]), _raw(header, *_msg()[1:])])
    d.handle(_raw(header, *_msg()[1:]))
    (m,) = d.state.snapshot().models
    assert m.batches == 3 and d.state.counters.duplicate_batches == 0 and len(d.state.recent) == 0


def test_unnormalized_targets_are_counted_per_model_at_fold_time() -> None:
    d = _daemon()
    soft = np.array([[0.5, 0.6], [0.5, 0.5], [1.0, 1.0]])
    batch = [bytes(f) for f in wire.encode("m", np.full((3, 2), 0.5), soft)]
    multi_hot = [bytes(f) for f in wire.encode("m", np.full((2, 2), 0.5), np.ones((2, 2), np.uint8))]
    d.handle_many([batch, batch, multi_hot])  # grouped: the counts add up
    d.handle(batch)
    (m,) = d.state.snapshot().models
    assert m.unnormalized_targets == 2 * 3 + 2 and m.batches == 4 and m.samples == 11


def test_rejections_are_counted_per_model_only_for_well_formed_known_names() -> None:
    d = _daemon()
    d.handle(_msg(model="m"))
    header = json.loads(_msg()[0])
    header["tensors"][0]["datatype"] = "FP8"
    d.handle(_raw(header, *_msg()[1:]))  # decode error for a known model: labelled
    d.handle([bytes(f) for f in wire.encode("m", np.full((1, 2), 0.5), np.array([5]))])  # validation error
    header["model"] = "other"
    d.handle(_raw(header, *_msg()[1:]))  # no state: unlabelled only
    header["model"] = "m\n"
    header["tensors"][0]["datatype"] = "FP64"
    d.handle(_raw(header, *_msg()[1:]))  # bad_model_name: unlabelled, and creates nothing
    header["model"] = "m"
    header["v"] = 2
    d.handle(_raw(header, *_msg()[1:]))  # another version: its fields mean nothing yet
    (m,) = d.state.snapshot().models
    assert m.rejected == {"unknown_datatype": 1, "target_out_of_range": 1}
    assert d.state.rejected["unknown_datatype"] == 2 and d.state.rejected["bad_model_name"] == 1
    assert d.state.rejected["unsupported_version"] == 1
