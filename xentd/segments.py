"""Value checks for many messages at once: one jitted pass over a layout's concatenated buffers.

The daemon's hot path (:mod:`xentd.pipeline`) concatenates the tensors of every
message of one layout in a drain and checks them here, one segment (message) at
a time, in a single call: NaN and Inf, the input kind's range for predictions,
class indices or soft labels for targets, and non-negative weights. The result
is one flag per message, so a bad message is set aside alone and its neighbours
go on to be scored. The flag only says *that* a message breaks a rule;
:func:`xentd.validate.validate` then says which rule, with the same words as
for a message checked on its own.

Min and max use the same masked, fast-math reduction as :mod:`xentd.scan` (:func:`xentd.jit.finite_range`).
"""

from __future__ import annotations

import numpy as np

from xentd.jit import cached, finite_range, kernel_array

# InputKind values (xentd.validate imports this module, so they are repeated here).
PROBS = 0
LOG_PROBS = 2


@cached(error_model="numpy", inline="always")
def _nonfinite(x, a, b):  # type: ignore[no-untyped-def]
    """How many of x[a:b] are NaN or Inf, in the array's own type (v - v is NaN exactly for those)."""
    bad = 0
    for j in range(a, b):
        d = x[j] - x[j]
        bad += 0 if d == d else 1
    return bad


@cached(error_model="numpy", inline="always")
def _int_range(x, a, b):  # type: ignore[no-untyped-def]
    """(min, max) of a non-empty integer x[a:b], in its own type."""
    lo = x[a]
    hi = x[a]
    for j in range(a + 1, b):
        lo = min(lo, x[j])
        hi = max(hi, x[j])
    return lo, hi


@cached(error_model="numpy")
def _check(pred, pred_cols, kind, tgt, tgt_cols, tgt_max, integer_targets, weights, has_weights, starts, bad):  # type: ignore[no-untyped-def]
    for s in range(bad.shape[0]):
        a = starts[s]
        b = starts[s + 1]
        if kind == PROBS or kind == LOG_PROBS:
            lo, hi, nonfinite = finite_range(pred, a * pred_cols, b * pred_cols)
            flag = nonfinite > 0 or (kind == PROBS and (lo < 0.0 or hi > 1.0)) or (kind == LOG_PROBS and hi > 0.0)
        else:  # logits: any finite value will do
            flag = _nonfinite(pred, a * pred_cols, b * pred_cols) > 0
        if integer_targets:
            ilo, ihi = _int_range(tgt, a * tgt_cols, b * tgt_cols)
            flag = flag or ilo < 0 or ihi > tgt_max
        else:
            lo, hi, nonfinite = finite_range(tgt, a * tgt_cols, b * tgt_cols)
            flag = flag or nonfinite > 0 or lo < 0.0 or hi > tgt_max
        if has_weights:
            lo, hi, nonfinite = finite_range(weights, a, b)
            flag = flag or nonfinite > 0 or lo < 0.0
        bad[s] = 1 if flag else 0


_NO_WEIGHTS = kernel_array(np.zeros(0, np.float64))


def check(
    predictions: np.ndarray,
    kind: int,
    targets: np.ndarray,
    target_max: float,
    weights: np.ndarray | None,
    starts: np.ndarray,
) -> np.ndarray:
    """One flag per segment (uint8, 1 = breaks a rule) of rows ``starts[s]:starts[s + 1]``.

    ``predictions`` (float32/float64) and ``targets`` (int64, float32 or float64) are
    row-major with the rows of every segment one after another; ``weights`` is float64
    ``[rows]`` or None. Predictions must be finite (probabilities within [0, 1],
    log-probabilities <= 0); targets finite within [0, ``target_max``]; weights finite and >= 0.
    """
    rows = max(int(predictions.shape[0]), 1)
    bad = np.zeros(starts.shape[0] - 1, np.uint8)
    _check(
        kernel_array(predictions.reshape(-1)),
        predictions.size // rows,
        kind,
        kernel_array(targets.reshape(-1)),
        targets.size // rows,
        float(target_max),
        targets.dtype.kind == "i",
        _NO_WEIGHTS if weights is None else kernel_array(weights),
        weights is not None,
        kernel_array(starts.astype(np.int64, copy=False)),
        bad,
    )
    return bad


def warmup() -> None:
    """Compile every signature :func:`check` can be called with."""
    starts = np.array([0, 1, 2], np.int64)
    for pred_dtype in (np.float32, np.float64):
        for tgt_dtype in (np.int64, np.float32, np.float64):
            for weights in (None, np.ones(2)):
                check(np.full((2, 2), 0.5, pred_dtype), PROBS, np.zeros(2, tgt_dtype), 1.0, weights, starts)
