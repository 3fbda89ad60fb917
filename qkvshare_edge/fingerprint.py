"""Model fingerprint: what a card records about the model that made it.

A card may only be imported by the model that made it. Shapes alone do not
decide that (two fine-tunes share every shape), so the fingerprint holds the
architecture and every `<arch>.*` hyperparameter from the GGUF header, a
SHA-256 of the tokenizer, and a SHA-256 over samples of every weight tensor.
The header is scanned here directly, without loading the model.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gguf_reader import SCALAR_FORMATS

logger = logging.getLogger(__name__)

GGUF_MAGIC = 0x46554747  # "GGUF" little-endian
GGUF_DEFAULT_ALIGNMENT = 32

# Bytes hashed from the start, middle and end of each weight tensor.
WEIGHT_SAMPLE_BYTES = 4096

_GGUF_STRING = 8
_GGUF_ARRAY = 9

# Tokenizer keys that do not change how text maps to token ids.
_TOKENIZER_KEYS_IGNORED = ("tokenizer.chat_template",)


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of a model, as recorded in a card and checked on import."""

    architecture: str
    hparams: dict[str, Any] = field(hash=False)
    tokenizer_sha256: str
    weights_sha256: str

    @property
    def model_id(self) -> str:
        """SHA-256 over the whole fingerprint; equal ids mean the same model."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        """Return a canonical JSON encoding (sorted keys, no spaces)."""
        payload = {
            "architecture": self.architecture,
            "hparams": self.hparams,
            "tokenizer_sha256": self.tokenizer_sha256,
            "weights_sha256": self.weights_sha256,
        }
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelFingerprint:
        """Parse `to_json` output. Raises ValueError on missing or mistyped fields."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("model fingerprint must be a JSON object")
        architecture = data.get("architecture")
        hparams = data.get("hparams")
        tokenizer = data.get("tokenizer_sha256")
        weights = data.get("weights_sha256")
        if not isinstance(architecture, str) or not isinstance(hparams, dict):
            raise ValueError("model fingerprint needs a string 'architecture' and an object 'hparams'")
        if not isinstance(tokenizer, str) or not isinstance(weights, str):
            raise ValueError("model fingerprint needs 'tokenizer_sha256' and 'weights_sha256' strings")
        return cls(architecture, hparams, tokenizer, weights)

    def differences(self, other: ModelFingerprint) -> list[str]:
        """List each field where `other` differs, as 'field: got X, expected Y' (self is expected)."""
        diffs = []
        if other.architecture != self.architecture:
            diffs.append(f"architecture: got {other.architecture!r}, expected {self.architecture!r}")
        for key in sorted(set(self.hparams) | set(other.hparams)):
            mine = self.hparams.get(key)
            theirs = other.hparams.get(key)
            if mine != theirs:
                diffs.append(f"{key}: got {theirs!r}, expected {mine!r}")
        if other.tokenizer_sha256 != self.tokenizer_sha256:
            diffs.append(
                f"tokenizer sha256: got {other.tokenizer_sha256[:16]}..., expected {self.tokenizer_sha256[:16]}..."
            )
        if other.weights_sha256 != self.weights_sha256:
            diffs.append(f"weights sha256: got {other.weights_sha256[:16]}..., expected {self.weights_sha256[:16]}...")
        return diffs

    def hparam_int(self, suffix: str, default: int = 0) -> int:
        """Return the integer hyperparameter `<arch>.<suffix>`, or `default` when absent or not an integer."""
        value = self.hparams.get(f"{self.architecture}.{suffix}", default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default


class _HeaderScanner:
    """Bounds-checked reader over the GGUF header bytes."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data = data
        self.offset = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.offset + n > len(self.data):
            raise ValueError(f"{self.path}: GGUF header truncated at byte {self.offset} (needs {n} more)")
        view = self.data[self.offset : self.offset + n]
        self.offset += n
        return view

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return bytes(self.take(self.unpack("<Q")))

    def value(self, value_type: int) -> Any:
        """Read one value; arrays of strings are returned as a count, not decoded."""
        if value_type in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[value_type])
        if value_type == _GGUF_STRING:
            return self.string().decode("utf-8", errors="replace")
        if value_type == _GGUF_ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            if item_type in SCALAR_FORMATS:
                fmt = SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt)
                raw = self.take(count * size)
                if count <= 4096:
                    return [v[0] for v in struct.iter_unpack(fmt, raw)]
                return {"array_len": count}
            if item_type == _GGUF_STRING:
                for _ in range(count):
                    self.take(self.unpack("<Q"))
                return {"array_len": count}
            raise ValueError(f"{self.path}: unsupported GGUF array item type {item_type}")
        raise ValueError(f"{self.path}: unsupported GGUF value type {value_type}")


_CACHE: dict[tuple[str, int, int], ModelFingerprint] = {}


def fingerprint_model(model_path: str | os.PathLike[str]) -> ModelFingerprint:
    """Compute the fingerprint of a GGUF model file (cached per path, size and mtime).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is not a GGUF model this scanner can read.
    """
    path = Path(model_path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    fingerprint = _scan(path, stat.st_size)
    _CACHE[key] = fingerprint
    logger.debug("fingerprint of %s: model id %s", path, fingerprint.model_id[:16])
    return fingerprint


def _scan(path: Path, file_size: int) -> ModelFingerprint:
    with path.open("rb") as f:
        # The header of the largest vocabularies in use fits well within 64 MiB.
        head = memoryview(f.read(min(file_size, 64 << 20)))
        scanner = _HeaderScanner(head, path)
        if scanner.unpack("<I") != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        version = scanner.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
        n_tensors = scanner.unpack("<Q")
        n_kv = scanner.unpack("<Q")

        metadata: dict[str, Any] = {}
        tokenizer = hashlib.sha256()
        for _ in range(n_kv):
            key = scanner.string().decode("utf-8", errors="replace")
            value_type = scanner.unpack("<I")
            start = scanner.offset
            metadata[key] = scanner.value(value_type)
            if key.startswith("tokenizer.") and key not in _TOKENIZER_KEYS_IGNORED:
                tokenizer.update(key.encode() + struct.pack("<I", value_type) + head[start : scanner.offset])

        architecture = metadata.get("general.architecture")
        if not isinstance(architecture, str):
            raise ValueError(f"{path}: GGUF metadata has no general.architecture")
        alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)

        tensors = []
        for _ in range(n_tensors):
            name = scanner.string()
            n_dims = scanner.unpack("<I")
            dims = [scanner.unpack("<Q") for _ in range(n_dims)]
            ggml_type = scanner.unpack("<I")
            offset = scanner.unpack("<Q")
            tensors.append((name, dims, ggml_type, offset))
        data_start = (scanner.offset + alignment - 1) // alignment * alignment

        # Weights: every tensor's name, shape and type, and three samples of its
        # data. A tensor's size is bounded by the next tensor's offset.
        weights = hashlib.sha256()
        offsets = sorted({t[3] for t in tensors} | {file_size - data_start})
        for name, dims, ggml_type, offset in tensors:
            weights.update(name + struct.pack(f"<I{len(dims)}QI", len(dims), *dims, ggml_type))
            following = bisect.bisect_right(offsets, offset)
            size = offsets[following] - offset if following < len(offsets) else 0
            for at in sorted({0, max(0, size // 2 - WEIGHT_SAMPLE_BYTES // 2), max(0, size - WEIGHT_SAMPLE_BYTES)}):
                f.seek(data_start + offset + at)
                weights.update(f.read(min(WEIGHT_SAMPLE_BYTES, size - at)))

    prefix = architecture + "."
    hparams = {k: v for k, v in metadata.items() if k.startswith(prefix)}
    return ModelFingerprint(architecture, hparams, tokenizer.hexdigest(), weights.hexdigest())
