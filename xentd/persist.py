"""State snapshots on disk: atomic, versioned, and refused cleanly when they cannot be used.

A snapshot is one ``.npz`` file (a zip of ``.npy`` arrays, read with
``allow_pickle=False``) in the state directory. Its ``manifest`` entry is UTF-8
JSON naming the format and version, the configuration the state was built
under, the daemon-wide counters, the deduplication window, and each model's
scalars; each model's arrays follow as ``m<i>.<name>``.

Writes go to a temporary file in the same directory, are fsynced, and replace
the previous snapshot with ``os.replace``, so a crash at any moment leaves
either the old snapshot or the new one, never a mix. On start the snapshot is
restored; one that is corrupt, of another version, or built under an
incompatible configuration is renamed aside (``*.corrupt-<time>``) with a log
line saying why, and the daemon starts empty.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xentd.errors import SnapshotError
from xentd.state import Counters, StateStore

log = logging.getLogger("xentd.persist")

FORMAT = "xentd-state"
VERSION = 1
FILENAME = "xentd-state.npz"


@dataclass(frozen=True)
class Image:
    """A consistent copy of the state: everything a snapshot file holds."""

    taken: float
    layout: dict[str, Any]
    counters: dict[str, Any]
    rejected: dict[str, int]
    recent: list[tuple[str, str]]
    models: list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]


def _layout(store: StateStore) -> dict[str, Any]:
    w, lim = store.windows_cfg, store.limits
    return {
        "class_limit": lim.class_limit,
        "loss_buckets": list(lim.loss_buckets),
        "windows": {
            "time": [[t.label, t.seconds] for t in w.time],
            "buckets": w.buckets,
            "count": list(w.count),
            "ewma_half_life": w.ewma_half_life_seconds,
        },
    }


def capture(store: StateStore) -> Image:
    """Copy the state out. Call with ``store.lock`` held; the copy is plain memcpy."""
    counters = {k: getattr(store.counters, k) for k in Counters.PERSISTED}
    counters["limit_hits"] = dict(counters["limit_hits"])
    models = []
    for m in store.models.values():
        scalars, arrays = m.export()
        models.append((m.name, scalars, arrays))
    return Image(
        taken=store.clock(),
        layout=_layout(store),
        counters=counters,
        rejected=dict(store.rejected),
        recent=store.recent.items(),
        models=models,
    )


def write(directory: Path, image: Image) -> int:
    """Write ``image`` atomically as the directory's snapshot; return its size in bytes."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "taken": image.taken,
        "layout": image.layout,
        "counters": image.counters,
        "rejected": image.rejected,
        "recent": image.recent,
        "models": [{"name": name, **scalars} for name, scalars, _ in image.models],
    }
    arrays: dict[str, np.ndarray] = {"manifest": np.frombuffer(json.dumps(manifest).encode("utf-8"), np.uint8)}
    for i, (_, _, model_arrays) in enumerate(image.models):
        for key, value in model_arrays.items():
            arrays[f"m{i}.{key}"] = value
    final = directory / FILENAME
    tmp = directory / f".{FILENAME}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself must survive a power cut
    finally:
        os.close(fd)
    return size


def read(path: Path) -> Image:
    """Read a snapshot file, or raise :class:`SnapshotError` saying why it cannot be used."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise SnapshotError("not a zip archive: not an xentd snapshot, or truncated")
            f.seek(0)
            with np.load(f, allow_pickle=False) as npz:
                return _from_npz(npz)
    except SnapshotError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        EOFError,
        zipfile.BadZipFile,
        io.UnsupportedOperation,
        UnicodeDecodeError,
    ) as exc:
        raise SnapshotError(f"unreadable: {type(exc).__name__}: {str(exc)[:200]}") from None


def _from_npz(npz: Any) -> Image:
    try:
        manifest = json.loads(bytes(npz["manifest"]).decode("utf-8"))
    except KeyError:
        raise SnapshotError("no manifest: not an xentd snapshot") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError("not an xentd snapshot")
    if manifest.get("version") != VERSION:
        raise SnapshotError(f"format version {manifest.get('version')!r}; this xentd reads {VERSION}")
    models = []
    for i, entry in enumerate(manifest["models"]):
        prefix = f"m{i}."
        arrays = {k[len(prefix) :]: npz[k] for k in npz.files if k.startswith(prefix)}
        scalars = {k: v for k, v in entry.items() if k != "name"}
        models.append((str(entry["name"]), scalars, arrays))
    return Image(
        taken=float(manifest["taken"]),
        layout=manifest["layout"],
        counters=manifest["counters"],
        rejected={str(k): int(v) for k, v in manifest["rejected"].items()},
        recent=[(str(m), str(b)) for m, b in manifest["recent"]],
        models=models,
    )


@dataclass(frozen=True)
class Restored:
    models: int
    windows: bool
    dropped: list[str]


def restore(store: StateStore, image: Image) -> Restored:
    """Load ``image`` into an empty ``store``. Raises :class:`SnapshotError` if the
    class limit or histogram buckets changed, since per-class totals and bucket
    counts cannot be mapped onto a different layout. A changed window setup only
    empties the windows: the lifetime totals still come back."""
    layout = _layout(store)
    for key in ("class_limit", "loss_buckets"):
        if image.layout.get(key) != layout[key]:
            raise SnapshotError(f"limits.{key} was {image.layout.get(key)!r} and is now {layout[key]!r}")
    windows = image.layout.get("windows") == layout["windows"]
    dropped = []
    try:
        with store.lock:
            for name, scalars, arrays in image.models:
                if not store.limits.admits(name) or len(store.models) >= store.limits.max_models:
                    dropped.append(name)
                    continue
                state = store.add_model(name, int(scalars["num_classes"]))
                state.restore(scalars, arrays, windows=windows)
            counters = image.counters
            store.counters = dataclasses.replace(
                store.counters,
                messages=int(counters["messages"]),
                duplicate_batches=int(counters["duplicate_batches"]),
                sequence_gaps=int(counters["sequence_gaps"]),
                models_evicted=int(counters["models_evicted"]),
                limit_hits={k: int(counters["limit_hits"].get(k, 0)) for k in store.counters.limit_hits},
            )
            for reason, n in image.rejected.items():
                if reason in store.rejected:
                    store.rejected[reason] = n
            store.recent.restore(image.recent)
            store.counters.restored_models = len(store.models)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        with store.lock:
            store.models.clear()
        raise SnapshotError(f"inconsistent contents: {type(exc).__name__}: {str(exc)[:200]}") from None
    return Restored(models=len(store.models), windows=windows, dropped=dropped)


def set_aside(path: Path, why: str) -> Path:
    """Rename an unusable snapshot out of the way, keeping it for inspection."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, aside)
    log.error("state snapshot %s cannot be used (%s); moved it to %s and starting with empty state", path, why, aside)
    return aside


def load_into(store: StateStore, directory: Path) -> Restored | None:
    """Restore the directory's snapshot into ``store``, if there is a usable one."""
    for stale in directory.glob(f".{FILENAME}.*.tmp"):
        stale.unlink(missing_ok=True)  # a write that a crash interrupted
    path = directory / FILENAME
    if not path.exists():
        log.info("no state snapshot in %s; starting empty", directory)
        return None
    try:
        image = read(path)
        restored = restore(store, image)
    except SnapshotError as exc:
        set_aside(path, str(exc))
        return None
    age = store.clock() - image.taken
    log.info(
        "restored %d model(s) from %s, taken %.1fs ago%s%s",
        restored.models,
        path,
        age,
        "" if restored.windows else "; the window settings changed, so windows start empty",
        f"; dropped {len(restored.dropped)} no longer admitted by [limits]" if restored.dropped else "",
    )
    return restored


class Snapshotter:
    """Writes snapshots every ``interval`` seconds from a background thread, and a final one on demand.

    The state is copied under the store's lock on the caller's thread, so each
    snapshot is consistent; only the file write happens in the background. If a
    write is still running when the next one falls due, that one is skipped.
    """

    def __init__(self, store: StateStore, directory: Path, interval: float) -> None:
        self.store = store
        self.directory = directory
        self.interval = interval
        self._next = time.monotonic() + interval
        self._writer: threading.Thread | None = None

    def maybe(self, now: float | None = None) -> bool:
        """Start a snapshot if one is due. Call from the scoring loop."""
        now = time.monotonic() if now is None else now
        if now < self._next or (self._writer is not None and self._writer.is_alive()):
            return False
        self._next = now + self.interval
        with self.store.lock:
            image = capture(self.store)
        self._writer = threading.Thread(target=self._write, args=(image,), name="xentd-snapshot", daemon=True)
        self._writer.start()
        return True

    def final(self) -> bool:
        """Wait for a running write, then write the current state. Returns whether it succeeded."""
        if self._writer is not None:
            self._writer.join()
        with self.store.lock:
            image = capture(self.store)
        return self._write(image)

    def _write(self, image: Image) -> bool:
        started = time.monotonic()
        try:
            size = write(self.directory, image)
        except OSError as exc:
            log.error("cannot write state snapshot to %s: %s", self.directory, exc.strerror or exc)
            with self.store.lock:
                self.store.counters.snapshot_failures += 1
            return False
        elapsed = time.monotonic() - started
        with self.store.lock:
            c = self.store.counters
            c.snapshots_written += 1
            c.last_snapshot_time = image.taken
            c.last_snapshot_seconds = elapsed
            c.last_snapshot_bytes = size
        log.debug("state snapshot: %d model(s), %d bytes in %.3fs", len(image.models), size, elapsed)
        return True
