"""Pin the CacheCard v1 byte format (docs/cachecard.md) and the reader's rejections.

The golden file tests/data/cachecard_v1_golden.qkvc is the card that
`_golden_card()` builds. When the bytes change on purpose, update
docs/cachecard.md (and CARD_FORMAT_VERSION when a version 1 reader cannot read
the new bytes), then rewrite the file with

    PYTHONPATH=. python tests/test_card_format.py --regenerate

`_spec_parts` and `_assemble` write a card with gguf.GGUFWriter from the
rules in docs/cachecard.md alone. The negative tests use them to build files
with one fault each and valid checksums, so the intended check is the one
that fires.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import pytest

from qkvshare_edge import codec
from qkvshare_edge.card import CacheCard, CardLayer, CardSection, Provenance
from qkvshare_edge.errors import CardChecksumError, CardFormatError
from qkvshare_edge.fingerprint import ModelFingerprint

GOLDEN = Path(__file__).parent / "data" / "cachecard_v1_golden.qkvc"
GOLDEN_V2 = Path(__file__).parent / "data" / "cachecard_v2_golden.qkvc"
K_BLOCK = 4
GROUP_SIZE = 16
ROTATION_CHUNK = 16
KEY = "cachecard."
CHECKSUM_KEYS = (KEY + "header.sha256", KEY + "payload.sha256", KEY + "payload.crc32")

ValueType = gguf.GGUFValueType


# -- the golden card ----------------------------------------------------------


def _rows(n_rows: int, n: int, seed: int) -> np.ndarray:
    """Return deterministic float32 rows of multiples of 1/16 in [-3, 3], computed exactly and exact in f16."""
    i = np.arange(n_rows * n, dtype=np.int64)
    return (((i * 37 + seed * 11) % 97 - 48) / 16).astype(np.float32).reshape(n_rows, n)


def _layer(n_embd_k: int, n_embd_v: int, k_bits: list[int], v_bits: list[int], seed: int) -> CardLayer:
    k_widths = np.array(k_bits, dtype=np.uint8)
    v_widths = np.array(v_bits, dtype=np.uint8)
    k = _rows(len(k_bits), n_embd_k, seed)
    v = _rows(len(v_bits), n_embd_v, seed + 1)
    return CardLayer(
        n_embd_k=n_embd_k,
        n_embd_v=n_embd_v,
        k_bits=k_widths,
        k_codes=codec.encode(k, k_widths, GROUP_SIZE, 1, ROTATION_CHUNK),
        v_bits=v_widths,
        v_codes=codec.encode(v, v_widths, GROUP_SIZE, 1, ROTATION_CHUNK),
    )


def _golden_fingerprint() -> ModelFingerprint:
    hparams = {
        "tinyarch.block_count": 3,
        "tinyarch.attention.sliding_window": 3,
        "tinyarch.attention.sliding_window_pattern": [1, 1, 0],
        "tinyarch.rope.freq_base": 10000.0,
        "tinyarch.rope.scaling.type": "linear",
    }
    return ModelFingerprint("tinyarch", hparams, "ab" * 32, "cd" * 32)


def _golden_card() -> CacheCard:
    """Build a card of six tokens.

    Section 0 (full cache) keeps all of them, section 1 (sliding window) the last three.
    """
    full = CardSection(
        positions=np.arange(6, dtype=np.int32),
        layers=[
            _layer(32, 32, [16, 8, 4, 3, 2, 4], [2, 3, 4, 8, 16, 8], seed=1),
            _layer(32, 16, [8, 8, 4, 4, 3, 16], [4, 3, 2, 2, 8, 16], seed=3),
        ],
    )
    sliding = CardSection(
        positions=np.array([3, 4, 5], dtype=np.int32),
        layers=[_layer(48, 16, [3, 16, 2], [8, 4, 4], seed=5)],
    )
    return CacheCard(
        model=_golden_fingerprint(),
        token_ids=np.array([2, 105, 7, 19, 42, 1], dtype=np.int32),
        positions=np.arange(6, dtype=np.int32),
        sections=[full, sliding],
        group_size=GROUP_SIZE,
        rotation_chunk=ROTATION_CHUNK,
        provenance=Provenance(
            budget_bits=4.0,
            controller="sink-recent",
            hop=2,
            parent_sha256="ef" * 32,
            producer="qkvshare_edge golden",
        ),
        rope_freq_base=10000.0,
        rope_freq_scale=0.5,
    )


def _golden_card_v2() -> CacheCard:
    """The golden card with its keys in the channel layout, blocks of K_BLOCK positions (format version 2)."""
    card = _golden_card()
    card.k_layout, card.k_block = "channel", K_BLOCK
    for s, section in enumerate(card.sections):
        for j, layer in enumerate(section.layers):
            k = _rows(section.n_cells, layer.n_embd_k, seed=1 + 2 * j + 4 * s)
            layer.k_codes = codec.encode_channel(k, layer.k_bits, section.positions, K_BLOCK, 1)
    return card


def _regenerate() -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    for path, card in ((GOLDEN, _golden_card()), (GOLDEN_V2, _golden_card_v2())):
        data = card.to_bytes()
        path.write_bytes(data)
        print(f"wrote {path} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")


# -- a writer built from docs/cachecard.md ------------------------------------


class Value(NamedTuple):
    """One metadata value: GGUF type, Python value, and the item type of an array."""

    type: gguf.GGUFValueType
    value: Any
    sub_type: gguf.GGUFValueType | None = None


# None as a value drops the key from the file.
Metadata = dict[str, Value | None]


def _fingerprint_json(model: ModelFingerprint) -> str:
    fields = {
        "architecture": model.architecture,
        "hparams": model.hparams,
        "tokenizer_sha256": model.tokenizer_sha256,
        "weights_sha256": model.weights_sha256,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def _spec_parts(card: CacheCard) -> tuple[Metadata, dict[str, np.ndarray]]:
    """Return the cachecard.* metadata (checksums excluded) and the tensors, in file order."""
    arrays: dict[str, np.ndarray] = {
        "token_ids": card.token_ids.astype(np.int32),
        "positions": card.positions.astype(np.int32),
    }
    n_elements = 0
    payload_bytes = 0
    for s, section in enumerate(card.sections):
        arrays[f"sec.{s}.positions"] = section.positions.astype(np.int32)
        for j, layer in enumerate(section.layers):
            for part in ("k_bits", "k_codes", "v_bits", "v_codes"):
                array = getattr(layer, part).astype(np.uint8)
                arrays[f"sec.{s}.blk.{j}.{part}"] = array.view(np.int8)
                payload_bytes += array.nbytes
            n_elements += section.n_cells * (layer.n_embd_k + layer.n_embd_v)

    fingerprint = _fingerprint_json(card.model)
    kv: Metadata = {
        KEY + "format_version": Value(ValueType.UINT32, 1 if card.k_layout == "row" else 2),
        KEY + "producer": Value(ValueType.STRING, card.provenance.producer),
        KEY + "model.architecture": Value(ValueType.STRING, card.model.architecture),
        KEY + "model.fingerprint": Value(ValueType.STRING, fingerprint),
        KEY + "model.id": Value(ValueType.STRING, hashlib.sha256(fingerprint.encode()).hexdigest()),
        KEY + "context.rope_freq_base": Value(ValueType.FLOAT32, card.rope_freq_base),
        KEY + "context.rope_freq_scale": Value(ValueType.FLOAT32, card.rope_freq_scale),
        KEY + "n_tokens": Value(ValueType.UINT64, card.n_tokens),
        KEY + "group_size": Value(ValueType.UINT32, card.group_size),
        KEY + "rotation_chunk": Value(ValueType.UINT32, card.rotation_chunk),
    }
    if card.k_layout != "row":
        kv[KEY + "k_layout"] = Value(ValueType.STRING, card.k_layout)
        kv[KEY + "k_block"] = Value(ValueType.UINT32, card.k_block)
    kv[KEY + "n_section"] = Value(ValueType.UINT32, len(card.sections))
    for s, section in enumerate(card.sections):
        kv[KEY + f"section.{s}.n_layer"] = Value(ValueType.UINT32, len(section.layers))
        n_embd_k = [layer.n_embd_k for layer in section.layers]
        n_embd_v = [layer.n_embd_v for layer in section.layers]
        kv[KEY + f"section.{s}.n_embd_k"] = Value(ValueType.ARRAY, n_embd_k, ValueType.UINT32)
        kv[KEY + f"section.{s}.n_embd_v"] = Value(ValueType.ARRAY, n_embd_v, ValueType.UINT32)
    kv[KEY + "budget_bits"] = Value(ValueType.FLOAT32, card.provenance.budget_bits)
    kv[KEY + "bits_per_element"] = Value(ValueType.FLOAT32, 8.0 * payload_bytes / n_elements)
    kv[KEY + "controller"] = Value(ValueType.STRING, card.provenance.controller)
    kv[KEY + "hop"] = Value(ValueType.UINT32, card.provenance.hop)
    kv[KEY + "parent_sha256"] = Value(ValueType.STRING, card.provenance.parent_sha256)
    return kv, arrays


def _canonical_header(kv: Metadata) -> bytes:
    """Return the canonical JSON of the cachecard.* header keys: sorted, no spaces, FLOAT32 values widened from f32."""
    values = {}
    for key, item in kv.items():
        if item is None or key in CHECKSUM_KEYS or not key.startswith(KEY):
            continue
        values[key] = float(np.float32(item.value)) if item.type == ValueType.FLOAT32 else item.value
    return json.dumps(values, sort_keys=True, separators=(",", ":")).encode()


def _assemble(kv: Metadata, arrays: dict[str, np.ndarray]) -> bytes:
    """Write a card and return its bytes.

    Checksum keys present in `kv` replace the computed ones, and a None value drops one.
    """
    raw = [array.tobytes() for array in arrays.values()]
    computed = {
        KEY + "header.sha256": Value(ValueType.STRING, hashlib.sha256(_canonical_header(kv)).hexdigest()),
        KEY + "payload.sha256": Value(ValueType.STRING, hashlib.sha256(b"".join(raw)).hexdigest()),
        KEY + "payload.crc32": Value(ValueType.ARRAY, [zlib.crc32(r) for r in raw], ValueType.UINT32),
    }
    metadata = {key: item for key, item in kv.items() if key not in CHECKSUM_KEYS}
    for key in CHECKSUM_KEYS:
        metadata[key] = kv.get(key, computed[key])

    with tempfile.TemporaryDirectory(prefix="qkvcard-test-") as tmp:
        path = Path(tmp) / "card.qkvc"
        writer = gguf.GGUFWriter(path, "cachecard")
        writer.add_type("cachecard")
        for key, item in metadata.items():
            if item is not None:
                writer.add_key_value(key, item.value, item.type, sub_type=item.sub_type)
        for name, array in arrays.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


# A change to the golden card's metadata or tensors before _assemble().
Edit = Callable[[Metadata, dict[str, np.ndarray]], None]


def _build(*edits: Edit, card: CacheCard | None = None) -> bytes:
    kv, arrays = _spec_parts(card if card is not None else _golden_card())
    for edit in edits:
        edit(kv, arrays)
    return _assemble(kv, arrays)


def set_key(key: str, value: Any, vtype: gguf.GGUFValueType = ValueType.UINT32, sub_type: Any = None) -> Edit:
    def edit(kv: Metadata, arrays: dict[str, np.ndarray]) -> None:
        kv[KEY + key] = Value(vtype, value, sub_type)

    return edit


def drop_key(key: str) -> Edit:
    def edit(kv: Metadata, arrays: dict[str, np.ndarray]) -> None:
        kv[KEY + key] = None

    return edit


def set_tensor(name: str, values: list[int] | np.ndarray, dtype: type = np.int8) -> Edit:
    def edit(kv: Metadata, arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = np.asarray(values, dtype=dtype)

    return edit


def trim_tensor(name: str) -> Edit:
    def edit(kv: Metadata, arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = arrays[name][:-1]

    return edit


def drop_tensor(name: str) -> Edit:
    def edit(kv: Metadata, arrays: dict[str, np.ndarray]) -> None:
        del arrays[name]

    return edit


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


# -- golden file ----------------------------------------------------------------


def test_golden_bytes_unchanged() -> None:
    golden = GOLDEN.read_bytes()
    data = _golden_card().to_bytes()
    if data != golden:
        offset = _first_difference(data, golden)
        pytest.fail(
            f"CacheCard bytes differ from {GOLDEN.name} at byte offset {offset} "
            f"(new file {len(data)} bytes, golden {len(golden)} bytes). If the format change is intended, "
            "update docs/cachecard.md (and CARD_FORMAT_VERSION when version 1 readers cannot read the new "
            "bytes), then run: PYTHONPATH=. python tests/test_card_format.py --regenerate"
        )


def test_spec_writer_matches_golden() -> None:
    # The documented keys, types, order, tensors and checksums give the same bytes as card.py.
    data = _build()
    golden = GOLDEN.read_bytes()
    assert data == golden, f"first difference at byte offset {_first_difference(data, golden)}"


def test_golden_container() -> None:
    data = GOLDEN.read_bytes()
    assert data[:4] == b"GGUF"
    assert int.from_bytes(data[4:8], "little") == 3
    assert len(data) % 32 == 0

    reader = gguf.GGUFReader(GOLDEN)
    assert reader.endianess == gguf.GGUFEndian.LITTLE
    assert reader.alignment == 32
    assert reader.get_field("general.architecture").contents() == "cachecard"
    assert reader.get_field("general.type").contents() == "cachecard"
    assert reader.get_field("general.alignment") is None

    kv, arrays = _spec_parts(_golden_card())
    expected_keys = ["general.architecture", "general.type", *kv, *CHECKSUM_KEYS]
    stored_keys = [name for name in reader.fields if not name.startswith("GGUF.")]
    assert stored_keys == expected_keys
    for key, item in kv.items():
        field = reader.get_field(key)
        assert field.types[0] == item.type, key
        if item.sub_type is not None:
            assert field.types[1] == item.sub_type, key
    assert reader.get_field(KEY + "header.sha256").types == [ValueType.STRING]
    assert reader.get_field(KEY + "payload.sha256").types == [ValueType.STRING]
    assert reader.get_field(KEY + "payload.crc32").types == [ValueType.ARRAY, ValueType.UINT32]

    assert [t.name for t in reader.tensors] == list(arrays)
    for tensor in reader.tensors:
        if tensor.name.endswith(("positions", "token_ids")):
            assert tensor.tensor_type == gguf.GGMLQuantizationType.I32, tensor.name
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.I8, tensor.name
        assert list(tensor.shape) == [arrays[tensor.name].size], tensor.name
        assert tensor.data_offset % 32 == 0, tensor.name


def _assert_same_card(card: CacheCard, want: CacheCard) -> None:
    assert card.model == want.model
    assert card.model.model_id == want.model.model_id
    np.testing.assert_array_equal(card.token_ids, want.token_ids)
    np.testing.assert_array_equal(card.positions, want.positions)
    assert card.token_ids.dtype == np.int32
    assert card.positions.dtype == np.int32
    assert card.group_size == want.group_size
    assert card.rotation_chunk == want.rotation_chunk
    assert card.provenance == want.provenance
    assert card.rope_freq_base == want.rope_freq_base
    assert card.rope_freq_scale == want.rope_freq_scale

    assert len(card.sections) == len(want.sections)
    for s, (got, expected) in enumerate(zip(card.sections, want.sections, strict=True)):
        np.testing.assert_array_equal(got.positions, expected.positions, err_msg=f"section {s}")
        assert got.positions.dtype == np.int32
        assert len(got.layers) == len(expected.layers)
        for j, (layer, layer_want) in enumerate(zip(got.layers, expected.layers, strict=True)):
            where = f"section {s}, layer {j}"
            assert layer.n_embd_k == layer_want.n_embd_k, where
            assert layer.n_embd_v == layer_want.n_embd_v, where
            for part in ("k_bits", "k_codes", "v_bits", "v_codes"):
                array = getattr(layer, part)
                assert array.dtype == np.uint8, f"{where} {part}"
                np.testing.assert_array_equal(array, getattr(layer_want, part), err_msg=f"{where} {part}")


def test_golden_fields() -> None:
    card = CacheCard.load(GOLDEN)
    _assert_same_card(card, _golden_card())

    np.testing.assert_array_equal(card.token_ids, [2, 105, 7, 19, 42, 1])
    np.testing.assert_array_equal(card.positions, np.arange(6))
    np.testing.assert_array_equal(card.sections[1].positions, [3, 4, 5])
    assert card.group_size == GROUP_SIZE
    assert card.rotation_chunk == ROTATION_CHUNK
    assert card.rope_freq_base == 10000.0
    assert card.rope_freq_scale == 0.5
    assert card.provenance.hop == 2
    assert card.provenance.producer == "qkvshare_edge golden"
    assert card.sha256 == hashlib.sha256(GOLDEN.read_bytes()).hexdigest()

    assert card.width_histogram() == {2: 5, 3: 5, 4: 8, 8: 7, 16: 5}
    reader = gguf.GGUFReader(GOLDEN)
    stored_bpe = reader.get_field(KEY + "bits_per_element").contents()
    assert stored_bpe == float(np.float32(card.bits_per_element))


def _decode_row_per_spec(raw: bytes, width: int, n: int) -> np.ndarray:
    """Decode one row with the layout of docs/cachecard.md, in float32."""
    n_group = n // GROUP_SIZE
    if width == 16:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    scales = np.frombuffer(raw[: 2 * n_group], dtype="<f2").astype(np.float32)[:, None]
    if width == 8:
        q8 = np.frombuffer(raw[2 * n_group :], dtype=np.int8).astype(np.float32)
        return (scales * q8.reshape(n_group, GROUP_SIZE)).reshape(-1)
    minimums = np.frombuffer(raw[2 * n_group : 4 * n_group], dtype="<f2").astype(np.float32)[:, None]
    # Bit j of code i sits at bit position i * width + j of the LSB-first stream.
    stream = np.unpackbits(np.frombuffer(raw[4 * n_group :], dtype=np.uint8), bitorder="little")
    q = (stream.reshape(n, width).astype(np.int64) << np.arange(width)).sum(axis=1).astype(np.float32)
    return (minimums + scales * q.reshape(n_group, GROUP_SIZE)).reshape(-1)


def _hadamard_per_spec(row: np.ndarray, chunk: int) -> np.ndarray:
    """Apply the orthonormal Walsh-Hadamard butterfly of docs/cachecard.md to each chunk, in float32."""
    x = row.astype(np.float32).reshape(-1, chunk).copy()
    h = 1
    while h < chunk:
        pairs = x.reshape(x.shape[0], chunk // (2 * h), 2, h)
        a = pairs[:, :, 0, :].copy()
        b = pairs[:, :, 1, :].copy()
        pairs[:, :, 0, :] = a + b
        pairs[:, :, 1, :] = a - b
        h *= 2
    scale = np.float32(1.0 / np.sqrt(np.float64(chunk)))
    return (x * scale).reshape(-1)


def test_golden_rows_decode_per_spec() -> None:
    card = CacheCard.load(GOLDEN)
    for s, section in enumerate(card.sections):
        for j, layer in enumerate(section.layers):
            k, v = card.decode_layer(s, j, n_threads=1)
            for part, n, bits, codes, decoded in (
                ("K", layer.n_embd_k, layer.k_bits, layer.k_codes, k),
                ("V", layer.n_embd_v, layer.v_bits, layer.v_codes, v),
            ):
                offset = 0
                for r, width in enumerate(bits):
                    size = codec.row_bytes(int(width), n, GROUP_SIZE)
                    row = _decode_row_per_spec(codes[offset : offset + size].tobytes(), int(width), n)
                    if width < 16:
                        row = _hadamard_per_spec(row, card.rotation_chunk)
                    np.testing.assert_array_equal(row, decoded[r], err_msg=f"section {s} layer {j} {part} row {r}")
                    offset += size
                assert offset == codes.nbytes


def test_golden_lossless_rows_exact() -> None:
    # _rows() values are exact in f16, so width-16 rows decode to the input.
    card = CacheCard.load(GOLDEN)
    k, _ = card.decode_layer(0, 0, n_threads=1)
    np.testing.assert_array_equal(k[0], _rows(6, 32, 1)[0])


# -- format version 2: keys in the channel layout --------------------------------


def test_golden_v2_bytes_unchanged() -> None:
    golden = GOLDEN_V2.read_bytes()
    data = _golden_card_v2().to_bytes()
    assert data == golden, (
        f"CacheCard v2 bytes differ from {GOLDEN_V2.name} at byte offset {_first_difference(data, golden)}; "
        "if intended, update docs/cachecard.md and run: PYTHONPATH=. python tests/test_card_format.py --regenerate"
    )


def test_spec_writer_matches_golden_v2() -> None:
    data = _build(card=_golden_card_v2())
    golden = GOLDEN_V2.read_bytes()
    assert data == golden, f"first difference at byte offset {_first_difference(data, golden)}"


def _decode_channel_per_spec(codes: bytes, bits: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    """Decode channel-layout keys from the rules in docs/cachecard.md, with plain Python loops."""
    out = np.zeros((bits.shape[0], n), dtype=np.float32)
    offset, r = 0, 0
    while r < bits.shape[0]:
        end = r
        while end < bits.shape[0] and positions[end] // K_BLOCK == positions[r] // K_BLOCK:
            end += 1
        m = r_ = None
        if any(int(b) != 16 for b in bits[r:end]):
            m = np.frombuffer(codes, dtype="<f2", count=n, offset=offset).astype(np.float32)
            r_ = np.frombuffer(codes, dtype="<f2", count=n, offset=offset + 2 * n).astype(np.float32)
            offset += 4 * n
        for row in range(r, end):
            width = int(bits[row])
            if width == 16:
                out[row] = np.frombuffer(codes, dtype="<f2", count=n, offset=offset).astype(np.float32)
                offset += 2 * n
                continue
            stream = int.from_bytes(codes[offset : offset + n * width // 8], "little")
            offset += n * width // 8
            for c in range(n):
                q = (stream >> (c * width)) & ((1 << width) - 1)
                step = np.float32(r_[c] / np.float32((1 << width) - 1))
                out[row, c] = m[c] + np.float32(step * np.float32(q))
        r = end
    assert offset == len(codes)
    return out


def test_golden_v2_keys_decode_per_spec() -> None:
    card = CacheCard.load(GOLDEN_V2)
    assert (card.format_version, card.k_layout, card.k_block) == (2, "channel", K_BLOCK)
    for s, section in enumerate(card.sections):
        for j, layer in enumerate(section.layers):
            k, _ = card.decode_layer(s, j, n_threads=1)
            expected = _decode_channel_per_spec(
                layer.k_codes.tobytes(), layer.k_bits, section.positions, layer.n_embd_k
            )
            np.testing.assert_array_equal(expected, k, err_msg=f"section {s} layer {j} K")


def test_v1_card_reads_as_row_layout() -> None:
    card = CacheCard.load(GOLDEN)
    assert (card.format_version, card.k_layout, card.k_block) == (1, "row", 0)


@pytest.mark.parametrize(
    ("edits", "phrase"),
    [
        ([drop_key("k_layout")], "missing metadata key cachecard.k_layout"),
        ([set_key("k_layout", "diagonal", ValueType.STRING)], "unknown k_layout 'diagonal'"),
        ([set_key("k_block", 0)], "k_block = 0 is out of range"),
        ([trim_tensor("sec.0.blk.0.k_codes")], "section 0, layer 0, K: 403 code bytes, the widths need 404"),
    ],
)
def test_reject_v2_format(edits: list[Edit], phrase: str) -> None:
    with pytest.raises(CardFormatError, match=re.escape(phrase)):
        CacheCard.from_bytes(_build(*edits, card=_golden_card_v2()))


@pytest.mark.parametrize(
    ("width", "n", "row_bytes", "bits"),
    [
        (16, 256, 512, 16.0),
        (8, 256, 272, 8.5),
        (4, 256, 160, 5.0),
        (3, 256, 128, 4.0),
        (2, 256, 96, 3.0),
    ],
)
def test_row_bytes_group32(width: int, n: int, row_bytes: int, bits: float) -> None:
    assert codec.row_bytes(width, n, 32) == row_bytes
    assert 8 * row_bytes / n == bits


def test_payload_counts_width_tags() -> None:
    card = _golden_card()
    expected = 0
    for section in card.sections:
        for layer in section.layers:
            for n, bits in ((layer.n_embd_k, layer.k_bits), (layer.n_embd_v, layer.v_bits)):
                expected += sum(codec.row_bytes(int(w), n, GROUP_SIZE) + 1 for w in bits)
    assert card.payload_bytes == expected
    assert card.bits_per_element == 8 * expected / card.n_elements


# -- reader rejections ------------------------------------------------------------


def test_reject_empty(tmp_path: Path) -> None:
    with pytest.raises(CardFormatError, match="empty"):
        CacheCard.from_bytes(b"")
    path = tmp_path / "empty.qkvc"
    path.write_bytes(b"")
    with pytest.raises(CardFormatError, match=r"is empty \(0 bytes\)"):
        CacheCard.load(path)


def test_reject_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        CacheCard.load(tmp_path / "absent.qkvc")


def test_reject_not_gguf() -> None:
    with pytest.raises(CardFormatError, match="is not a readable GGUF file"):
        CacheCard.from_bytes(b"PK\x03\x04 this is a zip header, not a card" * 4)


def _truncation_points() -> dict[str, int]:
    reader = gguf.GGUFReader(GOLDEN)
    fingerprint = reader.get_field(KEY + "model.fingerprint")
    last_field = list(reader.fields.values())[-1]
    info_start = last_field.offset + sum(part.nbytes for part in last_field.parts)
    last = reader.tensors[-1]
    return {
        "inside magic": 2,
        "after version": 8,
        "inside counts": 20,
        "inside fingerprint": fingerprint.offset + 40,
        "inside tensor info": info_start + 20,
        "before tensor data": reader.tensors[0].data_offset,
        "inside last tensor": last.data_offset + last.n_bytes // 2,
    }


@pytest.mark.parametrize(
    "where",
    [
        "inside magic",
        "after version",
        "inside counts",
        "inside fingerprint",
        "inside tensor info",
        "before tensor data",
        "inside last tensor",
    ],
)
def test_reject_truncated(where: str) -> None:
    data = GOLDEN.read_bytes()
    cut = _truncation_points()[where]
    assert 0 < cut < len(data)
    with pytest.raises(CardFormatError, match="is not a readable GGUF file"):
        CacheCard.from_bytes(data[:cut])


def test_reject_truncated_padding() -> None:
    data = GOLDEN.read_bytes()
    last = gguf.GGUFReader(GOLDEN).tensors[-1]
    end = last.data_offset + last.n_bytes
    assert end < len(data)
    with pytest.raises(CardFormatError, match="the card is truncated or has trailing bytes"):
        CacheCard.from_bytes(data[:end])


def test_reject_trailing_bytes() -> None:
    data = GOLDEN.read_bytes() + bytes(32)
    with pytest.raises(CardFormatError, match="the card is truncated or has trailing bytes"):
        CacheCard.from_bytes(data)


def test_reject_gguf_version() -> None:
    data = bytearray(GOLDEN.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")
    with pytest.raises(CardFormatError, match=r"GGUF version 2 is not supported \(expected 3\)"):
        CacheCard.from_bytes(bytes(data))


def test_reject_big_endian() -> None:
    # A big-endian GGUF stores the version as 00 00 00 03, which reads as 50331648 little-endian.
    data = bytearray(GOLDEN.read_bytes())
    data[4:8] = (3).to_bytes(4, "big")
    with pytest.raises(CardFormatError, match="GGUF version 50331648 is not supported"):
        CacheCard.from_bytes(bytes(data))


def test_reject_model_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_tokenizer_model("llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CardFormatError, match="architecture 'llama', not a CacheCard"):
        CacheCard.load(path)


def test_reject_newer_version() -> None:
    data = _build(set_key("format_version", 3))
    with pytest.raises(CardFormatError, match="version 3 is not supported") as info:
        CacheCard.from_bytes(data)
    assert "reads versions 1, 2" in str(info.value)
    assert "upgrade qkvshare_edge" in str(info.value)


def test_reject_older_version() -> None:
    data = _build(set_key("format_version", 0))
    with pytest.raises(CardFormatError, match="version 0 is not supported") as info:
        CacheCard.from_bytes(data)
    assert "reads versions 1, 2" in str(info.value)
    assert "export the card again" in str(info.value)


FIRST_K_BITS = "sec.0.blk.0.k_bits"

# Each case is (id, edits, expected phrase). Every file has valid checksums unless the case is about them.
FORMAT_CASES: list[tuple[str, list[Edit], str]] = [
    ("missing key", [drop_key("group_size")], "missing metadata key cachecard.group_size"),
    ("missing checksum", [drop_key("payload.crc32")], "missing metadata key cachecard.payload.crc32"),
    ("key type str", [set_key("group_size", "16", ValueType.STRING)], "group_size has type str, expected int"),
    ("key type float", [set_key("n_section", 2.0, ValueType.FLOAT32)], "n_section has type float, expected int"),
    ("key type int", [set_key("controller", 7)], "controller has type int, expected str"),
    (
        "array item type",
        [set_key("section.0.n_embd_k", [32.0, 32.0], ValueType.ARRAY, ValueType.FLOAT32)],
        "section.0.n_embd_k must be an integer array",
    ),
    ("n_section zero", [set_key("n_section", 0)], r"n_section = 0 is out of range \[1, 8\]"),
    ("n_section nine", [set_key("n_section", 9)], r"n_section = 9 is out of range \[1, 8\]"),
    ("n_tokens zero", [set_key("n_tokens", 0, ValueType.UINT64)], r"n_tokens = 0 is out of range \[1, 16777216\]"),
    (
        "n_tokens mismatch",
        [set_key("n_tokens", 5, ValueType.UINT64)],
        "token_ids contains 6 tokens, but the header says 5",
    ),
    ("group_size small", [set_key("group_size", 4)], r"group_size = 4 is out of range \[8, 4096\]"),
    ("group_size odd", [set_key("group_size", 12)], "group_size 12 must be a multiple of 8"),
    (
        "rotation_chunk large",
        [set_key("rotation_chunk", 512)],
        r"rotation_chunk = 512 is out of range \[0, 256\]",
    ),
    ("rotation_chunk odd", [set_key("rotation_chunk", 12)], "rotation_chunk 12 must be 0 or a power of two"),
    ("rotation_chunk one", [set_key("rotation_chunk", 1)], "rotation_chunk 1 must be 0 or a power of two"),
    (
        "row not rotation multiple",
        [set_key("rotation_chunk", 32)],
        "section 0, layer 1, V: row of 16 elements is not a multiple of rotation_chunk",
    ),
    ("n_layer zero", [set_key("section.1.n_layer", 0)], r"section 1 n_layer = 0 is out of range \[1, 4096\]"),
    (
        "row size count",
        [set_key("section.0.n_embd_v", [32], ValueType.ARRAY, ValueType.UINT32)],
        "section 0 lists 2/1 row sizes for 2 layers",
    ),
    (
        "row size zero",
        [set_key("section.1.n_embd_k", [0], ValueType.ARRAY, ValueType.UINT32)],
        r"section 1 layer 0 K row size = 0 is out of range \[1, 1048576\]",
    ),
    (
        "row size not group multiple",
        [set_key("section.1.n_embd_k", [40], ValueType.ARRAY, ValueType.UINT32)],
        "section 1, layer 0, K: row of 40 elements is not a multiple of group_size",
    ),
    ("tensor missing", [drop_tensor("sec.1.blk.0.v_codes")], r"tensor list does not match the header \(missing"),
    ("tensor extra", [set_tensor("extra", [1, 2, 3])], r"unexpected \['extra'\]"),
    ("tensor type", [set_tensor("token_ids", [2, 105, 7, 19, 42, 1])], "tensor token_ids has type I8, expected I32"),
    (
        "checksum count",
        [set_key("payload.crc32", [0], ValueType.ARRAY, ValueType.UINT32)],
        "1 tensor checksums for 16 tensors",
    ),
    ("fingerprint json", [set_key("model.fingerprint", "[]", ValueType.STRING)], "invalid model fingerprint"),
    (
        "fingerprint fields",
        [set_key("model.fingerprint", '{"architecture":"x"}', ValueType.STRING)],
        "invalid model fingerprint",
    ),
    ("negative token", [set_tensor("token_ids", [2, -1, 7, 19, 42, 1], np.int32)], "negative token id -1"),
    (
        "positions not ascending",
        [set_tensor("positions", [0, 1, 3, 2, 4, 5], np.int32)],
        "token positions must be non-negative and strictly ascending",
    ),
    (
        "negative position",
        [set_tensor("positions", [-1, 1, 2, 3, 4, 5], np.int32)],
        "token positions must be non-negative and strictly ascending",
    ),
    (
        "section positions not ascending",
        [set_tensor("sec.1.positions", [3, 5, 4], np.int32)],
        "section 1 positions must be strictly ascending",
    ),
    (
        "section position without token",
        [set_tensor("sec.1.positions", [3, 4, 9], np.int32)],
        "section 1 contains a position that has no token",
    ),
    ("widths count", [set_tensor(FIRST_K_BITS, [16, 8, 4, 3, 2])], "section 0, layer 0, K: 5 widths for 6 cells"),
    (
        "width five",
        [set_tensor(FIRST_K_BITS, [16, 8, 5, 3, 2, 4])],
        r"section 0, layer 0, K: invalid width 5; widths are",
    ),
    ("code bytes", [trim_tensor("sec.0.blk.1.v_codes")], "section 0, layer 1, V: 87 code bytes, the widths need 88"),
]


@pytest.mark.parametrize(("edits", "phrase"), [c[1:] for c in FORMAT_CASES], ids=[c[0] for c in FORMAT_CASES])
def test_reject_format(edits: list[Edit], phrase: str) -> None:
    data = _build(*edits)
    with pytest.raises(CardFormatError, match=phrase) as info:
        CacheCard.from_bytes(data)
    assert type(info.value) is CardFormatError


def _tensor_offset(name: str) -> int:
    for tensor in gguf.GGUFReader(GOLDEN).tensors:
        if tensor.name == name:
            return int(tensor.data_offset)
    raise KeyError(name)


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("token_ids", r"tensor token_ids \(the token list\)"),
        ("sec.1.positions", r"tensor sec.1.positions \(section 1 positions\)"),
        ("sec.0.blk.1.v_codes", r"tensor sec.0.blk.1.v_codes \(section 0, layer 1, v codes\)"),
        ("sec.1.blk.0.k_bits", r"tensor sec.1.blk.0.k_bits \(section 1, layer 0, k bits\)"),
    ],
)
def test_reject_corrupt_tensor(name: str, phrase: str) -> None:
    data = bytearray(GOLDEN.read_bytes())
    data[_tensor_offset(name)] ^= 0x01
    with pytest.raises(CardChecksumError, match=f"checksum mismatch in {phrase}"):
        CacheCard.from_bytes(bytes(data))


def test_reject_payload_sha256() -> None:
    data = _build(set_key("payload.sha256", "0" * 64, ValueType.STRING))
    with pytest.raises(CardChecksumError, match="payload sha256 mismatch"):
        CacheCard.from_bytes(data)


def test_reject_corrupt_header_value() -> None:
    data = GOLDEN.read_bytes()
    assert data.count(b"sink-recent") == 1
    corrupted = data.replace(b"sink-recent", b"sink-recenT")
    with pytest.raises(CardChecksumError, match="header sha256 mismatch"):
        CacheCard.from_bytes(corrupted)


def test_reject_corrupt_header_float() -> None:
    data = bytearray(GOLDEN.read_bytes())
    field = gguf.GGUFReader(GOLDEN).get_field(KEY + "context.rope_freq_scale")
    value_offset = field.offset + sum(part.nbytes for part in field.parts[:-1])
    data[value_offset] ^= 0x01
    with pytest.raises(CardChecksumError, match="header sha256 mismatch"):
        CacheCard.from_bytes(bytes(data))


def test_reject_corrupt_model_id() -> None:
    data = GOLDEN.read_bytes()
    model_id = _golden_fingerprint().model_id.encode()
    assert data.count(model_id) == 1
    flipped = b"0" if model_id[:1] != b"0" else b"1"
    with pytest.raises(CardChecksumError, match="header sha256 mismatch"):
        CacheCard.from_bytes(data.replace(model_id, flipped + model_id[1:]))


# Header values whose digest matches but that disagree with the card's content.
DISAGREEING_CASES: list[tuple[str, Edit]] = [
    ("model id", set_key("model.id", "0" * 64, ValueType.STRING)),
    ("model architecture", set_key("model.architecture", "llama", ValueType.STRING)),
    ("bits per element", set_key("bits_per_element", 4.0, ValueType.FLOAT32)),
    (
        "noncanonical fingerprint",
        set_key(
            "model.fingerprint",
            json.dumps(json.loads(_fingerprint_json(_golden_fingerprint())), sort_keys=True),
            ValueType.STRING,
        ),
    ),
    ("unknown card key", set_key("comment", "added by another writer", ValueType.STRING)),
]


@pytest.mark.parametrize("edit", [c[1] for c in DISAGREEING_CASES], ids=[c[0] for c in DISAGREEING_CASES])
def test_reject_disagreeing_header(edit: Edit) -> None:
    with pytest.raises(CardFormatError, match="header values disagree with the card's content") as info:
        CacheCard.from_bytes(_build(edit))
    assert type(info.value) is CardFormatError


def test_load_ignores_general_keys() -> None:
    def add_name(kv: Metadata, arrays: dict[str, np.ndarray]) -> None:
        kv["general.name"] = Value(ValueType.STRING, "not covered by any digest")

    card = CacheCard.from_bytes(_build(add_name))
    _assert_same_card(card, _golden_card())


def test_reject_missing_rotation_key() -> None:
    # rotation_chunk is part of version 1 from its first release, so a card without it is incomplete.
    card = _golden_card()
    card.rotation_chunk = 0
    kv, arrays = _spec_parts(card)
    kv[KEY + "rotation_chunk"] = None
    with pytest.raises(CardFormatError, match=r"missing metadata key cachecard\.rotation_chunk"):
        CacheCard.from_bytes(_assemble(kv, arrays))


def test_writer_rejects_no_sections() -> None:
    card = _golden_card()
    card.sections = []
    with pytest.raises(CardFormatError, match="0 sections, expected 1 to 8"):
        card.to_bytes()


def test_writer_rejects_long_rows() -> None:
    n = (1 << 20) + GROUP_SIZE
    widths = np.array([2], dtype=np.uint8)
    codes = codec.encode(np.zeros((1, n), dtype=np.float32), widths, GROUP_SIZE, 1)
    small = _layer(16, 16, [2], [2], seed=1)
    layer = CardLayer(n, 16, widths, codes, small.v_bits, small.v_codes)
    card = _golden_card()
    card.sections = [CardSection(np.array([5], dtype=np.int32), [layer])]
    with pytest.raises(CardFormatError):
        card.to_bytes()


def test_signature_per_spec() -> None:
    key = b"0123456789abcdef-shared-test-key"
    data = _golden_card().to_bytes(key=key, key_id="peer-a")
    with tempfile.TemporaryDirectory(prefix="qkvcard-test-") as tmp:
        path = Path(tmp) / "signed.qkvc"
        path.write_bytes(data)
        reader = gguf.GGUFReader(path)
        header_sha256 = reader.get_field(KEY + "header.sha256").contents()
        payload_sha256 = reader.get_field(KEY + "payload.sha256").contents()
        signature = reader.get_field(KEY + "signature.hmac_sha256").contents()
        key_id = reader.get_field(KEY + "signature.key_id").contents()

    # The signature keys are outside the header digest, so it matches the unsigned golden card's.
    golden = gguf.GGUFReader(GOLDEN)
    assert header_sha256 == golden.get_field(KEY + "header.sha256").contents()
    assert key_id == "peer-a"
    message = b"qkvshare-cachecard-v1\x00" + header_sha256.encode() + b"\x00" + payload_sha256.encode()
    assert signature == hmac.new(key, message, hashlib.sha256).hexdigest()

    assert CacheCard.from_bytes(data, key=key).signature_status == "verified"
    assert CacheCard.from_bytes(data).signature_status == "signed"
    assert CacheCard.from_bytes(GOLDEN.read_bytes(), key=key).signature_status == "unsigned"
    relabeled = data.replace(b"peer-a", b"peer-b")
    assert CacheCard.from_bytes(relabeled, key=key).signature_status == "verified"


# -- bytes, files and digests ----------------------------------------------------


def test_load_matches_from_bytes(tmp_path: Path) -> None:
    data = GOLDEN.read_bytes()
    from_file = CacheCard.load(GOLDEN)
    from_bytes = CacheCard.from_bytes(data)
    _assert_same_card(from_file, from_bytes)
    assert from_file.sha256 == hashlib.sha256(data).hexdigest()
    assert from_bytes.sha256 == from_file.sha256

    saved = from_bytes.save(tmp_path / "copy.qkvc")
    assert saved.read_bytes() == data
    assert from_bytes.sha256 == hashlib.sha256(data).hexdigest()


def test_to_bytes_sets_sha256() -> None:
    card = _golden_card()
    assert card.sha256 == ""
    data = card.to_bytes()
    assert card.sha256 == hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_card_format.py --regenerate")
    _regenerate()
