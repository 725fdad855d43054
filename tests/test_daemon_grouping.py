"""Scoring many messages together must give exactly what scoring them one by one gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.conftest import softmax
from xentd import wire
from xentd.config import Config, EngineConfig, LimitsConfig
from xentd.daemon import Daemon


def _daemon(group_max_elements: int) -> Daemon:
    cfg = Config(engine=EngineConfig(group_max_elements=group_max_elements), limits=LimitsConfig(max_models=3))
    d = Daemon(cfg, clock=lambda: 1_700_000_000.0)
    d._init_backend()
    return d


def _stream() -> list[list[bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(60):
        model = ["a", "b", "c"][i % 3]
        n = int(rng.choice([1, 7, 64, 3000]))  # 3000 x 10 is past the group size below
        x = rng.normal(0, 2, (n, 10)).astype(np.float32)
        y = rng.integers(0, 10, n)
        if model == "a":
            frames = wire.encode(model, x, y, input="logits", ts=float(i))
        elif model == "b":
            # Every fourth batch has soft targets, some rows halved (not a distribution: counted).
            t = np.eye(10)[y] * np.where(rng.random(n) < 0.3, 0.5, 1.0)[:, None] if i % 4 == 1 else y
            frames = wire.encode(model, softmax(x).astype(np.float16), t, weights=rng.random(n) if i % 2 else None)
        else:
            frames = wire.encode(model, x[:, 0], (y > 4).astype(np.uint8), input="logits")
        out.append([bytes(f) for f in frames])
        if i % 17 == 5:
            out.append([b"garbage"])
        if i == 30:
            out.append([bytes(f) for f in wire.encode("a", x[:, :5], np.zeros(n, np.int64), input="logits")])
            out.append([bytes(f) for f in wire.encode("d", x, y, input="logits")])  # past max_models
    return out


def _state(d: Daemon) -> list[tuple]:
    snap = d.state.snapshot()
    rows = []
    for m in sorted(snap.models, key=lambda m: m.name):
        windows = [(label, dataclasses.astuple(w)) for label, w in m.windows]
        rows.append(
            (
                m.name,
                m.samples,
                m.weight,
                m.loss_weighted_sum,
                m.correct_weighted_sum,
                m.batches,
                m.unnormalized_rows,
                m.last_event_time,
                m.class_weight.tolist(),
                m.class_loss_weighted_sum.tolist(),
                m.hist_counts.tolist(),
                windows,
                m.unnormalized_targets,
                sorted(m.rejected.items()),
            )
        )
    return [rows, sorted(snap.rejected.items()), snap.counters.messages]


def test_grouped_equals_one_by_one() -> None:
    stream = _stream()
    one_by_one = _daemon(group_max_elements=10_000)
    for frames in stream:
        one_by_one.handle(frames)
    grouped = _daemon(group_max_elements=10_000)
    grouped.handle_many(stream)
    a, b = _state(one_by_one), _state(grouped)
    assert a[2] == b[2] == len(stream)
    assert a[1] == b[1]
    rejected = dict(a[1])
    assert rejected["bad_header"] > 0 and rejected["class_count_changed"] == 1 and rejected["too_many_models"] == 1
    by_model = {r[0]: r for r in a[0]}
    assert by_model["b"][12] > 0 and by_model["a"][13] == [("class_count_changed", 1)]
    for ra, rb in zip(a[0], b[0], strict=True):
        assert ra[:2] == rb[:2] and ra[5] == rb[5] and ra[6] == rb[6] and ra[7] == rb[7]
        np.testing.assert_allclose(ra[2:5], rb[2:5], rtol=1e-12)
        np.testing.assert_allclose(ra[8] + ra[9], rb[8] + rb[9], rtol=1e-12, atol=1e-12)
        assert ra[10] == rb[10] and ra[12:] == rb[12:]
        for (la, wa), (lb, wb) in zip(ra[11], rb[11], strict=True):
            assert la == lb
            np.testing.assert_allclose(wa, wb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group_max_elements", [0, 1 << 30])
def test_grouping_bounds(group_max_elements: int) -> None:
    """Grouping disabled, or everything grouped: the same totals either way."""
    stream = _stream()
    d = _daemon(group_max_elements)
    d.handle_many(stream)
    ref = _daemon(10_000)
    for frames in stream:
        ref.handle(frames)
    assert [r[:2] for r in _state(d)[0]] == [r[:2] for r in _state(ref)[0]]
