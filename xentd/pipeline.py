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

from xentd import wire
from xentd.config import Config
from xentd.errors import DecodeError, Reason, RejectedBatch
from xentd.kernels import Backend, ScoringParams
from xentd.state import ModelState, StateStore
from xentd.validate import Batch, Scratch, concatenate, layout, validate

log = logging.getLogger("xentd")


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
    """Batches of one model with one layout, waiting to be scored together."""

    state: ModelState
    key: tuple[object, ...]
    batches: list[Batch]


class Pipeline:
    """Decode -> validate -> group -> score -> fold, for one drained list of messages at a time."""

    def __init__(self, config: Config, state: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.state = state
        self.clock = clock
        # Set by the daemon once the kernels are compiled; nothing is scored before that.
        self.backend: Backend | None = None
        self._params: dict[tuple[str, str], ScoringParams] = {}
        self._scratch = Scratch()
        self._log_rejection = _RejectionLog(config.log.rejection_interval_seconds)

    def handle_many(self, messages: list[list[Any]]) -> None:
        """Process messages in arrival order. Never raises.

        Each message is decoded and validated on its own, so a bad one is rejected
        alone. Small valid batches are grouped per model and scored with one kernel
        call and one fold: for small batches the per-call overhead is most of the
        cost. A model's open group is scored before any batch of that model that
        cannot join it, so every model still sees its samples in arrival order.
        """
        groups: dict[str, _Group] = {}
        for frames in messages:
            accepted = self._accept(frames)
            if accepted is None:
                continue
            batch, state, small = accepted
            key = layout(batch)
            group = groups.get(batch.model)
            if small and group is not None and group.key == key:
                group.batches.append(batch)
                continue
            if group is not None:
                self._score(groups.pop(batch.model))
            if small:
                groups[batch.model] = _Group(state, key, [batch])
            else:
                self._score(_Group(state, key, [batch]))
        for group in groups.values():
            self._score(group)

    def _accept(self, frames: list[Any]) -> tuple[Batch, ModelState, bool] | None:
        # A rejection is counted for the decoded model, and only under a well-formed name.
        model: str | None = None
        try:
            msg = wire.decode(
                frames,
                max_message_bytes=self.config.ingest.max_message_bytes,
                max_header_bytes=self.config.ingest.max_header_bytes,
                topic=self.config.ingest.socket == "sub",
            )
            model = msg.model
            if msg.producer is not None and msg.seq is not None:
                # Before validation: a message that arrived but is refused is not a gap.
                self._observe_seq(msg.producer, msg.seq)
            pred = msg.tensors.get("predictions")
            small = pred is not None and pred.array.size <= self.config.engine.group_max_elements
            # A grouped batch must own its arrays; a scratch buffer is reused by the next message.
            tolerance = self.config.scoring_for(msg.model).normalization_tolerance
            batch = validate(msg, None if small else self._scratch, tolerance)
            if batch.size == 0:
                # Nothing to score: counted as a message, and nothing else. It creates no
                # model, so it neither fixes nor checks a class count (docs/protocol.md).
                with self.state.lock:
                    self.state.counters.messages += 1
                return None
            with self.state.lock:
                if batch.batch_id is not None and self.state.recent.capacity:
                    key = (batch.model, batch.batch_id)
                    if key in self.state.recent:
                        self.state.counters.duplicate_batches += 1
                        self.state.counters.messages += 1
                        return None
                state = self.state.model(batch.model, batch.num_classes)
                if batch.batch_id is not None:
                    self.state.recent.add((batch.model, batch.batch_id))
            return batch, state, small
        except DecodeError as exc:
            # Refused while decoding: the header may still have named its model and stream position.
            if exc.producer is not None and exc.seq is not None:
                self._observe_seq(exc.producer, exc.seq)
            self._rejected(exc.reason, exc.detail, exc.model)
        except RejectedBatch as exc:
            self._rejected(exc.reason, exc.detail, model if model and wire.MODEL_NAME_RE.fullmatch(model) else None)
        except Exception:
            log.exception("internal error while validating a batch for model %r", model)
            self._rejected(Reason.INTERNAL_ERROR, "internal error", model)
        return None

    def _observe_seq(self, producer: str, seq: int) -> None:
        with self.state.lock:
            self.state.counters.sequence_gaps += self.state.sequences.observe(producer, seq)

    def _score(self, group: _Group) -> None:
        count = len(group.batches)
        model = group.batches[0].model
        try:
            batch = concatenate(group.batches)
            assert self.backend is not None
            scores = self.backend.score(batch, self._scoring_params(batch))
            with self.state.lock:
                if group.state.fold(
                    scores,
                    batch.weights,
                    self.clock(),
                    batch.ts,
                    batches=count,
                    unnormalized_targets=batch.unnormalized_targets,
                ):
                    self.state.counters.limit_hits["class_limit"] += 1
                self.state.counters.messages += count
        except RejectedBatch as exc:
            if count == 1:
                self._rejected(exc.reason, exc.detail, model)
            else:
                # One message spoiled the group (its losses overflow); find it, keep the rest.
                for b in group.batches:
                    self._score(_Group(group.state, group.key, [b]))
        except Exception:
            log.exception("internal error while scoring %d batch(es) for model %r", count, model)
            for _ in range(count):
                self._rejected(Reason.INTERNAL_ERROR, "internal error", model)

    def _rejected(self, reason: Reason, detail: str, model: str | None) -> None:
        with self.state.lock:
            self.state.reject(reason, model)
            self.state.counters.messages += 1
        self._log_rejection(reason, detail, model)

    def _scoring_params(self, batch: Batch) -> ScoringParams:
        key = (batch.model, batch.prediction_datatype)
        params = self._params.get(key)
        if params is None:
            cfg = self.config.scoring_for(batch.model)
            params = ScoringParams(
                eps=cfg.eps if cfg.eps is not None else batch.dtype_eps,
                focal_gamma=cfg.focal_gamma,
                normalization_tolerance=(
                    cfg.normalization_tolerance
                    if cfg.normalization_tolerance is not None
                    else math.sqrt(batch.dtype_eps)
                ),
            )
            self._params[key] = params
        return params
