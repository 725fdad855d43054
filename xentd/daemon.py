"""The daemon: wires wire -> validate -> kernels -> state -> exporter, and owns the lifecycle.

Lifecycle, in order (teardown runs in reverse, and logs each step)::

    initialize()  logging is the caller's. Cheap checks first, so that a busy
                  port fails within a second: signal handlers, the state
                  directory, the ingest socket bound, the metrics HTTP server
                  bound and serving (/healthz: 503 "starting"); the state
                  snapshot validated and restored (scrapes wait for it, so no
                  counter ever reads 0 in between); then the kernels compiled
                  (seconds from the Numba cache, 20 s to minutes without one),
                  while systemd hears STATUS, WATCHDOG=1 and EXTEND_TIMEOUT_USEC;
                  the start-up objects frozen out of the garbage collector's
                  walks (xentd.heap); then READY=1 and /healthz 200
    run()         poll the socket, drain what is waiting, score it; between
                  drains: watchdog ping, snapshots, idle-model eviction
    stop          STOPPING=1; drain what is already queued (bounded); a final
                  snapshot; close everything; return 0

Nothing is read off the ingest socket before the kernels are ready: what
producers send during the compile waits in ZeroMQ's queue and is scored first.
Signal handlers only set a flag; a stop asked for during the compile takes
effect once it ends, and drains the queue like any other stop.
A message that cannot be decoded or scored is counted under its reason, logged
at a limited rate, and dropped; the loop goes on.
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

from xentd import ingest, kernels, persist, scan, segments, textformat
from xentd._version import __version__
from xentd.config import Config
from xentd.errors import StartupError
from xentd.exporter import Exposition, MetricsServer, make_app
from xentd.heap import HeapFreezer
from xentd.kernels import Backend
from xentd.notify import Notifier
from xentd.pipeline import Pipeline
from xentd.state import Snapshot, StateStore

log = logging.getLogger("xentd")

POLL_MS = 100
# /healthz fails if the loop has not turned for this long (it turns every POLL_MS).
STALL_SECONDS = 10.0
# Idle-model eviction and the systemd STATUS line run at most this often.
HOUSEKEEPING_SECONDS = 1.0
# While the kernels compile, systemd hears from a helper thread this often (at
# least twice per watchdog interval): STATUS, WATCHDOG=1 and EXTEND_TIMEOUT_USEC.
STARTUP_TICK_SECONDS = 5.0
# Each EXTEND_TIMEOUT_USEC asks for this much more time; several ticks fit in it.
STARTUP_EXTEND_SECONDS = 30.0
# A compile that runs longer than this is taken for hung: the helper goes quiet,
# and systemd's watchdog (or TimeoutStartSec) ends the start.
STARTUP_EXTEND_LIMIT_SECONDS = 900.0


class Daemon:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.state = StateStore(
            config.windows,
            config.limits,
            clock,
            dedup_window=config.ingest.dedup_window,
            labels=config.labels,
            calibration_cfg=config.calibration,
        )
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
        self._listening = False
        # What /healthz says while not ready, and since when (monotonic).
        self._phase = "starting"
        self._phase_since = time.monotonic()
        # Set once the snapshot is restored (or there is none): scrapes wait for it.
        self._restored = threading.Event()
        self._heartbeat = time.monotonic()
        self.pipeline = Pipeline(config, self.state, clock)
        self.heap = HeapFreezer()
        self._teardown: list[tuple[str, Callable[[], None]]] = []

    # --- lifecycle ----------------------------------------------------------

    def initialize(self, *, install_signals: bool = True) -> None:
        self._teardown.append(("systemd notifier", self.notifier.close))
        if install_signals:
            self._init_signals()
        state_dir = self._check_state_dir()
        self._init_socket()
        self._init_http()
        backend = self._create_backend()
        log.info(
            "listening: ingest %s (%s), metrics %s; messages wait in the queue until the kernels are ready",
            self.ingest_endpoint,
            self.config.ingest.socket.upper(),
            self._metrics_url(),
        )
        self._listening = True
        self._set_phase("restoring the state snapshot")
        if state_dir is not None:
            self._restore_state(state_dir)
        self._restored.set()
        self._compile(backend, parallel=False)
        self.heap.freeze(len(self.state.models), "start-up")
        self._heartbeat = time.monotonic()  # the loop has not turned yet, but it is about to
        self._ready = True
        log.info(
            "ready: ingest %s (%s), metrics %s, backend %s",
            self.ingest_endpoint,
            self.config.ingest.socket.upper(),
            self._metrics_url(),
            self.backend.name if self.backend else "?",
        )
        self.notifier.ready(self._status())
        self._compile_parallel_later(backend)

    def _compile_parallel_later(self, backend: Backend) -> None:
        """The multi-threaded builds, after READY: they only make large batches faster
        (until then those take the serial builds), and on a cold cache they are about
        half of the compile. The thread holds the GIL while Numba compiles, so scoring
        runs slower meanwhile, never stops; a stop does not wait for it."""

        def compile_parallel() -> None:
            started = time.monotonic()
            try:
                backend.warmup_parallel()
            except Exception:
                log.exception("compiling the multi-threaded kernels failed; large batches stay on one thread")
                return
            log.info("multi-threaded kernels ready in %.1fs", time.monotonic() - started)
            # Frozen by the main thread's next housekeeping, not here (xentd.heap).
            self.heap.request("multi-threaded kernels compiled")

        threading.Thread(target=compile_parallel, name="xentd-compile", daemon=True).start()

    def _metrics_url(self) -> str:
        scheme = "https" if self.config.metrics.tls else "http"
        port = self.http.port if self.http else -1
        return f"{scheme}://{_url_host(self.config.metrics.host)}:{port}/metrics"

    def _set_phase(self, phase: str) -> None:
        self._phase, self._phase_since = phase, time.monotonic()

    def _init_state(self) -> None:
        """Check the state directory and restore its snapshot (both start-up steps at once)."""
        directory = self._check_state_dir()
        if directory is not None:
            self._restore_state(directory)
        self._restored.set()

    def _check_state_dir(self) -> Path | None:
        directory = self.config.state.directory
        if directory is None:
            return None
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
        return path

    def _restore_state(self, path: Path) -> None:
        persist.load_into(self.state, path)
        self.snapshotter = persist.Snapshotter(self.state, path, self.config.state.snapshot_interval_seconds)

    def _init_backend(self) -> None:
        """Create and compile the backend in one step (tests score without sockets this way)."""
        self._compile(self._create_backend())

    def _create_backend(self) -> Backend:
        """Choose the backends; cheap, and where a missing GPU is refused. Compiles nothing."""
        engine = self.config.engine
        return kernels.create(
            engine.backend,
            parallel_threshold=engine.parallel_threshold,
            per_model=self.config.model_backends(),
            cuda_min_elements=engine.cuda_min_elements,
            cuda_threads_per_block=engine.cuda_threads_per_block,
        )

    def _compile(self, backend: Backend, *, parallel: bool = True) -> None:
        """Compile (or load from the Numba cache) the kernels, then hand the backend to the
        pipeline. ``parallel=False`` leaves the multi-threaded scoring builds for later."""
        self._set_phase("compiling kernels")
        log.info(
            "compiling kernels: loaded from the Numba cache in %s when it holds them (under a second), "
            "else compiled, once: 20 s to a minute or two",
            numba_cache_location(),
        )
        started = time.monotonic()
        with _StartupProgress(self.notifier, self._starting_text):
            # The fold, snapshot and text kernels first: a scrape of restored models needs them,
            # the scoring kernels do not.
            self.state.warmup()
            textformat.warmup()
            scan.warmup()
            segments.warmup()
            backend.warmup(parallel=parallel)
        self.backend = backend
        self.pipeline.backend = backend
        log.info("kernels ready (%s backend) in %.1fs", backend.name, time.monotonic() - started)

    def _starting_text(self) -> str:
        return f"starting: {self._phase}, {time.monotonic() - self._phase_since:.0f}s so far"

    def _init_http(self) -> None:
        # xentd_build_info asks on every scrape: "starting" until the kernels are compiled.
        exposition = Exposition(
            self._scrape,
            version=__version__,
            backend=lambda: self.backend.name if self.backend else "starting",
            export=self.config.export,
        )
        cfg = self.config.metrics
        try:
            self.http = MetricsServer(
                cfg.host, cfg.port, make_app(exposition, self.health, cfg.basic_auth), tls=cfg.tls, limits=cfg.http
            )
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        self.http.start()
        # Set first on the way down, so no scrape is left waiting for a restore that will not come.
        self._teardown.append(("metrics server", self.http.stop))
        self._teardown.append(("scrapes waiting for the restore", self._restored.set))

    def _scrape(self) -> Snapshot:
        """What /metrics reads. Until the snapshot is restored it waits, so a scrape
        never reports counters as 0 between two runs (Prometheus would take it for a reset)."""
        self._restored.wait()
        return self.state.snapshot()

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
            if self._ready or self.socket is None:
                log.info("stopping (%s): draining queued messages", why)
            else:
                log.info("stopping (%s) once the kernels are compiled; then draining queued messages", why)
        self._stop.set()

    def _status(self) -> str:
        backend = self.backend.name if self.backend else "?"
        return f"{len(self.state.models)} model(s), {self.state.counters.messages} message(s), backend {backend}"

    def housekeeping(self, force: bool = False) -> None:
        """Between drains: watchdog ping, snapshots, idle-model eviction, expiry of waiting
        predictions past labels.ttl, status."""
        self.notifier.watchdog()
        now = time.monotonic()
        if self.snapshotter is not None:
            self.snapshotter.maybe(now)
        if not force and now < self._housekeeping_due:
            return
        self._housekeeping_due = now + HOUSEKEEPING_SECONDS
        with self.state.lock:
            evicted = self.state.evict_idle(self.clock())
            self.state.joins.expire(self.clock())
        self.heap.maybe(len(self.state.models))
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
        """/healthz: (healthy, body). Failing snapshots are named but keep it healthy:
        the process still scores, and a restart would not bring the disk back."""
        if self._stop.is_set():
            return False, "stopping"
        if not self._ready:
            return False, self._starting_text()
        stalled = time.monotonic() - self._heartbeat
        if stalled > STALL_SECONDS:
            return False, f"scoring loop stalled for {stalled:.0f}s"
        failing = self.snapshotter.failing() if self.snapshotter is not None else None
        if failing is not None:
            count, error = failing
            return True, f"ok; last {count} snapshot(s) failed: {error}"
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
        if self._listening:  # a start refused before that is one error line, from the caller
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


class _StartupProgress:
    """While the main thread compiles: a helper thread tells systemd how far it is
    (STATUS), that it is alive (WATCHDOG=1) and that it needs more time
    (EXTEND_TIMEOUT_USEC), so a slow first start trips neither WatchdogSec= nor
    TimeoutStartSec=. It goes quiet after STARTUP_EXTEND_LIMIT_SECONDS. Outside
    systemd it starts no thread."""

    def __init__(self, notifier: Notifier, describe: Callable[[], str]) -> None:
        self._notifier = notifier
        self._describe = describe
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        interval = notifier.watchdog_interval
        self._tick = min(STARTUP_TICK_SECONDS, interval / 2) if interval else STARTUP_TICK_SECONDS

    def __enter__(self) -> _StartupProgress:
        if self._notifier.enabled:
            self._thread = threading.Thread(target=self._run, name="xentd-startup", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        limit = time.monotonic() + STARTUP_EXTEND_LIMIT_SECONDS
        while time.monotonic() < limit:
            self._notifier.extend(self._describe(), max(STARTUP_EXTEND_SECONDS, 3 * self._tick))
            self._notifier.watchdog()
            if self._done.wait(self._tick):
                return
        self._notifier.status(f"{self._describe()}; taken for hung, no longer extending the start timeout")


def numba_cache_location() -> str:
    """Where Numba keeps the compiled kernels, for log lines."""
    configured = os.environ.get("NUMBA_CACHE_DIR", "")
    if configured:
        return f"{configured} (NUMBA_CACHE_DIR)"
    return f"the __pycache__ folders under {Path(__file__).parent} (NUMBA_CACHE_DIR is unset)"


def warm_cache(config: Config | None = None) -> float:
    """Compile every kernel ``xentd run`` uses into the Numba cache, through the same
    code path, so that the next start loads them. Returns the seconds it took."""
    started = time.monotonic()
    Daemon(config or Config())._init_backend()
    return time.monotonic() - started


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
