"""Publishing batches to xentd from Python.

    from xentd.client import Publisher

    with Publisher("tcp://127.0.0.1:5557") as pub:
        pub.send("fraud-v3", probs, labels)

The publisher encodes with :mod:`xentd.wire`, the same codec the daemon decodes
with, so the two cannot disagree. It never blocks forever: a full send queue
raises ``zmq.Again`` after ``send_timeout_ms``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal

import zmq

from xentd import wire


class Publisher:
    """A PUSH (default) or PUB socket that sends protocol v1 batches.

    ``socket="push"`` connects to a daemon's PULL socket. ``socket="pub"`` binds
    (by default) a PUB socket that daemons in SUB mode connect to; each message
    then starts with a topic frame holding the model name.
    """

    def __init__(
        self,
        address: str,
        *,
        socket: Literal["push", "pub"] = "push",
        bind: bool | None = None,
        send_timeout_ms: int = 10_000,
        linger_ms: int = 10_000,
        send_hwm: int = 1000,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if socket not in ("push", "pub"):
            raise ValueError(f"socket must be 'push' or 'pub', got {socket!r}")
        self._topic = socket == "pub"
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB if self._topic else zmq.PUSH)
        self._socket.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        self._socket.setsockopt(zmq.SNDHWM, send_hwm)
        if bind if bind is not None else self._topic:
            self._socket.bind(address)
        else:
            self._socket.connect(address)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or address

    def send(
        self,
        model: str,
        predictions: Any,
        targets: Any,
        *,
        input: str = "probs",
        weights: Any = None,
        batch_id: str | None = None,
        ts: float | None = None,
    ) -> None:
        """Send one batch. Arrays may be any supported dtype (see docs/protocol.md)."""
        frames = wire.encode(model, predictions, targets, input=input, weights=weights,
                             batch_id=batch_id, ts=ts)
        if self._topic:
            frames.insert(0, model.encode("utf-8"))
        self._socket.send_multipart(frames, copy=False)

    def close(self) -> None:
        """Close the socket; queued messages are flushed for up to ``linger_ms``."""
        self._socket.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
