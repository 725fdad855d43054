"""The daemon: wires wire -> validate -> kernels -> state -> exporter, and owns the lifecycle.

Lifecycle, in order (teardown runs in reverse, and logs each step)::

    initialize()  logging is the caller's; then backend warm-up (compile), state,
                  metrics HTTP server, ingest socket, signal handlers
    run()         poll the socket, drain what is waiting, score it; until stopped
    stop          drain what is already queued (bounded), close everything, return 0

Signal handlers only set a flag. A message that cannot be decoded or scored is
counted under its reason, logged at a limited rate, and dropped; the loop goes on.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import zmq

from xentd import kernels, scan, wire
from xentd._version import __version__
from xentd.config import Config
from xentd.errors import Reason, RejectedBatch, StartupError
from xentd.exporter import Exposition, MetricsServer, make_app
from xentd.kernels import Backend, ScoringParams
from xentd.state import ModelState, StateStore
from xentd.validate import Batch, Scratch, concatenate, layout, validate

log = logging.getLogger("xentd")

POLL_MS = 100
# /healthz fails if the loop has not turned for this long (it turns every POLL_MS).
STALL_SECONDS = 10.0


@dataclass
class _RejectionLog:
    """At most one log line per reason per interval, saying how many were suppressed."""

    interval: float
    clock: Callable[[], float] = time.monotonic
    _last: dict[Reason, float] = field(default_factory=dict)
    _suppressed: dict[Reason, int] = field(default_factory=dict)

    def __call__(self, reason: Reason, detail: str, model: str | None) -> None:
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        more = f" ({suppressed} more since last report)" if suppressed else ""
        log.warning("rejected batch%s: %s%s", f" for model {model!r}" if model else "", detail, more)


@dataclass
class _Group:
    """Batches of one model with one layout, waiting to be scored together."""

    state: ModelState
    key: tuple[object, ...]
    batches: list[Batch]


class Daemon:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.state = StateStore(config.windows, config.limits, clock)
        self.backend: Backend | None = None
        self.context: zmq.Context[Any] | None = None
        self.socket: zmq.Socket[Any] | None = None
        self.http: MetricsServer | None = None
        self.ingest_endpoint = ""
        self._stop = threading.Event()
        self._ready = False
        self._heartbeat = time.monotonic()
        self._params: dict[tuple[str, str], ScoringParams] = {}
        self._scratch = Scratch()
        self._log_rejection = _RejectionLog(config.log.rejection_interval_seconds)
        self._teardown: list[tuple[str, Callable[[], None]]] = []

    # --- lifecycle ----------------------------------------------------------

    def initialize(self, *, install_signals: bool = True) -> None:
        self._init_backend()
        self._init_http()
        self._init_socket()
        if install_signals:
            self._init_signals()
        self._ready = True
        log.info("ready: ingest %s (%s), metrics http://%s:%d/metrics, backend %s",
                 self.ingest_endpoint, self.config.ingest.socket.upper(), self.config.metrics.host,
                 self.http.port if self.http else -1, self.backend.name if self.backend else "?")

    def _init_backend(self) -> None:
        started = time.monotonic()
        backend = kernels.create(self.config.engine.backend,
                                 parallel_threshold=self.config.engine.parallel_threshold)
        backend.warmup()
        scan.warmup()
        self.state.warmup()
        self.backend = backend
        log.info("kernels ready (%s backend) in %.1fs", backend.name, time.monotonic() - started)

    def _init_http(self) -> None:
        exposition = Exposition(self.state.snapshot, version=__version__,
                                backend=self.backend.name if self.backend else "none")
        host, port = self.config.metrics.host, self.config.metrics.port
        try:
            self.http = MetricsServer(host, port, make_app(exposition, self.health))
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self.http.start()
        self._teardown.append(("metrics server", self.http.stop))

    def _init_socket(self) -> None:
        cfg = self.config.ingest
        self.context = zmq.Context()
        self._teardown.append(("zmq context", self.context.term))
        kind = zmq.PULL if cfg.socket == "pull" else zmq.SUB
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, cfg.receive_hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        if kind == zmq.SUB:
            for prefix in cfg.subscribe:
                sock.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))
        self._teardown.append(("ingest socket", sock.close))
        try:
            if cfg.connect:
                sock.connect(cfg.address)
                self.ingest_endpoint = cfg.address
            else:
                sock.bind(cfg.address)
                self.ingest_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            verb = "connect to" if cfg.connect else "bind"
            raise StartupError(f"cannot {verb} ingest endpoint {cfg.address}: {exc}") from None
        self.socket = sock

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
            deadline = time.monotonic() + self.config.engine.shutdown_drain_seconds
            drained = 0
            while time.monotonic() < deadline:
                n = self._drain(self.config.engine.drain_max)
                drained += n
                if n == 0:
                    break
            log.info("drained %d queued messages", drained)
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
        self.handle_many([frames])

    def handle_many(self, messages: list[list[Any]]) -> None:
        """Process messages in arrival order. Never raises.

        Each message is decoded and validated on its own, so a bad one is rejected
        alone. Small valid batches are grouped per model and scored with one kernel
        call and one fold: for small batches the per-call overhead is most of the
        cost. A model's open group is scored before any batch of that model that
        cannot join it, so every model still sees its samples in arrival order.
        """
        groups: dict[str, _Group] = {}
        for frames in messages:
            accepted = self._accept(frames)
            if accepted is None:
                continue
            batch, state, small = accepted
            key = layout(batch)
            group = groups.get(batch.model)
            if small and group is not None and group.key == key:
                group.batches.append(batch)
                continue
            if group is not None:
                self._score(groups.pop(batch.model))
            if small:
                groups[batch.model] = _Group(state, key, [batch])
            else:
                self._score(_Group(state, key, [batch]))
        for group in groups.values():
            self._score(group)

    def _accept(self, frames: list[Any]) -> tuple[Batch, ModelState, bool] | None:
        model: str | None = None
        try:
            msg = wire.decode(frames, max_message_bytes=self.config.ingest.max_message_bytes,
                              max_header_bytes=self.config.ingest.max_header_bytes,
                              topic=self.config.ingest.socket == "sub")
            model = msg.model
            pred = msg.tensors.get("predictions")
            small = pred is not None and pred.array.size <= self.config.engine.group_max_elements
            # A grouped batch must own its arrays; a scratch buffer is reused by the next message.
            batch = validate(msg, None if small else self._scratch)
            with self.state.lock:
                state = self.state.model(batch.model, batch.num_classes)
            return batch, state, small
        except RejectedBatch as exc:
            self._rejected(exc.reason, exc.detail, model)
        except Exception:
            log.exception("internal error while validating a batch for model %r", model)
            self._rejected(Reason.INTERNAL_ERROR, "internal error", model)
        return None

    def _score(self, group: _Group) -> None:
        count = len(group.batches)
        model = group.batches[0].model
        try:
            batch = concatenate(group.batches)
            assert self.backend is not None
            scores = self.backend.score(batch, self._scoring_params(batch))
            with self.state.lock:
                group.state.fold(scores, batch.weights, self.clock(), batch.ts, batches=count)
                self.state.messages += count
        except RejectedBatch as exc:
            if count == 1:
                self._rejected(exc.reason, exc.detail, model)
            else:
                # One message spoiled the group (its losses overflow); find it, keep the rest.
                for b in group.batches:
                    self._score(_Group(group.state, group.key, [b]))
        except Exception:
            log.exception("internal error while scoring %d batch(es) for model %r", count, model)
            for _ in range(count):
                self._rejected(Reason.INTERNAL_ERROR, "internal error", model)

    def _rejected(self, reason: Reason, detail: str, model: str | None) -> None:
        with self.state.lock:
            self.state.reject(reason)
            self.state.messages += 1
        self._log_rejection(reason, detail, model)

    def _scoring_params(self, batch: Batch) -> ScoringParams:
        key = (batch.model, batch.prediction_datatype)
        params = self._params.get(key)
        if params is None:
            cfg = self.config.scoring_for(batch.model)
            params = ScoringParams(
                eps=cfg.eps if cfg.eps is not None else batch.dtype_eps,
                focal_gamma=cfg.focal_gamma,
                normalization_tolerance=(cfg.normalization_tolerance if cfg.normalization_tolerance is not None
                                         else math.sqrt(batch.dtype_eps)),
            )
            self._params[key] = params
        return params


def serve(config: Config) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    daemon = Daemon(config)
    try:
        daemon.initialize()
    except BaseException:
        daemon.close()
        raise
    return daemon.run()
