"""Turn a decoded :class:`~xentd.wire.Message` into a :class:`Batch` the kernels can trust.

Every rule that makes a batch unscoreable is checked here: finiteness, ranges,
shapes, class indices. Each float tensor is checked in one pass of a Numba scan
(:mod:`xentd.scan`) that also widens FP16/BF16; there is no per-sample Python.

The daemon's hot path leaves the prediction values to the scoring kernels, which
flag each row that breaks a value rule in the pass that scores it (the ``invalid``
output of :mod:`xentd.kernels`): :func:`validate` with ``kernel_checks=True``, and
:func:`check_many` for a drain's small messages, check everything else. A batch
the kernels flag is then checked here in full, for its reason.

Predictions are widened to float32 (FP16, BF16) or kept as float32/float64; the
widening is exact, and the machine epsilon of the *wire* datatype is kept for
clipping, as sklearn does. Left to the kernels, FP16 and BF16 predictions stay
16-bit patterns that the kernels widen as they load them (:func:`kernel_predictions`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from xentd import segments
from xentd.errors import Reason, ValidationError
from xentd.jit import kernel_array
from xentd.names import MODEL_NAME_RE
from xentd.scan import scan, widen
from xentd.wire import (
    DATATYPES,
    FLOAT_DATATYPES,
    ID_DATATYPES,
    Header,
    Message,
    Tensor,
    bf16_to_float32,
    well_formed_name,
)

# Machine epsilon of each float wire datatype: sklearn's default clip for probabilities.
DATATYPE_EPS = {
    "FP16": float(np.finfo(np.float16).eps),
    "BF16": 2.0**-7,
    "FP32": float(np.finfo(np.float32).eps),
    "FP64": float(np.finfo(np.float64).eps),
}


class InputKind(IntEnum):
    """What the predictions tensor holds. Values are passed into the kernels."""

    PROBS = 0
    LOGITS = 1
    LOG_PROBS = 2


class TargetKind(IntEnum):
    INDEX = 0  # int64 [N]: class indices (0/1 for binary)
    SOFT = 1  # float [N, C] (or [N] for binary): one-hot or soft labels in [0, 1]


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch that is safe to score. Arrays are C-contiguous, aligned and read-only.

    - ``predictions``: float32 or float64, ``[N]`` (binary, positive class) or ``[N, C]``;
      when the kernels check the values, FP16 or BF16 bit patterns as uint16 or int16
      (:func:`kernel_predictions`).
    - ``targets``: int64 ``[N]`` for ``TargetKind.INDEX``; for ``SOFT``, float64 ``[N]``
      when binary, float32/float64 ``[N, C]`` otherwise. Binary integer targets are
      also delivered as float64 0/1, so the binary kernel has one signature.
    - ``weights``: float64 ``[N]`` or None.
    """

    model: str
    kind: InputKind
    predictions: np.ndarray
    targets: np.ndarray
    target_kind: TargetKind
    weights: np.ndarray | None
    num_classes: int
    prediction_datatype: str
    batch_id: str | None
    ts: float | None
    # Target rows scored as sent although they are not a distribution: soft rows whose
    # sum is off 1 by more than the tolerance, integer rows that are not one-hot.
    unnormalized_targets: int = 0

    @property
    def binary(self) -> bool:
        return self.predictions.ndim == 1

    @property
    def size(self) -> int:
        return int(self.predictions.shape[0])

    @property
    def dtype_eps(self) -> float:
        return DATATYPE_EPS[self.prediction_datatype]


def _reject(reason: Reason, detail: str) -> ValidationError:
    return ValidationError(reason, detail)


class Scratch:
    """A reusable float32 buffer for widening FP16/BF16 predictions.

    A batch validated with a scratch holds a view of it, valid until the next
    batch is validated with the same scratch. The daemon scores each batch
    before it validates the next, so one buffer serves them all; without it,
    first-touching a fresh buffer for every batch costs more than the widening.
    """

    def __init__(self) -> None:
        self._buf = np.empty(0, np.float32)

    def float32(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        if n > self._buf.size:
            self._buf = np.empty(max(n, 2 * self._buf.size), np.float32)
        return self._buf[:n].reshape(shape)


def _floats(name: str, t: Tensor, scratch: Scratch | None = None) -> tuple[np.ndarray, float, float]:
    """The tensor as float32 or float64 values with their (min, max); rejects NaN and Inf."""
    if t.datatype in ("FP16", "BF16"):
        values = scratch.float32(t.array.shape) if scratch is not None else np.empty(t.array.shape, np.float32)
        lo, hi, bad = widen(t.array.view(np.uint16), values, half=t.datatype == "FP16")
    else:
        if t.datatype in ("FP32", "FP64"):
            values = t.array.astype(t.array.dtype.newbyteorder("="), copy=False)
        else:
            values = t.array.astype(np.float64)
        lo, hi, bad = scan(values)
    if bad:
        raise _reject(Reason.NON_FINITE, f"{name} contains {bad} NaN or Inf value(s)")
    return values, lo, hi


def kernel_predictions(values: np.ndarray, datatype: str) -> np.ndarray:
    """A wire predictions array as the kernels take it when they check and widen the values
    themselves: FP16 bit patterns as uint16, BF16 as int16 (the kernels widen each by its
    dtype), FP32 and FP64 in native byte order. No copy on a little-endian machine."""
    if datatype == "FP16":
        return values.view("<u2").astype(np.uint16, copy=False)
    if datatype == "BF16":
        return values.view("<u2").astype(np.uint16, copy=False).view(np.int16)
    return values.astype(values.dtype.newbyteorder("="), copy=False)


def validate(
    msg: Message,
    scratch: Scratch | None = None,
    target_tolerance: float | None = None,
    *,
    kernel_checks: bool = False,
) -> Batch:
    """Check a decoded message and return a :class:`Batch`, or raise ValidationError.

    With a ``scratch``, widened FP16/BF16 predictions live in its buffer (see :class:`Scratch`).
    ``target_tolerance`` is how far a soft target row's sum may be off 1 before it is
    counted in ``Batch.unnormalized_targets``; None: the square root of the targets'
    datatype epsilon, as for prediction rows. ``kernel_checks``: the prediction values
    are left to the scoring kernel, which flags the rows that break a rule, and stay as
    :func:`kernel_predictions` gives them; a flagged batch is then validated again
    without it, for its reason.
    """
    if msg.input is None and "predictions" not in msg.tensors:
        _model_name(msg)
        raise _reject(
            Reason.MISSING_TENSOR, "tensor 'predictions' is required (labels sent alone need an 'ids' tensor)"
        )
    kind = _input_kind(msg)
    for required in ("predictions", "targets"):
        if required not in msg.tensors:
            raise _reject(Reason.MISSING_TENSOR, f"tensor {required!r} is required")
    pred_t, pred, num_classes = _predictions(msg, scratch, kind, kernel_checks)
    n = pred.shape[0]
    targets, target_kind, unnormalized = _targets(
        msg.tensors["targets"], n, num_classes, pred.ndim == 1, target_tolerance
    )
    weights = _weights(msg.tensors.get("weights"), n)
    return Batch(
        model=msg.model,
        kind=kind,
        predictions=kernel_array(pred),
        targets=kernel_array(targets),
        target_kind=target_kind,
        weights=None if weights is None else kernel_array(weights),
        num_classes=num_classes,
        prediction_datatype=pred_t.datatype,
        batch_id=msg.batch_id,
        ts=msg.ts,
        unnormalized_targets=unnormalized,
    )


def _model_name(msg: Message) -> None:
    if not MODEL_NAME_RE.fullmatch(msg.model):
        raise _reject(
            Reason.BAD_MODEL_NAME, f"model name {msg.model[:64]!r} must be 1-128 characters of A-Z a-z 0-9 _ . : -"
        )


def _input_kind(msg: Message) -> InputKind:
    """The model name's and the input kind's checks, which come first."""
    _model_name(msg)
    if msg.input is None:
        raise _reject(Reason.BAD_HEADER, "header.input is required (probs, logits or log_probs) with predictions")
    try:
        return InputKind[msg.input.upper()]
    except KeyError:
        raise _reject(Reason.BAD_INPUT_KIND, f"input {msg.input[:32]!r} must be probs, logits or log_probs") from None


def _predictions(
    msg: Message, scratch: Scratch | None, kind: InputKind, kernel_checks: bool = False
) -> tuple[Tensor, np.ndarray, int]:
    """The checks of a predictions tensor: (the wire tensor, its values as float32/64, C).
    With ``kernel_checks``, only its datatype and shape; the values as :func:`kernel_predictions` gives them."""
    pred_t = msg.tensors["predictions"]
    if pred_t.datatype not in FLOAT_DATATYPES:
        raise _reject(Reason.BAD_DATATYPE, f"predictions must be FP16, BF16, FP32 or FP64, got {pred_t.datatype}")
    shape = pred_t.array.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] < 2):
        raise _reject(
            Reason.SHAPE_MISMATCH, f"predictions must be [N] (binary) or [N, C] with C >= 2, got {list(shape)}"
        )
    if kernel_checks:
        pred = kernel_predictions(pred_t.array, pred_t.datatype)
        return pred_t, pred, 2 if pred.ndim == 1 else int(pred.shape[1])
    pred, lo, hi = _floats("predictions", pred_t, scratch)
    binary = pred.ndim == 1
    num_classes = 2 if binary else int(pred.shape[1])
    if pred.size:
        if kind is InputKind.PROBS and (lo < 0.0 or hi > 1.0):
            raise _reject(
                Reason.PROBABILITY_OUT_OF_RANGE,
                f"probabilities must lie in [0, 1], found values in [{lo:.6g}, {hi:.6g}]",
            )
        if kind is InputKind.LOG_PROBS and hi > 0.0:
            raise _reject(Reason.PROBABILITY_OUT_OF_RANGE, f"log-probabilities must be <= 0, found {hi:.6g}")
    return pred_t, pred, num_classes


# --- delayed labels: predictions now, labels later, joined by id (xentd.joins) ----------


class MessageKind(IntEnum):
    """What a message carries, by its tensors (docs/protocol.md, "Delayed labels")."""

    FULL = 0  # predictions and targets: scored at once (ids, if any, are ignored)
    PREDICTIONS = 1  # predictions and ids: each row waits for its label
    LABELS = 2  # targets and ids: labels for rows that wait


def message_kind(header: Header) -> MessageKind:
    """The kind a header declares. A message that is none of them is judged FULL, so that
    :func:`validate` names the missing tensor."""
    names = {spec.name for spec in header.tensors}
    if "ids" in names:
        if "predictions" not in names and "targets" in names:
            return MessageKind.LABELS
        if "targets" not in names and "predictions" in names:
            return MessageKind.PREDICTIONS
    return MessageKind.FULL


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A checked predictions-only message: rows that wait for their labels.

    ``wire`` is the predictions tensor as it arrived (its wire datatype, ``[N]`` or
    ``[N, C]``): what the join store keeps, so that a joined pair is scored exactly as
    if it had been sent together. ``predictions`` is the same widened for the kernels
    (:class:`Batch`); ``ids`` is uint64 (an INT64 id is read as its 64 bits).
    """

    model: str
    kind: InputKind
    wire: np.ndarray
    predictions: np.ndarray
    prediction_datatype: str
    num_classes: int
    weights: np.ndarray | None
    ids: np.ndarray
    batch_id: str | None
    ts: float | None

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, slots=True)
class LabelBatch:
    """A labels-only message, checked as far as it can be without the model's class count
    (:func:`label_targets` does the rest)."""

    model: str
    targets: Tensor
    ids: np.ndarray
    batch_id: str | None
    ts: float | None

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


def _ids(msg: Message, n: int) -> np.ndarray:
    t = msg.tensors["ids"]
    if t.datatype not in ID_DATATYPES:
        raise _reject(Reason.BAD_DATATYPE, f"ids must be INT64 or UINT64, got {t.datatype}")
    if list(t.array.shape) != [n]:
        raise _reject(Reason.SHAPE_MISMATCH, f"ids {list(t.array.shape)} must be [N] with N={n}")
    return t.array.view(np.uint64) if t.array.dtype.isnative else t.array.astype(np.uint64)


def validate_predictions(msg: Message, scratch: Scratch | None = None) -> PendingBatch:
    """Check a predictions-only message: the predictions and weights as for a full batch, and the ids."""
    kind = _input_kind(msg)
    pred_t, pred, num_classes = _predictions(msg, scratch, kind)
    n = pred.shape[0]
    ids = _ids(msg, n)
    weights = _weights(msg.tensors.get("weights"), n)
    return PendingBatch(
        model=msg.model,
        kind=kind,
        wire=np.ascontiguousarray(pred_t.array),
        predictions=kernel_array(pred),
        prediction_datatype=pred_t.datatype,
        num_classes=num_classes,
        weights=None if weights is None else kernel_array(weights),
        ids=ids,
        batch_id=msg.batch_id,
        ts=msg.ts,
    )


def validate_labels(msg: Message) -> LabelBatch:
    """Check a labels-only message as far as it can be without the model (:func:`label_targets`)."""
    _model_name(msg)
    if "weights" in msg.tensors:
        raise _reject(
            Reason.SHAPE_MISMATCH, "a labels-only message carries no weights: the waiting prediction's weight is used"
        )
    t = msg.tensors["targets"]
    if t.array.ndim not in (1, 2):
        raise _reject(Reason.SHAPE_MISMATCH, f"targets must be [N] or [N, C], got {list(t.array.shape)}")
    ids = _ids(msg, int(t.array.shape[0]))
    return LabelBatch(model=msg.model, targets=t, ids=ids, batch_id=msg.batch_id, ts=msg.ts)


def label_targets(
    labels: LabelBatch, num_classes: int, binary: bool, tolerance: float | None
) -> tuple[np.ndarray, TargetKind, int]:
    """The labels' targets checked against the model's class count, typed as :class:`Batch` types them."""
    targets, kind, unnormalized = _targets(labels.targets, labels.size, num_classes, binary, tolerance)
    return kernel_array(targets), kind, unnormalized


def _targets(
    t: Tensor, n: int, num_classes: int, binary: bool, tolerance: float | None
) -> tuple[np.ndarray, TargetKind, int]:
    shape = list(t.array.shape)
    _not_an_id_type("targets", t, "; send class indices as INT64")
    is_float = t.datatype in FLOAT_DATATYPES
    if t.array.ndim == 1 and not (is_float and not binary):
        if shape[0] != n:
            raise _reject(Reason.SHAPE_MISMATCH, f"targets {shape} do not match predictions' N={n}")
        if is_float:  # binary soft labels
            values, lo, hi = _floats("targets", t)
            _check_soft_labels(lo, hi, values.size, "binary soft targets")
            return values.astype(np.float64, copy=False), TargetKind.SOFT, 0
        if n:
            lo_i, hi_i = int(t.array.min()), int(t.array.max())
            if lo_i < 0 or hi_i >= num_classes:
                raise _reject(
                    Reason.TARGET_OUT_OF_RANGE,
                    f"class indices must lie in [0, {num_classes - 1}], found [{lo_i}, {hi_i}]",
                )
        if binary:
            return t.array.astype(np.float64), TargetKind.SOFT, 0
        return t.array.astype(np.int64, copy=False), TargetKind.INDEX, 0
    if t.array.ndim == 2 and not binary:
        if shape != [n, num_classes]:
            raise _reject(Reason.SHAPE_MISMATCH, f"targets {shape} do not match predictions [{n}, {num_classes}]")
        values, lo, hi = _floats("targets", t)
        _check_soft_labels(lo, hi, values.size, "one-hot or soft targets")
        return values, TargetKind.SOFT, _unnormalized_rows(values, t.datatype, tolerance)
    expected = "[N] (0/1 or a probability)" if binary else f"[N] class indices or [N, {num_classes}] floats"
    raise _reject(Reason.SHAPE_MISMATCH, f"targets {shape} ({t.datatype}) do not fit predictions; expected {expected}")


def _not_an_id_type(name: str, t: Tensor, hint: str = "") -> None:
    """UINT64 is for ids only (docs/protocol.md, Datatypes)."""
    if t.datatype == "UINT64":
        raise _reject(Reason.BAD_DATATYPE, f"{name} cannot be UINT64 (it is for ids only){hint}")


def _unnormalized_rows(values: np.ndarray, datatype: str, tolerance: float | None) -> int:
    """Rows of [N, C] targets (already within [0, 1]) that are not a distribution."""
    if not values.size:
        return 0
    return int(np.count_nonzero(_unnormalized_flags(values, datatype, tolerance)))


def _unnormalized_flags(values: np.ndarray, datatype: str, tolerance: float | np.ndarray | None) -> np.ndarray:
    """Per row of [N, C] targets: is it not a distribution? One vectorised pass.

    Integer rows are exact (one-hot or not); float rows may be off 1 by the tolerance
    (a scalar, or one per row; None: the square root of the datatype's epsilon).
    """
    # Widened first, so that each row is summed alone in the same order however many rows
    # share the array (a casting reduction works through buffers that may split a row).
    sums = values.astype(np.float64, copy=False).sum(axis=1)
    flags: np.ndarray
    if datatype not in FLOAT_DATATYPES:
        flags = sums != 1.0
    else:
        tol = tolerance if tolerance is not None else float(np.sqrt(DATATYPE_EPS[datatype]))
        flags = np.abs(sums - 1.0) > tol
    return flags


def _check_soft_labels(lo: float, hi: float, size: int, what: str) -> None:
    if size and (lo < 0.0 or hi > 1.0):
        raise _reject(Reason.TARGET_OUT_OF_RANGE, f"{what} must lie in [0, 1], found [{lo:.6g}, {hi:.6g}]")


def _weights(t: Tensor | None, n: int) -> np.ndarray | None:
    if t is None:
        return None
    _not_an_id_type("weights", t)
    if list(t.array.shape) != [n]:
        raise _reject(Reason.SHAPE_MISMATCH, f"weights {list(t.array.shape)} must be [N] with N={n}")
    w, lo, _ = _floats("weights", t)
    if n and lo < 0.0:
        raise _reject(Reason.NEGATIVE_WEIGHT, f"weights must be >= 0, found {lo:.6g}")
    return w.astype(np.float64, copy=False)


def layout(batch: Batch) -> tuple[object, ...]:
    """What two batches must share to be scored as one: everything but N and the values."""
    return (
        batch.kind,
        batch.predictions.dtype.str,
        batch.prediction_datatype,
        batch.predictions.ndim,
        batch.num_classes,
        batch.target_kind,
        batch.targets.dtype.str,
        batch.targets.ndim,
        batch.weights is None,
    )


def concatenate(batches: list[Batch]) -> Batch:
    """One batch holding ``batches`` in order. They must share :func:`layout` and model."""
    first = batches[0]
    if len(batches) == 1:
        return first
    weights = None if first.weights is None else kernel_array(np.concatenate([b.weights for b in batches]))
    ts = next((b.ts for b in reversed(batches) if b.ts is not None), None)
    return dataclasses.replace(
        first,
        predictions=kernel_array(np.concatenate([b.predictions for b in batches])),
        targets=kernel_array(np.concatenate([b.targets for b in batches])),
        weights=weights,
        ts=ts,
        batch_id=batches[-1].batch_id,
        unnormalized_targets=sum(b.unnormalized_targets for b in batches),
    )


# --- many messages at once (the daemon's hot path) ------------------------------------
#
# validate() checks one message. For a drain of small messages the pipeline checks
# the shapes of each header here in Python (fast_layout), concatenates the messages
# of one layout (check_many, which also checks their weights), and scores them in one
# kernel call that flags every row whose prediction or target values break a rule
# (flagged_segments turns those flags into one verdict per message). A message that
# fast_layout cannot place, or that is flagged, goes through validate() for its
# exact reason; so these functions need only be strict, never more lenient.

_KINDS: dict[str, InputKind] = {k.name.lower(): k for k in InputKind}
# Per predictions datatype: how many columns (0: binary [N]); per targets: datatype and rank.
LayoutKey = tuple[InputKind, str, int, str, int, str | None]


class FastLayout(NamedTuple):
    """Where a header's tensors are and the layout they share with others: see :func:`fast_layout`."""

    key: LayoutKey
    rows: int
    elements: int  # prediction values
    predictions: int  # index of each tensor in header.tensors
    targets: int
    weights: int


def fast_layout(header: Header) -> FastLayout | None:
    """The layout of a well-shaped, non-empty message, or None when only :func:`validate`
    can judge it (a bad name, kind, datatype or shape, or no rows)."""
    p = t = w = -1
    for i, spec in enumerate(header.tensors):
        if spec.name == "predictions":
            p = i
        elif spec.name == "targets":
            t = i
        elif spec.name == "weights":
            w = i
    kind = _KINDS.get(header.input or "")
    if p < 0 or t < 0 or kind is None or not well_formed_name(header.model):
        return None
    if header.tensors[t].datatype == "UINT64" or (w >= 0 and header.tensors[w].datatype == "UINT64"):
        return None  # validate() names the reason
    pred, tgt = header.tensors[p], header.tensors[t]
    shape = pred.shape
    if pred.datatype not in FLOAT_DATATYPES or not shape or shape[0] == 0:
        return None
    n = shape[0]
    if len(shape) == 1:
        cols = 0
    elif shape[1] >= 2:
        cols = shape[1]
    else:
        return None
    if len(tgt.shape) == 1:
        if tgt.shape[0] != n or (cols and tgt.datatype in FLOAT_DATATYPES):
            return None
    elif not cols or tgt.shape != shape:
        return None
    weights = None
    if w >= 0:
        spec = header.tensors[w]
        if len(spec.shape) != 1 or spec.shape[0] != n:
            return None
        weights = spec.datatype
    key = (kind, pred.datatype, cols, tgt.datatype, len(tgt.shape), weights)
    return FastLayout(key, n, n * (cols or 1), p, t, w)


def _as_float(raw: bytes, datatype: str) -> np.ndarray:
    """A wire tensor's bytes as float32 (FP16, BF16, FP32) or float64 (FP64, integers)."""
    return widened(np.frombuffer(raw, DATATYPES[datatype]), datatype)


def widened(values: np.ndarray, datatype: str) -> np.ndarray:
    """Values in their wire datatype as the kernels take them: float32 (FP16, BF16, FP32) or
    float64 (FP64, integers); FP16 and BF16 widened exactly."""
    if datatype == "FP16":
        return values.astype(np.float32)
    if datatype == "BF16":
        return bf16_to_float32(values)
    if datatype in ("FP32", "FP64"):
        return values
    return values.astype(np.float64)


@dataclass(frozen=True, slots=True)
class Segments:
    """Many messages of one layout, concatenated, with a verdict per message.

    Message ``s`` is rows ``starts[s]:starts[s + 1]`` of every array. ``bad[s]``: its
    weights break a rule; the values of its predictions and targets are the scoring
    kernel's to check (:func:`flagged_segments`). The arrays are typed as :class:`Batch`
    types them with the kernels checking the values (see :meth:`batch`).
    """

    kind: InputKind
    prediction_datatype: str
    num_classes: int
    target_kind: TargetKind
    predictions: np.ndarray
    targets: np.ndarray
    weights: np.ndarray | None
    starts: list[int]
    bad: list[bool]
    unnormalized: list[int]  # per message, as Batch.unnormalized_targets

    def batch(self, model: str, ranges: list[tuple[int, int]], ts: float | None = None, unnormalized: int = 0) -> Batch:
        """A :class:`Batch` of the rows in ``ranges`` (in that order), views when they are one range."""

        def take(a: np.ndarray) -> np.ndarray:
            if len(ranges) == 1:
                start, end = ranges[0]
                return a if (start, end) == (0, a.shape[0]) else kernel_array(a[start:end])
            return kernel_array(np.concatenate([a[start:end] for start, end in ranges]))

        return Batch(
            model=model,
            kind=self.kind,
            predictions=take(self.predictions),
            targets=take(self.targets),
            target_kind=self.target_kind,
            weights=None if self.weights is None else take(self.weights),
            num_classes=self.num_classes,
            prediction_datatype=self.prediction_datatype,
            batch_id=None,
            ts=ts,
            unnormalized_targets=unnormalized,
        )


def check_many(
    key: LayoutKey,
    predictions: list[memoryview],
    targets: list[memoryview],
    weights: list[memoryview] | None,
    rows: list[int],
    tolerances: list[float | None],
) -> Segments:
    """Many messages of layout ``key`` as one :class:`Segments`: their tensors concatenated,
    their weights checked in one pass (:func:`xentd.segments.check_weights`). Prediction and
    target values are left to the scoring kernel (:func:`flagged_segments`).

    ``predictions``, ``targets`` and ``weights`` are each message's raw tensor
    frames, ``rows`` their N, ``tolerances`` each message's target tolerance (see
    :func:`validate`).
    """
    kind, pred_datatype, cols, tgt_datatype, tgt_ndim, _ = key
    binary = cols == 0
    num_classes = 2 if binary else cols
    starts = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(rows, out=starts[1:])
    total = int(starts[-1])
    pred = kernel_predictions(np.frombuffer(b"".join(predictions), DATATYPES[pred_datatype]), pred_datatype)
    pred = kernel_array(pred if binary else pred.reshape(total, cols))
    raw_tgt = b"".join(targets)
    unnormalized = [0] * len(rows)
    if tgt_ndim == 2:
        tgt = _as_float(raw_tgt, tgt_datatype).reshape(total, cols)
        target_kind = TargetKind.SOFT
        default = float(np.sqrt(DATATYPE_EPS[tgt_datatype])) if tgt_datatype in FLOAT_DATATYPES else 0.0
        per_row = np.repeat([default if t is None else t for t in tolerances], rows)
        flags = _unnormalized_flags(tgt, tgt_datatype, per_row)
        unnormalized = np.add.reduceat(flags, starts[:-1]).tolist()
    elif tgt_datatype in FLOAT_DATATYPES:  # binary soft labels
        tgt = _as_float(raw_tgt, tgt_datatype).astype(np.float64, copy=False)
        target_kind = TargetKind.SOFT
    else:
        ints = np.frombuffer(raw_tgt, DATATYPES[tgt_datatype])
        if binary:
            tgt, target_kind = ints.astype(np.float64), TargetKind.SOFT
        else:
            tgt, target_kind = ints.astype(np.int64, copy=False), TargetKind.INDEX
    tgt = kernel_array(tgt)
    w = None
    bad = np.zeros(len(rows), np.uint8)
    if weights is not None:
        w = kernel_array(_as_float(b"".join(weights), key[5] or "FP64").astype(np.float64, copy=False))
        bad = segments.check_weights(w, starts)
    return Segments(
        kind=kind,
        prediction_datatype=pred_datatype,
        num_classes=num_classes,
        target_kind=target_kind,
        predictions=pred,
        targets=tgt,
        weights=w,
        starts=starts.tolist(),
        bad=(bad != 0).tolist(),
        unnormalized=unnormalized,
    )


def flagged_segments(flags: np.ndarray, starts: list[int]) -> list[bool]:
    """Per segment of rows ``starts[s]:starts[s + 1]`` (none empty), whether any of its
    rows is flagged (``flags``: one uint8 per row, as the kernels' ``invalid`` output)."""
    return (np.maximum.reduceat(flags[: starts[-1]], starts[:-1]) != 0).tolist()  # type: ignore[no-any-return]
