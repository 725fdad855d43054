"""Numba kernels that write Prometheus text lines: values as Python writes them, and whole families at once.

A scrape of 10,000 models is about 1.5 M lines. Formatting each value with ``repr`` and
each line with an f-string costs about 1 us a line in Python; here a kernel writes a
family's lines for every model into one byte buffer.

Values are written exactly as the exporter always wrote them (``repr`` of a Python
float or int, with Prometheus' ``NaN``, ``+Inf`` and ``-Inf``): :func:`write_float` is
``repr(float)``, the shortest decimal string that reads back as the same double (Ryu's
method: Ulf Adams, "Ryu: fast float-to-string conversion", PLDI 2018), laid out as
CPython lays it out (positional from 1e-4 to below 1e16, else ``1e+16`` style).
tests/test_render.py compares it with ``repr`` on millions of doubles.

A line is ``head[col] + label[row] + tail[col] + value + "\\n"``: a column is one kind of
sample of the family (``name_bucket{`` ... ``,le="0.5"} ``), a row one model (its
``model="..."``), so no line is ever assembled in Python.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from xentd.jit import cached

# --- the tables --------------------------------------------------------------------------
#
# Ryu scales the double's binary significand by a power of 5 (a power of 10 split into
# its 5 and 2 parts) held as a 125-bit fixed-point number, and reads off the decimal
# digits with 64-bit arithmetic. Both tables are exact, computed here with Python ints.

_POW5_INV_BITS = 125
_POW5_BITS = 125
_MASK64 = (1 << 64) - 1


def _pow5bits(e: int) -> int:
    """Bits of 5**e (1 for e = 0): the same multiply-shift as the kernel's."""
    return ((e * 1217359) >> 19) + 1


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(5^-q scaled up, 5^i scaled to 125 bits) as (n, 2) uint64 arrays of (low, high) words."""
    inverse = np.empty((342, 2), np.uint64)
    for q in range(inverse.shape[0]):
        v = (1 << (_pow5bits(q) - 1 + _POW5_INV_BITS)) // 5**q + 1
        inverse[q] = (v & _MASK64, v >> 64)
    power = np.empty((326, 2), np.uint64)
    for i in range(power.shape[0]):
        p = 5**i
        shift = _pow5bits(i) - _POW5_BITS
        v = p >> shift if shift >= 0 else p << -shift
        power[i] = (v & _MASK64, v >> 64)
    return inverse, power


POW5_INV, POW5 = _tables()

_U32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_ZERO, _TWO, _FOUR, _FIVE = np.uint64(0), np.uint64(2), np.uint64(4), np.uint64(5)
_TEN, _FIFTY, _HUNDRED = np.uint64(10), np.uint64(50), np.uint64(100)


@cached(inline="always")
def _mul_shift(m, lo, hi, j):  # type: ignore[no-untyped-def]
    """(m * (hi * 2^64 + lo)) >> j for m < 2^55 and 64 < j < 192, in 32-bit limbs."""
    # m * lo: only its high word matters.
    a0 = m & _U32
    a1 = m >> _S32
    b0 = lo & _U32
    b1 = lo >> _S32
    p00 = a0 * b0
    p01 = a0 * b1
    p10 = a1 * b0
    p11 = a1 * b1
    mid = p10 + (p00 >> _S32)
    mid2 = p01 + (mid & _U32)
    high0 = p11 + (mid >> _S32) + (mid2 >> _S32)
    # m * hi, both words.
    b0 = hi & _U32
    b1 = hi >> _S32
    p00 = a0 * b0
    p01 = a0 * b1
    p10 = a1 * b0
    p11 = a1 * b1
    mid = p10 + (p00 >> _S32)
    mid2 = p01 + (mid & _U32)
    high1 = p11 + (mid >> _S32) + (mid2 >> _S32)
    low1 = (mid2 << _S32) | (p00 & _U32)
    total = high0 + low1
    if total < high0:
        high1 += np.uint64(1)
    dist = j - 64
    if dist == 0:
        return total
    if dist >= 64:
        return high1 >> np.uint64(dist - 64)
    return (high1 << np.uint64(64 - dist)) | (total >> np.uint64(dist))


@cached(inline="always")
def _pow5_factor(v):  # type: ignore[no-untyped-def]
    count = 0
    while v > 0 and v % 5 == 0:
        v //= 5
        count += 1
    return count


@cached()
def shortest(bits, inverse, power):  # type: ignore[no-untyped-def]
    """(digits, exponent) of a finite, nonzero double's bit pattern (sign ignored): the
    fewest decimal digits that read back as the same double, the nearest such where
    several do, ties to even; the double is about ``digits * 10**exponent``."""
    mantissa = bits & np.int64((1 << 52) - 1)
    biased = (bits >> np.int64(52)) & np.int64(0x7FF)
    if biased == 0:
        e2 = 1 - 1023 - 52 - 2
        m2 = mantissa
    else:
        e2 = biased - 1023 - 52 - 2
        m2 = mantissa | np.int64(1 << 52)
    accept_bounds = (m2 & 1) == 0
    mv = 4 * m2
    mm_shift = 1 if (mantissa != 0 or biased <= 1) else 0
    vm_trailing_zeros = False
    vr_trailing_zeros = False
    if e2 >= 0:
        q = ((e2 * 78913) >> 18) - (1 if e2 > 3 else 0)
        e10 = q
        k = _POW5_INV_BITS + (((q * 1217359) >> 19) + 1) - 1
        j = -e2 + q + k
        lo = inverse[q, 0]
        hi = inverse[q, 1]
        vr = np.int64(_mul_shift(np.uint64(mv), lo, hi, j))
        vp = np.int64(_mul_shift(np.uint64(mv + 2), lo, hi, j))
        vm = np.int64(_mul_shift(np.uint64(mv - 1 - mm_shift), lo, hi, j))
        if q <= 21:
            if mv % 5 == 0:
                vr_trailing_zeros = _pow5_factor(mv) >= q
            elif accept_bounds:
                vm_trailing_zeros = _pow5_factor(mv - 1 - mm_shift) >= q
            else:
                vp -= 1 if _pow5_factor(mv + 2) >= q else 0
    else:
        q = ((-e2 * 732923) >> 20) - (1 if -e2 > 1 else 0)
        e10 = q + e2
        i = -e2 - q
        k = (((i * 1217359) >> 19) + 1) - _POW5_BITS
        j = q - k
        lo = power[i, 0]
        hi = power[i, 1]
        vr = np.int64(_mul_shift(np.uint64(mv), lo, hi, j))
        vp = np.int64(_mul_shift(np.uint64(mv + 2), lo, hi, j))
        vm = np.int64(_mul_shift(np.uint64(mv - 1 - mm_shift), lo, hi, j))
        if q <= 1:
            # mv has at least q trailing zero bits; so has vr.
            vr_trailing_zeros = True
            if accept_bounds:
                vm_trailing_zeros = mm_shift == 1
            else:
                vp -= 1
        elif q < 63:
            vr_trailing_zeros = (mv & ((np.int64(1) << np.int64(q)) - 1)) == 0
    # Unsigned from here: division by a constant is then a multiply and a shift.
    ur = np.uint64(vr)
    up = np.uint64(vp)
    um = np.uint64(vm)
    removed = 0
    last = np.uint64(0)
    if vm_trailing_zeros or vr_trailing_zeros:
        # Rare: the exact value or a bound ends in zeros, which decide the rounding.
        while up // _TEN > um // _TEN:
            vm_trailing_zeros = vm_trailing_zeros and um % _TEN == _ZERO
            vr_trailing_zeros = vr_trailing_zeros and last == _ZERO
            last = ur % _TEN
            ur //= _TEN
            up //= _TEN
            um //= _TEN
            removed += 1
        if vm_trailing_zeros:
            while um % _TEN == _ZERO:
                vr_trailing_zeros = vr_trailing_zeros and last == _ZERO
                last = ur % _TEN
                ur //= _TEN
                up //= _TEN
                um //= _TEN
                removed += 1
        if vr_trailing_zeros and last == _FIVE and ur % _TWO == _ZERO:
            last = _FOUR  # exactly halfway: round to even
        round_up = (ur == um and (not accept_bounds or not vm_trailing_zeros)) or last >= _FIVE
    else:
        # The common case: no zeros to track; round on the last digit removed.
        half_up = False
        if up // _HUNDRED > um // _HUNDRED:
            half_up = bool(ur % _HUNDRED >= _FIFTY)
            ur //= _HUNDRED
            up //= _HUNDRED
            um //= _HUNDRED
            removed += 2
        while up // _TEN > um // _TEN:
            half_up = bool(ur % _TEN >= _FIVE)
            ur //= _TEN
            up //= _TEN
            um //= _TEN
            removed += 1
        round_up = half_up or ur == um
    digits = np.int64(ur) + (1 if round_up else 0)
    return digits, e10 + removed


# --- writing values ----------------------------------------------------------------------

# The longest value either writer produces: "-2.2250738585072014e-308" is 24 bytes, an int64 at most 20.
VALUE_BYTES = 24


@cached(inline="always")
def _put(out, pos, text):  # type: ignore[no-untyped-def]
    for k in range(text.shape[0]):
        out[pos + k] = text[k]
    return pos + text.shape[0]


_POW10 = np.array([10**k for k in range(19)], np.int64)
# "00", "01", ... "99": digits are written two at a time.
_PAIRS = np.frombuffer("".join(f"{i:02d}" for i in range(100)).encode(), np.uint8).copy()


@cached(inline="always")
def _put_digits(out, pos, v, n):  # type: ignore[no-untyped-def]
    """The ``n`` decimal digits of ``v`` >= 0 (leading zeros if it has fewer)."""
    u = np.uint64(v)
    k = pos + n
    while k - pos >= 2:
        r = np.int64(u % _HUNDRED)
        u //= _HUNDRED
        out[k - 1] = _PAIRS[2 * r + 1]
        out[k - 2] = _PAIRS[2 * r]
        k -= 2
    if k > pos:
        out[k - 1] = 48 + np.int64(u % _TEN)
    return pos + n


@cached(inline="always")
def _length(v):  # type: ignore[no-untyped-def]
    """Decimal digits of ``v`` >= 0."""
    n = 1
    while n < 19 and v >= _POW10[n]:
        n += 1
    return n


@cached(inline="always")
def write_int(out, pos, v):  # type: ignore[no-untyped-def]
    """``repr`` of an int64."""
    if v < 0:
        out[pos] = 45  # -
        pos += 1
        if v == np.int64(-(1 << 63)):  # its negation does not exist
            return _put_digits(out, _put_digits(out, pos, np.int64(922337203685477580), 18), 8, 1)
        v = -v
    return _put_digits(out, pos, v, _length(v))


_SIGN = np.int64(0x7FFFFFFFFFFFFFFF)
_INFINITY = np.int64(0x7FF0000000000000)


@cached(inline="always")
def write_float(out, pos, x, bits, inverse, power):  # type: ignore[no-untyped-def]
    """``repr`` of the float64 ``x``, whose bit pattern (as int64) is ``bits``, with NaN, +Inf
    and -Inf spelled as Prometheus spells them."""
    magnitude = bits & _SIGN
    if magnitude > _INFINITY:  # NaN, whatever its sign: repr says "nan"
        out[pos] = 78  # N
        out[pos + 1] = 97  # a
        out[pos + 2] = 78
        return pos + 3
    if bits < 0:
        out[pos] = 45  # -
        pos += 1
    elif magnitude == _INFINITY:
        out[pos] = 43  # +
        pos += 1
    if magnitude == _INFINITY:
        out[pos] = 73  # I
        out[pos + 1] = 110  # n
        out[pos + 2] = 102  # f
        return pos + 3
    if magnitude == 0:
        out[pos] = 48
        out[pos + 1] = 46
        out[pos + 2] = 48
        return pos + 3
    x = abs(x)
    if x < 1e16 and x == np.floor(x):
        # A whole number below 1e16 (counts, mostly): its digits and ".0". It has at most
        # 16 digits, and every double there is exact to 1 or finer, so none are shorter.
        pos = write_int(out, pos, np.int64(x))
        out[pos] = 46
        out[pos + 1] = 48
        return pos + 2
    digits, exponent = shortest(magnitude, inverse, power)
    n = _length(digits)
    point = n + exponent  # the value is 0.DIGITS * 10**point
    if -4 < point <= 16:
        if point <= 0:  # 0.000ddd
            out[pos] = 48
            out[pos + 1] = 46
            pos += 2
            for _ in range(-point):
                out[pos] = 48
                pos += 1
            return _put_digits(out, pos, digits, n)
        if point >= n:  # ddd000.0
            pos = _put_digits(out, pos, digits, n)
            for _ in range(point - n):
                out[pos] = 48
                pos += 1
            out[pos] = 46
            out[pos + 1] = 48
            return pos + 2
        # ddd.ddd: the digits one place to the right, then the first ``point`` back left of a "."
        _put_digits(out, pos + 1, digits, n)
        for k in range(point):
            out[pos + k] = out[pos + 1 + k]
        out[pos + point] = 46
        return pos + n + 1
    # d.ddde+XX
    if n > 1:
        _put_digits(out, pos + 1, digits, n)
        out[pos] = out[pos + 1]
        out[pos + 1] = 46
        pos += n + 1
    else:
        pos = _put_digits(out, pos, digits, 1)
    e = point - 1
    out[pos] = 101  # e
    out[pos + 1] = 43 if e >= 0 else 45
    e = abs(e)
    return _put_digits(out, pos + 2, e, 2 if e < 100 else 3)


@cached()
def format_values(values, integer, inverse, power):  # type: ignore[no-untyped-def]
    """Every value written one a line (int64 bit patterns where ``integer``): what the kernels
    write for a value, for tests and for formatting a few values from Python."""
    out = np.empty(values.shape[0] * 26, np.uint8)
    bits = values.view(np.int64)
    pos = 0
    for i in range(values.shape[0]):
        if integer:
            pos = write_int(out, pos, bits[i])
        else:
            pos = write_float(out, pos, values[i], bits[i], inverse, power)
        out[pos] = 10
        pos += 1
    return out[:pos]


# --- writing families --------------------------------------------------------------------


@intrinsic
def _copy(typingctx, out, at, src, start, n):  # type: ignore[no-untyped-def]
    """``out[at:at + n] = src[start:start + n]`` as one memcpy, unchecked (the caller checks
    the bounds): a byte loop, or Numba's slice assignment, cost most of a line."""
    if not (isinstance(out, types.Array) and isinstance(src, types.Array)):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        dst = context.make_array(signature.args[0])(context, builder, args[0])
        source = context.make_array(signature.args[2])(context, builder, args[2])
        to = builder.gep(dst.data, [args[1]])
        start = builder.gep(source.data, [args[3]])
        cgutils.raw_memcpy(builder, to, start, args[4], 1)  # type: ignore[no-untyped-call]
        return context.get_dummy_value()

    return types.void(out, at, src, start, n), codegen


@cached()
def write_lines(  # type: ignore[no-untyped-def]
    out,
    pos,
    rows,
    offsets,
    column,
    values,
    text,
    head,
    tail,
    integer,
    labels,
    label_at,
    inverse,
    power,
):
    """Write the lines of the cells of each row of ``rows`` into ``out`` from ``pos``; return the end.

    Row r's cells are ``offsets[r]:offsets[r + 1]``; cell c is of column ``column[c]`` and
    holds ``values[c]`` (an int64 bit pattern where ``integer[column[c]]``). A line is
    ``text[head[k]:head[k + 1]]``, the row's label ``labels[label_at[r]:label_at[r + 1]]``,
    ``text[tail[k]:tail[k + 1]]`` for its column k, the value and a newline. ``out`` must
    have room for them; if it does not, nothing past its end is written and -1 is returned."""
    bits = values.view(np.int64)
    end = out.shape[0]
    for r in rows:
        a = label_at[r]
        label = label_at[r + 1] - a
        for c in range(offsets[r], offsets[r + 1]):
            k = column[c]
            h = head[k + 1] - head[k]
            t = tail[k + 1] - tail[k]
            if pos + h + label + t + VALUE_BYTES + 1 > end:
                return -1  # no room: the caller's bound is wrong
            _copy(out, pos, text, head[k], h)  # type: ignore[call-arg]
            pos += h
            _copy(out, pos, labels, a, label)
            pos += label
            _copy(out, pos, text, tail[k], t)
            pos += t
            if integer[k]:
                pos = write_int(out, pos, bits[c])
            else:
                pos = write_float(out, pos, values[c], bits[c], inverse, power)
            out[pos] = 10
            pos += 1
    return pos


def format_values_text(values: np.ndarray, *, integer: bool = False) -> list[str]:
    """The kernels' text for each value (float64, or int64 where ``integer``), for tests."""
    data = np.ascontiguousarray(values, np.int64 if integer else np.float64)
    raw = format_values(data.view(np.float64), integer, POW5_INV, POW5)
    return bytes(raw).decode("ascii").split("\n")[:-1]


def warmup() -> None:
    """Compile the kernels (their one signature each) before the first scrape needs them."""
    format_values_text(np.array([1.5, np.nan, -np.inf, 1e300, 0.0]))
    format_values_text(np.array([3, -7]), integer=True)
    empty_i = np.zeros(1, np.int64)
    out = np.empty(64, np.uint8)
    text = np.frombuffer(b"a{", np.uint8)
    write_lines(
        out,
        0,
        np.zeros(1, np.int64),
        np.array([0, 1], np.int64),
        np.zeros(1, np.int32),
        np.ones(1),
        text,
        np.array([0, 2], np.int64),
        np.array([2, 2], np.int64),
        np.zeros(1, np.bool_),
        text,
        np.array([0, 0], np.int64),
        POW5_INV,
        POW5,
    )
    del empty_i
