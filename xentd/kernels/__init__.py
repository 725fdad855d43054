"""Kernel backends: per-sample scoring of a validated batch.

A backend turns a :class:`~xentd.validate.Batch` into :class:`SampleScores`, one
value per sample, computed in one pass over the predictions. Every backend takes
the same arguments and returns the same results; the CPU backend is the reference.
Accumulating those scores into rolling state is :mod:`xentd.state`'s job and does
not depend on the backend.

To add a backend (CUDA is next): write ``kernels/<name>.py`` with a class that
satisfies :class:`Backend`, and teach :func:`create` its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from xentd.errors import BackendUnavailable
from xentd.validate import Batch


@dataclass(frozen=True, slots=True)
class ScoringParams:
    """Per-model constants, already resolved from config and the batch's datatype."""

    eps: float
    focal_gamma: float
    normalization_tolerance: float


@dataclass(frozen=True, slots=True)
class SampleScores:
    """Per-sample results. Arrays may be views of backend scratch memory:
    they are valid until the backend's next ``score`` call.

    - ``loss``: cross-entropy in nats (float64), not weighted.
    - ``focal``: focal loss in nats (float64), not weighted.
    - ``correct``: 1 where the top-1 prediction is the true class (uint8).
    - ``true_class``: the true class; the argmax of soft targets (int64).
    - ``unnormalized_rows``: rows of probs/log_probs whose mass is off 1 by more than the tolerance.
    """

    loss: np.ndarray
    focal: np.ndarray
    correct: np.ndarray
    true_class: np.ndarray
    unnormalized_rows: int


class Backend(Protocol):
    name: str

    def warmup(self) -> None:
        """Compile every kernel signature the daemon can reach, before it reports ready."""

    def score(self, batch: Batch, params: ScoringParams) -> SampleScores:
        """Score every sample of a validated batch."""


def create(name: str, *, parallel_threshold: int) -> Backend:
    if name == "cpu":
        from xentd.kernels.cpu import CpuBackend

        return CpuBackend(parallel_threshold=parallel_threshold)
    raise BackendUnavailable(f"unknown kernel backend {name!r}; this build has: cpu")
