"""What every kernel backend shares: the records it takes and returns, its output
scratch, and the batch layouts it compiles at warm-up. Backends differ only in
their kernels and in where their memory lives.

Every kernel, CPU or CUDA, is called as ``kernel(predictions, targets, kind,
*params.kernel_args, *outputs)``: the two records spread into positional
arguments in field order. Not as two tuples: a parallel (``prange``) CPU build
silently drops writes to arrays unpacked from a tuple argument (Numba 0.68),
and Numba's dispatcher types a named tuple in Python (about 0.8 us more a call).

Adding a per-sample output (say a confidence) takes: a field of
:class:`Outputs` with its dtype in :data:`OUTPUT_DTYPES`, a field of
:class:`SampleScores` filled in :meth:`OutputBuffers.scores`, and, in each
backend, the kernels that write it (every kernel takes every output array as an
argument). Allocation and transfers follow from the record.

Kernels check the values they score: each writes ``invalid[i] = 1`` for a row that
breaks one of :mod:`xentd.validate`'s value rules (see :class:`SampleScores`), in
the passes that score it, and never reads out of bounds or raises for any input.

Predictions are float32 or float64, or the wire's own FP16 bits as a uint16 array
or BF16 bits as an int16 array: kernels widen those exactly to float32 as they load
them (:func:`xentd.jit.load`), and score them as the float32 values they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from xentd.jit import kernel_array
from xentd.validate import Batch, InputKind, TargetKind


@dataclass(frozen=True, slots=True)
class ScoringParams:
    """Per-model constants, already resolved from config and the batch's datatype."""

    eps: float
    focal_gamma: float
    normalization_tolerance: float
    # The record as the kernels take it, their (eps, gamma, tol) arguments: built once
    # here rather than on every call (callers keep one record per model).
    kernel_args: tuple[float, float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_args", (self.eps, self.focal_gamma, self.normalization_tolerance))


@dataclass(frozen=True, slots=True)
class SampleScores:
    """Per-sample results. Arrays may be views of backend scratch memory: they are
    valid until the backend's next ``score`` call with the same output buffers
    (its own when none are given; see :meth:`Backend.score`).

    A row whose ``invalid`` flag is 1 breaks a value rule; its other values are
    unspecified (they may be NaN or anything else) and must not be folded.

    - ``loss``: cross-entropy in nats (float64), not weighted.
    - ``focal``: focal loss in nats (float64), not weighted.
    - ``correct``: 1 where the top-1 prediction is the true class (uint8).
    - ``true_class``: the true class; the argmax of soft targets (int64).
    - ``unnormalized_rows``: valid rows of probs/log_probs whose mass is off 1 by more than the
      tolerance (the count of ``unnormalized`` over the rows whose ``invalid`` is 0).
    - ``confidence``: binary, the positive-class probability p; multiclass, the largest
      class probability (float64). Probabilities as sent, unclipped (docs/metrics.md).
    - ``brier``: the Brier score, (p - t)**2 or the sum over classes of (p_c - t_c)**2 (float64).
    - ``entropy``: the label-free entropy H = -sum_c p_c log p_c of the predicted distribution,
      in nats (float64), as :func:`xentd.predstats.row_stats` defines it (binary: (p, 1 - p)).
      Every backend fills it; ``None`` only in records built by hand without it.
    - ``invalid``: 1 where the row breaks a value rule, else 0 (uint8): a prediction value
      NaN or infinite; for probs one below 0 or above 1, for log_probs one above 0; a class
      index outside [0, C - 1]; a soft target NaN, infinite, below 0 or above 1. Weights are
      not the kernels' to check.
    - ``unnormalized``: 1 where the row's mass is off 1 by more than the tolerance (uint8),
      the flags that ``unnormalized_rows`` counts (unspecified on invalid rows).
    Every backend fills the last two; ``None`` only in records built by hand without them.
    """

    loss: np.ndarray
    focal: np.ndarray
    correct: np.ndarray
    true_class: np.ndarray
    unnormalized_rows: int
    confidence: np.ndarray
    brier: np.ndarray
    # A default, so that records built field by field before this one existed (the pipeline's
    # per-unit slices, tests' fakes) still build; the backends always set it.
    entropy: np.ndarray | None = None
    invalid: np.ndarray | None = None
    unnormalized: np.ndarray | None = None


class Backend(Protocol):
    name: str

    def warmup(self, *, parallel: bool = True) -> None:
        """Compile every kernel signature the daemon can reach, before it reports ready.
        ``parallel=False`` may leave out builds that only make large batches faster."""

    def warmup_parallel(self) -> None:
        """Compile what ``warmup(parallel=False)`` left out (in the background, once ready)."""

    def new_outputs(self) -> OutputBuffers:
        """A fresh set of output buffers (grow-only, empty until used), for :meth:`score`'s ``out``."""

    def score(self, batch: Batch, params: ScoringParams, out: OutputBuffers | None = None) -> SampleScores:
        """Score every sample of a batch (shapes and dtypes as :class:`~xentd.validate.Batch`
        types them; values unchecked: see ``SampleScores.invalid``).

        With ``out``, the results are views of those buffers, valid until the next call
        with the same ``out``; without, of the backend's own, valid until its next call
        without ``out``. So that the results of several batches live at once, give each
        its own buffers. Any backend's buffers serve any backend (they are host arrays);
        a backend's own :meth:`new_outputs` are the ones its copies are fastest into
        (pinned memory, for CUDA)."""


class Outputs(NamedTuple):
    """The arrays a kernel writes, one element per sample, in the order of the kernels' arguments."""

    loss: Any
    focal: Any
    correct: Any
    true_class: Any
    unnormalized: Any  # 1 where the row's mass is off 1 by more than the tolerance
    confidence: Any
    brier: Any
    entropy: Any
    invalid: Any  # 1 where the row breaks a value rule (SampleScores.invalid)


OUTPUT_DTYPES = Outputs(
    loss=np.dtype(np.float64),
    focal=np.dtype(np.float64),
    correct=np.dtype(np.uint8),
    true_class=np.dtype(np.int64),
    unnormalized=np.dtype(np.uint8),
    confidence=np.dtype(np.float64),
    brier=np.dtype(np.float64),
    entropy=np.dtype(np.float64),
    invalid=np.dtype(np.uint8),
)


class OutputBuffers:
    """A backend's output scratch: one array per :class:`Outputs` field, reused across calls.

    The arrays only grow (at least doubling), so steady traffic allocates nothing.
    Kernels get them whole, as :attr:`arrays` (built when they grow, not on every
    call), and write their first n elements for n samples.
    ``allocate`` makes one array: ``np.empty`` by default; the CUDA backend passes
    pinned host memory, or device memory.
    """

    def __init__(self, allocate: Callable[[int, np.dtype[Any]], Any] = np.empty, capacity: int = 1024) -> None:
        self._allocate = allocate
        self._grow(capacity)

    def reserve(self, n: int) -> None:
        """Make every array hold at least ``n`` elements (what they held is then undefined)."""
        if n > self.capacity:
            self._grow(max(n, 2 * self.capacity))

    def _grow(self, capacity: int) -> None:
        self.capacity = capacity
        self.arrays = Outputs._make(self._allocate(capacity, dtype) for dtype in OUTPUT_DTYPES)

    def scores(self, n: int) -> SampleScores:
        """The first ``n`` results (host arrays), as views that the next call overwrites."""
        loss, focal, correct, true_class, unnormalized, confidence, brier, entropy, invalid = self.arrays
        flags, bad = unnormalized[:n], invalid[:n]
        unnormalized_rows = int(np.count_nonzero(flags))
        if unnormalized_rows:  # valid rows only (1 > 0): an invalid row's flag is unspecified
            unnormalized_rows = int(np.count_nonzero(flags > bad))
        return SampleScores(
            loss=loss[:n],
            focal=focal[:n],
            correct=correct[:n],
            true_class=true_class[:n],
            unnormalized_rows=unnormalized_rows,
            confidence=confidence[:n],
            brier=brier[:n],
            entropy=entropy[:n],
            invalid=bad,
            unnormalized=flags,
        )


# The batch layouts a backend compiles at warm-up: every (prediction dtype, target
# layout) pair validate can hand it. The values do not matter: kind and the
# parameters are runtime arguments, one compiled signature serves them all.
WARMUP_PARAMS = ScoringParams(eps=1e-7, focal_gamma=2.0, normalization_tolerance=1e-3)


# What each prediction dtype a batch can hold is on the wire, and the value 0.5 in it.
_WARMUP_DTYPES = (
    (np.float32, "FP32", np.float32(0.5)),
    (np.float64, "FP64", np.float64(0.5)),
    (np.uint16, "FP16", np.float16(0.5).view(np.uint16)),
    (np.int16, "BF16", np.int16(np.float32(0.5).view(np.uint32) >> 16)),
)


def warmup_batches() -> list[Batch]:
    """One tiny batch of each layout: binary, class-index and soft (float32 and float64
    targets) predictions, each in float32, float64, FP16 bits (uint16) and BF16 bits (int16)."""
    batches = []
    for dtype, datatype, half in _WARMUP_DTYPES:
        pred1 = kernel_array(np.full(2, half, dtype))
        pred2 = kernel_array(np.full((2, 2), half, dtype))
        layouts = [
            (pred1, kernel_array(np.zeros(2)), TargetKind.SOFT),
            (pred2, kernel_array(np.zeros(2, np.int64)), TargetKind.INDEX),
            (pred2, kernel_array(np.zeros((2, 2), np.float32)), TargetKind.SOFT),
            (pred2, kernel_array(np.zeros((2, 2), np.float64)), TargetKind.SOFT),
        ]
        for pred, tgt, target_kind in layouts:
            batches.append(
                Batch(
                    model="warmup",
                    kind=InputKind.PROBS,
                    predictions=pred,
                    targets=tgt,
                    target_kind=target_kind,
                    weights=None,
                    num_classes=2,
                    prediction_datatype=datatype,
                    batch_id=None,
                    ts=None,
                )
            )
    return batches
