#!/usr/bin/env python3
"""Time `xentd run` from launch to its first /healthz answer and to /healthz 200 (ready to score).

    .venv/bin/python scripts/startup_time.py            # cold (empty Numba cache), then warm, 3 runs each
    .venv/bin/python scripts/startup_time.py --runs 5 --only warm

"cold" gives every run a fresh, empty NUMBA_CACHE_DIR: a first start without
the warm-up. "warm" first fills one cache directory the way scripts/install
does (xentd.daemon.warm_cache, in its own process), then times starts that
load from it: the first start after an install, and every later one. The daemon runs with the default
configuration on loopback, ephemeral ports, no state directory.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

POLL_SECONDS = 0.01
TIMEOUT_SECONDS = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None  # not listening yet


def one_start(cache: str) -> tuple[float, float, float]:
    """(seconds to the first /healthz answer, to /healthz 200, compile seconds as logged)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    args = [sys.executable, "-m", "xentd", "run", "--ingest", "tcp://127.0.0.1:*", "--metrics", f"127.0.0.1:{port}"]
    launched = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    try:
        while True:
            status = _health(url)
            now = time.monotonic() - launched
            if status is not None and first is None:
                first = now
            if status == 200:
                break
            if proc.poll() is not None or now > TIMEOUT_SECONDS:
                raise SystemExit(f"xentd exited or did not become ready:\n{proc.communicate()[1]}")
            time.sleep(POLL_SECONDS)
    finally:
        proc.terminate()
        _, log = proc.communicate(timeout=60)
    assert first is not None
    compiled = re.search(r"kernels ready \(\S+ backend\) in ([\d.]+)s", log)
    return first, now, float(compiled.group(1)) if compiled else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=["cold", "warm"])
    args = p.parse_args()
    print(f"cpus {os.cpu_count()}, python {sys.version.split()[0]}, {args.runs} run(s) each; seconds from launch")
    for kind in ("cold", "warm"):
        if args.only not in (None, kind):
            continue
        with tempfile.TemporaryDirectory(prefix="xentd-numba-") as shared:
            if kind == "warm":
                subprocess.run(
                    [sys.executable, "-c", "from xentd.daemon import warm_cache; warm_cache()"],
                    env={**os.environ, "NUMBA_CACHE_DIR": shared},
                    check=True,
                )
            rows = []
            for _ in range(args.runs):
                if kind == "cold":
                    with tempfile.TemporaryDirectory(prefix="xentd-numba-") as fresh:
                        rows.append(one_start(fresh))
                else:
                    rows.append(one_start(shared))
        for name, i in (("first /healthz answer", 0), ("/healthz 200", 1), ("compile (logged)", 2)):
            values = [r[i] for r in rows]
            print(
                f"{kind:4}  {name:22} median {statistics.median(values):6.2f}  "
                f"min {min(values):6.2f}  max {max(values):6.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
