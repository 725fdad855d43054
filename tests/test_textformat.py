"""xentd.textformat: values written exactly as ``repr`` writes them, lines as the table says."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from xentd import textformat
from xentd.textformat import format_values_text


def _repr(x: float) -> str:
    """How the exporter wrote a float before the kernels: ``repr``, with Prometheus' spellings."""
    text = repr(float(x))
    return {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}.get(text, text)


SPECIAL = [
    0.0,
    -0.0,
    float("nan"),
    -float("nan"),
    float("inf"),
    -float("inf"),
    1.0,
    -1.0,
    0.1,
    0.2,
    0.3,
    1 / 3,
    2 / 3,
    640.0,
    1e15,
    1e16,  # the first power of ten written with an exponent
    9999999999999998.0,  # the largest double below 1e16: positional
    1e16 + 2,
    2.0**53,
    2.0**53 + 2,
    2.0**63,
    2.0**64,
    1e21,
    1e22,
    1e23,
    1e-4,  # the smallest power of ten written positionally
    1e-5,
    0.00012345,
    9.999999999999999e-05,
    123.456,
    4.35,
    1e100,
    1.5e-100,
    1.7976931348623157e308,
    2.2250738585072014e-308,  # the smallest normal double
    2.225073858507201e-308,  # the largest subnormal one
    5e-324,
    123456789012345678.0,
    0.30000000000000004,
]


def test_special_values_are_written_as_repr() -> None:
    values = np.array(SPECIAL)
    assert format_values_text(values) == [_repr(x) for x in SPECIAL]


@pytest.mark.parametrize(
    "case",
    ["bits", "exponential", "decades", "integers", "short", "powers of two", "powers of ten", "subnormal", "ulps"],
)
def test_doubles_are_written_as_repr(case: str) -> None:
    """200,000 doubles of each kind; the kernel agreed with repr on 18 M of them during development."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    n = 200_000
    with np.errstate(over="ignore"):
        values = {
            "bits": rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True).view(np.float64),
            "exponential": rng.exponential(2.3, n),
            "decades": 10.0 ** rng.uniform(-330, 310, n) * rng.choice([-1.0, 1.0], n),
            "integers": np.round(rng.uniform(0, 1e17, n)),
            "short": np.round(rng.uniform(0, 1e6, n)) / 10.0 ** rng.integers(0, 7, n),
            "powers of two": np.ldexp(1.0, rng.integers(-1074, 1024, n)),
            "powers of ten": 10.0 ** rng.integers(-323, 309, n).astype(np.float64),
            "subnormal": rng.integers(1, 2**52, n, dtype=np.int64).view(np.float64),
            "ulps": np.nextafter(np.ldexp(1.0, rng.integers(-1070, 1020, n)), rng.choice([0.0, np.inf], n)),
        }[case]
    got = format_values_text(values)
    want = [_repr(x) for x in values.tolist()]
    wrong = [(x, g, w) for x, g, w in zip(values.tolist(), got, want, strict=True) if g != w]
    assert not wrong, wrong[:5]


def test_ints_are_written_as_repr() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            np.array([0, 1, -1, 9, 10, 99, 100, 2**53 + 1, 2**63 - 1, -(2**63)], np.int64),
            rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64),
            rng.integers(0, 1000, 50_000, dtype=np.int64),
        ]
    )
    assert format_values_text(values, integer=True) == [str(v) for v in values.tolist()]


def _write(out: np.ndarray) -> int:
    """Two rows of a family of two columns (an integer one and a float one) into ``out``."""
    heads = [b"a_total{", b"b{"]
    tails = [b',w="1m"} ', b"} "]
    text = np.frombuffer(b"".join(heads + tails), np.uint8)
    head = np.array([0, 8, 10], np.int64)
    tail = np.array([10, 19, 21], np.int64)
    labels = np.frombuffer(b'model="x"model="yy"', np.uint8)
    values = np.array([7, 1.5, 8, 2.5])
    values[[0, 2]] = np.array([7, 8], np.int64).view(np.float64)
    return int(
        textformat.write_lines(
            out,
            0,
            np.array([1, 0], np.int64),  # rows in this order
            np.array([0, 2, 4], np.int64),
            np.array([0, 1, 0, 1], np.int32),
            values,
            text,
            head,
            tail,
            np.array([True, False]),
            labels,
            np.array([0, 9, 19], np.int64),
            textformat.POW5_INV,
            textformat.POW5,
        )
    )


def test_lines_are_head_label_tail_value() -> None:
    out = np.zeros(200, np.uint8)
    end = _write(out)
    assert bytes(out[:end]) == (
        b'a_total{model="yy",w="1m"} 8\nb{model="yy"} 2.5\na_total{model="x",w="1m"} 7\nb{model="x"} 1.5\n'
    )


def test_a_buffer_too_short_is_refused_not_overrun() -> None:
    out = np.zeros(60, np.uint8)
    guard = np.full(40, 7, np.uint8)
    both = np.concatenate([out, guard])
    assert _write(both[:60]) == -1
    assert (both[60:] == 7).all()
