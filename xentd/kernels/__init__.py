"""Kernel backends: per-sample scoring of a validated batch.

A backend turns a :class:`~xentd.validate.Batch` into :class:`SampleScores`, one
value per sample, computed in one pass over the predictions. Every backend takes
the same arguments and returns the same results; the CPU backend is the reference.
Accumulating those scores into rolling state is :mod:`xentd.state`'s job and does
not depend on the backend.

Backends: ``cpu`` (:mod:`xentd.kernels.cpu`) and ``cuda``
(:mod:`xentd.kernels.cuda`, with the optional ``numba-cuda`` package); what they
share (records, output scratch, warm-up layouts) is :mod:`xentd.kernels.base`. A
:class:`Router` picks one per batch: the model's ``backend`` setting, else
``engine.backend``; ``auto`` means CUDA for batches of at least
``engine.cuda_min_elements`` prediction values, when a device is present.

Results live in output buffers (:class:`OutputBuffers`): a backend's own by
default, overwritten by its next call, or the caller's (``score(..., out=...)``),
so that the results of several batches can live at once. A router is a backend
too: its :meth:`Router.new_outputs` serve whichever backend it picks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from xentd.errors import BackendUnavailable
from xentd.kernels.base import Backend, OutputBuffers, SampleScores, ScoringParams
from xentd.validate import Batch

__all__ = ["BACKEND_CHOICES", "Backend", "OutputBuffers", "Router", "SampleScores", "ScoringParams", "create"]

log = logging.getLogger("xentd.kernels")

BACKEND_CHOICES = ("cpu", "cuda", "auto")


class Router:
    """Scores each batch on the backend its model is set to use (see the module doc)."""

    def __init__(
        self, cpu: Backend, cuda: Backend | None, *, default: str, per_model: Mapping[str, str], cuda_min_elements: int
    ) -> None:
        self.cpu = cpu
        self.cuda = cuda
        self.default = default
        self.per_model = dict(per_model)
        self.cuda_min_elements = cuda_min_elements
        uses_auto = default == "auto" or "auto" in self.per_model.values()
        if default == "auto":
            self.name = "auto:cuda" if cuda is not None else "auto:cpu"
        elif uses_auto and default == "cpu":
            self.name = "cpu+auto:cuda" if cuda is not None else "cpu"
        else:
            self.name = default

    def pick(self, batch: Batch) -> Backend:
        choice = self.per_model.get(batch.model, self.default)
        if choice == "cpu" or self.cuda is None:
            return self.cpu
        if choice == "cuda" or batch.predictions.size >= self.cuda_min_elements:
            return self.cuda
        return self.cpu

    def new_outputs(self) -> OutputBuffers:
        """Output buffers for batches scored on either backend: any backend's buffers serve
        any backend (they are host arrays), and the CUDA backend's, in pinned memory, are the
        ones its device copies are fastest into, so those when a GPU is in use."""
        return (self.cuda or self.cpu).new_outputs()

    def score(self, batch: Batch, params: ScoringParams, out: OutputBuffers | None = None) -> SampleScores:
        """Score on the backend :meth:`pick` chooses, into ``out`` when given (see ``Backend.score``)."""
        backend = self.pick(batch)
        # Without out, the two-argument call: test doubles written before out existed take it.
        return backend.score(batch, params) if out is None else backend.score(batch, params, out)

    def warmup(self, *, parallel: bool = True) -> None:
        self.cpu.warmup(parallel=parallel)
        if self.cuda is not None:
            self.cuda.warmup(parallel=parallel)

    def warmup_parallel(self) -> None:
        self.cpu.warmup_parallel()
        if self.cuda is not None:
            self.cuda.warmup_parallel()


def create(
    name: str,
    *,
    parallel_threshold: int,
    per_model: Mapping[str, str] | None = None,
    cuda_min_elements: int = 1 << 20,
    cuda_threads_per_block: int = 256,
) -> Router:
    """The backends a config asks for. ``cuda`` anywhere without a usable GPU is a
    :class:`BackendUnavailable`; ``auto`` without one falls back to the CPU and says so in the log."""
    per_model = dict(per_model or {})
    for choice in (name, *per_model.values()):
        if choice not in BACKEND_CHOICES:
            raise BackendUnavailable(f"unknown kernel backend {choice!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    from xentd.kernels.cpu import CpuBackend

    cpu = CpuBackend(parallel_threshold=parallel_threshold)
    required = name == "cuda" or "cuda" in per_model.values()
    wanted = required or name == "auto" or "auto" in per_model.values()
    cuda: Backend | None = None
    if wanted:
        try:
            from xentd.kernels.cuda import CudaBackend

            cuda = CudaBackend(threads_per_block=cuda_threads_per_block)
        except (BackendUnavailable, ImportError, ValueError) as exc:
            if required:
                which = (
                    "engine.backend"
                    if name == "cuda"
                    else "models." + next(m for m, c in per_model.items() if c == "cuda") + ".backend"
                )
                raise BackendUnavailable(
                    f'{which} = "cuda", but {exc}. Install a GPU build with '
                    "pip install 'xentd[cuda]' on a machine with an NVIDIA GPU and driver, "
                    'or set it to "auto" or "cpu"'
                ) from None
            log.warning("backend auto: no usable CUDA device (%s); scoring on the CPU", exc)
        else:
            log.info("CUDA backend ready on %s", getattr(cuda, "device", "?"))
    return Router(cpu, cuda, default=name, per_model=per_model, cuda_min_elements=cuda_min_elements)
