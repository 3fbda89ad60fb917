"""Hop-stable re-export: unchanged tokens keep their codes from the card they arrived in."""

from __future__ import annotations

import numpy as np
import pytest

from qkvshare_edge import CacheCard

# Small key blocks, so that most blocks of the first card are unchanged in the second.
K_BLOCK = 16


def two_hops(
    new_llama, gemma3_path, text_tokens, budget_1: float, budget_2: float, k_layout: str = "channel"
) -> tuple[CacheCard, CacheCard]:
    sender = new_llama(gemma3_path, flash_attn=False)
    sender.eval(text_tokens[:100])
    first = CacheCard.from_bytes(sender.export_card(budget=budget_1, k_layout=k_layout, k_block=K_BLOCK).to_bytes())
    receiver = new_llama(gemma3_path, flash_attn=False)
    receiver.import_card(first)
    receiver.eval(text_tokens[100:110])
    return first, receiver.export_card(budget=budget_2, k_layout=k_layout, k_block=K_BLOCK)


def whole_blocks(old_positions: np.ndarray, new_positions: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Mask over `common`: positions whose channel block holds the same positions in both cards."""
    keep = np.zeros(common.shape[0], dtype=bool)
    for block in np.unique(common // K_BLOCK):
        old = old_positions[old_positions // K_BLOCK == block]
        new = new_positions[new_positions // K_BLOCK == block]
        if np.array_equal(old, new):
            keep |= common // K_BLOCK == block
    return keep


def test_second_hop_provenance(new_llama, gemma3_path, text_tokens) -> None:
    first, second = two_hops(new_llama, gemma3_path, text_tokens, 5.0, 5.0)
    assert second.provenance.hop == 2
    assert second.provenance.parent_sha256 == first.sha256


@pytest.mark.parametrize("k_layout", ["channel", "row"])
@pytest.mark.parametrize(("budget_1", "budget_2"), [(5.0, 5.0), (4.5, 8.0), (8.0, 4.5)])
def test_unchanged_rows_bit_identical(
    new_llama, gemma3_path, text_tokens, budget_1: float, budget_2: float, k_layout: str
) -> None:
    first, second = two_hops(new_llama, gemma3_path, text_tokens, budget_1, budget_2, k_layout)
    assert second.k_layout == k_layout
    n_compared = {"K": 0, "V": 0}
    for s, (old, new) in enumerate(zip(first.sections, second.sections, strict=True)):
        common = np.intersect1d(old.positions, new.positions)
        at_old = np.searchsorted(old.positions, common)
        at_new = np.searchsorted(new.positions, common)
        for j, (old_layer, new_layer) in enumerate(zip(old.layers, new.layers, strict=True)):
            old_k, old_v = first.decode_layer(s, j)
            new_k, new_v = second.decode_layer(s, j)
            for name, old_bits, new_bits, a, b in (
                ("K", old_layer.k_bits, new_layer.k_bits, old_k, new_k),
                ("V", old_layer.v_bits, new_layer.v_bits, old_v, new_v),
            ):
                # A reused row never gets wider than it was.
                assert np.all(new_bits[at_new] <= old_bits[at_old]), f"section {s} layer {j} {name} widened"
                kept = new_bits[at_new] == old_bits[at_old]
                if name == "K" and k_layout == "channel":
                    # Keys share ranges within a block: rows of a block that gained
                    # or lost tokens are quantized again; whole unchanged blocks are copied.
                    for block in np.unique(common // K_BLOCK):
                        in_block = common // K_BLOCK == block
                        if not np.all(kept[in_block]):
                            kept &= ~in_block
                    kept &= whole_blocks(old.positions, new.positions, common)
                n_compared[name] += int(kept.sum())
                assert np.array_equal(a[at_old][kept], b[at_new][kept]), f"section {s} layer {j} {name} changed"
    if budget_2 >= budget_1:
        # A lower second budget may narrow every row, so nothing is reused then.
        assert n_compared["K"] > 0, n_compared
        assert n_compared["V"] > 0, n_compared


@pytest.mark.parametrize("budget", [4.5, 5.0, 6.0])
def test_reused_card_within_budget(new_llama, gemma3_path, text_tokens, budget: float) -> None:
    _, second = two_hops(new_llama, gemma3_path, text_tokens, 8.0, budget)
    assert second.bits_per_element <= budget
    assert second.payload_bytes <= budget * second.n_elements / 8
