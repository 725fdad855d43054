"""The hot path: frames in, decoded, validated, grouped, scored and folded into state.

The daemon owns the socket and the lifecycle; it hands every drained list of
messages to :meth:`Pipeline.handle_many`, which never raises. A message that
cannot be decoded or scored is counted under its reason, logged at a limited
rate, and dropped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xentd import wire
from xentd.config import Config
from xentd.errors import DecodeError, Reason, RejectedBatch
from xentd.jit import kernel_array
from xentd.joins import Joined, PoolKey
from xentd.kernels import Backend, SampleScores, ScoringParams
from xentd.names import MODEL_NAME_RE
from xentd.predstats import from_scores, row_stats
from xentd.state import ModelState, StateStore
from xentd.validate import (
    DATATYPE_EPS,
    Batch,
    FastLayout,
    InputKind,
    LabelBatch,
    LayoutKey,
    MessageKind,
    PendingBatch,
    Scratch,
    Segments,
    TargetKind,
    check_many,
    concatenate,
    fast_layout,
    flagged_segments,
    kernel_predictions,
    label_targets,
    layout,
    message_kind,
    validate,
    validate_labels,
    validate_predictions,
)
from xentd.wire import DATATYPES, FLOAT_DATATYPES, ID_DATATYPES

log = logging.getLogger("xentd")

# Drains of fewer messages are handled one message at a time.
BATCH_MIN = 4


@dataclass
class _RejectionLog:
    """At most one log line per reason per interval, saying how many were suppressed."""

    interval: float
    clock: Callable[[], float] = time.monotonic
    _last: dict[Reason, float] = field(default_factory=dict)
    _suppressed: dict[Reason, int] = field(default_factory=dict)

    def __call__(self, reason: Reason, detail: str, model: str | None) -> None:
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        more = f" ({suppressed} more since last report)" if suppressed else ""
        log.warning("rejected batch%s: %s%s", f" for model {model!r}" if model else "", detail, more)


@dataclass
class _Group:
    """Batches of one model with one layout, scored together (the one-message-at-a-time path)."""

    state: ModelState
    key: tuple[object, ...]
    batches: list[Batch]


class _Entry:
    """One message of a drain, from its arrival until it is folded or counted."""

    __slots__ = ("unpacked", "fast", "kind", "producer", "seq", "refused", "batch", "layout", "segment", "counted")

    def __init__(self) -> None:
        self.unpacked: wire.Unpacked | None = None
        self.kind = MessageKind.FULL
        self.fast: FastLayout | None = None
        self.producer: str | None = None
        self.seq: int | None = None
        # (reason, detail, model to count it under) once the message is refused.
        self.refused: tuple[Reason, str, str | None] | None = None
        # A message checked on its own by validate() (it did not fit the batched check).
        self.batch: Batch | None = None
        self.layout: _Layout | None = None
        self.segment = -1  # its rows in layout.segments
        # Join messages: counted already (received, rejected, empty or a retry), so an internal
        # error later in its run does not count it twice.
        self.counted = False


class _Scored:
    """One kernel call over many messages' rows: the batch it scored, its per-sample scores
    (in a buffer set of their own, alive until the drain is folded) and their label-free
    statistics."""

    __slots__ = ("batch", "scores", "label_free")

    def __init__(self, batch: Batch, scores: SampleScores) -> None:
        self.batch = batch
        self.scores = scores
        self.label_free = from_scores(scores, batch.binary)


class _Layout:
    """The messages of one layout in a drain, concatenated (:func:`xentd.validate.check_many`)
    and scored together, the kernel checking their values in the same pass.

    Each model's messages are concatenated next to each other, in arrival order, so
    that what one model folds is one range of rows. ``scored[model]`` is the call that
    scored the model's rows and the offset of those rows in it (call row = layout row
    - offset); ``unnormalized_rows[s]`` is message ``s``'s count of prediction rows whose
    mass is off 1.
    """

    __slots__ = ("key", "by_model", "segments", "scored", "unnormalized_rows")

    def __init__(self, key: LayoutKey) -> None:
        self.key = key
        self.by_model: dict[str, list[_Entry]] = {}
        self.segments: Segments | None = None
        self.scored: dict[str, tuple[_Scored, int]] = {}
        self.unnormalized_rows: list[int] = []


class _Unit:
    """Consecutive accepted messages of one model and one scoring key: one fold."""

    __slots__ = ("state", "model", "key", "params", "entries", "round")

    def __init__(self, state: ModelState, model: str, key: object, params: ScoringParams | None, round_: int) -> None:
        self.state = state
        self.model = model
        self.key = key
        self.params = params
        self.entries: list[_Entry] = []
        self.round = round_


class Pipeline:
    """Decode -> validate -> group -> score -> fold, for one drained list of messages at a time."""

    def __init__(self, config: Config, state: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.state = state
        self.clock = clock
        self.backend: Backend | None = None
        self._params: dict[tuple[str, str], ScoringParams] = {}
        self.backend_choice = config.model_backends()
        self._scratch = Scratch()
        self._outputs: list[Any] = []  # see _output_set
        self._log_rejection = _RejectionLog(config.log.rejection_interval_seconds)
        self._eviction_logged = -math.inf
        self._evicted_unlogged: dict[str, int] = {}
        self._limits = {
            "max_message_bytes": config.ingest.max_message_bytes,
            "max_header_bytes": config.ingest.max_header_bytes,
            "topic": config.ingest.socket == "sub",
        }

    def handle_many(self, messages: list[list[Any]]) -> None:
        """Process messages in arrival order. Never raises.

        Small messages (at most ``engine.group_max_elements`` prediction values) are
        handled a drain at a time: each header is decoded on its own; the values of
        all messages of one layout are checked in one jitted pass, one verdict per
        message, so a bad message is rejected alone with its reason; each model's
        consecutive accepted messages are folded at once, and messages of one layout
        and scoring setup are scored in one kernel call across models. Larger
        messages are handled one at a time, after what arrived before them. Every
        model sees its samples in arrival order; duplicates and sequence numbers
        are judged in arrival order, as if one message at a time.
        """
        chunk: list[_Entry] = []
        joins: list[_Entry] = []
        limit = self.config.engine.group_max_elements
        for frames in messages:
            entry = self._unpack(frames)
            if entry.refused is None and entry.kind is not MessageKind.FULL:
                # Predictions-only and labels-only messages, in order among themselves (xentd.joins).
                self._run(chunk)
                chunk = []
                joins.append(entry)
                continue
            if joins:
                self._run_joins(joins)
                joins = []
            if entry.refused is None and _elements(entry) > limit:
                # A large batch is validated into the scratch buffer and scored at once.
                self._run(chunk)
                chunk = []
                self._handle_one(entry)
            else:
                chunk.append(entry)
        self._run(chunk)
        self._run_joins(joins)

    # --- a drain of small messages ------------------------------------------------

    def _unpack(self, frames: list[Any]) -> _Entry:
        entry = _Entry()
        try:
            unpacked = wire.unpack(frames, **self._limits)  # type: ignore[arg-type]
            entry.unpacked = unpacked
            # Before validation: a message that arrived but is refused is not a gap.
            entry.producer, entry.seq = unpacked.producer, unpacked.seq
            entry.fast = fast_layout(unpacked.header)
            if entry.fast is None:
                entry.kind = message_kind(unpacked.header)
        except DecodeError as exc:
            # Refused while decoding: the header may still have named its model and stream position.
            entry.producer, entry.seq = exc.producer, exc.seq
            entry.refused = (exc.reason, exc.detail, exc.model)
        except Exception:
            log.exception("internal error while decoding a message")
            entry.refused = (Reason.INTERNAL_ERROR, "internal error", None)
        return entry

    def _run(self, chunk: list[_Entry]) -> None:
        if len(chunk) < BATCH_MIN:
            # Too few to repay the batched check's fixed cost (a drain is this short only
            # when the daemon keeps up with its producers).
            for entry in chunk:
                if entry.refused is None:
                    self._handle_one(entry)
                else:
                    if entry.producer is not None and entry.seq is not None:
                        self._observe_seq(entry.producer, entry.seq)
                    self._rejected(*entry.refused)
            return
        self._check(chunk)
        for round_ in self._accept_all(chunk):
            scored: list[_Unit] = []
            for unit in round_:
                if unit.key is None:
                    batch = unit.entries[0].batch
                    assert batch is not None
                    self._score(_Group(unit.state, (), [batch]))
                else:
                    scored.append(unit)
            if scored:
                self._fold_units(scored)

    def _check(self, chunk: list[_Entry]) -> None:
        """Give every entry a verdict: refused, a validated batch, or good rows of a layout,
        scored already."""
        layouts: dict[LayoutKey, _Layout] = {}
        calls = 0  # kernel calls so far in this drain: each writes a buffer set of its own
        for entry in chunk:
            if entry.refused is not None:
                continue
            fast = entry.fast
            if fast is None:
                self._validate(entry)
                continue
            group = layouts.get(fast.key)
            if group is None:
                group = layouts[fast.key] = _Layout(fast.key)
            assert entry.unpacked is not None
            group.by_model.setdefault(entry.unpacked.header.model, []).append(entry)
            entry.layout = group
        for group in layouts.values():
            try:
                group.segments = self._check_layout(group)
                bad, calls = self._score_layout(group, calls)
            except Exception:
                log.exception("internal error in the batched check; checking %s messages one by one", group.key)
                for entries in group.by_model.values():
                    for entry in entries:
                        entry.layout = None
                        self._validate(entry)
                continue
            for entries in group.by_model.values():
                for entry in entries:
                    if bad[entry.segment]:
                        # Which rule it breaks, in the words of a message checked on its own.
                        entry.layout = None
                        self._validate(entry)

    def _check_layout(self, group: _Layout) -> Segments:
        preds: list[memoryview] = []
        targets: list[memoryview] = []
        weights: list[memoryview] | None = [] if group.key[5] is not None else None
        rows: list[int] = []
        tolerances: list[float | None] = []
        soft = group.key[4] == 2
        for model, entries in group.by_model.items():
            tolerance = self.config.scoring_for(model).normalization_tolerance if soft else None
            for entry in entries:
                fast, unpacked = entry.fast, entry.unpacked
                assert fast is not None and unpacked is not None
                entry.segment = len(rows)
                buffers = unpacked.buffers
                preds.append(buffers[fast.predictions])
                targets.append(buffers[fast.targets])
                if weights is not None:
                    weights.append(buffers[fast.weights])
                rows.append(fast.rows)
                tolerances.append(tolerance)
        return check_many(group.key, preds, targets, weights, rows, tolerances)

    def _score_layout(self, group: _Layout, calls: int) -> tuple[list[bool], int]:
        """Score every message of a layout, one kernel call per scoring setup among its models
        (usually one call, over the concatenated buffers as they are), and return each
        message's verdict (its weights', or the kernel's flag on any of its rows) and the
        drain's count of kernel calls so far."""
        segs = group.segments
        assert segs is not None and self.backend is not None
        datatype = group.key[1]
        setups: dict[tuple[ScoringParams, str | None], list[str]] = {}
        for model in group.by_model:
            setup = (self._params_for(model, datatype), self.backend_choice.get(model))
            setups.setdefault(setup, []).append(model)
        starts = segs.starts
        bad = list(segs.bad)
        group.unnormalized_rows = [0] * len(bad)
        for (params, _), models in setups.items():
            ranges: list[tuple[int, int]] = []  # each model's rows in the layout
            order: list[int] = []  # the call's messages (segments), in its order
            for model in models:
                entries = group.by_model[model]
                ranges.append((starts[entries[0].segment], starts[entries[-1].segment + 1]))
                order.extend(e.segment for e in entries)
            # One setup for the whole layout (the usual case): one range, the buffers as they are.
            batch = segs.batch(models[0], _merge(ranges))
            call = _Scored(batch, self.backend.score(batch, params, self._output_set(calls)))
            calls += 1
            offset = 0  # rows of the call before this model's
            for model, (start, end) in zip(models, ranges, strict=True):
                group.scored[model] = (call, start - offset)
                offset += end - start
            # Each message's rows in the call, in the call's order.
            call_starts = [0]
            for seg in order:
                call_starts.append(call_starts[-1] + starts[seg + 1] - starts[seg])
            invalid, unnormalized = call.scores.invalid, call.scores.unnormalized
            assert invalid is not None and unnormalized is not None
            for seg, flagged in zip(order, flagged_segments(invalid, call_starts), strict=True):
                if flagged:
                    bad[seg] = True
            if call.scores.unnormalized_rows:
                counts = np.add.reduceat(unnormalized[: call_starts[-1]], call_starts[:-1], dtype=np.int64)
                for seg, count in zip(order, counts.tolist(), strict=True):
                    group.unnormalized_rows[seg] = count
        return bad, calls

    def _output_set(self, k: int) -> Any:
        """The ``k``-th buffer set of a drain's kernel calls: the scores of every call stay
        alive until the drain is folded. Grow-only, reused by every drain."""
        assert self.backend is not None
        while len(self._outputs) <= k:
            self._outputs.append(self.backend.new_outputs())
        return self._outputs[k]

    def _validate(self, entry: _Entry) -> None:
        """Check one message with validate(): its batch, or its reason."""
        assert entry.unpacked is not None
        model = entry.unpacked.header.model
        try:
            tolerance = self.config.scoring_for(model).normalization_tolerance
            entry.batch = validate(entry.unpacked.message(), None, tolerance)
        except RejectedBatch as exc:
            entry.refused = (exc.reason, exc.detail, model if MODEL_NAME_RE.fullmatch(model) else None)
        except Exception:
            log.exception("internal error while validating a batch for model %r", model)
            entry.refused = (Reason.INTERNAL_ERROR, "internal error", model)

    def _accept_all(self, chunk: list[_Entry]) -> list[list[_Unit]]:
        """In arrival order: sequence numbers, rejections, duplicates and admission; then
        each model's accepted messages as units, in rounds that keep every model's order."""
        rounds: list[list[_Unit]] = []
        open_units: dict[str, _Unit] = {}
        logs: list[tuple[Reason, str, str | None]] = []
        state = self.state
        recent = state.recent
        with state.lock:
            for entry in chunk:
                self._observe_locked(entry.producer, entry.seq)
                if entry.refused is not None:
                    self._count_rejection(entry.refused, logs)
                    continue
                batch = entry.batch
                if batch is not None:
                    if batch.size == 0:
                        self._count_empty_locked()
                        continue
                    model, batch_id, num_classes = batch.model, batch.batch_id, batch.num_classes
                    datatype = batch.prediction_datatype
                else:
                    assert entry.unpacked is not None and entry.fast is not None
                    header = entry.unpacked.header
                    model, batch_id = header.model, header.batch_id or None
                    num_classes = entry.fast.key[2] or 2
                    datatype = entry.fast.key[1]
                if self._duplicate_locked(model, batch_id):
                    continue
                try:
                    model_state = state.model(model, num_classes)
                    params = self._params_for(model, datatype)
                except RejectedBatch as exc:
                    self._count_rejection((exc.reason, exc.detail, model), logs)
                    continue
                except Exception:
                    log.exception("internal error while admitting a batch for model %r", model)
                    self._count_rejection((Reason.INTERNAL_ERROR, "internal error", model), logs)
                    continue
                if batch_id is not None:
                    recent.add((model, batch_id))
                key = None if batch is not None else (entry.fast.key, params, self.backend_choice.get(model))  # type: ignore[union-attr]
                unit = open_units.get(model)
                if unit is None or key is None or unit.key != key:
                    unit = _Unit(model_state, model, key, params, 0 if unit is None else unit.round + 1)
                    open_units[model] = unit
                    if unit.round == len(rounds):
                        rounds.append([])
                    rounds[unit.round].append(unit)
                unit.entries.append(entry)
        for reason, detail, name in logs:
            self._log_rejection(reason, detail, name)
        return rounds

    def _count_rejection(
        self, refused: tuple[Reason, str, str | None], logs: list[tuple[Reason, str, str | None]]
    ) -> None:
        """Count a rejection (state lock held); its log line is written once the lock is released."""
        self.state.reject(refused[0], refused[2])
        self.state.counters.messages += 1
        logs.append(refused)

    def _fold_units(self, units: list[_Unit]) -> None:
        """Fold each unit's rows, scored already by its layout's kernel call, into its model."""
        logs: list[tuple[Reason, str, str | None]] = []
        now = self.clock()  # one instant for the whole round: its units fold microseconds apart
        limit_hits = 0
        with self.state.lock:
            for unit in units:
                for run in _adjacent(unit.entries):
                    try:
                        limit_hits += self._fold_run(unit.state, run, now)
                        self.state.counters.messages += len(run)
                    except RejectedBatch as exc:
                        if len(run) == 1:
                            self._count_rejection((exc.reason, exc.detail, unit.model), logs)
                            continue
                        # One message spoiled the fold (its losses overflow): fold them one by
                        # one, in order, so that only it is rejected.
                        for entry in run:
                            try:
                                limit_hits += self._fold_run(unit.state, [entry], now)
                                self.state.counters.messages += 1
                            except RejectedBatch as one:
                                self._count_rejection((one.reason, one.detail, unit.model), logs)
                    except Exception:
                        log.exception("internal error while folding %d batch(es) for model %r", len(run), unit.model)
                        for _ in run:
                            self._count_rejection((Reason.INTERNAL_ERROR, "internal error", unit.model), logs)
            self.state.counters.limit_hits["class_limit"] += limit_hits
        for reason, detail, model in logs:
            self._log_rejection(reason, detail, model)

    def _fold_run(self, state: ModelState, run: list[_Entry], now: float) -> bool:
        """Fold messages whose rows are adjacent in their layout (state lock held)."""
        layout = run[0].layout
        assert layout is not None and layout.segments is not None
        segs = layout.segments
        call, offset = layout.scored[state.name]
        first, last = run[0].segment, run[-1].segment
        if first == last:
            unnormalized_targets = segs.unnormalized[first]
            unnormalized_rows = layout.unnormalized_rows[first]
        else:
            unnormalized_targets = sum([segs.unnormalized[e.segment] for e in run])
            unnormalized_rows = sum([layout.unnormalized_rows[e.segment] for e in run])
        batch = call.batch
        return state.fold(
            call.scores,
            batch.weights,
            now,
            _last_ts(run),
            batches=len(run),
            unnormalized_targets=unnormalized_targets,
            targets=batch.targets,
            binary=batch.binary,
            rows=(segs.starts[first] - offset, segs.starts[last + 1] - offset),
            label_free=call.label_free,
            unnormalized_rows=unnormalized_rows,
        )

    # --- delayed labels: predictions-only and labels-only messages ----------------

    def _run_joins(self, entries: list[_Entry]) -> None:
        """Handle join messages in arrival order, consecutive ones of one model and kind together."""
        start = 0
        while start < len(entries):
            first = entries[start]
            assert first.unpacked is not None
            model, kind = first.unpacked.header.model, first.kind
            end = start + 1
            while end < len(entries):
                nxt = entries[end].unpacked
                assert nxt is not None
                if entries[end].kind is not kind or nxt.header.model != model:
                    break
                end += 1
            run = entries[start:end]
            try:
                if kind is MessageKind.PREDICTIONS:
                    self._predictions_only(run)
                else:
                    self._labels_only(run)
            except Exception:
                log.exception("internal error while joining %d message(s) for model %r", len(run), model)
                for entry in run:
                    if not entry.counted:
                        self._rejected(Reason.INTERNAL_ERROR, "internal error", model)
            start = end

    def _validated(self, entry: _Entry, check: Callable[[wire.Message], Any]) -> Any:
        """``check(message)``, or None with the rejection counted."""
        assert entry.unpacked is not None
        model = entry.unpacked.header.model
        if entry.producer is not None and entry.seq is not None:
            self._observe_seq(entry.producer, entry.seq)
        try:
            return check(entry.unpacked.message())
        except RejectedBatch as exc:
            entry.counted = True
            self._rejected(exc.reason, exc.detail, model if MODEL_NAME_RE.fullmatch(model) else None)
        return None

    def _predictions_only(self, run: list[_Entry]) -> None:
        """Rows that wait for labels: counted in the label-free statistics, then stored by id."""
        accepted: list[tuple[_Entry, PendingBatch]] = []
        for entry in run:
            batch = self._validated(entry, validate_predictions)
            if batch is not None:
                accepted.append((entry, batch))
        if not accepted:
            return
        now = self.clock()
        stats = [row_stats(b.predictions, b.kind) for _, b in accepted]
        logs: list[tuple[Reason, str, str | None]] = []
        evicted: dict[str, int] = {}
        with self.state.lock:
            for (entry, batch), (entropy, confidence) in zip(accepted, stats, strict=True):
                entry.counted = True
                if not self._admit_join_locked(batch.model, batch.batch_id, batch.size):
                    continue
                try:
                    state = self.state.model(batch.model, batch.num_classes)
                    state.fold_predictions(entropy, confidence, batch.weights, now)
                except RejectedBatch as exc:
                    self._count_rejection((exc.reason, exc.detail, batch.model), logs)
                    continue
                if batch.batch_id is not None:
                    self.state.recent.add((batch.model, batch.batch_id))
                key = PoolKey(
                    int(batch.kind),
                    batch.prediction_datatype,
                    0 if batch.wire.ndim == 1 else batch.num_classes,
                    batch.weights is not None,
                )
                result = self.state.joins.put(batch.model, key, batch.ids, batch.wire, batch.weights, now)
                for evicted_model, n in result.evicted.items():
                    evicted[evicted_model] = evicted.get(evicted_model, 0) + n
                self.state.counters.messages += 1
        for reason, detail, name in logs:
            self._log_rejection(reason, detail, name)
        if evicted:
            self._log_eviction(evicted)

    def _admit_join_locked(self, model: str, batch_id: str | None, size: int) -> bool:
        if size == 0:
            self._count_empty_locked()
            return False
        return not self._duplicate_locked(model, batch_id)

    def _log_eviction(self, evicted: dict[str, int]) -> None:
        """A warning at most once per ``log.rejection_interval``, with what it leaves out."""
        for model, n in evicted.items():
            self._evicted_unlogged[model] = self._evicted_unlogged.get(model, 0) + n
        now = time.monotonic()
        if now - self._eviction_logged < self.config.log.rejection_interval_seconds:
            return
        self._eviction_logged = now
        pending, self._evicted_unlogged = self._evicted_unlogged, {}
        models = ", ".join(f"{m} ({n})" for m, n in sorted(pending.items(), key=lambda x: -x[1])[:5])
        log.warning(
            "the join store reached labels.max_pending_bytes=%d: evicted the %d oldest waiting prediction(s) "
            "since the last report, of %s%s; raise the budget or lower labels.ttl",
            self.state.joins.max_bytes,
            sum(pending.values()),
            models,
            " ..." if len(pending) > 5 else "",
        )

    def _labels_only(self, run: list[_Entry]) -> None:
        """Labels joined to their waiting predictions; each joined pair is scored as if sent together."""
        model = run[0].unpacked.header.model  # type: ignore[union-attr]
        with self.state.lock:
            state = self.state.models.get(model)
            binaries = {k.columns == 0 for k, p in self.state.joins.pools.get(model, {}).items() if p.count}
        # Targets are checked against the model's class count, in the form the waiting
        # predictions need: binary or multiclass (both, for a 2-class model that sends both).
        # With nothing waiting, any form the model's class count allows will do.
        required = sorted(binaries)
        candidates = required or ([True, False] if state is not None and state.num_classes == 2 else [False])
        if state is not None and len(run) >= BATCH_MIN:
            fast = self._labels_checked_together(run, state.num_classes, candidates)
            if fast is not None:
                self._join_labels(state, fast)
                return
        labels: list[tuple[_Entry, LabelBatch]] = []
        for entry in run:
            batch = self._validated(entry, validate_labels)
            if batch is not None:
                labels.append((entry, batch))
        if not labels:
            return
        if state is None:
            for entry, _ in labels:
                entry.counted = True
                self._rejected(
                    Reason.UNKNOWN_MODEL,
                    f"labels for model {model!r}, which has sent no predictions since xentd started",
                    None,
                )
            return
        tolerance = self.config.scoring_for(model).normalization_tolerance
        checked: list[tuple[_Entry, LabelBatch, dict[bool, tuple[np.ndarray, TargetKind, int]]]] = []
        for entry, batch in labels:
            forms: dict[bool, tuple[np.ndarray, TargetKind, int]] = {}
            error: RejectedBatch | None = None
            for binary in candidates:
                try:
                    forms[binary] = label_targets(batch, state.num_classes, binary, tolerance)
                except RejectedBatch as exc:
                    error = error or exc
            if error is not None and (required or not forms):
                entry.counted = True
                self._rejected(error.reason, error.detail, model)
                continue
            checked.append((entry, batch, forms))
        self._join_labels(state, checked)

    def _labels_checked_together(
        self, run: list[_Entry], num_classes: int, candidates: list[bool]
    ) -> list[tuple[_Entry, LabelBatch, dict[bool, tuple[np.ndarray, TargetKind, int]]]] | None:
        """The usual run, checked in one pass: every message class indices ``[N]`` of one integer
        datatype, with ids, all in range. None when any message is otherwise (or out of range):
        then each is checked on its own, for its exact reason."""
        targets: list[memoryview] = []
        ids: list[memoryview] = []
        rows: list[int] = []
        datatype = None
        for entry in run:
            unpacked = entry.unpacked
            assert unpacked is not None
            specs = unpacked.header.tensors
            if len(specs) != 2:
                return None
            t, i = (0, 1) if specs[0].name == "targets" else (1, 0)
            tspec, ispec = specs[t], specs[i]
            if (
                tspec.datatype in FLOAT_DATATYPES
                or tspec.datatype not in DATATYPES
                or tspec.datatype == "UINT64"
                or ispec.datatype not in ID_DATATYPES
                or len(tspec.shape) != 1
                or tspec.shape != ispec.shape
                or tspec.shape[0] == 0
                or (datatype is not None and tspec.datatype != datatype)
            ):
                return None
            datatype = tspec.datatype
            targets.append(unpacked.buffers[t])
            ids.append(unpacked.buffers[i])
            rows.append(tspec.shape[0])
        assert datatype is not None
        values = np.frombuffer(b"".join(targets), DATATYPES[datatype])
        if int(values.min()) < 0 or int(values.max()) >= num_classes:
            return None
        all_ids = np.frombuffer(b"".join(ids), "<u8")  # an INT64 id is its 64 bits
        forms_all = {b: kernel_array(values.astype(np.float64 if b else np.int64)) for b in candidates}
        kind = {True: TargetKind.SOFT, False: TargetKind.INDEX}
        with self.state.lock:
            for entry in run:
                self._observe_locked(entry.producer, entry.seq)
        out = []
        start = 0
        for entry, n in zip(run, rows, strict=True):
            header = entry.unpacked.header  # type: ignore[union-attr]
            batch = LabelBatch(
                model=header.model,
                targets=wire.Tensor(datatype, values[start : start + n]),
                ids=all_ids[start : start + n],
                batch_id=header.batch_id or None,
                ts=header.ts,
            )
            forms = {b: (a[start : start + n], kind[b], 0) for b, a in forms_all.items()}
            out.append((entry, batch, forms))
            start += n
        return out

    def _join_labels(
        self,
        state: ModelState,
        checked: list[tuple[_Entry, LabelBatch, dict[bool, tuple[np.ndarray, TargetKind, int]]]],
    ) -> None:
        """Admit checked labels messages (retries and empties counted), join them, score the pairs."""
        if not checked:
            return
        model = state.name
        now = self.clock()
        admitted: list[tuple[LabelBatch, dict[bool, tuple[np.ndarray, TargetKind, int]]]] = []
        with self.state.lock:
            for entry, batch, forms in checked:
                entry.counted = True
                # One at a time, so that a retry later in the same drain is judged a retry.
                if not self._admit_join_locked(model, batch.batch_id, batch.size):
                    continue
                if batch.batch_id is not None:
                    self.state.recent.add((model, batch.batch_id))
                state.unnormalized_targets += next(iter(forms.values()))[2]
                admitted.append((batch, forms))
            # Received, whatever their pairs do next; a model that receives labels is not idle.
            self.state.counters.messages += len(admitted)
            state.last_batch_time = max(state.last_batch_time, now)
            if not admitted:
                return
            ids = np.concatenate([b.ids for b, _ in admitted])
            result = self.state.joins.take(model, ids, now)
            if not result.joined:
                self.state.joins.record(model, result)
                return
        recorded = False

        def record() -> None:  # called with the state lock held
            nonlocal recorded
            if not recorded:
                self.state.joins.record(model, result)
                recorded = True

        starts = np.cumsum([0] + [b.size for b, _ in admitted])
        last = len(result.joined) - 1
        for k, joined in enumerate(result.joined):
            # The outcomes are counted with the last pool's fold: a scrape sees labels matched
            # only together with their pairs scored.
            self._score_joined(state, joined, admitted, starts, record if k == last else None)
        if not recorded:  # a refused pair left the last fold undone
            with self.state.lock:
                record()

    def _score_joined(
        self,
        state: ModelState,
        joined: Joined,
        admitted: list[tuple[LabelBatch, dict[bool, tuple[np.ndarray, TargetKind, int]]]],
        starts: np.ndarray,
        on_fold: Callable[[], None] | None = None,
    ) -> None:
        """Score the pairs of one pool: in one batch when the labels messages share the form of
        their targets (the usual case); else, or when that batch is refused, a batch per labels
        message grouped by form (index or soft), so that one bad pair is found and rejected alone."""
        binary = joined.key.columns == 0
        forms = [f[binary] for _, f in admitted]
        first = forms[0]
        if all(f[1] == first[1] and f[0].dtype == first[0].dtype and f[0].ndim == first[0].ndim for f in forms):
            targets = first[0] if len(forms) == 1 else np.concatenate([f[0] for f in forms])
            ts = next((b.ts for b, _ in reversed(admitted) if b.ts is not None), None)
            batch = _pairs(state, joined, slice(None), targets[joined.label_rows], first[1], ts)
            group = _Group(state, (), [batch])
            if len(admitted) == 1:
                self._score(group, joined=True, on_fold=on_fold)
            else:
                split = lambda: self._score_per_message(state, joined, admitted, starts)  # noqa: E731
                self._score(group, joined=True, split=split, on_fold=on_fold)
            return
        self._score_per_message(state, joined, admitted, starts)

    def _score_per_message(
        self,
        state: ModelState,
        joined: Joined,
        admitted: list[tuple[LabelBatch, dict[bool, tuple[np.ndarray, TargetKind, int]]]],
        starts: np.ndarray,
    ) -> None:
        binary = joined.key.columns == 0
        message_of = np.searchsorted(starts, joined.label_rows, side="right") - 1
        groups: dict[tuple[object, ...], list[Batch]] = {}
        for k in np.unique(message_of).tolist():
            sel = np.flatnonzero(message_of == k)
            labels, forms = admitted[k]
            targets, target_kind, _ = forms[binary]
            batch = _pairs(state, joined, sel, targets[joined.label_rows[sel] - starts[k]], target_kind, labels.ts)
            groups.setdefault(layout(batch), []).append(batch)
        for batches in groups.values():
            self._score(_Group(state, (), batches), joined=True)

    # --- one message at a time (large batches) ------------------------------------

    def _handle_one(self, entry: _Entry) -> None:
        """A message on its own (a large one, or one of a short drain): checked, scored with the
        kernel checking its values, then admitted (retries, the model) and folded."""
        # A rejection is counted for the decoded model, and only under a well-formed name.
        assert entry.unpacked is not None
        model = entry.unpacked.header.model
        try:
            if entry.producer is not None and entry.seq is not None:
                # Before validation: a message that arrived but is refused is not a gap.
                self._observe_seq(entry.producer, entry.seq)
            message = entry.unpacked.message()
            tolerance = self.config.scoring_for(model).normalization_tolerance
            batch = validate(message, None, tolerance, kernel_checks=True)
            scores = None
            if batch.size:
                # Scored before it is admitted: a batch the kernel flags creates no model and
                # leaves its batch_id free for a corrected retry.
                assert self.backend is not None
                scores = self.backend.score(batch, self._params_for(batch.model, batch.prediction_datatype))
                assert scores.invalid is not None
                if scores.invalid.any():
                    validate(message, self._scratch, tolerance)  # raises, with the reason
                    raise RuntimeError("the kernel flagged values that validate() accepts")
            with self.state.lock:
                if batch.size == 0:
                    self._count_empty_locked()
                    return
                if self._duplicate_locked(batch.model, batch.batch_id):
                    return
                state = self.state.model(batch.model, batch.num_classes)
                if batch.batch_id is not None:
                    self.state.recent.add((batch.model, batch.batch_id))
        except RejectedBatch as exc:
            self._rejected(exc.reason, exc.detail, model if MODEL_NAME_RE.fullmatch(model) else None)
            return
        except Exception:
            log.exception("internal error while validating a batch for model %r", model)
            self._rejected(Reason.INTERNAL_ERROR, "internal error", model)
            return
        self._score(_Group(state, layout(batch), [batch]), scores=scores)

    def _count_empty_locked(self) -> None:
        """A batch of zero rows: counted as a message and an empty batch, and nothing else. It
        creates no model, so it neither fixes nor checks a class count (docs/protocol.md)."""
        self.state.counters.messages += 1
        self.state.counters.empty_batches += 1

    def _duplicate_locked(self, model: str, batch_id: str | None) -> bool:
        """Whether (model, batch_id) was scored recently; a duplicate is counted here.
        Both paths judge retries by this one rule; the caller remembers the id once admitted."""
        if batch_id is None or not self.state.recent.capacity or (model, batch_id) not in self.state.recent:
            return False
        self.state.counters.duplicate_batches += 1
        self.state.counters.messages += 1
        return True

    def _observe_seq(self, producer: str, seq: int) -> None:
        with self.state.lock:
            self._observe_locked(producer, seq)

    def _observe_locked(self, producer: str | None, seq: int | None) -> None:
        """A message's place in its producer's stream, counting gaps (state lock held)."""
        if producer is not None and seq is not None:
            self.state.counters.sequence_gaps += self.state.sequences.observe(producer, seq)

    def _score(
        self,
        group: _Group,
        *,
        joined: bool = False,
        split: Callable[[], None] | None = None,
        on_fold: Callable[[], None] | None = None,
        scores: SampleScores | None = None,
    ) -> None:
        """Score and fold a group. ``joined``: pairs of the join store, whose predictions were
        counted in the label-free statistics when they arrived and whose labels messages were
        counted as received when they arrived. ``split``: what to do instead of rejecting a
        one-batch group that holds several messages' rows (score them apart). ``on_fold``:
        called under the state lock right after a successful fold. ``scores``: the one
        batch's, scored already."""
        count = len(group.batches)
        model = group.batches[0].model
        try:
            batch = concatenate(group.batches)
            if scores is None:
                assert self.backend is not None
                scores = self.backend.score(batch, self._params_for(batch.model, batch.prediction_datatype))
                # These batches were checked in full (validate(), the join store): a flag is a bug.
                if scores.invalid is not None and scores.invalid.any():
                    raise RuntimeError("the kernel flagged values of a batch that validate() accepted")
            # Pairs from the join store had their label-free statistics counted on arrival.
            label_free = None if joined else from_scores(scores, batch.binary)
            with self.state.lock:
                if group.state.fold(
                    scores,
                    batch.weights,
                    self.clock(),
                    batch.ts,
                    batches=count,
                    unnormalized_targets=batch.unnormalized_targets,
                    targets=batch.targets,
                    binary=batch.binary,
                    label_free=label_free,
                ):
                    self.state.counters.limit_hits["class_limit"] += 1
                if not joined:
                    self.state.counters.messages += count
                if on_fold is not None:
                    on_fold()
        except RejectedBatch as exc:
            if count == 1 and split is not None:
                split()
            elif count == 1:
                self._rejected(exc.reason, exc.detail, model, received=not joined)
            else:
                # One message spoiled the group (its losses overflow); find it, keep the rest.
                for b in group.batches:
                    self._score(_Group(group.state, group.key, [b]), joined=joined)
        except Exception:
            log.exception("internal error while scoring %d batch(es) for model %r", count, model)
            for _ in range(count):
                self._rejected(Reason.INTERNAL_ERROR, "internal error", model, received=not joined)

    def _rejected(self, reason: Reason, detail: str, model: str | None, *, received: bool = True) -> None:
        """Count a rejection, and (unless it was counted already) the message as received."""
        with self.state.lock:
            self.state.reject(reason, model)
            if received:
                self.state.counters.messages += 1
        self._log_rejection(reason, detail, model)

    def _params_for(self, model: str, datatype: str) -> ScoringParams:
        key = (model, datatype)
        params = self._params.get(key)
        if params is None:
            cfg = self.config.scoring_for(model)
            eps = DATATYPE_EPS[datatype]
            params = ScoringParams(
                eps=cfg.eps if cfg.eps is not None else eps,
                focal_gamma=cfg.focal_gamma,
                normalization_tolerance=(
                    cfg.normalization_tolerance if cfg.normalization_tolerance is not None else math.sqrt(eps)
                ),
            )
            self._params[key] = params
        return params


def _elements(entry: _Entry) -> int:
    """How many prediction values a decoded message holds (-1: no predictions tensor)."""
    if entry.fast is not None:
        return entry.fast.elements
    assert entry.unpacked is not None
    for spec in entry.unpacked.header.tensors:
        if spec.name == "predictions":
            return math.prod(spec.shape)
    return -1


def _last_ts(entries: list[_Entry]) -> float | None:
    """The event time of a unit: its last message's that has one (as :func:`xentd.validate.concatenate`)."""
    for entry in reversed(entries):
        assert entry.unpacked is not None
        if entry.unpacked.header.ts is not None:
            return entry.unpacked.header.ts
    return None


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent row ranges joined: [(0, 3), (3, 5), (7, 9)] -> [(0, 5), (7, 9)]."""
    out = [ranges[0]]
    for start, end in ranges[1:]:
        if start == out[-1][1]:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _adjacent(entries: list[_Entry]) -> list[list[_Entry]]:
    """A unit's messages in runs whose rows are adjacent in their layout: one run unless a
    rejected or duplicate message of the same model lies between them."""
    if len(entries) == 1:
        return [entries]
    runs = [[entries[0]]]
    for entry in entries[1:]:
        if entry.segment == runs[-1][-1].segment + 1:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _pairs(
    state: ModelState,
    joined: Joined,
    rows: slice | np.ndarray,
    targets: np.ndarray,
    target_kind: TargetKind,
    ts: float | None,
) -> Batch:
    """The joined pairs ``rows`` of one pool, with their ``targets``, as the batch they would have
    been sent as: the prediction's input kind, wire datatype (FP16 and BF16 widened by the
    kernel, as a message's predictions are) and weight."""
    return Batch(
        model=state.name,
        kind=InputKind(joined.key.kind),
        predictions=kernel_array(kernel_predictions(joined.predictions[rows], joined.key.datatype)),
        targets=kernel_array(targets),
        target_kind=target_kind,
        weights=None if joined.weights is None else kernel_array(joined.weights[rows]),
        num_classes=state.num_classes,
        prediction_datatype=joined.key.datatype,
        batch_id=None,
        ts=ts,
    )
