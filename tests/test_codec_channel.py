"""Tests of the channel layout of the native codec (keys quantized per channel within blocks of positions)."""

from __future__ import annotations

import codec_reference as ref
import numpy as np
import numpy.typing as npt
import pytest
from test_codec import INPUTS, first_difference, float_bits, float_difference, make_rows

from qkvshare_edge import _native, codec

F32 = np.float32

# (n_rows, n, block, positions kind): full blocks, a partial last block, positions with gaps
# (a sliding-window cache keeps a tail of the sequence), and one row per block.
CASES = [
    (64, 32, 16, "dense"),
    (100, 64, 32, "dense"),
    (90, 16, 128, "window"),
    (12, 8, 1, "dense"),
    (40, 256, 8, "gaps"),
]


def make_positions(kind: str, n_rows: int) -> npt.NDArray[np.int32]:
    if kind == "dense":
        return np.arange(n_rows, dtype=np.int32)
    if kind == "window":
        return np.arange(1000, 1000 + n_rows, dtype=np.int32)
    rng = np.random.default_rng(5)
    return np.cumsum(rng.integers(1, 6, size=n_rows)).astype(np.int32)


def mixed_widths(n_rows: int, seed: int) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([2, 3, 4, 8, 16], dtype=np.uint8), size=n_rows, p=[0.25, 0.25, 0.25, 0.15, 0.1])


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize(("n_rows", "n", "block", "where"), CASES)
def test_channel_matches_reference(kind: str, n_rows: int, n: int, block: int, where: str) -> None:
    x = make_rows(kind, n_rows, n)
    positions = make_positions(where, n_rows)
    bits = mixed_widths(n_rows, n)
    expected = ref.channel_encode(x, bits, positions, block)
    actual = _native.codec_channel_encode(x, bits, positions, block, 1)
    assert np.array_equal(expected, actual), first_difference(expected, actual)
    assert actual.size == _native.codec_channel_bytes(bits, positions, n, block)

    expected_y = ref.channel_decode(actual, bits, positions, n, block)
    actual_y = _native.codec_channel_decode(actual, bits, positions, n, block, 1)
    assert np.array_equal(float_bits(expected_y), float_bits(actual_y)), float_difference(expected_y, actual_y)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_decode_arbitrary_bytes_matches_reference(bits: int) -> None:
    n, block, n_rows = 32, 8, 20
    widths = np.full(n_rows, bits, dtype=np.uint8)
    positions = np.arange(n_rows, dtype=np.int32)
    size = _native.codec_channel_bytes(widths, positions, n, block)
    payload = np.random.default_rng(bits).integers(0, 256, size=size, dtype=np.uint8)
    expected = ref.channel_decode(payload, widths, positions, n, block)
    actual = _native.codec_channel_decode(payload, widths, positions, n, block, 1)
    assert np.array_equal(float_bits(expected), float_bits(actual)), float_difference(expected, actual)


def test_lossless_blocks_have_no_header() -> None:
    # A block whose rows are all 16 bits is stored as plain f16 rows.
    n, block = 64, 16
    x = make_rows("gaussian", 40, n)
    positions = np.arange(40, dtype=np.int32)
    bits = np.full(40, 16, dtype=np.uint8)
    payload = _native.codec_channel_encode(x, bits, positions, block, 1)
    assert np.array_equal(payload, _native.codec_encode(x, bits, 64, 1))
    assert np.array_equal(_native.codec_channel_decode(payload, bits, positions, n, block, 1), x.astype(np.float16))

    bits[17] = 4  # the second block now carries one header of 4 * n bytes
    assert _native.codec_channel_bytes(bits, positions, n, block) == 39 * 2 * n + n // 2 + 4 * n


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_within_half_step(bits: int) -> None:
    # Per channel and block the error is at most half a step of the channel's range, plus f16 rounding.
    n, block, n_rows = 64, 32, 96
    x = make_rows("outliers", n_rows, n)
    positions = np.arange(n_rows, dtype=np.int32)
    widths = np.full(n_rows, bits, dtype=np.uint8)
    y = _native.codec_channel_decode(
        _native.codec_channel_encode(x, widths, positions, block, 1), widths, positions, n, block, 1
    )
    for start in range(0, n_rows, block):
        rows = x[start : start + block].astype(np.float64)
        span = rows.max(axis=0) - rows.min(axis=0)
        bound = 0.5 * span / ((1 << bits) - 1) + 2e-3 * (np.abs(rows).max(axis=0) + span)
        error = np.abs(rows - y[start : start + block])
        assert np.all(error <= bound), f"block at {start}: worst excess {(error - bound).max():.4g}"


def test_per_channel_beats_per_row_on_outlier_channels() -> None:
    # Keys have a few channels far from the rest in every token. One range per
    # channel fits them, but one range per row group spends its levels on them.
    rng = np.random.default_rng(0)
    n, n_rows = 128, 128
    x = rng.standard_normal((n_rows, n)).astype(F32)
    x[:, :4] = x[:, :4] * F32(0.1) + F32(40)
    bits = np.full(n_rows, 3, dtype=np.uint8)
    positions = np.arange(n_rows, dtype=np.int32)
    by_channel = codec.decode_channel(codec.encode_channel(x, bits, positions, 128, 1), bits, positions, n, 128, 1)
    by_row = codec.decode(codec.encode(x, bits, 128, 1), bits, n, 128, 1)
    assert np.mean((by_channel - x) ** 2) < 0.25 * np.mean((by_row - x) ** 2)


@pytest.mark.parametrize("n_threads", [2, 4, 0])
def test_thread_count_invariance(n_threads: int) -> None:
    n, block, n_rows = 64, 16, 300
    x = make_rows("gaussian", n_rows, n)
    positions = np.arange(n_rows, dtype=np.int32)
    bits = mixed_widths(n_rows, 1)
    single = _native.codec_channel_encode(x, bits, positions, block, 1)
    threaded = _native.codec_channel_encode(x, bits, positions, block, n_threads)
    assert np.array_equal(single, threaded), first_difference(single, threaded)
    y1 = _native.codec_channel_decode(single, bits, positions, n, block, 1)
    y2 = _native.codec_channel_decode(single, bits, positions, n, block, n_threads)
    assert np.array_equal(float_bits(y1), float_bits(y2)), float_difference(y1, y2)


@pytest.mark.parametrize(
    ("positions", "bits", "n", "block", "message"),
    [
        ([0, 2, 1], [4, 4, 4], 8, 4, "strictly ascending"),
        ([0, 1, 1], [4, 4, 4], 8, 4, "strictly ascending"),
        ([-1, 0, 1], [4, 4, 4], 8, 4, "non-negative"),
        ([0, 1, 2], [4, 5, 4], 8, 4, "invalid width 5"),
        ([0, 1, 2], [4, 4, 4], 12, 4, "multiple of 8"),
        ([0, 1, 2], [4, 4, 4], 8, 0, "channel block"),
    ],
)
def test_invalid_arguments_raise(positions: list[int], bits: list[int], n: int, block: int, message: str) -> None:
    p = np.array(positions, dtype=np.int32)
    b = np.array(bits, dtype=np.uint8)
    x = np.zeros((3, n), dtype=F32)
    with pytest.raises(ValueError, match=message):
        _native.codec_channel_bytes(b, p, n, block)
    with pytest.raises(ValueError, match=message):
        _native.codec_channel_encode(x, b, p, block, 1)
    with pytest.raises(ValueError, match=message):
        _native.codec_channel_decode(np.zeros(64, dtype=np.uint8), b, p, n, block, 1)


@pytest.mark.parametrize("delta", [-1, 1])
def test_decode_wrong_payload_size_raises(delta: int) -> None:
    n, block = 32, 8
    bits = np.full(10, 3, dtype=np.uint8)
    positions = np.arange(10, dtype=np.int32)
    size = _native.codec_channel_bytes(bits, positions, n, block)
    with pytest.raises(ValueError, match=f"payload has {size + delta} bytes, but the row widths need {size}"):
        _native.codec_channel_decode(np.zeros(size + delta, dtype=np.uint8), bits, positions, n, block, 1)


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="one entry per row"):
        _native.codec_channel_encode(np.zeros((3, 8), F32), np.full(2, 4, np.uint8), np.arange(3, dtype=np.int32), 4)
