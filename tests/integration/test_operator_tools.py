"""`xentd replay` and `xentd top` against the real daemon."""

from __future__ import annotations

import io
import math
import os
import pty
import select
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss

from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from xentd import Publisher, replay, top
from xentd.errors import XentdError


def _xentd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xentd", *args], capture_output=True, text=True, timeout=120)


def test_replay_npz_then_top(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p, y = softmax(rng.normal(0, 2, (1000, 5))), rng.integers(0, 5, 1000)
    np.savez(tmp_path / "val.npz", predictions=p, targets=y)
    d = start_daemon()
    out = _xentd(
        "replay", str(tmp_path / "val.npz"), "--model", "val", "--to", d.ingest, "--batch-size", "64", "--rate", "200"
    )
    assert out.returncode == 0, out.stderr
    assert "replayed 1000 samples in 16 batches" in out.stderr and "100.0%" in out.stderr
    d.wait_for("xentd_samples_total", 1000.0, model="val")
    assert d.value("xentd_batches_total", model="val") == 16
    again = _xentd("replay", str(tmp_path / "val.npz"), "--model", "val", "--to", d.ingest, "--batch-size", "64")
    assert again.returncode == 0
    d.wait_for("xentd_duplicate_batches_total", 16.0)  # same batch ids: counted once

    view = _xentd("top", "--url", d.http, "--once", "--interval", "0.2")
    assert view.returncode == 0, view.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = log_loss(y, p, labels=range(5))
    line = next(ln for ln in view.stdout.splitlines() if ln.startswith("val "))
    fields = line.split()
    assert float(fields[3]) == pytest.approx(ref, abs=5e-5)  # printed to 4 decimals
    assert float(fields[4]) == pytest.approx(math.exp(ref), abs=5e-3)
    assert "window 5m" in view.stdout and "rejected 0 total" in view.stdout


def test_replay_csv_binary_and_multiclass(tmp_path: Path) -> None:
    (tmp_path / "bin.csv").write_text("id,pred,target,weight\n1,0.9,1,2.0\n2,0.2,0,1.0\n3,0.6,0,1.0\n")
    ds = replay.load(tmp_path / "bin.csv")
    assert ds.predictions.tolist() == [0.9, 0.2, 0.6] and ds.targets.tolist() == [1, 0, 0]
    assert ds.weights is not None and ds.weights.tolist() == [2.0, 1.0, 1.0]
    (tmp_path / "mc.csv").write_text("target,pred_1,pred_0,pred_2\n2,0.2,0.1,0.7\n0,0.1,0.8,0.1\n")
    mc = replay.load(tmp_path / "mc.csv")
    assert mc.predictions.tolist() == [[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]] and mc.weights is None
    sent: list[tuple[slice, str]] = []
    n = replay.replay(
        ds,
        lambda rows, bid: sent.append((rows, bid)),
        batch_size=2,
        rate=0,
        stem="bin",
        progress=replay.Progress(2, io.StringIO()),
    )
    assert n == 2 and sent == [(slice(0, 2), "bin:0-2"), (slice(2, 3), "bin:2-3")]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("pred_0,pred_1\n0.5,0.5\n", "no 'target' column"),
        ("target,p\n1,0.5\n", "expected a 'pred' column"),
        ("target,pred\n1,abc\n", "bad prediction value"),
        ("target,pred\n1.5,0.5\n", "class indices"),
    ],
)
def test_replay_csv_errors_are_clear(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(XentdError, match=message):
        replay.load(path)
    out = _xentd("replay", str(path), "--model", "m", "--to", "tcp://127.0.0.1:1")
    assert out.returncode == 2 and message.split("'")[0] in out.stderr


def test_top_refuses_something_that_is_not_xentd(tmp_path: Path) -> None:
    with pytest.raises(XentdError, match="cannot read"):
        top.scrape("http://127.0.0.1:1")


def test_send_reads_the_same_files_as_replay(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    (tmp_path / "one.csv").write_text("target,pred_0,pred_1\n0,0.9,0.1\n1,0.3,0.7\n")
    d = start_daemon()
    out = _xentd("send", str(tmp_path / "one.csv"), "--model", "csv", "--to", d.ingest)
    assert out.returncode == 0, out.stderr
    d.wait_for("xentd_samples_total", 2.0, model="csv")
    (tmp_path / "empty.npz").write_bytes(b"")
    for args, message in (
        ([str(tmp_path / "empty.npz"), "--to", d.ingest], "cannot read as .npz"),
        ([str(tmp_path / "one.csv"), "--to", "nonsense"], "cannot publish to nonsense"),
    ):
        bad = _xentd("send", *args, "--model", "m")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def _top_line(view: str, model: str) -> list[str]:
    return next(ln for ln in view.splitlines() if ln.startswith(model + " ")).split()


def test_top_columns_balanced_and_worst_class(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # Class 2 is predicted badly, so it is the worst; class 0 is common, so balanced != plain mean.
    y = np.concatenate([np.zeros(300, np.int64), np.ones(60, np.int64), np.full(40, 2)])
    logits = rng.normal(0, 1, (400, 3))
    logits[np.arange(400), y] += np.where(y == 2, -1.0, 2.0)
    p = softmax(logits)
    np.savez(tmp_path / "cls.npz", predictions=p, targets=y)
    d = start_daemon()
    assert _xentd("send", str(tmp_path / "cls.npz"), "--model", "cls", "--to", d.ingest).returncode == 0
    d.wait_for("xentd_samples_total", 400.0, model="cls")
    view = _xentd("top", "--url", d.http, "--once", "--interval", "0.2")
    assert view.returncode == 0, view.stderr
    assert "BALANCED" in view.stdout and "WORST CLASS (since start)" in view.stdout
    loss = -np.log(p[np.arange(400), y])
    per_class = [loss[y == c].mean() for c in range(3)]
    fields = _top_line(view.stdout, "cls")
    assert float(fields[3]) == pytest.approx(loss.mean(), abs=5e-5)
    assert float(fields[7]) == pytest.approx(np.mean(per_class), abs=5e-5)
    # NE: the mean loss over the entropy of the target prior; ECE over 15 bins of the top-1 confidence.
    prior = np.bincount(y) / len(y)
    assert float(fields[8]) == pytest.approx(loss.mean() / -(prior * np.log(prior)).sum(), abs=5e-5)
    conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    bins = np.minimum(np.floor(conf * 15).astype(int), 14)
    gaps = np.bincount(bins, hit, 15) - np.bincount(bins, conf, 15)
    assert float(fields[9]) == pytest.approx(np.abs(gaps).sum() / len(y), abs=5e-5)
    assert fields[10] == str(int(np.argmax(per_class))) == "2"
    assert float(fields[11]) == pytest.approx(max(per_class), abs=5e-5)


def test_top_shows_a_dash_for_a_model_without_data(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    # Weight 0 everywhere: the batch is scored, but the window holds no weight, so no mean.
    np.savez(tmp_path / "w0.npz", predictions=np.array([0.9, 0.2]), targets=np.array([1, 0]), weights=np.zeros(2))
    d = start_daemon()
    assert _xentd("send", str(tmp_path / "w0.npz"), "--model", "empty", "--to", d.ingest).returncode == 0
    d.wait_for("xentd_samples_total", 2.0, model="empty")
    view = _xentd("top", "--url", d.http, "--once", "--interval", "0.2")
    assert view.returncode == 0, view.stderr
    fields = _top_line(view.stdout, "empty")
    assert fields[3:6] == ["-", "-", "-"], fields  # cross-entropy, perplexity, accuracy
    assert "inf" not in view.stdout and "nan" not in view.stdout


def test_top_refuses_an_unknown_window(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    d = start_daemon()
    with Publisher(d.ingest) as pub:
        pub.send("win", np.array([0.9]), np.array([1]))
    d.wait_for("xentd_samples_total", 1.0, model="win")
    out = _xentd("top", "--url", d.http, "--once", "--window", "10m")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    windows = "1m, 5m, 1h, last_1000, last_10000, ewma"
    assert f"--window '10m': this daemon has no such window; its windows are {windows}" in out.stderr


def test_top_quits_on_q(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xentd", "top", "--url", d.http, "--interval", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"q: quit" not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        assert b"q: quit" in seen, seen
        os.write(master, b"q")
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the other end closed
                    break
        assert proc.wait(timeout=60) == 0, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
