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
VARIABLES = {"$model": ".*", "$window": "5m", "$__rate_interval": "1m"}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _queries() -> list[tuple[str, str]]:
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


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
    d.wait_for("xentd_batches_total", 1.0, model="m")
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
