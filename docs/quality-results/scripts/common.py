"""Setup shared by the analysis scripts in this folder: options, text contexts, Llama settings, the hop chain.

Running a script (`python docs/quality-results/scripts/NAME.py`) puts this folder on
the import path, so the scripts import this module as `common`.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from qkvshare_edge import Llama
from qkvshare_edge.card import CacheCard
from qkvshare_edge.models import resolve_model
from qkvshare_edge.quality import DEFAULT_HOP_REPLY_TOKENS, HOP_INSTRUCTION, EvalItem, Tokenizer, text_items

# Teacher-forced positions scored, as `qkvedge eval quality` does by default.
CONTINUATION_TOKENS = 64


def add_arguments(parser: argparse.ArgumentParser, n_contexts: int, threads: int) -> None:
    """Add the options every script takes: --model, --text, --n-contexts, --context-tokens, --threads."""
    parser.add_argument("--model", default="gemma3-270m", help="registry name or .gguf path")
    parser.add_argument("--text", required=True, help="plain-text file cut into contexts")
    parser.add_argument("--n-contexts", type=int, default=n_contexts)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=threads)


def load_items(args: argparse.Namespace, continuation_tokens: int = CONTINUATION_TOKENS) -> tuple[str, list[EvalItem]]:
    """Resolve --model and cut --text into contexts as the quality harness does (seed 0)."""
    path = str(resolve_model(args.model))
    tokenizer = Tokenizer(path)
    try:
        with open(args.text, encoding="utf-8") as f:
            items = text_items(
                tokenizer,
                f.read(),
                n_context_tokens=args.context_tokens,
                continuation_tokens=continuation_tokens,
                n_contexts=args.n_contexts,
                seed=0,
            )
    finally:
        tokenizer.close()
    return path, items


def context_options(n_ctx: int, threads: int) -> dict[str, Any]:
    """Return Llama keyword arguments: n_ctx, threads, flash attention off, quiet."""
    return {"n_ctx": n_ctx, "n_threads": threads, "n_threads_batch": threads, "flash_attn": False, "verbose": False}


def continuation_logits(receiver: Llama, card: CacheCard, follow: list[int]) -> np.ndarray:
    """Import `card` into `receiver` (created with logits_all=True), decode `follow`, return its logits."""
    receiver.import_card(card, replace=True)
    receiver.eval(follow)
    return np.array(receiver.scores[card.n_tokens : card.n_tokens + len(follow)], dtype=np.float64)


class LosslessChain:
    """The lossless chain of `qkvedge eval quality`: per hop the agent note and a greedy reply."""

    def __init__(self, worker: Llama) -> None:
        self.worker = worker
        self.instruction = worker.tokenize(HOP_INSTRUCTION.encode("utf-8"), add_bos=False)
        # Banned from replies, as in the harness, so no hop appends an end of text.
        self.end_tokens = [int(worker._model.token_eos()), int(worker._model.token_eot())]

    def next_hop(self, lossless: CacheCard) -> tuple[CacheCard, list[int]]:
        """Return the next hop's lossless card and the tokens it appended.

        The worker is left with that hop's context decoded, so it can export
        other cards of it.
        """
        worker = self.worker
        worker.clear_cache()
        worker.import_card(lossless)
        worker.eval(self.instruction)
        reply: list[int] = []
        for _ in range(DEFAULT_HOP_REPLY_TOKENS):
            logits = worker.last_logits().copy()
            logits[self.end_tokens] = -np.inf
            reply.append(int(np.argmax(logits)))
            worker.eval(reply[-1:])
        appended = self.instruction + reply
        # Decoded again in one batch, as the harness does for every chain.
        worker.clear_cache()
        worker.import_card(lossless)
        worker.eval(appended)
        return worker.export_card(budget=16.0), appended
