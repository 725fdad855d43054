"""``xentd replay``: stream a dataset file to a daemon in batches, at a chosen rate.

Two file layouts:

- ``.npz`` with arrays ``predictions`` ([N] or [N, C]), ``targets`` ([N]
  class indices or 0/1, or [N, C] soft labels) and optionally ``weights`` ([N]).
  With ``ids`` ([N], int64 or uint64) a file may hold one side of a delayed-label
  join (docs/protocol.md): ``ids`` and ``predictions`` (and ``weights``) without
  ``targets`` is sent predictions-only; ``ids`` and ``targets`` without
  ``predictions`` is sent labels-only. In a file with both, ``ids`` are not sent
  (the daemon would ignore them: the pairs are scored at once).
- ``.csv`` with a header row. Columns: ``target`` (a class index, or 0/1 for
  binary), optionally ``weight``, and the predictions: ``pred`` alone for
  binary (the positive class), or ``pred_0`` ... ``pred_{C-1}`` for C classes.
  Other columns are ignored; column order does not matter.

Batches go out in file order, each ``batch_size`` rows, with ``batch_id``
``<file stem>:<first row>-<end row>`` (``<file stem>:predictions:<first row>-<end row>``
and ``<file stem>:labels:...`` for the two join kinds, so that the labels of a
file never share the batch ids of its predictions), so replaying a file twice with the same
batch size into a daemon that still remembers the ids counts it once.

With a metrics URL (``--wait``), ``send`` and ``replay`` then wait until the
daemon has accounted for every batch sent, and say what became of them
(:func:`await_outcome`): scored, duplicate or rejected, with the reason. That
reads the daemon's counters before and after, so it is exact only while no other
producer sends to the same daemon; a note says so when the counters moved by
more than this command's batches.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

import numpy as np
import zmq

from xentd.errors import XentdError
from xentd.top import Scrape, health, metrics_url, scrape

if TYPE_CHECKING:
    from xentd.client import Publisher


# What a dataset file sends: a full batch (scored at once), or one side of a delayed-label join.
Kind = Literal["full", "predictions", "labels"]


@dataclass(frozen=True)
class Dataset:
    """The arrays of a dataset file. ``predictions`` or ``targets`` is None in a file that
    holds one side of a join; ``ids`` is then set (see :attr:`kind`)."""

    predictions: np.ndarray | None
    targets: np.ndarray | None
    weights: np.ndarray | None
    ids: np.ndarray | None = None

    @property
    def kind(self) -> Kind:
        if self.predictions is None:
            return "labels"
        return "predictions" if self.targets is None else "full"

    def __len__(self) -> int:
        rows = self.predictions if self.predictions is not None else self.targets
        assert rows is not None  # load() refuses a file with neither
        return int(rows.shape[0])

    @property
    def rows_named(self) -> str:
        """What a row of this file is, for "sent 100 ..." lines."""
        return {"full": "samples", "predictions": "predictions (predictions-only)", "labels": "labels (labels-only)"}[
            self.kind
        ]

    def batch_id(self, stem: str, rows: slice) -> str:
        """The batch id of ``rows``: the join kinds name themselves, so that a labels file with the
        stem of its predictions file does not repeat their ids (the daemon dedupes by (model, batch_id))."""
        kind = "" if self.kind == "full" else f"{self.kind}:"
        return f"{stem}:{kind}{rows.start}-{rows.stop}"

    def send(self, publisher: Publisher, model: str, rows: slice, *, input: str, batch_id: str | None) -> None:
        """Send ``rows`` of the file as its kind of message: full, predictions-only or labels-only."""
        weights = None if self.weights is None else self.weights[rows]
        if self.predictions is None:
            assert self.targets is not None and self.ids is not None
            publisher.send_labels(model, self.targets[rows], self.ids[rows], batch_id=batch_id)
        elif self.targets is None:
            assert self.ids is not None
            publisher.send_predictions(
                model, self.predictions[rows], self.ids[rows], input=input, weights=weights, batch_id=batch_id
            )
        else:
            publisher.send(
                model, self.predictions[rows], self.targets[rows], input=input, weights=weights, batch_id=batch_id
            )


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
        arrays = {name: data[name] for name in ("predictions", "targets", "weights", "ids") if name in data.files}
        files = list(data.files)
    _check_npz_layout(path, arrays, files)
    ds = Dataset(arrays.get("predictions"), arrays.get("targets"), arrays.get("weights"), arrays.get("ids"))
    if ds.ids is not None:
        if ds.ids.dtype.kind not in "iu" or ds.ids.dtype.itemsize != 8 or ds.ids.ndim != 1:
            raise XentdError(
                f"{path}: 'ids' must be int64 or uint64 of shape [N], one per row; it is {ds.ids.dtype} "
                f"of shape {list(ds.ids.shape)}"
            )
    scalars = [name for name, a in arrays.items() if a.ndim == 0]
    if scalars:
        what = "is a scalar" if len(scalars) == 1 else "are scalars"
        raise XentdError(f"{path}: {', '.join(scalars)} {what}; every array has one row per sample")
    rows = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{name} {n}" for name, n in rows.items())
        raise XentdError(f"{path}: every array must have the same number of rows; it has {counts}")
    return ds


def _check_npz_layout(path: Path, arrays: dict[str, np.ndarray], files: list[str]) -> None:
    """Refuse a file that is no kind of message, saying what it would need."""
    has = set(arrays)
    listed = ", ".join(files) or "none"
    if "predictions" in has and "targets" in has:
        return  # full: scored at once (ids, if any, are not sent)
    if not has & {"predictions", "targets"}:
        raise XentdError(f"{path}: missing array(s) predictions, targets; it has {listed}")
    if "ids" not in has:
        present, absent = ("predictions", "targets") if "predictions" in has else ("targets", "predictions")
        raise XentdError(
            f"{path}: has {present} but no {absent}; add {absent} to score it at once, or 'ids' to send "
            f"{present}-only (one side of a delayed-label join); it has {listed}"
        )
    if "targets" in has and "weights" in has:
        raise XentdError(
            f"{path}: a labels-only file (ids and targets) cannot carry weights: a joined pair takes its "
            "prediction's weight, so weights go in the predictions file"
        )


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
        send(rows, dataset.batch_id(stem, rows))
        if progress is not None:
            progress.update(k + 1, rows.stop)
    return len(starts)


@dataclass(frozen=True)
class Watch:
    """Where and how to read the daemon's /metrics for ``--wait``."""

    url: str
    auth: str | None = None
    cafile: str | None = None

    def scrape(self) -> Scrape:
        return scrape(self.url, auth=self.auth, cafile=self.cafile)

    def starting(self) -> bool:
        """Whether the daemon says it is still starting (compiling kernels): it has queued
        what was sent and scores it once ready, so the wait is not a lack of progress."""
        healthy, body = health(self.url, cafile=self.cafile)
        return not healthy and body.startswith("starting")


@dataclass(frozen=True)
class Outcome:
    """What the daemon's counters say became of ``sent`` batches for ``model``."""

    model: str
    sent: int
    accounted: int  # growth of xentd_messages_received_total: every message the daemon finished with
    scored: int
    samples: int
    duplicate: int
    rejected: dict[str, int]  # reason -> batches
    empty: int = 0  # accepted with zero rows: nothing to score
    kind: Kind = "full"
    # The model's xentd_label_joins_total growth by outcome, and the growth of its
    # xentd_pending_predictions (negative when more left the store than came in).
    joins: dict[str, int] = field(default_factory=dict)
    pending: int = 0

    @property
    def other_traffic(self) -> bool:
        return self.accounted > self.sent or self.settled > self.sent

    @property
    def settled(self) -> int:
        """Batches whose fate the counters show: scored, duplicate, rejected or empty.

        A predictions-only or labels-only message has no per-message counter of its own
        (its rows are counted by outcome, in xentd_label_joins_total), so for those the
        count of messages the daemon finished with is their account."""
        if self.kind != "full":
            return self.accounted
        return self.scored + self.duplicate + self.empty + sum(self.rejected.values())

    def lines(self) -> list[str]:
        out = [f"the daemon accounted for {self.sent} batch(es) sent as model {self.model!r}:"]
        if self.kind != "full":
            out.extend(self._join_lines())
        elif self.scored:
            out.append(f"  {self.scored} scored ({self.samples:,} samples)")
        if self.duplicate:
            out.append(f"  {self.duplicate} duplicate (already scored: batch ids seen before)")
        if self.empty:
            out.append(f"  {self.empty} empty (no rows: nothing to score)")
        if self.rejected:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
            out.append(f"  {sum(self.rejected.values())} rejected ({reasons}; the daemon's log has the details)")
        if self.other_traffic:
            out.append(
                f"note: the daemon accounted for {self.accounted} message(s) meanwhile, more than the {self.sent} "
                "sent here: another producer was sending, and its batches may be counted above"
            )
        return out

    def _join_lines(self) -> list[str]:
        """The join counters' growth: what became of the rows of predictions-only or labels-only batches."""
        order = ("matched", "unmatched", "duplicate", "expired", "evicted")
        counts = ", ".join(f"{o} {self.joins[o]:,}" for o in order if self.joins.get(o))
        if self.kind == "predictions":
            line = f"  predictions waiting for their labels: {self.pending:+,}"
            return [line + (f"; join outcomes meanwhile: {counts}" if counts else "")]
        return [f"  labels: {counts or 'no join outcome counted'}"]


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0.0)) for k, v in after.items() if round(v - before.get(k, 0.0)) > 0}


def _model_rejections(s: Scrape, model: str) -> dict[str, float]:
    return {
        dict(labels).get("reason", ""): v
        for (name, labels), v in s.samples.items()
        if name == "xentd_model_rejected_batches_total" and dict(labels).get("model") == model
    }


def _model_joins(s: Scrape, model: str) -> dict[str, float]:
    return {
        dict(labels).get("outcome", ""): v
        for (name, labels), v in s.samples.items()
        if name == "xentd_label_joins_total" and dict(labels).get("model") == model
    }


def outcome(before: Scrape, after: Scrape, *, model: str, sent: int, kind: Kind = "full") -> Outcome:
    """The counter deltas between two scrapes, read as the fate of ``sent`` batches of ``kind``."""

    def grew(name: str, per_model: bool = False) -> int:
        def get(s: Scrape) -> float:
            return s.by_model(name).get(model, 0.0) if per_model else s.total(name).get("", 0.0)

        return round(get(after) - get(before))

    accounted = grew("xentd_messages_received_total")
    rejected = _delta(after.total("xentd_rejected_batches_total"), before.total("xentd_rejected_batches_total"))
    if accounted > sent and any(name == "xentd_model_rejected_batches_total" for name, _ in after.samples):
        # Others were sending: this model's own rejection counts leave theirs out. (A model
        # the daemon never scored has none; its rejections show only daemon-wide.)
        rejected = _delta(_model_rejections(after, model), _model_rejections(before, model))
    return Outcome(
        model=model,
        sent=sent,
        accounted=accounted,
        scored=grew("xentd_batches_total", per_model=True),
        samples=grew("xentd_samples_total", per_model=True),
        duplicate=grew("xentd_duplicate_batches_total"),
        empty=grew("xentd_empty_batches_total"),
        rejected=rejected,
        kind=kind,
        joins=_delta(_model_joins(after, model), _model_joins(before, model)),
        pending=grew("xentd_pending_predictions", per_model=True),
    )


# How often --wait reads /metrics while the daemon works through the batches.
WAIT_POLL_SECONDS = 0.1


def await_outcome(
    watch: Watch, before: Scrape, *, model: str, sent: int, timeout: float, kind: Kind = "full"
) -> Outcome:
    """Poll /metrics until the daemon has accounted for ``sent`` more messages.

    Gives up with a :class:`XentdError` when the count has not moved for ``timeout``
    seconds (a daemon still working through a backlog keeps it moving). While the
    daemon says it is starting (compiling its kernels; the batches wait in its queue),
    the clock does not run: a first start takes longer than any sensible --timeout.
    """
    last, deadline = -1, time.monotonic() + timeout
    said_starting = False
    while True:
        got = outcome(before, watch.scrape(), model=model, sent=sent, kind=kind)
        # Both: the message count (every outcome) and the outcomes themselves have grown.
        done = min(got.accounted, got.settled)
        if done >= sent:
            return got
        if done > last:
            last, deadline = done, time.monotonic() + timeout
        elif time.monotonic() > deadline and watch.starting():
            if not said_starting:
                print("the daemon is starting (compiling its kernels); the batches wait in its queue", file=sys.stderr)
                said_starting = True
            deadline = time.monotonic() + timeout
        elif time.monotonic() > deadline:
            raise XentdError(
                f"{metrics_url(watch.url)}: the daemon accounted for {max(done, 0)} of the {sent} batch(es) sent, "
                f"and nothing more for {timeout:g} s (not received yet, or lost on the way; a longer --timeout "
                "waits more)"
            )
        time.sleep(WAIT_POLL_SECONDS)


def report(result: Outcome, out: TextIO) -> int:
    """Print ``result``; the exit status: 1 when a batch was rejected, or when labels found no
    waiting prediction (unmatched or expired: wrong ids, labels too late, another instance), else 0."""
    lines = result.lines()
    missed = result.joins.get("unmatched", 0) + result.joins.get("expired", 0) if result.kind == "labels" else 0
    if missed:
        lines.append(
            f"  {missed:,} label(s) joined no prediction: their ids were not waiting (never sent, already "
            "joined, past labels.ttl, or sent to another instance)"
        )
    out.write("\n".join(lines) + "\n")
    out.flush()
    return 1 if result.rejected or missed else 0


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
    timeout: float = 5.0,
    wait: Watch | None = None,
    out: TextIO = sys.stderr,
    result_out: TextIO = sys.stdout,
) -> int:
    from xentd.client import open_publisher

    ds = load(path)
    before = wait.scrape() if wait is not None else None
    timeout_ms = max(1, int(timeout * 1000))
    with open_publisher(
        to,
        socket="pub" if pub else "push",
        curve_server_key=curve_server_key,
        curve_secret_key=curve_secret_key,
        resend=0,
        connect_timeout=timeout,
        send_timeout_ms=timeout_ms,
        linger_ms=timeout_ms,
    ) as publisher:
        sent = 0

        def send(rows: slice, batch_id: str) -> None:
            nonlocal sent
            ds.send(publisher, model, rows, input=input, batch_id=batch_id)
            sent += 1

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
        except zmq.Again:
            raise XentdError(
                f"{to}: the daemon took no batch for {timeout:g} s (send queue full); stopped after {sent} batch(es)"
            ) from None
    out.write(f"replayed {len(ds)} {ds.rows_named} in {batches} batches to {to} as model {model!r}\n")
    if wait is None or before is None:
        return 0
    return report(await_outcome(wait, before, model=model, sent=batches, timeout=timeout, kind=ds.kind), result_out)
