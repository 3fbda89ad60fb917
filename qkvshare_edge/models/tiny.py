"""Tiny random-weight GGUF models that llama.cpp loads, for tests and quick demos.

The models are untrained: weights are drawn from a seeded normal distribution, so the
output text is gibberish. What matters is that llama.cpp builds the same kind of KV
cache for them as for real models of the same architecture, quickly and on a CPU.

Both generators share one small SentencePiece-style vocabulary (the llama.cpp `llama`
tokenizer model): `<unk>`, `<s>`, `</s>`, the 256 byte-fallback tokens `<0x00>`..`<0xFF>`,
the printable ASCII characters and a few hundred word-start and letter-pair pieces. The
vocabulary does not depend on the seed, so models built with different seeds have
identical tensor shapes and token ids.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# Bump when the bytes written for a given seed change, so cached copies get rebuilt.
TINY_MODEL_VERSION = 1

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2

# SentencePiece marks a word start with U+2581 in place of the space.
_WORD_START = "\u2581"

# Letter pairs common in English text. They make the tokenizer merge some characters
# while most words still split into several tokens.
_LETTER_PAIRS = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou "
    "io le ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur ca el ta la ns di "
    "fo ho pe ec pr no ct us ac ot il tr ly nc et ut ss so rs un lo wa ge ie wh ee wi em "
    "ad ol rt po we na ul ni ts mo ow pa im mi ai sh ir su id os iv ia am fi ci vi pl ig "
    "tu ev ld ry mp fe bl ab gh ty op wo sa ay ex ke fr oo av ag if ap gr od bo sp rd do "
    "uc bu ei ov by rm ep tt oc fa ef cu rn sc gi da yo cr cl du ga qu ue ff ba ey ls va "
    "um pp ua up lu go ht ru ug ds lt pi rc rr eg au ck ew mu br bi pt ak pu ui rg ib tl "
    "ny ki rk ys ob mm fu ph og ms ye ud mb ip ub oi rl gu dr hr cc tw ft wn nu af hu nn "
    "eo vo rv nf xp gn sm fl iz ok nl my gl aw ju oa eq sy sl ps jo"
).split()

_GGUF_TOKEN_NORMAL = 1
_GGUF_TOKEN_UNKNOWN = 2
_GGUF_TOKEN_CONTROL = 3
_GGUF_TOKEN_BYTE = 6


@dataclass(frozen=True)
class TinyVocab:
    """Token texts, merge scores and GGUF token types of the shared tiny vocabulary."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    token_types: tuple[int, ...]


def build_tiny_vocab() -> TinyVocab:
    """Build the SentencePiece-style vocabulary shared by all tiny models.

    Returns:
        The vocabulary, with ids 0, 1 and 2 for `<unk>`, `<s>` and `</s>` and the byte
        tokens at ids 3..258. The result is the same on every call.
    """
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    scores: list[float] = [0.0, 0.0, 0.0]
    types: list[int] = [_GGUF_TOKEN_UNKNOWN, _GGUF_TOKEN_CONTROL, _GGUF_TOKEN_CONTROL]

    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        scores.append(0.0)
        types.append(_GGUF_TOKEN_BYTE)

    # Merge pieces: the SPM tokenizer merges the adjacent pair with the highest score
    # first, so longer pieces get higher scores than the characters they are built of.
    pieces: list[tuple[str, float]] = [(_WORD_START, -1000.0)]
    pieces += [(chr(code), -1000.0 - code) for code in range(33, 127)]
    pieces += [(_WORD_START + chr(code), -100.0 - code) for code in range(ord("a"), ord("z") + 1)]
    seen: set[str] = set()
    for rank, pair in enumerate(_LETTER_PAIRS):
        if pair not in seen:
            seen.add(pair)
            pieces.append((pair, -200.0 - rank))

    for text, score in pieces:
        tokens.append(text)
        scores.append(score)
        types.append(_GGUF_TOKEN_NORMAL)

    return TinyVocab(tuple(tokens), tuple(scores), tuple(types))


@dataclass(frozen=True)
class _Dims:
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_layer: int
    n_ff: int


def _check_dims(dims: _Dims, n_ctx_train: int) -> None:
    for name in ("n_embd", "n_head", "n_head_kv", "head_dim", "n_layer", "n_ff"):
        value = getattr(dims, name)
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if dims.n_head % dims.n_head_kv != 0:
        raise ValueError(f"n_head ({dims.n_head}) must be a multiple of n_head_kv ({dims.n_head_kv})")
    if dims.head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE, got {dims.head_dim}")
    if n_ctx_train <= 0:
        raise ValueError(f"n_ctx_train must be positive, got {n_ctx_train}")


class _WeightSource:
    """Seeded normal weights, drawn in a fixed order so a seed always gives the same bytes."""

    def __init__(self, seed: int, std: float) -> None:
        self._rng = np.random.default_rng(seed)
        self._std = std

    def matrix(self, rows: int, cols: int) -> np.ndarray:
        """Draw an f16 matrix with numpy shape (rows, cols), which is GGUF shape {cols, rows}."""
        values = self._rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(self._std)
        return values.astype(np.float16)


def _ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


def _add_common_metadata(writer: gguf.GGUFWriter, dims: _Dims, *, name: str, n_ctx_train: int) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(dims.n_embd)
    writer.add_block_count(dims.n_layer)
    writer.add_feed_forward_length(dims.n_ff)
    writer.add_head_count(dims.n_head)
    writer.add_head_count_kv(dims.n_head_kv)
    writer.add_key_length(dims.head_dim)
    writer.add_value_length(dims.head_dim)
    writer.add_rope_dimension_count(dims.head_dim)
    writer.add_layer_norm_rms_eps(1e-6)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: TinyVocab) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_scores(list(vocab.scores))
    writer.add_token_types(list(vocab.token_types))
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _add_attention_and_ffn(
    writer: gguf.GGUFWriter,
    weights: _WeightSource,
    dims: _Dims,
    layer: int,
) -> None:
    prefix = f"blk.{layer}"
    q_dim = dims.n_head * dims.head_dim
    kv_dim = dims.n_head_kv * dims.head_dim
    writer.add_tensor(f"{prefix}.attn_q.weight", weights.matrix(q_dim, dims.n_embd))
    writer.add_tensor(f"{prefix}.attn_k.weight", weights.matrix(kv_dim, dims.n_embd))
    writer.add_tensor(f"{prefix}.attn_v.weight", weights.matrix(kv_dim, dims.n_embd))
    writer.add_tensor(f"{prefix}.attn_output.weight", weights.matrix(dims.n_embd, q_dim))
    writer.add_tensor(f"{prefix}.ffn_gate.weight", weights.matrix(dims.n_ff, dims.n_embd))
    writer.add_tensor(f"{prefix}.ffn_up.weight", weights.matrix(dims.n_ff, dims.n_embd))
    writer.add_tensor(f"{prefix}.ffn_down.weight", weights.matrix(dims.n_embd, dims.n_ff))


def _write_file(writer: gguf.GGUFWriter, path: Path) -> None:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 256,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 512,
    n_ctx_train: int = 2048,
    std: float = 0.05,
) -> Path:
    """Write a random-weight `llama` GGUF model with grouped-query attention.

    The head size is `n_embd // n_head`. Matrices are f16, norm weights are 1.0 in f32,
    and the output projection is a separate tensor (not tied to the token embeddings).

    Args:
        path: Destination file. It is overwritten if it exists; the parent must exist.
        seed: Seed for numpy's default generator. The same seed and arguments give a
            byte-identical file under the same numpy version.
        n_layer: Number of transformer blocks.
        n_embd: Embedding width.
        n_head: Number of query heads. Must divide `n_embd`.
        n_head_kv: Number of key/value heads. Must divide `n_head`.
        n_ff: Hidden width of the feed-forward network.
        n_ctx_train: Training context length in tokens, stored as metadata.
        std: Standard deviation of the weights.

    Returns:
        `path` as a `Path`.

    Raises:
        ValueError: If the sizes are inconsistent.
    """
    import gguf

    if n_head <= 0 or n_embd % n_head != 0:
        raise ValueError(f"n_head ({n_head}) must be positive and divide n_embd ({n_embd})")
    vocab = build_tiny_vocab()
    dims = _Dims(
        n_vocab=len(vocab.tokens),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=n_embd // n_head,
        n_layer=n_layer,
        n_ff=n_ff,
    )
    _check_dims(dims, n_ctx_train)
    out_path = Path(path)

    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_common_metadata(writer, dims, name=f"qkvshare-edge tiny llama seed {seed}", n_ctx_train=n_ctx_train)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(dims.n_vocab)
    _add_tokenizer(writer, vocab)

    weights = _WeightSource(seed, std)
    writer.add_tensor("token_embd.weight", weights.matrix(dims.n_vocab, n_embd))
    for layer in range(n_layer):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", _ones(n_embd))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", _ones(n_embd))
        _add_attention_and_ffn(writer, weights, dims, layer)
    writer.add_tensor("output_norm.weight", _ones(n_embd))
    writer.add_tensor("output.weight", weights.matrix(dims.n_vocab, n_embd))

    _write_file(writer, out_path)
    logger.debug("wrote tiny llama model (seed %d, %d layers) to %s", seed, n_layer, out_path)
    return out_path


def gemma3_swa_layers(n_layer: int, pattern: int = 6) -> list[bool]:
    """Return which layers use sliding-window attention in a `gemma3` model.

    This mirrors what the llama.cpp vendored by llama-cpp-python 0.3.36 does for a
    `gemma3` GGUF file without a `gemma3.attention.sliding_window_pattern` key. In each
    group of `pattern` layers the last one uses full attention and the others use the
    sliding window.

    Args:
        n_layer: Number of transformer blocks.
        pattern: Group size (6 in llama.cpp for Gemma 3).

    Returns:
        One flag per layer, True for a sliding-window layer.
    """
    return [layer % pattern < pattern - 1 for layer in range(n_layer)]


def write_tiny_gemma3(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    sliding_window: int = 32,
    n_layer: int = 6,
    n_embd: int = 256,
    n_head: int = 4,
    n_head_kv: int = 1,
    head_dim: int = 64,
    n_ff: int = 512,
    n_ctx_train: int = 2048,
    std: float = 0.05,
) -> Path:
    """Write a random-weight `gemma3` GGUF model with sliding-window attention.

    llama.cpp's default Gemma 3 layer pattern applies (see `gemma3_swa_layers`): with
    the default 6 layers, layers 0-4 use the sliding window and layer 5 uses full
    attention, so llama.cpp creates both a full-attention and a sliding-window KV cache.
    Matrices are f16, norm weights are 1.0 in f32, and the output projection is a
    separate tensor.

    Args:
        path: Destination file. It is overwritten if it exists; the parent must exist.
        seed: Seed for numpy's default generator. The same seed and arguments give a
            byte-identical file under the same numpy version.
        sliding_window: Attention window of the sliding-window layers, in tokens.
        n_layer: Number of transformer blocks. At least 6 gives both kinds of layer.
        n_embd: Embedding width.
        n_head: Number of query heads.
        n_head_kv: Number of key/value heads. Must divide `n_head`.
        head_dim: Size of each key and value head.
        n_ff: Hidden width of the feed-forward network.
        n_ctx_train: Training context length in tokens, stored as metadata.
        std: Standard deviation of the weights.

    Returns:
        `path` as a `Path`.

    Raises:
        ValueError: If the sizes are inconsistent or `sliding_window` is not positive.
    """
    import gguf

    if sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    vocab = build_tiny_vocab()
    dims = _Dims(
        n_vocab=len(vocab.tokens),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_layer=n_layer,
        n_ff=n_ff,
    )
    _check_dims(dims, n_ctx_train)
    out_path = Path(path)

    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
    _add_common_metadata(writer, dims, name=f"qkvshare-edge tiny gemma3 seed {seed}", n_ctx_train=n_ctx_train)
    # Gemma 3 uses a larger RoPE base for the full-attention layers than for the
    # sliding-window ones.
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_rope_freq_base_swa(10_000.0)
    writer.add_sliding_window(sliding_window)
    _add_tokenizer(writer, vocab)

    weights = _WeightSource(seed, std)
    writer.add_tensor("token_embd.weight", weights.matrix(dims.n_vocab, n_embd))
    for layer in range(n_layer):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", _ones(n_embd))
        writer.add_tensor(f"{prefix}.attn_q_norm.weight", _ones(head_dim))
        writer.add_tensor(f"{prefix}.attn_k_norm.weight", _ones(head_dim))
        writer.add_tensor(f"{prefix}.post_attention_norm.weight", _ones(n_embd))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", _ones(n_embd))
        writer.add_tensor(f"{prefix}.post_ffw_norm.weight", _ones(n_embd))
        _add_attention_and_ffn(writer, weights, dims, layer)
    writer.add_tensor("output_norm.weight", _ones(n_embd))
    writer.add_tensor("output.weight", weights.matrix(dims.n_vocab, n_embd))

    _write_file(writer, out_path)
    logger.debug(
        "wrote tiny gemma3 model (seed %d, %d layers, window %d) to %s",
        seed,
        n_layer,
        sliding_window,
        out_path,
    )
    return out_path
