"""llama.cpp sequence-state translator: round trips and hostile buffers."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from qkvshare_edge import Llama, StateFormatError, state
from qkvshare_edge import _native as native
from qkvshare_edge.handoff import context_layout

F16_LAYOUT = state.CacheLayout(type_k=1, type_v=1, v_trans=True, k_rot_chunk=0, v_rot_chunk=0)


def sender_blob(path: Path, tokens: list[int], flash_attn: bool, **kwargs) -> tuple[Llama, bytes]:
    llm = Llama(str(path), n_ctx=256, n_threads=2, flash_attn=flash_attn, verbose=False, **kwargs)
    llm.eval(tokens)
    return llm, state.read_seq_state(llm.ctx, 0)


def rebuild(sections: list[state.StateSection], layout: state.CacheLayout, seq_id: int = 0) -> bytes:
    items = [(s.n_stream, s.stream, s.pos, [(layer.k, layer.v) for layer in s.layers]) for s in sections]
    return state.build_seq_state(items, seq_id, layout)


@pytest.mark.parametrize("model", ["llama", "gemma3"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa_off", "fa_on"])
def test_round_trip_exact(model_paths, text_tokens, model: str, flash_attn: bool) -> None:
    llm, blob = sender_blob(model_paths[model], text_tokens[:100], flash_attn)
    layout = context_layout(llm)
    sections = state.parse_seq_state(blob, layout)
    assert len(sections) == (2 if model == "gemma3" else 1)
    assert all(s.v_trans == (not flash_attn) for s in sections)
    assert sections[0].cell_count == 100
    rebuilt = rebuild(sections, layout)
    assert rebuilt == blob


def test_gemma3_window_section(model_paths, text_tokens) -> None:
    llm, blob = sender_blob(model_paths["gemma3"], text_tokens[:100], False)
    full, window = state.parse_seq_state(blob, context_layout(llm))
    assert np.array_equal(np.sort(full.pos), np.arange(100))
    assert np.array_equal(np.sort(window.pos), np.arange(100 - 32, 100))
    assert len(full.layers) == 1
    assert len(window.layers) == 5


@pytest.mark.parametrize("cache_type", [0, 30, 8, 2], ids=["f32", "bf16", "q8_0", "q4_0"])
def test_cache_types_decode_close(model_paths, text_tokens, cache_type: int) -> None:
    """K/V read from an f32, bf16, q8_0 or q4_0 cache agree with an f16 cache's."""
    _, f16_blob = sender_blob(model_paths["llama"], text_tokens[:40], True)
    reference = state.parse_seq_state(f16_blob, F16_LAYOUT.__class__(1, 1, False, 0, 0))
    llm, blob = sender_blob(model_paths["llama"], text_tokens[:40], True, type_k=cache_type, type_v=cache_type)
    layout = context_layout(llm)
    got = state.parse_seq_state(blob, layout)
    # Relative error allowed per cache type: one rounding step of that type
    # on the largest element, with room for the layers' compounding.
    tolerance = {0: 1e-2, 30: 2e-2, 8: 5e-2, 2: 0.3}[cache_type]
    for il, (ref, layer) in enumerate(zip(reference[0].layers, got[0].layers, strict=True)):
        for name, a, b in (("K", ref.k, layer.k), ("V", ref.v, layer.v)):
            err = float(np.abs(a - b).max() / np.abs(a).max())
            assert err <= tolerance, f"layer {il} {name}: relative error {err:.4f} > {tolerance}"


def test_rotation_chunks_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_ATTN_ROT_DISABLE", raising=False)
    assert state.rotation_chunks(256, 256, 8, 8) == (256, 64)
    assert state.rotation_chunks(64, 64, 2, 1) == (64, 0)
    assert state.rotation_chunks(192, 192, 8, 8) == (64, 64)
    assert state.rotation_chunks(80, 80, 8, 8) == (0, 0)
    assert state.rotation_chunks(256, 256, 1, 1) == (0, 0)
    monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
    assert state.rotation_chunks(256, 256, 8, 8) == (0, 0)


def test_hadamard_self_inverse() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    y = native.hadamard(native.hadamard(x, 64), 64)
    assert float(np.abs(y - x).max()) < 1e-5
    h = native.hadamard(np.eye(8, dtype=np.float32), 8)
    assert np.allclose(h @ h, np.eye(8), atol=1e-6)


# -- hostile buffers --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_blob(model_paths, text_tokens) -> bytes:
    _, blob = sender_blob(model_paths["llama"], text_tokens[:3], False)
    return blob


def test_every_truncation_rejected(small_blob: bytes) -> None:
    for size in range(len(small_blob)):
        with pytest.raises(StateFormatError):
            state.parse_seq_state(small_blob[:size], F16_LAYOUT)


def test_trailing_garbage_rejected(small_blob: bytes) -> None:
    with pytest.raises(StateFormatError):
        state.parse_seq_state(small_blob + b"\x01\x00\x00\x00\xff", F16_LAYOUT)


# Offsets in a one-section, one-stream state of 3 cells: magic 0, seq_id 4,
# n_stream 8, cell_count 12, cells from 16 (12 bytes each), v_trans 52,
# n_layer 56, first k_type 60, first k_size_row 64.
@pytest.mark.parametrize(
    ("offset", "fmt", "value", "phrase"),
    [
        (0, "<I", 0x12345678, "magic"),
        (8, "<I", 0, "n_stream"),
        (8, "<I", 1 << 30, "n_stream"),
        (12, "<I", 0xFFFFFFFF, "cell_count"),
        (20, "<I", 2, "sequence ids"),
        (52, "<I", 2, "v_trans"),
        (56, "<I", 0, "n_layer"),
        (56, "<I", 1 << 20, "n_layer"),
        (60, "<i", 99, "unsupported KV cache type"),
        (64, "<Q", 7, "k_size_row"),
        (64, "<Q", 1 << 40, "k_size_row"),
    ],
)
def test_corrupt_field_rejected(small_blob: bytes, offset: int, fmt: str, value: int, phrase: str) -> None:
    blob = bytearray(small_blob)
    struct.pack_into(fmt, blob, offset, value)
    with pytest.raises(StateFormatError, match=phrase):
        state.parse_seq_state(bytes(blob), F16_LAYOUT)


def test_error_names_llama_cpp_version(small_blob: bytes) -> None:
    with pytest.raises(StateFormatError, match=re.escape("llama-cpp-python 0.3.36")):
        state.parse_seq_state(small_blob[:30], F16_LAYOUT)


def test_build_rejects_quantized_transposed_v() -> None:
    layout = state.CacheLayout(type_k=8, type_v=8, v_trans=True, k_rot_chunk=0, v_rot_chunk=0)
    k = np.zeros((2, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="quantized"):
        state.build_seq_state([(1, 0, np.arange(2, dtype=np.int32), [(k, k)])], 0, layout)
