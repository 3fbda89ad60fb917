"""Plain numpy implementation of the K/V codec in native/src/codec.cpp.

Tests compare the native codec with this module bit for bit, so every step
below is float32 arithmetic in the order the codec contract fixes. numpy's
float16 casts round to nearest with ties to even, like fp32_to_fp16.

Row layouts (n elements, G = group_size, n_group = n / G):
  width 16:      n f16 values.
  width 8:       n_group f16 scales, then n int8 codes; y = d * q.
  width 2, 3, 4: n_group f16 scales, n_group f16 minimums, then each group's
                 codes as an LSB-first bit stream; y = m + d * q.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

WIDTHS = (2, 3, 4, 8, 16)

F32 = np.float32


def check_width(bits: int) -> None:
    if bits not in WIDTHS:
        raise ValueError(f"invalid width {bits} bits (expected 2, 3, 4, 8 or 16)")


def check_shape(n: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 8 != 0:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}")
    if n <= 0 or n % group_size != 0:
        raise ValueError(f"n must be a positive multiple of group_size {group_size}, got {n}")


def row_bytes(bits: int, n: int, group_size: int) -> int:
    """Return the encoded size in bytes of one row of n elements."""
    check_width(bits)
    check_shape(n, group_size)
    n_group = n // group_size
    if bits == 16:
        return 2 * n
    if bits == 8:
        return 2 * n_group + n
    return 4 * n_group + n * bits // 8


def _round_clamped(v: npt.NDArray[np.float32], lo: int, hi: int) -> npt.NDArray[np.float32]:
    # Round half to even, then clamp. NaN becomes code 0, as in the native codec.
    q = np.clip(np.rint(v), lo, hi)
    return np.where(np.isnan(q), F32(0), q).astype(F32)


def _scale_and_inverse(d: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.float32]]:
    d16 = d.astype(np.float16)
    df = d16.astype(F32)
    inverse = np.where(df != 0, F32(1) / df, F32(0)).astype(F32)
    return d16, inverse


def _encode_q8(groups: npt.NDArray[np.float32]) -> bytes:
    # fmax skips NaN, so NaN elements do not set the scale.
    amax = np.fmax.reduce(np.abs(groups), axis=1, initial=F32(0))
    d16, inverse = _scale_and_inverse(amax / F32(127))
    q = _round_clamped(groups * inverse[:, None], -127, 127)
    return d16.astype("<f2").tobytes() + q.astype(np.int8).tobytes()


def _encode_asym(groups: npt.NDArray[np.float32], bits: int) -> bytes:
    levels = (1 << bits) - 1
    mn = np.fmin.reduce(groups, axis=1, initial=F32(np.inf))
    mx = np.fmax.reduce(groups, axis=1, initial=F32(-np.inf))
    d16, inverse = _scale_and_inverse((mx - mn) / F32(levels))
    m16 = mn.astype(np.float16)
    mf = m16.astype(F32)
    q = _round_clamped((groups - mf[:, None]) * inverse[:, None], 0, levels).astype(np.uint8)

    # Bit j of code i of the row lands at stream position i * bits + j. Every
    # group is a whole number of bytes, so one stream over the row equals the
    # groups' streams laid end to end.
    bit_values = (q.reshape(-1)[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    codes = np.packbits(bit_values.reshape(-1), bitorder="little")
    return d16.astype("<f2").tobytes() + m16.astype("<f2").tobytes() + codes.tobytes()


def encode_row(row: npt.NDArray[np.float32], bits: int, group_size: int) -> bytes:
    """Encode one float32 row at the given width."""
    check_width(bits)
    check_shape(row.shape[0], group_size)
    if bits == 16:
        return row.astype("<f2").tobytes()
    groups = row.reshape(-1, group_size)
    if bits == 8:
        return _encode_q8(groups)
    return _encode_asym(groups, bits)


def decode_row(data: bytes, bits: int, n: int, group_size: int) -> npt.NDArray[np.float32]:
    """Decode one row of n elements from exactly row_bytes(bits, n, group_size) bytes."""
    expected = row_bytes(bits, n, group_size)
    if len(data) != expected:
        raise ValueError(f"row has {len(data)} bytes, expected {expected}")
    n_group = n // group_size
    if bits == 16:
        return np.frombuffer(data, dtype="<f2").astype(F32)

    df = np.frombuffer(data, dtype="<f2", count=n_group).astype(F32)
    if bits == 8:
        q = np.frombuffer(data, dtype=np.int8, offset=2 * n_group).astype(F32)
        return (df[:, None] * q.reshape(n_group, group_size)).reshape(-1)

    mf = np.frombuffer(data, dtype="<f2", count=n_group, offset=2 * n_group).astype(F32)
    stream = np.frombuffer(data, dtype=np.uint8, offset=4 * n_group)
    bit_values = np.unpackbits(stream, bitorder="little").reshape(n, bits).astype(np.uint32)
    q = (bit_values << np.arange(bits, dtype=np.uint32)).sum(axis=1).astype(F32)
    # numpy rounds the product to float32 before the sum, like the native
    # codec built with -ffp-contract=off.
    scaled = df[:, None] * q.reshape(n_group, group_size)
    return (mf[:, None] + scaled).reshape(-1)


def encode(x: npt.NDArray[np.float32], bits: npt.ArrayLike, group_size: int) -> npt.NDArray[np.uint8]:
    """Encode the rows of x (n_rows, n) at per-row widths into one byte array."""
    x = np.asarray(x, dtype=F32)
    widths = [int(b) for b in np.asarray(bits, dtype=np.uint8)]
    if x.ndim != 2 or x.shape[0] != len(widths):
        raise ValueError(f"x must have shape (n_rows, n) with n_rows = {len(widths)}, got {x.shape}")
    for b in widths:
        check_width(b)
    check_shape(x.shape[1], group_size)
    with np.errstate(all="ignore"):
        parts = [encode_row(row, b, group_size) for row, b in zip(x, widths, strict=True)]
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def decode(payload: npt.NDArray[np.uint8], bits: npt.ArrayLike, n: int, group_size: int) -> npt.NDArray[np.float32]:
    """Decode a payload of rows at per-row widths into a float32 array (n_rows, n)."""
    data = np.asarray(payload, dtype=np.uint8).tobytes()
    widths = [int(b) for b in np.asarray(bits, dtype=np.uint8)]
    sizes = [row_bytes(b, n, group_size) for b in widths]
    if len(data) != sum(sizes):
        raise ValueError(f"payload has {len(data)} bytes, but the row widths need {sum(sizes)}")

    y = np.empty((len(widths), n), dtype=F32)
    offset = 0
    with np.errstate(all="ignore"):
        for r, (b, size) in enumerate(zip(widths, sizes, strict=True)):
            y[r] = decode_row(data[offset : offset + size], b, n, group_size)
            offset += size
    return y


# -- channel layout (keys) ----------------------------------------------------
# Rows are grouped into blocks of the positions p with the same p // block. A
# block with any row below 16 bits starts with n f16 channel minimums m and n
# f16 channel ranges r over those rows; each such row then holds n codes of
# its width b, LSB-first; y = m + (r / (2^b - 1)) * q. 16-bit rows are f16.


def _blocks(positions: npt.NDArray[np.int32], block: int) -> list[slice]:
    ids = np.asarray(positions, dtype=np.int64) // block
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1]))) if ids.size else np.array([], int)
    ends = np.concatenate((starts[1:], [ids.size]))
    return [slice(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def _pack(q: npt.NDArray[np.uint8], bits: int) -> bytes:
    bit_values = (q.reshape(-1)[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bit_values.reshape(-1), bitorder="little").tobytes()


def _steps(header: bytes, n: int, bits: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    mf = np.frombuffer(header, dtype="<f2", count=n).astype(F32)
    rf = np.frombuffer(header, dtype="<f2", count=n, offset=2 * n).astype(F32)
    return mf, (rf / F32((1 << bits) - 1)).astype(F32)


def channel_bytes(bits: npt.ArrayLike, positions: npt.ArrayLike, n: int, block: int) -> int:
    widths = np.asarray(bits, dtype=np.uint8)
    total = 0
    for s in _blocks(np.asarray(positions), block):
        w = widths[s]
        if np.any(w != 16):
            total += 4 * n  # the block header
        for b in w:
            total += 2 * n if b == 16 else n * int(b) // 8
    return total


def channel_encode(
    x: npt.NDArray[np.float32], bits: npt.ArrayLike, positions: npt.ArrayLike, block: int
) -> npt.NDArray[np.uint8]:
    """Encode the rows of x (n_rows, n) in the channel layout."""
    x = np.asarray(x, dtype=F32)
    widths = np.asarray(bits, dtype=np.uint8)
    n = x.shape[1]
    parts = []
    with np.errstate(all="ignore"):
        for s in _blocks(np.asarray(positions), block):
            rows, w = x[s], widths[s]
            quantized = w != 16
            if quantized.any():
                mn = np.fmin.reduce(rows[quantized], axis=0, initial=F32(np.inf))
                mx = np.fmax.reduce(rows[quantized], axis=0, initial=F32(-np.inf))
                m16 = mn.astype(np.float16)
                header = m16.astype("<f2").tobytes() + (mx - m16.astype(F32)).astype("<f2").tobytes()
                parts.append(header)
            for row, b in zip(rows, w, strict=True):
                if b == 16:
                    parts.append(row.astype("<f2").tobytes())
                    continue
                mf, d = _steps(header, n, int(b))
                inverse = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
                q = _round_clamped((row - mf) * inverse, 0, (1 << int(b)) - 1).astype(np.uint8)
                parts.append(_pack(q, int(b)))
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def channel_decode(
    payload: npt.NDArray[np.uint8], bits: npt.ArrayLike, positions: npt.ArrayLike, n: int, block: int
) -> npt.NDArray[np.float32]:
    """Decode a channel-layout payload into a float32 array (n_rows, n)."""
    data = np.asarray(payload, dtype=np.uint8).tobytes()
    widths = np.asarray(bits, dtype=np.uint8)
    if len(data) != channel_bytes(widths, positions, n, block):
        raise ValueError("payload size does not match the widths")
    y = np.empty((widths.shape[0], n), dtype=F32)
    offset = 0
    with np.errstate(all="ignore"):
        for s in _blocks(np.asarray(positions), block):
            w = widths[s]
            header = b""
            if np.any(w != 16):
                header = data[offset : offset + 4 * n]
                offset += 4 * n
            for r, b in zip(range(s.start, s.stop), w, strict=True):
                if b == 16:
                    y[r] = np.frombuffer(data, dtype="<f2", count=n, offset=offset).astype(F32)
                    offset += 2 * n
                    continue
                size = n * int(b) // 8
                stream = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset)
                offset += size
                bit_values = np.unpackbits(stream, bitorder="little").reshape(n, int(b)).astype(np.uint32)
                q = (bit_values << np.arange(int(b), dtype=np.uint32)).sum(axis=1).astype(F32)
                mf, d = _steps(header, n, int(b))
                y[r] = mf + d * q
    return y
