"""State snapshots: a restored daemon continues exactly where the old one stopped; bad files are set aside."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import softmax
from xentd import persist, wire
from xentd.config import Config, IngestConfig, LimitsConfig, StateConfig, WindowsConfig
from xentd.daemon import Daemon
from xentd.errors import SnapshotError, StartupError


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _daemon(clock: Clock, directory: Path | None = None, **changes: object) -> Daemon:
    cfg = Config(
        windows=WindowsConfig(count=(50, 500)),
        ingest=IngestConfig(dedup_window=100),
        state=StateConfig(directory=str(directory) if directory else None),
    )
    cfg = dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
    d = Daemon(cfg, clock=clock)
    d._init_backend()
    d._init_state()
    return d


def _traffic(seed: int, count: int) -> list[list[bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(1, 60))
        x = rng.normal(0, 2, (n, 120))  # past class_limit=100: the "other" slot is exercised
        frames = wire.encode(
            ["a", "b"][i % 2],
            softmax(x),
            rng.integers(0, 120, n),
            weights=rng.random(n),
            batch_id=f"{seed}-{i}",
            ts=1.7e9 + i,
        )
        out.append([bytes(f) for f in frames])
    out.append([b"junk"])
    return out


def _state(d: Daemon) -> list[object]:
    snap = d.state.snapshot()
    rows: list[object] = [
        snap.rejected,
        dataclasses.replace(
            snap.counters,
            restored_models=0,
            snapshots_written=0,
            last_snapshot_time=None,
            last_snapshot_seconds=None,
            last_snapshot_bytes=None,
        ),
    ]
    for m in sorted(snap.models, key=lambda m: m.name):
        rows.append(
            (
                m.name,
                m.samples,
                m.weight,
                m.loss_weighted_sum,
                m.batches,
                m.hist_counts.tolist(),
                m.class_loss_weighted_sum.tolist(),
                m.last_event_time,
                m.windows,
            )
        )
    return rows


def test_restore_continues_exactly_where_the_snapshot_left_off(tmp_path: Path) -> None:
    clock = Clock()
    first, second = _traffic(0, 40), _traffic(1, 40)
    reference = _daemon(clock)
    for t in (first, second):
        reference.handle_many(t)
        clock.now += 7.0

    clock.now = 1_700_000_000.0
    before = _daemon(clock, tmp_path)
    before.handle_many(first)
    assert before.snapshotter is not None and before.snapshotter.final()
    clock.now += 7.0
    after = _daemon(clock, tmp_path)
    assert after.state.counters.restored_models == 2
    after.handle_many(second)
    after.handle_many(first[:5])  # retries of batches scored before the restart: duplicates
    clock.now += 7.0
    assert after.state.counters.duplicate_batches == 5
    after.state.counters.duplicate_batches = 0
    after.state.counters.messages -= 5
    assert _state(after) == _state(reference)


def test_a_corrupt_snapshot_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    d = _daemon(clock, tmp_path)
    d.handle_many(_traffic(0, 4))
    assert d.snapshotter is not None and d.snapshotter.final()
    path = tmp_path / persist.FILENAME
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"\0" * 100, data[:100] + b"x" * 50 + data[150:], b""):
        path.write_bytes(broken)
        with caplog.at_level(logging.ERROR, logger="xentd.persist"):
            fresh = _daemon(clock, tmp_path)
        assert not fresh.state.models
        assert "cannot be used" in caplog.text
        assert not path.exists()
        caplog.clear()
    assert len(list(tmp_path.glob(f"{persist.FILENAME}.corrupt-*"))) >= 1


def test_an_incompatible_snapshot_is_refused_with_the_reason(tmp_path: Path) -> None:
    clock = Clock()
    d = _daemon(clock, tmp_path)
    d.handle_many(_traffic(0, 4))
    with d.state.lock:
        persist.write(tmp_path, persist.capture(d.state))
    image = persist.read(tmp_path / persist.FILENAME)
    with pytest.raises(SnapshotError, match="class_limit"):
        persist.restore(_daemon(clock, limits=LimitsConfig(class_limit=10)).state, image)
    # Another format version.
    manifest_v2 = tmp_path / "v2.npz"
    with np.load(tmp_path / persist.FILENAME) as npz:
        arrays = {k: npz[k] for k in npz.files}
    m = json.loads(bytes(arrays["manifest"]))
    m["version"] = 2
    arrays["manifest"] = np.frombuffer(json.dumps(m).encode(), np.uint8)
    np.savez(manifest_v2, **arrays)
    with pytest.raises(SnapshotError, match="version 2"):
        persist.read(manifest_v2)


def test_changed_windows_keep_the_lifetime_totals(tmp_path: Path) -> None:
    clock = Clock()
    d = _daemon(clock, tmp_path)
    d.handle_many(_traffic(0, 10))
    assert d.snapshotter is not None and d.snapshotter.final()
    lifetime = [(m.name, m.samples, m.loss_weighted_sum) for m in d.state.snapshot().models]
    changed = _daemon(clock, tmp_path, windows=WindowsConfig(count=(10,)))
    snap = changed.state.snapshot()
    assert [(m.name, m.samples, m.loss_weighted_sum) for m in snap.models] == lifetime
    assert all(s.samples == 0 for m in snap.models for _, s in m.windows)


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    d = _daemon(clock, tmp_path)
    d.handle_many(_traffic(0, 4))
    assert d.snapshotter is not None and d.snapshotter.final()
    good = (tmp_path / persist.FILENAME).read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    d.handle_many(_traffic(1, 4))
    monkeypatch.setattr(os, "fsync", full_disk)
    assert not d.snapshotter.final()
    monkeypatch.undo()
    assert d.state.counters.snapshot_failures == 1
    assert (tmp_path / persist.FILENAME).read_bytes() == good  # the old snapshot is untouched
    assert not list(tmp_path.glob(".*.tmp"))
    # A temporary file left by a crash mid-write is ignored and cleaned up.
    (tmp_path / f".{persist.FILENAME}.999.tmp").write_bytes(b"partial")
    again = _daemon(clock, tmp_path)
    assert len(again.state.models) == 2 and not list(tmp_path.glob(".*.tmp"))


def test_unwritable_state_directory_is_a_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StartupError, match="state.directory"):
        _daemon(Clock(), blocker / "sub")
