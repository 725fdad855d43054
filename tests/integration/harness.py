"""The real daemon as a subprocess, reached over real sockets and HTTP. Used by tests and scripts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

READY_RE = re.compile(r"ready: ingest (\S+) \(\w+\), metrics https?://([^/]+)/metrics")
# Logged before the kernels compile: sockets bound, /healthz answering 503.
LISTENING_RE = re.compile(r"listening: ingest (\S+) \(\w+\), metrics https?://([^/]+)/metrics")
STARTUP_TIMEOUT = 600.0  # a cold numba cache compiles every kernel first: minutes on a loaded 2-core machine


class DaemonProcess:
    def __init__(
        self,
        tmp_path: Path,
        config: str = "",
        ingest: str | None = "tcp://127.0.0.1:*",
        *,
        metrics: str | None = "127.0.0.1:0",
        env: dict[str, str] | None = None,
        scheme: str = "http",
        wait: str = "ready",
    ) -> None:
        """Start ``xentd run`` and wait for its ``ready`` log line, or with
        ``wait="listening"`` only for its sockets (then :meth:`wait_ready`)."""
        cfg = tmp_path / "xentd.toml"
        cfg.write_text(config)
        args = [sys.executable, "-m", "xentd", "run", "--config", str(cfg)]
        if metrics is not None:
            args += ["--metrics", metrics]
        if ingest is not None:
            args += ["--ingest", ingest]
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._listening = threading.Event()
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._scheme = scheme
        if wait == "listening":
            self._wait(self._listening, LISTENING_RE, "listen")
        else:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the ``ready`` log line: the kernels are compiled and scoring runs."""
        self._wait(self._ready, READY_RE, "become ready")

    def _wait(self, event: threading.Event, pattern: re.Pattern[str], what: str) -> None:
        if not event.wait(STARTUP_TIMEOUT) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError(f"daemon did not {what}:\n" + self.log)
        match = next(m for m in map(pattern.search, self.lines) if m)
        self.ingest = match.group(1)
        self.http = f"{self._scheme}://{match.group(2)}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if LISTENING_RE.search(line):
                self._listening.set()
            if READY_RE.search(line):
                self._ready.set()
        self._listening.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, frozenset(labels.items())))

    def wait_for(self, name: str, expected: float, timeout: float = 30.0, **labels: str) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(name, **labels)
            if got == expected:
                return
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} is {got}, expected {expected}\n{self.log}")

    def wait_for_at_least(self, name: str, minimum: float, timeout: float = 60.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(name, **labels)
            if got is not None and got >= minimum:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} is {got}, expected at least {minimum}\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("daemon did not exit after signal:\n" + self.log) from None
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code
