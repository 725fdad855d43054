"""Publishing batches to xentd from Python.

    from xentd.client import Publisher

    with Publisher("tcp://127.0.0.1:5557") as pub:
        pub.send("fraud-v3", probs, labels)

The publisher encodes with :mod:`xentd.wire`, the same codec the daemon decodes
with, so the two cannot disagree. It never blocks forever: a full send queue
raises ``zmq.Again`` after ``send_timeout_ms``, and :meth:`Publisher.close`
waits at most ``linger_ms`` for queued messages to leave.

Every message carries the publisher's ``producer`` id and a ``seq`` number, so
xentd counts messages lost on the way (``xentd_sequence_gaps_total``). With
``resend=N`` the publisher is at-least-once: it keeps its last N batches and
sends them again whenever its connection to the daemon is re-established
(after a daemon restart, say); xentd drops the copies it already scored by
``batch_id`` (see docs/reliability.md).
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from xentd import wire
from xentd.errors import XentdError


def open_publisher(address: str, **kwargs: Any) -> Publisher:
    """A :class:`Publisher`, with a bad address or key turned into a :class:`XentdError` (for the CLI)."""
    try:
        return Publisher(address, **kwargs)
    except (zmq.ZMQError, ValueError, OSError) as exc:
        raise XentdError(f"cannot publish to {address}: {exc}") from None


class Publisher:
    """A PUSH (default) or PUB socket that sends protocol v1 batches.

    ``socket="push"`` connects to a daemon's PULL socket, or to several (a
    list of addresses), which then get the batches round-robin. ``socket="pub"`` binds
    (by default) a PUB socket that daemons in SUB mode connect to; each message
    then starts with a topic frame holding the model name.

    For a daemon with CURVE authentication, pass its public key
    (``curve_server_key``: the z85 text, or the path of its ``.key`` file) and
    this client's secret key file (``curve_secret_key``, a ``.key_secret``
    written by ``xentd keygen``, whose ``.key`` the daemon lists as authorized).
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        socket: Literal["push", "pub"] = "push",
        bind: bool | None = None,
        send_timeout_ms: int = 10_000,
        linger_ms: int = 10_000,
        send_hwm: int = 1000,
        resend: int = 0,
        producer: str | None = None,
        curve_server_key: str | bytes | None = None,
        curve_secret_key: str | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if socket not in ("push", "pub"):
            raise ValueError(f"socket must be 'push' or 'pub', got {socket!r}")
        if resend < 0:
            raise ValueError(f"resend must be >= 0, got {resend}")
        self._topic = socket == "pub"
        # An own context by default, terminated on close: that is what makes close()
        # wait for queued messages. A shared Context.instance() is never terminated,
        # so a process that exits right after close() would drop what is queued.
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.PUB if self._topic else zmq.PUSH)
        self.producer = producer or f"py-{uuid.uuid4().hex[:16]}"
        self._seq = 0
        self._resend: collections.deque[list[bytes | memoryview]] = collections.deque(maxlen=resend or None)
        self._resend_enabled = resend > 0
        self._monitor: zmq.Socket[Any] | None = None
        self._disconnected = False
        self.resent = 0
        addresses = [address] if isinstance(address, str) else list(address)
        try:
            self._socket.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
            self._socket.setsockopt(zmq.LINGER, linger_ms)
            self._socket.setsockopt(zmq.SNDHWM, send_hwm)
            if curve_server_key is not None or curve_secret_key is not None:
                self._configure_curve(curve_server_key, curve_secret_key)
            if self._resend_enabled:
                self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            if not addresses:
                raise ValueError("no address given")
            if bind if bind is not None else self._topic:
                if len(addresses) > 1:
                    raise ValueError("a bound socket takes one address")
                self._socket.bind(addresses[0])
            else:
                for a in addresses:  # several: ZeroMQ sends round-robin to them (docs/scaling.md)
                    self._socket.connect(a)
        except BaseException:
            # Nothing was sent: close at once, leaving no socket or context behind.
            self._socket.setsockopt(zmq.LINGER, 0)
            self.close()
            raise
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or addresses[-1]

    def _configure_curve(self, server_key: str | bytes | None, secret_key: str | None) -> None:
        if server_key is None or secret_key is None:
            raise ValueError("CURVE needs both curve_server_key and curve_secret_key")
        if isinstance(server_key, str) and Path(server_key).is_file():
            server_public, _ = zmq.auth.load_certificate(server_key)
        else:
            server_public = server_key.encode("ascii") if isinstance(server_key, str) else server_key
        public, secret = zmq.auth.load_certificate(secret_key)
        if secret is None:
            raise ValueError(f"{secret_key} holds no secret key; give the .key_secret file")
        self._socket.curve_secretkey = secret
        self._socket.curve_publickey = public
        self._socket.curve_serverkey = server_public

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
        """Send one batch. Arrays may be any supported dtype (see docs/protocol.md).

        With ``resend`` on, a batch without a ``batch_id`` gets one (producer and
        sequence number), since a resent copy can only be recognised by it.
        """
        if self._resend_enabled and batch_id is None:
            batch_id = f"{self.producer}:{self._seq}"
        frames = wire.encode(
            model,
            predictions,
            targets,
            input=input,
            weights=weights,
            batch_id=batch_id,
            ts=ts,
            producer=self.producer,
            seq=self._seq,
        )
        if self._topic:
            frames.insert(0, model.encode("utf-8"))
        self._check_reconnect()
        if self._resend_enabled:
            # Copies: a resend must not see buffers the caller has since reused.
            frames = [bytes(f) for f in frames]
        self._socket.send_multipart(frames, copy=False)
        self._seq += 1
        if self._resend_enabled:
            self._resend.append(frames)

    def _check_reconnect(self) -> None:
        """After a reconnect, send the recent batches again: ones in flight when the
        connection dropped may never have reached the daemon."""
        if self._monitor is None:
            return
        reconnected = False
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._disconnected = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self._disconnected:
                self._disconnected = False
                reconnected = True
        if reconnected:
            for frames in list(self._resend):
                self._socket.send_multipart(frames, copy=False)
                self.resent += 1

    def flush(self, timeout_ms: int = 0) -> None:
        """Resend recent batches now if the connection came back since the last send.

        Waits up to ``timeout_ms`` for that reconnect to be reported."""
        if self._monitor is not None and timeout_ms and self._disconnected:
            self._monitor.poll(timeout_ms)
        self._check_reconnect()

    def close(self) -> None:
        """Close the socket, waiting up to ``linger_ms`` for queued messages to be sent."""
        if self._socket.closed:
            return
        self._check_reconnect()
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close()
        if self._own_context:
            self._context.term()  # blocks until queued messages are sent or linger expires

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
