"""Token-level mixed-precision codec for K/V rows (Python front of the native code).

A row is one token's keys or values for one layer. Each row is stored at its
own width: 16 (f16 passthrough), 8 (symmetric int8, one f16 scale per
group), or 4, 3, 2 (asymmetric, one f16 scale and one f16 minimum per group).
`docs/cachecard.md` gives the byte layout and the rounding rules.
"""

from __future__ import annotations

import numpy as np

from . import _native

WIDTHS: tuple[int, ...] = (2, 3, 4, 8, 16)
LOSSLESS_WIDTH = 16
DEFAULT_GROUP_SIZE = 32


def row_bytes(bits: int, n: int, group_size: int) -> int:
    """Return the bytes of one encoded row of `n` elements at width `bits`."""
    return int(_native.codec_row_bytes(int(bits), int(n), int(group_size)))


def row_bytes_table(n: int, group_size: int) -> dict[int, int]:
    """Return {width: bytes of one encoded row} for every width."""
    return {bits: row_bytes(bits, n, group_size) for bits in WIDTHS}


def encode(x: np.ndarray, bits: np.ndarray, group_size: int, n_threads: int = 0) -> np.ndarray:
    """Encode rows at per-row widths.

    Args:
        x: (n_rows, n) float32 rows.
        bits: (n_rows,) uint8 width of each row, each one of `WIDTHS`.
        group_size: elements per scale group; must divide n and be a multiple of 8.
        n_threads: worker threads, 0 for one per core.

    Returns:
        The rows' bytes, concatenated in row order, as a 1-D uint8 array.

    Raises:
        ValueError: on an invalid width, group size or shape.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    return _native.codec_encode(x, bits, int(group_size), int(n_threads))


def decode(payload: np.ndarray, bits: np.ndarray, n: int, group_size: int, n_threads: int = 0) -> np.ndarray:
    """Decode rows encoded by `encode` into a (n_rows, n) float32 array.

    Raises:
        ValueError: when the payload size does not match the widths, or a width is invalid.
    """
    payload = np.ascontiguousarray(payload, dtype=np.uint8)
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    return _native.codec_decode(payload, bits, int(n), int(group_size), int(n_threads))
