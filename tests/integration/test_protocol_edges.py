"""Protocol edge cases against the real daemon: raw frames over a PUSH socket, results read from /metrics.

One daemon serves the whole module. Every test uses its own model names and
reads counters as differences, so the tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from tests.integration.harness import DaemonProcess
from xentd import wire

Frames = list[bytes]

CONFIG = """
[limits]
max_models = 100
[log]
rejection_interval = "1ms"
"""


@pytest.fixture(scope="module")
def xentd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("protocol-edges"), CONFIG)
    yield d
    assert d.stop() == 0, d.log


@pytest.fixture(scope="module")
def push(xentd: DaemonProcess) -> Iterator[zmq.Socket[bytes]]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDTIMEO, 30_000)
    sock.connect(xentd.ingest)
    yield sock
    sock.close()
    ctx.term()


class Wire:
    """Sends messages and waits until the daemon has taken every one off its socket."""

    def __init__(self, d: DaemonProcess, sock: zmq.Socket[bytes]) -> None:
        self.d, self.sock = d, sock

    def send(self, *messages: Frames) -> None:
        before = self.d.value("xentd_messages_received_total") or 0.0
        for frames in messages:
            self.sock.send_multipart(frames)
        self.d.wait_for("xentd_messages_received_total", before + len(messages))

    def rejected(self, reason: str) -> float:
        return self.d.value("xentd_rejected_batches_total", reason=reason) or 0.0

    def counter(self, name: str, **labels: str) -> float:
        return self.d.value(name, **labels) or 0.0

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.d.log:
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.d.log[-3000:]}"
            time.sleep(0.05)


@pytest.fixture
def net(xentd: DaemonProcess, push: zmq.Socket[bytes]) -> Wire:
    return Wire(xentd, push)


def batch(model: str, n: int = 3, classes: int = 2, **kw: Any) -> Frames:
    p = np.full((n, classes), 1.0 / classes)
    return [bytes(f) for f in wire.encode(model, p, np.zeros(n, np.int64), **kw)]


def edit(frames: Frames, change: Any) -> Frames:
    """The message with its header changed by ``change(header_dict)``."""
    header = json.loads(frames[0])
    change(header)
    return [json.dumps(header).encode(), *frames[1:]]


def raw_header(frames: Frames, text: str) -> Frames:
    return [text.encode(), *frames[1:]]


def expect(net: Wire, messages: list[Frames], **reasons: int) -> None:
    """Send, then check that each named reason grew by exactly its count."""
    before = {r: net.rejected(r) for r in reasons}
    net.send(*messages)
    assert {r: net.rejected(r) - before[r] for r in reasons} == reasons, net.d.log[-3000:]


# 1, 7: typed decoding with the field path, strict integers --------------------------


def test_header_errors_keep_their_reasons_and_name_the_field(net: Wire) -> None:
    good = batch("edge-typed")

    def fractional_dim(h: dict[str, Any]) -> None:
        h["tensors"][0]["shape"] = [3, 2.0]

    def lowercase_datatype(h: dict[str, Any]) -> None:
        h["tensors"][0]["datatype"] = "fp64"

    expect(
        net,
        [
            edit(good, fractional_dim),
            edit(good, lowercase_datatype),
            edit(good, lambda h: h.update(model=7)),
            edit(good, lambda h: h.update(producer="p", seq=3.0)),
            good,
        ],
        bad_shape=1,
        unknown_datatype=1,
        bad_header=2,
    )
    # The log names the field (one line per reason per millisecond, so the first of each).
    net.wait_log("at `$.tensors[0].shape[1]`")
    net.wait_log("at `$.model`")
    assert net.counter("xentd_batches_total", model="edge-typed") == 1


# 3: the version -------------------------------------------------------------------


def test_a_missing_version_is_a_bad_header_and_a_wrong_one_unsupported(net: Wire) -> None:
    good = batch("edge-version")

    def drop_v(h: dict[str, Any]) -> None:
        del h["v"]

    expect(
        net,
        [edit(good, drop_v), edit(good, lambda h: h.update(v=2)), edit(good, lambda h: h.update(v=1.0))],
        bad_header=1,
        unsupported_version=2,
    )


# 2: a message refused while decoding still records its seq --------------------------


def test_a_refused_message_is_not_a_sequence_gap(net: Wire) -> None:
    def unknown_datatype(h: dict[str, Any]) -> None:
        h["tensors"][0]["datatype"] = "FP8"

    gaps = net.counter("xentd_sequence_gaps_total")
    net.send(
        batch("edge-seq", producer="edge-p1", seq=0),
        edit(batch("edge-seq", producer="edge-p1", seq=1), unknown_datatype),
        edit(batch("edge-seq", producer="edge-p1", seq=2), lambda h: h.update(ts=-5)),
        batch("edge-seq", producer="edge-p1", seq=3),
    )
    assert net.counter("xentd_sequence_gaps_total") == gaps
    net.send(batch("edge-seq", producer="edge-p1", seq=6))  # 4 and 5 never left: those are gaps
    assert net.counter("xentd_sequence_gaps_total") == gaps + 2


# 4: empty batches -----------------------------------------------------------------


def test_an_empty_batch_is_counted_and_fixes_no_class_count(net: Wire) -> None:
    empty = batch("edge-empty", n=0, classes=5)
    before = net.counter("xentd_empty_batches_total")
    expect(net, [empty], class_count_changed=0, shape_mismatch=0)
    assert net.counter("xentd_empty_batches_total") == before + 1
    assert net.d.value("xentd_batches_total", model="edge-empty") is None  # no model state
    expect(net, [batch("edge-empty", n=3, classes=2), empty], class_count_changed=0)
    assert net.counter("xentd_batches_total", model="edge-empty") == 1
    assert net.counter("xentd_samples_total", model="edge-empty") == 3
    samples = net.d.samples()
    classes = {
        dict(k)["class"]
        for (name, k) in samples
        if name.startswith("xentd_class_cross_entropy_nats") and dict(k).get("model") == "edge-empty"
    }
    assert classes == {"0", "1"}
    expect(net, [batch("edge-empty", n=3, classes=5)], class_count_changed=1)  # a non-empty one is checked


# 5: batch_id "" ---------------------------------------------------------------------


def test_an_empty_batch_id_is_no_batch_id(net: Wire) -> None:
    no_id = edit(batch("edge-noid"), lambda h: h.update(batch_id=""))
    duplicates = net.counter("xentd_duplicate_batches_total")
    net.send(no_id, no_id, no_id)
    assert net.counter("xentd_batches_total", model="edge-noid") == 3
    assert net.counter("xentd_duplicate_batches_total") == duplicates
    net.send(batch("edge-noid", batch_id="x"), batch("edge-noid", batch_id="x"))  # a real id still dedups
    assert net.counter("xentd_duplicate_batches_total") == duplicates + 1


# 6: unnormalized targets ------------------------------------------------------------


def test_target_rows_that_are_not_a_distribution_are_scored_and_counted(net: Wire) -> None:
    p = np.full((4, 3), 1 / 3)
    soft = np.array([[0.2, 0.3, 0.5], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1]], np.float32)
    multi_hot = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]], np.uint8)
    expect(
        net,
        [
            [bytes(f) for f in wire.encode("edge-soft", p, soft)],
            [bytes(f) for f in wire.encode("edge-soft", p, multi_hot)],
        ],
        target_out_of_range=0,
    )
    assert net.counter("xentd_batches_total", model="edge-soft") == 2
    assert net.counter("xentd_samples_total", model="edge-soft") == 8
    assert net.counter("xentd_unnormalized_targets_total", model="edge-soft") == 3 + 1


# 8: repeated keys ---------------------------------------------------------------------


def test_a_repeated_key_is_a_bad_header(net: Wire) -> None:
    good = batch("edge-dup")
    text = good[0].decode()
    twice_v = text.replace('{"v":1,', '{"v":1,"v":1,', 1)
    twice_model = text.replace('"model":"edge-dup"', '"model":"other","model":"edge-dup"', 1)
    twice_in_spec = text.replace('"shape":[3,2]}', '"shape":[3,2],"shape":[3,2]}', 1)
    assert len({twice_v, twice_model, twice_in_spec, text}) == 4
    with_colons = text.replace('"model":"edge-dup"', '"model":"edge-dup","note":{"v":2,"at":"12:00"}', 1)
    expect(
        net,
        [raw_header(good, twice_v), raw_header(good, twice_model), raw_header(good, twice_in_spec)],
        bad_header=3,
    )
    expect(net, [raw_header(good, with_colons)], bad_header=0)
    assert net.counter("xentd_batches_total", model="edge-dup") == 1
    net.wait_log("repeats the key")


# 9: ts ---------------------------------------------------------------------------------


def test_ts_must_be_unix_seconds(net: Wire) -> None:
    good = batch("edge-ts")
    expect(
        net,
        [edit(good, lambda h: h.update(ts=-5)), edit(good, lambda h: h.update(ts=1e308))]
        + [edit(good, lambda h: h.update(ts=1.7e12)), raw_header(good, good[0].decode()[:-1] + ',"ts":NaN}')],
        bad_header=4,
    )
    assert net.d.value("xentd_last_event_timestamp_seconds", model="edge-ts") is None
    net.send(edit(good, lambda h: h.update(ts=1.7e9)))
    assert net.counter("xentd_last_event_timestamp_seconds", model="edge-ts") == 1.7e9


# 10: per-model rejections -------------------------------------------------------------


def test_rejections_are_labelled_only_for_models_with_state(net: Wire) -> None:
    def unknown_datatype(h: dict[str, Any]) -> None:
        h["tensors"][0]["datatype"] = "FP8"

    net.send(batch("edge-known"))
    expect(
        net,
        [
            edit(batch("edge-known"), unknown_datatype),  # decode error, known model: labelled
            [bytes(f) for f in wire.encode("edge-known", np.full((1, 2), 0.5), [7])],  # validation error
            edit(batch("edge-unknown"), unknown_datatype),  # no state: unlabelled only
            edit(batch("edge-known"), lambda h: h.update(model="edge known")),  # malformed name
        ],
        unknown_datatype=2,
        target_out_of_range=1,
        bad_model_name=1,
    )
    labelled = {
        (dict(k)["model"], dict(k)["reason"]): v
        for (name, k), v in net.d.samples().items()
        if name == "xentd_model_rejected_batches_total"
    }
    assert labelled.get(("edge-known", "unknown_datatype")) == 1
    assert labelled.get(("edge-known", "target_out_of_range")) == 1
    assert not [m for m, _ in labelled if m in ("edge-unknown", "edge known")]
    assert net.d.value("xentd_batches_total", model="edge-unknown") is None


def test_the_daemon_survives_all_of_it(net: Wire) -> None:
    status, body = net.d.get("/healthz")
    assert status == 200, body
    assert net.d.proc.poll() is None
