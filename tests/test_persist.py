"""State snapshots: a restored daemon continues exactly where the old one stopped; bad files are set aside."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import softmax
from xentd import persist, wire
from xentd.config import CalibrationConfig, Config, IngestConfig, LimitsConfig, StateConfig, WindowsConfig
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
                m.calibration.weight.tolist(),
                m.calibration.confidence.tolist(),
                m.calibration.outcome.tolist(),
                m.calibration.brier_weighted_sum,
                repr(m.calibration.windows),  # NaN != NaN: compared as text
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


def test_changed_calibration_bins_restart_only_the_calibration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bins cannot be mapped onto other bins: the calibration starts empty, and nothing else is
    lost (the snapshot is not set aside)."""
    clock = Clock()
    d = _daemon(clock, tmp_path)
    d.handle_many(_traffic(0, 10))
    assert d.snapshotter is not None and d.snapshotter.final()
    rows = [row[:9] for row in _state(d)[2:]]  # everything but the calibration
    with caplog.at_level(logging.WARNING, logger="xentd.persist"):
        changed = _daemon(clock, tmp_path, calibration=CalibrationConfig(bins=10))
    assert "calibration.bins changed" in caplog.text
    assert [row[:9] for row in _state(changed)[2:]] == rows
    for m in changed.state.snapshot().models:
        assert len(m.calibration.bin_labels) == 10
        assert m.calibration.weight.sum() == 0.0 and m.calibration.brier_weight == 0.0
    assert not list(tmp_path.glob(f"{persist.FILENAME}.corrupt-*"))


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


def _tamper(path: Path, change: Callable[[dict[str, np.ndarray], dict[str, Any]], None]) -> None:
    """Rewrite a snapshot as a valid archive with ``change`` applied to its arrays and manifest."""
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    manifest = json.loads(bytes(arrays["manifest"]))
    change(arrays, manifest)
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def _set(key: str, index: tuple[int, ...], value: float) -> Callable[[dict[str, np.ndarray], dict[str, Any]], None]:
    def change(arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        arrays[key][index] = value

    return change


def _scalar(path: list[str | int], value: object) -> Callable[[dict[str, np.ndarray], dict[str, Any]], None]:
    def change(arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        node: Any = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _retype(key: str, dtype: str) -> Callable[[dict[str, np.ndarray], dict[str, Any]], None]:
    def change(arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        arrays[key] = arrays[key].astype(dtype)

    return change


def _duplicate_model(arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    manifest["models"][1]["name"] = manifest["models"][0]["name"]


TAMPERED = {
    # Lifetime stat vector: [0] samples (xentd_samples_total), [1] weight (the _count), [2] weighted loss (the _sum).
    "negative samples_total": (_set("m0.lifetime", (0,), -5.0), "lifetime[0] is -5.0; expected values >= 0"),
    "NaN _count": (_set("m0.lifetime", (1,), np.nan), "lifetime[1] is nan; expected finite values"),
    "infinite _sum": (_set("m0.lifetime", (2,), np.inf), "lifetime[2] is inf; expected finite values"),
    "negative class weight": (_set("m1.lifetime", (6,), -1e-3), "lifetime[6] is -0.001; expected values >= 0"),
    "negative histogram bucket": (_set("m0.hist", (3,), -1), "hist[3] is -1; expected values >= 0"),
    "NaN in a time window": (_set("m0.tw_buckets", (0, 0, 2), np.nan), "tw_buckets[0, 0, 2] is nan"),
    "negative EWMA weight": (_set("m0.ewma", (1,), -2.0), "ewma[1] is -2.0"),
    "infinite count-window block": (_set("m1.blocks", (0, 2), -np.inf), "blocks[0, 2] is -inf"),
    "negative ring weight": (_set("m0.ring", (0, 0), -1.0), "ring[0, 0] is -1.0"),
    "ring class past the slots": (_set("m0.ring_cls", (0,), 101), "ring_cls holds class slot 101; the model has 101"),
    "negative ring class": (_set("m0.ring_cls", (0,), -1), "ring_cls[0] is -1"),
    "string array": (_retype("m0.lifetime", "U8"), "lifetime has dtype <U8; expected a float type"),
    "float histogram": (_retype("m0.hist", "float64"), "hist has dtype float64; expected an integer type"),
    "negative batches": (_scalar(["models", 0, "batches"], -2), "'a': batches is -2; expected a count"),
    "fractional batches": (_scalar(["models", 0, "batches"], 2.5), "'a': batches is 2.5; expected a count"),
    "negative unnormalized rows": (_scalar(["models", 1, "unnormalized_rows"], -1), "unnormalized_rows is -1"),
    "negative unnormalized targets": (_scalar(["models", 1, "unnormalized_targets"], -7), "unnormalized_targets is -7"),
    "infinite loss_sum": (_scalar(["models", 0, "loss_sum"], float("inf")), "loss_sum is inf; expected a finite"),
    "NaN clock": (_scalar(["models", 0, "clock"], float("nan")), "clock is nan; expected a finite number"),
    "negative per-model rejected": (_scalar(["models", 0, "rejected", "non_finite"], -4), "rejected.non_finite is -4"),
    "zero classes": (_scalar(["models", 0, "num_classes"], 0), "num_classes is 0; expected at least 1"),
    "count_total past the ring": (_scalar(["models", 0, "count_total"], 10**9), "but the ring holds"),
    "negative messages": (_scalar(["counters", "messages"], -1), "counters.messages is -1"),
    "negative limit hits": (_scalar(["counters", "limit_hits", "max_models"], -1), "limit_hits.max_models is -1"),
    "negative rejected": (_scalar(["rejected", "bad_header"], -9), "rejected.bad_header is -9"),
    "infinite rejected": (_scalar(["rejected", "bad_header"], float("inf")), "unreadable: OverflowError"),
    "NaN taken": (_scalar(["taken"], float("nan")), "taken is nan"),
    "one model twice": (_duplicate_model, "appears twice"),
}


@pytest.mark.parametrize("kind", TAMPERED)
def test_a_tampered_snapshot_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """A valid archive whose values no run could produce is refused like a corrupt one."""
    change, reason = TAMPERED[kind]
    clock = Clock()
    d = _daemon(clock, tmp_path)
    d.handle_many(_traffic(0, 6))
    with d.state.lock:
        d.state.models["a"].rejected["non_finite"] = 1  # so the per-model counts are in the file
    assert d.snapshotter is not None and d.snapshotter.final()
    path = tmp_path / persist.FILENAME
    _tamper(path, change)
    with caplog.at_level(logging.ERROR, logger="xentd.persist"):
        fresh = _daemon(clock, tmp_path)
    assert not fresh.state.models and fresh.state.counters.messages == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot be used" in errors[0].message and reason in errors[0].message, caplog.text
    assert not path.exists() and len(list(tmp_path.glob(f"{persist.FILENAME}.corrupt-*"))) == 1


def test_the_untampered_file_passes_the_check(tmp_path: Path) -> None:
    """The control for the cases above: the same file, rewritten unchanged, restores."""
    clock = Clock()
    d = _daemon(clock, tmp_path)
    d.handle_many(_traffic(0, 6))
    assert d.snapshotter is not None and d.snapshotter.final()
    _tamper(tmp_path / persist.FILENAME, lambda arrays, manifest: None)
    assert _state(_daemon(clock, tmp_path)) == _state(d)


def test_failing_snapshots_are_reported_until_one_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _daemon(Clock(), tmp_path)
    assert d.snapshotter is not None and d.snapshotter.failing() is None

    def full_disk(*args: object, **kwargs: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist, "write", full_disk)
    for n in (1, 2, 3):
        assert not d.snapshotter.final()
        assert d.snapshotter.failing() == (n, "No space left on device")
    monkeypatch.undo()
    assert d.snapshotter.final() and d.snapshotter.failing() is None
