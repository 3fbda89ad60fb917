"""Tests of the native K/V codec against the numpy reference in codec_reference.py."""

from __future__ import annotations

from collections.abc import Callable

import codec_reference as ref
import numpy as np
import numpy.typing as npt
import pytest

from qkvshare_edge import _native

F32 = np.float32
F32Array = npt.NDArray[np.float32]
Generator = Callable[[np.random.Generator, tuple[int, int]], F32Array]


def _gaussian(rng: np.random.Generator, shape: tuple[int, int]) -> F32Array:
    return rng.standard_normal(shape, dtype=F32)


def _outliers(rng: np.random.Generator, shape: tuple[int, int]) -> F32Array:
    # About 2% of elements 200 times larger, like the outlier channels of K.
    x = rng.standard_normal(shape, dtype=F32)
    x[rng.random(shape) < 0.02] *= F32(200)
    return x


def _constant(rng: np.random.Generator, shape: tuple[int, int]) -> F32Array:
    # Every group has zero range, so widths 2-4 store a zero scale.
    values = rng.uniform(-5, 5, size=(shape[0], 1)).astype(F32)
    return np.repeat(values, shape[1], axis=1)


def _zeros(rng: np.random.Generator, shape: tuple[int, int]) -> F32Array:
    return np.zeros(shape, dtype=F32)


def _negative(rng: np.random.Generator, shape: tuple[int, int]) -> F32Array:
    return -(np.abs(rng.standard_normal(shape, dtype=F32)) * F32(10) + F32(0.5))


def _near_f16_max(rng: np.random.Generator, shape: tuple[int, int]) -> F32Array:
    x = rng.uniform(-65504, 65504, size=shape).astype(F32)
    x[:, 0] = 65504
    x[:, 1] = -65504
    return x


def _offset(rng: np.random.Generator, shape: tuple[int, int]) -> F32Array:
    # Groups far from zero with a small range, where the f16 minimum is coarse.
    return F32(1000) + F32(0.01) * rng.standard_normal(shape, dtype=F32)


def _tiny(rng: np.random.Generator, shape: tuple[int, int]) -> F32Array:
    # Scales fall in the f16 subnormal range, or round to zero.
    return F32(1e-6) * rng.standard_normal(shape, dtype=F32)


INPUTS: dict[str, tuple[int, Generator]] = {
    "gaussian": (1, _gaussian),
    "outliers": (2, _outliers),
    "constant": (3, _constant),
    "zeros": (4, _zeros),
    "negative": (5, _negative),
    "near_f16_max": (6, _near_f16_max),
    "offset": (7, _offset),
    "tiny": (8, _tiny),
}

# (group_size, n): one group, and rows of several groups for each group size.
SHAPES = [(8, 40), (32, 32), (32, 96), (64, 256), (128, 384)]

MIXED_WIDTHS = (2, 3, 4, 8, 16)


def make_rows(kind: str, n_rows: int, n: int) -> F32Array:
    seed, generate = INPUTS[kind]
    return generate(np.random.default_rng(seed * 1000 + n), (n_rows, n))


def make_mixed_rows(n_rows: int, n: int) -> tuple[F32Array, npt.NDArray[np.uint8]]:
    """Return rows that cycle through every input kind, and widths that cycle through every width."""
    kinds = list(INPUTS)
    x = np.stack([make_rows(kinds[r % len(kinds)], 1, n)[0] * F32(r + 1) for r in range(n_rows)])
    bits = np.array([MIXED_WIDTHS[r % len(MIXED_WIDTHS)] for r in range(n_rows)], dtype=np.uint8)
    return x, bits


def widths_of(bits: int, n_rows: int) -> npt.NDArray[np.uint8]:
    return np.full(n_rows, bits, dtype=np.uint8)


def float_bits(a: F32Array) -> npt.NDArray[np.uint32]:
    """Return the bit patterns of a, with every NaN replaced by one canonical quiet NaN.

    Comparing bits keeps the sign of zero, and the canonical NaN lets arrays that
    have NaN in the same places compare equal whatever NaN payload the CPU made.
    """
    bits = np.ascontiguousarray(a, dtype=F32).view(np.uint32).copy()
    bits[np.isnan(a)] = 0x7FC00000
    return bits


def first_difference(expected: np.ndarray, actual: np.ndarray) -> str:
    expected = expected.reshape(-1)
    actual = actual.reshape(-1)
    if expected.shape != actual.shape:
        return f"sizes differ: reference {expected.shape[0]}, result {actual.shape[0]}"
    differing = np.flatnonzero(expected != actual)
    if differing.size == 0:
        return "no difference"
    i = int(differing[0])
    return f"{differing.size} differ, first at index {i}: reference {expected[i].item()!r}, result {actual[i].item()!r}"


def float_difference(expected: F32Array, actual: F32Array) -> str:
    """Describe the first element whose float bits differ, as values and as hex bits."""
    expected_bits = float_bits(expected).reshape(-1)
    actual_bits = float_bits(actual).reshape(-1)
    if expected_bits.shape != actual_bits.shape:
        return f"sizes differ: reference {expected_bits.shape[0]}, result {actual_bits.shape[0]}"
    differing = np.flatnonzero(expected_bits != actual_bits)
    if differing.size == 0:
        return "no difference"
    i = int(differing[0])
    e = expected.reshape(-1)[i].item()
    a = actual.reshape(-1)[i].item()
    return (
        f"{differing.size} differ, first at index {i}: reference {e!r} "
        f"(0x{int(expected_bits[i]):08x}), result {a!r} (0x{int(actual_bits[i]):08x})"
    )


def max_error_bound(x: F32Array, bits: int, group_size: int) -> npt.NDArray[np.float64]:
    """Return, per element of x, the largest decode error the codec may make.

    Widths 2-4 (levels = 2^bits - 1): half a step (0.5 * df), plus the error of
    storing the step d as f16 times the top code (levels * |d - df|, reached
    where the top of the range clamps), plus the error of storing the minimum
    as f16 (|mn - mf|). That last term scales with |mn|, not with the group's
    range, so groups far from zero can exceed half a step.
    Width 8: 0.5 * df + 127 * |d - df|, where the second term covers clamping
    when df < d and the case of a scale that rounds to zero in f16.
    Width 16: half an f16 ulp, |x| * 2^-11, or 2^-25 for subnormal halves.
    Every width adds 8 float32 epsilons of the group's max |x| for the float32
    rounding in x * id and in the decode.
    """
    groups = x.reshape(-1, group_size)
    amax = np.abs(groups).max(axis=1).astype(np.float64)
    slack = 8 * np.finfo(F32).eps * amax
    if bits == 16:
        bound = np.abs(groups).astype(np.float64) * 2.0**-11 + 2.0**-25
        return (bound + slack[:, None]).reshape(x.shape)

    if bits == 8:
        d = np.abs(groups).max(axis=1) / F32(127)
        df = d.astype(np.float16).astype(F32)
        bound = 0.5 * df.astype(np.float64) + 127 * np.abs(d.astype(np.float64) - df)
    else:
        levels = (1 << bits) - 1
        mn = groups.min(axis=1)
        d = (groups.max(axis=1) - mn) / F32(levels)
        df = d.astype(np.float16).astype(F32)
        mf = mn.astype(np.float16).astype(F32)
        bound = (
            0.5 * df.astype(np.float64)
            + levels * np.abs(d.astype(np.float64) - df)
            + np.abs(mn.astype(np.float64) - mf)
        )
    per_group = bound + slack
    return np.broadcast_to(per_group[:, None], groups.shape).reshape(x.shape)


@pytest.mark.parametrize("bits", ref.WIDTHS)
@pytest.mark.parametrize(("group_size", "n"), [*SHAPES, (8, 8), (128, 4096)])
def test_row_bytes_formula(bits: int, group_size: int, n: int) -> None:
    n_group = n // group_size
    expected = {16: 2 * n, 8: 2 * n_group + n}.get(bits, 4 * n_group + n * bits // 8)
    assert _native.codec_row_bytes(bits, n, group_size) == expected
    assert ref.row_bytes(bits, n, group_size) == expected


def test_row_bytes_effective_bits() -> None:
    # Width 4, group 32: 4 bits per code plus 32 bits of f16 scale and minimum
    # per 32 elements gives 5 bits per element.
    assert _native.codec_row_bytes(4, 256, 32) * 8 / 256 == 5.0


@pytest.mark.parametrize("bits", ref.WIDTHS)
@pytest.mark.parametrize(("group_size", "n"), SHAPES)
@pytest.mark.parametrize("kind", list(INPUTS))
def test_encode_matches_reference(kind: str, group_size: int, n: int, bits: int) -> None:
    x = make_rows(kind, 6, n)
    widths = widths_of(bits, 6)
    expected = ref.encode(x, widths, group_size)
    actual = _native.codec_encode(x, widths, group_size, 1)
    assert np.array_equal(expected, actual), first_difference(expected, actual)


@pytest.mark.parametrize("bits", ref.WIDTHS)
@pytest.mark.parametrize(("group_size", "n"), SHAPES)
@pytest.mark.parametrize("kind", list(INPUTS))
def test_decode_matches_reference(kind: str, group_size: int, n: int, bits: int) -> None:
    x = make_rows(kind, 6, n)
    widths = widths_of(bits, 6)
    payload = _native.codec_encode(x, widths, group_size, 1)
    expected = ref.decode(payload, widths, n, group_size)
    actual = _native.codec_decode(payload, widths, n, group_size, 1)
    assert np.array_equal(float_bits(expected), float_bits(actual)), float_difference(expected, actual)


@pytest.mark.parametrize("bits", ref.WIDTHS)
def test_decode_arbitrary_bytes_matches_reference(bits: int) -> None:
    # Random bytes include NaN and infinite f16 scales and the int8 code -128,
    # which the encoder never writes.
    n, group_size, n_rows = 256, 32, 20
    widths = widths_of(bits, n_rows)
    size = n_rows * ref.row_bytes(bits, n, group_size)
    payload = np.random.default_rng(40 + bits).integers(0, 256, size=size, dtype=np.uint8)
    expected = ref.decode(payload, widths, n, group_size)
    actual = _native.codec_decode(payload, widths, n, group_size, 1)
    assert np.array_equal(float_bits(expected), float_bits(actual)), float_difference(expected, actual)


@pytest.mark.parametrize("bits", ref.WIDTHS)
def test_non_finite_input_matches_reference(bits: int) -> None:
    n, group_size = 64, 32
    x = make_rows("gaussian", 4, n)
    x[0, 3] = np.nan
    x[1, 40] = np.inf
    x[2, 5] = -np.inf
    x[3, 32:] = np.nan  # a group of NaN only
    widths = widths_of(bits, 4)
    expected = ref.encode(x, widths, group_size)
    actual = _native.codec_encode(x, widths, group_size, 1)
    assert np.array_equal(expected, actual), first_difference(expected, actual)


def test_width_16_round_trip_exact() -> None:
    rng = np.random.default_rng(16)
    halves = rng.integers(0, 1 << 16, size=(50, 256), dtype=np.uint16)
    halves[0, :4] = [0x7BFF, 0xFBFF, 0x0001, 0x8000]  # +-65504, smallest subnormal, -0
    # Exponent 31 encodes infinity and NaN, so those halves become 1.0.
    halves[(halves & 0x7C00) == 0x7C00] = 0x3C00
    x = halves.view(np.float16).astype(F32)
    widths = widths_of(16, 50)
    y = _native.codec_decode(_native.codec_encode(x, widths, 32), widths, 256, 32)
    assert np.array_equal(float_bits(x), float_bits(y)), float_difference(x, y)


@pytest.mark.parametrize("bits", ref.WIDTHS)
@pytest.mark.parametrize("kind", list(INPUTS))
def test_error_within_bound(kind: str, bits: int) -> None:
    n, group_size = 256, 32
    x = make_rows(kind, 8, n)
    widths = widths_of(bits, 8)
    y = _native.codec_decode(_native.codec_encode(x, widths, group_size), widths, n, group_size)
    error = np.abs(x.astype(np.float64) - y)
    excess = error - max_error_bound(x, bits, group_size)
    worst = int(np.argmax(excess))
    assert excess.reshape(-1)[worst] <= 0, (
        f"index {worst}: x {x.reshape(-1)[worst]!r}, decoded {y.reshape(-1)[worst]!r}, "
        f"error {error.reshape(-1)[worst]:.6g} exceeds the bound by {excess.reshape(-1)[worst]:.6g}"
    )


def test_mixed_widths_match_reference() -> None:
    n, group_size = 128, 32
    x, bits = make_mixed_rows(40, n)
    expected = ref.encode(x, bits, group_size)
    actual = _native.codec_encode(x, bits, group_size, 1)
    assert np.array_equal(expected, actual), first_difference(expected, actual)

    expected_y = ref.decode(actual, bits, n, group_size)
    actual_y = _native.codec_decode(actual, bits, n, group_size, 1)
    assert np.array_equal(float_bits(expected_y), float_bits(actual_y)), float_difference(expected_y, actual_y)


def test_mixed_widths_rows_are_contiguous() -> None:
    # Each row's bytes sit right after the previous row's, with no padding.
    n, group_size = 128, 32
    x, bits = make_mixed_rows(10, n)
    payload = _native.codec_encode(x, bits, group_size, 1)
    rows = [_native.codec_encode(x[r : r + 1], bits[r : r + 1], group_size, 1) for r in range(10)]
    joined = np.concatenate(rows)
    assert np.array_equal(payload, joined), first_difference(joined, payload)


@pytest.mark.parametrize("n_threads", [2, 4, 0])
def test_thread_count_invariance(n_threads: int) -> None:
    # 600 rows are enough for the native codec to split them among threads.
    n, group_size = 64, 32
    x, bits = make_mixed_rows(600, n)
    single = _native.codec_encode(x, bits, group_size, 1)
    threaded = _native.codec_encode(x, bits, group_size, n_threads)
    assert np.array_equal(single, threaded), first_difference(single, threaded)

    single_y = _native.codec_decode(single, bits, n, group_size, 1)
    threaded_y = _native.codec_decode(single, bits, n, group_size, n_threads)
    assert np.array_equal(float_bits(single_y), float_bits(threaded_y)), float_difference(single_y, threaded_y)


def test_row_bytes_invalid_width_raises() -> None:
    with pytest.raises(ValueError, match="width 5"):
        _native.codec_row_bytes(5, 64, 32)


def test_encode_invalid_width_raises() -> None:
    x = np.zeros((2, 64), dtype=F32)
    with pytest.raises(ValueError, match="width 5"):
        _native.codec_encode(x, np.array([4, 5], dtype=np.uint8), 32)


def test_decode_invalid_width_raises() -> None:
    payload = np.zeros(1000, dtype=np.uint8)
    with pytest.raises(ValueError, match="width 5"):
        _native.codec_decode(payload, np.array([5], dtype=np.uint8), 64, 32)


@pytest.mark.parametrize("delta", [-1, 1])
def test_decode_wrong_payload_size_raises(delta: int) -> None:
    bits = np.array([4, 8], dtype=np.uint8)
    size = ref.row_bytes(4, 64, 32) + ref.row_bytes(8, 64, 32)
    payload = np.zeros(size + delta, dtype=np.uint8)
    with pytest.raises(ValueError, match=f"{size + delta} bytes"):
        _native.codec_decode(payload, bits, 64, 32)


def test_encode_n_not_multiple_of_group_raises() -> None:
    x = np.zeros((2, 40), dtype=F32)
    with pytest.raises(ValueError, match="multiple of group_size"):
        _native.codec_encode(x, np.array([4, 4], dtype=np.uint8), 32)


def test_decode_n_not_multiple_of_group_raises() -> None:
    payload = np.zeros(100, dtype=np.uint8)
    with pytest.raises(ValueError, match="multiple of group_size"):
        _native.codec_decode(payload, np.array([4], dtype=np.uint8), 40, 32)


def test_group_size_not_multiple_of_8_raises() -> None:
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 8"):
        _native.codec_row_bytes(4, 48, 12)
