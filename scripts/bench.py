#!/usr/bin/env python3
"""xentd benchmarks. Prints a table and writes JSON; see BENCHMARKS.md for results.

    python scripts/bench.py kernels [--quick] [--json PATH] [--inputs logits,probs] [--classes bin,10,32000]
    python scripts/bench.py e2e     [--quick] [--json PATH]
    python scripts/bench.py scale   [--quick] [--json PATH]
    python scripts/bench.py snapshot [--quick] [--json PATH]
    python scripts/bench.py labels  [--quick] [--json PATH]
    python scripts/bench.py fold    [--quick] [--json PATH]
    python scripts/bench.py entropy [--quick] [--json PATH]
    python scripts/bench.py lock    [--quick] [--json PATH]
    python scripts/bench.py cuda    [--quick] [--json PATH]   (needs a GPU)
    python scripts/bench.py all     [--json PATH]

The machine is shared and noisy, so every figure is reported next to a
reference measured in the same run (NumPy, PyTorch, the machine's memory read
bandwidth, a raw pyzmq receive loop); the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from xentd import wire  # noqa: E402
from xentd.kernels import ScoringParams  # noqa: E402
from xentd.kernels.cpu import CpuBackend  # noqa: E402
from xentd.validate import Scratch, validate  # noqa: E402

MB = 1 << 20


def best_of(fn: Callable[[], Any], repeats: int, min_time: float = 0.0) -> tuple[float, float]:
    """(best, median) seconds of ``fn`` over ``repeats`` timed calls, after one warm-up call."""
    fn()
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < repeats or time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "threading_layer": _threading_layer(),
    }


def _threading_layer() -> str:
    try:
        return str(numba.threading_layer())
    except ValueError:
        return "not initialised"


# --- memory bandwidth ----------------------------------------------------------


# fastmath lets the reduction vectorise; without it the sum is bound by the
# latency of one float add per element, not by memory.
@njit(parallel=True, fastmath=True, cache=True)
def _parallel_sum(a):  # type: ignore[no-untyped-def]
    total = 0.0
    for i in prange(a.shape[0]):
        total += a[i]
    return total


def memory_read_bandwidth(repeats: int) -> float:
    """GB/s of a Numba parallel sum over a 256 MB float32 array."""
    a = np.ones(256 * MB // 4, np.float32)
    best, _ = best_of(lambda: _parallel_sum(a), repeats)
    return a.nbytes / best / 1e9


# --- kernels -------------------------------------------------------------------


def _np_cross_entropy_logits(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A float32 NumPy log-softmax cross-entropy, as a hand-written consumer would."""
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1, keepdims=True)) + m
    return lse[:, 0] - x[np.arange(x.shape[0]), y]


def _np_cross_entropy_probs(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    eps = np.finfo(p.dtype).eps
    return -np.log(np.maximum(p[np.arange(p.shape[0]), y], eps))


def _make_case(
    kind: str, classes: int | None, datatype: str, target_bytes: int, rng: np.random.Generator
) -> tuple[list[Any], np.ndarray, np.ndarray]:
    itemsize = 2 if datatype in ("FP16", "BF16") else 4
    n = max(1, target_bytes // ((classes or 1) * itemsize))
    shape = (n,) if classes is None else (n, classes)
    x = rng.standard_normal(shape, dtype=np.float32) * 3
    if kind == "probs":
        if classes is None:
            x = 1.0 / (1.0 + np.exp(-x))
        else:
            x = np.exp(x - x.max(axis=1, keepdims=True))
            x /= x.sum(axis=1, keepdims=True)
    y = rng.integers(0, classes or 2, n)
    if datatype == "FP16":
        sent: Any = x.astype(np.float16)
    elif datatype == "BF16":
        sent = wire.BF16.from_float32(x)
    else:
        sent = x
    frames = wire.encode("bench", sent, y, input=kind)
    return frames, x, y


def _kernel_case(
    kind: str,
    classes: int | None,
    datatype: str,
    target: int,
    rng: np.random.Generator,
    repeats: int,
    backend: CpuBackend,
    bw: float,
    torch: Any,
    log_loss: Any,
    *,
    with_sklearn: bool,
) -> dict[str, Any]:
    frames, x32, y = _make_case(kind, classes, datatype, target, rng)
    msg = wire.decode(frames, max_message_bytes=1 << 34, max_header_bytes=1 << 16)
    scratch = Scratch()
    # The daemon's path: the kernel checks the values (and widens FP16/BF16) as it scores.
    batch = validate(msg, kernel_checks=True)
    eps = batch.dtype_eps
    params = ScoringParams(eps, 2.0, math.sqrt(eps))
    wire_bytes = msg.tensors["predictions"].array.nbytes
    n = batch.size
    t_kernel, _ = best_of(lambda: backend.score(batch, params), repeats)
    t_full, _ = best_of(lambda: backend.score(validate(msg, kernel_checks=True), params), repeats)
    # The previous path, for comparison: a separate scan (and widening) pass, then the kernel.
    t_host, _ = best_of(lambda: backend.score(validate(msg, scratch), params), repeats)
    row: dict[str, Any] = {
        "input": kind,
        "classes": classes or "binary",
        "datatype": datatype,
        "batch_mb": round(wire_bytes / MB, 1),
        "samples": n,
        "xentd_gbps": wire_bytes / t_kernel / 1e9,
        "xentd_validate_gbps": wire_bytes / t_full / 1e9,
        "validate_cost_pct": 100 * (t_full / t_kernel - 1),
        "host_check_gbps": wire_bytes / t_host / 1e9,
        "xentd_msamples_per_s": n / t_kernel / 1e6,
        "pct_of_memory_bw": 100 * wire_bytes / t_kernel / 1e9 / bw,
    }
    if classes is not None and datatype == "FP32":
        f = _np_cross_entropy_logits if kind == "logits" else _np_cross_entropy_probs
        t_np, _ = best_of(lambda: f(x32, y), max(1, repeats // 2))
        row["numpy_gbps"] = wire_bytes / t_np / 1e9
    if torch is not None:
        row.update(_torch_case(torch, kind, classes, datatype, x32, y, eps, repeats, wire_bytes, t_kernel))
    if log_loss is not None and kind == "probs" and datatype == "FP32" and with_sklearn:
        labels = list(range(classes or 2))
        t_sk, _ = best_of(lambda: log_loss(y, x32, labels=labels), 1)
        row["sklearn_gbps"] = wire_bytes / t_sk / 1e9
    return row


def _torch_case(
    torch: Any,
    kind: str,
    classes: int | None,
    datatype: str,
    x32: np.ndarray,
    y: np.ndarray,
    eps: float,
    repeats: int,
    wire_bytes: int,
    t_kernel: float,
) -> dict[str, float]:
    F = torch.nn.functional
    tx = torch.from_numpy(x32)
    if datatype == "FP16":
        tx = tx.half()
    elif datatype == "BF16":
        tx = tx.bfloat16()
    ty = torch.from_numpy(y)
    if classes is None:
        tyf = ty.to(tx.dtype)
        if kind == "logits":

            def fn() -> Any:
                return F.binary_cross_entropy_with_logits(tx, tyf, reduction="none")
        else:

            def fn() -> Any:
                return F.binary_cross_entropy(tx.clamp(eps, 1 - eps), tyf, reduction="none")
    elif kind == "logits":

        def fn() -> Any:
            return F.cross_entropy(tx, ty, reduction="none")
    else:

        def fn() -> Any:
            return F.nll_loss(torch.log(tx.clamp_min(eps)), ty, reduction="none")

    t_torch, _ = best_of(fn, repeats)
    return {"torch_gbps": wire_bytes / t_torch / 1e9, "speedup_vs_torch": t_torch / t_kernel}


def bench_kernels(args: argparse.Namespace) -> dict[str, Any]:
    repeats = 3 if args.quick else 5
    target = (16 if args.quick else 64) * MB
    rng = np.random.default_rng(0)
    threads = numba.get_num_threads()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    try:
        from sklearn.metrics import log_loss
    except ImportError:
        log_loss = None
    bw = memory_read_bandwidth(repeats)
    print(f"memory read bandwidth (numba parallel sum, 256 MB): {bw:.1f} GB/s, {threads} threads")
    backend = CpuBackend(parallel_threshold=1 << 15)
    backend.warmup()
    classes_list: list[int | None] = [None, 10, 32, 100, 1000, 32_000, 128_000]
    if args.classes:
        wanted = {None if c == "bin" else int(c) for c in args.classes.split(",")}
        classes_list = [c for c in classes_list if c in wanted] + sorted(c for c in wanted - {*classes_list} if c)
    rows = []
    header = (
        f"{'input':<7}{'C':>8}{'dtype':>6}{'MB':>6}{'xentd GB/s':>11}{'+valid.':>9}{'cost%':>6}{'host':>6}"
        f"{'Msamp/s':>9}{'%mem':>6}{'numpy':>7}{'torch':>7}{'sklearn':>8}{'x torch':>8}"
    )
    print(header)
    for kind in args.inputs.split(","):
        for classes in classes_list:
            dtypes = ["FP32"] + (["FP16", "BF16"] if classes is not None and classes >= 32_000 else [])
            if args.dtypes:
                dtypes = [d for d in dtypes if d in args.dtypes.split(",")]
            for datatype in dtypes:
                row = _kernel_case(
                    kind,
                    classes,
                    datatype,
                    target,
                    rng,
                    repeats,
                    backend,
                    bw,
                    torch,
                    log_loss,
                    with_sklearn=not args.quick,
                )
                rows.append(row)
                print(
                    f"{kind:<7}{str(classes or 'bin'):>8}{datatype:>6}{row['batch_mb']:>6.0f}"
                    f"{row['xentd_gbps']:>11.2f}{row['xentd_validate_gbps']:>9.2f}"
                    f"{row['validate_cost_pct']:>6.0f}{row['host_check_gbps']:>6.2f}"
                    f"{row['xentd_msamples_per_s']:>9.1f}{row['pct_of_memory_bw']:>6.0f}"
                    f"{row.get('numpy_gbps', float('nan')):>7.2f}{row.get('torch_gbps', float('nan')):>7.2f}"
                    f"{row.get('sklearn_gbps', float('nan')):>8.2f}{row.get('speedup_vs_torch', float('nan')):>8.2f}"
                )
    return {"memory_read_gbps": bw, "threads": threads, "rows": rows}


# --- end to end ------------------------------------------------------------------

E2E_WORKLOADS = [
    # name, samples per message, classes, datatype, messages (full run)
    ("64x10 fp32", 64, 10, "FP32", 200_000),
    ("65536x10 fp32", 65_536, 10, "FP32", 1_500),
    ("8x32000 fp16", 8, 32_000, "FP16", 6_000),
]


def _e2e_frames(samples: int, classes: int, datatype: str, model: str) -> list[bytes]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, classes), dtype=np.float32) * 2
    y = rng.integers(0, classes, samples)
    pred = x.astype(np.float16) if datatype == "FP16" else x
    return [bytes(f) for f in wire.encode(model, pred, y, input="logits")]


def _producer(address: str, frames: list[bytes], count: int, start: Any, rate: float) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(address)
    start.wait()
    t0 = time.perf_counter()
    for i in range(count):
        if rate:
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        sock.send_multipart(frames, copy=len(frames[1]) < 65536)
    sock.close()
    # multiprocessing children leave through os._exit, which skips context
    # teardown; only term() waits for queued messages to be flushed.
    ctx.term()


def _raw_receiver(address: str, count: int, ready: Any, result: Any) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.bind(address)
    ready.set()
    nbytes = 0
    for _ in range(count):
        frames = sock.recv_multipart(copy=False)
        nbytes += sum(len(f) for f in frames)
    result.put((time.perf_counter(), nbytes))


def _free_tcp() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _start_producers(
    address: str, frames: list[bytes], total: int, producers: int, rate: float = 0.0
) -> tuple[list[Any], Any]:
    import multiprocessing as mp

    start = mp.Event()
    procs = []
    for k in range(producers):
        share = total // producers + (1 if k < total % producers else 0)
        p = mp.Process(target=_producer, args=(address, frames, share, start, rate / producers))
        p.start()
        procs.append(p)
    return procs, start


def _raw_rate(frames: list[bytes], total: int, producers: int) -> tuple[float, float]:
    import multiprocessing as mp

    address = _free_tcp()
    ready, result = mp.Event(), mp.Queue()
    rx = mp.Process(target=_raw_receiver, args=(address, total, ready, result))
    rx.start()
    ready.wait()
    procs, start = _start_producers(address, frames, total, producers)
    time.sleep(0.5)  # let the producers connect
    t0 = time.perf_counter()
    start.set()
    t_end, nbytes = result.get()
    for p in [*procs, rx]:
        p.join()
    return total / (t_end - t0), nbytes / (t_end - t0)


class _Daemon:
    def __init__(self, config: str = "") -> None:
        import subprocess
        import tempfile

        self.ingest = _free_tcp()
        self._dir = tempfile.TemporaryDirectory()
        cfg = Path(self._dir.name) / "xentd.toml"
        cfg.write_text(config)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xentd",
                "run",
                "--config",
                str(cfg),
                "--ingest",
                self.ingest,
                "--metrics",
                "127.0.0.1:0",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "ready:" in line:
                self.http = "http://" + line.split("metrics http://", 1)[1].split("/metrics", 1)[0]
                break
        else:
            raise RuntimeError("daemon did not start")
        import threading

        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # type: ignore[union-attr]

    def scrape(self) -> tuple[str, float]:
        import urllib.request

        t = time.perf_counter()
        with urllib.request.urlopen(self.http + "/metrics", timeout=30) as r:
            body = r.read().decode()
        return body, time.perf_counter() - t

    def value(self, name: str, model: str) -> float:
        body, _ = self.scrape()
        prefix = f'{name}{{model="{model}"}} '
        for line in body.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        return 0.0

    def rss_bytes(self) -> int:
        return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._dir.cleanup()


def _xentd_rate(
    daemon: _Daemon, model: str, frames: list[bytes], total: int, samples: int, producers: int
) -> tuple[float, float, float]:
    procs, start = _start_producers(daemon.ingest, frames, total, producers)
    time.sleep(0.5)
    before = daemon.value("xentd_cross_entropy_nats_count", model)
    t0 = time.perf_counter()
    start.set()
    expected = before + total * samples
    while True:
        got = daemon.value("xentd_cross_entropy_nats_count", model)
        if got >= expected:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    nbytes = total * sum(len(f) for f in frames)
    return total / elapsed, nbytes / elapsed, got - before


def _latency(daemon: _Daemon, rate: float, frames: list[bytes], probes: int) -> tuple[float, float]:
    """send-to-visible latency of probe batches while a background load runs at ``rate`` msg/s."""
    import zmq

    duration = probes * 0.05 + 2
    procs, start = _start_producers(daemon.ingest, frames, int(rate * duration), 2, rate)
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(daemon.ingest)
    probe = [bytes(f) for f in wire.encode("latency-probe", np.full((1, 10), 0.1, np.float32), np.zeros(1, np.int64))]
    time.sleep(0.5)
    start.set()
    time.sleep(0.5)
    seen = daemon.value("xentd_batches_total", "latency-probe")
    lat = []
    for _ in range(probes):
        t = time.perf_counter()
        sock.send_multipart(probe)
        while daemon.value("xentd_batches_total", "latency-probe") <= seen:
            pass
        lat.append(time.perf_counter() - t)
        seen += 1
        time.sleep(0.02)
    for p in procs:
        p.join()
    sock.close()
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def bench_e2e(args: argparse.Namespace) -> dict[str, Any]:
    producers = 2
    rows = []
    print(
        f"{'workload':<16}{'raw msg/s':>11}{'xentd msg/s':>12}{'ratio':>7}{'raw MB/s':>10}{'xentd MB/s':>11}"
        f"{'ratio':>7}{'Msamples/s':>11}{'lost':>6}"
    )
    daemon = _Daemon("[limits]\nmax_models = 100\n")
    try:
        for name, samples, classes, datatype, messages in E2E_WORKLOADS:
            total = messages // 10 if args.quick else messages
            model = "e2e-" + name.split()[0]
            frames = _e2e_frames(samples, classes, datatype, model)
            raw_msgs, raw_bytes = _raw_rate(frames, total, producers)
            x_msgs, x_bytes, counted = _xentd_rate(daemon, model, frames, total, samples, producers)
            lost = total * samples - counted
            row = {
                "workload": name,
                "messages": total,
                "message_bytes": sum(len(f) for f in frames),
                "raw_msgs_per_s": raw_msgs,
                "raw_bytes_per_s": raw_bytes,
                "xentd_msgs_per_s": x_msgs,
                "xentd_bytes_per_s": x_bytes,
                "xentd_samples_per_s": x_msgs * samples,
                "msg_ratio": x_msgs / raw_msgs,
                "byte_ratio": x_bytes / raw_bytes,
                "lost_samples": lost,
            }
            rows.append(row)
            print(
                f"{name:<16}{raw_msgs:>11.0f}{x_msgs:>12.0f}{x_msgs / raw_msgs:>7.2f}{raw_bytes / 1e6:>10.0f}"
                f"{x_bytes / 1e6:>11.0f}{x_bytes / raw_bytes:>7.2f}{x_msgs * samples / 1e6:>11.2f}{lost:>6.0f}"
            )
        small = rows[0]
        rate = small["xentd_msgs_per_s"] / 2
        p50, p99 = _latency(daemon, rate, _e2e_frames(64, 10, "FP32", "latency-load"), 30 if args.quick else 200)
        print(
            f"send-to-visible latency at {rate:.0f} msg/s (half of max, 64x10): p50 {p50 * 1e3:.1f} ms, "
            f"p99 {p99 * 1e3:.1f} ms"
        )
    finally:
        daemon.close()
    return {"producers": producers, "rows": rows, "latency": {"rate_msgs_per_s": rate, "p50_s": p50, "p99_s": p99}}


# --- scale -------------------------------------------------------------------------


def _multi_producer(address: str, models: int, rounds: int, start: Any) -> None:
    import zmq

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    messages = [[bytes(f) for f in wire.encode(f"model-{m:05d}", x, y, input="logits")] for m in range(models)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.connect(address)
    start.wait()
    for _ in range(rounds):
        for frames in messages:
            sock.send_multipart(frames)
    sock.close()
    ctx.term()


def _ingest(daemon: _Daemon, models: int, rounds: int) -> float:
    """messages/s for ``rounds`` passes over ``models`` models, until all are visible in /metrics."""
    import multiprocessing as mp

    start = mp.Event()
    proc = mp.Process(target=_multi_producer, args=(daemon.ingest, models, rounds, start))
    proc.start()
    time.sleep(1.0 + models / 20_000)  # the producer pre-encodes its messages
    before = _total_batches(daemon)
    t0 = time.perf_counter()
    start.set()
    # A scrape of many models costs seconds of the daemon's CPU, so polling
    # starts only once the producer is done; at most the queues' worth is left.
    proc.join()
    while _total_batches(daemon) < before + models * rounds:
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    return models * rounds / elapsed


def _total_batches(daemon: _Daemon) -> float:
    body, _ = daemon.scrape()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith("xentd_batches_total{"))


def bench_scale(args: argparse.Namespace) -> dict[str, Any]:
    models = 1_000 if args.quick else 10_000
    messages = 20_000 if args.quick else 100_000
    # No series budget: 10,000 10-class models are 1.45 M series, past the default 1 M, and
    # the completion check counts xentd_batches_total over every model.
    daemon = _Daemon(f"[limits]\nmax_models = {models + 10}\n[export]\nmax_series = 0\n")
    try:
        rss_empty = daemon.rss_bytes()
        one = _ingest(daemon, 1, messages)
        many = _ingest(daemon, models, messages // models)
        rss = daemon.rss_bytes()
        times = []
        for _ in range(5):
            body, dt = daemon.scrape()
            times.append(dt)
        size = len(body.encode())
        series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    finally:
        daemon.close()
    result = {
        "models": models,
        "messages": messages,
        "one_model_msgs_per_s": one,
        "many_models_msgs_per_s": many,
        "ratio": many / one,
        "rss_bytes": rss,
        "rss_empty_bytes": rss_empty,
        "scrape_seconds_best": min(times),
        "scrape_seconds_median": statistics.median(times),
        "scrape_bytes": size,
        "series": series,
    }
    print(f"ingest 64x10: 1 model {one:.0f} msg/s, {models} models {many:.0f} msg/s (ratio {many / one:.2f})")
    print(
        f"RSS {rss / 2**20:.0f} MiB ({rss_empty / 2**20:.0f} MiB at start); /metrics: {series} series, "
        f"{size / 2**20:.1f} MiB, scrape best {min(times):.2f} s, median {statistics.median(times):.2f} s"
    )
    return result


def _random_scores(n: int, seed: int = 0) -> Any:
    """Per-sample scores of a 10-class model, as a backend returns them."""
    from xentd.kernels import SampleScores

    rng = np.random.default_rng(seed)
    return SampleScores(
        loss=rng.random(n),
        focal=rng.random(n),
        correct=rng.integers(0, 2, n).astype(np.uint8),
        true_class=rng.integers(0, 10, n),
        unnormalized_rows=0,
        confidence=rng.random(n),
        brier=rng.random(n),
    )


def bench_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    """State snapshots: how long the state lock is held, and the write against a raw write of the same bytes."""
    import tempfile

    from xentd import persist
    from xentd.config import LimitsConfig, WindowsConfig
    from xentd.state import StateStore

    models = 100 if args.quick else 1_000
    clock = lambda: 1.7e9  # noqa: E731
    store = StateStore(WindowsConfig(), LimitsConfig(max_models=models), clock, dedup_window=65536)
    scores = _random_scores(10_000)  # fills the default last_10000 window
    for i in range(models):
        store.model(f"model-{i}", 10).fold(scores, None, clock(), None)
    for i in range(65536):
        store.recent.add((f"model-{i % models}", f"batch-{i}"))
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        directory = Path(tmp)
        capture = []
        write = []
        raw = []
        for _ in range(3):
            t = time.perf_counter()
            with store.lock:
                image = persist.capture(store)
            capture.append(time.perf_counter() - t)
            t = time.perf_counter()
            size = persist.write(directory, image)
            write.append(time.perf_counter() - t)
            blob = os.urandom(size)
            t = time.perf_counter()
            with open(directory / "raw", "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        fresh = StateStore(WindowsConfig(), LimitsConfig(max_models=models), clock, dedup_window=65536)
        restored = persist.restore(fresh, persist.read(directory / persist.FILENAME))
        restore_s = time.perf_counter() - t
    assert restored.models == models
    result = {
        "models": models,
        "bytes": size,
        "lock_held_s": min(capture),
        "write_s": min(write),
        "raw_write_s": min(raw),
        "write_vs_raw": min(raw) / min(write),
        "restore_s": restore_s,
    }
    print(
        f"{models} models (10 classes, full windows), 65,536 batch ids: {size / 2**20:.1f} MiB; "
        f"lock held {min(capture) * 1e3:.1f} ms; write {min(write):.3f} s vs raw write+fsync "
        f"{min(raw):.3f} s ({result['write_vs_raw']:.2f}x); restore {restore_s:.2f} s"
    )
    return result


class _TimedLock:
    """The state lock, recording how long each hold lasted."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self.holds: list[float] = []
        self._t = 0.0

    def __enter__(self) -> None:
        self._lock.acquire()
        self._t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.holds.append(time.perf_counter() - self._t)
        self._lock.release()


def bench_lock(args: argparse.Namespace) -> dict[str, Any]:
    """In process, 10,000 models of 10 classes with 640 samples each (the scale workload):
    the longest single hold of the state lock by a scrape's snapshot, and by a persistence capture."""
    from xentd import persist
    from xentd.config import LimitsConfig, WindowsConfig
    from xentd.state import StateStore

    models = 1_000 if args.quick else 10_000
    clock = lambda: 1.7e9  # noqa: E731
    store = StateStore(WindowsConfig(), LimitsConfig(max_models=models), clock)
    scores = _random_scores(64)
    for i in range(models):
        m = store.model(f"model-{i:05d}", 10)
        for _ in range(10):
            m.fold(scores, None, clock(), None)
            m.fold_predictions(scores.loss, scores.focal, None, clock())
    lock = _TimedLock()
    store.lock = lock  # type: ignore[assignment]
    scrape_longest, scrape_total = [], []
    for _ in range(3):
        lock.holds.clear()
        t = time.perf_counter()
        store.snapshot()
        scrape_total.append(time.perf_counter() - t)
        scrape_longest.append(max(lock.holds))
    capture = []
    for _ in range(3):
        lock.holds.clear()
        with store.lock:
            persist.capture(store)
        capture.append(max(lock.holds))
    result = {
        "models": models,
        "scrape_snapshot_longest_hold_s": min(scrape_longest),
        "scrape_snapshot_total_s": min(scrape_total),
        "persist_capture_hold_s": min(capture),
    }
    print(
        f"{models} models: scrape snapshot {min(scrape_total) * 1e3:.0f} ms in all, longest lock hold "
        f"{min(scrape_longest) * 1e3:.1f} ms; snapshot-file capture holds the lock {min(capture) * 1e3:.0f} ms"
    )
    return result


def bench_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """The CUDA backend on a real GPU: kernel bandwidth against the device's copy bandwidth,
    the auto threshold (where the GPU, transfers included, overtakes the CPU), and end to end."""
    from numba import cuda

    from xentd.kernels import ScoringParams as Params
    from xentd.kernels import cuda as ck
    from xentd.kernels.cpu import CpuBackend
    from xentd.validate import Batch, InputKind, TargetKind

    ok, device = ck.available()
    has_gpu = ok and not ck.SIMULATOR
    params = Params(eps=float(np.finfo(np.float32).eps), focal_gamma=2.0, normalization_tolerance=1e-3)
    result: dict[str, Any] = {"device": device if has_gpu else None, "kernels": [], "threshold": [], "e2e": []}
    if has_gpu:
        print(f"device: {device}")
        gpu: Any = ck.CudaBackend()
    else:
        # The CPU side of every comparison is still measured, so a GPU run only adds its half.
        print(f"no GPU ({device if not ok else 'the simulator is on'}): measuring the CPU side only")
        gpu = None

    # 1. Device-resident logits: kernel time alone, against a device-to-device copy of the same bytes.
    for classes in (32_000, 128_000) if has_gpu else ():
        rows = max(8, (256 if args.quick else 1024) * MB // (classes * 4))
        x = cuda.to_device(np.random.default_rng(0).standard_normal((rows, classes), dtype=np.float32))
        y = cuda.to_device(np.random.default_rng(1).integers(0, classes, rows))
        outs = [cuda.device_array(rows, dt) for dt in (np.float64, np.float64, np.uint8, np.int64, np.uint8)]
        copy = cuda.device_array_like(x)

        def kernel(x: Any = x, y: Any = y, outs: Any = outs, rows: int = rows) -> None:
            ck._multiclass_index[min(gpu.blocks * 4, rows), gpu.threads](
                x, y, int(InputKind.LOGITS), params.eps, 2.0, 1e-3, *outs
            )
            cuda.synchronize()

        def d2d(x: Any = x, copy: Any = copy) -> None:
            copy.copy_to_device(x)
            cuda.synchronize()

        k_best, _ = best_of(kernel, 10)
        c_best, _ = best_of(d2d, 10)
        nbytes = rows * classes * 4
        kernel_bw, copy_bw = nbytes / k_best, 2 * nbytes / c_best  # a copy reads and writes
        row = {
            "classes": classes,
            "rows": rows,
            "bytes": nbytes,
            "kernel_s": k_best,
            "kernel_GBps": kernel_bw / 1e9,
            "copy_GBps": copy_bw / 1e9,
            "ratio": kernel_bw / copy_bw,
        }
        result["kernels"].append(row)
        print(
            f"FP32 logits C={classes}: kernel {kernel_bw / 1e9:.0f} GB/s, device copy {copy_bw / 1e9:.0f} GB/s, "
            f"ratio {kernel_bw / copy_bw:.2f} (target >= 0.70)"
        )

    # 2. The auto threshold: host batch in, scores out, on each backend.
    cpu = CpuBackend()
    cpu.warmup()
    if gpu is not None:
        gpu.warmup()
    for classes in (1_000, 32_000):
        for elements in (1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24):
            rows = max(1, elements // classes)
            pred = np.random.default_rng(2).standard_normal((rows, classes), dtype=np.float32)
            pred.flags.writeable = False
            tgt = np.random.default_rng(3).integers(0, classes, rows)
            tgt.flags.writeable = False
            batch = Batch(
                model="t",
                kind=InputKind.LOGITS,
                predictions=pred,
                targets=tgt,
                target_kind=TargetKind.INDEX,
                weights=None,
                num_classes=classes,
                prediction_datatype="FP32",
                batch_id=None,
                ts=None,
            )
            c, _ = best_of(lambda b=batch: cpu.score(b, params), 5)
            g = best_of(lambda b=batch: gpu.score(b, params), 5)[0] if gpu is not None else math.nan
            result["threshold"].append({"classes": classes, "elements": rows * classes, "cpu_s": c, "gpu_s": g})
            print(
                f"C={classes:>6} {rows * classes:>10} values: cpu {c * 1e3:8.2f} ms, gpu {g * 1e3:8.2f} ms "
                f"({c / g:5.2f}x)"
            )

    # 3. End to end: the daemon on each backend.
    for backend in ("cpu", "cuda") if has_gpu else ("cpu",):
        daemon = _Daemon(f'[engine]\nbackend = "{backend}"\n')
        try:
            for samples, classes, messages in (
                (8, 32_000, 600 if args.quick else 6_000),
                (64, 128_000, 40 if args.quick else 400),
            ):
                model = f"e2e-{samples}x{classes}"
                frames = _e2e_frames(samples, classes, "FP32", model)
                msgs, nbytes, counted = _xentd_rate(daemon, model, frames, messages, samples, 2)
                result["e2e"].append(
                    {
                        "backend": backend,
                        "workload": f"{samples}x{classes}",
                        "msgs_per_s": msgs,
                        "bytes_per_s": nbytes,
                        "lost": messages * samples - counted,
                    }
                )
                print(f"e2e {backend:4s} {samples}x{classes} FP32 logits: {msgs:.0f} msg/s, {nbytes / 1e9:.2f} GB/s")
        finally:
            daemon.close()
    return result


# --- delayed labels (xentd.joins) --------------------------------------------------


def _join_store_figures(quick: bool) -> dict[str, Any]:
    """In process: labels joined per second, and what a waiting prediction costs at a full store."""
    from xentd import joins
    from xentd.joins import JoinStore, PoolKey

    joins.warmup()  # compiled (or loaded from the cache) before anything is timed
    out: dict[str, Any] = {}
    waiting = 200_000 if quick else 2_000_000
    rng = np.random.default_rng(1)
    for label, key, row in (
        ("10 classes FP32", PoolKey(1, "FP32", 10, False), np.ones((waiting, 10), np.float32)),
        ("binary FP32", PoolKey(1, "FP32", 0, False), np.ones(waiting, np.float32)),
    ):
        ids = rng.permutation(np.arange(waiting, dtype=np.uint64) * np.uint64(2654435761))
        put_s = math.inf
        for _ in range(2):  # the first round also pages in the memory; the best of two is reported
            store = JoinStore(1 << 40, 3600.0, (1.0,), epoch=0.0)
            t = time.perf_counter()
            for start in range(0, waiting, 65536):
                store.put("m", key, ids[start : start + 65536], row[start : start + 65536], None, 1.0)
            put_s = min(put_s, time.perf_counter() - t)
        order = rng.permutation(waiting)
        rates = {}
        # 64: one labels message per call; 4096: a drain of 64 of them, which the daemon joins in one call.
        for k, batch in enumerate((64, 4096, 65536)):
            part = order[k * waiting // 3 : (k + 1) * waiting // 3]
            chunks = [ids[part[i : i + batch]] for i in range(0, len(part), batch)]
            t = time.perf_counter()
            matched = 0
            for chunk in chunks:
                result = store.take("m", chunk, 2.0)
                store.record("m", result)  # as the daemon does, with the fold
                matched += sum(len(j.label_rows) for j in result.joined)
            rates[batch] = matched / (time.perf_counter() - t)
        out[label] = {
            "waiting": waiting,
            "puts_per_s": waiting / put_s,
            **{f"joins_per_s_batches_of_{b}": r for b, r in rates.items()},
        }
        print(
            f"{label:<16} put {waiting / put_s / 1e6:6.2f} M rows/s   join M labels/s: "
            + "  ".join(f"{r / 1e6:5.2f} ({b} per call)" for b, r in rates.items())
        )
    # A full store: the bytes each waiting prediction costs, all overheads included.
    budget = (16 if quick else 256) * MB
    for label, key, cols, weights in (
        ("10 classes FP32", PoolKey(1, "FP32", 10, False), 10, False),
        ("10 classes FP32 weighted", PoolKey(1, "FP32", 10, True), 10, True),
        ("binary FP32", PoolKey(1, "FP32", 0, False), 0, False),
        ("1000 classes FP16", PoolKey(1, "FP16", 1000, False), 1000, False),
    ):
        store = JoinStore(budget, 3600.0, (1.0,), epoch=0.0)
        dtype = np.float16 if key.datatype == "FP16" else np.float32
        n = 4096
        rows = np.ones((n, cols) if cols else n, dtype)
        w = np.ones(n) if weights else None
        sent = 0
        while store.stats_for("m").count("evicted") == 0 or sent < 4 * budget // (rows.nbytes // n + 12):
            store.put("m", key, np.arange(sent, sent + n, dtype=np.uint64), rows, w, 1.0 + sent * 1e-6)
            sent += n
        row_bytes = rows.nbytes // n + (8 if weights else 0)
        cost = store.nbytes / store.pending("m")
        out[f"full store, {label}"] = {
            "budget": budget,
            "store_bytes": store.nbytes,
            "pending": store.pending("m"),
            "bytes_per_waiting": cost,
            "row_bytes": row_bytes,
            "ratio_to_row_plus_16": cost / (row_bytes + 16),
        }
        print(
            f"full {budget // MB} MiB store, {label:<26} {cost:7.1f} B per waiting prediction "
            f"= {cost / (row_bytes + 16):.2f} x (row {row_bytes} B + 16)"
        )
    return out


def _label_producer(address: str, model: str, count: int, first_id: int, start: Any) -> None:
    """Labels-only messages of 64 ids each, ids first_id, first_id + 1, ... (each joins one waiting row)."""
    import zmq

    targets = np.random.default_rng(2).integers(0, 10, 64)
    header, *_ = wire.encode(model, targets=targets, ids=np.zeros(64, np.int64))
    target_frame = targets.astype("<i8").tobytes()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(address)
    base = np.arange(64, dtype=np.int64)
    start.wait()
    for i in range(count):
        sock.send_multipart([header, target_frame, (base + (first_id + 64 * i)).tobytes()])
    sock.close()
    ctx.term()


def _labels_rate(address: str, model: str, total: int, producers: int, after: Callable[[], bool] | None) -> float:
    import multiprocessing as mp

    start = mp.Event()
    procs = []
    share = total // producers
    for k in range(producers):
        p = mp.Process(target=_label_producer, args=(address, model, share, k * share * 64, start))
        p.start()
        procs.append(p)
    time.sleep(0.5)
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    if after is not None:
        while not after():
            time.sleep(0.01)
    return producers * share / (time.perf_counter() - t0)


def bench_labels(args: argparse.Namespace) -> dict[str, Any]:
    """Delayed labels: in-process joins, bytes per waiting prediction, and labels-only messages
    of 64 ids end to end against a raw pyzmq receive loop and against 64x10 full messages."""
    import multiprocessing as mp

    out: dict[str, Any] = {"in_process": _join_store_figures(args.quick)}
    producers = 2
    total = 10_000 if args.quick else 60_000  # labels-only messages of 64 ids
    total -= total % producers
    daemon = _Daemon("[limits]\nmax_models = 10\n")
    try:
        # Predictions first: total * 64 rows of 10-class FP32 logits waiting under ids 0, 1, ...
        import zmq

        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(daemon.ingest)
        x = np.random.default_rng(3).standard_normal((64 * 1024, 10), dtype=np.float32)
        for start in range(0, total * 64, 64 * 1024):
            n = min(64 * 1024, total * 64 - start)
            sock.send_multipart(wire.encode("labels", x[:n], ids=np.arange(start, start + n), input="logits"))
        sock.close(linger=-1)
        while daemon.value("xentd_pending_predictions", "labels") < total * 64:
            time.sleep(0.05)
        # Raw pyzmq receive of the same frames, then xentd, then 64x10 full messages: side by side.
        address = _free_tcp()
        ready, result = mp.Event(), mp.Queue()
        rx = mp.Process(target=_raw_receiver, args=(address, total, ready, result))
        rx.start()
        ready.wait()
        t0 = time.perf_counter()
        raw = _labels_rate(address, "labels", total, producers, None)
        t_end, _ = result.get()
        rx.join()
        raw = total / (t_end - t0 - 0.5)

        def joined() -> bool:
            return daemon.value("xentd_samples_total", "labels") >= total * 64

        xentd = _labels_rate(daemon.ingest, "labels", total, producers, joined)
        body, _ = daemon.scrape()
        matched = [
            line for line in body.splitlines() if line.startswith("xentd_label_joins_total") and "matched" in line
        ]
        frames = _e2e_frames(64, 10, "FP32", "full-64x10")
        raw_full, _ = _raw_rate(frames, total, producers)
        full, _, _ = _xentd_rate(daemon, "full-64x10", frames, total, 64, producers)
        rss = daemon.rss_bytes()
    finally:
        daemon.close()
    out["e2e"] = {
        "messages": total,
        "raw_labels_msgs_per_s": raw,
        "xentd_labels_msgs_per_s": xentd,
        "labels_ratio": xentd / raw,
        "raw_full_msgs_per_s": raw_full,
        "xentd_full_msgs_per_s": full,
        "full_ratio": full / raw_full,
        "daemon_rss_bytes": rss,
        "join_outcomes": matched,
    }
    print("\n".join(matched))
    print(
        f"labels-only, 64 ids: raw {raw:,.0f} msg/s, xentd {xentd:,.0f} msg/s, ratio {xentd / raw:.2f}   |   "
        f"64x10 full: raw {raw_full:,.0f}, xentd {full:,.0f}, ratio {full / raw_full:.2f}   "
        f"(daemon RSS {rss / MB:.0f} MiB with {total * 64:,} predictions joined)"
    )
    return out


def bench_entropy(args: argparse.Namespace) -> dict[str, Any]:
    """In process: the label-free pass (entropy and confidence of every row, xentd.predstats)
    on FP32 logits, next to the CPU scoring kernel on the same rows."""
    from xentd.jit import kernel_array
    from xentd.predstats import row_stats
    from xentd.validate import Batch, InputKind, TargetKind

    backend = CpuBackend(parallel_threshold=1 << 62)  # serial, as the entropy pass is
    params = ScoringParams(eps=float(np.finfo(np.float32).eps), focal_gamma=2.0, normalization_tolerance=3e-4)
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for rows, classes in ((64, 10), (65_536, 10), (8, 32_000), (256, 1_000)):
        x = kernel_array((rng.standard_normal((rows, classes)) * 2).astype(np.float32))
        y = kernel_array(rng.integers(0, classes, rows))
        batch = Batch("b", InputKind.LOGITS, x, y, TargetKind.INDEX, None, classes, "FP32", None, None)
        repeats = max(3, (200_000 if args.quick else 2_000_000) // x.size)
        entropy_s, _ = best_of(lambda x=x: row_stats(x, InputKind.LOGITS), repeats)
        score_s, _ = best_of(lambda batch=batch: backend.score(batch, params), repeats)
        out[f"{rows}x{classes}"] = {"entropy_s": entropy_s, "score_s": score_s, "ratio": entropy_s / score_s}
        print(
            f"{rows:>6} x {classes:<6} entropy {entropy_s * 1e6:9.1f} us ({entropy_s / x.size * 1e9:4.1f} ns a value)"
            f"   scoring {score_s * 1e6:9.1f} us   entropy / scoring {entropy_s / score_s:5.2f}"
        )
    return out


def bench_fold(args: argparse.Namespace) -> dict[str, Any]:
    """In process: microseconds to fold one batch into a model's state (every window), and the
    label-free fold of its predictions, for 64 samples of 10 classes, the small-message case."""
    from xentd.config import LimitsConfig, WindowsConfig
    from xentd.state import ModelState

    model = ModelState("m", 10, WindowsConfig(), LimitsConfig(), 1e9)
    repeats = 5_000 if args.quick else 50_000
    scores = _random_scores(64)  # the fold's cost does not depend on the values
    out: dict[str, Any] = {}
    for name, fold in (
        ("fold", lambda t: model.fold(scores, None, t, None)),
        ("fold_predictions", lambda t: model.fold_predictions(scores.loss, scores.focal, None, t)),
    ):
        for i in range(100):
            fold(1e9 + i)
        best = math.inf
        for r in range(5):
            t0 = time.perf_counter()
            for i in range(repeats):
                fold(1e9 + 100 + r * repeats + i * 1e-3)
            best = min(best, (time.perf_counter() - t0) / repeats)
        out[name + "_us"] = best * 1e6
        print(f"{name:<18} {best * 1e6:6.2f} us per 64-sample batch (best of 5 x {repeats})")
    return out


BENCHES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "labels": bench_labels,
    "fold": bench_fold,
    "entropy": bench_entropy,
    "lock": bench_lock,
    "kernels": bench_kernels,
    "e2e": bench_e2e,
    "scale": bench_scale,
    "snapshot": bench_snapshot,
    "cuda": bench_cuda,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=[*BENCHES, "all"])
    p.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats (smoke test)")
    p.add_argument("--json", type=Path, help="write results here (default: bench-results/<which>.json)")
    p.add_argument("--inputs", default="logits,probs", help="kernels: input kinds to run (comma-separated)")
    p.add_argument("--classes", default="", help="kernels: class counts to run, 'bin' for binary (default: all)")
    p.add_argument("--dtypes", default="", help="kernels: datatypes to run, e.g. FP32 (default: all)")
    args = p.parse_args()
    # Producers and receivers are separate processes. Fork after Numba's OpenMP
    # pool has started can deadlock the child, so they are spawned.
    import multiprocessing as mp

    mp.set_start_method("spawn")
    if os.environ.get("XENTD_BENCH_WATCHDOG"):
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["XENTD_BENCH_WATCHDOG"]), exit=True)
    names = list(BENCHES) if args.which == "all" else [args.which]
    result: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result["machine"]))
    for name in names:
        print(f"\n== {name} ==")
        result[name] = BENCHES[name](args)
    out = args.json or ROOT / "bench-results" / f"{args.which}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
