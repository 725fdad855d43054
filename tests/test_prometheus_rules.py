"""The shipped Prometheus rules: valid, and doing what their unit tests say (promtool)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.prometheus import needs_prometheus

RULES_DIR = Path(__file__).resolve().parent.parent / "config" / "prometheus"


@needs_prometheus
def test_promtool_check_rules() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(RULES_DIR / "xentd.rules.yml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_prometheus
def test_promtool_test_rules() -> None:
    out = subprocess.run(
        ["promtool", "test", "rules", "xentd.rules.test.yml"], cwd=RULES_DIR, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
