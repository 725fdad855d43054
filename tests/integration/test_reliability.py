"""Reliability guarantees of docs/reliability.md, each checked against the real daemon process."""

from __future__ import annotations

from pathlib import Path

from tests.integration.fuzz_daemon import fuzz_real_daemon


def test_fuzz_sample_through_a_real_socket(tmp_path: Path) -> None:
    """Hostile messages interleaved with valid ones: all counted, valid ones exactly, no crash."""
    problems, summary = fuzz_real_daemon(tmp_path, seed=11, messages=3000)
    assert not problems, summary
