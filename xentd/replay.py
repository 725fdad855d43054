"""``xentd replay``: stream a dataset file to a daemon in batches, at a chosen rate.

Two file layouts:

- ``.npz`` with arrays ``predictions`` ([N] or [N, C]), ``targets`` ([N]
  class indices or 0/1, or [N, C] soft labels) and optionally ``weights`` ([N]).
- ``.csv`` with a header row. Columns: ``target`` (a class index, or 0/1 for
  binary), optionally ``weight``, and the predictions: ``pred`` alone for
  binary (the positive class), or ``pred_0`` ... ``pred_{C-1}`` for C classes.
  Other columns are ignored; column order does not matter.

Batches go out in file order, each ``batch_size`` rows, with ``batch_id``
``<file stem>:<first row>-<end row>``, so replaying a file twice with the same
batch size into a daemon that still remembers the ids counts it once.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from xentd.errors import XentdError


@dataclass(frozen=True)
class Dataset:
    predictions: np.ndarray
    targets: np.ndarray
    weights: np.ndarray | None

    def __len__(self) -> int:
        return int(self.predictions.shape[0])


def load(path: Path) -> Dataset:
    if path.suffix == ".csv":
        return _load_csv(path)
    return _load_npz(path)  # .npz, or anything else: NumPy says what is wrong with it


def _load_npz(path: Path) -> Dataset:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise XentdError(f"{path}: cannot read as .npz: {exc}") from None
    with data:
        missing = {"predictions", "targets"} - set(data.files)
        if missing:
            raise XentdError(
                f"{path}: missing array(s) {', '.join(sorted(missing))}; it has {', '.join(data.files) or 'none'}"
            )
        ds = Dataset(data["predictions"], data["targets"], data["weights"] if "weights" in data.files else None)
    if len(ds.targets) != len(ds) or (ds.weights is not None and len(ds.weights) != len(ds)):
        raise XentdError(f"{path}: predictions, targets and weights must have the same number of rows")
    return ds


def _load_csv(path: Path) -> Dataset:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise XentdError(f"{path}: empty file; expected a header row")
            columns = {name.strip(): i for i, name in enumerate(header)}
            rows = [row for row in reader if row]
    except (OSError, UnicodeDecodeError) as exc:
        raise XentdError(f"{path}: cannot read: {exc}") from None
    if "target" not in columns:
        raise XentdError(f"{path}: no 'target' column; columns are {', '.join(header)}")
    if "pred" in columns:
        pred_cols = [columns["pred"]]
    else:
        pred_cols = []
        while f"pred_{len(pred_cols)}" in columns:
            pred_cols.append(columns[f"pred_{len(pred_cols)}"])
        if len(pred_cols) < 2:
            raise XentdError(f"{path}: expected a 'pred' column (binary) or 'pred_0', 'pred_1', ... (C >= 2)")

    def column(indices: list[int], kind: Callable[[str], float], what: str) -> np.ndarray:
        try:
            return np.array([[kind(row[i]) for i in indices] for row in rows], dtype=np.float64)
        except (ValueError, IndexError) as exc:
            raise XentdError(f"{path}: bad {what} value: {exc}") from None

    preds = column(pred_cols, float, "prediction")
    targets = column([columns["target"]], float, "target")[:, 0]
    if not np.all(targets == np.round(targets)):
        raise XentdError(f"{path}: 'target' must hold class indices (integers)")
    weights = column([columns["weight"]], float, "weight")[:, 0] if "weight" in columns else None
    return Dataset(preds[:, 0] if len(pred_cols) == 1 else preds, targets.astype(np.int64), weights)


class Progress:
    """A one-line progress bar on a terminal; a line per 10% otherwise."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out = total, out
        self.tty = out.isatty()
        self.started = time.monotonic()
        self._last_decile = -1

    def update(self, done: int, samples: int) -> None:
        frac = done / self.total if self.total else 1.0
        rate = samples / max(time.monotonic() - self.started, 1e-9)
        text = f"{done}/{self.total} batches, {samples:,} samples, {rate:,.0f} samples/s"
        if self.tty:
            bar = "#" * int(frac * 30)
            self.out.write(f"\r[{bar:30s}] {frac * 100:5.1f}% {text}")
            if done == self.total:
                self.out.write("\n")
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            self.out.write(f"{frac * 100:5.1f}% {text}\n")
        self.out.flush()


def replay(
    dataset: Dataset,
    send: Callable[[slice, str], None],
    *,
    batch_size: int,
    rate: float,
    stem: str,
    progress: Progress | None = None,
) -> int:
    """Send ``dataset`` in batches through ``send(rows, batch_id)``, at most ``rate`` batches/s (0: no limit)."""
    if batch_size <= 0:
        raise XentdError(f"--batch-size must be positive, got {batch_size}")
    if rate < 0:
        raise XentdError(f"--rate must be >= 0, got {rate}")
    starts = range(0, len(dataset), batch_size)
    began = time.monotonic()
    for k, start in enumerate(starts):
        if rate:
            delay = began + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        rows = slice(start, min(start + batch_size, len(dataset)))
        send(rows, f"{stem}:{rows.start}-{rows.stop}")
        if progress is not None:
            progress.update(k + 1, rows.stop)
    return len(starts)


def run(
    path: Path,
    *,
    to: str,
    model: str,
    input: str,
    batch_size: int,
    rate: float,
    pub: bool,
    curve_server_key: str | None = None,
    curve_secret_key: str | None = None,
    out: TextIO = sys.stderr,
) -> int:
    from xentd.client import open_publisher

    ds = load(path)
    with open_publisher(
        to,
        socket="pub" if pub else "push",
        curve_server_key=curve_server_key,
        curve_secret_key=curve_secret_key,
        resend=0,
    ) as publisher:

        def send(rows: slice, batch_id: str) -> None:
            publisher.send(
                model,
                ds.predictions[rows],
                ds.targets[rows],
                input=input,
                weights=None if ds.weights is None else ds.weights[rows],
                batch_id=batch_id,
            )

        try:
            batches = replay(
                ds,
                send,
                batch_size=batch_size,
                rate=rate,
                stem=path.stem,
                progress=Progress((len(ds) + batch_size - 1) // batch_size, out),
            )
        except (TypeError, ValueError) as exc:
            raise XentdError(f"{path}: {exc}") from None
    out.write(f"replayed {len(ds)} samples in {batches} batches to {to} as model {model!r}\n")
    return 0
