"""Host code is strictly typed; this keeps it so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_mypy_strict_passes() -> None:
    pytest.importorskip("mypy")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
