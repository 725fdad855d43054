"""Cardinality guard: allow-list and pattern, model cap, class cap (each counted), idle-model TTL."""

from __future__ import annotations

import numpy as np
import pytest

from xentd import config, wire
from xentd.config import Config, LimitsConfig
from xentd.daemon import Daemon
from xentd.errors import ConfigError, Reason
from xentd.exporter import render_text


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _msg(model: str, classes: int = 2, label: int = 0) -> list[bytes]:
    return [bytes(f) for f in wire.encode(model, np.full((1, classes), 1 / classes), [label])]


def _daemon(clock: Clock | None = None, **limits: object) -> Daemon:
    d = Daemon(Config(limits=LimitsConfig(**limits)), clock=clock or Clock())  # type: ignore[arg-type]
    d._init_backend()
    return d


def test_allow_list_and_pattern() -> None:
    d = _daemon(allowed_models=("legacy",), model_pattern=r"fraud-v\d+")
    for name in ("legacy", "fraud-v3", "fraud-v3x", "ranking", "fraud-v12"):
        d.handle(_msg(name))
    assert sorted(m.name for m in d.state.snapshot().models) == ["fraud-v12", "fraud-v3", "legacy"]
    assert d.state.rejected[Reason.MODEL_NOT_ALLOWED.value] == 2
    assert d.state.counters.limit_hits["allowed_models"] == 2


def test_each_limit_is_counted_when_it_bites() -> None:
    d = _daemon(max_models=1, class_limit=3)
    d.handle(_msg("a", classes=5, label=1))  # within the class limit
    d.handle(_msg("a", classes=5, label=4))  # folded into "other"
    d.handle(_msg("b"))  # past max_models
    text = render_text(d.state.snapshot(), version="t", backend="cpu")
    assert 'xentd_limit_hits_total{limit="class_limit"} 1\n' in text
    assert 'xentd_limit_hits_total{limit="max_models"} 1\n' in text
    assert 'xentd_limit_hits_total{limit="allowed_models"} 0\n' in text
    assert 'xentd_rejected_batches_total{reason="too_many_models"} 1\n' in text


def test_idle_models_leave_metrics_after_the_ttl() -> None:
    clock = Clock()
    d = _daemon(clock, model_ttl_seconds=3600.0)
    d.handle(_msg("old"))
    clock.now += 3000
    d.handle(_msg("new"))
    clock.now += 601
    d.housekeeping(force=True)
    snap = d.state.snapshot()
    assert [m.name for m in snap.models] == ["new"] and snap.counters.models_evicted == 1
    text = render_text(snap, version="t", backend="cpu")
    assert 'model="old"' not in text and "xentd_models_evicted_total 1\n" in text
    d.handle(_msg("old"))  # it may come back, from zero
    assert {m.name: m.batches for m in d.state.snapshot().models} == {"new": 1, "old": 1}


def test_ttl_never() -> None:
    cfg = config.from_mapping({"limits": {"model_ttl": "never"}})
    assert cfg.limits.model_ttl_seconds is None
    clock = Clock()
    d = _daemon(clock, model_ttl_seconds=None)
    d.handle(_msg("m"))
    clock.now += 10 * 365 * 86400
    d.housekeeping(force=True)
    assert len(d.state.models) == 1


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"model_pattern": "fraud-(["}, "not a regular expression"),
        ({"allowed_models": ["a b"]}, "not a valid model name"),
        ({"model_ttl": "soon"}, "not a duration"),
    ],
)
def test_limit_config_errors(limits: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.from_mapping({"limits": limits})
