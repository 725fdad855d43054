"""Start-up order (docs/reliability.md): ports checked first, /healthz and the ingest socket up before
the kernels compile, and what producers send meanwhile waits in the queue and is scored once ready."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss

from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from xentd import scan
from xentd.client import Publisher
from xentd.config import Config, HttpLimits, IngestConfig, MetricsConfig, StateConfig
from xentd.daemon import Daemon

COMPILE_DEADLINE = 600.0  # an empty cache on a loaded machine; polled, never asserted as a time


def _get(url: str, timeout: float = 60.0) -> tuple[int, str]:
    # A scrape of restored models while the fold kernels still compile waits for them: a long timeout.
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _send(path: Path, ingest: str, model: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xentd", "send", str(path), "--model", model, "--to", ingest],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_a_cold_start_serves_healthz_and_scores_what_was_sent_while_compiling(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    batches = []
    for i in range(2):
        p, y = softmax(rng.normal(0, 2, (200, 5))), rng.integers(0, 5, 200)
        np.savez(tmp_path / f"b{i}.npz", predictions=p, targets=y)
        batches.append((p, y))
    config = f'[state]\ndirectory = "{tmp_path / "state"}"\nsnapshot_interval = "1h"\n'

    # A first run (warm cache) scores batch 0 and leaves a snapshot on stop.
    first = start_daemon(config)
    _send(tmp_path / "b0.npz", first.ingest, "m")
    first.wait_for("xentd_samples_total", 200.0, model="m")
    # The multi-threaded builds load (here) or compile after READY, in the background.
    deadline = time.monotonic() + COMPILE_DEADLINE
    while not any("multi-threaded kernels ready in" in line for line in first.lines):
        assert time.monotonic() < deadline and first.proc.poll() is None, first.log
        time.sleep(0.05)
    ready_at = next(i for i, line in enumerate(first.lines) if "ready: ingest" in line)
    assert ready_at < next(i for i, line in enumerate(first.lines) if "multi-threaded kernels ready" in line)
    assert first.stop(signal.SIGTERM) == 0

    # The second start has an empty kernel cache: it compiles everything.
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    d = start_daemon(config, env={"NUMBA_CACHE_DIR": str(cache)}, wait="listening")
    deadline = time.monotonic() + COMPILE_DEADLINE
    while "compiling kernels" not in (health := d.get("/healthz"))[1]:  # after the (short) restore
        assert health[0] == 503 and health[1].startswith("starting"), health
        assert time.monotonic() < deadline, d.log
        time.sleep(0.02)
    assert health[0] == 503 and health[1].startswith("starting: compiling kernels"), health
    # /metrics already serves the restored counts: no reset to 0 between the two runs.
    status, text = _get(d.http + "/metrics")
    assert status == 200 and 'xentd_samples_total{model="m"} 200.0' in text, text[:2000]
    assert 'backend="starting"' in text

    _send(tmp_path / "b1.npz", d.ingest, "m")  # `xentd send` returns before the daemon is ready ...
    assert d.get("/healthz")[0] == 503  # ... as this shows: the batch waits in the socket's queue

    d.wait_ready()
    assert d.get("/healthz") == (200, "ok\n")
    d.wait_for("xentd_samples_total", 400.0, model="m")
    p = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    total = d.value("xentd_cross_entropy_nats_sum", model="m")
    assert total == pytest.approx(log_loss(y, p, labels=range(5), normalize=False), rel=1e-12)
    assert d.value("xentd_batches_total", model="m") == 2
    assert [labels for (name, labels) in d.samples() if name == "xentd_build_info"][0] >= {("backend", "cpu")}
    compiling = next(line for line in d.lines if "compiling kernels:" in line)
    assert str(cache) in compiling and "loaded from the Numba cache" in compiling
    assert any("kernels ready (cpu backend) in" in line for line in d.lines)
    assert any(f.suffix == ".nbc" for f in cache.rglob("*"))  # the compile filled the cache it was given
    # Scoring went on while the multi-threaded builds compile in the background (on an empty
    # cache, minutes more), and a stop does not wait for them: the daemon exits at once (within
    # stop's 30 s), with everything it scored in its final snapshot.
    assert d.stop(signal.SIGTERM) == 0
    after = start_daemon(config)
    assert after.value("xentd_samples_total", model="m") == 400.0
    assert after.value("xentd_cross_entropy_nats_sum", model="m") == total


def test_a_stop_while_compiling_still_scores_what_is_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the SIGTERM handler does (request_stop) during the compile waits for it, then drains
    the queue like any stop: the batch sent meanwhile is scored and in the final snapshot.
    In-process, with the compile stretched, so that the stop surely lands inside it."""
    compiling, release = threading.Event(), threading.Event()
    real_warmup = scan.warmup

    def held_warmup() -> None:
        compiling.set()
        assert release.wait(60)
        real_warmup()

    monkeypatch.setattr(scan, "warmup", held_warmup)
    config = Config(
        ingest=IngestConfig(address="tcp://127.0.0.1:*"),
        metrics=MetricsConfig(port=0),
        state=StateConfig(directory=str(tmp_path)),
    )
    d = Daemon(config)
    starting = threading.Thread(target=d.initialize, kwargs={"install_signals": False})
    starting.start()
    assert compiling.wait(60)
    with Publisher(d.ingest_endpoint) as pub:
        pub.send("q", softmax(np.zeros((50, 3))), np.zeros(50, np.int64))
    assert d.socket is not None and d.socket.poll(10_000)  # queued (nothing reads it yet)
    d.request_stop("SIGTERM")
    assert d.health() == (False, "stopping")
    release.set()
    starting.join(60)
    assert d.run() == 0
    restored = Daemon(config)
    restored._init_state()
    assert [(m.name, m.samples) for m in restored.state.snapshot().models] == [("q", 50.0)]


def _listening_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("which", ["ingest", "metrics"])
def test_a_busy_port_is_one_line_before_any_compile(tmp_path: Path, which: str) -> None:
    busy = _listening_port()
    port = busy.getsockname()[1]
    ingest = f"tcp://127.0.0.1:{port}" if which == "ingest" else "tcp://127.0.0.1:*"
    metrics = f"127.0.0.1:{port}" if which == "metrics" else "127.0.0.1:0"
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "xentd", "run", "--ingest", ingest, "--metrics", metrics],
            capture_output=True,
            text=True,
            timeout=COMPILE_DEADLINE,
            env={**os.environ, "NUMBA_CACHE_DIR": str(cache)},
        )
    finally:
        busy.close()
    lines = out.stderr.strip().splitlines()
    expected = f"cannot bind ingest endpoint {ingest}" if which == "ingest" else f"cannot serve metrics on {metrics}"
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("xentd: error: ") and expected in lines[0], out.stderr
    assert not [f.name for f in cache.rglob("*") if f.is_file()]  # nothing was compiled first


@pytest.mark.parametrize("which", ["ingest", "metrics"])
def test_a_busy_port_is_refused_before_the_kernels_are_even_imported(which: str) -> None:
    """The port check runs before `xentd.daemon` (NumPy, Numba) is imported, so it answers at once."""
    busy = _listening_port()
    port = busy.getsockname()[1]
    ingest = f"tcp://127.0.0.1:{port}" if which == "ingest" else "tcp://127.0.0.1:*"
    metrics = f"127.0.0.1:{port}" if which == "metrics" else "127.0.0.1:0"
    code = (
        "import sys; from xentd.cli import main; "
        f"rc = main(['run', '--ingest', {ingest!r}, '--metrics', {metrics!r}]); "
        "print(rc, 'numba' in sys.modules, 'xentd.daemon' in sys.modules)"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        busy.close()
    assert out.stdout.split() == ["2", "False", "False"], (out.stdout, out.stderr)
    assert "xentd: error: cannot " in out.stderr


def test_the_metrics_server_gets_the_configured_http_limits() -> None:
    limits = HttpLimits(workers=2, max_queued_requests=3)
    d = Daemon(Config(ingest=IngestConfig(address="tcp://127.0.0.1:*"), metrics=MetricsConfig(port=0, http=limits)))
    try:
        d.initialize(install_signals=False)
        assert d.http is not None and d.http.limits == limits
        # Once compiled, the start-up objects are out of the collector's walks (xentd.heap).
        assert d.heap.freezes >= 1 and gc.get_freeze_count() > 0
    finally:
        d.close()
