"""A bounds-checked GGUF reader for untrusted files (cards from peers).

The `gguf` package's reader trusts the counts in a file: a forged array
length or tensor count makes it allocate gigabytes before it notices the
file is short. This reader checks every count against the bytes that
remain before using it, rejects overlapping or misaligned tensor data, and
returns tensors as read-only numpy views of the input bytes.

Only what cards use is supported: GGUF version 3, little-endian, scalar,
string and one-level array metadata, and tensors of types F32, F16, I8,
I16, I32, I64 and F64.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

# Bounds on header counts; cards stay far below them.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_DIMS = 4

# GGUF metadata value types (GGUF spec) with their struct formats.
SCALAR_FORMATS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING = 8
_ARRAY = 9

# ggml tensor types this reader returns, with their numpy dtypes.
TENSOR_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f2"),
    24: np.dtype("i1"),
    25: np.dtype("<i2"),
    26: np.dtype("<i4"),
    27: np.dtype("<i8"),
    28: np.dtype("<f8"),
}
TENSOR_TYPE_NAMES: dict[int, str] = {0: "F32", 1: "F16", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file of the supported kind."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data is, and its shape and type."""

    name: str
    shape: tuple[int, ...]  # GGUF order: ne[0] first
    ggml_type: int
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """Parsed GGUF header plus read-only access to tensor data."""

    def __init__(self, data: bytes, metadata: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
        self._data = data
        self.metadata = metadata
        self.tensors = tensors

    def array(self, name: str) -> np.ndarray:
        """Return a tensor's data as a flat read-only numpy view."""
        info = self.tensors[name]
        dtype = TENSOR_DTYPES[info.ggml_type]
        return np.frombuffer(self._data, dtype=dtype, count=info.n_bytes // dtype.itemsize, offset=info.offset)

    def raw(self, name: str) -> memoryview:
        """Return a tensor's bytes."""
        info = self.tensors[name]
        return memoryview(self._data)[info.offset : info.offset + info.n_bytes]


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > len(self.data) - self.offset:
            raise GGUFFormatError(
                f"truncated GGUF: {what} needs {n} bytes at offset {self.offset}, {len(self.data) - self.offset} remain"
            )
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("<Q", what + " length")
        if limit is not None and n > limit:
            raise GGUFFormatError(f"{what} of {n} bytes exceeds the limit of {limit}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"{what} at offset {self.offset - n} is not valid UTF-8") from exc

    def value(self, value_type: int, key: str) -> Any:
        if value_type in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[value_type], key)
        if value_type == _STRING:
            return self.string(f"value of {key}")
        if value_type == _ARRAY:
            item_type = self.unpack("<I", f"array type of {key}")
            count = self.unpack("<Q", f"array length of {key}")
            if item_type in SCALAR_FORMATS:
                fmt = SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt)
                raw = self.take(count * size, f"array {key}")
                return [v[0] for v in struct.iter_unpack(fmt, raw)]
            if item_type == _STRING:
                # Each string needs at least its 8-byte length.
                if count > (len(self.data) - self.offset) // 8:
                    raise GGUFFormatError(f"array {key} claims {count} strings, more than the file can hold")
                return [self.string(f"item of {key}") for _ in range(count)]
            raise GGUFFormatError(f"array {key} has unsupported item type {item_type}")
        raise GGUFFormatError(f"key {key} has unknown value type {value_type}")


def read_gguf(data: bytes) -> GGUFFile:
    """Parse GGUF bytes, checking every count, offset and size.

    Raises:
        GGUFFormatError: on any malformed, truncated, overlapping or unsupported content.
    """
    cursor = _Cursor(data)
    if cursor.take(4, "magic") != GGUF_MAGIC:
        raise GGUFFormatError("not a GGUF file (the first 4 bytes are not 'GGUF')")
    version = cursor.unpack("<I", "version")
    if version != GGUF_VERSION:
        raise GGUFFormatError(f"GGUF version {version} is not supported (expected {GGUF_VERSION})")
    n_tensors = cursor.unpack("<Q", "tensor count")
    n_kv = cursor.unpack("<Q", "metadata count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GGUFFormatError(f"GGUF header claims {n_tensors} tensors and {n_kv} keys, above the limits")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string("metadata key", MAX_KEY_BYTES)
        if key in metadata:
            raise GGUFFormatError(f"duplicate metadata key {key}")
        metadata[key] = cursor.value(cursor.unpack("<I", f"type of {key}"), key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 16:
        raise GGUFFormatError(f"invalid general.alignment {alignment!r} (expected a power of two)")

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cursor.string("tensor name", 1 << 10)
        n_dims = cursor.unpack("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions (expected 1..{MAX_DIMS})")
        shape = tuple(cursor.unpack("<Q", f"shape of {name}") for _ in range(n_dims))
        ggml_type = cursor.unpack("<I", f"type of {name}")
        offset = cursor.unpack("<Q", f"offset of {name}")
        infos.append((name, shape, ggml_type, offset))

    data_start = -(-cursor.offset // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            raise GGUFFormatError(f"duplicate tensor name {name}")
        if ggml_type not in TENSOR_DTYPES:
            raise GGUFFormatError(f"tensor {name} has unsupported type {ggml_type}")
        if offset % alignment:
            raise GGUFFormatError(f"tensor {name} data offset {offset} is not aligned to {alignment}")
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        n_bytes = n_elements * TENSOR_DTYPES[ggml_type].itemsize
        start = data_start + offset
        if start + n_bytes > len(data):
            raise GGUFFormatError(f"tensor {name} needs bytes {start}..{start + n_bytes}, but the file has {len(data)}")
        tensors[name] = TensorInfo(name, shape, ggml_type, start, n_bytes)

    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for first, second in itertools.pairwise(ordered):
        if first.offset + first.n_bytes > second.offset:
            raise GGUFFormatError(f"tensors {first.name} and {second.name} overlap")
    return GGUFFile(data, metadata, tensors)
