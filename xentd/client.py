"""Publishing batches to xentd from Python.

    from xentd.client import Publisher

    with Publisher("tcp://127.0.0.1:5557") as pub:
        pub.send("fraud-v3", probs, labels)

The publisher encodes with :mod:`xentd.wire`, the same codec the daemon decodes
with, so the two cannot disagree. It never blocks forever: a full send queue
raises ``zmq.Again`` after ``send_timeout_ms``, and :meth:`Publisher.close`
waits at most ``linger_ms`` for queued messages to leave.

Every message carries a ``producer`` stream id (``<producer>:<model>``: one stream
per model, so a daemon that subscribes to some models only sees no false gaps) and
that stream's ``seq`` number, so xentd counts messages lost on the way
(``xentd_sequence_gaps_total``). With
``resend=N`` the publisher is at-least-once: it keeps its last N batches and
sends them again whenever its connection to the daemon is re-established
(after a daemon restart, say); xentd drops the copies it already scored by
``batch_id`` (see docs/reliability.md).

ZeroMQ connects in the background, so by default a publisher can be created, and
can send, before any daemon listens: batches wait in its queue (PUSH) until one
does, or are dropped (PUB, which has no subscriber to send to). To find out
instead, pass ``connect_timeout`` (seconds), or call :meth:`Publisher.wait_connected`:
it raises a :class:`~xentd.errors.ConnectError` naming the address when no daemon
has completed the connection in time. This is off by default, because a model
server that starts before its daemon should keep running, as ZeroMQ intends;
``xentd send`` and ``xentd replay`` turn it on (``--timeout``).

Coalescing (off by default), as Kafka producers have ``linger.ms`` and
``batch.size``: with ``batch_rows`` and/or ``linger`` given, sends without a
``batch_id`` are held and joined, per model, into one message of many rows, sent
once ``batch_rows`` rows are pending, once the first pending row is ``linger``
seconds old (checked on every send; there is no background thread, so a producer
that goes quiet calls :meth:`Publisher.flush`), on :meth:`Publisher.flush` and on
close. See :class:`Publisher` for what can be joined.

Delayed labels (docs/protocol.md, "Delayed labels"): :meth:`Publisher.send_predictions`
sends predictions with one id per row, which wait in the daemon; :meth:`Publisher.send_labels`
sends the targets later, with the same ids, and the daemon joins and scores the pairs.
Both kinds go to the model's own ``seq`` stream and are sent at once, never held for
coalescing. The predictions and the labels of a model must reach the same daemon
(docs/scaling.md): a publisher given several PUSH addresses refuses them.
"""

from __future__ import annotations

import collections
import hashlib
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from xentd import wire
from xentd.config import transport_hint
from xentd.errors import ConnectError, XentdError

# What the monitor reports: a connection made, lost, or refused in its handshake.
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED


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

    ``connect_timeout`` (seconds; None, the default, does not wait) makes the
    constructor call :meth:`wait_connected`, so that a publisher exists only once
    a daemon has accepted it.

    Coalescing: ``batch_rows`` (rows) and ``linger`` (seconds), both None (off) by
    default. With either given, a send without a ``batch_id`` is not sent at once:
    its rows are copied and held per model, and joined with the model's next sends
    into one message. That message is sent when ``batch_rows`` rows are pending
    (None: no size limit), when a send finds the first pending row ``linger``
    seconds old (None: no time limit; 0: at once), on :meth:`flush`, and on :meth:`close` (and
    leaving a ``with`` block). No thread sends in the background: a producer that
    may go quiet with rows pending calls :meth:`flush`. Only rows that can share a
    message are joined: same model, ``input``, prediction and target datatypes and
    row shapes, and weights either on all or none (same datatype); a send with
    another layout first sends the model's pending rows, so each model's rows stay
    in order. A send with a ``batch_id`` cannot be merged (the daemon dedupes by
    it): it first sends the model's pending rows, then goes alone. A joined message
    carries the latest ``ts`` of its rows (none if none had one). Each message sent
    takes one ``seq``, as without coalescing. Bad rows (model name, ``input``,
    dtype, rank, row counts that differ between arrays, ``ts``) raise at send, never
    at flush. A rank-0 prediction has no rows to join and is sent alone.
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
        connect_timeout: float | None = None,
        context: zmq.Context[Any] | None = None,
        batch_rows: int | None = None,
        linger: float | None = None,
    ) -> None:
        if batch_rows is not None and (
            isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1
        ):
            raise ValueError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
        if linger is not None and not (math.isfinite(linger) and linger >= 0):
            raise ValueError(f"linger must be >= 0 seconds, got {linger!r}")
        if socket not in ("push", "pub"):
            raise ValueError(f"socket must be 'push' or 'pub', got {socket!r}")
        if resend < 0:
            raise ValueError(f"resend must be >= 0, got {resend}")
        if connect_timeout is not None and not connect_timeout >= 0:
            raise ValueError(f"connect_timeout must be >= 0 seconds, got {connect_timeout}")
        addresses = [address] if isinstance(address, str) else list(address)
        for a in addresses:
            if "://" not in a:
                raise ValueError(
                    f"{a!r} is not a ZeroMQ endpoint: it names no transport{transport_hint(a)}; "
                    "write e.g. tcp://127.0.0.1:5557 or ipc:///run/xentd/ingest"
                )
        self._topic = socket == "pub"
        # An own context by default, terminated on close: that is what makes close()
        # wait for queued messages. A shared Context.instance() is never terminated,
        # so a process that exits right after close() would drop what is queued.
        self._own_context = context is None
        self._context = context or zmq.Context()
        # XPUB sends exactly as PUB does, and also hands us the subscriptions it
        # receives: the only way to know that a subscriber is ready (wait_connected).
        self._socket = self._context.socket(zmq.XPUB if self._topic else zmq.PUSH)
        self.producer = producer or f"py-{uuid.uuid4().hex[:16]}"
        # One seq stream per model (docs/protocol.md): a daemon that subscribes to some
        # topics only must not see the numbers of the others as gaps.
        self._streams: dict[str, list[Any]] = {}
        self._coalesce = batch_rows is not None or linger is not None
        self._batch_rows = batch_rows
        self._linger = linger
        self._pending: dict[str, _Pending] = {}  # model -> rows held for one message
        self._resend: collections.deque[list[bytes | memoryview]] = collections.deque(maxlen=resend or None)
        self._resend_enabled = resend > 0
        self._monitor: zmq.Socket[Any] | None = None
        self._disconnected = False
        # Endpoints whose connection completed its handshake and has not dropped since.
        self._connected: set[str] = set()
        self._refused: dict[str, str] = {}  # endpoint -> why its last handshake failed
        self._subscribed = False
        self.resent = 0
        self._bound = bool(bind if bind is not None else self._topic)
        self._addresses = addresses
        # PUSH to several instances round-robins: each would see a share of one stream
        # and count the rest as gaps, so such a publisher sends no seq (docs/scaling.md).
        self._numbered = len(addresses) == 1
        try:
            self._socket.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
            self._socket.setsockopt(zmq.LINGER, linger_ms)
            self._socket.setsockopt(zmq.SNDHWM, send_hwm)
            if curve_server_key is not None or curve_secret_key is not None:
                self._configure_curve(curve_server_key, curve_secret_key)
            if self._resend_enabled or connect_timeout is not None:
                self._monitor = self._socket.get_monitor_socket(_MONITOR_EVENTS)
            if not addresses:
                raise ValueError("no address given")
            if self._bound:
                if len(addresses) > 1:
                    raise ValueError("a bound socket takes one address")
                self._socket.bind(addresses[0])
            else:
                for a in addresses:  # several: ZeroMQ sends round-robin to them (docs/scaling.md)
                    self._socket.connect(a)
            self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or addresses[-1]
            if connect_timeout is not None:
                self.wait_connected(connect_timeout)
        except BaseException:
            # Nothing was sent: close at once, leaving no socket or context behind.
            self._socket.setsockopt(zmq.LINGER, 0)
            self.close()
            raise

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
        sequence number), since a resent copy can only be recognised by it. With
        coalescing on (``batch_rows``/``linger``), the rows may be held and sent
        joined with others (see :class:`Publisher`).
        """
        if not self._coalesce:
            self._send_now(model, predictions, targets, input, weights, batch_id, ts)
            return
        now = time.monotonic()
        self._flush_expired(now)
        if batch_id:
            self._flush_model(model)
            self._send_now(model, predictions, targets, input, weights, batch_id, ts)
            return
        layout, arrays = _rows(model, predictions, targets, input, weights, ts)
        if layout is None:
            self._flush_model(model)
            self._send_now(model, predictions, targets, input, weights, None, ts)
            return
        pending = self._pending.get(model)
        if pending is not None and pending.layout != layout:
            self._flush_model(model)
            pending = None
        if pending is None:
            pending = self._pending[model] = _Pending(layout, now)
        pending.add(arrays, ts)
        full = self._batch_rows is not None and pending.rows >= self._batch_rows
        if full or self._linger == 0:  # linger=0, as Kafka's linger.ms=0: no waiting at all
            self._flush_model(model)

    def send_predictions(
        self,
        model: str,
        predictions: Any,
        ids: Any,
        *,
        input: str = "probs",
        weights: Any = None,
        batch_id: str | None = None,
        ts: float | None = None,
    ) -> None:
        """Send predictions whose labels come later: a predictions-only message.

        ``ids`` is one id per row (``[N]``, int64 or uint64; an int64 and a uint64 id
        with the same 64 bits are the same id), chosen by the producer and scoped per
        model. Each row waits in the daemon under (model, id) until :meth:`send_labels`
        brings its label, or ``labels.ttl`` passes (docs/protocol.md, "Delayed labels").

        Sent at once, in the model's ``seq`` stream, and never held for coalescing: the
        model's rows held by :meth:`send` go first, so the model's messages keep their
        order (a label must not overtake its prediction). Arrays are checked here, with
        errors naming the array, before anything is sent.
        """
        arrays = _join_arrays(model, input, ts, [("predictions", predictions), ("weights", weights)], ids)
        self._send_join(model, arrays[0], None, input, arrays[1], arrays[2], batch_id, ts)

    def send_labels(
        self,
        model: str,
        targets: Any,
        ids: Any,
        *,
        batch_id: str | None = None,
        ts: float | None = None,
    ) -> None:
        """Send the labels of predictions sent earlier by :meth:`send_predictions`: a labels-only message.

        ``targets`` takes the forms it takes in :meth:`send` (class indices ``[N]``,
        binary or soft ``[N]``, soft ``[N, C]``); ``ids`` (``[N]``, int64 or uint64) name
        the waiting predictions, row by row. A label whose id is waiting joins it and
        the pair is scored; any other counts as ``unmatched`` in
        ``xentd_label_joins_total``. There are no weights: a joined pair takes its
        prediction's.

        Sent at once, in the model's ``seq`` stream, never held for coalescing (the
        model's rows held by :meth:`send` go first), as :meth:`send_predictions`.
        """
        arrays = _join_arrays(model, "probs", ts, [("targets", targets)], ids)
        self._send_join(model, None, arrays[0], "probs", None, arrays[1], batch_id, ts)

    def _send_join(
        self,
        model: str,
        predictions: Any,
        targets: Any,
        input: str,
        weights: Any,
        ids: np.ndarray,
        batch_id: str | None,
        ts: float | None,
    ) -> None:
        if not self._numbered:
            # Round-robin would send a label to another instance than its prediction.
            raise ValueError(
                "delayed labels need the predictions and the labels of a model on one daemon; a publisher "
                "round-robining over several PUSH addresses cannot send them (docs/scaling.md)"
            )
        if self._coalesce:
            self._flush_expired(time.monotonic())
            self._flush_model(model)
        self._send_now(model, predictions, targets, input, weights, batch_id, ts, ids=ids)

    @property
    def pending_rows(self) -> int:
        """Rows held for coalescing, not yet sent (all models)."""
        return sum(p.rows for p in self._pending.values())

    def _flush_expired(self, now: float) -> None:
        """Send every model's pending rows whose first row has waited ``linger`` seconds."""
        if self._linger is None or not self._pending:
            return
        for model in [m for m, p in self._pending.items() if now - p.since >= self._linger]:
            self._flush_model(model)

    def _flush_model(self, model: str) -> None:
        """Send ``model``'s pending rows as one message. They leave the buffer first:
        a send that fails (``zmq.Again``) raises, and they are not sent twice."""
        pending = self._pending.pop(model, None)
        if pending is None:
            return
        predictions, targets, weights = pending.joined()
        self._send_now(model, predictions, targets, pending.layout[0], weights, None, pending.ts)

    def _flush_all(self) -> None:
        for model in list(self._pending):
            self._flush_model(model)

    def _send_now(
        self,
        model: str,
        predictions: Any,
        targets: Any,
        input: str,
        weights: Any,
        batch_id: str | None,
        ts: float | None,
        *,
        ids: Any = None,
    ) -> None:
        """Encode and send one message now, with the model's next seq."""
        stream = self._streams.get(model)
        if stream is None:
            stream = self._streams[model] = [_stream_id(self.producer, model), 0]
        stream_id, seq = stream
        if self._resend_enabled and not batch_id:
            # Unique within the model, which is the scope of the daemon's dedupe.
            batch_id = f"{self.producer}:{seq}"
        frames = wire.encode(
            model,
            predictions,
            targets,
            input=input,
            weights=weights,
            ids=ids,
            batch_id=batch_id,
            ts=ts,
            producer=stream_id if self._numbered else None,
            seq=seq if self._numbered else None,
        )
        if self._topic:
            frames.insert(0, model.encode("utf-8"))
            self._read_subscriptions()
        self._check_reconnect()
        if self._resend_enabled:
            # Copies: a resend must not see buffers the caller has since reused.
            frames = [bytes(f) for f in frames]
        self._socket.send_multipart(frames, copy=False)
        stream[1] = seq + 1
        if self._resend_enabled:
            self._resend.append(frames)

    def wait_connected(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until a daemon is there to take batches.

        PUSH: every address given has completed its connection (the ZeroMQ
        handshake, CURVE included). PUB: at least one subscriber has connected and
        subscribed, so a batch sent now is not dropped for want of one. Raises
        :class:`~xentd.errors.ConnectError` naming the addresses still waiting.
        ``inproc://`` addresses are not checked (they report no handshake).
        Needs ``connect_timeout`` or ``resend`` at construction, which start the
        connection monitor before the first connection is made.
        """
        if self._monitor is None:
            raise XentdError("wait_connected needs a publisher made with connect_timeout (or resend)")
        deadline = time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        if self._topic:
            poller.register(self._socket, zmq.POLLIN)
        while True:
            self._check_reconnect()
            waiting = self._waiting()
            if not waiting:
                return
            left = deadline - time.monotonic()
            # A refused handshake (CURVE key not authorized, say) will not pass by waiting.
            if left <= 0 or any(a in self._refused for a in waiting):
                raise ConnectError(self._not_connected_message(waiting, timeout))
            poller.poll(max(1, int(left * 1000)))

    def _waiting(self) -> list[str]:
        """The addresses :meth:`wait_connected` still waits for."""
        if self._topic:
            self._read_subscriptions()
            return [] if self._subscribed else [self.address]
        if self._bound:
            return [] if self._connected else [self.address]
        return [a for a in self._addresses if a not in self._connected and not a.startswith("inproc://")]

    def _read_subscriptions(self) -> None:
        """Take the subscription messages XPUB queues (b"\\x01topic" subscribes, b"\\x00topic" leaves),
        so that they cannot pile up over a long life of reconnecting subscribers."""
        while self._socket.poll(0):
            if self._socket.recv()[:1] == b"\x01":
                self._subscribed = True

    def _not_connected_message(self, waiting: list[str], timeout: float) -> str:
        where = ", ".join(waiting)
        refused = [f"{a} refused the connection: {self._refused[a]}" for a in waiting if a in self._refused]
        if refused:
            return "; ".join(refused)
        if self._topic:
            return (
                f"no daemon subscribed to {where} within {timeout:g} s "
                '(is xentd running with ingest.socket = "sub" and connected to this address?)'
            )
        if self._bound:
            return f"no daemon connected to {where} within {timeout:g} s"
        return (
            f"no daemon accepted the connection to {where} within {timeout:g} s "
            "(is xentd running, and is that its ingest address?)"
        )

    def _check_reconnect(self) -> None:
        """Read the connection monitor. After a reconnect, send the recent batches
        again: ones in flight when the connection dropped may never have reached the daemon."""
        if self._monitor is None:
            return
        reconnected = False
        while self._monitor.poll(0):
            message = recv_monitor_message(self._monitor)
            event, endpoint = message["event"], message["endpoint"].decode("utf-8", "replace")
            if event == zmq.EVENT_DISCONNECTED:
                self._disconnected = True
                self._connected.discard(endpoint)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected.add(endpoint)
                self._refused.pop(endpoint, None)
                if self._disconnected:
                    self._disconnected = False
                    reconnected = True
            elif event & _HANDSHAKE_FAILED:
                self._refused[endpoint] = (
                    "it did not accept this client's CURVE key (is the client's .key among the daemon's "
                    "authorized keys, and is the server key the daemon's?)"
                    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    else "the ZeroMQ handshake failed (a different security mechanism, or not xentd?)"
                )
        if reconnected and self._resend_enabled:
            for frames in list(self._resend):
                self._socket.send_multipart(frames, copy=False)
                self.resent += 1

    def flush(self, timeout_ms: int = 0) -> None:
        """Send the rows held for coalescing, each model's as one message; then resend
        recent batches now if the connection came back since the last send.

        Waits up to ``timeout_ms`` for that reconnect to be reported."""
        self._flush_all()
        if self._monitor is not None and timeout_ms and self._disconnected:
            self._monitor.poll(timeout_ms)
        self._check_reconnect()

    def close(self) -> None:
        """Send the rows held for coalescing, then close the socket, waiting up to
        ``linger_ms`` for queued messages to be sent. The socket is closed even when
        sending the held rows fails (that error is raised)."""
        if self._socket.closed:
            return
        try:
            self._flush_all()
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
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


def _stream_id(producer: str, model: str) -> str:
    """The ``producer`` header of this publisher's stream for ``model``: ``producer:model``,
    with the model hashed where the two would pass the 128-character limit."""
    stream = f"{producer}:{model}"
    if len(stream) <= 128:
        return stream
    digest = hashlib.blake2b(model.encode("utf-8"), digest_size=12).hexdigest()
    return f"{producer[:103]}:{digest}"


# What makes rows joinable into one message: input kind, then (datatype, row shape) of
# predictions and targets, and of weights or None.
_Layout = tuple[str, tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...]] | None]


def _check_header_fields(model: str, input: str, ts: float | None) -> None:
    """The header fields :func:`xentd.wire.encode` would refuse, checked before anything is held or sent."""
    if not wire.well_formed_name(model):
        raise ValueError(f"model name {model!r} must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    if input not in wire.INPUT_KINDS:
        raise ValueError(f"input must be one of {', '.join(wire.INPUT_KINDS)}, got {input!r}")
    if ts is not None and not (math.isfinite(ts) and 0.0 <= ts <= wire.MAX_TS):
        raise ValueError(f"ts must be Unix seconds in [0, {wire.MAX_TS:.0f}] (year 9999), got {ts!r}")


def _wire_arrays(named: list[tuple[str, Any]]) -> tuple[list[tuple[str, tuple[int, ...]]], list[np.ndarray]]:
    """Each array as it goes on the wire, with its (datatype, row shape); rank checked."""
    parts: list[tuple[str, tuple[int, ...]]] = []
    arrays: list[np.ndarray] = []
    for name, value in named:
        # A plain ndarray of a native protocol dtype (the common case) skips the general
        # conversion, whose dtype checks cost more than the rest of a one-row send.
        datatype = _NATIVE_DATATYPE.get(value.dtype) if type(value) is np.ndarray else None
        if datatype is not None:
            arr = value
        else:
            datatype, arr = wire._as_wire_array(value, name)
        if datatype == "UINT64":
            # As wire.encode would, but now: a coalesced row must not fail at flush.
            raise TypeError(f"{name}: uint64 is for ids only; use int64")
        if arr.ndim > wire.MAX_RANK:
            raise ValueError(f"{name}: rank {arr.ndim} is not supported (at most {wire.MAX_RANK})")
        parts.append((datatype, arr.shape[1:]))
        arrays.append(arr)
    return parts, arrays


def _check_rows(named: list[tuple[str, Any]], arrays: list[np.ndarray]) -> None:
    """Every array has the first one's N rows; the first is not a scalar."""
    if arrays[0].ndim == 0:
        raise ValueError(f"{named[0][0]}: a scalar has no rows; send [N] or [N, C]")
    n = arrays[0].shape[0]
    for (name, _), arr in zip(named[1:], arrays[1:], strict=True):
        if arr.ndim == 0 or arr.shape[0] != n:
            raise ValueError(f"{name}: {arr.shape[0] if arr.ndim else 'no'} rows for {n} {named[0][0]}")


def _rows(
    model: str, predictions: Any, targets: Any, input: str, weights: Any, ts: float | None
) -> tuple[_Layout | None, list[np.ndarray]]:
    """Check one send as :func:`xentd.wire.encode` would, so that a bad row raises now and
    not at flush; return its layout and copies of its arrays (the caller may reuse its
    buffers once send returns). Layout None: rank-0 predictions, which have no rows to join."""
    _check_header_fields(model, input, ts)
    named = [("predictions", predictions), ("targets", targets)]
    if weights is not None:
        named.append(("weights", weights))
    parts, arrays = _wire_arrays(named)
    if arrays[0].ndim == 0:
        return None, arrays
    # Joined, the rows of the arrays would no longer line up.
    _check_rows(named, arrays)
    layout: _Layout = (input, parts[0], parts[1], parts[2] if weights is not None else None)
    return layout, [a.copy() for a in arrays]  # C-ordered copies: the wire's layout


def _ids(ids: Any) -> np.ndarray:
    """``ids`` as a [N] int64 or uint64 array, or a ValueError/TypeError that says what is wrong."""
    try:
        arr = np.asarray(ids)
    except (OverflowError, ValueError) as exc:  # Python ints past both int64 and uint64
        raise ValueError(f"ids: not 64-bit integers ({exc})") from None
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize != 8:
        raise TypeError(
            f"ids: dtype {arr.dtype} is not an id type; ids are int64 or uint64 "
            "(hash string ids to 64 bits, and widen smaller integers with .astype(np.int64))"
        )
    if arr.ndim != 1:
        raise ValueError(f"ids: shape {list(arr.shape)}; ids are one per row, shape [N]")
    return arr


def _join_arrays(model: str, input: str, ts: float | None, named: list[tuple[str, Any]], ids: Any) -> list[Any]:
    """Check a predictions-only or labels-only send: the arrays of ``named`` (None kept as None),
    then the ids, each as it goes on the wire. Raises before anything is sent."""
    _check_header_fields(model, input, ts)
    given = [(name, value) for name, value in named if value is not None]
    parts, arrays = _wire_arrays(given)
    if arrays[0].ndim == 0:
        raise ValueError(f"{given[0][0]}: a scalar has no rows to join; send [N] or [N, C] with ids [N]")
    id_array = _ids(ids)
    _check_rows([*given, ("ids", ids)], [*arrays, id_array])
    # bfloat16 travels as its bits: mark them again, or they would go out as UINT16.
    marked = [wire.BF16(a) if part[0] == "BF16" else a for part, a in zip(parts, arrays, strict=True)]
    by_name = dict(zip([name for name, _ in given], marked, strict=True))
    return [by_name.get(name) for name, _ in named] + [id_array]


# Native-order dtypes that go on the wire as they are (bool and bfloat16 are converted).
_NATIVE_DATATYPE: dict[Any, str] = dict(wire._NUMPY_TO_DATATYPE)


@dataclass(slots=True)
class _Pending:
    """One model's rows held for coalescing, all of one layout."""

    layout: _Layout
    since: float  # time.monotonic() of the first row
    rows: int = 0
    ts: float | None = None
    arrays: list[list[np.ndarray]] = field(default_factory=list)

    def add(self, arrays: list[np.ndarray], ts: float | None) -> None:
        self.arrays.append(arrays)
        self.rows += int(arrays[0].shape[0])
        if ts is not None and (self.ts is None or ts > self.ts):
            self.ts = ts

    def joined(self) -> tuple[Any, Any, Any]:
        """Predictions, targets and weights (or None), each one array, BF16 rewrapped."""
        out: list[Any] = []
        for i, part in enumerate((self.layout[1], self.layout[2], self.layout[3])):
            if part is None:
                out.append(None)
                continue
            arr = np.concatenate([a[i] for a in self.arrays]) if len(self.arrays) > 1 else self.arrays[0][i]
            out.append(wire.BF16(arr) if part[0] == "BF16" else arr)
        return out[0], out[1], out[2]
