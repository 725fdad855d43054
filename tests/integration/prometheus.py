"""A real Prometheus server on loopback, scraping real xentd daemons (Debian's prometheus package)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "xentd.rules.yml"

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (scripts/test installs it when run as root)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusProcess:
    def __init__(self, tmp: Path, targets: list[str], *, scrape_interval: str = "1s") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n  - job_name: xentd\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = tmp / "prometheus.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("prometheus did not start:\n" + self.log.read_text())
            time.sleep(0.2)

    def query(self, expr: str) -> dict[frozenset[tuple[str, str]], float]:
        """Instant query; {labels without __name__: value}."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return {
            frozenset((k, v) for k, v in r["metric"].items() if k != "__name__"): float(r["value"][1])
            for r in body["data"]["result"]
        }

    def wait_until(
        self, expr: str, predicate: object, timeout: float = 60.0
    ) -> dict[frozenset[tuple[str, str]], float]:
        deadline = time.monotonic() + timeout
        result: dict[frozenset[tuple[str, str]], float] = {}
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):  # type: ignore[operator]
                return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: {result}\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
