"""Handoff on the real Gemma 3 270M (Q4_K_M) model: lossless, quality and size."""

from __future__ import annotations

import numpy as np
import pytest

from qkvshare_edge import Llama, state
from qkvshare_edge.demo import build_context_tokens
from qkvshare_edge.models import resolve_model

pytestmark = pytest.mark.real_model

N_CONTEXT = 1024
N_CONTINUATION = 64
N_CTX = 1280
# Mean KL (nats per token) allowed at budget 8 over the teacher-forced continuation.
KL_BUDGET_8 = 0.01
# A budget-4 card may take at most this share of llama.cpp's own f16 state.
SIZE_RATIO_BUDGET_4 = 0.30


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(resolve_model("gemma3-270m"))


def make_llama(model_path: str, flash_attn: bool, logits_all: bool = False) -> Llama:
    return Llama(model_path, n_ctx=N_CTX, n_threads=2, flash_attn=flash_attn, logits_all=logits_all, verbose=False)


@pytest.fixture(scope="module", params=[False, True], ids=["fa_off", "fa_on"])
def sender(request: pytest.FixtureRequest, model_path: str) -> tuple[Llama, list[int], list[int]]:
    llm = make_llama(model_path, flash_attn=request.param)
    tokens = build_context_tokens(llm, N_CONTEXT + N_CONTINUATION)
    llm.eval(tokens[:N_CONTEXT])
    return llm, tokens[:N_CONTEXT], tokens[N_CONTEXT:]


def restore_llama_state(model_path: str, flash_attn: bool, blob: bytes, tokens: list[int], **kwargs) -> Llama:
    llm = make_llama(model_path, flash_attn, **kwargs)
    assert state.write_seq_state(llm.ctx, 0, blob)
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens)
    return llm


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_lossless_matches_llama_state(sender, model_path: str) -> None:
    llm, context, continuation = sender
    flash_attn = bool(llm.context_params.flash_attn_type == 1)
    card = llm.export_card(budget=16)
    follow_up = continuation[:4]

    restored = restore_llama_state(model_path, flash_attn, state.read_seq_state(llm.ctx, 0), context)
    restored.eval(follow_up)
    expected = restored.last_logits()

    receiver = make_llama(model_path, flash_attn)
    receiver.import_card(card)
    receiver.eval(follow_up)
    got = receiver.last_logits()
    diff = float(np.abs(got - expected).max())
    assert diff == 0.0, f"card receiver vs llama.cpp restore: max abs diff {diff}"

    if not flash_attn:
        # With flash attention off the sender itself is a reference too; a
        # fresh sender avoids changing the shared fixture's sequence.
        twin = make_llama(model_path, flash_attn=False)
        twin.eval(context + follow_up)
        diff_sender = float(np.abs(got - twin.last_logits()).max())
        assert diff_sender == 0.0, f"card receiver vs sender: max abs diff {diff_sender}"


def test_budget_8_kl(sender, model_path: str) -> None:
    llm, context, continuation = sender
    flash_attn = bool(llm.context_params.flash_attn_type == 1)
    card = llm.export_card(budget=8)

    reference = restore_llama_state(model_path, flash_attn, state.read_seq_state(llm.ctx, 0), context, logits_all=True)
    reference.eval(continuation)
    ref_logits = reference.scores[N_CONTEXT : N_CONTEXT + N_CONTINUATION]

    receiver = make_llama(model_path, flash_attn, logits_all=True)
    receiver.import_card(card)
    receiver.eval(continuation)
    got_logits = receiver.scores[N_CONTEXT : N_CONTEXT + N_CONTINUATION]

    log_p = log_softmax(ref_logits)
    log_q = log_softmax(got_logits)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    top1 = float(np.mean(ref_logits.argmax(-1) == got_logits.argmax(-1)))
    print(f"budget 8: {card.bits_per_element:.3f} bits/element, mean KL {kl:.5f}, top-1 agreement {top1:.3f}")
    assert kl <= KL_BUDGET_8, f"mean KL {kl:.5f} > {KL_BUDGET_8} at budget 8"


def test_budget_4_size(sender) -> None:
    llm, _, _ = sender
    card = llm.export_card(budget=4)
    card_bytes = len(card.to_bytes())
    state_bytes = len(state.read_seq_state(llm.ctx, 0))
    ratio = card_bytes / state_bytes
    print(f"budget 4: card {card_bytes} bytes, llama.cpp state {state_bytes} bytes, ratio {ratio:.3f}")
    assert ratio <= SIZE_RATIO_BUDGET_4


def test_registry_fingerprint(model_path: str) -> None:
    from qkvshare_edge.fingerprint import fingerprint_model
    from qkvshare_edge.models import list_models

    entry = next(e for e in list_models() if e.name == "gemma3-270m")
    assert fingerprint_model(model_path).model_id == entry.model_id
