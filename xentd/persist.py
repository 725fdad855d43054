"""State snapshots on disk: atomic, versioned, and refused cleanly when they cannot be used.

A snapshot is one ``.npz`` file (a zip of ``.npy`` arrays, read with
``allow_pickle=False``) in the state directory. Its ``manifest`` entry is UTF-8
JSON naming the format and version, the configuration the state was built
under, the daemon-wide counters, the deduplication window, and each model's
scalars; each model's arrays follow as ``m<i>.<name>``.

Writes go to a temporary file in the same directory, are fsynced, and replace
the previous snapshot with ``os.replace``, so a crash at any moment leaves
either the old snapshot or the new one, never a mix. On start the snapshot is
restored. Every value is checked first (:func:`check`): counts are integers
>= 0, sums and histogram buckets finite and >= 0, every array of the expected
kind and shape, ring classes inside the class slots. A file that is a valid
archive but holds a value no run could have produced (a negative
samples_total, a NaN count, an infinite sum: damage or tampering) is refused
like a corrupt one. One that is corrupt, of another version, fails the check,
or was built under an incompatible configuration is renamed aside
(``*.corrupt-<time>``) with an ERROR line saying why, and the daemon starts
empty.

While snapshots fail (a full disk, say), :meth:`Snapshotter.failing` says how
many in a row and the last error, for ``/healthz``; the next success clears it.
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
from xentd.state import Counters, ModelState, StateStore, count, number

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
    # Per model: (name, scalars, arrays). A component's arrays are named "<component>.<array>"
    # and its scalars sit under scalars["parts"][component]; the loss component's sit at the
    # top level, unprefixed, as in every snapshot before components existed.
    models: list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]
    # The daemon-wide components (StateStore.components): name -> (scalars, arrays).
    components: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = dataclasses.field(default_factory=dict)


# The layout keys a single model component depends on (its class's LAYOUT), by the setting they hold.
_COMPONENT_LAYOUT = {"calibration_bins": "calibration.bins"}


def _layout(store: StateStore) -> dict[str, Any]:
    w, lim = store.windows_cfg, store.limits
    return {
        "class_limit": lim.class_limit,
        "loss_buckets": list(lim.loss_buckets),
        "calibration_bins": store.calibration_cfg.bins,
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
        parts: dict[str, Any] = {}
        for part, component in m.components().items():
            part_scalars, part_arrays = component.save()
            if part:
                parts[part] = part_scalars
                arrays.update({f"{part}.{k}": v for k, v in part_arrays.items()})
            else:
                scalars.update(part_scalars)
                arrays.update(part_arrays)
        scalars["parts"] = parts
        models.append((m.name, scalars, arrays))
    return Image(
        taken=store.clock(),
        layout=_layout(store),
        counters=counters,
        rejected=dict(store.rejected),
        recent=store.recent.items(),
        models=models,
        components={name: c.save() for name, c in store.components().items()},
    )


def _split(
    scalars: dict[str, Any], arrays: dict[str, np.ndarray]
) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """A saved model's (scalars, arrays) by component: the inverse of what :func:`capture` merged."""
    parts: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {"": (scalars, {})}
    for name, part_scalars in (scalars.get("parts") or {}).items():
        parts[name] = (part_scalars, {})
    for key, value in arrays.items():
        part, _, array = key.rpartition(".")
        if part not in parts:
            raise SnapshotError(f"array {key!r} belongs to no component")
        parts[part][1][array] = value
    return parts


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
        "components": {name: scalars for name, (scalars, _) in image.components.items()},
    }
    arrays: dict[str, np.ndarray] = {"manifest": np.frombuffer(json.dumps(manifest).encode("utf-8"), np.uint8)}
    for i, (_, _, model_arrays) in enumerate(image.models):
        for key, value in model_arrays.items():
            arrays[f"m{i}.{key}"] = value
    for name, (_, component_arrays) in image.components.items():
        for key, value in component_arrays.items():
            arrays[f"c.{name}.{key}"] = value
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
        OverflowError,  # int() of an infinite count
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
    components = {}
    for name, scalars in (manifest.get("components") or {}).items():
        prefix = f"c.{name}."
        components[str(name)] = (scalars, {k[len(prefix) :]: npz[k] for k in npz.files if k.startswith(prefix)})
    return Image(
        taken=float(manifest["taken"]),
        layout=manifest["layout"],
        counters=manifest["counters"],
        rejected={str(k): int(v) for k, v in manifest["rejected"].items()},
        recent=[(str(m), str(b)) for m, b in manifest["recent"]],
        models=models,
        components=components,
    )


def check(image: Image) -> None:
    """Raise :class:`SnapshotError` unless every value in ``image`` is one a run can produce.

    Shapes against the current configuration are each component's ``load`` check; this
    one needs only the image: counts are integers >= 0, sums finite and >= 0, times
    finite, arrays of their kind, ring classes inside the class slots, and the ring long
    enough for the samples it claims to hold. Each component checks its own values.
    """
    try:
        number(image.taken, "taken", non_negative=False)
        counters = image.counters
        for key in Counters.PERSISTED:
            if key != "limit_hits" and key in counters:  # a counter newer than the file is absent: 0
                count(counters[key], f"counters.{key}")
        for key, n in counters["limit_hits"].items():
            count(n, f"counters.limit_hits.{key}")
        for reason, n in image.rejected.items():
            count(n, f"rejected.{reason}")
        class_limit = count(image.layout["class_limit"], "layout.class_limit")
        largest_count_window = max((int(k) for k in image.layout["windows"]["count"]), default=0)
        seen: set[str] = set()
        for name, scalars, arrays in image.models:
            where = f"model {name!r}:"
            if name in seen:
                raise SnapshotError(f"{where} appears twice")
            seen.add(name)
            ModelState.check_saved(scalars, where, class_limit)
            slots = ModelState.component_slots(scalars["num_classes"], class_limit)
            for part, (part_scalars, part_arrays) in _split(scalars, arrays).items():
                if part not in slots:
                    raise SnapshotError(f"{where} unknown component {part!r}")
                ModelState.COMPONENT_TYPES[part].check(
                    part_scalars, part_arrays, f"{where}{' ' + part if part else ''}", slots[part], largest_count_window
                )
    except SnapshotError:
        raise
    except ValueError as exc:
        raise SnapshotError(str(exc)) from None
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise SnapshotError(f"inconsistent contents: {type(exc).__name__}: {str(exc)[:200]}") from None


@dataclass(frozen=True)
class Restored:
    models: int
    windows: bool
    dropped: list[str]
    # Settings that changed since the snapshot, whose component started empty (calibration.bins).
    reset: tuple[str, ...] = ()


def restore(store: StateStore, image: Image) -> Restored:
    """Load ``image`` into an empty ``store``. Raises :class:`SnapshotError` if the
    class limit or histogram buckets changed, since per-class totals and bucket
    counts cannot be mapped onto a different layout, or if a value fails
    :func:`check`. A changed window setup only empties the windows: the lifetime
    totals still come back."""
    layout = _layout(store)
    for key in ("class_limit", "loss_buckets"):
        if image.layout.get(key) != layout[key]:
            raise SnapshotError(f"limits.{key} was {image.layout.get(key)!r} and is now {layout[key]!r}")
    # Settings that only one component's layout depends on (its LAYOUT): when one changed,
    # that component starts empty and everything else is restored. A snapshot written
    # before the setting existed has nothing of that component to map.
    changed = {key for key in _COMPONENT_LAYOUT if image.layout.get(key, layout[key]) != layout[key]}
    check(image)
    windows = image.layout.get("windows") == layout["windows"]
    dropped = []
    # Everything is loaded into an empty store of the same configuration first, and moved into
    # ``store`` only once all of it loaded: a file refused halfway leaves nothing behind.
    fresh = store.empty_like()
    try:
        for name, scalars, arrays in image.models:
            if not fresh.limits.admits(name) or len(fresh.models) >= fresh.limits.max_models:
                dropped.append(name)
                continue
            state = fresh.add_model(name, int(scalars["num_classes"]))
            state.restore(scalars)
            components = state.components()
            for part, (part_scalars, part_arrays) in _split(scalars, arrays).items():
                if changed & set(ModelState.COMPONENT_TYPES[part].LAYOUT):
                    continue
                components[part].load(part_scalars, part_arrays, windows=windows)
        counters = image.counters
        fresh.counters = dataclasses.replace(
            fresh.counters,
            messages=int(counters["messages"]),
            duplicate_batches=int(counters["duplicate_batches"]),
            empty_batches=int(counters.get("empty_batches", 0)),
            sequence_gaps=int(counters["sequence_gaps"]),
            models_evicted=int(counters["models_evicted"]),
            limit_hits={k: int(counters["limit_hits"].get(k, 0)) for k in fresh.counters.limit_hits},
        )
        for reason, n in image.rejected.items():
            if reason in fresh.rejected:
                fresh.rejected[reason] = n
        fresh.recent.restore(image.recent)
        for name, component in fresh.components().items():
            if name in image.components:  # absent from snapshots older than the component
                component.load(*image.components[name], set(fresh.models))
        fresh.counters.restored_models = len(fresh.models)
    except SnapshotError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError, IndexError) as exc:
        raise SnapshotError(f"inconsistent contents: {type(exc).__name__}: {str(exc)[:200]}") from None
    with store.lock:
        store.adopt(fresh)
    return Restored(
        models=len(store.models),
        windows=windows,
        dropped=dropped,
        reset=tuple(_COMPONENT_LAYOUT[key] for key in sorted(changed)),
    )


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
    if restored.reset:
        log.warning(
            "%s changed since the snapshot: the statistics that depend on it start empty "
            "(everything else was restored)",
            ", ".join(restored.reset),
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
        self._failing: tuple[int, str] | None = None

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

    def failing(self) -> tuple[int, str] | None:
        """(snapshots failed in a row, the last error) while writes fail; None once one succeeds."""
        return self._failing

    def _write(self, image: Image) -> bool:
        started = time.monotonic()
        try:
            size = write(self.directory, image)
        except Exception as exc:  # a thread of its own: nothing above it would report this
            if isinstance(exc, OSError):
                error = exc.strerror or str(exc)
                log.error("cannot write state snapshot to %s: %s", self.directory, error)
            else:
                error = f"{type(exc).__name__}: {exc}"
                log.exception("cannot write state snapshot to %s", self.directory)
            with self.store.lock:
                self.store.counters.snapshot_failures += 1
            failed = self._failing[0] + 1 if self._failing is not None else 1
            self._failing = (failed, error[:200])  # one assignment, so a reader never sees half of it
            return False
        elapsed = time.monotonic() - started
        with self.store.lock:
            c = self.store.counters
            c.snapshots_written += 1
            c.last_snapshot_time = image.taken
            c.last_snapshot_seconds = elapsed
            c.last_snapshot_bytes = size
        if self._failing is not None:
            log.info("state snapshot written to %s again, after %d failed", self.directory, self._failing[0])
            self._failing = None
        log.debug("state snapshot: %d model(s), %d bytes in %.3fs", len(image.models), size, elapsed)
        return True
