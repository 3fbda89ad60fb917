"""Export a sequence's KV cache as a CacheCard, and import a card into a context.

Export: read llama.cpp's sequence state, decode it to float32 K/V (undoing
the cache's own type and rotation), score rows with a controller, allocate
widths under the budget, encode. Import: verify the card against the
receiving context (model, RoPE settings, room, target sequence), decode,
rebuild a state buffer in the receiver's own layout, and load it. A failed
import restores the target sequence as it was.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from . import codec, state
from .allocation import MAX_BUDGET_BITS, RowGroup, allocate
from .allocation import distortion as model_distortion
from .attention import attention_scores, match_layers
from .card import MAX_K_BLOCK, CacheCard, CardLayer, CardSection, Provenance
from .controllers import DEFAULT_CONTROLLER, Controller, LayerView, get_controller
from .errors import (
    ContextTooSmallError,
    ImportFailedError,
    ModelMismatchError,
    SequenceNotEmptyError,
    StateFormatError,
)
from .fingerprint import ModelFingerprint
from .sensitivity import LayerSensitivity
from .sensitivity import bundled as bundled_sensitivity

if TYPE_CHECKING:
    from .llama import Llama

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_BITS = 4.0
# Keys are more sensitive to quantization than values. On Gemma 3 270M
# (1024-token context, rotated rows, groups of 128), 3-bit keys with 3-bit
# values gave a mean KL of 0.54, and 4-bit keys with 2-bit values 0.017.
# So key rows get twice the importance of value rows of the same token,
# unless a sensitivity table weighs keys and values layer by layer.
DEFAULT_K_WEIGHT = 2.0
# Keys are stored per channel within blocks of this many positions (the
# channel layout of the codec) unless the card is lossless.
DEFAULT_K_LAYOUT = "channel"
DEFAULT_K_BLOCK = 128
# Per-row distortion for the allocator: "model" (1 / (2^w - 1)^2 for every
# row) or "measured" (each row encoded at every width).
DEFAULT_DISTORTION = "model"


@dataclass(frozen=True)
class HandoffTiming:
    """Stage times of one export or import, in milliseconds."""

    total_ms: float
    stages_ms: dict[str, float]


class _Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last = self.start
        self.stages: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = (now - self.last) * 1e3
        self.last = now

    def result(self) -> HandoffTiming:
        return HandoffTiming((self.last - self.start) * 1e3, dict(self.stages))


def context_layout(llm: Llama) -> state.CacheLayout:
    """Return the cache types, V layout and rotation of `llm`'s context.

    Raises:
        StateFormatError: when flash attention is left on 'auto', which hides the V layout.
    """
    params = llm.context_params
    if params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED:
        v_trans = False
    elif params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED:
        v_trans = True
    else:
        raise StateFormatError(
            "flash attention is set to 'auto', so the V cache layout is unknown; pass flash_attn=True or False"
        )
    model = llm.fingerprint
    n_head = model.hparam_int("attention.head_count", 1) or 1
    head_default = model.hparam_int("embedding_length") // n_head
    head_k = model.hparam_int("attention.key_length", head_default)
    head_v = model.hparam_int("attention.value_length", head_default)
    k_chunk, v_chunk = state.rotation_chunks(head_k, head_v, params.type_k, params.type_v)
    return state.CacheLayout(int(params.type_k), int(params.type_v), v_trans, k_chunk, v_chunk)


def _seq_pos_max(llm: Llama, seq_id: int) -> int:
    memory = llama_cpp.llama_get_memory(llm.ctx)
    return int(llama_cpp.llama_memory_seq_pos_max(memory, seq_id))


def _check_seq_id(llm: Llama, seq_id: int) -> None:
    n_seq_max = int(llama_cpp.llama_n_seq_max(llm.ctx))
    if not 0 <= seq_id < n_seq_max:
        raise ValueError(f"seq_id {seq_id} is out of range for this context (n_seq_max {n_seq_max})")


# -- export ---------------------------------------------------------------------


def export_card(
    llm: Llama,
    *,
    budget: float = DEFAULT_BUDGET_BITS,
    controller: str | Controller = DEFAULT_CONTROLLER,
    seq_id: int = 0,
    tokens: list[int] | np.ndarray | None = None,
    group_size: int | None = None,
    k_weight: float = DEFAULT_K_WEIGHT,
    k_layout: str = DEFAULT_K_LAYOUT,
    k_block: int = DEFAULT_K_BLOCK,
    distortion: str = DEFAULT_DISTORTION,
    sensitivity: LayerSensitivity | str | None = "auto",
    hop: int | None = None,
    parent_sha256: str | None = None,
    previous: CacheCard | None = None,
    previous_valid_until: int = 0,
    n_threads: int = 0,
) -> tuple[CacheCard, HandoffTiming]:
    """Export one sequence of `llm` as a card; see `Llama.export_card` for the arguments.

    `previous` is the card this sequence was imported from: rows it holds for
    positions below `previous_valid_until` (not decoded again since the
    import) keep its codes (see `_reuse_limits`).
    """
    watch = _Stopwatch()
    if not (np.isfinite(k_weight) and k_weight > 0):
        raise ValueError(f"k_weight must be a positive finite number, got {k_weight!r}")
    if k_layout not in ("row", "channel"):
        raise ValueError(f"k_layout must be 'row' or 'channel', got {k_layout!r}")
    if distortion not in ("model", "measured"):
        raise ValueError(f"distortion must be 'model' or 'measured', got {distortion!r}")
    if not 1 <= k_block <= MAX_K_BLOCK:
        raise ValueError(f"k_block must be in [1, {MAX_K_BLOCK}] positions, got {k_block!r}")
    if hop is None:
        hop = previous.provenance.hop + 1 if previous is not None else 1
    if parent_sha256 is None:
        parent_sha256 = ""
        if previous is not None:
            # A card handed over in memory has no digest yet.
            parent_sha256 = previous.sha256 or hashlib.sha256(previous.to_bytes()).hexdigest()
    _check_seq_id(llm, seq_id)
    if callable(controller):
        score, controller_name = controller, getattr(controller, "__name__", "custom")
    else:
        score, controller_name = get_controller(controller), controller
    if tokens is None:
        if seq_id != 0:
            raise ValueError(
                f"tokens are needed to export seq_id {seq_id}: the wrapper tracks token ids of seq_id 0 only"
            )
        tokens = llm.input_ids[: llm.n_tokens]
    token_array = np.asarray(tokens, dtype=np.int64)

    layout = context_layout(llm)
    blob = state.read_seq_state(llm.ctx, seq_id)
    watch.lap("read_state")
    sections = state.parse_seq_state(blob, layout, n_threads)
    sections = [s for s in sections if s.cell_count > 0] if sections else []
    if not sections:
        raise ValueError(f"sequence {seq_id} is empty; evaluate some tokens before exporting a card")
    watch.lap("decode_state")

    # Cells come in cache order; the card keeps each section in position order.
    ordered = []
    for s in sections:
        if np.all(np.diff(s.pos) > 0):
            # Already in position order (the usual case): no copy of the K/V.
            ordered.append((s.pos, [(layer.k, layer.v) for layer in s.layers]))
            continue
        order = np.argsort(s.pos, kind="stable")
        pos = s.pos[order]
        if np.any(np.diff(pos) == 0):
            raise StateFormatError(f"sequence {seq_id} contains two cells at one position; cannot export it")
        layers = [(layer.k[order], layer.v[order]) for layer in s.layers]
        ordered.append((pos, layers))
    positions = np.unique(np.concatenate([pos for pos, _ in ordered]))
    if positions[0] < 0 or positions[-1] >= token_array.shape[0]:
        raise ValueError(
            f"sequence {seq_id} contains positions {int(positions[0])}..{int(positions[-1])}, "
            f"but only {token_array.shape[0]} token ids are known; pass tokens= with one id per position"
        )
    n_tokens = int(positions[-1]) + 1

    # A lossless card keeps the row layout (f16 rows, readable as format version 1).
    if budget >= MAX_BUDGET_BITS or any(k.shape[1] % 8 for _, layers in ordered for k, _ in layers):
        k_layout = "row"
    attention = (
        _attention_per_layer(llm, seq_id, n_tokens, ordered) if getattr(score, "needs_attention", False) else None
    )
    weights = _layer_weights(llm, sensitivity, [len(layers) for _, layers in ordered])
    groups = []
    for s_index, (pos, layers) in enumerate(ordered):
        n_blocks = codec.channel_blocks(pos, k_block)
        for j, (k, v) in enumerate(layers):
            view = LayerView(pos, k, v, n_tokens, attention[s_index][j] if attention is not None else None)
            k_scores, v_scores = score(view)
            k_scores = np.asarray(k_scores, dtype=np.float64)
            v_scores = np.asarray(v_scores, dtype=np.float64)
            for part, scores in (("key", k_scores), ("value", v_scores)):
                if scores.shape != pos.shape or not np.all(np.isfinite(scores)) or np.any(scores < 0):
                    raise ValueError(
                        f"controller {controller_name!r} returned {part} scores of shape {scores.shape} for "
                        f"{pos.shape[0]} rows, or a negative or non-finite score; it must return one "
                        "finite score >= 0 per row"
                    )
            if weights is not None:
                k_scores = _unit_mean(k_scores) * weights[s_index][j][0]
                v_scores = _unit_mean(v_scores) * weights[s_index][j][1]
            else:
                k_scores = k_scores * k_weight
            k_group = RowGroup(k.shape[1], k_scores)
            if k_layout == "channel":
                n = k.shape[1]
                k_group.sizes = {w: (2 * n if w == codec.LOSSLESS_WIDTH else n * w // 8) for w in codec.WIDTHS}
                k_group.fixed_bytes = n_blocks * 4 * n
            groups.append(k_group)
            groups.append(RowGroup(v.shape[1], v_scores))
    watch.lap("score")
    if group_size is None:
        group_size = codec.default_group_size([g.n for g in groups])
    # One rotation chunk for the whole card: the largest that divides every row.
    rotation_chunk = min(codec.default_rotation_chunk(g.n) for g in groups)
    if distortion == "measured" and budget < MAX_BUDGET_BITS:
        i = 0
        for pos, layers in ordered:
            for k, v in layers:
                k_channel = (pos, k_block) if k_layout == "channel" else None
                groups[2 * i].measured = _measure(k, k_channel, group_size, rotation_chunk, n_threads)
                groups[2 * i + 1].measured = _measure(v, None, group_size, rotation_chunk, n_threads)
                i += 1
        watch.lap("measure")
    reuse = _reuse_limits(
        previous, previous_valid_until, ordered, token_array, group_size, rotation_chunk, k_layout, k_block
    )
    for group, (max_bits, _) in zip(groups, reuse, strict=True):
        group.max_bits = max_bits
    widths = allocate(groups, budget, group_size)
    watch.lap("allocate")

    card_sections, i = [], 0
    for pos, layers in ordered:
        card_layers = []
        for k, v in layers:
            k_bits, v_bits = widths[2 * i], widths[2 * i + 1]
            if k_layout == "channel":
                k_codes = codec.encode_channel(k, k_bits, pos, k_block, n_threads)
                k_codes = _splice_previous_blocks(k_codes, k_bits, pos, k.shape[1], k_block, reuse[2 * i])
            else:
                k_codes = codec.encode(k, k_bits, group_size, n_threads, rotation_chunk)
                k_codes = _splice_previous(k_codes, k_bits, k.shape[1], group_size, reuse[2 * i])
            v_codes = codec.encode(v, v_bits, group_size, n_threads, rotation_chunk)
            v_codes = _splice_previous(v_codes, v_bits, v.shape[1], group_size, reuse[2 * i + 1])
            card_layers.append(CardLayer(k.shape[1], v.shape[1], k_bits, k_codes, v_bits, v_codes))
            i += 1
        card_sections.append(CardSection(pos.astype(np.int32), card_layers))
    watch.lap("encode")

    card = CacheCard(
        model=llm.fingerprint,
        token_ids=token_array[positions].astype(np.int32),
        positions=positions.astype(np.int32),
        sections=card_sections,
        group_size=group_size,
        rotation_chunk=rotation_chunk,
        k_layout=k_layout,
        k_block=k_block if k_layout == "channel" else 0,
        provenance=Provenance(budget, controller_name, hop, parent_sha256),
        rope_freq_base=float(llm.context_params.rope_freq_base),
        rope_freq_scale=float(llm.context_params.rope_freq_scale),
    )
    timing = watch.result()
    logger.info(
        "exported seq %d: %d tokens, %d payload bytes (%.2f bits/element, budget %g, %s), %.1f ms",
        seq_id,
        card.n_tokens,
        card.payload_bytes,
        card.bits_per_element,
        budget,
        controller_name,
        timing.total_ms,
    )
    logger.debug("export stages (ms): %s", timing.stages_ms)
    return card, timing


def _unit_mean(scores: np.ndarray) -> np.ndarray:
    mean = float(scores.mean()) if scores.size else 0.0
    return scores / mean if mean > 0 and np.isfinite(mean) else np.ones_like(scores)


def _layer_weights(
    llm: Llama, sensitivity: LayerSensitivity | str | None, n_layers: list[int]
) -> list[list[tuple[float, float]]] | None:
    """Return row weights from a sensitivity table: 'auto' (the bundled one, if any), a table, a path, or None."""
    if sensitivity is None:
        return None
    if isinstance(sensitivity, str):
        table = (
            bundled_sensitivity(llm.fingerprint.model_id)
            if sensitivity == "auto"
            else LayerSensitivity.load(sensitivity)
        )
    else:
        table = sensitivity
    if table is None:
        return None
    if table.model_id != llm.fingerprint.model_id or not table.matches(n_layers):
        if sensitivity == "auto":
            return None
        raise ValueError(
            f"sensitivity table of model {table.model_id[:12]} with layers {[len(s) for s in table.sections]} "
            f"does not fit this model ({llm.fingerprint.model_id[:12]}, layers {n_layers}); "
            "measure one with `qkvedge calibrate`"
        )
    return table.row_weights()


def _measure(
    x: np.ndarray, channel: tuple[np.ndarray, int] | None, group_size: int, rotation_chunk: int, n_threads: int
) -> dict[int, np.ndarray]:
    """Squared error of each row of x at every width below 16, on the scale of `allocation.distortion`.

    The group's mean error at 2 bits is set to the model's distortion(2), so
    groups compare as in the model and only the spread between rows and the
    ratios between widths come from the measurement.
    """
    errors = {}
    for width in codec.WIDTHS:
        if width == codec.LOSSLESS_WIDTH:
            continue
        bits = np.full(x.shape[0], width, dtype=np.uint8)
        if channel is not None:
            pos, block = channel
            y = codec.decode_channel(
                codec.encode_channel(x, bits, pos, block, n_threads), bits, pos, x.shape[1], block, n_threads
            )
        else:
            payload = codec.encode(x, bits, group_size, n_threads, rotation_chunk)
            y = codec.decode(payload, bits, x.shape[1], group_size, n_threads, rotation_chunk)
        diff = (y - x).astype(np.float64)
        errors[width] = np.einsum("ij,ij->i", diff, diff)
    scale = float(errors[min(errors)].mean())
    if not np.isfinite(scale) or scale <= 0:
        return {w: np.full(x.shape[0], model_distortion(w)) for w in errors}
    factor = model_distortion(min(errors)) / scale
    return {w: e * factor for w, e in errors.items()}


def _attention_per_layer(
    llm: Llama, seq_id: int, n_tokens: int, ordered: list[tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]]
) -> list[list[np.ndarray | None]] | None:
    """Attention each cached row receives from the sequence's recorded queries, per section and layer."""
    recorder = getattr(llm, "attention_recorder", None)
    recorded = recorder.layers(seq_id, n_tokens) if recorder is not None else None
    if not recorded:
        logger.info("no recorded queries for seq %d; the attention controller falls back to key norms", seq_id)
        return None
    n_head = max(1, int(llama_cpp.llama_model_n_head(llm.model)))
    n_swa = int(llama_cpp.llama_model_n_swa(llm.model))
    out: list[list[np.ndarray | None]] = []
    for s_index, (pos, layers) in enumerate(ordered):
        # With two caches (iSWA), the second one contains the sliding-window layers.
        window = n_swa if len(ordered) == 2 and s_index == 1 else 0
        mapping = match_layers(recorded, pos, [k for k, _ in layers])
        scores: list[np.ndarray | None] = []
        for (k, _), il in zip(layers, mapping, strict=True):
            if il is None:
                scores.append(None)
                continue
            r = recorded[il]
            scores.append(attention_scores(r.queries, r.positions, k, pos, n_head, window))
        out.append(scores)
    return out


# (max_bits per row or None, (rows, old rows, old widths, old payload, old positions) or None) per row group.
_Reuse = tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None]


def _reuse_limits(
    previous: CacheCard | None,
    valid_until: int,
    ordered: list[tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]],
    token_array: np.ndarray,
    group_size: int,
    rotation_chunk: int,
    k_layout: str,
    k_block: int,
) -> list[_Reuse]:
    """Find rows that `previous` already holds, to keep their codes across hops.

    A row is reused when its position is below `valid_until` (nothing was
    decoded again there since the import: K/V at a position depend on every
    token before it) and the previous card has the same section, position and
    token id, and the same codec parameters. Its width is then capped at the
    old width (more bits cannot bring back what the old card dropped), and
    when the allocator keeps the old width, the old bytes are copied, so an
    unchanged token does not lose precision again at every hop. Keys in the
    channel layout are copied by block: a block is copied when it holds the
    same positions as the old card's block, all reused at their old widths.
    The rows of a block that gained tokens (the last one, and the first one
    of a sliding window that moved) are quantized again with the block's new
    ranges.

    NOTE: a cell is taken as unchanged when it was not decoded again; llama.cpp
    also rewrites cells when it shifts positions (context shift), which
    llama-cpp-python does not do on its own.
    """
    n_groups = 2 * sum(len(layers) for _, layers in ordered)
    compatible = (
        previous is not None
        and previous.group_size == group_size
        and previous.rotation_chunk == rotation_chunk
        and len(previous.sections) == len(ordered)
    )
    if not compatible:
        return [(None, None)] * n_groups
    assert previous is not None
    same_k_layout = previous.k_layout == k_layout and (k_layout == "row" or previous.k_block == k_block)
    token_at = dict(zip(previous.positions.tolist(), previous.token_ids.tolist(), strict=True))
    out: list[_Reuse] = []
    for (pos, layers), old in zip(ordered, previous.sections, strict=True):
        # Rows of the new section whose position and token the old section holds.
        index = np.searchsorted(old.positions, pos)
        index = np.minimum(index, old.positions.shape[0] - 1)
        same = (old.positions[index] == pos) & (pos < valid_until)
        same &= np.array([token_at.get(int(p)) == int(token_array[p]) for p in pos], dtype=bool)
        for (k, v), old_layer in zip(layers, old.layers, strict=True):
            for n, old_n, old_bits, old_codes, same_layout in (
                (k.shape[1], old_layer.n_embd_k, old_layer.k_bits, old_layer.k_codes, same_k_layout),
                (v.shape[1], old_layer.n_embd_v, old_layer.v_bits, old_layer.v_codes, True),
            ):
                if not same.any() or n != old_n:
                    out.append((None, None))
                    continue
                max_bits = np.full(pos.shape[0], codec.LOSSLESS_WIDTH, dtype=np.uint8)
                max_bits[same] = old_bits[index[same]]
                if not same_layout:
                    # Codes of another layout cannot be copied; the widths are still capped.
                    out.append((max_bits, None))
                    continue
                out.append((max_bits, (np.flatnonzero(same), index[same], old_bits, old_codes, old.positions)))
    return out


def _row_offsets(bits: np.ndarray, n: int, group_size: int) -> np.ndarray:
    table = np.zeros(codec.LOSSLESS_WIDTH + 1, dtype=np.int64)
    for width, size in codec.row_bytes_table(n, group_size).items():
        table[width] = size
    sizes = table[bits]
    return np.concatenate(([0], np.cumsum(sizes)))


def _splice_previous(codes: np.ndarray, bits: np.ndarray, n: int, group_size: int, reuse: _Reuse) -> np.ndarray:
    """Copy the previous card's bytes into `codes` for reused rows that kept their old width."""
    _, source = reuse
    if source is None:
        return codes
    rows, old_rows, old_bits, old_codes, _ = source
    keep = bits[rows] == old_bits[old_rows]
    rows, old_rows = rows[keep], old_rows[keep]
    if rows.size == 0:
        return codes
    new_offsets = _row_offsets(bits, n, group_size)
    old_offsets = _row_offsets(old_bits, n, group_size)
    out = codes.copy()
    for new_row, old_row in zip(rows.tolist(), old_rows.tolist(), strict=True):
        start, end = old_offsets[old_row], old_offsets[old_row + 1]
        out[new_offsets[new_row] : new_offsets[new_row] + (end - start)] = old_codes[start:end]
    return out


def _block_offsets(bits: np.ndarray, positions: np.ndarray, n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (first row of each channel block plus the row count, byte offset of each block plus the total)."""
    ids = positions.astype(np.int64) // block
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    sizes = np.where(bits == codec.LOSSLESS_WIDTH, 2 * n, n * bits.astype(np.int64) // 8)
    quantized = np.add.reduceat((bits != codec.LOSSLESS_WIDTH).astype(np.int64), starts) > 0
    block_bytes = np.add.reduceat(sizes, starts) + 4 * n * quantized
    return np.append(starts, bits.shape[0]), np.concatenate(([0], np.cumsum(block_bytes)))


def _splice_previous_blocks(
    codes: np.ndarray, bits: np.ndarray, positions: np.ndarray, n: int, block: int, reuse: _Reuse
) -> np.ndarray:
    """Copy the previous card's bytes into channel-layout `codes` for blocks that are unchanged as a whole."""
    _, source = reuse
    if source is None or positions.shape[0] == 0:
        return codes
    rows, old_rows, old_bits, old_codes, old_positions = source
    old_of = np.full(positions.shape[0], -1, dtype=np.int64)
    same_width = bits[rows] == old_bits[old_rows]
    old_of[rows[same_width]] = old_rows[same_width]
    starts, offsets = _block_offsets(bits, positions, n, block)
    old_starts, old_offsets = _block_offsets(old_bits, old_positions, n, block)
    out = codes
    for b in range(starts.shape[0] - 1):
        first, end = int(starts[b]), int(starts[b + 1])
        mapped = old_of[first:end]
        if np.any(mapped < 0) or np.any(np.diff(mapped) != 1):
            continue
        # The old block must consist of exactly these rows.
        old_b = int(np.searchsorted(old_starts, mapped[0]))
        if (
            old_b >= old_starts.shape[0] - 1
            or old_starts[old_b] != mapped[0]
            or old_starts[old_b + 1] != mapped[-1] + 1
        ):
            continue
        if out is codes:
            out = codes.copy()
        out[offsets[b] : offsets[b + 1]] = old_codes[old_offsets[old_b] : old_offsets[old_b + 1]]
    return out


# -- import ---------------------------------------------------------------------


def check_card(llm: Llama, card: CacheCard, seq_id: int) -> None:
    """Check that `card` fits `llm`'s model, settings and context; raise the matching error."""
    _check_seq_id(llm, seq_id)
    expected: ModelFingerprint = llm.fingerprint
    diffs = expected.differences(card.model)
    if diffs:
        raise ModelMismatchError(
            f"card was made by a different model than {llm.model_path}: {'; '.join(diffs[:4])}. "
            "Import it into a context of the model that exported it."
        )
    for name, mine, theirs in (
        ("rope_freq_base", float(llm.context_params.rope_freq_base), card.rope_freq_base),
        ("rope_freq_scale", float(llm.context_params.rope_freq_scale), card.rope_freq_scale),
    ):
        if np.float32(mine) != np.float32(theirs):
            raise ModelMismatchError(
                f"context {name} differs: card {theirs:g}, receiver {mine:g} (0 means the model default); "
                f"create the receiver with {name}={theirs:g}"
            )
    n_vocab = llm.n_vocab()
    if int(card.token_ids.max()) >= n_vocab:
        raise ModelMismatchError(
            f"card contains token id {int(card.token_ids.max())}, but the vocabulary has {n_vocab} tokens"
        )

    n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(llm.ctx))
    largest = max(s.n_cells for s in card.sections)
    if largest > n_ctx_seq:
        raise ContextTooSmallError(
            f"card contains {largest} cells but the receiver's sequences have room for {n_ctx_seq} "
            f"(n_ctx {llm.n_ctx()}, n_seq_max {llama_cpp.llama_n_seq_max(llm.ctx)}); "
            f"create the receiver with n_ctx >= {largest} per sequence"
        )
    _check_free_cells(llm, card, seq_id)
    if seq_id == 0:
        room = min(llm.n_ctx(), n_ctx_seq)
        if card.n_tokens >= room:
            raise ContextTooSmallError(
                f"card contains {card.n_tokens} tokens, leaving no room to continue in n_ctx {llm.n_ctx()} "
                f"({n_ctx_seq} cells per sequence); create the receiver with room for more than {card.n_tokens}"
            )
        if card.positions[0] != 0 or card.positions[-1] != card.n_tokens - 1:
            raise ValueError(
                "card positions are not 0..n_tokens-1, which llama-cpp-python's token bookkeeping of seq_id 0 "
                "needs; import it into another seq_id"
            )


def _check_free_cells(llm: Llama, card: CacheCard, seq_id: int) -> None:
    """In a cache shared by several sequences, check that the others leave room for the card."""
    n_seq_max = int(llama_cpp.llama_n_seq_max(llm.ctx))
    if n_seq_max == 1 or not llm.context_params.kv_unified or len(card.sections) != 1:
        # NOTE: for iSWA models the occupancy of the full-attention cache is not
        # visible through llama.cpp's API; llama.cpp's own slot search decides,
        # and a failed import is rolled back.
        return
    # Sequences may share cells (llama_memory_seq_cp), so the largest other
    # sequence is a lower bound of the cells in use: the check never rejects a
    # card that fits, and llama.cpp's slot search catches the rest.
    memory = llama_cpp.llama_get_memory(llm.ctx)
    used = 0
    for other in range(n_seq_max):
        pos_max = int(llama_cpp.llama_memory_seq_pos_max(memory, other))
        if other != seq_id and pos_max >= 0:
            used = max(used, pos_max - int(llama_cpp.llama_memory_seq_pos_min(memory, other)) + 1)
    free = int(llama_cpp.llama_n_ctx_seq(llm.ctx)) - used
    if card.sections[0].n_cells > free:
        raise ContextTooSmallError(
            f"card contains {card.sections[0].n_cells} cells but the shared KV cache has at most {free} free "
            f"(n_ctx {llm.n_ctx()}, another sequence uses {used}); free a sequence or raise n_ctx"
        )


def import_card(
    llm: Llama,
    card: CacheCard,
    *,
    seq_id: int = 0,
    replace: bool = False,
    n_threads: int = 0,
) -> HandoffTiming:
    """Import `card` into one sequence of `llm`; see `Llama.import_card` for the arguments."""
    watch = _Stopwatch()
    check_card(llm, card, seq_id)
    layout = context_layout(llm)

    # Nothing is written before every check has passed, so a failed check
    # leaves the receiver untouched.
    previous: bytes | None = None
    last_pos = _seq_pos_max(llm, seq_id)
    if last_pos >= 0:
        if not replace:
            raise SequenceNotEmptyError(
                f"seq_id {seq_id} already contains tokens (up to position {last_pos}); "
                "pass replace=True to overwrite them or import into an empty sequence"
            )
        previous = state.read_seq_state(llm.ctx, seq_id)

    # The receiver's own (empty or current) state shows how many caches and
    # streams it has, and the card must have one section per cache. The
    # snapshot taken for a rollback serves for this too, so it is read once.
    current = previous if previous is not None else state.read_seq_state(llm.ctx, seq_id)
    template = state.parse_seq_state(current, layout, n_threads)
    if len(template) != len(card.sections):
        raise ModelMismatchError(
            f"card has {len(card.sections)} KV cache sections, the receiver has {len(template)}; "
            "the receiving model or its sliding-window setup differs"
        )
    watch.lap("verify")

    built = []
    for s, (section, receiver) in enumerate(zip(card.sections, template, strict=True)):
        layers = [card.decode_layer(s, j, n_threads) for j in range(len(section.layers))]
        stream = seq_id if seq_id < receiver.n_stream else 0
        built.append((receiver.n_stream, stream, section.positions, layers))
    watch.lap("decode_card")
    blob = state.build_seq_state(built, seq_id, layout, n_threads)
    watch.lap("build_state")

    if previous is not None:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), seq_id, -1, -1)
    ok = state.write_seq_state(llm.ctx, seq_id, blob)
    if ok and _seq_pos_max(llm, seq_id) != int(card.positions[-1]):
        ok = False
    if not ok:
        _rollback(llm, seq_id, previous)
        raise ImportFailedError(
            f"llama.cpp rejected the card's state for seq_id {seq_id} ({layout.describe()}); the sequence was "
            "restored to its previous content. llama.cpp's log names the cause (often: no free cells)"
        )
    watch.lap("set_state")

    if seq_id == 0:
        llm.input_ids[: card.n_tokens] = card.token_ids
        llm.n_tokens = card.n_tokens
        # The logits of the last card token are not computed yet.
        llm._requires_eval = True

    timing = watch.result()
    logger.info(
        "imported card into seq %d: %d tokens, %d payload bytes (%.2f bits/element, budget %g), %.1f ms",
        seq_id,
        card.n_tokens,
        card.payload_bytes,
        card.bits_per_element,
        card.provenance.budget_bits,
        timing.total_ms,
    )
    logger.debug("import stages (ms): %s", timing.stages_ms)
    return timing


def _rollback(llm: Llama, seq_id: int, previous: bytes | None) -> None:
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), seq_id, -1, -1)
    if previous is not None and not state.write_seq_state(llm.ctx, seq_id, previous):
        # NOTE: restoring a state llama.cpp itself wrote a moment ago has not been seen to fail.
        logger.error("could not restore seq %d after a failed import; the sequence is now empty", seq_id)
