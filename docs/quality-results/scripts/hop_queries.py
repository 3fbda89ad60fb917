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

    python docs/quality-results/scripts/hop_queries.py --model gemma3-270m-f32 --text /tmp/licenses.txt
"""

from __future__ import annotations

import argparse

import numpy as np
from common import LosslessChain, add_arguments, context_options, continuation_logits, load_items

from qkvshare_edge import Llama, handoff
from qkvshare_edge.attention import LayerQueries
from qkvshare_edge.quality_metrics import kl_per_position, reference_log_probs

BUDGETS = (3.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, n_contexts=3, threads=1)
    parser.add_argument("--hops", type=int, default=8)
    args = parser.parse_args()

    path, items = load_items(args)
    options = context_options(args.context_tokens + 64 * args.hops, args.threads)
    sender, worker = Llama(path, **options), Llama(path, **options)
    evaluator = Llama(path, logits_all=True, **options)
    chain = LosslessChain(worker)

    results: dict[tuple[str, float], list[float]] = {}
    for item in items:
        sender.clear_cache()
        sender.eval(item.context)
        assert sender.attention_recorder is not None
        hop1_queries = sender.attention_recorder.layers(0, sender.n_tokens)
        lossless = sender.export_card(budget=16.0)
        reference = reference_log_probs(continuation_logits(evaluator, lossless, item.follow))
        for budget in BUDGETS:
            card = sender.export_card(budget=budget)
            kl = kl_per_position(reference, continuation_logits(evaluator, card, item.follow))
            results.setdefault(("hop 1 card", budget), []).append(float(kl.mean()))

        for _ in range(2, args.hops + 1):
            lossless, _ = chain.next_hop(lossless)

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
        reference = reference_log_probs(continuation_logits(evaluator, lossless, item.follow))
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
                card = worker.export_card(budget=budget)
                kl = kl_per_position(reference, continuation_logits(evaluator, card, item.follow))
                results.setdefault((name, budget), []).append(float(kl.mean()))
            recorder.layers, handoff.match_layers = recorded, match_layers  # type: ignore[method-assign]
        for budget in BUDGETS:
            card = worker.export_card(budget=budget, controller="uniform")
            kl = kl_per_position(reference, continuation_logits(evaluator, card, item.follow))
            results.setdefault(("uniform", budget), []).append(float(kl.mean()))

    print(
        f"model {args.model}, {len(items)} contexts of {args.context_tokens} tokens, hop {args.hops}, "
        "mean KL over 64 positions\n"
    )
    print("| card | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |")
    print("|---" * (len(BUDGETS) + 1) + "|")
    for name in dict.fromkeys(key[0] for key in results):
        print(f"| {name} | " + " | ".join(f"{np.mean(results[(name, b)]):.4f}" for b in BUDGETS) + " |")


if __name__ == "__main__":
    main()
