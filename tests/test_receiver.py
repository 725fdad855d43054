"""The receive thread: every message handed over once, in order, with back-pressure kept."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from xentd.receiver import Receiver


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10)
        sock.setsockopt(zmq.RCVHWM, 10)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    yield push, pull
    push.close(0)
    pull.close(0)
    ctx.term()


def _numbers(drain: list[list[Any]]) -> list[int]:
    return [int(bytes(frames[0])) for frames in drain]


def _take_all(receiver: Receiver, count: int, deadline: float = 30.0) -> list[int]:
    got: list[int] = []
    end = time.monotonic() + deadline
    while len(got) < count and time.monotonic() < end:
        drain = receiver.take(timeout=0.1)
        assert len(drain) <= receiver.drain_max
        got += _numbers(drain)
    return got


def test_every_message_once_in_order(pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    push, pull = pair
    receiver = Receiver(pull, drain_max=16, depth=2)
    receiver.start()
    for i in range(2000):
        push.send_multipart([str(i).encode(), b"x" * (i % 7)])
    assert _take_all(receiver, 2000) == list(range(2000))
    receiver.stop()
    while not receiver.finished:
        assert receiver.take(timeout=0.05) == []
    assert receiver.error is None


def test_a_consumer_that_stops_taking_pushes_back_and_nothing_is_lost(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    push, pull = pair
    receiver = Receiver(pull, drain_max=4, depth=2)
    receiver.start()
    sent = 0
    payload = b"x" * (1 << 16)  # large enough that the TCP buffers between the sockets fill quickly
    end = time.monotonic() + 30.0
    # Nobody takes: the hand-off fills, then ZeroMQ's queues, then the producer is refused.
    while time.monotonic() < end:
        try:
            push.send_multipart([str(sent).encode(), payload], zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.2)  # let the receive thread fill what it can, then try once more
            try:
                push.send_multipart([str(sent).encode(), payload], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                break
    assert time.monotonic() < end, "the producer was never pushed back"
    assert receiver._queue.qsize() <= 2  # bounded: at most depth drains wait in Python
    assert _take_all(receiver, sent) == list(range(sent))


def test_stop_hands_over_what_was_read(pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    push, pull = pair
    receiver = Receiver(pull, drain_max=3, depth=2)
    receiver.start()
    for i in range(15):
        push.send_multipart([str(i).encode()])
    end = time.monotonic() + 30.0
    while receiver._queue.qsize() < 2 and time.monotonic() < end:
        time.sleep(0.01)
    receiver.stop()
    got: list[int] = []
    while not receiver.finished:
        got += _numbers(receiver.take(timeout=0.05))
    # The socket is the owner's again: what the thread did not read is still in it, in order.
    while pull.poll(200):
        got += _numbers([pull.recv_multipart()])
    assert got == list(range(15))
