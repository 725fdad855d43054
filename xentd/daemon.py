"""The daemon: wires wire -> validate -> kernels -> state -> exporter, and owns the lifecycle.

Lifecycle, in order (teardown runs in reverse, and logs each step)::

    initialize()  logging is the caller's; then backend warm-up (compile), the
                  state snapshot restored, metrics HTTP server, ingest socket,
                  signal handlers; then READY=1 to systemd
    run()         poll the socket, drain what is waiting, score it; between
                  drains: watchdog ping, snapshots, idle-model eviction
    stop          STOPPING=1; drain what is already queued (bounded); a final
                  snapshot; close everything; return 0

Signal handlers only set a flag. A message that cannot be decoded or scored is
counted under its reason, logged at a limited rate, and dropped; the loop goes on.
The loop reads only when it has scored what it read before, so when scoring
falls behind, ZeroMQ's queues fill and producers' sends block: back-pressure,
not loss (docs/reliability.md).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from xentd import ingest, kernels, persist, scan
from xentd._version import __version__
from xentd.config import Config
from xentd.errors import StartupError
from xentd.exporter import Exposition, MetricsServer, make_app
from xentd.kernels import Backend
from xentd.notify import Notifier
from xentd.pipeline import Pipeline
from xentd.state import StateStore

log = logging.getLogger("xentd")

POLL_MS = 100
# /healthz fails if the loop has not turned for this long (it turns every POLL_MS).
STALL_SECONDS = 10.0
# Idle-model eviction and the systemd STATUS line run at most this often.
HOUSEKEEPING_SECONDS = 1.0


class Daemon:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.state = StateStore(config.windows, config.limits, clock, dedup_window=config.ingest.dedup_window)
        self.notifier = Notifier()
        self.snapshotter: persist.Snapshotter | None = None
        self._housekeeping_due = 0.0
        self._last_auth_log = -math.inf
        self.backend: Backend | None = None
        self.context: zmq.Context[Any] | None = None
        self.socket: zmq.Socket[Any] | None = None
        self.http: MetricsServer | None = None
        self.ingest_endpoint = ""
        self._stop = threading.Event()
        self._ready = False
        self._heartbeat = time.monotonic()
        self.pipeline = Pipeline(config, self.state, clock)
        self._teardown: list[tuple[str, Callable[[], None]]] = []

    # --- lifecycle ----------------------------------------------------------

    def initialize(self, *, install_signals: bool = True) -> None:
        self._teardown.append(("systemd notifier", self.notifier.close))
        self._init_backend()
        self._init_state()
        self._init_http()
        self._init_socket()
        if install_signals:
            self._init_signals()
        self._ready = True
        scheme = "https" if self.config.metrics.tls else "http"
        log.info(
            "ready: ingest %s (%s), metrics %s://%s:%d/metrics, backend %s",
            self.ingest_endpoint,
            self.config.ingest.socket.upper(),
            scheme,
            _url_host(self.config.metrics.host),
            self.http.port if self.http else -1,
            self.backend.name if self.backend else "?",
        )
        self.notifier.ready(self._status())

    def _init_state(self) -> None:
        directory = self.config.state.directory
        if directory is None:
            return
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".xentd-write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StartupError(
                f"state.directory {directory}: not a writable directory: {exc.strerror or exc}"
            ) from None
        persist.load_into(self.state, path)
        self.snapshotter = persist.Snapshotter(self.state, path, self.config.state.snapshot_interval_seconds)

    def _init_backend(self) -> None:
        started = time.monotonic()
        engine = self.config.engine
        backend = kernels.create(
            engine.backend,
            parallel_threshold=engine.parallel_threshold,
            per_model=self.config.model_backends(),
            cuda_min_elements=engine.cuda_min_elements,
            cuda_threads_per_block=engine.cuda_threads_per_block,
        )
        backend.warmup()
        scan.warmup()
        self.state.warmup()
        self.backend = backend
        self.pipeline.backend = backend
        log.info("kernels ready (%s backend) in %.1fs", backend.name, time.monotonic() - started)

    def _init_http(self) -> None:
        exposition = Exposition(
            self.state.snapshot, version=__version__, backend=self.backend.name if self.backend else "none"
        )
        cfg = self.config.metrics
        try:
            self.http = MetricsServer(
                cfg.host, cfg.port, make_app(exposition, self.health, cfg.basic_auth), tls=cfg.tls
            )
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        self.http.start()
        self._teardown.append(("metrics server", self.http.stop))

    def _init_socket(self) -> None:
        cfg = self.config.ingest
        self.context = zmq.Context()
        self._teardown.append(("zmq context", self.context.term))
        if cfg.curve is not None:
            auth = ingest.start_authenticator(self.context, cfg.curve)
            self._teardown.append(("CURVE authenticator", auth.stop))
        self.socket, self.ingest_endpoint = ingest.open_socket(self.context, cfg)
        self._teardown.append(("ingest socket", self.socket.close))
        monitor = ingest.TransportMonitor(self.socket, self._transport_event)
        monitor.start()
        self._teardown.append(("transport monitor", monitor.stop))

    def _transport_event(self, event: str) -> None:
        with self.state.lock:
            if event == "auth_failed":
                self.state.counters.ingest_auth_failures += 1
            else:
                self.state.counters.ingest_disconnects += 1
        now = time.monotonic()
        if event == "auth_failed" and now - self._last_auth_log >= self.config.log.rejection_interval_seconds:
            # From the monitor thread; rate-limited like rejections, so a scanner cannot flood the log.
            self._last_auth_log = now
            log.warning(
                "a producer failed CURVE authentication (its key is not in %s); see xentd_ingest_auth_failures_total",
                self.config.ingest.curve.authorized_keys if self.config.ingest.curve else "?",
            )

    def _init_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        self._teardown.append(("signal handlers", restore))

    def request_stop(self, why: str = "request") -> None:
        if not self._stop.is_set():
            log.info("stopping (%s): draining queued messages", why)
        self._stop.set()

    def _status(self) -> str:
        backend = self.backend.name if self.backend else "?"
        return f"{len(self.state.models)} model(s), {self.state.counters.messages} message(s), backend {backend}"

    def housekeeping(self, force: bool = False) -> None:
        """Between drains: watchdog ping, snapshots, idle-model eviction, status."""
        self.notifier.watchdog()
        now = time.monotonic()
        if self.snapshotter is not None:
            self.snapshotter.maybe(now)
        if not force and now < self._housekeeping_due:
            return
        self._housekeeping_due = now + HOUSEKEEPING_SECONDS
        with self.state.lock:
            evicted = self.state.evict_idle(self.clock())
        if evicted:
            log.info(
                "dropped %d model(s) idle for over %s s: %s%s",
                len(evicted),
                self.config.limits.model_ttl_seconds,
                ", ".join(evicted[:5]),
                " ..." if len(evicted) > 5 else "",
            )
        self.notifier.status(self._status())

    def health(self) -> tuple[bool, str]:
        if not self._ready:
            return False, "starting"
        if self._stop.is_set():
            return False, "stopping"
        stalled = time.monotonic() - self._heartbeat
        if stalled > STALL_SECONDS:
            return False, f"scoring loop stalled for {stalled:.0f}s"
        return True, "ok"

    def run(self) -> int:
        """Serve until stopped; then drain the queue and tear down. Returns the exit code."""
        assert self.socket is not None, "initialize() first"
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                if poller.poll(POLL_MS):
                    self._drain(self.config.engine.drain_max)
                self.housekeeping()
            self.notifier.stopping("draining queued messages")
            deadline = time.monotonic() + self.config.engine.shutdown_drain_seconds
            drained = 0
            while time.monotonic() < deadline:
                self.notifier.watchdog()
                n = self._drain(self.config.engine.drain_max)
                drained += n
                if n == 0:
                    break
            log.info("drained %d queued messages", drained)
            if self.snapshotter is not None and self.snapshotter.final():
                log.info("state snapshot written to %s", self.snapshotter.directory)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self._ready = False
        while self._teardown:
            name, step = self._teardown.pop()
            try:
                step()
                log.debug("closed %s", name)
            except Exception:
                log.exception("error while closing %s", name)
        log.info("stopped")

    # --- the hot path -------------------------------------------------------

    def _drain(self, limit: int) -> int:
        """Take up to ``limit`` waiting messages off the socket and process them together."""
        assert self.socket is not None
        messages = []
        for _ in range(limit):
            try:
                messages.append(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        if messages:
            self.handle_many(messages)
        return len(messages)

    def handle(self, frames: list[Any]) -> None:
        """Decode, validate, score and fold one message. Never raises."""
        self.pipeline.handle_many([frames])

    def handle_many(self, messages: list[list[Any]]) -> None:
        """Process messages in arrival order (see :meth:`Pipeline.handle_many`). Never raises."""
        self.pipeline.handle_many(messages)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(config: Config) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    daemon = Daemon(config)
    try:
        daemon.initialize()
    except BaseException:
        daemon.close()
        raise
    return daemon.run()
