"""One jitted call folds a model's scored rows into all of its components.

A model's fold touches three components (:class:`xentd.state.ModelState`): the losses,
the calibration sums and, for rows that arrived with their predictions, the label-free
entropy and confidence. Folded one Python call each, a drain of 1,000 models' messages
paid three dispatches, three wrappers and a dozen array slices per model, more than the
arithmetic (BENCHMARKS.md, section j). :func:`fold_model` takes each component's
``kernel_state()`` as a tuple, the whole scored batch and the model's rows ``lo:hi``,
and runs each component's own fold kernel in one call: the arithmetic keeps one
definition, in :mod:`xentd.accumulate` and :mod:`xentd.calibration`.

All or nothing: a fold that would overflow a lifetime sum changes no component. The loss
fold checks itself before it commits; calibration and entropy terms are bounded by the
weights (Brier scores are at most 2, confidences 1, entropies log C < 40 nats), so their
sums are checked first, without committing, only when they could overflow: when a weight
or one of their lifetime sums is past :data:`HUGE`. Below it, a batch adds at most
rows x 40 x 1e290, far from float64's 1.8e308 for any batch a message can carry.

(The ``type: ignore`` comments: the states spread into the kernels' arguments, which
Numba types and mypy cannot.)
"""

from __future__ import annotations

import numpy as np

from xentd import accumulate as acc
from xentd import calibration
from xentd.jit import cached

# Weights or lifetime sums above this could overflow the calibration or entropy sums.
HUGE = 1e290

# fold_model's verdicts: folded, or which component's sums would overflow.
FOLDED, LOSS_OVERFLOW, CALIBRATION_OVERFLOW, ENTROPY_OVERFLOW = 0, 1, 2, 3


@cached(acc.__file__, calibration.__file__)
def fold_model(  # type: ignore[no-untyped-def]
    lo,
    hi,
    loss,
    focal,
    correct,
    tcls,
    weights,
    weighted,
    mode,
    t1,
    t2,
    confidence,
    brier,
    entropy,
    top,
    label_free,
    loss_state,
    calibration_state,
    predictions_state,
):
    """Fold rows ``lo:hi`` of a scored batch into a model's components.

    ``weights`` (when ``weighted``), ``t1`` (binary targets, ``mode`` 0) and ``t2`` (soft
    targets, ``mode`` 2) are the whole batch's, as are the per-sample scores. ``entropy``
    and ``top`` are the rows' label-free entropy and confidence, folded into the
    predictions component when ``label_free``. Returns (verdict, loss value sum, loss
    count total, calibration count total, calibration rows in use, predictions value
    sum, predictions count total: 0 without ``label_free``); on a verdict other than
    FOLDED nothing changed.
    """
    # Absent inputs are empty arrays, and stay empty: slicing clamps.
    loss = loss[lo:hi]
    focal = focal[lo:hi]
    correct = correct[lo:hi]
    tcls = tcls[lo:hi]
    confidence = confidence[lo:hi]
    brier = brier[lo:hi]
    w = weights[lo:hi]
    t1 = t1[lo:hi]
    t2 = t2[lo:hi]
    entropy = entropy[lo:hi]
    top = top[lo:hi]
    # The label-free statistics reuse the loss layout with one class slot and nothing "correct".
    none_correct = np.zeros(entropy.shape[0], np.uint8)
    slot_zero = np.zeros(entropy.shape[0], np.int64)
    # Both lifetimes are the states' fourth entry (CalibrationStats.kernel_state, WindowedStats.kernel_state).
    near_range = (weighted and w.shape[0] > 0 and w.max() > HUGE) or calibration_state[3].max() > HUGE
    if label_free and predictions_state[3].max() > HUGE:
        near_range = True
    if near_range:
        fits = calibration._fold(confidence, brier, correct, tcls, t1, t2, mode, w, weighted, *calibration_state, False)
        if not fits[0]:
            return CALIBRATION_OVERFLOW, 0.0, 0, 0, 0, 0.0, 0
        if label_free:
            entropy_fits = acc.fold_all(entropy, top, none_correct, slot_zero, w, weighted, *predictions_state, False)  # type: ignore[call-arg]
            if not entropy_fits[0]:
                return ENTROPY_OVERFLOW, 0.0, 0, 0, 0, 0.0, 0
    committed, value_sum, total = acc.fold_all(loss, focal, correct, tcls, w, weighted, *loss_state, True)  # type: ignore[call-arg]
    if not committed:
        return LOSS_OVERFLOW, 0.0, 0, 0, 0, 0.0, 0
    # The commits below cannot refuse once the check above passed (or was not needed); were one
    # to, its verdict is returned rather than dropped, though the loss is then already folded.
    committed, calibration_total, tw_used = calibration._fold(
        confidence, brier, correct, tcls, t1, t2, mode, w, weighted, *calibration_state, True
    )
    if not committed:
        return CALIBRATION_OVERFLOW, value_sum, total, 0, 0, 0.0, 0
    prediction_sum, prediction_total = 0.0, 0
    if label_free:
        committed, prediction_sum, prediction_total = acc.fold_all(  # type: ignore[call-arg]
            entropy, top, none_correct, slot_zero, w, weighted, *predictions_state, True
        )
        if not committed:
            return ENTROPY_OVERFLOW, value_sum, total, calibration_total, tw_used, 0.0, 0
    return FOLDED, value_sum, total, calibration_total, tw_used, prediction_sum, prediction_total
