"""The `qkvedge demo` handoff: one agent reads, another continues from its card.

The sender reads a long context and exports a CacheCard. A receiver in a
separate process (`qkvedge receive`) imports the card and answers a question
without re-prefill, then measures re-prefilling the same context for
comparison. Both receivers decode greedily, so their first tokens can be
compared one for one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import llama_cpp

from . import state
from .card import CacheCard
from .llama import Llama

logger = logging.getLogger(__name__)

DEMO_QUESTION = "\n\nQuestion: How much does the annual membership fee cost, and who can skip it?\nAnswer:"


def demo_context() -> str:
    """Return the demo's context text (garden notes written for this project)."""
    return resources.files("qkvshare_edge").joinpath("data/demo_context.txt").read_text(encoding="utf-8")


def build_context_tokens(llm: Llama, n_tokens: int) -> list[int]:
    """Tokenize the demo text, repeated as needed, to exactly `n_tokens` tokens (BOS included)."""
    text = demo_context()
    tokens = llm.tokenize(text.encode("utf-8"))
    while len(tokens) < n_tokens:
        tokens += llm.tokenize(("\n\n" + text).encode("utf-8"), add_bos=False)
    return tokens[:n_tokens]


@dataclass
class SenderResult:
    """Sender results: context size, card and llama.cpp state sizes, prefill and export times."""

    n_tokens: int
    prefill_ms: float
    export_ms: float
    card_bytes: int
    state_bytes: int
    bits_per_element: float


def run_sender(
    model_path: str,
    card_path: Path,
    *,
    n_tokens: int,
    budget: float,
    controller: str,
    n_ctx: int,
    n_threads: int | None,
) -> SenderResult:
    """Read the demo context with one agent and save its card to `card_path`."""
    llm = Llama(model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    tokens = build_context_tokens(llm, n_tokens)
    start = time.perf_counter()
    llm.eval(tokens)
    prefill_ms = (time.perf_counter() - start) * 1e3

    start = time.perf_counter()
    card = llm.export_card(budget=budget, controller=controller)
    card.save(card_path)
    export_ms = (time.perf_counter() - start) * 1e3
    state_bytes = len(state.read_seq_state(llm.ctx, 0))
    return SenderResult(
        len(tokens), prefill_ms, export_ms, card_path.stat().st_size, state_bytes, card.bits_per_element
    )


@dataclass
class ReceiverResult:
    """Receiver results: time to first token by path, and the generated tokens."""

    card_ttft_ms: float
    import_ms: float
    reprefill_ttft_ms: float
    card_tokens: list[int]
    reprefill_tokens: list[int]
    answer: str


def _first_token_and_rest(llm: Llama, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Generate greedily; return the ms until the first token and the generated ids."""
    start = time.perf_counter()
    ttft_ms = 0.0
    generated: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if not generated:
            ttft_ms = (time.perf_counter() - start) * 1e3
        generated.append(int(token))
        if token == llm.token_eos() or len(generated) >= max_tokens:
            break
    return ttft_ms, generated


def run_receiver(
    model_path: str, card_path: Path, *, question: str, max_tokens: int, n_ctx: int, n_threads: int | None
) -> ReceiverResult:
    """Import the card and answer `question`, then re-prefill the same context and answer again."""
    llm = Llama(model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    follow_up = llm.tokenize(question.encode("utf-8"), add_bos=False)
    # Warm up the compute graph once so neither path pays for the first decode.
    llm.eval(follow_up[:4])
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    llm.n_tokens = 0

    start = time.perf_counter()
    card = CacheCard.load(card_path)
    llm.import_card(card)
    import_ms = (time.perf_counter() - start) * 1e3
    prompt = llm.cached_tokens + follow_up
    ttft_ms, card_tokens = _first_token_and_rest(llm, prompt, max_tokens)
    card_ttft_ms = import_ms + ttft_ms
    answer = llm.detokenize(card_tokens).decode("utf-8", errors="replace")

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    llm.n_tokens = 0
    reprefill_ttft_ms, reprefill_tokens = _first_token_and_rest(llm, prompt, max_tokens)
    return ReceiverResult(card_ttft_ms, import_ms, reprefill_ttft_ms, card_tokens, reprefill_tokens, answer)


def to_json(result: SenderResult | ReceiverResult) -> str:
    """Serialize a result as one JSON line."""
    return json.dumps(asdict(result))
