"""Per-message cost of the daemon's hot path, next to a raw pyzmq receive loop.

Usage:
    .venv/bin/python scripts/ingest_profile.py                      # this checkout
    .venv/bin/python scripts/ingest_profile.py --against /tmp/base  # side by side with another checkout
    .venv/bin/python scripts/ingest_profile.py --profile            # plus a cProfile top list
    .venv/bin/python scripts/ingest_profile.py --aged               # models at steady state (see _age)
    ... --parallel-threshold 4611686018427387904                      # serial scoring kernels only

Messages are 64 x 10 FP32 logits with int64 class indices, a producer and seq, and a
unique batch_id, encoded before any clock starts. Figures (microseconds per message):

- ``raw``: a plain ``recv_multipart(copy=False)`` loop on a PULL socket, fed over tcp
  loopback by a sender process (the bound on what any consumer of that socket can do);
- ``inproc_1`` / ``inproc_1000``: ``Daemon.handle_many`` on drains of ``--drain``
  messages already received (zmq frames), for one model and for 1,000 models round-robin;
- ``e2e_1`` / ``e2e_1000``: the daemon's loop (drain the socket, handle the drain) fed
  by the same sender; ``raw / e2e`` is the ratio the issue's targets are stated in;
- ``thread_1`` / ``thread_1000`` (when ``xentd.receiver`` exists): the same with the
  socket read on a receive thread (:class:`xentd.receiver.Receiver`).

With ``--against DIR`` every measurement runs in a fresh process, alternating between
DIR's xentd and this checkout's, ``--repeats`` times; the table shows medians. The
machine is shared and noisy: only side-by-side medians mean anything.

A full drain of 64 x 10 messages (163,840 values) is past the default
``engine.parallel_threshold``, so the parallel scoring kernel runs; on two busy
cores it was slower than the serial one, hence ``--parallel-threshold``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

HERE = Path(__file__).resolve().parent.parent


def _encode(count: int, models: int, run: int) -> list[list[bytes]]:
    from xentd import wire

    rng = np.random.default_rng(run)
    x = rng.normal(0, 2, (count, 64, 10)).astype(np.float32)
    y = rng.integers(0, 10, (count, 64))
    return [
        [
            bytes(f)
            for f in wire.encode(
                f"model-{i % models}",
                x[i],
                y[i],
                input="logits",
                batch_id=f"r{run}-{i}",
                producer=f"p{run}",
                seq=i,
            )
        ]
        for i in range(count)
    ]


def _send(address: str, count: int, models: int, run: int) -> None:
    messages = _encode(count, models, run)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 30_000)
    sock.connect(address)
    for frames in messages:
        sock.send_multipart(frames, copy=False)
    sock.close()
    ctx.term()


def _pull() -> tuple[zmq.Context[Any], zmq.Socket[Any], str]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return ctx, sock, f"tcp://127.0.0.1:{port}"


def _sender(address: str, count: int, models: int, run: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "--send", address, "--messages", str(count), "--models", str(models)]
        + ["--run", str(run)],
        env=os.environ.copy(),
    )


def _daemon(parallel_threshold: int | None) -> Any:
    from xentd.config import Config, EngineConfig, LimitsConfig
    from xentd.daemon import Daemon

    engine = EngineConfig() if parallel_threshold is None else EngineConfig(parallel_threshold=parallel_threshold)
    d = Daemon(Config(limits=LimitsConfig(max_models=2000), engine=engine), clock=time.time)
    d._init_backend()
    if hasattr(d, "heap"):  # what initialize() does once the kernels are compiled
        d.heap.freeze(0, "start-up")
    return d


def _raw(count: int, models: int, run: int) -> float:
    ctx, sock, address = _pull()
    sender = _sender(address, count, models, run)
    sock.recv_multipart(copy=False)
    start = time.perf_counter()
    for _ in range(count - 1):
        sock.recv_multipart(copy=False)
    elapsed = time.perf_counter() - start
    sender.wait()
    sock.close(0)
    ctx.term()
    return elapsed / (count - 1) * 1e6


def _received(count: int, models: int, run: int) -> list[list[Any]]:
    """Messages taken off a real socket (zmq frames, as the daemon gets them)."""
    ctx, sock, address = _pull()
    sender = _sender(address, count, models, run)
    out = [sock.recv_multipart(copy=False) for _ in range(count)]
    sender.wait()
    sock.close(0)
    ctx.term()
    return out


def _inproc(d: Any, messages: list[list[Any]], drain: int, profile: cProfile.Profile | None = None) -> float:
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    for k in range(0, len(messages), drain):
        d.handle_many(messages[k : k + drain])
    if profile is not None:
        profile.disable()
    return (time.perf_counter() - start) / len(messages) * 1e6


def _e2e(d: Any, count: int, models: int, run: int, drain: int) -> float:
    ctx, sock, address = _pull()
    sender = _sender(address, count, models, run)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    done = 0
    start = 0.0
    while done < count:
        poller.poll(1000)
        batch = []
        for _ in range(drain):
            try:
                batch.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        if batch and not done:
            start = time.perf_counter()
        d.handle_many(batch)
        done += len(batch)
    elapsed = time.perf_counter() - start
    sender.wait()
    sock.close(0)
    ctx.term()
    return elapsed / count * 1e6


def _threaded(d: Any, count: int, models: int, run: int, drain: int) -> float | None:
    try:
        from xentd.receiver import Receiver
    except ImportError:
        return None
    ctx, sock, address = _pull()
    sender = _sender(address, count, models, run)
    receiver = Receiver(sock, drain_max=drain)
    receiver.start()
    done = 0
    start = 0.0
    while done < count:
        batch = receiver.take(timeout=1.0)
        if batch and not done:
            start = time.perf_counter()
        d.handle_many(batch)
        done += len(batch)
    elapsed = time.perf_counter() - start
    receiver.stop()
    while not receiver.finished:  # the socket is the thread's until then
        receiver.take(timeout=0.05)
    sender.wait()
    sock.close(0)
    ctx.term()
    return elapsed / count * 1e6


def _age(d: Any) -> None:
    """Fill every model's count windows to their bound, as traffic would in minutes: their
    rings and block sums then never grow again (a young model's grow every few batches).
    Time-window buckets are still handed out as time passes, a row a bucket width."""
    from xentd.kernels import SampleScores

    n = max(d.config.windows.count) + 64
    rng = np.random.default_rng(0)
    values = rng.random((3, n))
    scores = SampleScores(
        loss=values[0],
        focal=values[1],
        correct=np.ones(n, np.uint8),
        true_class=rng.integers(0, 10, n),
        unnormalized_rows=0,
        confidence=values[2],
        brier=values[2],
    )
    with d.state.lock:
        for m in d.state.models.values():
            m.fold(scores, None, time.time(), None)


def measure(
    count: int, drain: int, run: int, profile: bool, parallel_threshold: int | None, aged: bool = False
) -> dict[str, Any]:
    """Every figure once, in this process, for the xentd on sys.path."""
    import xentd

    out: dict[str, Any] = {"xentd": str(Path(xentd.__file__).parent)}
    d = _daemon(parallel_threshold)
    # Warm: kernels, models created, caches filled (different batch ids than the timed runs).
    for models in (1, 1000):
        d.handle_many(_received(2000, models, run + 1000))
    if aged:
        _age(d)
    if hasattr(d, "heap"):  # what the daemon's housekeeping does after the models arrive
        d.heap.maybe(len(d.state.models))
    out["raw"] = _raw(count, 1, run)
    for models in (1, 1000):
        received = _received(count, models, run + 2000 + models)
        out[f"inproc_{models}"] = _inproc(d, received, drain)
        out[f"e2e_{models}"] = _e2e(d, count, models, run + 3000 + models, drain)
        threaded = _threaded(d, count, models, run + 4000 + models, drain)
        if threaded is not None:
            out[f"thread_{models}"] = threaded
    if profile:
        for models in (1, 1000):
            prof = cProfile.Profile()
            _inproc(d, _received(count, models, run + 5000 + models), drain, prof)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
            out[f"profile_{models}"] = text.getvalue()
    return out


def _child(pythonpath: str, args: argparse.Namespace, run: int) -> dict[str, Any]:
    env = os.environ.copy()
    env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, __file__, "--child", "--messages", str(args.messages), "--drain", str(args.drain)]
    cmd += ["--run", str(run)]
    if args.parallel_threshold is not None:
        cmd += ["--parallel-threshold", str(args.parallel_threshold)]
    if args.aged:
        cmd.append("--aged")
    result = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=8192)
    parser.add_argument("--drain", type=int, default=256, help="messages per handle_many call (engine.drain_max)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", help="another checkout's root, measured side by side (as 'before')")
    parser.add_argument("--profile", action="store_true", help="print a cProfile top list of handle_many")
    parser.add_argument(
        "--parallel-threshold",
        type=int,
        help="engine.parallel_threshold for the daemon (default: the config default); a full drain of "
        "64 x 10 messages is 163,840 values, past the default, so the parallel scoring kernel runs",
    )
    parser.add_argument(
        "--aged",
        action="store_true",
        help="before timing, fill every model's count windows to their bound (steady state: no fold grows them)",
    )
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--send", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        _send(args.send, args.messages, args.models, args.run)
        return
    if args.child:
        print(json.dumps(measure(args.messages, args.drain, args.run, False, args.parallel_threshold, args.aged)))
        return
    sides = {"after": str(HERE)}
    if args.against:
        sides = {"before": str(Path(args.against).resolve()), **sides}
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for run in range(args.repeats):
        for side, root in sides.items():
            results[side].append(_child(root, args, run))
            print(f"run {run + 1}/{args.repeats} {side}: done", file=sys.stderr)
    keys = [k for k in results["after"][0] if k != "xentd"]
    threshold = "default" if args.parallel_threshold is None else args.parallel_threshold
    print(
        f"us/msg, median of {args.repeats} (64x10 FP32 logits, drains of {args.drain}, {args.messages} messages, "
        f"engine.parallel_threshold {threshold}{', models aged to steady state' if args.aged else ''})"
    )
    print(
        f"{'figure':<14}"
        + "".join(f"{side:>12}" for side in sides)
        + "".join(f"{side + ' raw/x':>14}" for side in sides)
    )
    for key in keys:
        medians = {
            side: statistics.median(r[key] for r in rs if key in r) for side, rs in results.items() if key in rs[0]
        }
        raw = {side: statistics.median(r["raw"] for r in rs) for side, rs in results.items()}
        line = f"{key:<14}" + "".join(f"{medians[s]:>12.2f}" if s in medians else f"{'-':>12}" for s in sides)
        if key != "raw":
            line += "".join(f"{raw[s] / medians[s]:>14.2f}" if s in medians else f"{'-':>14}" for s in sides)
        print(line)
    if args.profile:
        out = measure(args.messages, args.drain, 99, True, args.parallel_threshold, args.aged)
        for models in (1, 1000):
            print(f"\ncProfile, handle_many, {models} model(s):\n{out[f'profile_{models}']}")


if __name__ == "__main__":
    main()
