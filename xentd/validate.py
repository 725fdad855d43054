"""Turn a decoded :class:`~xentd.wire.Message` into a :class:`Batch` the kernels can trust.

Every rule that makes a batch unscoreable is checked here, with vectorised NumPy
reductions (no per-sample Python): finiteness, ranges, shapes, class indices.
The kernels assume all of it and check nothing.

Predictions are widened to float32 (FP16, BF16) or kept as float32/float64; the
widening is exact, and the machine epsilon of the *wire* datatype is kept for
clipping, as sklearn does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from xentd.errors import Reason, ValidationError
from xentd.wire import FLOAT_DATATYPES, MODEL_NAME_RE, Message, Tensor, bf16_to_float32

# Machine epsilon of each float wire datatype: sklearn's default clip for probabilities.
DATATYPE_EPS = {
    "FP16": float(np.finfo(np.float16).eps),
    "BF16": 2.0 ** -7,
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

    - ``predictions``: float32 or float64, ``[N]`` (binary, positive class) or ``[N, C]``.
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


def _frozen(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, aligned, read-only view, so the kernels see one array type."""
    if not (a.flags.c_contiguous and a.flags.aligned):
        a = np.ascontiguousarray(a).copy()
    v = a.view()
    v.flags.writeable = False
    return v


def _as_float(t: Tensor) -> np.ndarray:
    if t.datatype == "BF16":
        return bf16_to_float32(t.array)
    if t.datatype == "FP16":
        return t.array.astype(np.float32)
    if t.datatype in ("FP32", "FP64"):
        return t.array.astype(t.array.dtype.newbyteorder("="), copy=False)
    return t.array.astype(np.float64)


def _min_max(a: np.ndarray) -> tuple[float, float]:
    # min/max propagate NaN, so one pass each also detects NaN and +-Inf without a temporary.
    return float(a.min()), float(a.max())


def _check_finite(name: str, lo: float, hi: float) -> None:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise _reject(Reason.NON_FINITE, f"{name} contains NaN or Inf")


def validate(msg: Message) -> Batch:
    """Check a decoded message and return a :class:`Batch`, or raise ValidationError."""
    if not MODEL_NAME_RE.fullmatch(msg.model):
        raise _reject(Reason.BAD_MODEL_NAME, f"model name {msg.model[:64]!r} must be 1-128 characters "
                                             "of A-Z a-z 0-9 _ . : -")
    try:
        kind = InputKind[msg.input.upper()]
    except KeyError:
        raise _reject(Reason.BAD_INPUT_KIND, f"input {msg.input[:32]!r} must be probs, logits or "
                                             "log_probs") from None
    for required in ("predictions", "targets"):
        if required not in msg.tensors:
            raise _reject(Reason.MISSING_TENSOR, f"tensor {required!r} is required")

    pred_t = msg.tensors["predictions"]
    if pred_t.datatype not in FLOAT_DATATYPES:
        raise _reject(Reason.BAD_DATATYPE, f"predictions must be FP16, BF16, FP32 or FP64, "
                                           f"got {pred_t.datatype}")
    pred = _as_float(pred_t)
    if pred.ndim not in (1, 2) or (pred.ndim == 2 and pred.shape[1] < 2):
        raise _reject(Reason.SHAPE_MISMATCH, f"predictions must be [N] (binary) or [N, C] with C >= 2, "
                                             f"got {list(pred.shape)}")
    n = pred.shape[0]
    binary = pred.ndim == 1
    num_classes = 2 if binary else int(pred.shape[1])

    if n and pred.size:
        lo, hi = _min_max(pred)
        _check_finite("predictions", lo, hi)
        if kind is InputKind.PROBS and (lo < 0.0 or hi > 1.0):
            raise _reject(Reason.PROBABILITY_OUT_OF_RANGE,
                          f"probabilities must lie in [0, 1], found values in [{lo:.6g}, {hi:.6g}]")
        if kind is InputKind.LOG_PROBS and hi > 0.0:
            raise _reject(Reason.PROBABILITY_OUT_OF_RANGE,
                          f"log-probabilities must be <= 0, found {hi:.6g}")

    targets, target_kind = _targets(msg.tensors["targets"], n, num_classes, binary)
    weights = _weights(msg.tensors.get("weights"), n)
    return Batch(
        model=msg.model, kind=kind, predictions=_frozen(pred), targets=_frozen(targets),
        target_kind=target_kind, weights=None if weights is None else _frozen(weights),
        num_classes=num_classes, prediction_datatype=pred_t.datatype,
        batch_id=msg.batch_id, ts=msg.ts,
    )


def _targets(t: Tensor, n: int, num_classes: int, binary: bool) -> tuple[np.ndarray, TargetKind]:
    shape = list(t.array.shape)
    is_float = t.datatype in FLOAT_DATATYPES
    if t.array.ndim == 1 and not (is_float and not binary):
        if shape[0] != n:
            raise _reject(Reason.SHAPE_MISMATCH, f"targets {shape} do not match predictions' N={n}")
        if is_float:  # binary soft labels
            values = _as_float(t).astype(np.float64, copy=False)
            _check_soft_labels(values, "binary soft targets")
            return values, TargetKind.SOFT
        if n:
            lo_i, hi_i = int(t.array.min()), int(t.array.max())
            if lo_i < 0 or hi_i >= num_classes:
                raise _reject(Reason.TARGET_OUT_OF_RANGE,
                              f"class indices must lie in [0, {num_classes - 1}], found [{lo_i}, {hi_i}]")
        if binary:
            return t.array.astype(np.float64), TargetKind.SOFT
        return t.array.astype(np.int64, copy=False), TargetKind.INDEX
    if t.array.ndim == 2 and not binary:
        if shape != [n, num_classes]:
            raise _reject(Reason.SHAPE_MISMATCH, f"targets {shape} do not match predictions "
                                                 f"[{n}, {num_classes}]")
        values = _as_float(t)
        if values.dtype != np.float32:
            values = values.astype(np.float64, copy=False)
        _check_soft_labels(values, "one-hot or soft targets")
        return values, TargetKind.SOFT
    expected = "[N] (0/1 or a probability)" if binary else f"[N] class indices or [N, {num_classes}] floats"
    raise _reject(Reason.SHAPE_MISMATCH, f"targets {shape} ({t.datatype}) do not fit predictions; "
                                         f"expected {expected}")


def _check_soft_labels(values: np.ndarray, what: str) -> None:
    if values.size:
        lo, hi = _min_max(values)
        _check_finite("targets", lo, hi)
        if lo < 0.0 or hi > 1.0:
            raise _reject(Reason.TARGET_OUT_OF_RANGE, f"{what} must lie in [0, 1], found [{lo:.6g}, {hi:.6g}]")


def _weights(t: Tensor | None, n: int) -> np.ndarray | None:
    if t is None:
        return None
    if list(t.array.shape) != [n]:
        raise _reject(Reason.SHAPE_MISMATCH, f"weights {list(t.array.shape)} must be [N] with N={n}")
    w = _as_float(t).astype(np.float64, copy=False)
    if n:
        lo, hi = _min_max(w)
        _check_finite("weights", lo, hi)
        if lo < 0.0:
            raise _reject(Reason.NEGATIVE_WEIGHT, f"weights must be >= 0, found {lo:.6g}")
    return w
