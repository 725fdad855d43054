"""Samples/s of one producer doing single-sample sends, with Publisher coalescing on and off.

    .venv/bin/python scripts/coalesce_bench.py --samples 200000 --batch-rows 256 --linger 0.05

A raw PULL receiver in its own process reads each message's header (the daemon's
decoder, xentd.wire.read_header) and counts its rows; the clock runs from the
first send until the receiver has counted every sample, so the figure is
delivered samples/s, not queued ones. Each row is [1, C] float32 probabilities
and a [1] int64 label.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from multiprocessing.connection import Connection

import numpy as np
import zmq

from xentd import wire
from xentd.client import Publisher


def _receive(address_out: Connection, expected: int) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    address_out.send(f"tcp://127.0.0.1:{port}")
    rows = 0
    while rows < expected:
        frames = pull.recv_multipart(copy=False)
        header = wire.read_header(frames[0].buffer, 1 << 16)
        rows += header.tensors[0].shape[0]
    address_out.send(time.perf_counter())
    pull.close(linger=0)
    ctx.term()


def run(samples: int, classes: int, batch_rows: int | None, linger: float | None) -> float:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(classes), samples).astype(np.float32)
    y = rng.integers(0, classes, samples).astype(np.int64)
    here, there = mp.Pipe()
    receiver = mp.Process(target=_receive, args=(there, samples))
    receiver.start()
    address = here.recv()
    with Publisher(address, connect_timeout=30, batch_rows=batch_rows, linger=linger, send_hwm=100_000) as pub:
        start = time.perf_counter()
        for i in range(samples):
            pub.send("bench", p[i : i + 1], y[i : i + 1])
        pub.flush()
        end: float = here.recv()
    receiver.join(60)
    return samples / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--linger", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for label, rows, linger in (("off", None, None), ("on", args.batch_rows, args.linger)):
        rates = [run(args.samples, args.classes, rows, linger) for _ in range(args.repeats)]
        print(
            f"coalescing {label:3} (batch_rows={rows}, linger={linger}): "
            f"best {max(rates):,.0f} samples/s, median {sorted(rates)[len(rates) // 2]:,.0f} "
            f"({args.samples:,} single-sample sends, {args.classes} classes, {args.repeats} runs)"
        )


if __name__ == "__main__":
    main()
