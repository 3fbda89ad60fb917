"""CacheCard: a self-contained, quantized copy of one sequence's KV cache.

The container is GGUF (little-endian, 32-byte aligned tensor data), written
with the `gguf` package and read by the bounds-checked `gguf_reader`;
`docs/cachecard.md` specifies every key and tensor. A card holds no llama.cpp cache type, V layout, n_ctx or seq_id, so
any context of the same model can import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import __version__, codec, signing
from .errors import CardChecksumError, CardFormatError, CardSignatureError
from .fingerprint import ModelFingerprint
from .gguf_reader import TENSOR_TYPE_NAMES, GGUFFormatError, read_gguf

logger = logging.getLogger(__name__)

# Version 2 adds the channel layout of keys (`cachecard.k_layout`). A card
# whose keys use the row layout is written as version 1, so older readers
# accept it. A channel-layout card is version 2, and they reject it by version.
CARD_FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
K_LAYOUTS = ("row", "channel")
MAX_K_BLOCK = 1 << 16
CARD_ARCHITECTURE = "cachecard"
CARD_SUFFIX = ".qkvc"

# Bounds checked before any array is used; no real card comes close.
MAX_TOKENS = 1 << 24
MAX_SECTIONS = 8
MAX_LAYERS = 4096
MAX_ROW_ELEMENTS = 1 << 20
MIN_GROUP_SIZE = 8
# Largest card file read by default: a lossless card of a 32K-token context of
# an 8B model (32 layers, 8 KV heads of 128) is about 4.3 GB.
MAX_CARD_BYTES = 8 << 30
MAX_GROUP_SIZE = 4096

_KEY = "cachecard."
# ggml tensor type ids of the card's tensors.
_I8 = 24
_I32 = 26


@dataclass
class CardLayer:
    """K and V rows of one layer of one section, encoded by the codec."""

    n_embd_k: int
    n_embd_v: int
    k_bits: np.ndarray  # (n_cells,) uint8 width per row
    k_codes: np.ndarray  # (bytes,) uint8, rows in position order
    v_bits: np.ndarray  # (n_cells,) uint8
    v_codes: np.ndarray  # (bytes,) uint8


@dataclass
class CardSection:
    """The cells one KV cache of the model keeps (iSWA models: full, then sliding-window)."""

    positions: np.ndarray  # (n_cells,) int32, strictly ascending
    layers: list[CardLayer]

    @property
    def n_cells(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class Provenance:
    """Provenance of a card: budget, controller, hop, parent card and producer."""

    budget_bits: float
    controller: str
    hop: int = 1
    parent_sha256: str = ""
    producer: str = f"qkvshare_edge {__version__}"


@dataclass
class CacheCard:
    """A quantized, self-contained KV cache of one sequence.

    `token_ids[i]` is the token at `positions[i]`; each section lists the
    positions its cache keeps, a subset of `positions`.
    """

    model: ModelFingerprint
    token_ids: np.ndarray  # (n_tokens,) int32
    positions: np.ndarray  # (n_tokens,) int32, strictly ascending
    sections: list[CardSection]
    group_size: int
    provenance: Provenance
    # Walsh-Hadamard chunk applied to rows below 16 bits before quantization (0: none).
    # In the channel layout it applies to V rows only.
    rotation_chunk: int = 0
    # "row": K rows like V rows; "channel": K per channel within blocks of k_block positions.
    k_layout: str = "row"
    k_block: int = 0
    # Context settings that change K (RoPE) and must match on import; 0 means the model's default.
    rope_freq_base: float = 0.0
    rope_freq_scale: float = 0.0
    # SHA-256 of the file bytes, set by save() and load().
    sha256: str = field(default="", compare=False)
    # "unsigned", "signed" (not checked: no key given) or "verified", set by load().
    signature_status: str = field(default="unsigned", compare=False)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def format_version(self) -> int:
        """The format version the card is written with: 1 for row-layout keys, 2 for channel-layout keys."""
        return 1 if self.k_layout == "row" else 2

    @property
    def payload_bytes(self) -> int:
        """Bytes of codes, scales and width tags, the quantity the budget bounds."""
        total = 0
        for section in self.sections:
            for layer in section.layers:
                total += layer.k_codes.nbytes + layer.v_codes.nbytes + layer.k_bits.nbytes + layer.v_bits.nbytes
        return total

    @property
    def n_elements(self) -> int:
        """K/V elements the card stores."""
        return sum(s.n_cells * (layer.n_embd_k + layer.n_embd_v) for s in self.sections for layer in s.layers)

    @property
    def bits_per_element(self) -> float:
        """Effective bits per K/V element, every payload byte counted."""
        return 8.0 * self.payload_bytes / max(1, self.n_elements)

    def width_histogram(self) -> dict[int, int]:
        """Return {width: number of rows} over all layers, K and V together."""
        counts: dict[int, int] = {}
        for section in self.sections:
            for layer in section.layers:
                for bits in (layer.k_bits, layer.v_bits):
                    values, n = np.unique(bits, return_counts=True)
                    for v, c in zip(values, n, strict=True):
                        counts[int(v)] = counts.get(int(v), 0) + int(c)
        return dict(sorted(counts.items()))

    def decode_layer(self, section: int, layer: int, n_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Decode one layer to float32 K (n_cells, n_embd_k) and V (n_cells, n_embd_v)."""
        item = self.sections[section].layers[layer]
        if self.k_layout == "channel":
            positions = self.sections[section].positions
            k = codec.decode_channel(item.k_codes, item.k_bits, positions, item.n_embd_k, self.k_block, n_threads)
        else:
            k = codec.decode(item.k_codes, item.k_bits, item.n_embd_k, self.group_size, n_threads, self.rotation_chunk)
        v = codec.decode(item.v_codes, item.v_bits, item.n_embd_v, self.group_size, n_threads, self.rotation_chunk)
        return k, v

    # -- writing -----------------------------------------------------------

    def to_bytes(self, key: bytes | None = None, key_id: str = "") -> bytes:
        """Serialize the card to GGUF bytes, signed with HMAC-SHA256 when `key` is given."""
        with tempfile.TemporaryDirectory(prefix="qkvcard-") as tmp:
            path = Path(tmp) / "card.qkvc"
            _write_gguf(self, path, key, key_id)
            data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        return data

    def save(self, path: str | os.PathLike[str], key: bytes | None = None, key_id: str = "") -> Path:
        """Write the card to `path` atomically (temporary file, fsync, rename).

        A crash during the write leaves any existing file at `path` as it was.
        With `key`, the card is signed (HMAC-SHA256; `key_id` is a label
        stored beside the signature). Returns the path written.
        """
        target = Path(path)
        directory = target.parent if str(target.parent) else Path(".")
        if not directory.is_dir():
            raise FileNotFoundError(f"directory {directory} does not exist; create it or choose another path")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _write_gguf(self, tmp, key, key_id)
            with tmp.open("rb+") as f:
                self.sha256 = hashlib.sha256(f.read()).hexdigest()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.debug("wrote card %s (%d bytes, sha256 %s)", target, target.stat().st_size, self.sha256[:16])
        return target

    # -- reading -----------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        key: bytes | None = None,
        require_signature: bool = False,
        max_bytes: int = MAX_CARD_BYTES,
    ) -> CacheCard:
        """Read and verify a card file.

        Args:
            path: the card file.
            key: shared HMAC key; when given, a signed card must verify with it.
            require_signature: reject unsigned cards (needs `key`).
            max_bytes: reject larger files before reading them.

        Raises:
            FileNotFoundError: when the file does not exist.
            CardFormatError: when the file is not a valid CacheCard of a supported version,
                is empty, or is larger than `max_bytes`.
            CardChecksumError: when a checksum does not match (the message names the tensor).
            CardSignatureError: when a signature is required but missing, or does not verify.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"card file {path} not found")
        size = path.stat().st_size
        if size == 0:
            raise CardFormatError(f"card file {path} is empty (0 bytes); export the card again")
        if size > max_bytes:
            raise CardFormatError(f"card file {path} has {size} bytes, more than the limit of {max_bytes}")
        data = path.read_bytes()
        card = _read_gguf(data, str(path), key, require_signature)
        card.sha256 = hashlib.sha256(data).hexdigest()
        return card

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        key: bytes | None = None,
        require_signature: bool = False,
        max_bytes: int = MAX_CARD_BYTES,
    ) -> CacheCard:
        """Parse and verify a card from bytes (for example an HTTP body). Arguments and errors as `load`."""
        if not data:
            raise CardFormatError("card is empty (0 bytes)")
        if len(data) > max_bytes:
            raise CardFormatError(f"card has {len(data)} bytes, more than the limit of {max_bytes}")
        card = _read_gguf(bytes(data), "card bytes", key, require_signature)
        card.sha256 = hashlib.sha256(data).hexdigest()
        return card


# -- GGUF mapping -------------------------------------------------------------


def _tensor_names(n_sections: int, n_layers: list[int]) -> list[str]:
    names = ["token_ids", "positions"]
    for s in range(n_sections):
        names.append(f"sec.{s}.positions")
        for j in range(n_layers[s]):
            names += [f"sec.{s}.blk.{j}.{part}" for part in ("k_bits", "k_codes", "v_bits", "v_codes")]
    return names


def _tensor_arrays(card: CacheCard) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "token_ids": np.ascontiguousarray(card.token_ids, dtype=np.int32),
        "positions": np.ascontiguousarray(card.positions, dtype=np.int32),
    }
    for s, section in enumerate(card.sections):
        arrays[f"sec.{s}.positions"] = np.ascontiguousarray(section.positions, dtype=np.int32)
        for j, layer in enumerate(section.layers):
            prefix = f"sec.{s}.blk.{j}."
            # GGUF has no unsigned 8-bit tensor type, so bytes are stored as I8.
            arrays[prefix + "k_bits"] = np.ascontiguousarray(layer.k_bits, dtype=np.uint8).view(np.int8)
            arrays[prefix + "k_codes"] = np.ascontiguousarray(layer.k_codes, dtype=np.uint8).view(np.int8)
            arrays[prefix + "v_bits"] = np.ascontiguousarray(layer.v_bits, dtype=np.uint8).view(np.int8)
            arrays[prefix + "v_codes"] = np.ascontiguousarray(layer.v_codes, dtype=np.uint8).view(np.int8)
    return arrays


def _header_values(card: CacheCard) -> dict[str, Any]:
    """The card's metadata keys in writing order, checksums excluded."""
    values: dict[str, Any] = {
        _KEY + "format_version": card.format_version,
        _KEY + "producer": card.provenance.producer,
        _KEY + "model.architecture": card.model.architecture,
        _KEY + "model.fingerprint": card.model.to_json(),
        _KEY + "model.id": card.model.model_id,
        _KEY + "context.rope_freq_base": float(card.rope_freq_base),
        _KEY + "context.rope_freq_scale": float(card.rope_freq_scale),
        _KEY + "n_tokens": card.n_tokens,
        _KEY + "group_size": int(card.group_size),
        _KEY + "rotation_chunk": int(card.rotation_chunk),
    }
    if card.format_version >= 2:
        values[_KEY + "k_layout"] = card.k_layout
        values[_KEY + "k_block"] = int(card.k_block)
    values[_KEY + "n_section"] = len(card.sections)
    for s, section in enumerate(card.sections):
        values[_KEY + f"section.{s}.n_layer"] = len(section.layers)
        values[_KEY + f"section.{s}.n_embd_k"] = [int(layer.n_embd_k) for layer in section.layers]
        values[_KEY + f"section.{s}.n_embd_v"] = [int(layer.n_embd_v) for layer in section.layers]
    values[_KEY + "budget_bits"] = float(card.provenance.budget_bits)
    values[_KEY + "bits_per_element"] = float(card.bits_per_element)
    values[_KEY + "controller"] = card.provenance.controller
    values[_KEY + "hop"] = int(card.provenance.hop)
    values[_KEY + "parent_sha256"] = card.provenance.parent_sha256
    return values


# Keys that the header digest does not cover: the digests themselves and the signature.
_UNHASHED_KEYS = frozenset(
    _KEY + k for k in ("header.sha256", "payload.sha256", "payload.crc32", "signature.hmac_sha256", "signature.key_id")
)


def _as_stored(value: Any) -> Any:
    """A header value as the file stores it (floats as float32)."""
    return float(np.float32(value)) if isinstance(value, float) else value


def _canonical(values: dict[str, Any]) -> bytes:
    """Canonical JSON of header values, floats rounded to float32 as stored."""
    rounded = {k: _as_stored(v) for k, v in values.items()}
    return json.dumps(rounded, sort_keys=True, separators=(",", ":")).encode()


def _write_gguf(card: CacheCard, path: Path, key: bytes | None = None, key_id: str = "") -> None:
    _validate(card, "card")
    arrays = _tensor_arrays(card)
    header = _header_values(card)

    payload = hashlib.sha256()
    crcs = []
    for array in arrays.values():
        raw = array.tobytes()
        payload.update(raw)
        crcs.append(zlib.crc32(raw))

    writer = gguf.GGUFWriter(path, CARD_ARCHITECTURE)
    writer.add_type(CARD_ARCHITECTURE)
    for name, value in header.items():
        if isinstance(value, bool):
            raise TypeError(f"{name}: booleans are not used in the card header")
        if name == _KEY + "n_tokens":
            writer.add_uint64(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        elif isinstance(value, str):
            # add_string() skips empty strings, and an empty parent digest is a valid value.
            writer.add_key_value(name, value, gguf.GGUFValueType.STRING)
        else:
            writer.add_key_value(name, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    header_sha256 = hashlib.sha256(_canonical(header)).hexdigest()
    writer.add_string(_KEY + "header.sha256", header_sha256)
    writer.add_string(_KEY + "payload.sha256", payload.hexdigest())
    if key is not None:
        writer.add_string(_KEY + "signature.hmac_sha256", signing.sign(key, header_sha256, payload.hexdigest()))
        writer.add_key_value(_KEY + "signature.key_id", key_id, gguf.GGUFValueType.STRING)
    writer.add_key_value(_KEY + "payload.crc32", crcs, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class _Fields:
    """Typed access to a GGUF reader's metadata with errors that name the key."""

    def __init__(self, metadata: dict[str, Any], source: str) -> None:
        self.metadata = metadata
        self.source = source

    def has(self, key: str) -> bool:
        return key in self.metadata

    def get(self, key: str, kind: type) -> Any:
        if key not in self.metadata:
            raise CardFormatError(f"{self.source}: missing metadata key {key}; the card is incomplete or not a card")
        value = self.metadata[key]
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
                raise CardFormatError(f"{self.source}: metadata key {key} must be an integer array")
            return value
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CardFormatError(
                f"{self.source}: metadata key {key} has type {type(value).__name__}, expected {kind.__name__}"
            )
        return value


def _bounded(source: str, key: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise CardFormatError(f"{source}: {key} = {value} is out of range [{low}, {high}]")
    return value


def _read_gguf(data: bytes, source: str, key: bytes | None = None, require_signature: bool = False) -> CacheCard:
    try:
        reader = read_gguf(data)
    except GGUFFormatError as exc:
        raise CardFormatError(f"{source} is not a readable GGUF file: {exc}") from exc

    fields = _Fields(reader.metadata, source)
    arch = fields.get("general.architecture", str)
    if arch != CARD_ARCHITECTURE:
        raise CardFormatError(
            f"{source} is a GGUF file of architecture {arch!r}, not a CacheCard ({CARD_ARCHITECTURE!r}); "
            "pass a card written by export_card or `qkvedge card export`"
        )
    version = fields.get(_KEY + "format_version", int)
    if version not in READ_VERSIONS:
        hint = (
            "upgrade qkvshare_edge to read it"
            if version > CARD_FORMAT_VERSION
            else "export the card again with this version"
        )
        raise CardFormatError(
            f"{source}: card format version {version} is not supported "
            f"(this qkvshare_edge reads versions {', '.join(map(str, READ_VERSIONS))}); {hint}"
        )
    k_layout, k_block = "row", 0
    if version >= 2:
        k_layout = fields.get(_KEY + "k_layout", str)
        if k_layout not in K_LAYOUTS:
            raise CardFormatError(f"{source}: unknown k_layout {k_layout!r}; expected one of {K_LAYOUTS}")
        k_block = _bounded(source, "k_block", fields.get(_KEY + "k_block", int), 1, MAX_K_BLOCK)

    n_tokens = _bounded(source, "n_tokens", fields.get(_KEY + "n_tokens", int), 1, MAX_TOKENS)
    group_size = _bounded(source, "group_size", fields.get(_KEY + "group_size", int), MIN_GROUP_SIZE, MAX_GROUP_SIZE)
    rotation_chunk = _bounded(
        source, "rotation_chunk", fields.get(_KEY + "rotation_chunk", int), 0, codec.MAX_ROTATION_CHUNK
    )
    n_section = _bounded(source, "n_section", fields.get(_KEY + "n_section", int), 1, MAX_SECTIONS)
    n_layers, n_embd_k, n_embd_v = [], [], []
    for s in range(n_section):
        n_layer = _bounded(
            source, f"section {s} n_layer", fields.get(_KEY + f"section.{s}.n_layer", int), 1, MAX_LAYERS
        )
        ks = fields.get(_KEY + f"section.{s}.n_embd_k", list)
        vs = fields.get(_KEY + f"section.{s}.n_embd_v", list)
        if len(ks) != n_layer or len(vs) != n_layer:
            raise CardFormatError(f"{source}: section {s} lists {len(ks)}/{len(vs)} row sizes for {n_layer} layers")
        for j, (k_n, v_n) in enumerate(zip(ks, vs, strict=True)):
            _bounded(source, f"section {s} layer {j} K row size", k_n, 1, MAX_ROW_ELEMENTS)
            _bounded(source, f"section {s} layer {j} V row size", v_n, 1, MAX_ROW_ELEMENTS)
        n_layers.append(n_layer)
        n_embd_k.append(ks)
        n_embd_v.append(vs)

    # Tensors: exactly the expected names, each with its checksum.
    expected = _tensor_names(n_section, n_layers)
    tensors = reader.tensors
    missing = [name for name in expected if name not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CardFormatError(
            f"{source}: tensor list does not match the header (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    data_end = max(t.offset + t.n_bytes for t in tensors.values())
    alignment = reader.metadata.get("general.alignment", 32)
    padded_end = -(-data_end // alignment) * alignment
    if len(data) != padded_end:
        raise CardFormatError(
            f"{source}: the file has {len(data)} bytes but its tensor data ends at {padded_end}; "
            "the card is truncated or has trailing bytes, transfer it again"
        )
    crcs = fields.get(_KEY + "payload.crc32", list)
    if len(crcs) != len(expected):
        raise CardFormatError(f"{source}: {len(crcs)} tensor checksums for {len(expected)} tensors")
    payload = hashlib.sha256()
    arrays: dict[str, np.ndarray] = {}
    for name, crc in zip(expected, crcs, strict=True):
        tensor = tensors[name]
        want = _I32 if name.endswith("positions") or name == "token_ids" else _I8
        if tensor.ggml_type != want:
            raise CardFormatError(
                f"{source}: tensor {name} has type {TENSOR_TYPE_NAMES.get(tensor.ggml_type, tensor.ggml_type)}, "
                f"expected {TENSOR_TYPE_NAMES[want]}"
            )
        if len(tensor.shape) != 1:
            raise CardFormatError(f"{source}: tensor {name} has shape {list(tensor.shape)}, expected one dimension")
        raw = reader.raw(name)
        if zlib.crc32(raw) != crc:
            raise CardChecksumError(
                f"{source}: checksum mismatch in tensor {name} ({_describe_tensor(name)}); "
                "the card is corrupt, export or transfer it again"
            )
        payload.update(raw)
        array = reader.array(name)
        arrays[name] = array.view(np.uint8) if want == _I8 else array
    if payload.hexdigest() != fields.get(_KEY + "payload.sha256", str):
        raise CardChecksumError(f"{source}: payload sha256 mismatch; the card is corrupt, export it again")

    try:
        fingerprint = ModelFingerprint.from_json(fields.get(_KEY + "model.fingerprint", str))
    except ValueError as exc:
        raise CardFormatError(f"{source}: invalid model fingerprint: {exc}") from exc

    sections = []
    for s in range(n_section):
        layers = []
        for j in range(n_layers[s]):
            prefix = f"sec.{s}.blk.{j}."
            layers.append(
                CardLayer(
                    n_embd_k=n_embd_k[s][j],
                    n_embd_v=n_embd_v[s][j],
                    k_bits=arrays[prefix + "k_bits"],
                    k_codes=arrays[prefix + "k_codes"],
                    v_bits=arrays[prefix + "v_bits"],
                    v_codes=arrays[prefix + "v_codes"],
                )
            )
        sections.append(CardSection(positions=arrays[f"sec.{s}.positions"], layers=layers))

    card = CacheCard(
        model=fingerprint,
        token_ids=arrays["token_ids"],
        positions=arrays["positions"],
        sections=sections,
        group_size=group_size,
        rotation_chunk=rotation_chunk,
        k_layout=k_layout,
        k_block=k_block,
        provenance=Provenance(
            budget_bits=fields.get(_KEY + "budget_bits", float),
            controller=fields.get(_KEY + "controller", str),
            hop=fields.get(_KEY + "hop", int),
            parent_sha256=fields.get(_KEY + "parent_sha256", str),
            producer=fields.get(_KEY + "producer", str),
        ),
        rope_freq_base=fields.get(_KEY + "context.rope_freq_base", float),
        rope_freq_scale=fields.get(_KEY + "context.rope_freq_scale", float),
    )
    if card.n_tokens != n_tokens:
        raise CardFormatError(f"{source}: token_ids contains {card.n_tokens} tokens, but the header says {n_tokens}")
    _validate(card, source)
    # The digest covers every stored cachecard.* key, as the writer stored it.
    stored = {k: v for k, v in reader.metadata.items() if k.startswith(_KEY) and k not in _UNHASHED_KEYS}
    header_sha256 = fields.get(_KEY + "header.sha256", str)
    if hashlib.sha256(_canonical(stored)).hexdigest() != header_sha256:
        raise CardChecksumError(f"{source}: header sha256 mismatch; the card's metadata is corrupt, export it again")
    if stored != {k: _as_stored(v) for k, v in _header_values(card).items()}:
        raise CardFormatError(f"{source}: header values disagree with the card's content (for example model.id)")
    card.signature_status = _check_signature(fields, source, key, require_signature, header_sha256, payload.hexdigest())
    return card


def _check_signature(
    fields: _Fields, source: str, key: bytes | None, required: bool, header_sha256: str, payload_sha256: str
) -> str:
    if required and key is None:
        raise CardSignatureError(f"{source}: a signed card is required but no key was given; pass the shared key")
    if not fields.has(_KEY + "signature.hmac_sha256"):
        if required:
            raise CardSignatureError(
                f"{source}: the card is not signed, and this receiver accepts signed cards only; "
                "export it with the shared key"
            )
        return "unsigned"
    signature = fields.get(_KEY + "signature.hmac_sha256", str)
    if key is None:
        return "signed"
    if not signing.verify(key, header_sha256, payload_sha256, signature):
        key_id = fields.get(_KEY + "signature.key_id", str)
        raise CardSignatureError(
            f"{source}: the card's HMAC signature (key id {key_id or '-'!r}) does not verify with the given key; "
            "it was signed with another key or changed after signing"
        )
    return "verified"


def _describe_tensor(name: str) -> str:
    parts = name.split(".")
    if name in ("token_ids", "positions"):
        return "the token list"
    if len(parts) == 3:
        return f"section {parts[1]} positions"
    return f"section {parts[1]}, layer {parts[3]}, {parts[4].replace('_', ' ')}"


def _validate(card: CacheCard, source: str) -> None:
    """Check the card's internal consistency; raise CardFormatError naming the first fault."""
    n = card.n_tokens
    if n > MAX_TOKENS:
        raise CardFormatError(f"{source}: {n} tokens, more than the limit of {MAX_TOKENS}")
    if card.positions.shape != (n,):
        raise CardFormatError(f"{source}: {card.positions.shape[0]} positions for {n} tokens")
    if n == 0:
        raise CardFormatError(f"{source}: the card contains no tokens")
    if np.any(card.token_ids < 0):
        raise CardFormatError(f"{source}: negative token id {int(card.token_ids.min())}")
    if np.any(card.positions < 0) or np.any(np.diff(card.positions) <= 0):
        raise CardFormatError(f"{source}: token positions must be non-negative and strictly ascending")
    if card.group_size % 8 != 0 or not MIN_GROUP_SIZE <= card.group_size <= MAX_GROUP_SIZE:
        raise CardFormatError(f"{source}: group_size {card.group_size} must be a multiple of 8 in [8, 4096]")
    chunk = card.rotation_chunk
    if chunk < 0 or chunk == 1 or chunk > codec.MAX_ROTATION_CHUNK or chunk & (chunk - 1):
        raise CardFormatError(f"{source}: rotation_chunk {chunk} must be 0 or a power of two in [2, 256]")
    channel = card.k_layout == "channel"
    if card.k_layout not in K_LAYOUTS:
        raise CardFormatError(f"{source}: unknown k_layout {card.k_layout!r}; expected one of {K_LAYOUTS}")
    if channel and not 1 <= card.k_block <= MAX_K_BLOCK:
        raise CardFormatError(f"{source}: k_block {card.k_block} must be in [1, {MAX_K_BLOCK}]")
    if not 1 <= len(card.sections) <= MAX_SECTIONS:
        raise CardFormatError(f"{source}: {len(card.sections)} sections, expected 1 to {MAX_SECTIONS}")
    for s, section in enumerate(card.sections):
        pos = section.positions
        if not 1 <= len(section.layers) <= MAX_LAYERS:
            raise CardFormatError(f"{source}: section {s} has {len(section.layers)} layers, expected 1 to {MAX_LAYERS}")
        if pos.ndim != 1 or pos.shape[0] == 0:
            raise CardFormatError(f"{source}: section {s} contains no cells")
        if np.any(np.diff(pos) <= 0):
            raise CardFormatError(f"{source}: section {s} positions must be strictly ascending")
        if not np.all(np.isin(pos, card.positions)):
            raise CardFormatError(f"{source}: section {s} contains a position that has no token")
        for j, layer in enumerate(section.layers):
            for part, n_embd, bits, codes in (
                ("K", layer.n_embd_k, layer.k_bits, layer.k_codes),
                ("V", layer.n_embd_v, layer.v_bits, layer.v_codes),
            ):
                where = f"{source}: section {s}, layer {j}, {part}"
                if not 1 <= n_embd <= MAX_ROW_ELEMENTS:
                    raise CardFormatError(f"{where}: row of {n_embd} elements, expected 1 to {MAX_ROW_ELEMENTS}")
                if n_embd % card.group_size != 0:
                    raise CardFormatError(f"{where}: row of {n_embd} elements is not a multiple of group_size")
                if chunk and n_embd % chunk != 0:
                    raise CardFormatError(f"{where}: row of {n_embd} elements is not a multiple of rotation_chunk")
                if bits.shape != pos.shape:
                    raise CardFormatError(f"{where}: {bits.shape[0]} widths for {pos.shape[0]} cells")
                table = codec.row_bytes_table(n_embd, card.group_size)
                invalid = np.setdiff1d(np.unique(bits), np.asarray(codec.WIDTHS))
                if invalid.size:
                    raise CardFormatError(f"{where}: invalid width {int(invalid[0])}; widths are {codec.WIDTHS}")
                if channel and part == "K":
                    if n_embd % 8 != 0:
                        raise CardFormatError(f"{where}: row of {n_embd} elements is not a multiple of 8")
                    expected = codec.channel_bytes(bits, pos, n_embd, card.k_block)
                else:
                    expected = sum(
                        table[int(w)] * int(c) for w, c in zip(*np.unique(bits, return_counts=True), strict=True)
                    )
                if codes.nbytes != expected:
                    raise CardFormatError(f"{where}: {codes.nbytes} code bytes, the widths need {expected}")
