"""Attention cards at hop H scored with different recorded queries.

Runs the lossless chain of `qkvedge eval quality` to hop H (per hop the
agent note and a 16-token greedy reply), then exports cards of the hop-H
context with the `attention` controller scored from: the queries recorded
at hop H (the product's behaviour), the queries of the original context's
last 32 tokens (hop 1), both, or the last 32 queries of the scored
continuation itself (known only after the fact, so a bound, not a method).
Prints the mean KL of each over the 64-token continuation that the harness
scores at hop H, with the hop-1 card and the `uniform` controller for
comparison.

    python docs/quality-results/hop-error/hop_queries.py --model gemma3-270m-f32 --text /tmp/licenses.txt
"""

from __future__ import annotations

import argparse

import numpy as np

from qkvshare_edge import Llama, handoff
from qkvshare_edge.attention import LayerQueries
from qkvshare_edge.card import CacheCard
from qkvshare_edge.models import resolve_model
from qkvshare_edge.quality import DEFAULT_HOP_REPLY_TOKENS, HOP_INSTRUCTION, Tokenizer, text_items
from qkvshare_edge.quality_metrics import kl_per_position, reference_log_probs

BUDGETS = (3.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--text", required=True)
    parser.add_argument("--hops", type=int, default=8)
    parser.add_argument("--n-contexts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    path = str(resolve_model(args.model))
    tokenizer = Tokenizer(path)
    with open(args.text, encoding="utf-8") as f:
        items = text_items(
            tokenizer, f.read(), n_context_tokens=1024, continuation_tokens=64, n_contexts=args.n_contexts, seed=0
        )
    tokenizer.close()
    options = {
        "n_ctx": 1024 + 64 * args.hops,
        "n_threads": args.threads,
        "n_threads_batch": args.threads,
        "flash_attn": False,
        "verbose": False,
    }
    sender, worker = Llama(path, **options), Llama(path, **options)
    evaluator = Llama(path, logits_all=True, **options)
    instruction = sender.tokenize(HOP_INSTRUCTION.encode("utf-8"), add_bos=False)
    end_tokens = [int(sender._model.token_eos()), int(sender._model.token_eot())]

    def continuation_logits(card: CacheCard, follow: list[int]) -> np.ndarray:
        evaluator.import_card(card, replace=True)
        evaluator.eval(follow)
        return np.array(evaluator.scores[card.n_tokens : card.n_tokens + len(follow)], dtype=np.float64)

    results: dict[tuple[str, float], list[float]] = {}
    for item in items:
        sender.clear_cache()
        sender.eval(item.context)
        assert sender.attention_recorder is not None
        hop1_queries = sender.attention_recorder.layers(0, sender.n_tokens)
        lossless = sender.export_card(budget=16.0)
        reference = reference_log_probs(continuation_logits(lossless, item.follow))
        for budget in BUDGETS:
            kl = kl_per_position(reference, continuation_logits(sender.export_card(budget=budget), item.follow))
            results.setdefault(("hop 1 card", budget), []).append(float(kl.mean()))

        for _ in range(2, args.hops + 1):
            worker.clear_cache()
            worker.import_card(lossless)
            worker.eval(instruction)
            reply: list[int] = []
            for _ in range(DEFAULT_HOP_REPLY_TOKENS):
                logits = worker.last_logits().copy()
                logits[end_tokens] = -np.inf
                reply.append(int(np.argmax(logits)))
                worker.eval(reply[-1:])
            worker.clear_cache()
            worker.import_card(lossless)
            worker.eval(instruction + reply)
            lossless = worker.export_card(budget=16.0)

        recorder = worker.attention_recorder
        assert recorder is not None and hop1_queries is not None
        last_queries = recorder.layers(0, worker.n_tokens)
        assert last_queries is not None
        both = [
            LayerQueries(
                a.layer,
                np.concatenate([a.positions, b.positions]),
                np.concatenate([a.queries, b.queries]),
                np.concatenate([a.keys, b.keys]),
            )
            for a, b in zip(hop1_queries, last_queries, strict=True)
        ]
        reference = reference_log_probs(continuation_logits(lossless, item.follow))
        assert evaluator.attention_recorder is not None
        continuation_queries = evaluator.attention_recorder.layers(0, evaluator.n_tokens)
        assert continuation_queries is not None
        recorded, match_layers = recorder.layers, handoff.match_layers
        choices = (
            (f"hop {args.hops} queries", None),
            ("hop 1 queries", hop1_queries),
            ("both", both),
            ("continuation queries (bound)", continuation_queries),
        )
        for name, queries in choices:
            if queries is not None:
                # The export reads the recorder; hand it the chosen queries instead. Cache
                # layers are matched to model layers through the hop-H keys, which the
                # cache contains (the continuation's keys are not in it).
                recorder.layers = lambda seq_id, n_positions, queries=queries: queries  # type: ignore[method-assign]
                handoff.match_layers = lambda _, positions, keys, match=match_layers, hop_rows=last_queries: match(
                    hop_rows, positions, keys
                )
            for budget in BUDGETS:
                kl = kl_per_position(reference, continuation_logits(worker.export_card(budget=budget), item.follow))
                results.setdefault((name, budget), []).append(float(kl.mean()))
            recorder.layers, handoff.match_layers = recorded, match_layers  # type: ignore[method-assign]
        for budget in BUDGETS:
            card = worker.export_card(budget=budget, controller="uniform")
            kl = kl_per_position(reference, continuation_logits(card, item.follow))
            results.setdefault(("uniform", budget), []).append(float(kl.mean()))

    print(f"model {args.model}, {len(items)} contexts of 1024 tokens, hop {args.hops}, mean KL over 64 positions\n")
    print("| card | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |")
    print("|---" * (len(BUDGETS) + 1) + "|")
    for name in dict.fromkeys(key[0] for key in results):
        print(f"| {name} | " + " | ".join(f"{np.mean(results[(name, b)]):.4f}" for b in BUDGETS) + " |")


if __name__ == "__main__":
    main()
