"""The shipped systemd unit: `systemd-analyze verify` is clean and its security exposure is at most 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "xentd.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (scripts/test installs it as root)",
)


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as installed from this checkout: verify checks that ExecStart= exists."""
    venv = Path(sys.prefix)
    assert (venv / "bin" / "xentd").exists()
    unit = tmp_path / "xentd.service"
    unit.write_text(UNIT.read_text().replace("/opt/xentd/.venv", str(venv)))
    return unit


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(_installed_copy(tmp_path))], capture_output=True, text=True
    )
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "xentd" in line]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


def test_unit_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for xentd\.service: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.0, out.stdout


def test_unit_keeps_what_numba_needs() -> None:
    text = UNIT.read_text()
    assert "MemoryDenyWriteExecute=no" in text  # the JIT writes code, then runs it
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "StateDirectory=xentd",
        "CacheDirectory=xentd",
        "RuntimeDirectory=xentd",
        "ProtectSystem=strict",
        "NUMBA_CACHE_DIR=/var/cache/xentd/numba",
        "--state-dir ${STATE_DIRECTORY}",
    ):
        assert line in text, line
