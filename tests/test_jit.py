"""xentd.jit: a cached build goes stale when the helpers that kernels inline from xentd/jit.py change."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from xentd import jit


def _module(path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, module)
    spec.loader.exec_module(module)
    return module


def test_a_change_to_the_shared_helpers_makes_cached_builds_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Numba looks only at the kernel's own file; xentd.jit adds its own text to the stamp."""
    source = tmp_path / "xentd_jit_cache_probe.py"
    source.write_text("def plus_one(x):\n    return x + 1\n")
    module = _module(source, monkeypatch)

    def build_and_call() -> tuple[int, int]:
        dispatcher = jit.cached()(module.plus_one)
        assert dispatcher(1) == 2
        stats = dispatcher.stats
        return sum(stats.cache_hits.values()), sum(stats.cache_misses.values())

    assert build_and_call() == (0, 1)  # compiled and saved
    assert build_and_call() == (1, 0)  # loaded
    monkeypatch.setattr(jit, "HELPERS_HASH", "another version of xentd/jit.py")
    assert build_and_call() == (0, 1)  # stale: compiled again
