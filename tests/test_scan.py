"""The validation scans: exact widening and exact min/max/NaN counting, on both builds."""

from __future__ import annotations

import numpy as np
import pytest

from xentd import scan


@pytest.fixture(params=["serial", "parallel"])
def threshold(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan, "PARALLEL_MIN", 0 if request.param == "parallel" else 1 << 62)


def test_every_fp16_bit_pattern_widens_exactly(threshold: None) -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.size, np.float32)
    lo, hi, bad = scan.widen(bits, out, half=True)
    np.testing.assert_array_equal(out, bits.view(np.float16).astype(np.float32))
    assert bad == 2 * 1024  # both signs: Inf and the 1023 NaN payloads
    assert (lo, hi) == (-65504.0, 65504.0)


def test_bf16_is_the_top_half_of_a_float32(threshold: None) -> None:
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty(bits.size, np.float32)
    lo, hi, bad = scan.widen(bits, out, half=False)
    np.testing.assert_array_equal(out.view(np.uint32), bits.astype(np.uint32) << 16)
    assert bad == 0 and lo == out.min() and hi == out.max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scan_min_max_and_non_finite(threshold: None, dtype: type) -> None:
    x = np.random.default_rng(1).standard_normal((300, 70)).astype(dtype)
    assert scan.scan(x) == (float(x.min()), float(x.max()), 0)
    x[5, 5], x[7, 0], x[299, 69] = np.nan, np.inf, -np.inf
    assert scan.scan(x)[2] == 3
    assert scan.scan(np.zeros(0, dtype)) == (0.0, 0.0, 0)
    big = np.array([np.finfo(dtype).max, np.finfo(dtype).min], dtype)
    assert scan.scan(big) == (float(big[1]), float(big[0]), 0)
