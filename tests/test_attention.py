"""The attention controller: queries recorded through llama.cpp's eval callback, and the scores made from them."""

from __future__ import annotations

import numpy as np
import pytest

from qkvshare_edge import state
from qkvshare_edge.attention import attention_scores, match_layers
from qkvshare_edge.controllers import ATTENTION_FLOOR, CONTROLLERS, LayerView, key_norm
from qkvshare_edge.handoff import context_layout
from qkvshare_edge.models import gemma3_swa_layers


def reference_scores(q, q_pos, k, k_pos, n_head, window):
    """attention_scores written as plain loops over queries and heads."""
    head_dim = q.shape[1] // n_head
    n_head_kv = k.shape[1] // head_dim
    total = np.zeros(k.shape[0])
    seen = np.zeros(k.shape[0])
    for i in range(q.shape[0]):
        visible = (k_pos <= q_pos[i]) & ((window == 0) | (q_pos[i] - k_pos < max(window, 1)))
        seen += visible
        for h in range(n_head):
            g = h // (n_head // n_head_kv)
            logits = k[:, g * head_dim : (g + 1) * head_dim] @ q[i, h * head_dim : (h + 1) * head_dim]
            logits = logits.astype(np.float64) / np.sqrt(head_dim)
            weights = np.where(visible, np.exp(logits - logits[visible].max()), 0.0)
            total += weights / weights.sum() * visible.sum()
    return total / (n_head * np.maximum(seen, 1))


@pytest.mark.parametrize(("n_head", "n_head_kv", "window"), [(4, 1, 0), (4, 2, 0), (2, 2, 6), (4, 1, 3)])
def test_scores_match_loops(n_head: int, n_head_kv: int, window: int) -> None:
    rng = np.random.default_rng(n_head * 10 + window)
    head_dim = 8
    k_pos = np.array([0, 1, 2, 4, 5, 7, 8, 9, 10, 11], dtype=np.int32)
    q_pos = np.array([8, 10, 11], dtype=np.int32)
    q = rng.standard_normal((3, n_head * head_dim)).astype(np.float32)
    k = rng.standard_normal((10, n_head_kv * head_dim)).astype(np.float32)
    got = attention_scores(q, q_pos, k, k_pos, n_head, window)
    np.testing.assert_allclose(got, reference_scores(q, q_pos, k, k_pos, n_head, window), rtol=1e-5, atol=1e-7)


def test_uniform_attention_scores_one() -> None:
    # Zero queries attend uniformly: every visible key scores 1, and a key outside every view scores 0.
    q = np.zeros((2, 16), dtype=np.float32)
    k = np.ones((6, 16), dtype=np.float32)
    scores = attention_scores(q, np.array([3, 4]), k, np.arange(6), n_head=2)
    np.testing.assert_allclose(scores, [1, 1, 1, 1, 1, 0])


def test_controller_falls_back_to_key_norm() -> None:
    keys = np.arange(24, dtype=np.float32).reshape(3, 8)
    view = LayerView(np.arange(3, dtype=np.int32), keys, keys.copy(), 3)
    k_scores, v_scores = CONTROLLERS["attention"](view)
    expected, _ = key_norm(view)
    np.testing.assert_array_equal(k_scores, expected)
    view.attention = np.array([0.0, 2.0, 1.0])
    k_scores, v_scores = CONTROLLERS["attention"](view)
    np.testing.assert_allclose(k_scores, ATTENTION_FLOOR + view.attention)
    np.testing.assert_allclose(v_scores, k_scores)


@pytest.mark.parametrize("flash_attn", [True, False])
def test_recorder_keeps_last_rows_and_maps_layers(new_llama, gemma3_path, text_tokens, flash_attn: bool) -> None:
    llm = new_llama(gemma3_path, flash_attn=flash_attn, attention_window=8)
    llm.eval(text_tokens[:50])
    llm.eval(text_tokens[50:53])
    recorded = llm.attention_recorder.layers(0, llm.n_tokens)
    assert recorded is not None and len(recorded) == llm.attention_recorder.n_layer
    np.testing.assert_array_equal(recorded[0].positions, np.arange(45, 53))

    # Each cache layer contains the keys of exactly one model layer: full-attention
    # layers in the first section, sliding-window layers in the second.
    sections = state.parse_seq_state(state.read_seq_state(llm.ctx, 0), context_layout(llm))
    swa = gemma3_swa_layers(len(recorded))
    expected = [[il for il, w in enumerate(swa) if not w], [il for il, w in enumerate(swa) if w]]
    for section, layers in zip(sections, expected, strict=True):
        mapping = match_layers(recorded, section.pos, [layer.k for layer in section.layers])
        assert mapping == layers
        last = int(np.searchsorted(section.pos, 52))
        for layer, il in zip(section.layers, mapping, strict=True):
            # The cache contains the recorded key rounded to f16.
            np.testing.assert_allclose(layer.k[last], recorded[il].keys[-1], rtol=2e-3, atol=2e-3)


def test_recorder_drops_positions_decoded_again(new_llama, gemma3_path, text_tokens) -> None:
    llm = new_llama(gemma3_path, attention_window=16)
    llm.eval(text_tokens[:40])
    llm.n_tokens = 30  # the next decode overwrites positions 30..
    llm._ctx.kv_cache_seq_rm(0, 30, -1)
    llm.eval(text_tokens[30:34])
    recorded = llm.attention_recorder.layers(0, llm.n_tokens)
    # Rows kept: positions 28, 29 (first decode) and 30..33 (second); positions 34.. are gone.
    np.testing.assert_array_equal(recorded[0].positions, np.arange(28, 34))


def test_recorder_starts_over_after_unlogged_decode(new_llama, gemma3_path, text_tokens) -> None:
    llm = new_llama(gemma3_path, attention_window=8, n_seq_max=2)
    llm.eval(text_tokens[:20])
    # A decode that the wrapper did not log (here: the base class's eval of another sequence would be one).
    llm.attention_recorder._n_recorded -= 1
    assert llm.attention_recorder.layers(0, llm.n_tokens) is None
    llm.eval(text_tokens[20:24])
    assert llm.attention_recorder.layers(0, llm.n_tokens) is not None


def test_recorder_per_sequence(new_llama, gemma3_path, text_tokens) -> None:
    llm = new_llama(gemma3_path, attention_window=8, n_seq_max=2)
    llm.eval(text_tokens[:20])
    llm.eval_sequence(text_tokens[:5], seq_id=1)
    assert llm.attention_recorder.layers(0, llm.n_tokens)[0].positions.tolist() == [17, 18, 19]
    assert llm.attention_recorder.layers(1, 5)[0].positions.tolist() == [0, 1, 2, 3, 4]


def test_attention_export_uses_recorded_queries(new_llama, gemma3_path, text_tokens, caplog) -> None:
    llm = new_llama(gemma3_path, attention_window=8)
    llm.eval(text_tokens[:80])
    with caplog.at_level("INFO", logger="qkvshare_edge.handoff"):
        card = llm.export_card(budget=4.0, controller="attention")
    assert "falls back" not in caplog.text
    assert card.bits_per_element <= 4.0

    off = new_llama(gemma3_path, attention_window=0)
    off.eval(text_tokens[:80])
    assert off.attention_recorder is None
    with caplog.at_level("INFO", logger="qkvshare_edge.handoff"):
        off.export_card(budget=4.0, controller="attention")
    assert "falls back to key norms" in caplog.text


def test_attention_window_negative_raises(gemma3_path) -> None:
    from qkvshare_edge import Llama

    with pytest.raises(ValueError, match="attention_window must be >= 0"):
        Llama(str(gemma3_path), attention_window=-1, verbose=False)


def test_queries_that_see_no_key_are_skipped() -> None:
    # A window cache contains positions 10..13, none of them in the view of a query at 2.
    q = np.ones((2, 8), dtype=np.float32)
    k = np.ones((4, 8), dtype=np.float32)
    scores = attention_scores(q, np.array([2, 13]), k, np.arange(10, 14), n_head=1, window=8)
    np.testing.assert_allclose(scores, [1, 1, 1, 1])


@pytest.mark.parametrize(
    "bad", [lambda n: np.full(n, np.nan), lambda n: -np.ones(n), lambda n: np.ones(n + 1)], ids=["nan", "neg", "len"]
)
def test_invalid_controller_scores_raise(new_llama, gemma3_path, text_tokens, bad) -> None:
    llm = new_llama(gemma3_path)
    llm.eval(text_tokens[:40])

    def broken(layer: LayerView):
        return bad(layer.positions.shape[0]), np.ones(layer.positions.shape[0])

    with pytest.raises(ValueError, match="controller 'broken' returned key scores"):
        llm.export_card(budget=4.0, controller=broken)
