"""Every exception xentd raises, in one place.

    XentdError
    ├── ConfigError            a config file or override is invalid; the daemon refuses to start
    ├── BackendUnavailable     a requested kernel backend cannot run on this machine
    ├── StartupError           a port or endpoint the daemon needs cannot be bound
    ├── SnapshotError          a state snapshot is corrupt or from an incompatible version
    ├── ConnectError           a producer found no daemon to take its batches in time
    └── RejectedBatch          one message is refused; the daemon counts it and keeps going
        ├── DecodeError        the frames are not a well-formed protocol v1 message
        └── ValidationError    well-formed, but the values cannot be scored

A ``RejectedBatch`` always carries a :class:`Reason`. The reason's value is the
``reason`` label of ``xentd_rejected_batches_total``, so the set of values is part
of the metrics contract (see docs/metrics.md) and must only grow.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a batch was rejected. Values are Prometheus label values."""

    # Framing and header (wire).
    BAD_FRAMING = "bad_framing"
    BAD_HEADER = "bad_header"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_DATATYPE = "unknown_datatype"
    BAD_SHAPE = "bad_shape"
    SIZE_MISMATCH = "size_mismatch"
    MESSAGE_TOO_LARGE = "message_too_large"
    TOPIC_MISMATCH = "topic_mismatch"
    # Semantics and values (validate, state).
    BAD_MODEL_NAME = "bad_model_name"
    BAD_INPUT_KIND = "bad_input_kind"
    MISSING_TENSOR = "missing_tensor"
    BAD_DATATYPE = "bad_datatype"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    PROBABILITY_OUT_OF_RANGE = "probability_out_of_range"
    TARGET_OUT_OF_RANGE = "target_out_of_range"
    NEGATIVE_WEIGHT = "negative_weight"
    CLASS_COUNT_CHANGED = "class_count_changed"
    TOO_MANY_MODELS = "too_many_models"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    # A labels-only message for a model with no state: no predictions to join, no class count.
    UNKNOWN_MODEL = "unknown_model"
    # A bug in xentd, not in the producer: logged with a traceback.
    INTERNAL_ERROR = "internal_error"


class XentdError(Exception):
    """Base class of every error xentd raises on purpose."""


class ConfigError(XentdError):
    """The configuration is invalid. The message names the key and what was expected."""


class BackendUnavailable(XentdError):
    """A kernel backend was requested that this machine or installation cannot run."""


class StartupError(XentdError):
    """The daemon cannot acquire a resource it needs, such as its metrics port."""


class ConnectError(XentdError):
    """A :class:`~xentd.client.Publisher` found no daemon that took the connection (or, for
    PUB, subscribed) within its timeout, or the daemon refused the producer's CURVE key."""


class SnapshotError(XentdError):
    """A state snapshot cannot be used. The daemon sets the file aside and starts empty."""


class RejectedBatch(XentdError):
    """One incoming batch cannot be scored. Counted under ``reason``; never fatal."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class DecodeError(RejectedBatch):
    """The message is not well-formed protocol v1 (frames, header, tensor layout).

    When the header was read far enough, the error carries its well-formed model
    name and its (producer, seq), so that a refused message is still counted as
    arrived (no false sequence gap) and per model. Otherwise they are None.
    """

    def __init__(
        self,
        reason: Reason,
        detail: str,
        *,
        model: str | None = None,
        producer: str | None = None,
        seq: int | None = None,
    ) -> None:
        super().__init__(reason, detail)
        self.model = model
        self.producer = producer
        self.seq = seq


class ValidationError(RejectedBatch):
    """The message decodes, but its contents break a rule of what can be scored."""
