"""The Grafana dashboard: well-formed, every query valid PromQL (promtool), every metric one xentd exports."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.integration.harness import DaemonProcess
from tests.integration.prometheus import RULES, needs_prometheus
from xentd.client import Publisher

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "xentd.json"
# What Grafana substitutes before a query reaches Prometheus.
VARIABLES = {"$model": ".*", "$window": "5m", "$__rate_interval": "1m", "$__range": "1h"}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _queries(variables: dict[str, str] = VARIABLES) -> list[tuple[str, str]]:
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def _panel_queries(title_part: str, variables: dict[str, str] = VARIABLES) -> list[str]:
    found = [expr for title, expr in _queries(variables) if title_part in title.lower()]
    assert found, f"no panel titled like {title_part!r}"
    return found


def test_dashboard_structure() -> None:
    d = _dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["multi"] and "xentd_samples_total" in variables["model"]["definition"]
    panels = [p for p in d["panels"] if p["type"] != "row"]
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in ("cross-entropy by model", "perplexity", "by true class", "accuracy", "rejected", "ingest", "up"):
        assert wanted in titles, wanted
    for wanted in ("join coverage", "label delay", "join store", "entropy", "confidence", "waiting for labels"):
        assert wanted in titles, wanted
    for wanted in ("reliability diagram", "ece and mce", "ece over the range", "brier score", "normalized entropy"):
        assert wanted in titles, wanted
    (diagram,) = (p for p in panels if "reliability diagram" in p["title"].lower())
    assert diagram["repeat"] == "model" and diagram["options"]["xField"] == "bin"  # one diagram per model
    assert all(t.get("instant") and t.get("format") == "table" for t in diagram["targets"])
    assert any(p["type"] == "heatmap" and "xentd_sample_loss_nats_bucket" in p["targets"][0]["expr"] for p in panels)


@needs_prometheus
def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:panel_{i}", "expr": expr} for i, (_, expr) in enumerate(_queries())],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(rules))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_metric_in_the_dashboard_is_exported(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    d = start_daemon(f'[state]\ndirectory = "{tmp_path / "state"}"\nsnapshot_interval = "1s"\n')
    rng = np.random.default_rng(0)
    with Publisher(d.ingest) as pub:
        p = rng.dirichlet(np.ones(4), 100)
        pub.send("m", p, rng.integers(0, 4, 100), batch_id="b1")
        # Delayed labels too, so that the join families (the delay histogram: one matched join) exist.
        ids = np.arange(10, dtype=np.int64)
        pub.send_predictions("m", p[:10], ids)
        pub.send_labels("m", rng.integers(0, 4, 10), ids)
        # A binary model too, for the Brier score's decomposition (binary models only).
        pub.send("ctr", rng.uniform(0.01, 0.99, 50), rng.integers(0, 2, 50).astype(np.float64))
    d.wait_for_at_least("xentd_batches_total", 1.0, model="m")
    d.wait_for_at_least("xentd_batches_total", 1.0, model="ctr")
    d.wait_for("xentd_label_joins_total", 10.0, model="m", outcome="matched")
    d.wait_for_at_least("xentd_snapshots_written_total", 1.0)
    _, text = d.get("/metrics")
    request = urllib.request.Request(d.http + "/metrics", headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        openmetrics = resp.read().decode()
    recorded = set(re.findall(r"record: (\S+)", RULES.read_text()))
    referenced = set()
    for _, expr in _queries():
        referenced |= set(re.findall(r"\b((?:xentd|process|model|instance)[_:][a-z0-9_:]+)\b", expr))
    assert referenced, "no metrics found in the dashboard"
    # The recording rules' own inputs, too.
    rules = set(re.findall(r"(?<![\w:])(xentd_[a-z0-9_]+)(?![\w:])", RULES.read_text()))
    assert "xentd_cross_entropy_nats_count" in rules
    for exposition in (text, openmetrics):  # the same series in both formats (docs/metrics.md)
        exported = {
            line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line and not line.startswith("#")
        }
        missing = sorted(name for name in referenced | rules if name not in exported and name not in recorded)
        assert not missing, missing


def test_delayed_label_panels_query_what_they_say() -> None:
    (coverage,) = _panel_queries("join coverage: matched")
    numerator, denominator = coverage.split(" / ")
    assert 'outcome="matched"' in numerator and "rate(xentd_label_joins_total" in numerator
    assert 'outcome=~"matched|expired|evicted"' in denominator
    (over_range,) = _panel_queries("join coverage over the range", {**VARIABLES, "$__range": "RANGE"})
    assert over_range.count("[RANGE]") == 2
    delay = _panel_queries("label delay")
    assert all(q.startswith("histogram_quantile(") and "xentd_label_delay_seconds_bucket" in q for q in delay)
    store = " ".join(_panel_queries("join store"))
    assert "xentd_pending_bytes{" in store and "xentd_pending_bytes_limit{" in store
    entropy = _panel_queries("prediction entropy")
    assert any("xentd_prediction_entropy_nats_sum" in q and "xentd_prediction_entropy_nats_count" in q for q in entropy)
    assert any("xentd_cross_entropy_nats_sum" in q for q in entropy)  # beside the loss
    confidence = _panel_queries("prediction confidence")
    assert any("xentd_prediction_confidence_sum" in q and "xentd_prediction_confidence_count" in q for q in confidence)


@needs_prometheus
def test_delayed_label_panels_compute_against_synthetic_series(tmp_path: Path) -> None:
    """Evaluate the panels' queries (promtool test rules) on counters whose answers are worked out here."""
    per_minute = {"matched": 30, "unmatched": 7, "duplicate": 2, "expired": 6, "evicted": 4}
    # Label delays, per minute: 10 of 0.5 s, 20 of 3 s, 10 of 100 s (cumulative buckets).
    buckets = {"1": 10, "5": 30, "300": 40, "+Inf": 40}
    series = [
        (f'xentd_label_joins_total{{job="xentd",instance="a",model="m",outcome="{o}"}}', f"0+{n}x20")
        for o, n in per_minute.items()
    ]
    series += [
        (f'xentd_label_delay_seconds_bucket{{job="xentd",instance="a",model="m",le="{le}"}}', f"0+{n}x20")
        for le, n in buckets.items()
    ]
    series += [
        ('xentd_prediction_entropy_nats_sum{job="xentd",instance="a",model="m"}', "0+12x20"),
        ('xentd_prediction_entropy_nats_count{job="xentd",instance="a",model="m"}', "0+40x20"),
        ('xentd_prediction_entropy_nats_sum{job="xentd",instance="b",model="m"}', "0+2x20"),
        ('xentd_prediction_entropy_nats_count{job="xentd",instance="b",model="m"}', "0+10x20"),
        ('xentd_prediction_confidence_sum{job="xentd",instance="a",model="m"}', "0+36x20"),
        ('xentd_prediction_confidence_count{job="xentd",instance="a",model="m"}', "0+40x20"),
        ('xentd_pending_bytes{job="xentd",instance="a"}', "700x20"),
        ('xentd_pending_bytes_limit{job="xentd",instance="a"}', "1000x20"),
        ('xentd_pending_predictions{job="xentd",instance="a",model="m"}', "25x20"),
    ]
    variables = {**VARIABLES, "$__rate_interval": "5m", "$__range": "10m"}
    (coverage,) = _panel_queries("join coverage: matched", variables)
    (over_range,) = _panel_queries("join coverage over the range", variables)
    p50, p90, p99 = _panel_queries("label delay", variables)
    entropy = next(q for q in _panel_queries("prediction entropy", variables) if "entropy_nats_sum" in q)
    confidence = next(q for q in _panel_queries("prediction confidence", variables) if "confidence_sum" in q)
    (waiting,) = _panel_queries("waiting for labels", variables)
    m = {"model": "m"}
    expected = [
        (coverage, m, 30 / (30 + 6 + 4)),  # unmatched and duplicate are not predictions leaving the store
        (over_range, m, 30 / (30 + 6 + 4)),
        (p50, m, 1 + (5 - 1) * (20 - 10) / 20),  # linear within the bucket, as histogram_quantile does
        (p90, m, 5 + (300 - 5) * (36 - 30) / 10),
        (p99, m, 5 + (300 - 5) * (39.6 - 30) / 10),
        (entropy, m, (12 + 2) / (40 + 10)),  # merged: sums over sums, not a mean of the two means
        (confidence, m, 36 / 40),
        (waiting, m, 25.0),
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                # 1 where the panel's value is within 1e-9 of the one worked out here, else 0.
                "promql_expr_test": [
                    {
                        "expr": f"abs(({expr}) - {value!r}) < bool 1e-9",
                        "eval_time": "15m",
                        "exp_samples": [{"labels": _labels(labels), "value": 1}],
                    }
                    for expr, labels, value in expected
                ],
            }
        ],
    }
    path = tmp_path / "panels.test.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(tests))
    out = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    store = dict(_panel_queries("join store", variables)[i].split("{", 1) for i in range(2))
    assert set(store) == {"xentd_pending_bytes", "xentd_pending_bytes_limit"}


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


# Calibration bins (upper edges 0.25, 0.5, 0.75, 1.0) of model m on two instances, per minute:
# {bin: ((W, C, O) on instance a, (W, C, O) on instance b)}. The 0.5 bin never has weight.
CALIBRATION = {
    "0.25": ((10, 2, 1), (10, 1, 2)),
    "0.5": ((0, 0, 0), (0, 0, 0)),
    "0.75": ((20, 12, 16), (0, 0, 0)),
    "1.0": ((10, 9, 6), (20, 18, 18)),
}


def test_calibration_panels_query_what_they_say() -> None:
    observed, confidence, share = _panel_queries("reliability diagram")
    assert "xentd_calibration_outcome_total" in observed and "xentd_calibration_confidence_total" in confidence
    assert all(q.count("[1h]") == 2 and "sum by (bin)" in q for q in (observed, confidence, share))
    (ece,) = _panel_queries("ece over the range", {**VARIABLES, "$__range": "RANGE"})
    # Each bin summed over the instances inside the abs(), not |O - C| per instance.
    assert ece.count("[RANGE]") == 3 and "abs(sum by (model, bin) (increase(" in ece
    window = " ".join(_panel_queries("ece and mce"))
    assert "xentd_window_calibration_error{" in window and "xentd_window_max_calibration_error{" in window
    assert "model:xentd_calibration_error:increase1h" in window
    (ne,) = _panel_queries("normalized entropy")
    assert ne.startswith("xentd_window_normalized_entropy{")
    brier = " ".join(_panel_queries("brier"))
    for name in ("score", "reliability", "resolution", "uncertainty"):
        assert f"xentd_window_brier_{name}{{" in brier, name
    assert "xentd_brier_score_sum" in brier and "xentd_brier_score_count" in brier


@needs_prometheus
def test_calibration_panels_compute_against_synthetic_series(tmp_path: Path) -> None:
    """The reliability diagram and ECE-over-the-range queries, on two instances' counters (promtool)."""
    series = []
    for bin_, per_instance in CALIBRATION.items():
        for instance, sums in zip("ab", per_instance, strict=True):
            for counter, per_minute in zip(("weight", "confidence", "outcome"), sums, strict=True):
                name = f'xentd_calibration_{counter}_total{{job="xentd",instance="{instance}",model="m",bin="{bin_}"}}'
                series.append((name, f"0+{per_minute}x20"))
    series += [
        ('xentd_brier_score_sum{job="xentd",instance="a",model="m"}', "0+6x20"),
        ('xentd_brier_score_count{job="xentd",instance="a",model="m"}', "0+40x20"),
        ('xentd_brier_score_sum{job="xentd",instance="b",model="m"}', "0+1x20"),
        ('xentd_brier_score_count{job="xentd",instance="b",model="m"}', "0+30x20"),
    ]
    # The definitions (docs/metrics.md), on the bins merged across instances.
    merged = {bin_: [a + b for a, b in zip(*sums, strict=True)] for bin_, sums in CALIBRATION.items()}
    total = sum(w for w, _, _ in merged.values())
    variables = {**VARIABLES, "$__rate_interval": "5m", "$__range": "10m"}
    observed, confidence, share = _panel_queries("reliability diagram", variables)
    (ece,) = _panel_queries("ece over the range", variables)
    brier = next(q for q in _panel_queries("brier score", variables) if "brier_score_sum" in q)
    expected: list[tuple[str, dict[str, str], float]] = [
        (ece, {"model": "m"}, sum(abs(o - c) for _, c, o in merged.values()) / total),  # 7 / 70
        (brier, {"model": "m"}, (6 + 1) / (40 + 30)),
    ]
    for bin_, (w, c, o) in merged.items():
        one_bin = f' and on (bin) label_replace(vector(1), "bin", "{bin_}", "", "")'
        expected.append((share + one_bin, {"bin": bin_}, w / total))
        if w > 0:  # a bin without weight has no point in the diagram
            expected += [(observed + one_bin, {"bin": bin_}, o / w), (confidence + one_bin, {"bin": bin_}, c / w)]
    # 1 where the panel's value is within 1e-9 of the one worked out here, else 0.
    checks = [
        {
            "expr": f"abs(({expr}) - {value!r}) < bool 1e-9",
            "eval_time": "15m",
            "exp_samples": [{"labels": _labels(labels), "value": 1}],
        }
        for expr, labels, value in expected
    ]
    # The diagram leaves out the bin without weight (three bars, not a fourth of 0 / 0).
    checks.append({"expr": f"count({observed})", "eval_time": "15m", "exp_samples": [{"labels": "{}", "value": 3}]})
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "promql_expr_test": checks,
            }
        ],
    }
    path = tmp_path / "calibration.test.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(tests))
    out = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
