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
