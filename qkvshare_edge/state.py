"""Access to llama.cpp sequence state: read, parse, rebuild and write.

The byte layout is the one `llama_state_seq_get_data` writes in the llama.cpp
that llama-cpp-python 0.3.36 vendors; the native translator (`native/src/state.h`)
documents it field by field. This module adds what the buffer itself does not
say: the cache types, V layout and K/V rotation of a live context.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import llama_cpp
import numpy as np

from . import _native
from .errors import StateFormatError

logger = logging.getLogger(__name__)

LLAMA_CPP_LAYOUT: str = _native.LLAMA_CPP_LAYOUT

# ggml_type values of the KV cache types the translator reads and writes.
GGML_TYPE_NAMES: dict[int, str] = {0: "f32", 1: "f16", 2: "q4_0", 8: "q8_0", 30: "bf16"}
GGML_TYPES: dict[str, int] = {name: value for value, name in GGML_TYPE_NAMES.items()}
QUANTIZED_TYPES = frozenset({GGML_TYPES["q4_0"], GGML_TYPES["q8_0"]})


def ggml_type_name(ggml_type: int) -> str:
    """Return the llama.cpp name of a ggml type id, e.g. 'f16'."""
    return GGML_TYPE_NAMES.get(ggml_type, f"ggml type {ggml_type}")


@dataclass(frozen=True)
class CacheLayout:
    """How one context stores K/V: cache types, V transposition and rotation.

    `k_rot_chunk` and `v_rot_chunk` are the Walsh-Hadamard chunk lengths that
    this llama.cpp applies to quantized caches, 0 when it does not rotate.
    """

    type_k: int
    type_v: int
    v_trans: bool
    k_rot_chunk: int
    v_rot_chunk: int

    def describe(self) -> str:
        """Return a short human-readable summary, e.g. 'K f16, V f16, V transposed'."""
        v_layout = "V transposed (flash attention off)" if self.v_trans else "V by row (flash attention on)"
        return f"K {ggml_type_name(self.type_k)}, V {ggml_type_name(self.type_v)}, {v_layout}"


def _rotation_disabled() -> bool:
    # Mirrors llama.cpp's own check: atoi(getenv("LLAMA_ATTN_ROT_DISABLE")) != 0.
    value = os.environ.get("LLAMA_ATTN_ROT_DISABLE", "")
    digits = ""
    for ch in value.strip():
        if not (ch.isdigit() or (ch in "+-" and not digits)):
            break
        digits += ch
    try:
        return int(digits) != 0
    except ValueError:
        return False


def rotation_chunks(head_dim_k: int, head_dim_v: int, type_k: int, type_v: int) -> tuple[int, int]:
    """Return the (K, V) Walsh-Hadamard chunk lengths llama.cpp uses for these cache types.

    llama.cpp (llama-kv-cache.cpp) rotates K and V of quantized caches when the
    head size is a multiple of 64: K over the largest power of two dividing the
    head size, V over chunks of 64. The rotation is decided when the context
    is created, including the LLAMA_ATTN_ROT_DISABLE environment variable.
    """
    if _rotation_disabled():
        return 0, 0
    k_chunk = 0
    if type_k in QUANTIZED_TYPES and head_dim_k > 0 and head_dim_k % 64 == 0:
        k_chunk = 64
        while head_dim_k % (k_chunk * 2) == 0:
            k_chunk *= 2
    v_chunk = 64 if type_v in QUANTIZED_TYPES and head_dim_v > 0 and head_dim_v % 64 == 0 else 0
    return k_chunk, v_chunk


def read_seq_state(ctx: llama_cpp.llama_context_p, seq_id: int) -> bytes:
    """Return the llama.cpp state buffer of one sequence.

    Raises:
        RuntimeError: when llama.cpp fails to write the state.
    """
    size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
    if size == 0:
        raise RuntimeError(f"llama_state_seq_get_size returned 0 for seq_id {seq_id}; see llama.cpp's log")
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq_id)
    if written != size:
        raise RuntimeError(f"llama_state_seq_get_data wrote {written} bytes for seq_id {seq_id}, expected {size}")
    return bytes(buffer)


def write_seq_state(ctx: llama_cpp.llama_context_p, seq_id: int, blob: bytes) -> bool:
    """Load a state buffer into one sequence; return whether llama.cpp read all of it."""
    buffer = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    read = llama_cpp.llama_state_seq_set_data(ctx, buffer, len(blob), seq_id)
    return read == len(blob)


@dataclass
class StateLayer:
    """One layer of one cache section, decoded to float32 in cell order."""

    k_type: int
    v_type: int
    k: np.ndarray  # (cell_count, n_embd_k_gqa) float32
    v: np.ndarray  # (cell_count, n_embd_v_gqa) float32


@dataclass
class StateSection:
    """One KV cache of the context (iSWA models have two: full, then sliding-window)."""

    n_stream: int
    stream: int
    v_trans: bool
    pos: np.ndarray  # (cell_count,) int32, in cell order
    layers: list[StateLayer]

    @property
    def cell_count(self) -> int:
        return int(self.pos.shape[0])


def parse_seq_state(blob: bytes, layout: CacheLayout, n_threads: int = 0) -> list[StateSection]:
    """Parse a sequence state buffer into sections of float32 K/V.

    Raises:
        StateFormatError: when the buffer does not have the expected layout.
    """
    try:
        parsed = _native.parse_state(
            np.frombuffer(blob, dtype=np.uint8), layout.k_rot_chunk, layout.v_rot_chunk, n_threads
        )
    except ValueError as exc:
        raise StateFormatError(str(exc)) from exc
    sections = []
    for s in parsed["sections"]:
        layers = [StateLayer(layer["k_type"], layer["v_type"], layer["k"], layer["v"]) for layer in s["layers"]]
        sections.append(
            StateSection(
                n_stream=int(s["n_stream"]),
                stream=int(s["stream"]),
                v_trans=bool(s["v_trans"]),
                pos=s["pos"],
                layers=layers,
            )
        )
    return sections


def build_seq_state(
    sections: list[tuple[int, int, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]],
    seq_id: int,
    layout: CacheLayout,
    n_threads: int = 0,
) -> bytes:
    """Build a state buffer for `llama_state_seq_set_data`.

    Args:
        sections: per KV cache (n_stream, stream, pos (cell_count,) int32,
            [(K (cell_count, n_embd_k_gqa), V (cell_count, n_embd_v_gqa)) per layer]).
        seq_id: the sequence written into the buffer's header.
        layout: the receiving context's cache types, V layout and rotation.
    """
    items = [
        {"n_stream": n_stream, "stream": stream, "pos": pos, "layers": layers}
        for n_stream, stream, pos, layers in sections
    ]
    return _native.build_state(
        items,
        seq_id,
        layout.type_k,
        layout.type_v,
        layout.v_trans,
        layout.k_rot_chunk,
        layout.v_rot_chunk,
        n_threads,
    )
