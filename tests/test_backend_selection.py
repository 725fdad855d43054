"""Which backend scores a batch: engine.backend, per-model overrides, and auto's size threshold."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import make_batch
from xentd import config
from xentd.errors import BackendUnavailable, ConfigError
from xentd.kernels import Router, SampleScores, ScoringParams, create
from xentd.validate import Batch


class Fake:
    def __init__(self, name: str) -> None:
        self.name = name
        self.scored: list[str] = []

    def warmup(self, *, parallel: bool = True) -> None:
        pass

    def warmup_parallel(self) -> None:
        pass

    def score(self, batch: Batch, params: ScoringParams) -> SampleScores:
        self.scored.append(batch.model)
        n = batch.size
        return SampleScores(
            np.zeros(n), np.zeros(n), np.zeros(n, np.uint8), np.zeros(n, np.int64), 0, np.ones(n), np.zeros(n)
        )


def _batch(model: str, rows: int) -> Batch:
    return make_batch(np.full((rows, 4), 0.25), np.zeros(rows, np.int64), model=model)


def test_router_follows_model_then_engine_then_size() -> None:
    cpu, gpu = Fake("cpu"), Fake("cuda")
    r = Router(cpu, gpu, default="auto", per_model={"small-but-gpu": "cuda", "pinned": "cpu"}, cuda_min_elements=400)
    params = ScoringParams(1e-7, 2.0, 1e-3)
    for model, rows in [("a", 10), ("a", 100), ("small-but-gpu", 1), ("pinned", 1000)]:
        r.score(_batch(model, rows), params)
    assert cpu.scored == ["a", "pinned"] and gpu.scored == ["a", "small-but-gpu"]
    assert r.name == "auto:cuda"
    assert Router(cpu, None, default="auto", per_model={}, cuda_min_elements=0).name == "auto:cpu"
    no_gpu = Router(cpu, None, default="auto", per_model={}, cuda_min_elements=0)
    assert no_gpu.pick(_batch("a", 10_000)) is cpu


def test_cuda_without_a_device_is_a_clear_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from xentd.kernels import cuda as cuda_kernels

    monkeypatch.setattr(cuda_kernels, "available", lambda: (False, "no CUDA device or driver found"))
    with pytest.raises(BackendUnavailable, match='engine.backend = "cuda", but .*no CUDA device'):
        create("cuda", parallel_threshold=0)
    with pytest.raises(BackendUnavailable, match='models.lm.backend = "cuda"'):
        create("cpu", parallel_threshold=0, per_model={"lm": "cuda"})
    fallback = create("auto", parallel_threshold=0)
    assert fallback.cuda is None and fallback.name == "auto:cpu"


def test_backend_config() -> None:
    cfg = config.from_mapping(
        {
            "engine": {"backend": "auto", "cuda_min_elements": 4096},
            "models": {"lm": {"backend": "cuda"}, "fraud": {"eps": 1e-9}},
        }
    )
    assert cfg.engine.backend == "auto" and cfg.engine.cuda_min_elements == 4096
    assert cfg.model_backends() == {"lm": "cuda"}
    with pytest.raises(ConfigError, match="must be one of"):
        config.from_mapping({"engine": {"backend": "gpu"}})
    with pytest.raises(ConfigError, match="unknown key"):
        config.from_mapping({"scoring": {"backend": "cuda"}})  # global choice lives in engine.backend
    with pytest.raises(ConfigError, match="power of two"):
        config.from_mapping({"engine": {"cuda_threads_per_block": 100}})
