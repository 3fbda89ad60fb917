"""Hop-H against hop-1 KL under two variants of the harness's hop protocol.

`qkvedge eval quality` appends at every hop the agent note and a 16-token
greedy reply of the lossless chain, and scores every hop on the text that
followed the original context. This script runs such chains with the
entries `uniform:flat`, `uniform` and `attention` and scores each chain's
hop-1 and hop-H cards (and the hop-H card made once from the lossless
chain's context) on a 64-token continuation. `--appended` picks what the
hops append:

- `reply` (the harness): the note and the greedy reply. Two continuations
  are scored: `text`, the original text's next tokens, as the harness does,
  and `own`, the lossless chain's next 64 greedy tokens at that hop (end of
  text banned).
- `text`: the text's next tokens, as many per hop as the note and reply
  hold (23 on Gemma 3 270M). Each hop then reads on where the last one
  stopped, and the scored `text` continuation follows the last appended
  tokens, as it follows the context at hop 1.

`--reused-rows keep` changes the export for the run: rows that the
imported card holds take their old widths before any new row gets bits
(one of the rules that `docs/quality.md` reports as tried and dropped).

    python docs/quality-results/scripts/hop_variants.py --model gemma3-270m-f32 --text /tmp/licenses.txt
    python docs/quality-results/scripts/hop_variants.py --model gemma3-270m-f32 --text /tmp/licenses.txt \\
        --appended text
"""

from __future__ import annotations

import argparse

import numpy as np
from common import CONTINUATION_TOKENS, LosslessChain, add_arguments, context_options, continuation_logits, load_items

from qkvshare_edge import Llama, handoff
from qkvshare_edge.allocation import RowGroup, allocate
from qkvshare_edge.card import CacheCard
from qkvshare_edge.codec import LOSSLESS_WIDTH
from qkvshare_edge.models import resolve_model
from qkvshare_edge.quality import DEFAULT_HOP_REPLY_TOKENS, HOP_INSTRUCTION, Tokenizer, export_options
from qkvshare_edge.quality_metrics import kl_per_position, reference_log_probs

ENTRIES = ("uniform:flat", "uniform", "attention")
# Added to a reused row's score by `--reused-rows keep`: above any score a controller gives.
REUSED_SCORE = 1e9


def keep_reused_widths(groups: list[RowGroup], budget_bits: float, group_size: int) -> list[np.ndarray]:
    """Allocate as the product does, after raising reused rows' scores so they take their old widths first."""
    for group in groups:
        if group.max_bits is not None:
            # Rows capped below f16 are reused rows, capped at their old width.
            group.scores = np.where(group.max_bits < LOSSLESS_WIDTH, group.scores + REUSED_SCORE, group.scores)
    return allocate(groups, budget_bits, group_size)


def own_continuation(llm: Llama, end_tokens: list[int]) -> list[int]:
    """Return the next greedy tokens of the context `llm` has just decoded (end of text banned); appends them."""
    tokens: list[int] = []
    for _ in range(CONTINUATION_TOKENS):
        logits = llm.last_logits().copy()
        logits[end_tokens] = -np.inf
        tokens.append(int(np.argmax(logits)))
        llm.eval(tokens[-1:])
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, n_contexts=4, threads=1)
    parser.add_argument("--hops", type=int, default=8)
    parser.add_argument("--budgets", default="3,4", help="comma-separated bits per element")
    parser.add_argument("--appended", choices=("reply", "text"), default="reply", help="what each hop appends")
    parser.add_argument("--reused-rows", choices=("product", "keep"), default="product", help="re-export rule")
    args = parser.parse_args()
    if args.reused_rows == "keep":
        handoff.allocate = keep_reused_widths
    budgets = [float(b) for b in args.budgets.split(",")]

    # Tokens per hop in the text variant: as many as the note and the reply.
    tokenizer = Tokenizer(str(resolve_model(args.model)))
    hop_tokens = len(tokenizer(HOP_INSTRUCTION)) + DEFAULT_HOP_REPLY_TOKENS
    tokenizer.close()
    read_on = args.appended == "text"
    follow_tokens = CONTINUATION_TOKENS + (args.hops - 1) * hop_tokens if read_on else CONTINUATION_TOKENS
    path, items = load_items(args, continuation_tokens=follow_tokens)

    options = context_options(args.context_tokens + 64 * args.hops + CONTINUATION_TOKENS, args.threads)
    sender, worker = Llama(path, **options), Llama(path, **options)
    evaluator = Llama(path, logits_all=True, **options)
    chain = LosslessChain(worker)
    configurations = [(entry, budget) for entry in ENTRIES for budget in budgets]
    kls: dict[tuple[str, str, float, str], list[float]] = {}

    def export_all(llm: Llama) -> dict[tuple[str, float], CacheCard]:
        cards = {}
        for entry, budget in configurations:
            controller, extra = export_options(entry)
            cards[(entry, budget)] = llm.export_card(budget=budget, controller=controller, **extra)
        return cards

    def score(hop: str, lossless: CacheCard, cards: dict[tuple[str, float], CacheCard], follows: dict) -> None:
        for kind, follow in follows.items():
            reference = reference_log_probs(continuation_logits(evaluator, lossless, follow))
            for (entry, budget), card in cards.items():
                kl = kl_per_position(reference, continuation_logits(evaluator, card, follow))
                kls.setdefault((hop, entry, budget, kind), []).append(float(kl.mean()))

    for item in items:
        sender.clear_cache()
        sender.eval(item.context)
        lossless = sender.export_card(budget=16.0)
        cards = export_all(sender)
        own = own_continuation(sender, chain.end_tokens)
        score("1", lossless, cards, {"text": item.follow[:CONTINUATION_TOKENS], "own": own})

        for hop in range(2, args.hops + 1):
            if read_on:
                appended = item.follow[(hop - 2) * hop_tokens : (hop - 1) * hop_tokens]
                worker.clear_cache()
                worker.import_card(lossless)
                worker.eval(appended)
                lossless = worker.export_card(budget=16.0)
            else:
                lossless, appended = chain.next_hop(lossless)
            if hop == args.hops:
                made_once = export_all(worker)
                # The worker contains the lossless chain's hop-H context, just decoded.
                own = own_continuation(worker, chain.end_tokens)
            for (entry, budget), card in cards.items():
                controller, extra = export_options(entry)
                worker.clear_cache()
                worker.import_card(card)
                worker.eval(appended)
                cards[(entry, budget)] = worker.export_card(budget=budget, controller=controller, **extra)
        start = (args.hops - 1) * hop_tokens if read_on else 0
        text = item.follow[start : start + CONTINUATION_TOKENS]
        score("H", lossless, cards, {"text": text, "own": own})
        score("H made once", lossless, made_once, {"text": text, "own": own})
        print(f"{item.item_id} done", flush=True)

    def mean(hop: str, entry: str, budget: float, kind: str) -> float:
        return float(np.mean(kls[(hop, entry, budget, kind)]))

    print(
        f"\nmodel {args.model}, {len(items)} contexts of {args.context_tokens} tokens, hops append {args.appended}"
        + (f" ({hop_tokens} tokens)" if read_on else "")
        + (", reused rows keep their widths" if args.reused_rows == "keep" else "")
        + f", hop H = {args.hops}, mean KL over {CONTINUATION_TOKENS} positions"
    )
    for kind in ("text", "own"):
        print(f"\ncontinuation: {kind}\n")
        print("| entry | budget | hop 1 | hop H | hop H / hop 1 | hop H, made once | chain / made once |")
        print("|---" * 7 + "|")
        for entry, budget in configurations:
            first, last = mean("1", entry, budget, kind), mean("H", entry, budget, kind)
            once = mean("H made once", entry, budget, kind)
            print(
                f"| {entry} | {budget:g} | {first:.4f} | {last:.4f} | {last / first:.2f} | {once:.4f} "
                f"| {last / once:.2f} |"
            )


if __name__ == "__main__":
    main()
