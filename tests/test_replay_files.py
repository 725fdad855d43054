"""Dataset files with ids (`xentd send`, `xentd replay`): which kind of message each sends, and clear errors."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from xentd import replay, wire
from xentd.client import Publisher
from xentd.errors import XentdError

P = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
Y = np.array([1, 0, 1])
IDS = np.array([2**63 + 5, 1, 2], dtype=np.uint64)


def _npz(tmp_path: Path, **arrays: Any) -> Path:
    path = tmp_path / "day1.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, kind, rows_named",
    [
        ({"predictions": P, "targets": Y}, "full", "samples"),
        ({"predictions": P, "targets": Y, "ids": IDS}, "full", "samples"),  # ids then not sent
        ({"predictions": P, "ids": IDS}, "predictions", "predictions (predictions-only)"),
        ({"predictions": P, "ids": IDS, "weights": np.ones(3)}, "predictions", "predictions (predictions-only)"),
        ({"targets": Y, "ids": IDS.view(np.int64)}, "labels", "labels (labels-only)"),
    ],
)
def test_the_arrays_in_a_file_decide_its_kind(
    tmp_path: Path, arrays: dict[str, Any], kind: str, rows_named: str
) -> None:
    ds = replay.load(_npz(tmp_path, **arrays))
    assert (ds.kind, len(ds), ds.rows_named) == (kind, 3, rows_named)
    assert ds.batch_id("day1", slice(0, 2)) == ("day1:0-2" if kind == "full" else f"day1:{kind}:0-2")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"weights": np.ones(3)}, "missing array\\(s\\) predictions, targets; it has weights"),
        ({"ids": IDS}, "missing array\\(s\\) predictions, targets; it has ids"),
        ({"predictions": P}, "has predictions but no targets; add targets to score it at once, or 'ids' to send"),
        ({"targets": Y, "weights": np.ones(3)}, "has targets but no predictions; add predictions"),
        (
            {"targets": Y, "ids": IDS, "weights": np.ones(3)},
            "a labels-only file \\(ids and targets\\) cannot carry weights",
        ),
        ({"predictions": P, "ids": IDS.astype(np.float64)}, "'ids' must be int64 or uint64 of shape \\[N\\]"),
        ({"predictions": P, "ids": IDS.astype(np.int32)}, "it is int32 of shape \\[3\\]"),
        ({"predictions": P, "ids": IDS.reshape(3, 1)}, "of shape \\[3, 1\\]"),
        ({"predictions": P, "ids": IDS[:2]}, "same number of rows; it has predictions 3, ids 2"),
        ({"predictions": P, "targets": Y, "ids": IDS[:1]}, "it has predictions 3, targets 3, ids 1"),
        ({"targets": np.array(1), "ids": np.array([5])}, "targets is a scalar; every array has one row per sample"),
        ({"predictions": np.array(0.5), "targets": np.array(1)}, "predictions, targets are scalars"),
    ],
)
def test_an_inconsistent_file_is_a_clear_error(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    with pytest.raises(XentdError, match=message):
        replay.load(_npz(tmp_path, **arrays))


@pytest.fixture
def pull() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    yield sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
    ctx.destroy(linger=0)


def _replayed(path: Path, pull: tuple[zmq.Socket[bytes], str], count: int) -> list[wire.Message]:
    sock, address = pull
    out = io.StringIO()
    assert replay.run(path, to=address, model="m", input="logits", batch_size=2, rate=0, pub=False, out=out) == 0
    got = []
    for _ in range(count):
        assert sock.poll(10_000)
        got.append(wire.decode(sock.recv_multipart(), max_message_bytes=1 << 20, max_header_bytes=1 << 16))
    assert not sock.poll(100)
    return got


def test_replay_sends_a_predictions_file_predictions_only(tmp_path: Path, pull: tuple[zmq.Socket[bytes], str]) -> None:
    path = _npz(tmp_path, predictions=P, ids=IDS, weights=np.array([1.0, 2.0, 3.0]))
    got = _replayed(path, pull, 2)
    assert [m.batch_id for m in got] == ["day1:predictions:0-2", "day1:predictions:2-3"]
    assert all(set(m.tensors) == {"predictions", "weights", "ids"} and m.input == "logits" for m in got)
    ids = [int(i) for m in got for i in m.tensors["ids"].array]
    assert ids == [int(i) for i in IDS] and got[0].tensors["ids"].datatype == "UINT64"
    assert np.array_equal(np.concatenate([m.tensors["predictions"].array for m in got]), P)
    assert [float(w) for m in got for w in m.tensors["weights"].array] == [1.0, 2.0, 3.0]


def test_replay_sends_a_labels_file_labels_only(tmp_path: Path, pull: tuple[zmq.Socket[bytes], str]) -> None:
    got = _replayed(_npz(tmp_path, targets=Y, ids=np.array([-3, 4, 5])), pull, 2)
    assert [m.batch_id for m in got] == ["day1:labels:0-2", "day1:labels:2-3"]
    assert all(set(m.tensors) == {"targets", "ids"} for m in got)
    assert [int(i) for m in got for i in m.tensors["ids"].array] == [-3, 4, 5]
    assert [int(t) for m in got for t in m.tensors["targets"].array] == Y.tolist()


def test_a_file_with_predictions_targets_and_ids_is_scored_at_once(
    tmp_path: Path, pull: tuple[zmq.Socket[bytes], str]
) -> None:
    got = _replayed(_npz(tmp_path, predictions=P, targets=Y, ids=IDS), pull, 2)
    assert [m.batch_id for m in got] == ["day1:0-2", "day1:2-3"]
    assert all(set(m.tensors) == {"predictions", "targets"} for m in got)  # the daemon would ignore the ids


def test_send_refuses_a_round_robin_join() -> None:
    ds = replay.Dataset(predictions=None, targets=Y, weights=None, ids=IDS)
    with Publisher(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], linger_ms=0) as pub:
        with pytest.raises(ValueError, match="several PUSH addresses"):
            ds.send(pub, "m", slice(None), input="probs", batch_id=None)
