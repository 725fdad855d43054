"""[export]: per-class series by model size, and the max_series budget, in both formats."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from xentd import config
from xentd.config import ExportConfig, LimitsConfig, WindowsConfig
from xentd.errors import ConfigError
from xentd.exporter import Exposition
from xentd.kernels import SampleScores
from xentd.state import StateStore

CLASS_FAMILY = "xentd_class_cross_entropy_nats"
# The names the class family's samples carry in either format (a summary in text, a gauge pair in OpenMetrics).
CLASS_SAMPLES = {f"{CLASS_FAMILY}_count", f"{CLASS_FAMILY}_sum"}


def _store(models: dict[str, int]) -> StateStore:
    """A store with one scored batch for each model of ``models`` (name -> classes), every class seen."""
    now = 1_700_000_000.0
    s = StateStore(WindowsConfig(), LimitsConfig(), lambda: now)
    for name, classes in models.items():
        true_class = np.arange(classes)
        loss = np.linspace(0.1, 2.0, classes)
        s.model(name, classes).fold(
            SampleScores(
                loss=loss,
                focal=loss / 2,
                correct=(true_class % 2).astype(np.uint8),
                true_class=true_class,
                unnormalized_rows=0,
                confidence=np.full(len(loss), 0.75),
                brier=np.full(len(loss), 0.25),
            ),
            np.full(classes, 1.5),  # fractional weights: the OpenMetrics pairs must still parse
            now,
            None,
        )
    return s


def _exposition(store: StateStore, export: ExportConfig | None = None) -> Exposition:
    if export is None:
        return Exposition(store.snapshot, version="v", backend="cpu")
    return Exposition(store.snapshot, version="v", backend="cpu", export=export)


def _series(exposition: Exposition) -> tuple[Counter[tuple[str, bool]], Counter[tuple[str, bool]], float]:
    """(series per (model, is a per-class series) in text, the same in OpenMetrics, xentd_series_dropped).

    Both outputs are parsed (OpenMetrics strictly), and both must report the same dropped count."""
    result: list[Counter[tuple[str, bool]]] = []
    dropped: list[float] = []
    for text, parse in (
        (exposition.text().decode(), parse_text),
        (exposition.openmetrics().decode(), parse_openmetrics),
    ):
        counts: Counter[tuple[str, bool]] = Counter()
        for family in parse(text):
            for sample in family.samples:
                if sample.name == "xentd_series_dropped":
                    dropped.append(sample.value)
                if "model" in sample.labels and sample.name.startswith("xentd_"):
                    counts[sample.labels["model"], sample.name in CLASS_SAMPLES] += 1
        result.append(counts)
    assert len(dropped) == 2 and dropped[0] == dropped[1]
    return result[0], result[1], dropped[0]


def _class_models(counts: Counter[tuple[str, bool]]) -> dict[str, int]:
    return {model: n for (model, per_class), n in counts.items() if per_class}


def test_auto_exports_per_class_series_only_for_small_models() -> None:
    store = _store({"small": 3, "big": 30})
    text, openmetrics, dropped = _series(_exposition(store))  # the default: auto, at most 20 classes
    assert text == openmetrics
    assert _class_models(text) == {"small": 2 * 3}  # _count and _sum per class
    assert text["big", False] == text["small", False] > 0  # big keeps every other series
    assert dropped == 0


@pytest.mark.parametrize(
    ("export", "expected"),
    [
        (ExportConfig(per_class="all"), {"small": 6, "big": 60}),
        (ExportConfig(per_class="none"), {}),
        (ExportConfig(per_class="auto", per_class_max_classes=30), {"small": 6, "big": 60}),
        (ExportConfig(per_class="auto", per_class_max_classes=29), {"small": 6}),
        (ExportConfig(per_class="auto", per_class_max_classes=2), {}),
    ],
)
def test_per_class_modes(export: ExportConfig, expected: dict[str, int]) -> None:
    store = _store({"small": 3, "big": 30})
    text, openmetrics, dropped = _series(_exposition(store, export))
    assert text == openmetrics
    assert _class_models(text) == expected
    assert text["big", False] == text["small", False] > 0
    assert dropped == 0


def test_max_series_leaves_out_per_class_series_first_then_models_in_name_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _store({"c": 3, "b": 100, "a": 3})
    # The reference: what every model has, counted from an unlimited scrape.
    full, _, dropped = _series(_exposition(store, ExportConfig(per_class="all", max_series=0)))
    assert dropped == 0
    base = {m: full[m, False] for m in "abc"}
    classes = {m: full[m, True] for m in "abc"}
    assert classes == {"a": 6, "b": 200, "c": 6}
    total = sum(full.values())

    # Everything fits exactly: nothing is left out.
    text, openmetrics, dropped = _series(_exposition(store, ExportConfig(per_class="all", max_series=total)))
    assert text == openmetrics == full and dropped == 0

    # Room for every model and a's classes, not b's: b's and c's per-class series go (c comes after b).
    budget = sum(base.values()) + classes["a"] + classes["c"]
    with caplog.at_level(logging.WARNING, logger="xentd.exporter"):
        exposition = _exposition(store, ExportConfig(per_class="all", max_series=budget))
        text, openmetrics, dropped = _series(exposition)
        _series(exposition)  # a second scrape within the minute logs nothing more
    assert text == openmetrics
    assert {k: n for k, n in text.items() if not k[1]} == {(m, False): base[m] for m in "abc"}
    assert _class_models(text) == {"a": 6}
    assert dropped == classes["b"] + classes["c"]
    warnings = [r for r in caplog.records if "export.max_series" in r.getMessage()]
    assert len(warnings) == 1 and str(int(dropped)) in warnings[0].getMessage()

    # Room for a and b but not c: c is left out whole; what is left holds a's classes, not b's.
    budget = base["a"] + base["b"] + base["c"] - 1
    assert classes["a"] <= base["c"] - 1 < classes["b"]
    text, openmetrics, dropped = _series(_exposition(store, ExportConfig(per_class="all", max_series=budget)))
    assert text == openmetrics
    assert dict(text) == {("a", False): base["a"], ("b", False): base["b"], ("a", True): classes["a"]}
    assert dropped == total - base["a"] - base["b"] - classes["a"]

    # Room for less than a: nothing per-model goes out.
    text, openmetrics, dropped = _series(_exposition(store, ExportConfig(per_class="all", max_series=base["a"] - 1)))
    assert not text and not openmetrics and dropped == total

    # Under auto, the budget counts only the per-class series auto wants.
    text, _, dropped = _series(_exposition(store, ExportConfig(max_series=sum(base.values()) + 6)))
    assert _class_models(text) == {"a": 6} and dropped == 6  # c's, which auto wanted
    # xentd_models still counts every model with state.
    families = parse_text(_exposition(store, ExportConfig(max_series=1)).text().decode())
    assert next(f for f in families if f.name == "xentd_models").samples[0].value == 3


def test_export_config_parses_and_defaults() -> None:
    assert config.Config().export == ExportConfig(per_class="auto", per_class_max_classes=20, max_series=1_000_000)
    cfg = config.from_mapping({"export": {"per_class": "all", "per_class_max_classes": 5, "max_series": 0}})
    assert cfg.export == ExportConfig(per_class="all", per_class_max_classes=5, max_series=0)


def test_export_config_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        config.from_mapping(
            {
                "export": {
                    "per_class": "some",
                    "per_class_max_classes": -1,
                    "max_series": "lots",
                    "max_seires": 5,
                },
                "log": {"level": "loud"},
            }
        )
    message = str(info.value)
    assert message.startswith("5 problems:")
    assert "export.per_class: must be one of 'auto', 'all', 'none', got 'some'" in message
    assert "export.per_class_max_classes: must be >= 0, got -1" in message
    assert "export.max_series: expected int, got str 'lots'" in message
    assert "export.max_seires: unknown key (did you mean 'max_series'?)" in message
    assert "log.level" in message
    with pytest.raises(ConfigError, match=r"export: expected a table"):
        config.from_mapping({"export": 3})


def _varied() -> StateStore:
    """Models of 2, 5 and 30 classes, rejections, joins and label-free rows: every family shape."""
    from xentd.errors import Reason
    from xentd.joins import PoolKey

    s = _store({"a": 2, "b": 5, "c": 30})
    s.reject(Reason.NON_FINITE, "b")
    s.reject(Reason.TARGET_OUT_OF_RANGE, "b")
    s.joins.put(
        "c", PoolKey(0, "FP32", 30, False), np.arange(3, dtype=np.uint64), np.ones((3, 30), np.float32), None, 1.0
    )
    s.model("c", 30).fold_predictions(np.ones(3), np.ones(3), None, 1_700_000_000.0)
    return s


def test_each_familys_cells_count_the_series_the_text_has() -> None:
    """The budget counts a model's series from its cells: they must be the lines the model gets."""
    from xentd.exporter import FAMILIES, _scrape, render_text

    snap = _varied().snapshot()
    export = ExportConfig(per_class="all", max_series=0)
    scrape = _scrape(snap, "v", "cpu", export, None)
    lines: Counter[tuple[str, str]] = Counter()
    for family in parse_text(render_text(snap, version="v", backend="cpu", export=export)):
        for sample in family.samples:
            if "model" in sample.labels:
                lines[family.name, sample.labels["model"]] += 1
    for family in FAMILIES:
        if family.per_model is None:
            continue
        parsed = family.name.removesuffix("_total") if family.type == "counter" else family.name
        counts = scrape.cells[family.name].series()
        for i, model in enumerate(snap.table.names):
            assert counts[i] == lines[parsed, model], (family.name, model)


@pytest.mark.parametrize("per_class", ["all", "auto"])
def test_the_plan_is_the_loop_over_models_at_every_budget(per_class: Literal["all", "auto"]) -> None:
    """xentd.exporter._plan (cumulative sums over arrays) against the reference's loop over
    models (tests/exposition_reference.py), for every budget from nothing to everything."""
    from tests import exposition_reference
    from xentd.exporter import _scrape

    snap = _varied().snapshot()
    names = snap.table.names
    total = exposition_reference.plan(snap, ExportConfig(per_class=per_class, max_series=1))[2]
    for budget in range(1, total + 2):
        export = ExportConfig(per_class=per_class, max_series=budget)
        models, detailed, dropped = exposition_reference.plan(snap, export)
        scrape = _scrape(snap, "v", "cpu", export, None)
        assert [names[i] for i in scrape.rows] == [m.name for m in models], budget
        assert {names[i] for i in scrape.detailed} == detailed, budget
        assert scrape.dropped == dropped, budget
