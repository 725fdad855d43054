"""The ingest socket: ZeroMQ PULL or SUB, optional CURVE authentication, and a transport monitor.

Frames larger than ``max_message_bytes`` are refused by ZeroMQ itself
(``ZMQ_MAXMSGSIZE``), which drops that connection; the decoder refuses whole
messages over the limit. ZeroMQ reports neither to the application as a
message, so :class:`TransportMonitor` counts what it does report: peers
disconnecting, and CURVE handshakes refused by the client allow-list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from xentd.config import CurveConfig, IngestConfig
from xentd.errors import StartupError

log = logging.getLogger("xentd.ingest")


def open_socket(context: zmq.Context[Any], cfg: IngestConfig) -> tuple[zmq.Socket[Any], str]:
    """Create, configure and bind (or connect) the ingest socket. Returns it and its endpoint."""
    kind = zmq.PULL if cfg.socket == "pull" else zmq.SUB
    sock = context.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, cfg.receive_hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        if cfg.curve is not None:
            _curve_server(sock, cfg.curve)
        if kind == zmq.SUB:
            for prefix in cfg.subscribe:
                sock.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))
        try:
            if cfg.connect:
                sock.connect(cfg.address)
                return sock, cfg.address
            sock.bind(cfg.address)
            return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            verb = "connect to" if cfg.connect else "bind"
            raise StartupError(f"cannot {verb} ingest endpoint {cfg.address}: {exc}") from None
    except BaseException:
        sock.close()
        raise


def _curve_server(sock: zmq.Socket[Any], curve: CurveConfig) -> None:
    if not zmq.has("curve"):
        raise StartupError("ingest.curve is configured but this libzmq was built without CURVE support")
    try:
        public, secret = zmq.auth.load_certificate(curve.server_secret_key)
    except (OSError, ValueError) as exc:
        raise StartupError(f"ingest.curve.server_secret_key: cannot load {curve.server_secret_key}: {exc}") from None
    if secret is None:
        raise StartupError(
            f"ingest.curve.server_secret_key: {curve.server_secret_key} holds no secret key; "
            "give the .key_secret file that `xentd keygen` wrote"
        )
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def start_authenticator(context: zmq.Context[Any], curve: CurveConfig) -> ThreadAuthenticator:
    """A ZAP handler that admits only the client public keys in ``curve.authorized_keys``."""
    directory = Path(curve.authorized_keys)
    if not directory.is_dir():
        raise StartupError(f"ingest.curve.authorized_keys: {directory} is not a directory")
    keys = sorted(directory.glob("*.key"))
    if not keys:
        log.warning("ingest.curve.authorized_keys: %s holds no *.key files; no producer can connect", directory)
    auth = ThreadAuthenticator(context, log=logging.getLogger("xentd.auth"))
    auth.start()
    auth.configure_curve(domain="*", location=str(directory))
    log.info("CURVE authentication on: %d authorized client key(s) in %s", len(keys), directory)
    return auth


class TransportMonitor:
    """Counts ZeroMQ transport events of the ingest socket on a background thread."""

    EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL

    def __init__(self, sock: zmq.Socket[Any], on_event: Callable[[str], None]) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(self.EVENTS)
        self._on_event = on_event
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xentd-zmq-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        names: dict[int, str] = {
            zmq.EVENT_DISCONNECTED: "disconnected",
            zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_failed",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol_error",
        }
        while not self._stop.is_set():
            try:
                if not self._monitor.poll(100):
                    continue
                event = recv_monitor_message(self._monitor)
            except zmq.ZMQError:
                return
            name = names.get(int(event["event"]))
            if name is not None:
                self._on_event(name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
