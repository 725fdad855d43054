"""`xentd replay` and `xentd top` against the real daemon."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss

from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from xentd import replay, top
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
